"""TCAC throughput: images x transforms per second of the scoring pipeline end to end against the probe alone, side by side.

For each model and each transform count T, in one run on the same generated corpus:

* model only: the encoder in this process with every core, embedding 2N images and all
  their transformed versions, 2N x (1 + T) inputs decoded and transformed untimed, in
  the job's fixed-size forward chunks: the least any implementation has to spend;
* end to end: the job's scoring pipeline (``build_tcac`` + ``collect``, what
  ``jobs/tcac.py`` runs after the caption pool) on a local Ray with every core, on the
  first N and on all 2N images: read, decode, transform, score, write ``tcac.parquet``.
  The caption shards are started beforehand, untimed (its cost grows with captions, not with
  transforms); ``--whole-job`` also times ``run_tcac`` from start to report.

Throughput is (image, transform) pairs per second, images x T / seconds. "ratio" is the
pipeline's throughput on 2N images over model-only (target >= 0.7). Every run pays a fixed
start-up that no corpus size changes: the scoring actor is a fresh process that imports
torch and open_clip and builds the model (about 6 s for ViT-B-32 on 2 cores). N is therefore
chosen per model and T so that the model alone needs about ``--model-seconds`` on 2N images,
as it would on any real corpus; the table gives the start-up, estimated from the two sizes
as 2 x (seconds at N) - (seconds at 2N), and the marginal throughput,
N x T / (seconds at 2N - seconds at N), which leaves it out.

Both are measured in wall seconds and in CPU seconds (this process and every Ray process
under it, sampled with psutil): wall time moves with whatever else the machine runs, CPU
time hardly does, so on a shared machine read the CPU columns. Models: ``tiny``
(``open_clip:tiny-clip``) and ``vit-b-32`` (``open_clip:ViT-B-32`` without a tag: random
weights, the real architecture and cost).

    python benchmarks/tcac.py                       # ViT-B-32, T = 1 and 7, about 5 minutes
    python benchmarks/tcac.py --models tiny,vit-b-32 --images 64 --transforms 1,7 --whole-job

The tiny model costs about 0.1 ms an image, so its ratio measures decoding and transforming
against nothing, not the pipeline; it is there to check the wiring quickly.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Sampler  # noqa: E402

from clipscan.config import TcacSection  # noqa: E402

MODELS = {"tiny": ("open_clip:tiny-clip", 64), "vit-b-32": ("open_clip:ViT-B-32", 224)}
PAPER: dict[str, dict[str, Any]] = TcacSection().transforms  # the paper's seven
ONE = "rotation"  # T = 1: a transform of middling cost


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of fn()."""
    with Sampler(memory=False) as clock:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    return wall, clock.cpu_seconds


def pick_transforms(t: int) -> dict[str, dict[str, Any]]:
    if t == 1:
        return {ONE: PAPER[ONE]}
    names = list(PAPER)
    if not 1 <= t <= len(names):
        raise SystemExit(f"--transforms: each count must be in 1..{len(names)}, got {t}")
    return {n: PAPER[n] for n in names[:t]}


def config(spec: str, manifest: str, transforms: dict[str, dict[str, Any]], size: int, batch: int,
           forward_rows: int, out: str, limit: int) -> Any:
    from clipscan.config import TcacConfig, load_config

    return load_config(TcacConfig, None, [
        f"data.path={manifest}", f"output={out}", f"models.probe={spec}", f"embed.image_size={size}",
        f"embed.batch_size={batch}", f"tcac.forward_rows={forward_rows}", f"tcac.transforms={json.dumps(transforms)}",
        f"data.limit={limit}", "tcac.report_top=2", "report.thumb=64",
    ])


def model_only(spec: str, manifest: str, images: int, transforms: dict[str, dict[str, Any]], size: int,
               forward_rows: int, seed: int) -> Callable[[], Any]:
    """A call that has the encoder alone embed the manifest's first ``images`` images and all their versions."""
    import pyarrow.parquet as pq
    import torch

    from clipscan.models.registry import load_encoder
    from clipscan.stages.decode import decode_image
    from clipscan.stages.text import forward_fixed
    from clipscan.stages.transforms import SeededTransforms

    enc = load_encoder(spec)
    root = os.path.dirname(manifest)
    table = pq.read_table(manifest).slice(0, images)  # the rows data.limit gives the pipeline
    st = SeededTransforms(transforms, seed)
    stacks = []
    for image_id, rel in zip(table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True):
        with open(os.path.join(root, rel), "rb") as f:
            pixels, _ = decode_image(f.read(), size, 10**9)
        stacks.append(np.concatenate([pixels[None], st(pixels, image_id)]))
    x = np.concatenate(stacks)
    pad = np.zeros(x.shape[1:], np.uint8)
    torch.set_num_threads(os.cpu_count() or 1)
    forward_fixed(enc.embed_images, x[:forward_rows], forward_rows, pad)  # warm-up, untimed
    return functools.partial(forward_fixed, enc.embed_images, x, forward_rows, pad)


