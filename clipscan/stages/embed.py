"""Decoded pixel batches in, one L2-normalised embedding column per model out; plus the Ray wiring.

``Embed`` is a plain callable class over a batch (``dict[str, np.ndarray]``) that holds
every encoder the job needs and runs all of them on the same decoded pixels, so each
image is decoded once and read once. ``build_embed`` says how Ray runs it: decode in
CPU tasks, encoders in one actor pool sized from the cluster. ``collect`` splits the
written rows into one Parquet dataset per model (``id``, ``embedding``), the corpus
table and ``skipped.parquet``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs
from clipscan.stages.decode import Decode, require

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import DataConfig, EmbedConfig

PASS_THROUGH = ("id", "uri", "caption", "captions", "skip_stage", "skip_reason", "notes", "shard", "row",
                "decode_node")
SKIPPED_SCHEMA = pa.schema(
    [("id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)


def embedding_array(x: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 -> a FixedSizeList<float32, d> column."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A FixedSizeList<float32, d> column -> (n, d) float32."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = arr.type.list_size
    return np.asarray(arr.flatten(), dtype=np.float32).reshape(-1, d)


class Embed:
    """Batch stage: ``pixels`` (n, S, S, 3) uint8 -> ``emb_<name>`` (n, d) float32 per model.

    Skipped rows pass through with null embeddings; the device is CUDA when the actor
    was given a GPU, with fp16 by default there and fp32 on CPU.
    """

    needs = ("id", "pixels", "skip_stage")

    def __init__(self, models: dict[str, str], precision: str = "auto", threads: int | None = None) -> None:
        import torch

        from clipscan.models.registry import load_encoder

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.encoders = {name: load_encoder(spec, device, precision) for name, spec in models.items()}
        self.node = _node_id()

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        require(batch, self.needs, "embed")
        ok = np.array([not s for s in batch["skip_stage"]], dtype=bool)
        keep = np.flatnonzero(ok)
        columns: dict[str, Any] = {k: _column(batch[k]) for k in PASS_THROUGH if k in batch}
        columns["embed_node"] = pa.array([self.node] * len(ok), pa.string())
        for name, encoder in self.encoders.items():
            emb = encoder.embed_images(batch["pixels"][keep]) if len(keep) else None
            d = emb.shape[1] if emb is not None else 1
            full = np.zeros((len(ok), d), dtype=np.float32)
            if emb is not None:
                full[keep] = emb
            values = embedding_array(full)
            columns[f"emb_{name}"] = pa.FixedSizeListArray.from_arrays(
                values.values, d, mask=pa.array(~ok)
            )
        return pa.table(columns)


def _column(values: np.ndarray) -> pa.Array:
    if values.dtype.kind in "iu":
        return pa.array(values.astype(np.int32))
    if values.dtype == object and len(values) and isinstance(values[0], (list, np.ndarray)):
        return pa.array([list(v) if v is not None else [] for v in values], type=pa.list_(pa.string()))
    return pa.array([v if isinstance(v, str) else "" for v in values], type=pa.string())


@dataclass(frozen=True)
class EmbedPlan:
    """How Ray runs the encoders: pool size and per-actor resources."""

    actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    threads: int | None


def plan_resources(cluster: dict[str, float], cfg: EmbedConfig) -> EmbedPlan:
    """Size the encoder pool from ``ray.cluster_resources()``.

    One actor per GPU where there are GPUs. On CPU-only clusters one actor that leaves
    one CPU for the decode tasks: two one-CPU actors on a two-CPU machine starve the
    read tasks and the pipeline stalls.
    """
    gpus = int(cluster.get("GPU", 0)) if cfg.gpus is None else cfg.gpus
    cpus = float(cluster.get("CPU", 1))
    if gpus > 0:
        return EmbedPlan(
            actors=cfg.actors or gpus,
            num_cpus=cfg.cpus_per_actor or 1.0,
            num_gpus=1.0,
            batch_size=max(cfg.batch_size, 256) if cfg.batch_size == 64 else cfg.batch_size,
            threads=cfg.threads,
        )
    actors = cfg.actors or 1
    per_actor = cfg.cpus_per_actor or max(0.5, min(cpus - 1.0, cpus / actors - 0.5))
    return EmbedPlan(actors=actors, num_cpus=per_actor, num_gpus=0.0, batch_size=cfg.batch_size,
                     threads=cfg.threads)


def cluster_resources() -> dict[str, float]:
    """Resources now, or, where GPU workers scale from zero, the most the autoscaler can add.

    Sizing the pool from the GPUs present at start would plan a CPU actor on a cluster
    whose GPU group is still at zero nodes, and the autoscaler would never add one.
    """
    import ray

    now = dict(ray.cluster_resources())
    if now.get("GPU"):
        return now
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler config published (local Ray, older Ray)
        most = {}
    if most.get("GPU"):
        now["GPU"] = float(most["GPU"])
    return now


def build_embed(
    ds: ray.data.Dataset, models: dict[str, str], data: DataConfig, cfg: EmbedConfig
) -> ray.data.Dataset:
    """Rows (``ROW_SCHEMA``) -> rows with ``emb_<name>`` columns. Builds; executes nothing."""
    import ray
    import ray.data

    plan = plan_resources(cluster_resources(), cfg)
    decoded = ds.map_batches(
        _decode_batch,  # type: ignore[arg-type]
        fn_kwargs={"size": cfg.image_size, "data": data},
        num_cpus=cfg.decode_cpus,
        batch_size=cfg.batch_size,
        batch_format="numpy",
    )
    return decoded.map_batches(
        Embed,
        fn_constructor_kwargs={"models": models, "precision": cfg.precision, "threads": plan.threads},
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None,
        batch_size=plan.batch_size,
        batch_format="numpy",
    )


def _decode_batch(batch: dict[str, np.ndarray], size: int, data: DataConfig) -> dict[str, np.ndarray]:
    out = Decode.for_data(size, data)(batch)
    out["decode_node"] = np.array([_node_id()] * len(out["id"]), dtype=object)
    return out


def _node_id() -> str:
    """The Ray node this runs on ("" outside Ray): recorded so run.json can say how work spread."""
    try:
        import ray

        return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""
    except Exception:
        return ""


class ShardSink:
    """Ray Data sink: rows with ``shard``/``row`` in, ``<root>/shard-NNNNN/rows-A-B.parquet`` out.

    Each write task splits its rows by input shard and writes each piece atomically, named
    by its first and last row, so a retried task rewrites the same file and a shard is
    finished once its pieces cover all its rows. Rows without a shard (-1) go to
    ``shard-unnumbered`` under a name unique to the write task.
    """

    def __new__(cls, root: str) -> Any:
        from ray.data import Datasink

        class _Sink(Datasink):  # type: ignore[misc,type-arg]
            def __init__(self, root: str) -> None:
                self.root = root

            def write(self, blocks: Any, ctx: Any) -> list[tuple[int, int]]:
                import uuid

                import pyarrow.compute as pc
                from ray.data.block import BlockAccessor

                tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
                tables = [t for t in tables if t.num_rows]
                if not tables:
                    return []
                table = pa.concat_tables(tables)
                written = []
                for shard in sorted(set(table.column("shard").to_pylist())):
                    piece = table.filter(pc.equal(table.column("shard"), shard)).sort_by("row")
                    rows = piece.column("row").to_pylist()
                    if shard < 0:
                        name = f"shard-unnumbered/task-{ctx.task_idx:06d}-{uuid.uuid4().hex[:8]}.parquet"
                    else:
                        name = f"shard-{shard:05d}/rows-{rows[0]:06d}-{rows[-1]:06d}.parquet"
                    cfs.write_parquet_atomic(cfs.join(self.root, name), piece)
                    written.append((int(shard), piece.num_rows))
                return written

            def get_name(self) -> str:
                return "ClipscanShards"

        return _Sink(root)


def shard_pieces(raw_dir: str) -> dict[str, list[str]]:
    """``{"shard-00003": [piece paths sorted by first row]}`` of what the sink wrote so far."""
    pieces: dict[str, list[str]] = {}
    for path in cfs.list_files(raw_dir, ".parquet"):
        pieces.setdefault(path.rstrip("/").split("/")[-2], []).append(path)
    return {k: sorted(v) for k, v in pieces.items()}


def rows_covered(paths: list[str]) -> set[int]:
    """Row numbers a shard's pieces cover, from their names ``rows-A-B.parquet``."""
    covered: set[int] = set()
    for path in paths:
        stem = path.rsplit("/", 1)[-1][: -len(".parquet")]
        _, first, last = stem.split("-")
        covered.update(range(int(first), int(last) + 1))
    return covered


