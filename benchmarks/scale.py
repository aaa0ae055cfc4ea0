"""DAF at growing corpus sizes: generated scenes in, wall time per stage and growth factors out.

Runs the real DAF job (``clipscan.daf.run_daf``, tiny random-initialised models, nothing
downloaded) on generated scene corpora of each size, one after another on one local Ray,
and prints side by side: the job's wall and CPU time, each stage's wall time from
``run.json``, and between consecutive sizes each stage's growth factor

    growth = (time ratio) / (size ratio)

1.0 is linear in the number of images. A stage whose growth is above --flag (default 1.5)
costs more per image as the corpus grows and is flagged; exact neighbour search is
expected there (it compares all pairs: n^2 work), every other stage should stay near 1
or below (fixed start-up costs make small runs look slow per image).

    python benchmarks/scale.py                              # 2,000 / 20,000 / 100,000 images
    python benchmarks/scale.py --sizes 2000,20000 --image-size 64

With --precomputed, no image is made: synthetic clustered embeddings (probe d=64 fp16,
reference d=48 fp32, every 1,000th id missing from the reference) are written in
clip-retrieval's layout (img_emb/img_emb_N.npy + metadata/metadata_N.parquet, one chunk
in memory at a time), and the DAF job runs with both models ``emb:`` and an approximate
index. Each size runs in its own process, so the figures are that size's alone: the
driver's peak RSS (VmHWM of the driver process alone, /proc/self/status) and the largest
Ray worker's, side by side. --stop-after vectors measures the read+join stage only.

    python benchmarks/scale.py --precomputed                 # 200,000 / 2,000,000 rows
    python benchmarks/scale.py --precomputed --sizes 20000,200000 --stop-after vectors

With --tcac-outputs, TCAC's output stages alone: synthetic scoring rows (three transforms,
top 10 captions per row, as the scoring stage's sink writes them, one piece per input
shard) are collected into ``tcac.parquet`` parts and summed into the figures the summary,
the attribute contrast, the LLM cases and the report read, each size in its own process;
the same two peaks are printed.

    python benchmarks/scale.py --tcac-outputs                # 20,000 / 200,000 images
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import Sampler, StagePeaks, vm_status  # noqa: E402

from clipscan.pipeline.cluster import start_local_ray  # noqa: E402

STAGES = ("read", "embed", "index", "mine", "summarise", "report")
EXPECTED_SUPERLINEAR = {"index": "exact search compares all pairs (n^2)"}


def corpus(work: Path, n: int, size: int, workers: int) -> tuple[str, float]:
    """The generated scene corpus of n images (made once, reused); returns its manifest and the seconds spent."""
    from clipscan.data.scenes import write_corpus

    root = work / f"corpus-{n}-{size}"
    manifest = root / "manifest.parquet"
    if manifest.exists():
        return str(manifest), 0.0
    start = time.perf_counter()
    write_corpus(str(root), n, seed=0, size=size, workers=workers)
    return str(manifest), time.perf_counter() - start


def run_one(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from clipscan.config import DafConfig, load_config
    from clipscan.daf import run_daf

    manifest, gen_s = corpus(work, n, args.image_size, args.gen_workers)
    out = work / f"run-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(DafConfig, str(ROOT / "configs" / "daf-tiny.yaml"), [
        f"data.path={manifest}", f"output={out}", "data.generate=null", f"embed.image_size={args.image_size}",
        *args.override,
    ])
    load = os.getloadavg()[0]
    with Sampler() as sampler:
        start = time.perf_counter()
        run_daf(cfg)
        wall = time.perf_counter() - start
    info = json.loads((out / "run.json").read_text())
    return {
        "n": n, "wall_s": wall, "cpu_s": sampler.cpu_seconds, "peak_pss_gib": sampler.peak_pss / 2**30,
        "generate_s": gen_s, "load": load, "embedded": info["counts"].get("embedded"),
        "stages": {s: info["stages"].get(s, {}).get("wall_s") for s in STAGES},
    }


PROBE_D, REFERENCE_D = 64, 48


def write_clip_retrieval(root: Path, n: int, d: int, dtype: str, seed: int, rows_per_file: int,
                         drop_every: int = 0, clusters: int = 1000) -> str:
    """n clustered rows in clip-retrieval's layout, one file pair per ``rows_per_file`` rows.

    Row i belongs to cluster ``i % clusters``; both models see the same clusters through
    different random projections, so their neighbours mostly but not always agree. With
    drop_every, rows whose index is a multiple of it are left out (ids one model lacks).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = root / "_SUCCESS"
    if done.exists():
        return str(root)
    shutil.rmtree(root, ignore_errors=True)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    base = np.random.default_rng(12345).normal(size=(clusters, 32))
    projection = np.random.default_rng(seed).normal(size=(32, d)) / np.sqrt(32)
    centres = base @ projection
    for part, start in enumerate(range(0, n, rows_per_file)):
        rows = np.arange(start, min(n, start + rows_per_file))
        if drop_every:
            rows = rows[rows % drop_every != 0]
        rng = np.random.default_rng([seed, part])
        x = centres[rows % clusters] + 0.35 * rng.normal(size=(len(rows), d))
        np.save(root / "img_emb" / f"img_emb_{part}.npy", x.astype(dtype))
        pq.write_table(pa.table({
            "image_path": [f"images/{i:09d}.jpg" for i in rows],
            "caption": [f"an image of cluster {i % clusters}, number {i}" for i in rows],
            "url": [f"https://example.com/{i:09d}.jpg" for i in rows],
        }), root / "metadata" / f"metadata_{part}.parquet")
    done.touch()
    return str(root)


