"""Shared by the benchmark scripts: peak memory and CPU time of this process and its Ray workers."""

from __future__ import annotations

import threading
from pathlib import Path

DINOV2_SMALL = {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                "intermediate_size": 1536, "patch_size": 14, "image_size": 518}


def dinov2_small_dir(root: Path, image_size: int = 518) -> str:
    """A DINOv2-S-sized model with random weights saved with save_pretrained; its ``hf:`` spec.

    Needs only torch and transformers, so the GPU check can use it on a bare CUDA machine.
    """
    import json

    import torch
    import transformers

    torch.manual_seed(0)
    path = root / "dinov2-small-random"
    config = transformers.Dinov2Config(**{**DINOV2_SMALL, "image_size": image_size})
    transformers.Dinov2Model(config).save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "image_processor_type": "BitImageProcessor"}))
    return f"hf:{path}"


def vm_status(pid: int | str = "self", field: str = "VmHWM") -> int:
    """One process's ``field`` of /proc/PID/status, bytes (VmHWM: its peak resident set,
    counting the object-store pages it maps; RssAnon: its private memory now); 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler:
    """Samples this process and its descendants every interval_s; keeps the peak RSS and PSS
    sums and the CPU seconds they used (the Ray workers included).

    PSS counts a shared page (the Ray object store mapped by every worker) once overall.
    CPU seconds, unlike wall time, hardly move when other jobs share the machine.
    With memory=False only CPU time is sampled (reading PSS walks each process's pages).

    Reading PSS costs about 5 ms per Ray process while the object store is mapped: at a
    fixed 0.2 s, a sampler in the measuring process would take half a core from the work it
    measures. So memory is read at most every ``budget`` of the time (after a reading that
    took t seconds, the next comes no sooner than t / budget), CPU time every interval_s.
    """

    def __init__(self, interval_s: float = 0.2, memory: bool = True, budget: float = 0.02):
        self.interval_s = interval_s
        self.memory = memory
        self.budget = budget
        self._memory_due = 0.0
        self.peak_rss = 0
        self.peak_pss = 0
        self.idle_pss = 0
        self._cpu_start: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def cpu_seconds(self) -> float:
        return sum(v - self._cpu_start.get(pid, 0.0) for pid, v in self._cpu_last.items())

    def sample(self, memory: bool | None = None) -> None:
        """One reading of CPU time, and of memory when ``memory`` (default: when it is due)."""
        import time

        import psutil

        started = time.perf_counter()
        if memory is None:
            memory = self.memory and started >= self._memory_due
        me = psutil.Process()
        rss = pss = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                with proc.oneshot():
                    info = proc.memory_full_info() if memory else None
                    cpu = proc.cpu_times()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if info is not None:
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
            self._cpu_last[proc.pid] = cpu.user + cpu.system
        if memory:
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            took = time.perf_counter() - started
            self._memory_due = started + took / self.budget

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample(self.memory)
        self.idle_pss = self.peak_pss
        self._cpu_start = dict(self._cpu_last)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample(self.memory)


class StagePeaks:
    """The driver's peak resident set (VmHWM) within each stage of a ``Run``, and with
    ``trace`` its Python heap's peak (tracemalloc: numpy and Python objects; not Arrow's
    or Ray's C++ heaps). The kernel's peak is reset at each stage's start (``clear_refs``
    5), so each figure is that stage's own."""

    def __init__(self, trace: bool = False) -> None:
        self.trace = trace
        self.peaks: dict[str, dict[str, int]] = {}

    def __enter__(self) -> StagePeaks:
        import contextlib
        import tracemalloc

        from clipscan.rundir import Run

        self._original = original = Run.stage
        peaks, trace = self.peaks, self.trace
        if trace:
            tracemalloc.start()

        @contextlib.contextmanager
        def stage(run: Run, name: str):  # type: ignore[no-untyped-def]
            reset_peak()
            if trace:
                tracemalloc.reset_peak()
            with original(run, name) as facts:
                yield facts
            peaks[name] = {"hwm": vm_status()}
            if trace:
                peaks[name]["traced"] = tracemalloc.get_traced_memory()[1]

        Run.stage = stage  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        import tracemalloc

        from clipscan.rundir import Run

        Run.stage = self._original  # type: ignore[method-assign]
        if self.trace:
            tracemalloc.stop()


def reset_peak() -> None:
    """Reset this process's VmHWM to its current resident set (Linux ``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