def complete_shards(raw_dir: str, shard_rows: dict[int, int], keep: set[int] | None = None) -> set[int]:
    """Shards whose pieces under raw_dir cover all their rows: a killed run wrote them whole.

    The pieces of every other shard not in ``keep`` are removed; that shard is computed again
    from scratch.
    """
    done = set()
    for name, paths in shard_pieces(raw_dir).items():
        shard = int(name.split("-")[1]) if name != "shard-unnumbered" else -1
        if shard in shard_rows and len(rows_covered(paths)) == shard_rows[shard]:
            done.add(shard)
        elif shard not in (keep or set()):
            cfs.remove_tree(cfs.join(raw_dir, name))
    return done


def rows_written(raw_dir: str) -> int:
    """Rows the sink has written so far (for progress lines)."""
    return sum(len(rows_covered(v)) for k, v in shard_pieces(raw_dir).items() if k != "shard-unnumbered")


def finished_shards(out_dir: str, shard_rows: dict[int, int], models: list[str]) -> set[int]:
    """Shards whose outputs an earlier run already collected, checked against the expected row counts."""
    import pyarrow.parquet as pq

    done = set()
    for shard, n in shard_rows.items():
        name = f"part-{shard:05d}.parquet"
        paths = [cfs.join(out_dir, "embeddings", m, name) for m in models]
        paths += [cfs.join(out_dir, "corpus", name), cfs.join(out_dir, "skipped", name)]
        if not all(cfs.exists(p) for p in paths):
            continue
        rows = []
        for path in paths:
            fsys, inner = cfs.resolve(path)
            rows.append(pq.ParquetFile(fsys.open_input_file(inner)).metadata.num_rows)
        embedded, skipped = rows[0], rows[-1]
        if all(r == embedded for r in rows[:-1]) and embedded + skipped == n:
            done.add(shard)
    return done