class WorkerPeaks:
    """Polls every descendant process's VmHWM (monotonic, so polling misses little) and its
    private memory (RssAnon, the largest value polled: the object store's shared pages that
    VmHWM also counts are not in it); keeps the largest Ray worker's of each."""

    def __init__(self, interval_s: float = 0.5) -> None:
        import threading

        self.interval_s = interval_s
        self.peaks: dict[int, tuple[int, str]] = {}
        self.private: dict[int, tuple[int, str]] = {}
        self.roles: dict[int, str] = {}  # the last name each worker showed while not idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                name = " ".join(proc.cmdline()[:3])[:80]
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "IDLE" not in name:
                self.roles[proc.pid] = name
            peak, private = vm_status(proc.pid), vm_status(proc.pid, "RssAnon")
            if peak > self.peaks.get(proc.pid, (0, ""))[0]:
                self.peaks[proc.pid] = (peak, name)
            if private > self.private.get(proc.pid, (0, ""))[0]:
                self.private[proc.pid] = (private, name)

    def largest_worker(self, private: bool = False, role: str = "") -> tuple[int, str]:
        """(bytes, name) of the largest Ray worker's peak, named by what it last ran; ``role``:
        only workers that ran something of that name (e.g. an actor class)."""
        peaks = self.private if private else self.peaks
        workers = [(peak, self.roles.get(pid, name)) for pid, (peak, name) in peaks.items()
                   if ("default_worker" in name or "ray::" in name) and role in self.roles.get(pid, name)]
        return max(workers or [(0, "")])

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> WorkerPeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def embeddings(work: Path, n: int, rows_per_file: int) -> tuple[str, str]:
    """Both models' synthetic embeddings of n rows (written once, reused); the reference lacks every 1,000th id."""
    probe = write_clip_retrieval(work / f"emb-{n}-{rows_per_file}-probe", n, PROBE_D, "float16", 1, rows_per_file)
    reference = write_clip_retrieval(work / f"emb-{n}-{rows_per_file}-reference", n, REFERENCE_D, "float32", 2,
                                     rows_per_file, drop_every=1000)
    return probe, reference


