"""The run's embedding parts in; one ``SEARCH_SCHEMA`` part per query block out, written once and reused by a rerun.

Rows are numbered in the run's part order (``corpus/part-*.parquet`` by name, each part's
rows in order): the input order, the same for any shard count, so ties in the search (by
that number) and every result are the same bits for 1, 2 or 3 shards and for the search
in this process. Each shard holds a contiguous row range, read by the shard itself from
the run's files: the vectors go from the embedding parts to the shards once, never
through the driver or the object store. Query blocks are each part cut into at most
``query_block`` rows, written as ``part-PPPPP-BBBBB.parquet``; a rerun after a kill keeps
the blocks it finds when the plan that wrote them (``_plan.json``) is the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs
from clipscan.pipeline.parts import Layout, RunParts
from clipscan.stages import index as ix
from clipscan.stages.search import (
    COUNT_GROUP,
    MODELS,
    STREAM_CPUS,
    SearchBlock,
    Shard,
    ask_shards,
    cluster_nodes,
    plan_shards,
    reference_lists,
)

log = logging.getLogger(__name__)


def read_part(run_dir: str, name: str, models: tuple[str, ...] = MODELS) -> pa.Table:
    """``id`` and each model's vectors of one part of the run (``corpus`` and
    ``embeddings/<model>`` hold the same ids in the same order; checked)."""
    parts = RunParts(run_dir)
    corpus = cfs.read_parquet(parts.corpus(name), columns=["id"])
    table = pa.table({"id": corpus.column("id")})
    for model in models:
        emb = cfs.read_parquet(parts.embeddings(model, name))
        if not emb.column("id").equals(corpus.column("id")):
            raise RuntimeError(f"search: embeddings/{model}/{name} and corpus/{name} list different ids")
        table = table.append_column(model, emb.column("embedding"))
    return table


class PartShard(Shard):
    """A ``Shard`` of global rows [lo, hi), read from the run's parts where it is built (a Ray
    actor or this process): each model's rows when its index is built, part by part into one
    array, so an approximate shard holds one model's vectors beside the lists built so far."""

    def __init__(self, layout: Layout, lo: int, hi: int, index: str, nprobe: int, train_sample: int, seed: int,
                 threads: int | None, models: tuple[str, ...] = MODELS, gpu: bool | None = None) -> None:

        if gpu is None:  # in a Ray actor: the GPUs Ray gave it
            import ray

            held = len(ray.get_gpu_ids()) if ray.is_initialized() else 0
            ix.require_faiss_gpu(held)
            gpu = held > 0
        pieces = []  # (part name, first row in it, rows) of [lo, hi)
        offsets = layout.offsets()
        for p, name in enumerate(layout.names):
            a, b = max(lo, int(offsets[p])), min(hi, int(offsets[p + 1]))
            if a < b:
                pieces.append((name, a - int(offsets[p]), b - a))
        parts = RunParts(layout.run_dir)
        ids = pa.concat_arrays([cfs.read_parquet(parts.corpus(name), columns=["id"]).column("id").slice(at, n)
                                .combine_chunks().cast(pa.large_string()) for name, at, n in pieces])

        super().__init__(ids, {m: PartRows(layout.run_dir, pieces, m, ids) for m in models}, lo, index, nprobe,
                         train_sample, seed, threads, models, gpu=gpu)


class PartRows:
    """One model's vectors of a shard's rows, read from the run's parts piece by piece
    (``chunks``) or into one array (called); ``ix.Rows``."""

    def __init__(self, run_dir: str, pieces: list[tuple[str, int, int]], model: str, ids: pa.Array) -> None:
        self.run_dir, self.pieces, self.model, self.ids = run_dir, pieces, model, ids
        self.rows = sum(n for _, _, n in pieces)

    def chunks(self) -> Iterator[np.ndarray]:
        from clipscan.arrays import embedding_matrix

        done = 0
        for name, at, n in self.pieces:
            part = read_part(self.run_dir, name, (self.model,)).slice(at, n)
            if not part.column("id").combine_chunks().cast(pa.large_string()).equals(self.ids.slice(done, n)):
                raise RuntimeError(f"search: {name} changed while the shard read it")
            yield embedding_matrix(part.column(self.model))
            done += n

    def __call__(self) -> np.ndarray:
        out: np.ndarray | None = None
        done = 0
        for matrix in self.chunks():  # one part at a time, into one array
            if out is None:
                out = np.empty((self.rows, matrix.shape[1]), dtype=np.float32)
            out[done:done + len(matrix)] = matrix
            done += len(matrix)
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def block_name(part: int, block: int) -> str:
    return f"part-{part:05d}-{block:05d}.parquet"


IDS_KEY = b"clipscan.ids"  # a block file's schema metadata: the digest of the query ids it answers


