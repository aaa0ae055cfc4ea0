"""The benchmark scripts run end to end on small sizes and print their tables.

Their figures are not checked here (they depend on the machine); that the scripts still
run, and still measure the same things side by side, is.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench(*args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_knn_benchmark() -> None:
    out = _bench("benchmarks/knn.py", "--n", "3000", "--d", "32")
    for row in ("(a) ", "(b) faiss IndexFlatIP", "(c) numpy", "(d) faiss GPU"):
        assert row in out, row
    assert "(a)/(b) speed:" in out


@pytest.mark.slow
def test_embed_benchmark() -> None:
    out = _bench("benchmarks/embed.py", "--tiny-only", "--n", "40", "--mem-sizes", "200", "400")
    assert "Peak memory" in out
    sizes = [line.split()[0] for line in out.splitlines() if line.strip()[:3].isdigit()]
    assert sizes[-2:] == ["200", "400"], out


@pytest.mark.slow
def test_scale_benchmark(tmp_path: Path) -> None:
    out = _bench("benchmarks/scale.py", "--sizes", "200,400", "--work", str(tmp_path))
    assert "growth" in out and "index" in out


@pytest.mark.slow
def test_tcac_benchmark() -> None:
    out = _bench("benchmarks/tcac.py", "--models", "tiny", "--images", "8", "--transforms", "1,2")
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny ")]
    assert [(r[1], r[2]) for r in rows] == [("1", "16"), ("2", "16")], out


@pytest.mark.slow
def test_scale_benchmark_precomputed(tmp_path: Path) -> None:
    out = _bench("benchmarks/scale.py", "--precomputed", "--sizes", "1000,2000", "--rows-per-file", "600",
                 "--stop-after", "vectors", "--cpus", "2", "--work", str(tmp_path))
    assert "driver peak RSS (VmHWM)" in out and "largest worker VmHWM" in out and "driver peak ratio" in out
    joined = next(line for line in out.splitlines() if line.startswith("rows joined")).split()[2:]
    assert joined == ["999", "1,998"], out  # every 1,000th id is missing from the reference