def collect(raw_dir: str, out_dir: str, models: list[str], shard_rows: dict[int, int]) -> dict[str, Any]:
    """Turn the sink's pieces into per-shard outputs; reuse shards an earlier run collected.

    For every shard writes ``embeddings/<model>/part-NNNNN.parquet`` (``id``, ``embedding``),
    ``corpus/part-NNNNN.parquet`` (``id``, ``uri``, ``caption``, ``captions``) and
    ``skipped/part-NNNNN.parquet``, then ``skipped.parquet`` (``id``, ``uri``, ``stage``,
    ``reason``) over all shards. A later row whose id was already seen is skipped as a
    duplicate. Raises if a shard's rows are incomplete. Returns row counts.
    """
    pieces = shard_pieces(raw_dir)
    done = finished_shards(out_dir, shard_rows, models)
    names = sorted(set(pieces) | {f"shard-{s:05d}" for s in shard_rows})
    seen: set[str] = set()
    skipped: list[pa.Table] = []
    counts: dict[str, Any] = {"read": 0, "embedded": 0, "skipped": 0, "converted": {}, "nodes": {},
                              "shards": len(names), "shards_reused": 0}
    for name in names:
        shard = int(name.split("-")[1]) if name != "shard-unnumbered" else None
        out_name = f"part-{shard:05d}.parquet" if shard is not None else "part-unnumbered.parquet"
        if shard is not None and shard in done:
            corpus = cfs.read_parquet(cfs.join(out_dir, "corpus", out_name))
            skip = cfs.read_parquet(cfs.join(out_dir, "skipped", out_name))
            seen.update(corpus.column("id").to_pylist())
            skipped.append(skip)
            counts["read"] += corpus.num_rows + skip.num_rows
            counts["embedded"] += corpus.num_rows
            counts["shards_reused"] += 1
            continue
        paths = pieces.get(name, [])
        if shard is not None and len(rows_covered(paths)) != shard_rows.get(shard, -1):
            raise RuntimeError(f"{name}: {len(rows_covered(paths))} of {shard_rows.get(shard)} rows were written")
        if not paths:
            continue
        table = pa.concat_tables([_read_piece(p) for p in paths])
        if shard is not None:
            _, first = np.unique(np.asarray(table.column("row")), return_index=True)
            table = table.take(pa.array(first))  # a piece written twice by a retried task counts once
        table, skip = _split(table, seen)
        counts["read"] += table.num_rows + skip.num_rows
        counts["embedded"] += table.num_rows
        for note in table.column("notes").to_pylist():
            for item in (note or "").split(","):
                if item:
                    counts["converted"][item] = counts["converted"].get(item, 0) + 1
        for node in ("decode_node", "embed_node"):
            for value in set(table.column(node).to_pylist()) if node in table.column_names else ():
                counts["nodes"].setdefault(node.split("_")[0], set()).add(value)
        for model in models:
            cfs.write_parquet_atomic(
                cfs.join(out_dir, "embeddings", model, out_name),
                pa.table({"id": table.column("id"), "embedding": table.column(f"emb_{model}")}),
            )
        cfs.write_parquet_atomic(
            cfs.join(out_dir, "corpus", out_name),
            table.select([c for c in ("id", "uri", "caption", "captions") if c in table.column_names]),
        )
        cfs.write_parquet_atomic(cfs.join(out_dir, "skipped", out_name), skip)
        skipped.append(skip)
    all_skipped = pa.concat_tables(skipped).cast(SKIPPED_SCHEMA) if skipped else SKIPPED_SCHEMA.empty_table()
    counts["skipped"] = all_skipped.num_rows
    stages = all_skipped.column("stage").to_pylist()
    counts["skipped_by_stage"] = {s: stages.count(s) for s in sorted(set(stages))}
    counts["nodes"] = {k: len(v) for k, v in counts["nodes"].items()}
    cfs.write_parquet_atomic(cfs.join(out_dir, "skipped.parquet"), all_skipped)
    return counts


