"""Nearest neighbours: (n, d) float32 L2-normalised embeddings in, (n, k) cosine top-k (D, I) out.

Exact search uses FAISS to propose candidates and re-scores them as float64 dot products
rounded to float32, ranked by (-similarity, index): results are the same bits whatever the
sharding, the arrival order of Ray results, the thread count or the device, and exact ties
(duplicate images) go to the lower index. Neighbour lists exclude the query row itself.
Missing neighbours (an approximate index that found fewer than k) are I = -1, D = -inf.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from clipscan.config import KnnConfig

logger = logging.getLogger(__name__)

# Rows merged per step when combining per-shard results; bounds the driver's temporaries.
_MERGE_ROWS = 1 << 16


# ---------------------------------------------------------------------------------------
# Exact search, one process


def knn(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of every query row in the database.

    xq: (nq, d) float32 queries; xb: (nb, d) float32 database; both L2-normalised so the
    inner product is the cosine similarity. Returns D (nq, k) float32 similarities (float64
    dot products rounded to float32), best first, and I (nq, k) int64 row indices into xb;
    equal similarities are ordered, and cut at the k-th place, by index ascending. If
    k > nb the tail is I = -1, D = -inf. FAISS runs on all GPUs when it sees one, else on
    all CPU threads.
    """
    xq = _as_matrix(xq, "xq")
    xb = _as_matrix(xb, "xb")
    if xq.shape[1] != xb.shape[1]:
        raise ValueError(f"knn: xq has d={xq.shape[1]} but xb has d={xb.shape[1]}")
    if k < 1 or xb.shape[0] == 0:
        raise ValueError(f"knn: need k >= 1 and a non-empty xb, got k={k}, xb {xb.shape}")
    return _FlatSearcher(xb).search(xq, k)


