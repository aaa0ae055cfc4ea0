"""Embedding throughput benchmark: generated JPEGs in, a table of images/s, ratios and peak memory out.

Measured side by side in one run:
  1. the whole DAF job (``python jobs/daf.py``, Ray start and report included) against the
     paper's DAF as one plain single-process script (benchmarks/plain_daf.py: PIL, each
     model's own preprocessing, one image at a time, numpy top-10), both as fresh processes
     on the same images; the ratio script wall / job wall is the target (>= 1.1 at 600);
     the same script batched (32 images per pass) is printed beside it;
  2. model-only: the probe and reference encoders on pre-decoded uint8 batches in a fresh
     process (every thread), no I/O, no Ray; its start-up (imports, model builds, the slow
     first pass) is timed apart from the forward passes;
  3. end to end: the same encoders through the Ray pipeline (read, decode, one actor pool,
     Parquet write) on JPEGs on disk. Two ratios: 3 over 2's forward passes alone (the
     target, >= 0.9 at 360), and 3 over 2 with its start-up, which the pipeline's encoder
     actor pays too, so that what is left between them is the cost of Ray and I/O;
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

from clipscan.pipeline.cluster import start_local_ray  # noqa: E402


def model_only(models: dict[str, str], manifest: str, n: int, size: int, batch: int) -> dict[str, float]:
    """Every encoder together on pre-decoded (batch, size, size, 3) uint8 arrays, in a fresh process.

    A fresh process, like a script and like the pipeline's encoder actor, pays the imports
    (torch, open_clip, transformers), the model builds and a slow first pass; those are
    timed apart from the forward passes. Returns ``forward`` (images/s of the passes after
    a warm-up), ``startup_s`` (imports + builds + the first pass's extra time) and
    ``script`` (images/s counting the start-up: n / (start-up + forward seconds)).
    """
    import json
    import subprocess

    cmd = [sys.executable, __file__, "--child-model-only", json.dumps(
        {"models": models, "manifest": manifest, "n": n, "size": size, "batch": batch})]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"model-only run failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _model_only_child(spec: str) -> None:
    import json

    args = json.loads(spec)
    import pyarrow.parquet as pq

    from clipscan.stages.decode import decode_image  # PIL and numpy only: decoding stays untimed

    n, size, batch = args["n"], args["size"], args["batch"]
    root = Path(args["manifest"]).parent
    paths = [root / p for p in pq.read_table(args["manifest"]).column("image").to_pylist()[:n]]
    pixels = np.stack([decode_image(p.read_bytes(), size, 10**9)[0] for p in paths])
    start = time.perf_counter()
    import open_clip  # noqa: F401
    import torch
    import transformers  # noqa: F401

    torch.set_num_threads(os.cpu_count() or 1)
    imported = time.perf_counter()
    from clipscan.models.registry import load_encoder

    encoders = [load_encoder(spec) for spec in args["models"].values()]
    built = time.perf_counter()
    for enc in encoders:  # warm-up: the first pass allocates and picks kernels
        enc.embed_images(pixels[:batch])
    warm = time.perf_counter()
    for lo in range(0, n, batch):
        for enc in encoders:
            enc.embed_images(pixels[lo : lo + batch])
    forward = time.perf_counter() - warm
    extra = max(0.0, (warm - built) - forward * min(batch, n) / n)  # the first pass beyond a steady one
    startup = (imported - start) + (built - imported) + extra
    print(json.dumps({"forward": n / forward, "script": n / (startup + forward), "startup_s": startup,
                      "imports_s": imported - start, "build_s": built - imported, "first_pass_extra_s": extra}))


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
    parser.add_argument("--child-model-only", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_model_only:
        _model_only_child(args.child_model_only)
        return

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
    start_local_ray(os.cpu_count(), str(work / "ray"), log_to_driver=False)
    try:
        rows = []
        if not args.tiny_only and args.n:
            manifest = write_corpus(str(work / "corpus"), args.n, seed=0, size=args.size)
            models = {"probe": "open_clip:ViT-B-32", "reference": dinov2_small_dir(work)}
            only = model_only(models, manifest, args.n, args.size, args.batch)
            e2e, _ = end_to_end(models, manifest, work / "run", args.size, args.batch)
            rows.append(("ViT-B-32 + DINOv2-S (random weights)", args.n, only, e2e))
        print(f"\nEmbedding throughput on {os.cpu_count()} CPUs, {args.size} px, batch {args.batch}")
        print("model-only: the encoders in a fresh process on pre-decoded pixels; 'forward' counts the passes,")
        print("'with start-up' also the imports, model builds and slow first pass that any process pays")
        print(f"{'encoders':38s} {'images':>6s} {'start-up s':>10s} {'model-only img/s':>24s} {'end-to-end':>10s}"
              f" {'ratio to forward':>16s} {'ratio to with start-up':>22s}")
        print(f"{'':38s} {'':6s} {'':10s} {'forward':>11s} {'with start-up':>12s} {'img/s':>10s}")
        for name, n, only, e2e in rows:
            print(f"{name:38s} {n:6d} {only['startup_s']:10.1f} {only['forward']:11.1f} {only['script']:12.1f}"
                  f" {e2e:10.1f} {e2e / only['forward']:16.2f} {e2e / only['script']:22.2f}")
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
