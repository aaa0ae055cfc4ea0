"""Embedding throughput benchmark: generated JPEGs in, a table of images/s, ratios and peak memory out.

Measured side by side in one run:
  1. the whole DAF job (``python jobs/daf.py``, Ray start and report included) against the
     paper's DAF as one plain single-process script (benchmarks/plain_daf.py: PIL, each
     model's own preprocessing, one image at a time, numpy top-10), both as fresh processes
     on the same images; the ratio script wall / job wall is the target (>= 1.1 at 600);
     the same script batched (32 images per pass) is printed beside it;
  2. model-only: the probe and reference encoders on pre-decoded uint8 batches in this
     process (every thread), no I/O, no Ray;
  3. end to end: the same encoders through the Ray pipeline (read, decode, one actor pool,
     Parquet write) on JPEGs on disk; the ratio 3/2 is the target (>= 0.9 at 360);
  4. peak memory (RSS and PSS of this process and every Ray worker) of the end-to-end
     pipeline with tiny models at two corpus sizes: streaming keeps it flat.

    python benchmarks/embed.py                       # ViT-B-32 + DINOv2-S-sized, random weights
    python benchmarks/embed.py --n 360 --job-n 600 --mem-sizes 2000 20000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Sampler, dinov2_small_dir  # noqa: E402


def model_only(models: dict[str, str], manifest: str, n: int, size: int, batch: int) -> float:
    """Images/s of every encoder together on pre-decoded (batch, size, size, 3) uint8 arrays."""
    import pyarrow.parquet as pq
    import torch

    from clipscan.models.registry import load_encoder
    from clipscan.stages.decode import decode_image

    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(manifest).parent
    paths = [root / p for p in pq.read_table(manifest).column("image").to_pylist()[:n]]
    pixels = np.stack([decode_image(p.read_bytes(), size, 10**9)[0] for p in paths])
    encoders = [load_encoder(spec) for spec in models.values()]
    for enc in encoders:  # warm-up
        enc.embed_images(pixels[:batch])
    start = time.perf_counter()
    for lo in range(0, n, batch):
        for enc in encoders:
            enc.embed_images(pixels[lo : lo + batch])
    return n / (time.perf_counter() - start)


def end_to_end(models: dict[str, str], manifest: str, out: Path, size: int, batch: int,
               sampler: Sampler | None = None) -> tuple[float, int]:
    """Images/s through read -> decode tasks -> encoder actors -> Parquet, and rows embedded."""
    from clipscan.config import DafConfig, load_config
    from clipscan.rundir import Run
    from clipscan.runner import embed_corpus

    cfg = load_config(DafConfig, None, [
        f"data.path={manifest}", f"output={out}", f"models.probe={models['probe']}",
        f"models.reference={models['reference']}", f"embed.image_size={size}", f"embed.batch_size={batch}",
    ])
    run = Run(str(out), "benchmark", cfg, overwrite=True)
    start = time.perf_counter()
    if sampler is not None:
        with sampler:
            counts = embed_corpus(run, cfg, models)
    else:
        counts = embed_corpus(run, cfg, models)
    wall = time.perf_counter() - start
    return counts["embedded"] / wall, counts["embedded"]


def whole_job_against_script(work: Path, reference: str, n: int, size: int) -> list[tuple[str, float]]:
    """Wall seconds of ``jobs/daf.py`` and of the plain script (one image at a time, and batched), each a fresh process."""
    import subprocess

    from clipscan.data.scenes import write_corpus

    root = Path(__file__).resolve().parents[1]
    manifest = write_corpus(str(work / f"corpus-job-{n}"), n, seed=2, size=size)
    runs = {
        "plain script, one image at a time": [sys.executable, str(root / "benchmarks" / "plain_daf.py"),
                                              "--manifest", manifest, "--reference", reference[len("hf:"):]],
        "plain script, 32 images per pass": [sys.executable, str(root / "benchmarks" / "plain_daf.py"),
                                             "--manifest", manifest, "--reference", reference[len("hf:"):],
                                             "--batch", "32"],
        "clipscan jobs/daf.py": [sys.executable, str(root / "jobs" / "daf.py"), "--config",
                                 str(root / "configs" / "daf-tiny.yaml"), f"data.path={manifest}",
                                 f"output={work / 'run-job'}", "models.probe=open_clip:ViT-B-32",
                                 f"models.reference={reference}", f"embed.image_size={size}", "llm.backend=off"],
    }
    walls = []
    for name, cmd in runs.items():
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            raise RuntimeError(f"{name} failed: {proc.stderr[-2000:]}")
        walls.append((name, time.perf_counter() - start))
    return walls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=360, help="images for the model-only / end-to-end comparison")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--mem-sizes", type=int, nargs="*", default=[2000, 20000])
    parser.add_argument("--job-n", type=int, default=600, help="images for the whole-job comparison (0: skip it)")
    parser.add_argument("--tiny-only", action="store_true", help="skip the ViT-B-32 / DINOv2-S comparisons")
    args = parser.parse_args(argv)

    import ray

    from clipscan.data.scenes import write_corpus

    work = Path(tempfile.mkdtemp(prefix="clipscan-bench-"))
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if not args.tiny_only and args.job_n:
        walls = whole_job_against_script(work, dinov2_small_dir(work), args.job_n, args.size)
        job = walls[-1][1]
        print(f"\nWhole DAF run, {args.job_n} images, ViT-B-32 + DINOv2-S (random weights), each a fresh process")
        print(f"{'run':36s} {'wall s':>8s} {'img/s':>7s} {'script wall / job wall':>23s}")
        for name, wall in walls:
            print(f"{name:36s} {wall:8.1f} {args.job_n / wall:7.1f} {wall / job:23.2f}")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, _temp_dir=str(work / "ray"),
             log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        rows = []
        if not args.tiny_only and args.n:
            manifest = write_corpus(str(work / "corpus"), args.n, seed=0, size=args.size)
            models = {"probe": "open_clip:ViT-B-32", "reference": dinov2_small_dir(work)}
            only = model_only(models, manifest, args.n, args.size, args.batch)
            e2e, _ = end_to_end(models, manifest, work / "run", args.size, args.batch)
            rows.append(("ViT-B-32 + DINOv2-S (random weights)", args.n, only, e2e))
        print(f"\nEmbedding throughput on {os.cpu_count()} CPUs, {args.size} px, batch {args.batch}")
        print(f"{'encoders':40s} {'images':>7s} {'model-only img/s':>17s} {'end-to-end img/s':>17s} {'ratio':>6s}")
        for name, n, only, e2e in rows:
            print(f"{name:40s} {n:7d} {only:17.1f} {e2e:17.1f} {e2e / only:6.2f}")
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

        tiny = {"probe": "open_clip:tiny-clip", "reference": "hf:tiny-dinov2"}
        print(f"\nPeak memory, tiny models, {args.size} px JPEGs (driver + Ray workers)")
        print(f"{'images':>7s} {'img/s':>8s} {'peak RSS GiB':>13s} {'peak PSS GiB':>13s}")
        for n in args.mem_sizes:
            manifest = write_corpus(str(work / f"corpus-{n}"), n, seed=1, size=args.size, workers=os.cpu_count() or 1)
            sampler = Sampler()
            rate, done = end_to_end(tiny, manifest, work / f"run-{n}", args.size, 64, sampler)
            print(f"{done:7d} {rate:8.1f} {sampler.peak_rss / 2**30:13.2f} {sampler.peak_pss / 2**30:13.2f}")
            shutil.rmtree(work / f"corpus-{n}", ignore_errors=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
