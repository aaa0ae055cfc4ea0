"""Exact all-pairs top-k benchmark: seeded (n, d) float32 unit vectors in, a timing and memory table out.

Compares, in one run: (a) `sharded_self_knn` over a local Ray with every core, (b) one
FAISS IndexFlatIP search in this process with every thread, (c) numpy brute force in row
blocks (matmul + argpartition), timed on at most --numpy-max rows and extrapolated
quadratically, (d) FAISS on GPU when FAISS sees one, and (e) the DAF search stage
(``clipscan.stages.run_search``: shard actors, query blocks, discrepancy rows
written), whose speed per model is compared with (b). Memory is the peak, sampled
every 0.2 s, over this process and all its descendants (the Ray processes included).

    python benchmarks/knn.py --n 100000 --d 512 --k 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Sampler  # noqa: E402

from clipscan.pipeline.cluster import start_local_ray  # noqa: E402

GiB = 2**30


def make_vectors(n: int, d: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    """(n, d) float32, L2-normalised: Gaussian clusters around random unit centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d), dtype=np.float32)
    x = centres[rng.integers(0, clusters, n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


@dataclass
class Row:
    label: str
    n: int
    seconds: float | None
    note: str = ""
    cpu_seconds: float | None = None
    peak_rss: int | None = None
    peak_pss: int | None = None
    idle_pss: int | None = None
    load: str = ""


def measure(label: str, n: int, fn: Callable[[], Any]) -> tuple[Row, Any]:
    """Run fn once under the memory sampler; return its row and its result."""
    load_before = os.getloadavg()[0]
    with Sampler() as s:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    load = f"{load_before:.1f}/{os.getloadavg()[0]:.1f}"
    return Row(
        label, n, seconds, "", s.cpu_seconds, s.peak_rss, s.peak_pss, s.idle_pss, load
    ), result


def faiss_flat(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(b): one IndexFlatIP search of x against itself, k + 1 to leave room for self."""
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    return index.search(x, k + 1)


def faiss_gpu(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(x.shape[1]))
    index.add(x)
    return index.search(x, k + 1)


def stage_parts(x: np.ndarray) -> str:
    """A run directory holding x as both models' embedding parts, as the embedding stage
    writes them (the search stage's input; written before (e) is timed)."""
    import pyarrow as pa

    from clipscan import fs as cfs
    from clipscan.arrays import embedding_array

    run = tempfile.mkdtemp(prefix="knn-stage-")
    step = max(1, min(len(x), 100_000))
    for i, lo in enumerate(range(0, len(x), step)):
        ids = pa.array([f"{j:09d}" for j in range(lo, min(len(x), lo + step))])
        name = f"part-{i:05d}.parquet"
        cfs.write_parquet_atomic(cfs.join(run, "corpus", name), pa.table({"id": ids}))
        for model in ("probe", "reference"):
            cfs.write_parquet_atomic(cfs.join(run, "embeddings", model, name),
                                     pa.table({"id": ids, "embedding": embedding_array(x[lo:lo + step])}))
    return run


def stage_search(run: str, k: int, shards: int | None, query_block: int) -> str:
    """(e): the DAF search stage (``clipscan.stages.run_search``) over the run's parts: shard
    actors reading them, the query blocks and their discrepancy rows written as Parquet
    parts. Both models are given x, with reference depth k, so it does the work of two (b)
    searches."""
    from clipscan import fs as cfs
    from clipscan.stages.run_search import RunSearch

    out = cfs.join(run, "_search")
    cfs.remove_tree(out)
    with RunSearch(run, where="ray", k=k, rank_depth=k, shards=shards, query_block=query_block,
                   search_actors=2) as stage:
        stage.write(out)
        facts = stage.facts
    return f"{facts['shards']} shard actor(s), {facts['nodes']} node(s)"


def numpy_brute(x: np.ndarray, k: int, block_values: int = 1 << 25) -> np.ndarray:
    """(c): (n, k) int64 neighbours (self excluded) by blocked matmul and argpartition."""
    n = x.shape[0]
    block = max(1, block_values // n)
    out = np.empty((n, k), dtype=np.int64)
    for q0 in range(0, n, block):
        q1 = min(n, q0 + block)
        sims = x[q0:q1] @ x.T
        sims[np.arange(q1 - q0), np.arange(q0, q1)] = -np.inf
        top = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        out[q0:q1] = np.take_along_axis(top, order, axis=1)
    return out


def format_table(rows: list[Row], nxn_bytes: int) -> str:
    b = next(r for r in rows if r.label.startswith("(b)"))
    header = (
        f"{'method':<38} {'n':>7} {'wall s':>7} {'CPU s':>7} {'speed/(b)':>9} "
        f"{'CPU (b)/x':>9} {'peak RSS':>9} {'peak PSS':>9} {'PSS-idle':>9} {'load':>9}  note"
    )
    lines = [header, "-" * len(header)]

    def num(v: float | None, width: int, fmt: str = ".1f") -> str:
        return f"{v:{width}{fmt}}" if v is not None else f"{'-':>{width}}"

    def ratio(num_: float | None, den: float | None) -> float | None:
        return num_ / den if num_ and den else None

    def gib(v: int | None) -> str:
        return f"{v / GiB:6.2f} GiB" if v is not None else f"{'-':>9}"

    for r in rows:
        extra = r.peak_pss - r.idle_pss if r.peak_pss is not None and r.idle_pss else None
        lines.append(
            f"{r.label:<38} {r.n:>7} {num(r.seconds, 7)} {num(r.cpu_seconds, 7)} "
            f"{num(ratio(b.seconds, r.seconds), 9, '.2f')} "
            f"{num(ratio(b.cpu_seconds, r.cpu_seconds), 9, '.2f')} "
            f"{gib(r.peak_rss)} {gib(r.peak_pss)} {gib(extra)} {r.load:>9}  {r.note}"
        )
    lines.append(f"N x N float32 similarity matrix: {nxn_bytes / GiB:.2f} GiB")
    lines.append("load = 1-minute load average before/after the measurement")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="vectors")
    parser.add_argument("--d", type=int, default=512, help="dimensions")
    parser.add_argument("--k", type=int, default=10, help="neighbours per vector, self excluded")
    parser.add_argument("--shards", type=int, default=None, help="database shards for (a)")
    parser.add_argument("--query-block", type=int, default=16384, help="queries per search")
    parser.add_argument("--stage-shards", type=int, default=None, help="shard actors for (e); default one per node")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="Ray CPUs for (a)")
    parser.add_argument(
        "--numpy-max", type=int, default=20_000, help="rows timed for (c); more are extrapolated"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="(b), (a) pairs run alternately; the fastest is kept"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import faiss
    import ray

    from clipscan.stages.index import drop_self, recall_at_k, sharded_self_knn

    x = make_vectors(args.n, args.d, args.seed)
    n, k = args.n, args.k
    shards = args.shards or args.cpus
    print(
        f"n={n} d={args.d} k={k} shards={shards} cores={os.cpu_count()} "
        f"faiss={faiss.__version__} threads={faiss.omp_get_max_threads()} ray={ray.__version__}",
        flush=True,
    )

    n_np = min(n, args.numpy_max)
    row_c, _ = measure("(c) numpy matmul + argpartition", n, lambda: numpy_brute(x[:n_np], k))
    if n_np < n:
        scale = (n / n_np) ** 2
        row_c.seconds = (row_c.seconds or 0.0) * scale
        row_c.cpu_seconds = (row_c.cpu_seconds or 0.0) * scale
        row_c.note = f"EXTRAPOLATED x{scale:.0f} from n={n_np}; memory at n={n_np}"
    print(f"(c) {row_c.seconds:.1f} s {row_c.note}", flush=True)

    run = stage_parts(x)  # the embedding stage's output: (e)'s input, not part of its time
    temp_dir = tempfile.mkdtemp(prefix="ray")
    t0 = time.perf_counter()
    start_local_ray(args.cpus, temp_dir)
    init_s = time.perf_counter() - t0
    time.sleep(2)  # let Ray's idle workers finish starting so the baseline is idle
    best_a: Row | None = None
    best_b: Row | None = None
    best_e: Row | None = None
    try:
        for _ in range(args.repeat):
            # Alternate (b) and (a) so that load from other jobs hits both alike.
            row_b, (sims_b, ids_b) = measure(
                "(b) faiss IndexFlatIP, 1 process", n, lambda: faiss_flat(x, k)
            )
            print(f"(b) {row_b.seconds:.1f} s, load {row_b.load}", flush=True)
            row_a, (_, ids_a) = measure(
                f"(a) sharded_self_knn, Ray, {shards} shards",
                n,
                lambda: sharded_self_knn(x, k, shards=shards, query_block=args.query_block),
            )
            print(f"(a) {row_a.seconds:.1f} s, load {row_a.load}", flush=True)
            row_e, note_e = measure(
                "(e) search stage, both models", n,
                lambda: stage_search(run, k, args.stage_shards, args.query_block),
            )
            row_e.note = note_e
            print(f"(e) {row_e.seconds:.1f} s, load {row_e.load}", flush=True)
            best_b = min(best_b or row_b, row_b, key=lambda r: r.seconds or 0.0)
            best_a = min(best_a or row_a, row_a, key=lambda r: r.seconds or 0.0)
            best_e = min(best_e or row_e, row_e, key=lambda r: r.seconds or 0.0)
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(run, ignore_errors=True)
    assert best_a is not None and best_b is not None and best_e is not None
    _, exact_b = drop_self(sims_b, ids_b, np.arange(n), k)
    best_a.note = (
        f"ray.init {init_s:.1f} s not counted; recall@{k} vs (b) {recall_at_k(ids_a, exact_b):.5f}"
    )
    best_b.note = f"{faiss.omp_get_max_threads()} threads"
    if args.repeat > 1:
        best_a.note += f"; best of {args.repeat}"
        best_b.note += f"; best of {args.repeat}"

    if faiss.get_num_gpus() > 0:
        row_d, _ = measure("(d) faiss GPU IndexFlatIP", n, lambda: faiss_gpu(x, k))
        row_d.note = f"{faiss.get_num_gpus()} GPU(s)"
    else:
        row_d = Row("(d) faiss GPU IndexFlatIP", n, None, "skipped: faiss sees no GPU")

    rows = [best_a, best_b, row_c, row_d, best_e]
    print()
    print(format_table(rows, n * n * 4))
    print(
        f"(a)/(b) speed: {(best_b.seconds or 0) / (best_a.seconds or 1):.2f} wall, "
        f"{(best_b.cpu_seconds or 0) / (best_a.cpu_seconds or 1):.2f} CPU (target >= 0.9); "
        f"(a) peak PSS {(best_a.peak_pss or 0) / GiB:.2f} GiB "
        f"vs N x N float32 {n * n * 4 / GiB:.2f} GiB"
    )
    # (e) searches two models: its fair one-process baseline is two (b) searches.
    print(
        f"(e)/(b) speed per model: {2 * (best_b.seconds or 0) / (best_e.seconds or 1):.2f} wall, "
        f"{2 * (best_b.cpu_seconds or 0) / (best_e.cpu_seconds or 1):.2f} CPU (target >= 0.95); "
        f"(e) {best_e.seconds:.1f} s for two models, (b) {best_b.seconds:.1f} s for one"
    )
    return rows


if __name__ == "__main__":
    main()
