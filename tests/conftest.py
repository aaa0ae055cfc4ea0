"""Shared fixtures: one local Ray (2 CPUs, small object store), generated corpora, tiny models."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never download
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray keeps its address file and default sessions under $RAY_TMPDIR/ray (else /tmp/ray), and
# parts of it fail where that folder is missing: the suite brings its own, so it neither needs
# nor touches what an earlier Ray left on the machine.
if "RAY_TMPDIR" not in os.environ:
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="clipscan-tests-")
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"))

TINY_PROBE = "open_clip:tiny-clip"
TINY_REFERENCE = "hf:tiny-dinov2"
ROOT = Path(__file__).resolve().parents[1]


def load_job(name: str) -> ModuleType:
    """The job script ``jobs/<name>.py`` as a module, so a test runs its real ``main(argv)`` in-process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"clipscan_job_{name}", ROOT / "jobs" / f"{name}.py")
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_without_ray(job: str, argv: list[str]) -> None:
    """Run ``jobs/<job>.py argv`` as a user would, in a fresh process with no cluster named
    (no ``RAY_ADDRESS``), and check that it ends with exit 0 without ever starting Ray."""
    import subprocess
    import sys

    code = ("import runpy, sys, ray\n"
            f"sys.argv = ['{job}.py', *{argv!r}]\n"
            f"try:\n    runpy.run_path('jobs/{job}.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('ray started:', ray.is_initialized())\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray started: False" in proc.stdout, proc.stdout[-2000:]


def overrides(*items: str) -> list[str]:
    """``key=value`` overrides with later ones replacing earlier ones of the same key.

    Jobs refuse a key given twice; tests that lay their own values over defaults merge here.
    """
    merged: dict[str, str] = {}
    for item in items:
        merged[item.split("=", 1)[0]] = item
    return list(merged.values())


def has_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A real local Ray with 2 CPUs, started once for the whole session in a fresh temp dir."""
    import ray

    from clipscan.pipeline.cluster import start_local_ray

    if ray.is_initialized():
        yield
        return
    # What the jobs start, with a smaller object store.
    temp = tempfile.mkdtemp(prefix="clipscan-test-ray-")
    start_local_ray(2, temp, object_store_memory=512 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def scene_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A generated corpus of 120 scenes at 96 px; returns its manifest path."""
    from clipscan.data.scenes import write_corpus

    out = tmp_path_factory.mktemp("scenes")
    return write_corpus(str(out / "corpus"), 120, seed=3, size=96)


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    return tmp_path
