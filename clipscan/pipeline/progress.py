"""A running stage's ``rows done/total, rate, ETA`` lines for job logs (a terminal shows Ray Data's own bars)."""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger("clipscan")


class Progress:
    """Logs ``stage: rows done/total (pct), rate, ETA`` every ``interval_s`` while a stage runs.

    On a terminal Ray Data's own progress bars show; in a job log (not a terminal) these
    lines are the progress.
    """

    def __init__(self, stage: str, done: Any, total: int | None, interval_s: float = 15.0) -> None:
        import threading

        self.stage, self.done, self.total, self.interval_s = stage, done, total, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._logged = False

    def __enter__(self) -> Progress:
        import time

        self._start = time.perf_counter()
        if not sys.stderr.isatty():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if exc[0] is None and not sys.stderr.isatty() and not self._logged:
            try:  # a stage shorter than the interval still says how much it did and how fast
                log.info(self.line())
            except Exception:
                pass

    def line(self) -> str:
        import time

        elapsed = max(time.perf_counter() - self._start, 1e-9)
        done = self.done()
        rate = done / elapsed
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            return (f"{self.stage}: {done}/{self.total} rows ({100 * done / self.total:.0f}%), "
                    f"{rate:.1f} rows/s, ETA {eta:.0f} s")
        return f"{self.stage}: {done} rows, {rate:.1f} rows/s"

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                log.info(self.line())
                self._logged = True
            except Exception:  # progress is best effort; the stage's own errors surface elsewhere
                continue
