"""Both models' vectors per image in; per image its neighbours under each model and its discrepancy fields out.

The database is split into contiguous shards of numbered rows, each held by one ``Shard``
(an actor, or an object in this process) with every model's vectors of its rows. Query
blocks carrying both vectors go through ``SearchBlock``; every block is searched against
every shard; a shard returns per query its best candidates under each model, and for
each candidate the cosine under both models, computed where the vectors are. The block
merges the shard results per query and computes that row's discrepancy fields
(``clipscan.stages.discrepancy.score``) on the spot; no process but a shard holds
anything that grows with the corpus. DAF runs it over the run's parts
(``clipscan.stages.run_search``); ``DatasetShards`` holds TCAC's captions.

Exact results are those of ``clipscan.stages.index.self_knn`` over the rows in their
numbering: FAISS proposes, float64 re-scoring decides, ties go by row number, the query
itself is excluded. An approximate FAISS factory string builds one index per shard (on
the shard's GPU where it holds one); its recall@k against exact search is measured on
``recall_queries`` seeded rows, searched both ways by the same shards.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipscan.columns import require
from clipscan.stages import discrepancy as dc
from clipscan.stages import index as ix

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

MODELS = ("probe", "reference")

# Discrepancy fields that need the whole corpus's cosine scales: added by the mine step.
CALIBRATED = ("gap_z", "max_gap_z")

# Hidden columns of the search rows, dropped from discrepancies.parquet: the MMVP pair
# candidates found from this row (the other image, both cosines, the direction) and the
# row's recall@k of an approximate index (null unless the row is in the recall sample).
_PAIR_COLUMNS = ("_pair_with", "_pair_probe_cos", "_pair_reference_cos", "_pair_direction")
RECALL_COLUMNS = ("_recall_probe", "_recall_reference")

SEARCH_SCHEMA = pa.schema(
    [f for f in dc.DISCREPANCY_SCHEMA if f.name not in ("rank", *CALIBRATED)]
    + [
        pa.field("_pair_with", pa.list_(pa.string())),
        pa.field("_pair_probe_cos", pa.list_(pa.float32())),
        pa.field("_pair_reference_cos", pa.list_(pa.float32())),
        pa.field("_pair_direction", pa.list_(pa.string())),
        pa.field("_recall_probe", pa.float32()),
        pa.field("_recall_reference", pa.float32()),
    ]
)

# CPUs of each query-stream actor and write task: they mostly wait on the shards, and
# the shards leave one CPU of their node for them (``plan_shards``).
STREAM_CPUS = 0.25

# Gathered candidate vectors per step when computing cosines: (rows, candidates, d) float64.
_COS_VALUES = 1 << 19

# A FAISS score this close to a carried cosine is scored again as the cosine was (float64
# dot): float32 scores of unit vectors are within about 1e-6 of it.
_NEAR = 1e-4


# ---------------------------------------------------------------------------------------
# Where the shards run


@dataclass(frozen=True)
class ShardPlan:
    """One shard actor: the node it is placed on and what it reserves there."""

    node_id: str
    num_cpus: float  # CPUs reserved for the actor
    num_gpus: int  # 1 on GPU nodes (FAISS GPU), else 0
    threads: int  # FAISS threads of the actor


def plan_shards(nodes: list[tuple[str, float, float]], shards: int | None = None) -> list[ShardPlan]:
    """Shard actors over ``nodes`` [(node id, CPUs, GPUs)], each node sized from its own resources.

    GPU nodes: one shard per GPU (one GPU each, the node's CPUs shared among them). CPU
    nodes: by default one shard per node, reserving the node's CPUs but one (left for the
    query stream and the writes) and running FAISS on all of them. ``shards`` fixes the
    count: shards go to the nodes with the most capacity per shard (GPUs if the cluster
    has any, else CPUs), and a node's CPUs are split among its shards. Nodes with no CPU
    and no GPU (a head that takes no tasks) get none.
    """
    usable = [(nid, float(c), int(g)) for nid, c, g in nodes if c >= 1 or g >= 1]
    if not usable:
        raise RuntimeError(f"search: no node has a CPU or a GPU to hold a shard (nodes: {nodes})")
    gpu_nodes = [u for u in usable if u[2] > 0]
    pool = gpu_nodes or usable
    capacity = {nid: (g if gpu_nodes else max(1.0, c - 1 if c >= 2 else c)) for nid, c, g in pool}
    if shards is None:
        counts = {nid: (g if gpu_nodes else 1) for nid, _, g in pool}
    else:
        counts = dict.fromkeys(capacity, 0)
        for _ in range(shards):
            best = max(capacity, key=lambda nid: (capacity[nid] / (counts[nid] + 1), nid))
            counts[best] += 1
    plans = []
    for nid, cpus, gpus in pool:
        m = counts[nid]
        if not m:
            continue
        budget = max(1.0, cpus - 1 if cpus >= 2 else cpus)
        per = budget / m if not gpu_nodes else max(1.0, math.floor(budget / m))
        threads = max(1, int(cpus // m))
        use_gpu = 1 if gpu_nodes and m <= gpus else 0
        plans += [ShardPlan(nid, round(per, 4), use_gpu, threads)] * m
    return plans


def cluster_nodes() -> list[tuple[str, float, float]]:
    """(node id, CPUs, GPUs) of every live node of the running Ray cluster."""
    import ray

    return [
        (n["NodeID"], float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
        for n in ray.nodes()
        if n.get("Alive")
    ]


# ---------------------------------------------------------------------------------------
# A shard


class ShardIds:
    """A shard's ids, in its row order (each once), and the row of any id asked, without a
    Python string per row: the ids stay one Arrow array (``arrow``), and a 64-bit hash per
    id, sorted with its row, finds a row that the Arrow id then confirms. A query whose hash
    another id shares is looked up exactly, so a hash collision costs time, never a wrong row."""

    _CHUNK = 1 << 16  # ids turned into Python strings at a time, for hashing

    def __init__(self, ids: pa.Array | pa.ChunkedArray | np.ndarray, lo: int = 0) -> None:
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        if not isinstance(ids, pa.Array):
            ids = pa.array(np.asarray(ids, dtype=object))
        self.arrow = ids.cast(pa.large_string())
        n = len(self.arrow)
        if n == 0:
            raise ValueError(f"search: shard at row {lo} is empty")
        if _repeats(self.arrow):
            raise ValueError(f"search: shard at row {lo} has repeated ids (the run's ids are settled before the "
                             "search: see skipped.parquet)")
        hashes = np.concatenate([dc.hash_ids(self.arrow.slice(s, self._CHUNK).to_numpy(zero_copy_only=False))
                                 for s in range(0, n, self._CHUNK)])
        self._rows = np.argsort(hashes, kind="stable")
        self._hashes = hashes[self._rows]

    def __len__(self) -> int:
        return len(self.arrow)

    def find(self, ids: np.ndarray | list[str]) -> np.ndarray:
        """(m,) int64 row of each of ``ids`` here, -1 where it is not."""
        import pyarrow.compute as pc

        q = np.asarray(ids, dtype=object).reshape(-1)
        if not len(q):
            return np.zeros(0, dtype=np.int64)
        h = dc.hash_ids(q)
        at = np.minimum(np.searchsorted(self._hashes, h), len(self._hashes) - 1)
        rows = self._rows[at].astype(np.int64)
        same_hash = self._hashes[at] == h
        same = pc.equal(self.arrow.take(pa.array(rows)), pa.array(q, type=pa.large_string()))
        hit = same_hash & same.to_numpy(zero_copy_only=False).astype(bool)
        clash = same_hash & ~hit  # another id has this hash: ask the ids themselves
        if clash.any():
            exact = pc.index_in(pa.array(q[clash], type=pa.large_string()), value_set=self.arrow)
            rows[clash] = exact.fill_null(-1).to_numpy(zero_copy_only=False)
            hit[clash] = rows[clash] >= 0
        return np.where(hit, rows, -1)


def _repeats(ids: pa.Array) -> bool:
    """Whether some id of ``ids`` appears twice."""
    import pyarrow.compute as pc

    return int(pc.count_distinct(ids).as_py()) != len(ids)


def _ascending(ids: pa.Array) -> bool:
    """Whether ``ids`` are strictly ascending (sorted, none repeated)."""
    import pyarrow.compute as pc

    n = len(ids)
    return n < 2 or bool(pc.all(pc.less(ids.slice(0, n - 1), ids.slice(1))).as_py())


class Shard:
    """Rows [lo, lo + n) of the id-sorted corpus with every model's vectors; answers query blocks.

    x: {model: (n, d) float32, L2-normalised, or a function that reads it} for each of
    ``models`` (DAF's probe and reference; TCAC's captions have one, ``text``), rows in
    ``ids`` order; a model given as a function is read when its index is built, so an
    approximate shard holds one model's vectors beside the lists, not all of them. index: "Flat" (exact) or a FAISS factory string, one index per model
    built from these rows (an IVF with no list count gets 4 * sqrt(rows) lists).

    The shard keeps one copy of each model's vectors: ``x`` is taken over, and where the
    index stores them exactly (IVF-Flat) that model's array is dropped from it once the
    index is built, the vectors then read back from the index's lists.
    """

    def __init__(
        self,
        ids: pa.Array | pa.ChunkedArray | np.ndarray,
        x: dict[str, Any],
        lo: int,
        index: str = "Flat",
        nprobe: int = 16,
        train_sample: int = 100_000,
        seed: int = 0,
        threads: int | None = None,
        models: tuple[str, ...] = MODELS,
        gpu: bool = False,
    ) -> None:
        import faiss

        self.models = tuple(models)
        missing = [m for m in self.models if m not in x]
        if missing:
            require(x, self.models, "search")
        if threads is not None:
            faiss.omp_set_num_threads(max(1, int(threads)))
        # OpenMP's thread count is per thread: ``search``, served on whatever thread the actor
        # runs it on (a Ray actor with concurrency groups runs calls on its own threads), sets it again
        self.threads = ix.faiss_threads()
        self.lo = int(lo)
        self.ids = ShardIds(ids, self.lo)
        self.x = x
        self._held: dict[tuple[str, str], tuple[np.ndarray, ...]] = {}  # lists ``search`` keeps for ``count_before``

        def load(m: str) -> np.ndarray:  # a model's vectors, read now where they come as a loader
            x[m] = np.ascontiguousarray(x[m]() if callable(x[m]) else x[m], dtype=np.float32)
            return x[m]

        self.index = index
        self.gpu: dict[str, Any] = {}
        self.approx: dict[str, Any] | None = None
        self.exact: dict[str, Any] = {}
        if index.strip().lower() == "flat":
            self.exact = {m: ix._FlatSearcher(load(m)) for m in self.models}
            return
        self.approx = {}
        for m in self.models:  # one model at a time: its vectors and its lists, not every model's vectors at once
            if hasattr(x[m], "chunks"):  # read piece by piece: an IVF-Flat is filled without the whole array
                built, xm, norm = ix.build_index_chunked(x[m], sized_index(index, x[m].rows), nprobe, train_sample,
                                                         seed, "search")
            else:
                xm = load(m)
                built, norm = _build_index(xm, index, nprobe, train_sample, seed), ix._max_norm(xm)
            self.approx[m] = built
            if ix.ListSearcher.holds_exactly(built):
                self.exact[m] = ix.ListSearcher(built, norm)
                x.pop(m, None)  # the lists are the vectors: one copy, not two
                del xm
            else:
                assert xm is not None
                x[m] = xm
                self.exact[m] = ix._FlatSearcher(xm)
        # On a GPU the approximate search runs on a clone of each index; the CPU index stays
        # for the exact re-scoring and the recall sample.
        self.gpu = to_gpu(self.approx, nprobe) if gpu else {}

    @classmethod
    def from_table(cls, table: pa.Table, lo: int, models: tuple[str, ...] = MODELS, **kwargs: Any) -> Shard:
        """A shard of ``table``'s rows: ``id`` (each once) and a vector column per model."""
        from clipscan.arrays import embedding_matrix

        require(table, ("id", *models), "search")
        x = {m: embedding_matrix(table.column(m)) for m in models}
        return cls(table.column("id"), x, lo, models=models, **kwargs)

    def node(self) -> str:
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def rows(self) -> int:
        return len(self.ids)

    def _gather(self, model: str, local: np.ndarray) -> np.ndarray:
        """(..., d) float32 vectors of this shard's ``local`` rows (...) int64, all >= 0."""
        if model in self.x:
            return self.x[model][local]
        return self.exact[model]._gather(local)

    def vectors(self, ids: np.ndarray) -> dict[str, Any]:
        """The vectors of those ``ids`` this shard holds: ``rows`` (m,) int64 global rows (-1:
        not here) and per model (m, d) float32, zeros where not here."""
        pos = self.ids.find(ids)
        found = pos >= 0
        out: dict[str, Any] = {"rows": np.where(found, pos + self.lo, -1).astype(np.int64)}
        for m in self.models:
            v = np.zeros((len(pos), self.exact[m]._d), dtype=np.float32)
            v[found] = self._gather(m, pos[found])
            out[m] = v
        return out

    def search(
        self, ids: np.ndarray, queries: dict[str, np.ndarray], depth: dict[str, int], carry: int,
        exact: bool = False, named: int | None = None, keep: tuple[str, str] | None = None,
    ) -> dict[str, Any]:
        """Each query's best ``depth[model]`` rows of this shard under each model.

        ids: (m,) str query ids; queries: {model: (m, d) float32}, for the models in
        ``depth`` and every model whose cosines are carried. Returns ``self``
        (m,) int64, the query's global row when it is in this shard, else -1, and per
        model: ``sims`` (m, depth) float32, ``ids`` (m, depth) int64 global rows (-1
        missing), ``names`` the ids of the first ``named`` columns (all by default; flat
        Arrow strings, row-major), and for the first ``carry`` columns ``cos_probe``,
        ``cos_reference`` (m, carry) float32, the candidate's cosine to the query under each
        model (float64 dot rounded to float32; NaN where missing).

        ``keep`` (a token, a model): that model's list stays here under the token and only its
        first ``carry`` columns are sent; ``count_before`` then answers rank questions about
        it, so the reply is bounded by ``carry`` whatever the depth.
        """
        pos = self.ids.find(ids)
        out: dict[str, Any] = {"self": np.where(pos >= 0, pos + self.lo, -1).astype(np.int64)}
        import faiss

        models = list(depth)
        threads = self.threads
        faiss.omp_set_num_threads(threads)
        if len(models) < 2 or threads < 2 or faiss.get_num_gpus():
            for model in models:
                out[model] = self._search_model(model, queries, depth[model], carry, exact, named)
            return self._kept(keep, out, queries, pos, carry)
        # The models are searched side by side, each on its share of the threads: two
        # independent searches keep both cores busy where one search on both waits at every
        # block for its slower thread (any other process on the node slows one of them),
        # and each model's numpy work overlaps the other's FAISS.
        from concurrent.futures import ThreadPoolExecutor

        share = max(1, threads // len(models))

        def one(model: str) -> dict[str, Any]:
            faiss.omp_set_num_threads(share)  # this thread's own setting (OpenMP's is per thread)
            return self._search_model(model, queries, depth[model], carry, exact, named)

        with ThreadPoolExecutor(len(models)) as pool:
            out.update(zip(models, pool.map(one, models), strict=True))
        return self._kept(keep, out, queries, pos, carry)

    def _kept(self, keep: tuple[str, str] | None, out: dict[str, Any], queries: dict[str, np.ndarray],
              pos: np.ndarray, carry: int) -> dict[str, Any]:
        """``search``'s reply with the list ``keep`` names kept here (its rows, cosines and
        queries) and cut to ``carry`` columns."""
        if keep is None:
            return out
        token, model = keep
        got = out[model]
        self._held[(token, model)] = (got["sims"], got["ids"], queries[model], pos)
        out[model] = {**got, "sims": got["sims"][:, :carry], "ids": got["ids"][:, :carry]}
        return out

    def count_before(self, keep: str, model: str, rows: np.ndarray, cos: np.ndarray) -> np.ndarray | None:
        """(m, k) int32: how many rows of each query's ``model`` list kept under ``keep``
        (``search``) come before global row ``rows[i, j]`` at cosine ``cos[i, j]``: a higher
        cosine, or the same and a lower row; the query itself is not counted. Summed over
        the shards and plus one, that is the row's rank in the merged list. The kept list
        is let go.

        Cosines are the float64 dot rounded to float32 that ``search`` carries; an entry whose
        FAISS score is within ``_NEAR`` of the cosine is scored that way here too, so a tie is
        decided on the same bits whichever shard holds the row. None where no list is kept
        under ``keep`` (a shard actor restarted since the search: the caller searches again)."""
        held = self._held.pop((keep, model), None)
        if held is None:
            return None
        sims, found, q, pos = held
        m, k = rows.shape
        out = np.zeros((m, k), dtype=np.int32)
        own = np.where(pos >= 0, pos + self.lo, -2)[:, None]  # the query's own row, where it is here
        usable = (found >= 0) & (found != own)
        step = max(1, _COS_VALUES // max(1, k * sims.shape[1]))
        for r0 in range(0, m, step):
            r1 = min(m, r0 + step)
            s, f, ok = sims[r0:r1, None, :], found[r0:r1, None, :], usable[r0:r1, None, :]
            t, who = cos[r0:r1, :, None], rows[r0:r1, :, None]
            before = ok & (s > t + _NEAR)
            near = ok & (np.abs(s - t) <= _NEAR)
            if near.any():  # each near (query, entry) scored once, a bounded number of vectors at a time
                qi, qe = np.nonzero(near.any(axis=1))
                key = np.full(sims[r0:r1].shape, np.nan, dtype=np.float32)
                step_pairs = max(1, _COS_VALUES // max(1, q.shape[1]))
                for c in range(0, len(qi), step_pairs):
                    ii, ee = qi[c:c + step_pairs], qe[c:c + step_pairs]
                    key[ii, ee] = dc.dot_rows(self._gather(model, found[r0 + ii, ee] - self.lo), q[r0 + ii])
                i, j, e = np.nonzero(near)
                kv, tv = key[i, e], t[i, j, 0]
                before[i, j, e] = (kv > tv) | ((kv == tv) & (f[i, 0, e] < who[i, j, 0]))
            valid = (rows[r0:r1] >= 0) & np.isfinite(cos[r0:r1])
            out[r0:r1] = np.where(valid, before.sum(axis=2), 0)
        return out

    def release(self, keep: str) -> None:
        """Let go of every list kept under ``keep`` (a block given up before ``count_before``)."""
        for key in [key for key in self._held if key[0] == keep]:
            del self._held[key]

    def _search_model(self, model: str, queries: dict[str, np.ndarray], kk: int, carry: int,
                      exact: bool, named: int | None = None) -> dict[str, Any]:
        """``search``'s answer for one model: its best ``kk`` rows per query, with the carried cosines."""
        xq = np.ascontiguousarray(queries[model], dtype=np.float32)
        if exact or self.approx is None:
            sims, local = self.exact[model].search(xq, kk)
        else:
            sims, local = ix._canonical(*self.gpu.get(model, self.approx[model]).search(xq, kk))
        c = min(kk, carry)
        return {
            "sims": sims,
            "ids": ix._offset(local, self.lo),
            # Arrow, not an object array: it crosses to the stream as buffers, not pickled strings
            "names": self.ids.arrow.take(pa.array(np.maximum(local[:, :named], 0).reshape(-1))),
            **{f"cos_{m}": self._cos(m, queries[m], local[:, :c]) for m in self.models},
        }

    def _cos(self, model: str, q: np.ndarray, local: np.ndarray) -> np.ndarray:
        m, c = local.shape
        d = self.exact[model]._d
        out = np.full((m, c), np.nan, dtype=np.float32)
        q = np.asarray(q, dtype=np.float32)

        def rows(r0: int, r1: int) -> None:
            cand = self._gather(model, np.maximum(local[r0:r1], 0)).reshape(-1, d)
            qq = np.repeat(q[r0:r1], c, axis=0)
            out[r0:r1] = dc.dot_rows(cand, qq).reshape(r1 - r0, c)

        ix.in_row_blocks(m, max(1, _COS_VALUES // max(1, c * d)), rows)
        out[local < 0] = np.nan
        return out


def to_gpu(indexes: dict[str, Any], nprobe: int) -> dict[str, Any]:
    """GPU clones (FAISS ``index_cpu_to_gpu`` on device 0, the one Ray gave this process) of
    the CPU ``indexes`` FAISS can run there; {} where its build sees no GPU. An index type
    the GPU build cannot clone stays on the CPU, with a warning."""
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return {}
    res = faiss.StandardGpuResources()
    out: dict[str, Any] = {}
    for model, idx in indexes.items():
        try:
            clone = faiss.index_cpu_to_gpu(res, 0, idx)
        except RuntimeError as e:
            log.warning("search: %s index %s stays on the CPU: %s", model, type(idx).__name__, e)
            continue
        try:
            faiss.GpuParameterSpace().set_index_parameter(clone, "nprobe", nprobe)
        except RuntimeError:
            pass  # not an IVF: nothing to probe
        out[model] = clone
    out["_resources"] = res  # the clones use it; it lives as long as they do
    return out


def _build_index(x: np.ndarray, spec: str, nprobe: int, train_sample: int, seed: int) -> Any:
    return ix.build_index(x, sized_index(spec, x.shape[0]), nprobe, train_sample, seed, "search")


def sized_index(spec: str, rows: int) -> str:
    """``spec`` with an IVF list count filled in where it has none: "IVF,Flat" over
    ``rows`` rows becomes "IVF{4 * sqrt(rows)},Flat"; other strings are unchanged."""
    nlist = max(1, int(round(4 * math.sqrt(max(rows, 1)))))
    return re.sub(r"IVF(?=[,_]|$)", f"IVF{nlist}", spec)


# ---------------------------------------------------------------------------------------
# The query stage


class SearchBlock:
    """Batch stage: ``id``, ``probe``, ``reference`` of query rows -> their ``SEARCH_SCHEMA`` rows.

    shards: ``Shard`` objects, or Ray actor handles of them; together they hold every row.
    k: neighbours compared; depth (>= k): the reference list's length for ranks.
    probe_min / reference_max: the MMVP pair thresholds. recall_rows: global rows
    (int64) whose recall@k is measured against exact search (approximate index only).
    """

    needs = ("id", *MODELS)

    def __init__(
        self, shards: list[Any], k: int, depth: int, probe_min: float = 0.95,
        reference_max: float = 0.6, recall_rows: np.ndarray | None = None,
    ) -> None:
        if not 1 <= k <= depth:
            raise ValueError(f"search: need 1 <= k <= depth, got k={k}, depth={depth}")
        self.shards, self.k, self.depth = list(shards), k, depth
        self.probe_min, self.reference_max = probe_min, reference_max
        self.recall_rows = None if recall_rows is None else np.asarray(recall_rows, dtype=np.int64)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.finish(self.submit(batch))

    def submit(self, batch: pa.Table) -> tuple[Any, ...]:
        """Send a block to the shards; ``finish`` takes their answers. A caller with several
        blocks submits the next before it finishes this one, so the shards search one block
        while this process merges and scores the other."""
        import uuid

        from clipscan.arrays import embedding_matrix

        require(batch, self.needs, "search")
        ids = np.asarray(batch.column("id").to_pylist(), dtype=object)
        queries = {m: embedding_matrix(batch.column(m)) for m in MODELS}
        k, depth = self.k, self.depth
        lists = {"probe": k + 1, "reference": depth + 1}
        keep = uuid.uuid4().hex  # the shards keep the reference lists to the depth; only k + 1 columns come back
        asked = ask_shards(self.shards, "search", ids, queries, lists, k + 1, False, k + 1, (keep, "reference"),
                           wait=False)
        return ids, queries, asked, keep, batch

    def finish(self, submitted: tuple[Any, ...], tries: int = 3) -> pa.Table:
        """The ``SEARCH_SCHEMA`` rows of a block ``submit`` sent.

        The reference rank of each probe neighbour is counted where the reference lists are:
        each shard counts the rows of its list that come before the neighbour's cosine, and
        the counts are summed (``Shard.count_before``). A shard that lost its kept lists (its
        actor restarted between the two calls) has the block searched again, ``tries`` times
        at most."""
        ids, queries, answers, keep, batch = submitted
        answers = answers() if callable(answers) else answers
        k, depth = self.k, self.depth
        rows = np.max([a["self"] for a in answers], axis=0)
        if (rows < 0).any():
            ask_shards(self.shards, "release", keep, group=COUNT_GROUP)
            missing = ids[rows < 0][:5].tolist()
            raise RuntimeError(f"search: {int((rows < 0).sum())} query ids are in no shard, e.g. {missing}")
        p = merge_answers(answers, "probe", k + 1, rows, named=k)
        r = merge_answers(answers, "reference", k + 1, rows, named=k)
        cos = np.ascontiguousarray(p["cos_reference"][:, :k])
        counts = ask_shards(self.shards, "count_before", keep, "reference", p["ids"][:, :k], cos, group=COUNT_GROUP)
        if any(c is None for c in counts):
            ask_shards(self.shards, "release", keep, group=COUNT_GROUP)
            if tries <= 1:
                raise RuntimeError("search: a shard lost the block's reference lists again and again (restarts)")
            log.warning("search: a shard restarted during a block; searching the block again")
            return self.finish(self.submit(batch), tries - 1)
        before = sum(counts)
        rank = np.where((p["ids"][:, :k] >= 0) & np.isfinite(cos) & (before < depth), before + 1, 0).astype(np.int32)

        s = dc.score(p["ids"][:, :k], p["sims"][:, :k], r["ids"][:, :k], r["sims"][:, :k],
                     p["cos_reference"][:, :k], r["cos_probe"][:, :k], ref_rank=rank)
        p_names = pa.array(p["names"][:, :k].reshape(-1), type=pa.string())
        r_names = pa.array(r["names"][:, :k].reshape(-1), type=pa.string())
        columns = dc.row_columns(pa.array(ids, type=pa.string()), p_names, r_names, s)
        columns.update(self._pairs(p, r, s))
        columns.update(self._recall(ids, queries, rows, p, r))
        return pa.Table.from_pydict(columns, schema=SEARCH_SCHEMA)

    def _ask(
        self, ids: np.ndarray, queries: dict[str, np.ndarray], lists: dict[str, int], carry: int,
        exact: bool, named: int | None = None,
    ) -> list[dict[str, Any]]:
        return ask_shards(self.shards, "search", ids, queries, lists, carry, exact, named)

    def _pairs(self, p: dict[str, np.ndarray], r: dict[str, np.ndarray], s: dc.Scores) -> dict[str, pa.Array]:
        k = self.k
        hit_p = s.valid_p & (p["cos_probe"][:, :k] >= self.probe_min) & (p["cos_reference"][:, :k] <= self.reference_max)
        hit_r = s.valid_r & (r["cos_reference"][:, :k] >= self.probe_min) & (r["cos_probe"][:, :k] <= self.reference_max)
        mask = np.concatenate([hit_p, hit_r], axis=1)
        names = np.concatenate([p["names"][:, :k], r["names"][:, :k]], axis=1)
        p_cos = np.concatenate([p["cos_probe"][:, :k], r["cos_probe"][:, :k]], axis=1)
        r_cos = np.concatenate([p["cos_reference"][:, :k], r["cos_reference"][:, :k]], axis=1)
        direction = np.repeat(np.array(["probe_close", "reference_close"], dtype=object), k)
        direction = np.broadcast_to(direction, mask.shape)
        return {
            "_pair_with": dc._lists(pa.array(names[mask], type=pa.string()), mask),
            "_pair_probe_cos": dc._float_lists(p_cos, mask),
            "_pair_reference_cos": dc._float_lists(r_cos, mask),
            "_pair_direction": dc._lists(pa.array(direction[mask], type=pa.string()), mask),
        }

    def _recall(
        self, ids: np.ndarray, queries: dict[str, np.ndarray], rows: np.ndarray,
        p: dict[str, np.ndarray], r: dict[str, np.ndarray],
    ) -> dict[str, pa.Array]:
        m, k = len(ids), self.k
        values = {c: np.full(m, np.nan, dtype=np.float32) for c in RECALL_COLUMNS}
        sel = np.zeros(m, dtype=bool) if self.recall_rows is None else np.isin(rows, self.recall_rows)
        if sel.any():
            lists = {"probe": k + 1, "reference": k + 1}
            answers = self._ask(ids[sel], {mm: q[sel] for mm, q in queries.items()}, lists, 0, exact=True, named=0)
            for model, approx, col in (("probe", p, "_recall_probe"), ("reference", r, "_recall_reference")):
                exact = merge_answers(answers, model, k + 1, rows[sel], named=0)
                overlap, _ = ix.neighbour_overlap(approx["ids"][sel, :k], exact["ids"][:, :k])
                values[col][sel] = overlap
        return {c: pa.array(v, mask=~sel) for c, v in values.items()}


# The concurrency group of a shard actor that answers rank counts (``Shard.count_before``)
# while its default group searches the next block: the query stream asks for a block's
# counts after it has sent the next block, and one group would queue them behind it.
COUNT_GROUP = "count"


def ask_shards(shards: list[Any], method: str, *args: Any, wait: bool = True, group: str | None = None) -> Any:
    """Every shard's answer to ``method(*args)``, in shard order: ``Shard`` objects are called
    here, actor handles remotely (in their concurrency ``group``, where given), with the
    arguments put in the object store once for all. ``wait=False``: actors are asked now
    and a function returns their answers when called."""
    if shards and hasattr(getattr(shards[0], method), "remote"):
        import ray

        refs = [ray.put(a) for a in args]
        calls = [getattr(s, method) for s in shards]
        if group is not None:
            calls = [c.options(concurrency_group=group) for c in calls]
        asked = [c.remote(*refs) for c in calls]
        if not wait:
            return lambda: list(ray.get(asked))
        return list(ray.get(asked))
    return [getattr(s, method)(*args) for s in shards]


def merge_answers(answers: list[dict[str, Any]], model: str, kk: int, rows: np.ndarray,
                  named: int | None = None) -> dict[str, np.ndarray]:
    """The shards' candidates of one model side by side, merged to each query's top kk - 1
    under (-D, row) with the query itself removed; carried values follow their candidate.
    ``names`` (object strings) for the first ``named`` merged columns (all by default): each
    shard must have sent names for its first ``named + 1`` columns (``Shard.search``)."""
    parts = [a[model] for a in answers]
    sims = np.concatenate([q["sims"] for q in parts], axis=1)
    ids = np.concatenate([q["ids"] for q in parts], axis=1)
    order = ix.merge_order(sims, ids, kk)
    merged = {"sims": np.take_along_axis(sims, order, axis=1), "ids": np.take_along_axis(ids, order, axis=1)}
    # each shard's names arrive flat (m * named width, row-major): merge positions, take names once
    m = sims.shape[0]
    widths = [len(q["names"]) // max(m, 1) if m else 0 for q in parts]
    bases = np.cumsum([0] + [m * w for w in widths])[:-1]
    positions = []
    for base, q, w in zip(bases, parts, widths, strict=True):
        cols = np.arange(q["sims"].shape[1], dtype=np.int64)
        at = base + np.arange(m, dtype=np.int64)[:, None] * w + cols[None, :]
        positions.append(np.where(cols[None, :] < w, at, -1))
    merged["_positions"] = np.take_along_axis(np.concatenate(positions, axis=1), order, axis=1)
    for col in (c for c in parts[0] if c.startswith("cos_")):  # every model's cosines of the candidates
        width = parts[0]["sims"].shape[1]
        padded = [np.pad(q[col], ((0, 0), (0, width - q[col].shape[1])), constant_values=np.nan) for q in parts]
        merged[col] = np.take_along_axis(np.concatenate(padded, axis=1), order, axis=1)
    keep = ix.self_mask(merged["ids"], rows)
    w = merged["ids"].shape[1]
    out = {c: v[keep].reshape(m, w - 1) for c, v in merged.items()}
    n = w - 1 if named is None else min(named, w - 1)
    at = out.pop("_positions")[:, :n]
    if (at < 0).any():
        raise RuntimeError(f"search: a merged {model} candidate in the first {n} columns came without its name")
    taken = pa.concat_arrays([q["names"] for q in parts]).take(pa.array(at.reshape(-1)))
    out["names"] = taken.to_numpy(zero_copy_only=False).reshape(m, n)
    return out


# ---------------------------------------------------------------------------------------
# Ray wiring


@dataclass
class DatasetShards:
    """Vectors given as a Ray Dataset (TCAC's distinct captions) in; shard actors holding
    them, in id order, out (``actors``), for callers that ask the shards themselves.

    Use as a context manager: the shard actors live until it closes. ``facts`` says how
    they were built (for run.json); ``corpus`` is the input, materialised in the object
    store, in id order where the rows were sorted: always with ``id_order``, else only
    where there are several shards (a single shard sorts its own rows by id, the same bits
    without a shuffle).
    """

    vectors: ray.data.Dataset
    k: int = 10
    index: str = "Flat"
    nprobe: int = 16
    shards: int | None = None
    train_sample: int = 100_000
    seed: int = 0
    device: str = "auto"  # "cpu": shards reserve no GPU
    models: tuple[str, ...] = MODELS  # the vector columns each shard holds and searches
    shard_cpus: float | None = None  # CPUs each shard reserves and FAISS threads (>= 1) it uses (None: from its node)
    id_order: bool = False  # ``corpus`` in id order even with one shard
    facts: dict[str, Any] = field(default_factory=dict)
    corpus: Any = None
    _actors: list[Any] = field(default_factory=list)

    def __enter__(self) -> DatasetShards:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> DatasetShards:
        """Materialise the vectors (sorted by id where there are several shards, or with
        ``id_order``) and start the shard actors (waits until they hold their rows)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = cluster_nodes()
        if self.device == "cpu":  # knn.device=cpu: FAISS on the CPUs even where the nodes have GPUs
            nodes = [(nid, cpus, 0.0) for nid, cpus, _ in nodes]
        # one shard sorts its own rows; several need contiguous id ranges, from a distributed sort
        by_id = self.id_order or len(plan_shards(nodes, self.shards)) > 1
        self.corpus = (self.vectors.sort("id") if by_id else self.vectors).materialize()
        n = self.corpus.count()
        if n < 2:
            raise ValueError(f"search: {n} rows have every model's vectors; a search needs at least 2")
        plans = plan_shards(nodes, None if self.shards is None else min(self.shards, n))  # never more than n
        bounds = ix.shard_bounds(n, len(plans))
        # split the materialised blocks in their sorted order (no re-execution, which could reorder them)
        corpus = self.corpus
        parts = corpus.split_at_indices([hi for _, hi in bounds[:-1]]) if len(bounds) > 1 else [corpus]
        actor = ray.remote(_ShardActor)
        for plan, (lo, _), part in zip(plans, bounds, parts, strict=True):
            # a shard that reserves fewer CPUs than its node has searches with that many threads (at least one)
            threads = plan.threads if self.shard_cpus is None else max(1, math.ceil(self.shard_cpus))
            options: dict[str, Any] = {
                "num_cpus": plan.num_cpus if self.shard_cpus is None else self.shard_cpus,
                "num_gpus": plan.num_gpus,
                "scheduling_strategy": NodeAffinitySchedulingStrategy(plan.node_id, soft=True),
                "max_restarts": 2,
                "max_task_retries": 3,
            }
            self._actors.append(actor.options(**options).remote(
                part.to_arrow_refs(), lo, self.index, self.nprobe, self.train_sample, self.seed, threads,
                models=self.models))
        nodes = ray.get([a.node.remote() for a in self._actors])
        approximate = self.index.strip().lower() != "flat"
        self.facts = {
            "images": n, "k": min(self.k, n - 1), "shards": len(plans), "nodes": len(set(nodes)),
            "index": self.index if approximate else "exact", "shard_rows": [hi - lo for lo, hi in bounds][:8],
        }
        if approximate:
            self.facts.update(nprobe=self.nprobe)
        log.info("search: %s", self.facts)
        return self

    @property
    def actors(self) -> list[Any]:
        """The shard actors (Ray handles of ``Shard``), while they are open."""
        return list(self._actors)

    def close(self) -> None:
        """Stop the shard actors."""
        import ray

        for a in self._actors:
            ray.kill(a)
        self._actors.clear()


def reference_lists(shards: list[Any], found: pa.Table, k: int, depth: int, query_block: int,
                    ) -> dict[str, list[str]]:
    """id -> that image's reference list to the mining depth (ids, best first, itself
    excluded), for the rows ``found`` (``id`` and both models' vectors): the same lists the
    search merged, asked again of the ``shards`` for these rows only (the attribute
    contrast's rank-matched control)."""
    from clipscan.arrays import embedding_matrix

    block = SearchBlock(shards, k, depth)
    out: dict[str, list[str]] = {}
    for start in range(0, found.num_rows, query_block):
        part = found.slice(start, query_block)
        names = np.asarray(part.column("id").to_pylist(), dtype=object)
        queries = {m: embedding_matrix(part.column(m)) for m in MODELS}
        answers = block._ask(names, queries, {"probe": 2, "reference": depth + 1}, 0, exact=False)
        rows = np.max([a["self"] for a in answers], axis=0)
        r = merge_answers(answers, "reference", depth + 1, rows)
        for name, row_ids, row_names in zip(names, r["ids"], r["names"], strict=True):
            out[str(name)] = [str(v) for v in row_names[row_ids >= 0]]
    return out


class _ShardActor(Shard):
    """A ``Shard`` built inside its actor from the object-store blocks of its rows, in any
    order: rows not in id order are put in id order here (each row copied once, to its place)."""

    def __init__(self, blocks: list[Any], lo: int, index: str, nprobe: int, train_sample: int, seed: int,
                 threads: int | None, models: tuple[str, ...] = MODELS) -> None:
        import pyarrow.compute as pc
        import ray

        from clipscan.arrays import embedding_matrix

        ix.require_faiss_gpu(len(ray.get_gpu_ids()))
        tables = [pa.table(b) if not isinstance(b, pa.Table) else b for b in ray.get(blocks)]
        blocks.clear()
        ids = pa.concat_arrays([c.cast(pa.large_string()) for t in tables for c in t.column("id").chunks])
        n = len(ids)
        place = None  # each input row's row in id order, where the input is not in it
        if not _ascending(ids):
            order = pc.sort_indices(ids)
            ids = ids.take(order)
            place = np.empty(n, dtype=np.int64)
            place[order.to_numpy()] = np.arange(n)
            del order
        # each model's rows copied once into one array, block by block (no list of parts to concatenate)
        x = {}
        for m in models:
            x[m] = np.empty((n, tables[0].schema.field(m).type.list_size), dtype=np.float32)
            at = 0
            for t in tables:
                rows = slice(at, at + t.num_rows) if place is None else place[at:at + t.num_rows]
                x[m][rows] = embedding_matrix(t.column(m))
                at += t.num_rows
        del tables, place  # the object store's copy and the row order are let go before the indexes are built
        super().__init__(ids, x, lo, index, nprobe, train_sample, seed, threads, models,
                         gpu=len(ray.get_gpu_ids()) > 0)
