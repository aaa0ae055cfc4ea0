"""A killed job resumes from the shards it finished and ends with the same outputs.

The killed run is a process of its own (its driver gets SIGKILL); the resumed and the
uninterrupted runs are the same job's ``main`` in this process, on the suite's Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from clipscan.stages.embed import load_embeddings
from tests.conftest import load_job

ROOT = Path(__file__).resolve().parents[1]
STREAMED = "data.stream_min_rows=1"  # the manifest read in Ray tasks, shard by shard


def _command(manifest: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "daf.py"), *_args(manifest, out), *extra]


def _args(manifest: str, out: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "daf-tiny.yaml"),
            f"data.path={manifest}", f"output={out}", "models.probe=py:tests.planted:slow",
            "models.reference=hf:tiny-dinov2", "embed.image_size=32", "embed.batch_size=16",
            "data.rows_per_block=32", "ray.num_cpus=2", "mining.cases=5", "report.rows=3"]


def _tcac_command(manifest: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "tcac.py"), *_tcac_args(manifest, out), *extra]


def _tcac_args(manifest: str, out: Path) -> list[str]:
    transforms = '{"hflip": {"p": 1.0}, "rotation": {"degrees": 20}}'
    return ["--config", str(ROOT / "configs" / "tcac-tiny.yaml"),
            f"data.path={manifest}", f"output={out}", "models.probe=py:tests.planted:slow_clip",
            "embed.image_size=32", "embed.batch_size=16", "data.rows_per_block=32", "ray.num_cpus=2",
            "tcac.forward_rows=16", f"tcac.transforms={transforms}", "tcac.report_top=3"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    return env


def _complete_shards(raw: Path) -> int:
    done = 0
    for shard in raw.glob("shard-*"):
        rows = sum(int(p.stem.split("-")[2]) - int(p.stem.split("-")[1]) + 1 for p in shard.glob("rows-*.parquet"))
        done += rows == 32
    return done


def _run_and_kill(command: list[str], raw: Path, shards: int) -> int:
    """Start the job, SIGKILL its driver (and the local Ray it started) once ``shards`` shards are written whole."""
    proc = subprocess.Popen(command, env=_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and _complete_shards(raw) < shards and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed"
    finished_before_kill = _complete_shards(raw)
    os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-stage
    proc.wait()
    time.sleep(1)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # and the local Ray it started with it
    except ProcessLookupError:
        pass
    return finished_before_kill


def test_kill_mid_embedding_then_resume(tmp_path: Path, ray_local: None) -> None:
    from clipscan.data.scenes import write_corpus

    manifest = write_corpus(str(tmp_path / "corpus"), 224, seed=5, size=48)
    out = tmp_path / "run"
    # the killed and the resumed run stream the manifest (read in Ray tasks), the clean run lists it
    finished_before_kill = _run_and_kill(_command(manifest, out, STREAMED), out / "_rows", 3)
    assert finished_before_kill >= 3 and not (out / "discrepancies.parquet").exists()

    daf = load_job("daf")
    assert daf.main([*_args(manifest, out), STREAMED]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done"
    assert info["stages"]["read"]["streamed"] is True and info["stages"]["read"]["changed_shards"] == 0
    assert info["stages"]["read"]["todo_shards"] <= 7 - finished_before_kill  # finished shards not recomputed
    assert info["counts"]["read"] == 224 == info["counts"]["embedded"] + info["counts"]["skipped"]

    clean = tmp_path / "clean"
    assert daf.main(_args(manifest, clean)) == 0
    for model in ("probe", "reference"):
        ids_a, x_a = load_embeddings(str(out), model)
        ids_b, x_b = load_embeddings(str(clean), model)
        assert list(ids_a) == list(ids_b)
        np.testing.assert_array_equal(x_a, x_b)
    for name in ("discrepancies.parquet", "pairs.parquet", "cases.parquet", "skipped.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(clean / name)), name


def test_kill_mid_tcac_scoring_then_resume(tmp_path: Path, ray_local: None) -> None:
    from clipscan.data.scenes import write_corpus

    manifest = write_corpus(str(tmp_path / "corpus"), 160, seed=6, size=48)
    out = tmp_path / "run"
    finished_before_kill = _run_and_kill(_tcac_command(manifest, out, STREAMED), out / "_rows", 2)
    assert finished_before_kill >= 2 and (out / "captions.parquet").exists() and not (out / "tcac.parquet").exists()

    tcac = load_job("tcac")
    assert tcac.main([*_tcac_args(manifest, out), STREAMED]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and not (out / "_rows").exists() and not (out / "_read").exists()
    assert info["stages"]["read"]["streamed"] is True
    assert info["stages"]["caption_pool"]["reused"] is True  # the captions were not embedded again
    assert info["stages"]["score"]["shards_reused"] >= finished_before_kill  # nor the finished shards scored
    assert info["stages"]["read"]["todo_shards"] <= 5 - finished_before_kill
    assert info["counts"]["read"] == 160 == info["counts"]["scored"] + info["counts"]["skipped"]

    clean = tmp_path / "clean"
    assert tcac.main(_tcac_args(manifest, clean)) == 0
    for name in ("tcac.parquet", "skipped.parquet", "captions.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(clean / name)), name
    assert json.loads((clean / "run.json").read_text())["tcac_summary"] == info["tcac_summary"]


def _search_blocks(out: Path) -> int:
    return len(list((out / "_search").glob("part-*.parquet")))


def test_kill_mid_search_then_resume(tmp_path: Path, ray_local: None) -> None:
    """DAF over emb: vectors through the sharded search, SIGKILLed once some query blocks are
    written: the rerun keeps those blocks (stages.index.blocks_reused) and ends with the
    same discrepancies as a clean run."""
    from tests.corpora import clip_retrieval

    probe = clip_retrieval(tmp_path / "probe", 30_000, 64, seed=1)
    reference = clip_retrieval(tmp_path / "reference", 30_000, 48, seed=2)
    args = ["--config", str(ROOT / "configs" / "daf-tiny.yaml"), f"models.probe=emb:{probe}",
            f"models.reference=emb:{reference}", "knn.stage_min_rows=1000", "knn.query_block=300",
            "knn.search_actors=1", "mining.cases=5", "report.rows=3", "attributes.enabled=false", "ray.num_cpus=2"]
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "jobs" / "daf.py"), *args, f"output={out}"]
    proc = subprocess.Popen(command, env=_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and _search_blocks(out) < 10 and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-search
    proc.wait()
    written = _search_blocks(out)
    assert written >= 10, written

    daf = load_job("daf")
    assert daf.main([*args, f"output={out}"]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["stages"]["index"]["where"] == "ray"
    assert info["stages"]["index"]["blocks"] > info["stages"]["index"]["blocks_reused"] >= written
    clean = tmp_path / "clean"
    assert daf.main([*args, f"output={clean}"]) == 0
    assert json.loads((clean / "run.json").read_text())["stages"]["index"]["blocks_reused"] == 0
    for name in ("discrepancies.parquet", "pairs.parquet", "cases.parquet", "skipped.parquet"):
        assert pq.read_table(out / name).equals(pq.read_table(clean / name)), name
