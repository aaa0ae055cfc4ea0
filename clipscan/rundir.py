"""A job's run directory: ``run.json`` (config, versions, counts, stage timings) and atomic writes into it."""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import logging
import time
import weakref
from collections.abc import Iterator
from importlib import metadata
from typing import Any

from pydantic import BaseModel

from clipscan import fs as cfs
from clipscan.config import config_dict

log = logging.getLogger("clipscan")

PACKAGES = ("clipscan", "ray", "torch", "torchvision", "open_clip_torch", "transformers",
            "faiss-cpu", "faiss-gpu-cu12", "pyarrow", "numpy", "pillow", "vllm")


class RunDirError(RuntimeError):
    """A run directory that cannot be used for this run; the message says why and what to do."""


class StageFailed(RuntimeError):
    """A stage of a job failed; the message names the stage and the cause."""


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


class Run:
    """The run directory of one job: paths in it, counts and timings, ``run.json`` kept current."""

    def __init__(self, output: str, job: str, config: BaseModel, overwrite: bool = False) -> None:
        self.output = output
        previous = self._previous_config()
        wanted = config_dict(config)
        if previous is not None and overwrite:
            _clear(output)
        elif previous is not None and previous != wanted:
            changed = sorted(_diff(previous, wanted))
            raise RunDirError(
                f"run directory {output} holds a run with a different config "
                f"(differs at: {', '.join(changed) or 'job'}); pass --overwrite to replace it "
                "or choose another output"
            )
        cfs.makedirs(output)
        self.info: dict[str, Any] = {
            "job": job,
            "status": "running",
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": config_dict(config),
            "versions": versions(),
            "counts": {},
            "stages": {},
        }
        self.current_stage: str | None = None
        self.last_stage: str | None = None
        self.save()
        _OPEN.add(self)

    def _previous_config(self) -> dict[str, Any] | None:
        path = cfs.join(self.output, "run.json")
        if not cfs.exists(path):
            return None
        try:
            return dict(json.loads(cfs.read_bytes(path)).get("config") or {})
        except (ValueError, OSError):
            return {}

    def path(self, *parts: str) -> str:
        return cfs.join(self.output, *parts)

    def save(self) -> None:
        cfs.write_json_atomic(self.path("run.json"), self.info)

    def record(self, key: str, value: Any) -> None:
        """Put ``value`` under ``key`` in ``run.json`` (top level) and save."""
        self.info[key] = value
        self.save()

    def count(self, **counts: Any) -> None:
        self.info["counts"].update(counts)
        self.save()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """Time a stage; what the body puts in the yielded dict is stored with the timing."""
        facts: dict[str, Any] = {}
        log.info("stage %s: started", name)
        start = time.perf_counter()
        self.current_stage = name
        try:
            yield facts
        except BaseException as e:  # KeyboardInterrupt and SystemExit (SIGTERM) are recorded too
            facts["wall_s"] = round(time.perf_counter() - start, 3)
            facts["error"] = f"{type(e).__name__}: {e}"
            self.info["stages"][name] = facts
            self.current_stage = None
            self.fail(f"{type(e).__name__}: {e}", stage=name)
            if not isinstance(e, Exception):
                raise
            raise StageFailed(f"stage {name!r} failed: {type(e).__name__}: {e}") from e
        self.current_stage, self.last_stage = None, name
        facts["wall_s"] = round(time.perf_counter() - start, 3)
        self.info["stages"][name] = facts
        self.save()
        log.info("stage %s: done in %.1f s %s", name, facts["wall_s"],
                 {k: v for k, v in facts.items() if k != "wall_s"})

    def fail(self, reason: str, stage: str | None = None) -> None:
        """Record the run as failed: ``status`` names the stage (or the last one done), ``error`` the reason."""
        where = stage or self.current_stage
        self.info["status"] = f"failed in stage {where}" if where else (
            f"failed after stage {self.last_stage}" if self.last_stage else "failed before the first stage")
        self.info["error"] = reason
        self.info["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.save()
        _OPEN.discard(self)

    def finish(self) -> None:
        self.info["status"] = "done"
        self.info["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.save()
        _OPEN.discard(self)


_OPEN: weakref.WeakSet[Run] = weakref.WeakSet()


@atexit.register
def _fail_unfinished() -> None:
    """A process that ends with a run neither finished nor failed (SystemExit from SIGTERM) records why."""
    fail_open_runs("the job process exited before the run finished")


def fail_open_runs(reason: str) -> None:
    """Record ``reason`` in every run of this process that neither finished nor failed yet.

    Job scripts call it for an error raised between stages (``only 0 images could be
    embedded``), so that no failed run stays ``running`` in ``run.json``.
    """
    for run in list(_OPEN):
        try:
            run.fail(reason)
        except OSError:  # the run directory itself is gone or unwritable: the error still reaches the user
            log.warning("could not record the failure in %s", run.output)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _clear(output: str) -> None:
    fsys, inner = cfs.resolve(output)
    fsys.delete_dir_contents(inner, missing_dir_ok=True)