def encoder_rate(spec: str, size: int, forward_rows: int) -> float:
    """Encoder inputs per second of the model alone, from one timed forward pass after a warm-up."""
    import torch

    from clipscan.models.registry import load_encoder

    enc = load_encoder(spec)
    torch.set_num_threads(os.cpu_count() or 1)
    x = np.zeros((forward_rows, size, size, 3), np.uint8)
    enc.embed_images(x)  # warm-up
    start = time.perf_counter()
    enc.embed_images(x)
    return forward_rows / (time.perf_counter() - start)


def caption_shards(cfg: Any) -> Any:
    """The job's caption shard actors over the corpus's distinct captions (``DatasetShards``,
    as ``jobs/tcac.py`` starts them on Ray), built beforehand, untimed; close when done."""
    import pyarrow as pa
    import ray.data

    from clipscan.arrays import embedding_array
    from clipscan.data.read import read_table
    from clipscan.models.registry import load_encoder
    from clipscan.stages.search import DatasetShards
    from clipscan.stages.tcac.pool import CAPTION_MODEL, distinct_texts
    from clipscan.stages.text import forward_fixed

    rows = read_table(cfg.data.model_copy(update={"limit": None}))[0]
    texts = sorted(distinct_texts(rows).column("text").to_pylist())
    emb = forward_fixed(load_encoder(cfg.models.probe).embed_texts, texts, cfg.tcac.forward_rows, "")
    vectors = ray.data.from_arrow(pa.table({"id": texts, "embedding": embedding_array(emb)}))
    return DatasetShards(vectors, k=cfg.tcac.pool_k, models=(CAPTION_MODEL,), shard_cpus=0.0, id_order=True).start()