def ids_digest(ids: pa.Array | pa.ChunkedArray) -> bytes:
    """A digest of a block's query ids, in order (a 64-bit hash per id, then SHA-256)."""
    from clipscan.stages.discrepancy import hash_ids

    return hashlib.sha256(hash_ids(ids.to_numpy(zero_copy_only=False)).tobytes()).hexdigest().encode()


class SearchParts:
    """Batch stage: ``part`` (indices into the layout) in; each part's query blocks searched
    and written to ``out_dir``; ``written``, ``reused`` out.

    A block already there is kept when it answers the same query ids in the same order
    (a digest in its schema metadata, checked against the part read now): a rerun whose
    parts were rewritten (another input, another join order) computes them again."""

    def __init__(self, shards: list[Any], layout: Layout, out_dir: str, k: int, depth: int, query_block: int,
                 probe_min: float = 0.95, reference_max: float = 0.6, recall_rows: np.ndarray | None = None) -> None:
        self.layout, self.out_dir, self.query_block = layout, out_dir, query_block
        self.block = SearchBlock(shards, k, depth, probe_min, reference_max, recall_rows)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        written = reused = 0
        qb = self.query_block
        for p in np.asarray(batch["part"]).tolist():
            name = self.layout.names[p]
            ids = cfs.read_parquet(RunParts(self.layout.run_dir).corpus(name), columns=["id"]).column("id")
            blocks = -(-len(ids) // qb)
            todo = [b for b in range(blocks) if _kept(cfs.join(self.out_dir, block_name(p, b))) !=
                    ids_digest(ids.slice(b * qb, qb))]
            reused += blocks - len(todo)
            if not todo:
                continue
            table = read_part(self.layout.run_dir, name)
            pending: tuple[int, Any] | None = None
            for b in [*todo, None]:  # each block sent before the one before it is merged and written
                sent = None if b is None else (b, self.block.submit(table.slice(b * qb, qb)))
                if pending is not None:
                    done, submitted = pending
                    out = self.block.finish(submitted)
                    out = out.replace_schema_metadata({IDS_KEY: ids_digest(out.column("id"))})
                    cfs.write_parquet_atomic(cfs.join(self.out_dir, block_name(p, done)), out)
                    written += 1
                pending = sent
        return {"written": np.array([written]), "reused": np.array([reused])}


def _kept(path: str) -> bytes | None:
    """The ids digest of a block file written earlier (None where there is none)."""
    import pyarrow.parquet as pq

    if not cfs.exists(path):
        return None
    fsys, inner = cfs.resolve(path)
    with fsys.open_input_file(inner) as f:
        meta = pq.read_schema(f).metadata or {}
    return meta.get(IDS_KEY)


@dataclass
class RunSearch:
    """The search stage over the run's parts: shards in this process (``where="local"``, one
    shard) or Ray actors placed per node (``where="ray"``, ``plan_shards``); the query
    blocks run by the same ``SearchParts`` here or in a Ray Data actor pool.

    Use as a context manager: the shards live until it closes (the attribute contrast asks
    them for the reference lists of its cases). ``facts`` says how it ran (for run.json).
    """

    run_dir: str
    where: str = "local"  # "local" or "ray"
    k: int = 10
    rank_depth: int = 100
    index: str = "Flat"
    nprobe: int = 16
    shards: int | None = None
    query_block: int = 16384
    train_sample: int = 100_000
    recall_queries: int = 1000
    probe_min: float = 0.95
    reference_max: float = 0.6
    search_actors: int = 2
    seed: int = 0
    device: str = "auto"  # "cpu": FAISS on CPUs even where the nodes have GPUs
    facts: dict[str, Any] = field(default_factory=dict)
    k_used: int = 0
    depth: int = 0
    recall_rows: np.ndarray | None = None
    layout: Layout | None = None
    shard_nodes: list[str] = field(default_factory=list)  # the node of each shard, once started
    _shards: list[Any] = field(default_factory=list)

    def __enter__(self) -> RunSearch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> RunSearch:
        """Read the layout and build the shards (waits until they hold their rows)."""
        layout = self.layout = Layout.of(self.run_dir)
        n = layout.total
        if n < 2:
            raise ValueError(f"search: {n} rows have every model's vectors; a search needs at least 2")
        self.k_used = min(self.k, n - 1)
        self.depth = min(max(self.k_used, self.rank_depth), n - 1)
        common = (self.index, self.nprobe, self.train_sample, self.seed)
        if self.where == "local":
            plans: list[Any] = [None]
            self._shards = [PartShard(layout, 0, n, *common, None, gpu=self.device != "cpu")]
            nodes = ["driver"]
        else:
            import ray
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            cluster = cluster_nodes()
            if self.device == "cpu":
                cluster = [(nid, cpus, 0.0) for nid, cpus, _ in cluster]
            plans = plan_shards(cluster, None if self.shards is None else min(self.shards, n))
            actor = ray.remote(concurrency_groups={COUNT_GROUP: 1})(PartShard)  # type: ignore[call-overload]
            for plan, (lo, hi) in zip(plans, ix.shard_bounds(n, len(plans)), strict=True):
                self._shards.append(actor.options(
                    num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, max_restarts=2, max_task_retries=3,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(plan.node_id, soft=True),
                ).remote(layout, lo, hi, *common, plan.threads))
            nodes = ray.get([a.node.remote() for a in self._shards])
        self.shard_nodes = list(nodes)
        approximate = self.index.strip().lower() != "flat"
        sample = np.sort(np.random.default_rng(self.seed).choice(n, min(self.recall_queries, n), replace=False))
        self.recall_rows = sample if approximate else None
        bounds = ix.shard_bounds(n, len(plans))
        self.facts = {"images": n, "k": self.k_used, "depth": self.depth, "shards": len(plans),
                      "nodes": len(set(nodes)), "where": self.where, "index": self.index if approximate else "exact",
                      "shard_rows": [hi - lo for lo, hi in bounds][:8], "parts": len(layout.names)}
        if approximate:
            self.facts.update(nprobe=self.nprobe, recall_queries=len(sample))
        log.info("search: %s", self.facts)
        return self

    def plan(self) -> dict[str, Any]:
        """What decides the blocks' bits: a rerun keeps the blocks only where this is the same."""
        assert self.layout is not None, "start() first"
        return {"parts": hashlib.sha256(json.dumps([self.layout.names, self.layout.rows]).encode()).hexdigest(),
                "k": self.k_used, "depth": self.depth, "index": self.index, "nprobe": self.nprobe,
                "shards": self.facts["shards"], "query_block": self.query_block, "train_sample": self.train_sample,
                "recall_queries": self.recall_queries, "seed": self.seed, "probe_min": self.probe_min,
                "reference_max": self.reference_max, "device": self.device}

    def write(self, path: str) -> None:
        """Every query block's ``SEARCH_SCHEMA`` rows under ``path``, keeping the blocks an
        earlier run of the same plan wrote there (``facts``: ``blocks``, ``blocks_reused``)."""
        assert self.layout is not None, "start() first"
        plan_path = cfs.join(path, "_plan.json")
        plan = self.plan()
        if not (cfs.exists(plan_path) and json.loads(cfs.read_bytes(plan_path)) == plan):
            cfs.remove_tree(path)
            cfs.write_json_atomic(plan_path, plan)
        stage_kwargs = {"shards": self._shards, "layout": self.layout, "out_dir": path, "k": self.k_used,
                        "depth": self.depth, "query_block": self.query_block, "probe_min": self.probe_min,
                        "reference_max": self.reference_max, "recall_rows": self.recall_rows}
        parts = np.arange(len(self.layout.names))
        written = reused = 0
        if self.where == "local":
            stage = SearchParts(**stage_kwargs)  # type: ignore[arg-type]
            for p in parts:
                got = stage({"part": np.array([p])})
                written += int(got["written"][0])
                reused += int(got["reused"][0])
        else:
            import ray.data

            ds = ray.data.from_items([{"part": int(p)} for p in parts], override_num_blocks=len(parts))
            done = ds.map_batches(SearchParts, fn_constructor_kwargs=stage_kwargs, batch_size=1, batch_format="numpy",
                                  compute=ray.data.ActorPoolStrategy(size=max(1, min(self.search_actors, len(parts)))),
                                  num_cpus=STREAM_CPUS)
            for batch in done.iter_batches(batch_format="numpy", batch_size=None):
                written += int(np.sum(batch["written"]))
                reused += int(np.sum(batch["reused"]))
        self.facts.update(blocks=written + reused, blocks_reused=reused)

    def reference_lists(self, ids: list[str]) -> dict[str, list[str]]:
        """id -> that image's reference list to the mining depth (``search.reference_lists``),
        the vectors asked of the shards that hold them."""
        if not ids:
            return {}
        asked = np.asarray(sorted(set(ids)), dtype=object)
        answers = ask_shards(self._shards, "vectors", asked)
        rows = np.max([a["rows"] for a in answers], axis=0)
        found = rows >= 0
        columns: dict[str, Any] = {"id": pa.array(asked[found].tolist(), pa.string())}
        from clipscan.arrays import embedding_array

        for m in MODELS:
            v = np.sum([a[m] for a in answers], axis=0)  # zeros where a shard does not hold the row
            columns[m] = embedding_array(v[found])
        return reference_lists(self._shards, pa.table(columns), self.k_used, self.depth, self.query_block)

    def close(self) -> None:
        """Stop the shard actors (or drop the shard of this process)."""
        if self.where != "local":
            import ray

            for a in self._shards:
                ray.kill(a)
        self._shards.clear()
