"""`ray job submit` against a real `ray start --head` cluster, the way users run DAF on a cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipscan.pipeline.cluster import IDLE_WORKERS

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["RAY_AUTH_MODE"] = "disabled"  # the same for the cluster and the CLI
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def head_node() -> Iterator[str]:
    temp = tempfile.mkdtemp(prefix="clipscan-head-")
    dashboard = _free_port()
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--num-cpus=2", f"--port={_free_port()}",
         f"--dashboard-port={dashboard}", "--include-dashboard=true", f"--temp-dir={temp}",
         # The agents default to fixed ports that the suite's own local cluster already holds;
         # a head whose job agent cannot bind never accepts a submission.
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
         f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
         "--disable-usage-stats"],
        # a small head keeps idle workers between stages, as clipscan's own local Ray does
        env={**_env(), "RAY_num_workers_soft_limit": str(IDLE_WORKERS)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 90
    while time.time() < deadline:
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address],
                               env=_env(), capture_output=True, text=True)
        if probe.returncode == 0:
            break
        time.sleep(2)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("the Ray head node did not come up within 90 s")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_daf_through_ray_job_submit(head_node: str, scene_corpus: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    deadline = time.time() + 180
    while True:
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", head_node, "--working-dir", str(ROOT), "--",
             "python", "jobs/daf.py", "--config", "configs/daf-tiny.yaml", f"data.path={scene_corpus}",
             f"output={out}", "embed.image_size=48", "mining.cases=5", "report.rows=5"],
            env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(5)  # the head answers before its job agent is up; Ray's own advice is to retry
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {out / 'report.html'}" in proc.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["counts"]["embedded"] == 120


def test_bias_through_ray_job_submit(head_node: str, tmp_path: Path) -> None:
    out = tmp_path / "bias"
    deadline = time.time() + 180
    while True:
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", head_node, "--working-dir", str(ROOT), "--",
             "python", "jobs/bias.py", "--config", "configs/bias-tiny.yaml", f"output={out}",
             "bias.scenes=4", "bias.orders=4", "embed.image_size=48"],
            env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT,
        )
        if "No available agent to submit job" not in proc.stdout + proc.stderr or time.time() > deadline:
            break
        time.sleep(5)  # the head answers before its job agent is up; Ray's own advice is to retry
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {out / 'report.html'}" in proc.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and info["counts"]["embedded"] == 88 + 16  # single objects + scenes
    models = json.loads((out / "bias.json").read_text())["models"]
    assert set(models["open_clip:tiny-clip"]) == {"text_order", "image_size", "matching"}
    assert set(models["hf:tiny-dinov2"]) == {"image_size"}