def scoring(cfg: Any, pool_ref: Any) -> None:
    """The job's scoring pipeline: read, decode, transform, score, write tcac.parquet."""
    from clipscan.data.corpus import read_corpus
    from clipscan.stages.rows import ShardSink
    from clipscan.stages.tcac.collect import collect
    from clipscan.stages.tcac.score import build_tcac

    raw = os.path.join(cfg.output, "_rows")
    shutil.rmtree(cfg.output, ignore_errors=True)
    ds, info = read_corpus(cfg.data)
    built = build_tcac(ds, pool_ref, cfg.models.probe, cfg.data, cfg.embed, cfg.tcac, cfg.seed)
    built.write_datasink(ShardSink(raw))
    counts, _ = collect(raw, cfg.output, list(cfg.tcac.transforms), info["shard_rows"])
    if counts["scored"] != cfg.data.limit:
        raise RuntimeError(f"scored {counts['scored']} of {cfg.data.limit} images: {counts}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit-b-32", help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--images", type=int, default=0,
                        help="N: runs on N and on 2N images (0: sized by --model-seconds)")
    parser.add_argument("--model-seconds", type=float, default=30.0,
                        help="with --images 0: the model-only seconds the 2N images should take")
    parser.add_argument("--transforms", default="1,7", help="comma list of transform counts")
    parser.add_argument("--size", type=int, default=0, help="decoded side in px (0: 64 tiny, 224 vit-b-32)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per scoring batch (embed.batch_size)")
    parser.add_argument("--forward-rows", type=int, default=16, help="encoder inputs per forward pass (tcac.forward_rows)")
    parser.add_argument("--whole-job", action="store_true", help="also time run_tcac on 2N images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import ray

    from clipscan.data.scenes import write_corpus
    from clipscan.pipeline.cluster import start_local_ray
    from clipscan.stages.tcac.pool import ShardPool

    logging.basicConfig(level=logging.WARNING)
    work = tempfile.mkdtemp(prefix="clipscan-bench-tcac-")
    cpus = os.cpu_count() or 1
    start_local_ray(cpus, os.path.join(work, "ray"), log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    print(f"{cpus} CPUs, load average {os.getloadavg()[0]:.1f} at start; pairs = images x transforms", flush=True)
    warm = False
    try:
        for name in args.models.split(","):
            spec, default_size = MODELS[name]
            size = args.size or default_size
            counts = [int(v) for v in args.transforms.split(",")]
            # N such that the model alone needs about --model-seconds for 2N images and their T transforms
            rate = 0.0 if args.images else encoder_rate(spec, size, args.forward_rows)
            sizes = {t: args.images or max(8, math.ceil(args.model_seconds * rate / (2 * (1 + t)))) for t in counts}
            manifest = write_corpus(os.path.join(work, f"corpus-{name}"), 2 * max(sizes.values()), seed=args.seed,
                                    size=size)
            for t in counts:
                n = sizes[t]
                transforms = pick_transforms(t)
                out = os.path.join(work, f"run-{name}-{t}")
                cfgs = {m: config(spec, manifest, transforms, size, args.batch_size, args.forward_rows, out, m)
                        for m in (n, 2 * n)}
                shards = caption_shards(cfgs[n])
                pool_ref = ShardPool(shards.actors, cfgs[n].tcac.pool_k)
                if not warm:  # the first pipeline of a Ray session also starts its task workers
                    scoring(config(spec, manifest, transforms, size, args.batch_size, args.forward_rows, out,
                                   args.batch_size), pool_ref)
                    warm = True
                encode = model_only(spec, manifest, 2 * n, transforms, size, args.forward_rows, args.seed)
                # model-only before and after the pipeline runs, averaged: the machine's load drifts
                before = timed(encode)
                small_wall, small_cpu = timed(functools.partial(scoring, cfgs[n], pool_ref))
                wall, cpu = timed(functools.partial(scoring, cfgs[2 * n], pool_ref))
                after = timed(encode)
                model_wall, model_cpu = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
                shards.close()
                del pool_ref, encode
                pairs = 2 * n * t
                row: dict[str, Any] = {
                    "model": name, "T": t, "images": 2 * n, "size": size, "load": os.getloadavg()[0],
                    "model_wall": pairs / model_wall, "model_cpu": pairs / model_cpu,
                    "e2e_wall": pairs / wall, "e2e_cpu": pairs / cpu,
                    "marg_wall": n * t / (wall - small_wall) if wall > small_wall else float("nan"),
                    "marg_cpu": n * t / (cpu - small_cpu) if cpu > small_cpu else float("nan"),
                    "startup": max(2 * small_wall - wall, 0.0),
                }
                line = (f"  {name} T={t}: model only {before[0]:.1f} / {after[0]:.1f} s ({model_cpu:.1f} CPU s); pipeline "
                        f"{small_wall:.1f} s ({small_cpu:.1f} CPU s) on {n} images, {wall:.1f} s ({cpu:.1f} CPU s) on {2 * n}")
                if args.whole_job:
                    from clipscan.tcac import run_tcac

                    job_cfg = cfgs[2 * n].model_copy(update={"output": out + "-job"})
                    job_wall, _ = timed(functools.partial(run_tcac, job_cfg, overwrite=True))
                    row["job_wall"] = pairs / job_wall
                    line += f"; whole job {job_wall:.1f} s"
                rows.append(row)
                print(line, flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    print("\npairs/s = (image, transform) pairs per second, in wall seconds and in CPU seconds (all processes)."
          "\nend to end: read, decode, transform, score, write on 2N images; marginal: the extra pairs from N to 2N"
          "\nimages over the extra seconds; ratio: pipeline / model-only (target >= 0.7); start-up: the pipeline's"
          "\nfixed seconds, 2 x (seconds at N) - (seconds at 2N)")
    head = (f"{'model':<9}{'T':>3}{'images':>7}{'px':>5} | {'wall: model':>11}{'e2e':>8}{'ratio':>7}{'marginal':>9}"
            f"{'ratio':>7}{'start-up':>9} | {'CPU: model':>10}{'e2e':>8}{'ratio':>7}{'marginal':>9}{'ratio':>7} |{'load':>6}")
    print(head)
    for r in rows:
        print(f"{r['model']:<9}{r['T']:>3}{r['images']:>7}{r['size']:>5} | {r['model_wall']:>11.1f}{r['e2e_wall']:>8.1f}"
              f"{r['e2e_wall'] / r['model_wall']:>7.2f}{r['marg_wall']:>9.1f}{r['marg_wall'] / r['model_wall']:>7.2f}"
              f"{r['startup']:>8.1f}s | "
              f"{r['model_cpu']:>10.1f}{r['e2e_cpu']:>8.1f}{r['e2e_cpu'] / r['model_cpu']:>7.2f}{r['marg_cpu']:>9.1f}"
              f"{r['marg_cpu'] / r['model_cpu']:>7.2f} |{r['load']:>6.1f}")
        if "job_wall" in r:
            print(f"{'':<24} whole job (caption pool, scoring, summary, report): {r['job_wall']:.1f} pairs/s wall")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
