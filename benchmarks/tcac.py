"""TCAC throughput: images x transforms per second of the job end to end against the probe alone, side by side.

For each model and each transform count T, in one run on the same generated corpus:

* model only: the encoder in this process with every core, embedding the 2N images and
  all their transformed versions, 2N x (1 + T) inputs decoded and transformed untimed,
  in the job's fixed-size forward chunks: the least any implementation has to spend;
* end to end: the TCAC job (``run_tcac``, what ``jobs/tcac.py`` runs) on a local Ray with
  every core, on the first N and on all 2N images. The ``score`` stage reads, decodes,
  transforms, scores and writes; the whole job adds the caption pool, summary and report.

Throughput is (image, transform) pairs per second, images x T / seconds. "ratio" is the
score stage's throughput on 2N images over model-only (target >= 0.7). A small run pays
fixed costs (actor start, model load) that no corpus size changes, so the benchmark also
gives the marginal throughput, N x T / (score seconds at 2N - at N): how fast the cost
grows with images x transforms, with its ratio to model-only. Models: ``tiny``
(``open_clip:tiny-clip``) and ``vit-b-32`` (``open_clip:ViT-B-32`` without a tag: random
weights, the real architecture and cost). On a shared machine, watch the load column.

    python benchmarks/tcac.py                       # both models, T = 1 and 7
    python benchmarks/tcac.py --models vit-b-32 --images 32 --transforms 1,7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np

MODELS = {"tiny": ("open_clip:tiny-clip", 64), "vit-b-32": ("open_clip:ViT-B-32", 224)}
PAPER = {
    "grayscale": {},
    "rotation": {"degrees": 30},
    "affine": {"degrees": 15, "translate": [0.1, 0.1], "scale": [0.9, 1.1], "shear": 10},
    "hflip": {"p": 1.0},
    "invert": {"p": 1.0},
    "perspective": {"distortion_scale": 0.3, "p": 1.0},
    "elastic": {"alpha": 50.0, "sigma": 5.0},
}
ONE = "rotation"  # T = 1: a transform of middling cost


def pick_transforms(t: int) -> dict[str, dict[str, Any]]:
    if t == 1:
        return {ONE: PAPER[ONE]}
    names = list(PAPER)
    if not 1 <= t <= len(names):
        raise SystemExit(f"--transforms: each count must be in 1..{len(names)}, got {t}")
    return {n: PAPER[n] for n in names[:t]}


def model_only(spec: str, manifest: str, transforms: dict[str, dict[str, Any]], size: int,
               forward_rows: int, seed: int) -> float:  # every image of the manifest
    """Seconds for the encoder alone to embed every image and all its transformed versions."""
    import pyarrow.parquet as pq
    import torch

    from clipscan.models.registry import load_encoder
    from clipscan.stages.decode import decode_image
    from clipscan.stages.tcac import forward_fixed
    from clipscan.stages.transforms import SeededTransforms

    torch.set_num_threads(os.cpu_count() or 1)
    enc = load_encoder(spec)
    root = os.path.dirname(manifest)
    table = pq.read_table(manifest)
    st = SeededTransforms(transforms, seed)
    torch.set_num_threads(os.cpu_count() or 1)
    stacks = []
    for image_id, rel in zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True):
        with open(os.path.join(root, rel), "rb") as f:
            pixels, _ = decode_image(f.read(), size, 10**9)
        stacks.append(np.concatenate([pixels[None], st(pixels, image_id)]))
    x = np.concatenate(stacks)
    pad = np.zeros(x.shape[1:], np.uint8)
    forward_fixed(enc.embed_images, x[:forward_rows], forward_rows, pad)  # warm-up, untimed
    start = time.perf_counter()
    forward_fixed(enc.embed_images, x, forward_rows, pad)
    return time.perf_counter() - start


def end_to_end(spec: str, manifest: str, transforms: dict[str, dict[str, Any]], size: int,
               batch: int, forward_rows: int, out: str, limit: int) -> tuple[float, float]:
    """(job seconds, score-stage seconds) of the TCAC job on the first ``limit`` images."""
    from clipscan.config import TcacConfig, load_config
    from clipscan.stages.tcac import run_tcac

    cfg = load_config(TcacConfig, None, [
        f"data.path={manifest}", f"output={out}", f"models.probe={spec}", f"embed.image_size={size}",
        f"embed.batch_size={batch}", f"tcac.forward_rows={forward_rows}", f"tcac.transforms={json.dumps(transforms)}",
        "tcac.report_top=2", "report.thumb=64", f"data.limit={limit}",
    ])
    start = time.perf_counter()
    run = run_tcac(cfg, overwrite=True)
    job_s = time.perf_counter() - start
    return job_s, float(run.info["stages"]["score"]["wall_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,vit-b-32", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--images", type=int, default=0, help="N: the job runs on N and on 2N images (0: 128 tiny, 8 vit-b-32)")
    parser.add_argument("--transforms", default="1,7", help="comma list of transform counts")
    parser.add_argument("--size", type=int, default=0, help="decoded side in px (0: 64 tiny, 224 vit-b-32)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per scoring batch (embed.batch_size)")
    parser.add_argument("--forward-rows", type=int, default=64, help="encoder inputs per forward pass")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import logging

    import ray

    from clipscan.data.scenes import write_corpus

    logging.basicConfig(level=logging.WARNING)
    work = tempfile.mkdtemp(prefix="clipscan-bench-tcac-")
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, _temp_dir=os.path.join(work, "ray"))
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    print(f"{cpus} CPUs, load average {os.getloadavg()[0]:.1f} at start; pairs = images x transforms", flush=True)
    try:
        for name in args.models.split(","):
            spec, default_size = MODELS[name]
            size = args.size or default_size
            n = args.images or (128 if name == "tiny" else 8)
            manifest = write_corpus(os.path.join(work, f"corpus-{name}"), 2 * n, seed=args.seed, size=size)
            for t in (int(v) for v in args.transforms.split(",")):
                transforms = pick_transforms(t)
                model_s = model_only(spec, manifest, transforms, size, args.forward_rows, args.seed)
                out = os.path.join(work, f"run-{name}-{t}")
                _, small_s = end_to_end(spec, manifest, transforms, size, args.batch_size, args.forward_rows, out, n)
                job_s, score_s = end_to_end(spec, manifest, transforms, size, args.batch_size, args.forward_rows,
                                            out, 2 * n)
                pairs = 2 * n * t
                row = {
                    "model": name, "T": t, "images": 2 * n, "size": size,
                    "model_pairs_s": pairs / model_s, "score_pairs_s": pairs / score_s, "job_pairs_s": pairs / job_s,
                    "marginal_pairs_s": n * t / max(score_s - small_s, 1e-9),
                    "fixed_s": max(0.0, 2 * small_s - score_s), "load": os.getloadavg()[0],
                }
                row["ratio"] = row["score_pairs_s"] / row["model_pairs_s"]
                row["ratio_marginal"] = row["marginal_pairs_s"] / row["model_pairs_s"]
                rows.append(row)
                print(f"  {name} T={t}: model only {model_s:.1f} s; score stage {small_s:.1f} s on {n} images, "
                      f"{score_s:.1f} s on {2 * n}; whole job {job_s:.1f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print("\npairs/s = (image, transform) pairs per second. ratio = score stage / model-only on all images;"
          "\nmarginal = extra pairs / extra score-stage seconds from N to 2N images; fixed = the score stage's"
          " cost at zero images")
    head = (f"{'model':<9}{'T':>3}{'images':>7}{'px':>5}{'model-only':>12}{'score':>9}{'job':>8}{'ratio':>7}"
            f"{'marginal':>10}{'ratio':>7}{'fixed s':>9}{'load':>6}")
    print(head)
    for r in rows:
        print(f"{r['model']:<9}{r['T']:>3}{r['images']:>7}{r['size']:>5}{r['model_pairs_s']:>12.1f}"
              f"{r['score_pairs_s']:>9.1f}{r['job_pairs_s']:>8.1f}{r['ratio']:>7.2f}{r['marginal_pairs_s']:>10.1f}"
              f"{r['ratio_marginal']:>7.2f}{r['fixed_s']:>9.1f}{r['load']:>6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
