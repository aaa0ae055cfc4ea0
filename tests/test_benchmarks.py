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


def test_read_benchmark() -> None:
    out = _bench("benchmarks/read.py", "--sizes", "300,3000")
    assert "arrow s" in out and "rows s" in out
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["300", "3,000"], out
    assert "bytes of driver peak per manifest row" in out and "Streamed: the driver's peak" in out


@pytest.mark.slow
def test_embed_benchmark() -> None:
    out = _bench("benchmarks/embed.py", "--tiny-only", "--n", "24", "--mem-sizes", "100", "200")
    assert "Peak memory" in out
    sizes = [line.split()[0] for line in out.splitlines() if line.strip()[:3].isdigit()]
    assert sizes[-2:] == ["100", "200"], out


@pytest.mark.slow
def test_scale_benchmark(tmp_path: Path) -> None:
    out = _bench("benchmarks/scale.py", "--sizes", "100,200", "--image-size", "32", "--work", str(tmp_path))
    assert "growth" in out and "index" in out


@pytest.mark.slow
def test_tcac_benchmark() -> None:
    out = _bench("benchmarks/tcac.py", "--models", "tiny", "--images", "8", "--transforms", "2")
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny ")]
    assert [(r[1], r[2]) for r in rows] == [("2", "16")], out


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_as_a_smoke_test() -> None:
    out = _bench("benchmarks/gpu.py", "--device", "cpu", "--tiny", "--images", "16", "--batches", "4", "8",
                 "--knn-rows", "2000", "--jpeg-size", "96", "--size", "64")
    for part in ("1. decode", "2. encoders alone", "3. nvJPEG decode + tiny-clip + tiny-dinov2", "4. exact top-10"):
        assert part in out, part
    import json

    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["decode"]["nvjpeg_decode"] > 0 and set(figures["encoders"]) >= {"both fp16", "both bf16"}


@pytest.mark.slow
def test_plain_script_baseline(tmp_path: Path) -> None:
    import json

    import torch
    import transformers

    from clipscan.data.scenes import write_corpus

    manifest = write_corpus(str(tmp_path / "corpus"), 24, seed=1, size=64)
    torch.manual_seed(0)
    dino = tmp_path / "dino"
    transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8,
        image_size=64)).save_pretrained(dino)
    (dino / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 64, "width": 64}, "size": {"shortest_edge": 64},
        "image_processor_type": "BitImageProcessor"}))
    out = _bench("benchmarks/plain_daf.py", "--manifest", manifest, "--reference", str(dino), "--probe", "RN50",
                 "--batch", "8")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["images"] == 24 and 0 <= result["mean_overlap"] <= 10 and result["wall_s"] > 0


@pytest.mark.slow
def test_scale_benchmark_precomputed(tmp_path: Path) -> None:
    out = _bench("benchmarks/scale.py", "--precomputed", "--sizes", "1000,2000", "--rows-per-file", "600",
                 "--stop-after", "vectors", "--cpus", "2", "--work", str(tmp_path))
    assert "driver peak RSS (VmHWM)" in out and "largest worker VmHWM" in out and "driver peak ratio" in out
    joined = next(line for line in out.splitlines() if line.startswith("rows joined")).split()[2:]
    assert joined == ["999", "1,998"], out  # every 1,000th id is missing from the reference