def precomputed_one(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One size, in this process: run DAF (or its read+join stage) on the written embeddings, measure."""
    import math
    import tempfile

    import ray

    from clipscan.config import DafConfig, load_config
    from clipscan.rundir import Run

    probe, reference = embeddings(work, n, args.rows_per_file)
    out = work / f"run-emb-{n}"
    shutil.rmtree(out, ignore_errors=True)
    nlist = args.nlist or max(16, int(4 * math.sqrt(n)))
    cfg = load_config(DafConfig, None, [
        f"models.probe=emb:{probe}", f"models.reference=emb:{reference}", f"output={out}",
        f"knn.index=IVF{nlist},Flat", f"data.rows_per_block={args.rows_per_block}", "mining.cases=20",
        "report.rows=10", *args.override,
    ])
    start_local_ray(args.cpus, tempfile.mkdtemp(prefix="clipscan-bench-"), log_to_driver=False)
    driver_before = vm_status()
    with WorkerPeaks() as peaks, StagePeaks(args.trace) as stage_peaks:
        start = time.perf_counter()
        if args.stop_after == "vectors":
            from clipscan.runner import embed_corpus

            run = Run(cfg.output, "daf", cfg)
            embed_corpus(run, cfg, {"probe": cfg.models.probe, "reference": cfg.models.reference})
        else:
            from clipscan.daf import run_daf

            run_daf(cfg)
        wall = time.perf_counter() - start
    ray.shutdown()
    info = json.loads((out / "run.json").read_text())
    worker, worker_name = peaks.largest_worker()
    private, private_name = peaks.largest_worker(private=True)
    shard_private, _ = peaks.largest_worker(private=True, role="Shard")
    # the per-stage figures reset the kernel's peak at each stage: the job's is the largest of them
    driver_hwm = max([vm_status(), driver_before, *(p["hwm"] for p in stage_peaks.peaks.values())])
    return {"n": n, "wall_s": wall, "driver_hwm": driver_hwm, "driver_hwm_before": driver_before,
            "worker_hwm": worker, "worker": worker_name, "worker_private": private, "worker_private_name": private_name,
            "shard_private": shard_private, "stage_peaks": stage_peaks.peaks,
            "embedded": info["counts"].get("embedded"),
            "skipped": info["counts"].get("skipped"),
            "stages": {s: v.get("wall_s") for s, v in info["stages"].items()}}


TCAC_TRANSFORMS = ("hflip", "rot15", "jpeg")


def tcac_pieces(root: Path, n: int, shard_rows: int, seed: int = 0) -> str:
    """Scoring rows of n images (``ROW_SCHEMA``, three transforms) as the sink writes them; written once, reused."""
    import numpy as np
    import pyarrow as pa

    from clipscan import fs as cfs
    from clipscan.stages.tcac.score import ROW_SCHEMA

    raw = root / f"tcac-rows-{n}-{shard_rows}"
    if (raw / "done").exists():
        return str(raw)
    shutil.rmtree(raw, ignore_errors=True)
    rng = np.random.default_rng(seed)
    words = np.array([f"a {c} {s} on a {b} table" for c in ("red", "blue", "green", "grey", "white")
                      for s in ("cube", "ball", "cone", "ring", "star", "disc") for b in ("wooden", "glass", "stone")])
    top, t = 10, len(TCAC_TRANSFORMS)
    for shard, first in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - first)
        rows = m * t
        image = np.repeat(np.arange(first, first + m), t)

        def lists(values: np.ndarray, typ: pa.DataType, rows: int = rows) -> pa.ListArray:
            flat = pa.array(values.reshape(-1), typ)
            flat = flat.combine_chunks() if isinstance(flat, pa.ChunkedArray) else flat
            return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * top + 1, top, dtype=np.int32)), flat)

        ids = np.char.add("img-", image.astype(str).astype(object)).astype(object)
        caption = words[image % len(words)]
        changed = rng.binomial(top, 0.2, rows).astype(np.int32)
        cols = {
            "id": pa.array(ids, pa.string()), "uri": pa.array(np.char.add("s3://corpus/", ids.astype(str)), pa.string()),
            "caption": pa.array(caption, pa.string()),
            "own_captions": pa.ListArray.from_arrays(pa.array(np.arange(rows + 1, dtype=np.int32)),
                                                     pa.array(caption, pa.string())),
            "transform": pa.array(np.tile(np.array(TCAC_TRANSFORMS, dtype=object), m), pa.string()),
            "pool_size": pa.array(rng.integers(20, 60, rows), pa.int32()),
            "top_before": lists(words[rng.integers(0, len(words), (rows, top))], pa.string()),
            "p_before": lists(rng.random((rows, top)).astype(np.float32), pa.float32()),
            "top_after": lists(words[rng.integers(0, len(words), (rows, top))], pa.string()),
            "p_after": lists(rng.random((rows, top)).astype(np.float32), pa.float32()),
            "changed": pa.array(changed), "changed_margin": pa.array(changed // 2),
            "own_rank_before": pa.array(rng.integers(1, 30, rows), pa.int32()),
            "own_rank_after": pa.array(rng.integers(1, 30, rows), pa.int32()),
            "kl": pa.array(rng.random(rows).astype(np.float32)),
            "shard": pa.array(np.full(rows, shard), pa.int32()), "row": pa.array(image - first, pa.int32()),
            "notes": pa.array([""] * rows, pa.string()), "skip_stage": pa.array([""] * rows, pa.string()),
            "skip_reason": pa.array([""] * rows, pa.string()),
        }
        cfs.write_parquet_atomic(str(raw / f"shard-{shard:05d}" / f"rows-000000-{m - 1:06d}.parquet"),
                                 pa.table(cols, schema=ROW_SCHEMA))
    (raw / "done").write_text("")
    return str(raw)


def tcac_one(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One size, in this process: collect the written rows into tcac.parquet parts and the figures, measure."""
    import tempfile

    import ray

    from clipscan.stages.tcac.collect import collect
    from clipscan.stages.tcac.figures import caption_shifts

    raw = tcac_pieces(work, n, args.rows_per_block)
    out = work / f"run-tcac-{n}"
    shutil.rmtree(out, ignore_errors=True)
    start_local_ray(args.cpus, tempfile.mkdtemp(prefix="clipscan-bench-"), log_to_driver=False)
    shards = -(-n // args.rows_per_block)
    driver_before = vm_status()
    with WorkerPeaks() as peaks:
        start = time.perf_counter()
        shard_rows = {s: min(args.rows_per_block, n - s * args.rows_per_block) for s in range(shards)}
        counts, figures = collect(raw, str(out), list(TCAC_TRANSFORMS), shard_rows, top=10, keep=10_000)
        figures.summary()
        caption_shifts(figures.largest, list(TCAC_TRANSFORMS), 100)
        wall = time.perf_counter() - start
    ray.shutdown()
    worker, worker_name = peaks.largest_worker()
    private, private_name = peaks.largest_worker(private=True)
    if counts["scored"] != n:
        raise RuntimeError(f"collected {counts['scored']} of {n} images")
    return {"n": n, "wall_s": wall, "driver_hwm": vm_status(), "driver_hwm_before": driver_before,
            "worker_hwm": worker, "worker": worker_name, "worker_private": private,
            "worker_private_name": private_name, "embedded": counts["rows"], "skipped": counts["skipped"],
            "stages": {"collect+figures": wall}}


def precomputed_table(results: list[dict[str, Any]]) -> str:
    gib = 2**30
    head = f"{'':<28}" + "".join(f"{r['n']:>14,}" for r in results)
    lines = [head, "-" * len(head)]
    lines.append(f"{'driver peak RSS (VmHWM) GiB':<28}" + "".join(f"{r['driver_hwm'] / gib:>14.3f}" for r in results))
    lines.append(f"{'  of it before the job GiB':<28}"
                 + "".join(f"{r['driver_hwm_before'] / gib:>14.3f}" for r in results))
    lines.append(f"{'largest worker VmHWM GiB':<28}" + "".join(f"{r['worker_hwm'] / gib:>14.3f}" for r in results))
    lines.append(f"{'  private (RssAnon) GiB':<28}" + "".join(f"{r['worker_private'] / gib:>14.3f}" for r in results))
    if any(r.get("shard_private") for r in results):  # the search ran: its shard actors
        lines.append(f"{'shard actor private GiB':<28}" + "".join(f"{r['shard_private'] / gib:>14.3f}" for r in results))
    lines.append(f"{'rows joined':<28}" + "".join(f"{r['embedded']:>14,}" for r in results))
    lines.append(f"{'rows skipped':<28}" + "".join(f"{r['skipped']:>14,}" for r in results))
    lines.append(f"{'wall s':<28}" + "".join(f"{r['wall_s']:>14.1f}" for r in results))
    for stage in results[0]["stages"]:
        lines.append(f"{'  ' + stage + ' s':<28}"
                     + "".join(f"{(r['stages'].get(stage) or 0):>14.1f}" for r in results))
    for stage in results[0].get("stage_peaks", {}):
        for key, label in (("hwm", "driver peak in"), ("traced", "  Python heap peak in")):
            if key in results[0]["stage_peaks"][stage]:
                lines.append(f"{label + ' ' + stage + ' MiB':<28}" + "".join(
                    f"{r['stage_peaks'].get(stage, {}).get(key, 0) / 2**20:>14.1f}" for r in results))
    for r in results:
        lines.append(f"largest worker at {r['n']:,}: {r['worker'][:100]}; "
                     f"largest private: {r['worker_private_name'][:100]}")
    if len(results) > 1 and results[0]["driver_hwm"]:
        lines.append(f"driver peak ratio {results[-1]['n']:,} / {results[0]['n']:,}: "
                     f"{results[-1]['driver_hwm'] / results[0]['driver_hwm']:.2f} (target <= 1.1)")
    return "\n".join(lines)


def precomputed(sizes: list[int], args: argparse.Namespace) -> int:
    """Every size in a child process of its own (a process's VmHWM never goes down)."""
    import subprocess

    results = []
    if args.tcac_outputs:
        for n in sizes:
            print(f"TCAC outputs of {n:,} images ...", file=sys.stderr, flush=True)
            tcac_pieces(Path(args.work), n, args.rows_per_block)
            child = [sys.executable, __file__, "--tcac-outputs", "--one", str(n), "--work", args.work,
                     "--rows-per-block", str(args.rows_per_block), *(["--cpus", str(args.cpus)] if args.cpus else [])]
            proc = subprocess.run(child, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                return proc.returncode
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"TCAC outputs ({len(TCAC_TRANSFORMS)} transforms, top 10, keep 10,000 rows per transform), "
              f"{ray_cpus(args.cpus)} CPUs; 'rows joined' = tcac.parquet rows")
        print(precomputed_table(results))
        return 0
    for n in sizes:
        print(f"DAF on {n:,} precomputed rows (stop after: {args.stop_after}) ...", file=sys.stderr, flush=True)
        embeddings(Path(args.work), n, args.rows_per_file)  # here, so the measured process only runs the job
        child = [sys.executable, __file__, "--precomputed", "--one", str(n), "--work", args.work,
                 "--rows-per-file", str(args.rows_per_file), "--rows-per-block", str(args.rows_per_block),
                 "--stop-after", args.stop_after, *(["--cpus", str(args.cpus)] if args.cpus else []),
                 *(["--trace"] if args.trace else []),
                 *(["--nlist", str(args.nlist)] if args.nlist else []), *args.override]
        proc = subprocess.run(child, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-4000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"  {results[-1]['wall_s']:.1f} s", file=sys.stderr, flush=True)
    print(f"DAF with both models emb: (probe d={PROBE_D} fp16, reference d={REFERENCE_D} fp32), "
          f"{ray_cpus(args.cpus)} CPUs, stop after: {args.stop_after}")
    print(precomputed_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def _fmt(x: float | None, width: int = 9) -> str:
    return f"{x:>{width}.1f}" if x is not None else f"{'-':>{width}}"


def table(results: list[dict[str, Any]], flag: float) -> str:
    """Times per size side by side, then the growth factor of each step."""
    sizes = [r["n"] for r in results]
    head = f"{'':<14}" + "".join(f"{n:>12,}" for n in sizes)
    steps = list(zip(results, results[1:], strict=False))
    head += "".join(f"{'growth ' + _k(a['n']) + '->' + _k(b['n']):>18}" for a, b in steps)
    lines = [head, "-" * len(head)]
    flagged = []

    def row(label: str, values: list[float | None], unit: str = "s", growth: bool = True) -> None:
        cells = "".join(f"{_fmt(v, 11)}{unit}" if v is not None else f"{'-':>12}" for v in values)
        for (a, b), (va, vb) in zip(steps, zip(values, values[1:], strict=False), strict=True):
            if not growth or not va or vb is None:
                cells += f"{'':>18}"
                continue
            g = (vb / va) / (b["n"] / a["n"])
            mark = ""
            if g > flag:
                mark = " !" if label.strip() not in EXPECTED_SUPERLINEAR else " *"
                flagged.append((label.strip(), a["n"], b["n"], g))
            cells += f"{g:>16.2f}{mark:<2}"
        lines.append(f"{label:<14}{cells}")

    row("job wall", [r["wall_s"] for r in results])
    row("job CPU", [r["cpu_s"] for r in results])
    for stage in STAGES:
        row(f"  {stage}", [r["stages"][stage] for r in results])
    row("images/s", [r["n"] / r["wall_s"] for r in results], unit=" ", growth=False)
    row("peak PSS GiB", [r["peak_pss_gib"] for r in results], unit=" ", growth=False)
    row("corpus gen", [r["generate_s"] or None for r in results], growth=False)
    row("load avg", [r["load"] for r in results], unit=" ", growth=False)
    lines.append("")
    lines.append(f"growth = (time ratio) / (size ratio); 1.00 = linear. '!' marks a stage above {flag} "
                 "(cost per image rising with size), '*' one where that is expected:")
    for name, why in EXPECTED_SUPERLINEAR.items():
        lines.append(f"  {name}: {why}")
    unexpected = [f for f in flagged if f[0] not in EXPECTED_SUPERLINEAR]
    if unexpected:
        lines.append("FLAGGED: " + "; ".join(f"{s} {a:,}->{b:,}: {g:.2f}" for s, a, b, g in unexpected))
    else:
        lines.append("no stage other than the expected ones grows faster than its work")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="comma-separated corpus sizes, images "
                        "(default 2000,20000,100000; with --precomputed 200000,2000000)")
    parser.add_argument("--precomputed", action="store_true", help="synthetic emb: embeddings instead of images")
    parser.add_argument("--tcac-outputs", action="store_true", help="TCAC's collect and figures on synthetic rows")
    parser.add_argument("--stop-after", choices=("vectors", "report"), default="report",
                        help="with --precomputed: run the read+join stage only, or the whole job")
    parser.add_argument("--rows-per-file", type=int, default=100_000, help="rows per clip-retrieval file pair")
    parser.add_argument("--rows-per-block", type=int, default=20_000, help="rows per block read from the files")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists; default 4 sqrt(n)")
    parser.add_argument("--trace", action="store_true",
                        help="with --precomputed: also the driver's Python heap peak per stage (tracemalloc; slower)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=64, help="generated and decoded side, px")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-scale"), help="corpora and run directories")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1, help="processes generating scenes")
    parser.add_argument("--flag", type=float, default=1.5, help="flag a stage whose growth factor is above this")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("override", nargs="*", help="extra DAF overrides, e.g. knn.index=IVF256,Flat")
    args = parser.parse_args(argv)
    default = "200000,2000000" if args.precomputed else "20000,200000" if args.tcac_outputs else "2000,20000,100000"
    sizes = sorted(int(s.replace("_", "")) for s in (args.sizes or default).split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if (args.precomputed or args.tcac_outputs) and args.one is not None:
        import logging

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        one = tcac_one if args.tcac_outputs else precomputed_one
        print(json.dumps(one(work, args.one, args)))
        return 0
    if args.precomputed or args.tcac_outputs:
        return precomputed(sizes, args)

    import logging
    import tempfile

    import ray

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    start_local_ray(args.cpus, tempfile.mkdtemp(prefix="clipscan-bench-"), log_to_driver=False)
    results = []
    for n in sizes:
        print(f"DAF on {n:,} images ...", file=sys.stderr, flush=True)
        results.append(run_one(work, n, args))
        r = results[-1]
        print(f"  {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, stages {r['stages']}", file=sys.stderr, flush=True)
    ray.shutdown()
    print(f"DAF (tiny models, {args.image_size} px, {ray_cpus(args.cpus)} CPUs) per corpus size")
    print(table(results, args.flag))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def ray_cpus(cpus: int | None) -> int:
    return cpus or os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