def self_knn(
    x: np.ndarray, k: int, shards: int = 1, query_block: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's exact top-k neighbours in x itself, self excluded, in this process.

    x: (n, d) float32, L2-normalised, row index = image id. The database is split into
    `shards` contiguous row ranges and the queries are streamed `query_block` rows at a
    time, so memory stays near n * k plus one (query_block, k + 1) result per shard.
    Returns D (n, k) float32 cosine similarities, best first, and I (n, k) int64 global
    row indices; ties in index order. Same results as `sharded_self_knn` with the same
    `shards` and `query_block`.
    """
    x = _as_matrix(x, "x")
    n = _check_k(x, k)
    bounds = shard_bounds(n, shards)
    _check_block(query_block)
    searchers = [(lo, _FlatSearcher(x[lo:hi])) for lo, hi in bounds]
    out_sims = np.empty((n, k), dtype=np.float32)
    out_ids = np.empty((n, k), dtype=np.int64)
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        sims, ids = _empty_result(q1 - q0, k + 1)
        for lo, searcher in searchers:
            part_sims, part_ids = searcher.search(x[q0:q1], k + 1)
            _merge_into(sims, ids, part_sims, _offset(part_ids, lo))
        out_sims[q0:q1], out_ids[q0:q1] = drop_self(sims, ids, np.arange(q0, q1), k)
    return out_sims, out_ids


def search_shard(
    x: np.ndarray, lo: int, hi: int, k: int, query_block: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ALL rows of x among the database rows x[lo:hi] (self not excluded).

    x: (n, d) float32, L2-normalised. Returns D (n, k) float32 and I (n, k) int64 global
    row indices (lo added), ties in index order; I = -1, D = -inf where hi - lo < k.
    This is the unit of work of one Ray task in `sharded_self_knn`.
    """
    x = _as_matrix(x, "x")
    n = x.shape[0]
    searcher = _FlatSearcher(x[lo:hi])
    out_sims = np.empty((n, k), dtype=np.float32)
    out_ids = np.empty((n, k), dtype=np.int64)
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        sims, ids = searcher.search(x[q0:q1], k)
        out_sims[q0:q1], out_ids[q0:q1] = sims, _offset(ids, lo)
    return out_sims, out_ids


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """`shards` contiguous, non-empty [lo, hi) row ranges covering 0..n, sizes within one."""
    if not 1 <= shards <= n:
        raise ValueError(f"shards must be in 1..n={n} (each shard needs a row), got {shards}")
    offsets = [i * n // shards for i in range(shards + 1)]
    return list(zip(offsets[:-1], offsets[1:], strict=True))


def drop_self(
    sims: np.ndarray, ids: np.ndarray, rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own row from its (m, k + 1) neighbour list, giving (m, k).

    D, I: (m, k + 1), best first; rows: (m,) int64 global index of each query. Where the
    row is absent (more than k exact duplicates of it rank first, or an approximate index
    missed it), the last neighbour is dropped instead.
    """
    keep = self_mask(ids, rows)
    m = sims.shape[0]
    return sims[keep].reshape(m, k), ids[keep].reshape(m, k)


def self_mask(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(m, k + 1) bool: the entries `drop_self` keeps, so that values carried beside the
    neighbour lists (cosines under another model, names) are dropped in the same places."""
    keep = ids != np.asarray(rows, dtype=np.int64)[:, None]
    no_self = keep.all(axis=1)
    keep[no_self, -1] = False
    return keep


def merge_order(sims: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """(m, k) column positions of the top-k of each row of (m, c) candidates under the total
    order (-D, I): the candidates of several shards side by side merge to the same result
    whatever the order of the shards, as `_merge_into` does two at a time."""
    return np.lexsort((ids, -sims), axis=1)[:, :k]


# ---------------------------------------------------------------------------------------
# Exact search over Ray tasks


def sharded_self_knn(
    x: np.ndarray,
    k: int,
    shards: int | None = None,
    query_block: int = 16384,
    num_cpus_per_task: int | None = None,
    nodes: set[str] | None = None,
    device: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """`self_knn` with one Ray task per database shard; needs `ray.init()` done by the caller.

    x: (n, d) float32, L2-normalised. x goes to the object store once; the task for shard
    [lo, hi) reads it zero-copy, searches all n queries (in blocks of `query_block`)
    against x[lo:hi] and returns (n, k + 1) results with global ids. The driver merges
    results as they arrive, so it holds n * (k + 1) plus one shard result at a time.
    `shards` defaults to the cluster's GPUs, else its CPUs; tasks take one GPU each when
    the cluster has GPUs. `num_cpus_per_task` (default: cluster CPUs // shards, at least 1)
    is also the FAISS thread count of each task. The tasks are spread over the cluster's
    nodes (each holds a shard's share of the work and its results); `nodes`, if given,
    receives the ids of the nodes that ran them. Returns D (n, k) float32, I (n, k) int64,
    identical to `self_knn(x, k, shards, query_block)`. ``device="cpu"`` keeps the tasks
    off the GPUs; otherwise a task that holds a GPU its FAISS cannot see fails (``FaissBuildError``).
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("sharded_self_knn needs a running Ray: call ray.init() first")
    x = _as_matrix(x, "x")
    n = _check_k(x, k)
    _check_block(query_block)
    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    gpus = int(resources.get("GPU", 0)) if device != "cpu" else 0
    if shards is None:
        shards = min(gpus or cpus, n)
    bounds = shard_bounds(n, shards)
    if num_cpus_per_task is None:
        num_cpus_per_task = max(1, cpus // shards)
    options: dict[str, Any] = {"num_cpus": num_cpus_per_task, "scheduling_strategy": "SPREAD"}
    if gpus:
        options["num_gpus"] = 1
    logger.info(
        "sharded_self_knn: n=%d k=%d shards=%d query_block=%d task=%s",
        n,
        k,
        shards,
        query_block,
        options,
    )

    task = ray.remote(_search_shard_task).options(**options)
    x_ref = ray.put(x)
    pending = [
        task.remote(x_ref, lo, hi, k + 1, query_block, num_cpus_per_task) for lo, hi in bounds
    ]
    del x_ref  # the tasks hold their own references; let the store free x when they finish
    sims, ids = _empty_result(n, k + 1)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        part_sims, part_ids, node = ray.get(done[0])
        _merge_into(sims, ids, part_sims, part_ids)
        if nodes is not None:
            nodes.add(node)
        del done, part_sims, part_ids
    return drop_self(sims, ids, np.arange(n), k)


def _search_shard_task(
    x: np.ndarray, lo: int, hi: int, k: int, query_block: int, threads: int
) -> tuple[np.ndarray, np.ndarray, str]:
    # A reused Ray worker keeps the OpenMP pool size it started with, whatever the
    # task's OMP_NUM_THREADS says, so set it explicitly to the task's CPU allotment.
    import faiss
    import ray

    faiss.omp_set_num_threads(max(1, int(threads)))
    require_faiss_gpu(len(ray.get_gpu_ids()))
    sims, ids = search_shard(x, lo, hi, k, query_block)
    return sims, ids, str(ray.get_runtime_context().get_node_id())


# ---------------------------------------------------------------------------------------
# Approximate search


def build_index(x: np.ndarray, spec: str, nprobe: int, train_sample: int, seed: int, who: str) -> Any:
    """A trained FAISS index of factory string ``spec`` (inner product) holding x (n, d).

    Trained on ``train_sample`` rows drawn with ``seed``, or more where the IVF list count
    asks for them (FAISS's k-means wants at least ``TRAIN_PER_LIST`` points per list); a
    list count too large for the rows is clamped (``_clamp_nlist``); ``nprobe`` is set (at
    most nlist). ``who`` names the caller in the error for a string FAISS cannot build.
    """
    import faiss

    n = x.shape[0]
    n_train = min(max(train_sample, TRAIN_PER_LIST * _nlist_of(spec)), n)
    rng = np.random.default_rng(seed)
    train = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
    spec = _clamp_nlist(spec, n_train)
    try:
        idx = faiss.index_factory(x.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"{who}: FAISS cannot build index {spec!r}") from e
    ivf = _ivf_or_none(idx)
    if ivf is not None:
        ivf.cp.seed = seed
    idx.train(train)
    add_vectors(idx, x)
    if ivf is not None:
        ivf.nprobe = min(nprobe, ivf.nlist)
    return idx


class Rows(Protocol):
    """A shard's rows of one model read piece by piece: ``rows`` of them, ``chunks()`` (r, d)
    float32 arrays in row order, or all at once by calling it."""

    rows: int

    def chunks(self) -> Iterator[np.ndarray]: ...

    def __call__(self) -> np.ndarray: ...


def build_index_chunked(source: Rows, spec: str, nprobe: int, train_sample: int, seed: int, who: str,
                        batch: int = 65536) -> tuple[Any, np.ndarray | None, float]:
    """``build_index`` over rows read piece by piece: ``(index, x, max_norm)``.

    An IVF-Flat index trained on a sample (fewer rows than the shard) is filled without
    ever holding every row: its training sample is read in one pass, each row's list in a
    second (asked in the same batches of ``batch`` rows as ``add_vectors``), and the rows
    written into lists sized exactly in a third, so the process holds the lists, one piece
    and a list number per row. The same lists, entries and order as ``build_index``; ``x``
    is None. Any other index, or one trained on every row, reads the rows whole and is
    built by ``build_index`` (``x`` then holds them)."""
    import faiss

    n = source.rows
    n_train = min(max(train_sample, TRAIN_PER_LIST * _nlist_of(spec)), n)
    sized = _clamp_nlist(spec, n_train)
    first = next(iter(source.chunks()), None)
    d = 0 if first is None else first.shape[1]
    probe = None
    if n_train < n and d:
        try:
            probe = faiss.index_factory(d, sized, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError:
            probe = None  # build_index raises with the caller's name
    if probe is None or type(faiss.downcast_index(probe)) is not faiss.IndexIVFFlat:
        x = np.ascontiguousarray(source(), dtype=np.float32)
        return build_index(x, spec, nprobe, train_sample, seed, who), x, _max_norm(x)
    del first
    idx: Any = probe
    ivf: Any = faiss.downcast_index(idx)
    ivf.cp.seed = seed
    sample = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))
    idx.train(_take_rows(source, sample, d))
    lists = np.empty(n, dtype=np.int64)
    for at, block in _reblocked(source, batch):
        lists[at:at + len(block)] = ivf.quantizer.assign(block, 1).reshape(-1)
    counts = np.bincount(lists, minlength=ivf.nlist)
    invlists = ivf.invlists
    for grown in np.flatnonzero(counts):
        invlists.resize(int(grown), int(counts[grown]))
    filled = np.zeros(ivf.nlist, dtype=np.int64)
    at, norm = 0, 0.0
    for chunk in source.chunks():
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        mine = lists[at:at + len(chunk)]
        order = np.argsort(mine, kind="stable")
        for list_no, start, size in _runs(mine[order]):
            rows = order[start:start + size]
            codes = np.ascontiguousarray(chunk[rows]).view(np.uint8)
            ids = (rows + at).astype(np.int64)
            invlists.update_entries(list_no, int(filled[list_no]), size, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
            filled[list_no] += size
        norm = max(norm, _max_norm(chunk))
        at += len(chunk)
    ivf.ntotal = n
    ivf.nprobe = min(nprobe, ivf.nlist)
    return idx, None, norm


def _take_rows(source: Rows, rows: np.ndarray, d: int) -> np.ndarray:
    """(len(rows), d) float32: the rows (sorted, ascending) of ``source``, in one pass."""
    out = np.empty((len(rows), d), dtype=np.float32)
    at = done = 0
    for chunk in source.chunks():
        hi = int(np.searchsorted(rows, at + len(chunk)))
        out[done:hi] = chunk[rows[done:hi] - at]
        done, at = hi, at + len(chunk)
    return out


def _reblocked(source: Rows, batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """``source``'s rows again in blocks of ``batch`` rows (the last shorter): (first row, block)."""
    pending: list[np.ndarray] = []
    have = at = 0
    for chunk in source.chunks():
        pending.append(np.ascontiguousarray(chunk, dtype=np.float32))
        have += len(chunk)
        while have >= batch:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield at, joined[:batch]
            at += batch
            pending, have = [joined[batch:]], have - batch
    if have:
        yield at, np.concatenate(pending) if len(pending) > 1 else pending[0]


def _runs(sorted_values: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(value, start, length) of each run of equal values in a sorted array."""
    if not len(sorted_values):
        return
    edges = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(sorted_values)]])
    for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
        yield int(sorted_values[a]), a, b - a


def add_vectors(idx: Any, x: np.ndarray, batch: int = 65536) -> None:
    """``idx.add(x)``, but an IVF-Flat index's lists are filled one list at a time at their
    exact sizes: the same lists, entries and order (rows ascending in each list) that
    ``add`` gives. ``add`` appends entry by entry, and each list's buffer doubles as it
    grows: measured on 2,000,000 x 64, the lists then held 0.69 GiB for 0.49 GiB of
    vectors while they were filled, and 0.25 GiB more than the vectors afterwards."""
    import faiss

    ivf: Any = faiss.downcast_index(idx)
    invlists = ivf.invlists if type(ivf) is faiss.IndexIVFFlat else None
    if invlists is None or ivf.ntotal != 0 or not len(x):
        idx.add(x)
        return
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    # the list of each row, asked in the batches IndexIVF.add asks them in
    lists = np.concatenate([ivf.quantizer.assign(x[s:s + batch], 1).reshape(-1) for s in range(0, n, batch)])
    order = np.argsort(lists, kind="stable")
    counts = np.bincount(lists, minlength=ivf.nlist)
    at = 0
    for list_no in np.flatnonzero(counts):
        rows = order[at:at + counts[list_no]]
        codes = np.ascontiguousarray(x[rows]).view(np.uint8)
        ids = rows.astype(np.int64)
        invlists.add_entries(int(list_no), len(rows), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        at += len(rows)
    ivf.ntotal = n


def approx_self_knn(
    x: np.ndarray,
    k: int,
    index: str = "IVF4096,Flat",
    nprobe: int = 16,
    train_sample: int = 100_000,
    seed: int = 0,
    query_block: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Every row's approximate top-k neighbours in x, self excluded, with a FAISS index.

    x: (n, d) float32, L2-normalised. `index` is a FAISS factory string built with
    METRIC_INNER_PRODUCT and trained on `train_sample` rows drawn with `seed`. An
    "IVF<N>" nlist larger than (training rows // 39) is clamped to that, with a warning,
    so that small corpora train. `nprobe` applies to IVF indexes (clamped to nlist).
    Returns D (n, k) float32, I (n, k) int64, best first; I = -1, D = -inf where the
    probed lists held fewer than k other rows.
    """

    x = _as_matrix(x, "x")
    n = _check_k(x, k)
    _check_block(query_block)
    idx = build_index(x, index, nprobe, train_sample, seed, "approx_self_knn")
    out_sims = np.empty((n, k), dtype=np.float32)
    out_ids = np.empty((n, k), dtype=np.int64)
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        sims, ids = _canonical(*idx.search(x[q0:q1], k + 1))
        out_sims[q0:q1], out_ids[q0:q1] = drop_self(sims, ids, np.arange(q0, q1), k)
    return out_sims, out_ids


def recall_at_k(I_approx: np.ndarray, I_exact: np.ndarray) -> float:
    """Mean over rows of |approx ∩ exact| / k for two (n, k) int64 neighbour arrays."""
    overlap, _ = neighbour_overlap(I_approx, I_exact)
    return float(overlap.mean()) if overlap.size else 1.0


def measure_recall(
    x: np.ndarray, k: int, I_approx: np.ndarray, n_queries: int = 1000, seed: int = 0
) -> float:
    """recall@k of I_approx (n, k) int64 against exact search on `n_queries` seeded rows.

    x: (n, d) float32, L2-normalised. Only the sampled rows are searched exactly, at a
    cost of n_queries * n inner products.
    """
    x = _as_matrix(x, "x")
    n = _check_k(x, k)
    if I_approx.shape != (n, k):
        raise ValueError(f"measure_recall: I_approx has shape {I_approx.shape}, expected {(n, k)}")
    rows = np.sort(np.random.default_rng(seed).choice(n, min(n_queries, n), replace=False))
    sims, ids = knn(x[rows], x, k + 1)
    _, I_exact = drop_self(sims, ids, rows, k)
    return recall_at_k(I_approx[rows], I_exact)


# ---------------------------------------------------------------------------------------
# Comparing neighbour sets


def neighbour_overlap(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row overlap@k and Jaccard of two (n, k) int64 neighbour index arrays.

    Each row of a and b lists distinct ids; negative ids are padding and never match.
    Returns overlap (n,) float32 = |A ∩ B| / k and jaccard (n,) float32 = |A ∩ B| / |A ∪ B|
    (0 where both rows are empty).
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"neighbour_overlap: need two (n, k) arrays, got {a.shape} and {b.shape}")
    k = a.shape[1]
    # Ids are distinct within a row, so a shared id shows up as one adjacent equal pair.
    merged = np.sort(np.concatenate([a, b], axis=1), axis=1)
    same = (merged[:, 1:] == merged[:, :-1]) & (merged[:, 1:] >= 0)
    inter = same.sum(axis=1)
    union = (a >= 0).sum(axis=1) + (b >= 0).sum(axis=1) - inter
    overlap = (inter / k if k else np.zeros(len(a))).astype(np.float32)
    jaccard = np.divide(inter, union, out=np.zeros(len(a)), where=union > 0).astype(np.float32)
    return overlap, jaccard


# ---------------------------------------------------------------------------------------
# Internals


class _FlatSearcher:
    """Exact inner-product top-k over a fixed (nb, d) float32 database, reused across blocks.

    FAISS (BLAS) scores change in the last bits with the batch size, the thread count and
    the device, and FAISS resolves exact ties at the k-th place arbitrarily. So FAISS only
    proposes candidates; they are re-scored as float64 dot products rounded to float32
    (the same bits however the work is split) and ranked by (-score, index). A row is
    settled once its k-th re-scored similarity beats the worst FAISS candidate by more than
    FAISS's rounding bound; the few rows with ties or near-ties across the boundary are
    searched again with twice the candidates.
    """

    # Re-scoring gathers (rows, candidates, d) float64 values; a few MB stays in cache.
    _RESCORE_VALUES = 1 << 19
    # faiss GPU flat search returns at most this many neighbours per query.
    _GPU_MAX_K = 2048

    def __init__(self, xb: np.ndarray):
        import faiss

        self._rows = xb.shape[0]  # database rows, duplicates included
        self._groups = _DuplicateGroups.of(xb)
        if self._groups is not None:  # search one row per group of identical vectors, expand after
            xb = np.ascontiguousarray(xb[self._groups.first])
        self._xb = xb
        self._nb, self._d = xb.shape
        self._max_norm = _max_norm(xb)
        self._gpu_index = None
        if faiss.get_num_gpus() > 0:
            self._gpu_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(self._d))
            self._gpu_index.add(xb)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows of the database for each row of xq (m, d): (m, k) float32 scores and
        int64 rows, ordered by (-score, row), -1 / -inf padding where the database is short.

        Identical database vectors are searched once per group and expanded to their rows
        (the first k of each group suffice: a group's later rows lose every tie to its
        first); identical queries in a block are searched once. So a placeholder image
        copied thousands of times costs one row, not a re-search that widens until the
        whole tie group fits.
        """
        qgroups = _DuplicateGroups.of(xq)
        if qgroups is not None:
            sims, ids = self.search(np.ascontiguousarray(xq[qgroups.first]), k)
            return sims[qgroups.inverse], ids[qgroups.inverse]
        if self._groups is None:
            return self._search_unique(xq, k)
        sims, ids = self._search_unique(xq, min(k, self._nb))
        return self._groups.expand(sims, ids, k)

    def _search_unique(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = xq.shape[0]
        sims, ids = _empty_result(m, k)
        # FAISS's float32 dot products are off by at most about d * 2**-24 * |q| * |b|;
        # twice that separates a settled k-th neighbour from the unseen rows.
        eps = self._d * 2.0**-23 * _max_norm(xq) * self._max_norm
        rows = np.arange(m)
        kk = min(self._nb, k + max(2, k // 4))
        while rows.size:
            xr = np.ascontiguousarray(xq[rows])
            faiss_sims, faiss_ids = self._candidates(xr, kk)
            exact_sims, exact_ids = self._rescore(xr, faiss_ids)
            w = min(k, kk)
            if kk == self._nb:
                done = np.ones(len(rows), dtype=bool)
            else:
                done = exact_sims[:, w - 1] - faiss_sims.min(axis=1) > eps
            sims[rows[done], :w] = exact_sims[done, :w]
            ids[rows[done], :w] = exact_ids[done, :w]
            rows = rows[~done]
            kk = min(self._nb, 2 * kk)
        return sims, ids

    def _candidates(self, xq: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self._gpu_index is not None and kk <= self._GPU_MAX_K:
            return self._gpu_index.search(xq, kk)
        # faiss.knn runs the IndexFlatIP kernel without copying the database.
        return faiss.knn(xq, self._xb, kk, metric=faiss.METRIC_INNER_PRODUCT)

    def _rescore(self, xq: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m, kk = ids.shape
        sims = np.empty((m, kk), dtype=np.float32)

        def rows(r0: int, r1: int) -> None:
            cand = self._gather(np.maximum(ids[r0:r1], 0))
            # Products of float32 values are exact in float64; the sum runs along the
            # contiguous last axis in a fixed order, so the bits do not depend on m or kk.
            prod = np.multiply(cand, xq[r0:r1, None, :], dtype=np.float64)
            sims[r0:r1] = prod.sum(axis=-1)

        in_row_blocks(m, max(1, self._RESCORE_VALUES // (kk * self._d)), rows)
        return _canonical(sims, ids)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        """(..., d) float32 database vectors of ``rows`` (...) int64, all >= 0."""
        return self._xb[rows]


class ListSearcher(_FlatSearcher):
    """Exact inner-product top-k over the vectors an IVF-Flat index holds, where its
    inverted lists are the only copy kept: every list is scanned for candidates, which are
    re-scored and settled as ``_FlatSearcher`` does (float64 dots, ties by row), reading the
    rows back from the lists (the index's direct map, n int64, is made here)."""

    def __init__(self, index: Any, max_norm: float) -> None:
        import faiss

        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        self._index = index
        self._params = faiss.SearchParametersIVF()
        self._params.nprobe = ivf.nlist
        self._rows = self._nb = int(index.ntotal)
        self._d = int(index.d)
        self._groups = None
        self._max_norm = max_norm
        self._gpu_index = None

    @staticmethod
    def holds_exactly(index: Any) -> bool:
        """Whether ``index`` is an IVF-Flat index, whose lists store each vector's float32 bytes as given."""
        import faiss

        return type(faiss.downcast_index(index)) is faiss.IndexIVFFlat

    def _candidates(self, xq: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        return self._index.search(xq, kk, params=self._params)

    def _gather(self, rows: np.ndarray) -> np.ndarray:
        flat = np.ascontiguousarray(rows, dtype=np.int64).reshape(-1)
        return self._index.reconstruct_batch(flat).reshape(*rows.shape, self._d)


def in_row_blocks(m: int, step: int, fn: Callable[[int, int], None]) -> None:
    """``fn(r0, r1)`` over rows [0, m) in blocks of ``step``, on as many threads as FAISS
    uses (``omp_get_max_threads``). For the numpy work beside a search (gathers, float64
    re-scoring), which runs on one core while FAISS runs on all: numpy lets go of the GIL
    in it, and each block writes its own rows, so the result does not depend on the threads."""
    blocks = [(r0, min(m, r0 + step)) for r0 in range(0, m, step)]
    threads = min(len(blocks), faiss_threads())
    if threads <= 1:
        for r0, r1 in blocks:
            fn(r0, r1)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(fn, r0, r1) for r0, r1 in blocks]:
            done.result()


def faiss_threads() -> int:
    """The OpenMP threads FAISS uses in this thread (``omp_set_num_threads`` is per thread)."""
    import faiss

    return max(1, int(faiss.omp_get_max_threads()))


class _DuplicateGroups:
    """Rows of a (n, d) array grouped by identical bytes: ``first`` (g,) the lowest row of
    each group, ascending; ``inverse`` (n,) each row's group; the member rows of each group
    in ascending order (``members``, from ``starts``)."""

    def __init__(self, first: np.ndarray, inverse: np.ndarray, counts: np.ndarray) -> None:
        self.first, self.inverse = first, inverse
        self.members = np.argsort(inverse, kind="stable").astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @classmethod
    def of(cls, x: np.ndarray) -> _DuplicateGroups | None:
        """The groups of x's rows, or None when every row is distinct (the common case)."""
        if x.shape[0] < 2:
            return None
        x = np.ascontiguousarray(x)
        # a 64-bit hash per row first (n x 8 bytes, not a sorted copy of x); rows whose
        # hashes agree are then compared whole, and a collision falls back to the bytes
        _, first, inverse, counts = np.unique(_row_hashes(x), return_index=True, return_inverse=True,
                                              return_counts=True)
        if len(first) == x.shape[0]:
            return None
        inverse = inverse.reshape(-1)
        dup = counts[inverse] > 1
        if not np.array_equal(x[dup], x[first[inverse[dup]]]):
            keys = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).reshape(-1)
            _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
            inverse = inverse.reshape(-1)
        # number the groups by their lowest row, so group order is row order
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        return cls(first[order].astype(np.int64), rank[inverse], counts[order])

    def expand(self, sims: np.ndarray, groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per query, groups (m, c) (best first, -1 padding) with their scores -> the top-k
        member rows under (-score, row)."""
        m, c = groups.shape
        sizes = np.where(groups >= 0, np.diff(self.starts)[np.maximum(groups, 0)], 0)
        take = np.minimum(sizes, k)  # a group's later rows lose every tie to its first k
        width = max(1, int(take.sum(axis=1).max(initial=0)))
        rows = np.full((m, width), -1, dtype=np.int64)
        vals = np.full((m, width), -np.inf, dtype=np.float32)
        flat_q = np.repeat(np.arange(m), take.sum(axis=1))
        per = take.reshape(-1)
        grp = np.repeat(groups.reshape(-1), per)
        within = np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per)
        col = np.arange(per.sum()) - np.repeat(np.concatenate([[0], np.cumsum(take.sum(axis=1))[:-1]]), take.sum(axis=1))
        rows[flat_q, col] = self.members[self.starts[grp] + within]
        vals[flat_q, col] = np.repeat(sims.reshape(-1), per)
        out_s, out_i = _canonical(vals, rows)
        if out_s.shape[1] < k:
            pad = k - out_s.shape[1]
            out_s = np.pad(out_s, ((0, 0), (0, pad)), constant_values=-np.inf)
            out_i = np.pad(out_i, ((0, 0), (0, pad)), constant_values=-1)
        return out_s[:, :k], out_i[:, :k]


def _row_hashes(x: np.ndarray, values: int = 1 << 22) -> np.ndarray:
    """(n,) uint64 hash of each row's bytes (a polynomial over its 32-bit words), in blocks
    of about ``values`` words."""
    words = x.view(np.uint32).reshape(x.shape[0], -1)
    rows = max(1, values // max(1, words.shape[1]))
    powers = np.uint64(0x9E3779B97F4A7C15) ** np.arange(1, words.shape[1] + 1, dtype=np.uint64)
    out = np.empty(x.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r0 in range(0, x.shape[0], rows):
            out[r0:r0 + rows] = (words[r0:r0 + rows].astype(np.uint64) * powers).sum(axis=1)
    return out


def _canonical(sims: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Order each row by (-D, I), padding (I = -1) last, whatever order FAISS gave ties in.
    sims = np.where(ids < 0, np.float32(-np.inf), sims).astype(np.float32, copy=False)
    order = np.lexsort((ids, -sims), axis=1)
    return np.take_along_axis(sims, order, axis=1), np.take_along_axis(ids, order, axis=1)


def _merge_into(
    sims: np.ndarray, ids: np.ndarray, part_sims: np.ndarray, part_ids: np.ndarray
) -> None:
    # Top-k of the union under the total order (-D, I): unlike faiss.ResultHeap, whose
    # strict admission test lets arrival order decide exact ties at the k-th place, the
    # result does not depend on the order in which shards are merged.
    k = sims.shape[1]
    for r0 in range(0, sims.shape[0], _MERGE_ROWS):
        r1 = min(sims.shape[0], r0 + _MERGE_ROWS)
        all_sims = np.concatenate([sims[r0:r1], part_sims[r0:r1]], axis=1)
        all_ids = np.concatenate([ids[r0:r1], part_ids[r0:r1]], axis=1)
        order = merge_order(all_sims, all_ids, k)
        sims[r0:r1] = np.take_along_axis(all_sims, order, axis=1)
        ids[r0:r1] = np.take_along_axis(all_ids, order, axis=1)


def _max_norm(x: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("ij,ij->i", x, x).max())) if len(x) else 0.0


def _empty_result(m: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((m, k), -np.inf, dtype=np.float32), np.full((m, k), -1, dtype=np.int64)


def _offset(ids: np.ndarray, lo: int) -> np.ndarray:
    return np.where(ids >= 0, ids + lo, ids) if lo else ids


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{name} must be an (n, d) array, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_k(x: np.ndarray, k: int) -> int:
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in 1..n-1 (self is excluded), got k={k} for n={n} rows")
    return n


def _check_block(query_block: int) -> None:
    if query_block < 1:
        raise ValueError(f"query_block must be >= 1, got {query_block}")


# FAISS's k-means wants at least this many training points per centroid; fewer fails or degrades.
TRAIN_PER_LIST = 39


def _nlist_of(spec: str) -> int:
    """The IVF list count of a factory string (0 where it has none)."""
    m = re.search(r"IVF(\d+)", spec)
    return int(m.group(1)) if m else 0


def _clamp_nlist(spec: str, n_train: int) -> str:
    m = re.search(r"IVF(\d+)", spec)
    if m is None:
        return spec
    nlist = int(m.group(1))
    clamped = min(nlist, max(1, n_train // TRAIN_PER_LIST))
    if clamped == nlist:
        return spec
    new_spec = spec[: m.start(1)] + str(clamped) + spec[m.end(1) :]
    logger.warning(
        "index %r: %d training rows are too few for nlist=%d; using %r",
        spec,
        n_train,
        nlist,
        new_spec,
    )
    return new_spec


def _ivf_or_none(index: Any) -> Any:
    import faiss

    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


# ---------------------------------------------------------------------------------------
# Which FAISS


class FaissBuildError(RuntimeError):
    """The FAISS build cannot search where the job was asked to (a CPU-only build on a GPU node)."""


def faiss_facts() -> dict[str, Any]:
    """The FAISS this process loaded: ``{"version", "build": "gpu" | "cpu", "gpus"}`` (GPUs it sees)."""
    import faiss

    gpu_build = hasattr(faiss, "StandardGpuResources")
    return {"version": getattr(faiss, "__version__", "unknown"), "build": "gpu" if gpu_build else "cpu",
            "gpus": int(faiss.get_num_gpus()) if gpu_build else 0}


def require_faiss_gpu(gpus_held: int) -> None:
    """Raise where this process holds ``gpus_held`` GPUs but its FAISS cannot use them.

    faiss-cpu and faiss-gpu-cu12 install the same ``faiss`` module, so whichever pip wrote
    last wins; searching on the CPU of a GPU node would be silently 10-100x slower.
    """
    if gpus_held <= 0:
        return
    facts = faiss_facts()
    if facts["gpus"] == 0:
        raise FaissBuildError(
            f"this task holds {gpus_held} GPU(s) but its FAISS ({facts['build']} build {facts['version']}) "
            "sees none: install clipscan[gpu] (faiss-gpu-cu12) and remove faiss-cpu on GPU nodes, "
            "or set knn.device=cpu to search on CPUs"
        )


def self_neighbours(x: np.ndarray, cfg: KnnConfig, depth: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Top-``depth`` neighbours of every row of x (n, d) float32 L2-normalised, self excluded.

    The in-process search of TCAC's caption pool. Exact sharded search for ``knn.index:
    Flat`` (Ray tasks where the job's Ray is up, else in this process); otherwise the FAISS factory index, with
    its recall@k against exact search measured on ``knn.recall_queries`` rows. Returns
    D (n, depth) float32, I (n, depth) int64 and facts for run.json (index, wall_s; the
    number of nodes that ran search tasks; the recall).
    """
    depth = min(depth, len(x) - 1)
    start = time.perf_counter()
    if cfg.index.strip().lower() == "flat":
        import ray

        nodes: set[str] = set()
        if ray.is_initialized():
            D, I = sharded_self_knn(x, depth, shards=cfg.shards, query_block=cfg.query_block, nodes=nodes,
                                    device=cfg.device)
        else:  # the same shards as a local Ray's tasks would be, so the same bits
            D, I = self_knn(x, depth, shards=cfg.shards or os.cpu_count() or 1, query_block=cfg.query_block)
            nodes.add("")
        return D, I, {"index": "exact", "nodes": len(nodes), "wall_s": round(time.perf_counter() - start, 3)}
    D, I = approx_self_knn(x, depth, index=cfg.index, nprobe=cfg.nprobe,
                           train_sample=cfg.train_sample, seed=seed, query_block=cfg.query_block)
    k = min(cfg.k, depth)
    recall = measure_recall(x, k, I[:, :k], n_queries=min(cfg.recall_queries, len(x)), seed=seed)
    return D, I, {"index": cfg.index, "nprobe": cfg.nprobe, "recall_at_k": round(float(recall), 4),
                  "wall_s": round(time.perf_counter() - start, 3)}