def _read_piece(path: str) -> pa.Table:
    import pyarrow.parquet as pq

    fsys, inner = cfs.resolve(path)
    return pq.read_table(inner, filesystem=fsys)


def _split(table: pa.Table, seen: set[str]) -> tuple[pa.Table, pa.Table]:
    """Embedded rows and skipped rows (``SKIPPED_SCHEMA``); marks ids seen before as duplicates."""
    import pyarrow.compute as pc

    ids = table.column("id").to_pylist()
    stage = table.column("skip_stage").to_pylist()
    reason = table.column("skip_reason").to_pylist()
    for i, row_id in enumerate(ids):
        if not stage[i] and row_id in seen:
            stage[i], reason[i] = "embed", "duplicate id (an earlier row has it)"
        if not stage[i]:
            seen.add(row_id)
    bad = pa.array([bool(x) for x in stage], pa.bool_())
    skip = pa.table(
        {"id": table.column("id"), "uri": table.column("uri"),
         "stage": pa.array(stage, pa.string()), "reason": pa.array(reason, pa.string())}
    ).filter(bad).cast(SKIPPED_SCHEMA)
    return table.filter(pc.invert(bad)), skip


def load_embeddings(run_dir: str, model: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, X)``: ids (n,) str sorted ascending, X (n, d) float32 L2-normalised in the same order."""
    table = cfs.read_parquet(cfs.join(run_dir, "embeddings", model))
    ids = np.array(table.column("id").to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")
    return ids[order], embedding_matrix(table.column("embedding"))[order]


def load_corpus(run_dir: str) -> pa.Table:
    """The embedded rows' ``id``, ``uri``, ``caption``, ``captions``, sorted by id."""
    table = cfs.read_parquet(cfs.join(run_dir, "corpus"))
    return table.sort_by("id")
