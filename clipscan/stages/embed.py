"""Decoded pixel batches in, one L2-normalised embedding column per model out; plus the Ray wiring.

``Embed`` is a plain callable class over a batch (``dict[str, np.ndarray]``) that holds
every encoder the job needs and runs all of them on the same decoded pixels, so each
image is decoded once and read once. ``build_embed`` says how Ray runs it: decode in
CPU tasks, encoders in one actor pool sized from the cluster. ``collect`` splits the
written rows into one Parquet dataset per model (``id``, ``embedding``), the corpus
table and ``skipped.parquet``.
"""

from __future__ import annotations

import math
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
        self.dims: dict[str, int] = {}  # embedding width per model, learnt from the first batch it embeds
        self.node = _node_id()

    def dim(self, name: str, pixels: np.ndarray) -> int:
        """Model ``name``'s embedding width: known from an earlier batch, else from one blank image."""
        if name not in self.dims:
            side = pixels.shape[1:3] if pixels.ndim == 4 else (32, 32)
            blank = np.zeros((1, *side, 3), dtype=np.uint8)
            self.dims[name] = int(self.encoders[name].embed_images(blank).shape[1])
        return self.dims[name]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        require(batch, self.needs, "embed")
        ok = np.array([not s for s in batch["skip_stage"]], dtype=bool)
        keep = np.flatnonzero(ok)
        columns: dict[str, Any] = {k: _column(batch[k]) for k in PASS_THROUGH if k in batch}
        columns["embed_node"] = pa.array([self.node] * len(ok), pa.string())
        for name, encoder in self.encoders.items():
            emb = encoder.embed_images(batch["pixels"][keep]) if len(keep) else None
            if emb is not None:
                self.dims[name] = emb.shape[1]
            d = emb.shape[1] if emb is not None else self.dim(name, batch["pixels"])
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


GPU_BATCH = 256  # images per encoder batch on a GPU actor unless embed.batch_size says otherwise
CPU_BATCH = 64  # the same on a CPU actor
IO_CPUS = 0.25  # CPUs a sink write task reserves: short Parquet writes beside actors that hold the rest


@dataclass(frozen=True)
class EmbedPlan:
    """How Ray runs the encoders: pool size, per-actor resources, and where images are decoded."""

    actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    threads: int | None
    decode: str  # "actor" (the encoder actor decodes its own batch), "tasks" (CPU tasks) or "gpu" (nvJPEG in the actor)


def plan_resources(cluster: dict[str, float], cfg: EmbedConfig, node_cpus: list[float] | None = None) -> EmbedPlan:
    """Size the encoder pool from ``ray.cluster_resources()`` and each node's CPUs.

    One actor per GPU where there are GPUs, fed by CPU decode tasks (or decoding on its
    GPU with ``embed.decode: gpu``). On CPU-only clusters one actor per node that decodes
    its own batches and holds the node's CPUs but a sliver for the sink: separate decode
    tasks would take a core from the encoders for work that costs them a few percent, and
    their processes would preempt the encoder's threads. ``node_cpus`` lists the CPUs of
    each node that can run work (default: one node with all of ``cluster``'s CPUs).
    """
    gpus = int(cluster.get("GPU", 0)) if cfg.gpus is None else cfg.gpus
    if gpus > 0:
        return EmbedPlan(
            actors=cfg.actors or gpus,
            num_cpus=cfg.cpus_per_actor or 1.0,
            num_gpus=1.0,
            batch_size=cfg.batch_size or GPU_BATCH,
            threads=cfg.threads,
            decode="tasks" if cfg.decode == "auto" else cfg.decode,
        )
    if cfg.decode == "gpu":
        raise ValueError("embed.decode=gpu needs GPUs, and this cluster has none (set embed.decode=auto)")
    nodes = [c for c in (node_cpus or [float(cluster.get("CPU", 1))]) if c >= 1] or [1.0]
    decode = "actor" if cfg.decode == "auto" else cfg.decode
    actors = cfg.actors or len(nodes)
    per_node = -(-actors // len(nodes))  # actors sharing the smallest node
    room = min(nodes) / per_node
    if decode == "actor":
        per_actor = cfg.cpus_per_actor or max(0.5, room - IO_CPUS)
    else:  # leave a core for the decode tasks: two one-CPU actors on two CPUs starve them and the pipeline stalls
        per_actor = cfg.cpus_per_actor or max(0.5, min(room - 1.0, room - 0.5 * per_node))
    return EmbedPlan(actors=actors, num_cpus=per_actor, num_gpus=0.0, batch_size=cfg.batch_size or CPU_BATCH,
                     threads=cfg.threads or max(1, math.ceil(per_actor)), decode=decode)


def node_cpus() -> list[float]:
    """CPUs of every live node that offers any (a head started with ``--num-cpus=0`` offers none)."""
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]


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

    plan = plan_resources(cluster_resources(), cfg, node_cpus())
    kwargs: dict[str, Any] = {"models": models, "precision": cfg.precision, "threads": plan.threads}
    if plan.decode == "tasks":
        ds = ds.map_batches(
            _decode_batch,  # type: ignore[arg-type]
            fn_kwargs={"size": cfg.image_size, "data": data},
            num_cpus=cfg.decode_cpus,
            batch_size=plan.batch_size,
            batch_format="numpy",
        )
        stage: type = Embed
    else:
        stage = DecodeEmbed
        kwargs.update(size=cfg.image_size, data=data, gpu_decode=plan.decode == "gpu")
    return ds.map_batches(
        stage,
        fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None,
        batch_size=plan.batch_size,
        batch_format="numpy",
    )


class DecodeEmbed:
    """Batch stage: rows with ``uri`` -> rows with ``emb_<name>``: ``Decode`` then ``Embed`` in one actor.

    On CPU nodes the encoder's own process decodes (a few percent of its work) instead of
    separate tasks that would compete for its cores. With ``gpu_decode`` JPEGs are decoded
    on the actor's GPU in one batch (nvJPEG) and whatever it cannot decode falls back to
    ``Decode`` on the CPU, with the same skips and reasons.
    """

    def __init__(self, models: dict[str, str], precision: str, threads: int | None, size: int, data: DataConfig,
                 gpu_decode: bool = False) -> None:
        self.embed = Embed(models, precision, threads)
        self.decode: Any = Decode.for_data(size, data)
        if gpu_decode:
            from clipscan.stages.gpu_decode import GpuDecode

            self.decode = GpuDecode(size, data.max_pixels, fallback=self.decode)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        out = self.decode(batch)
        out["decode_node"] = np.array([self.embed.node] * len(out["id"]), dtype=object)
        return self.embed(out)


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
    """Turn the sink's pieces into per-shard outputs, one Ray task per shard; reuse shards an earlier run collected.

    For every shard ``collect_shard`` writes ``embeddings/<model>/part-NNNNN.parquet``
    (``id``, ``embedding``), ``corpus/part-NNNNN.parquet`` (``id``, ``uri``, ``caption``,
    ``captions``) and ``skipped/part-NNNNN.parquet``; then ``skipped.parquet`` (``id``,
    ``uri``, ``stage``, ``reason``) is streamed from those parts. The driver holds the
    listing and per-shard counts only. Raises if a shard's rows are incomplete. Returns
    row counts.
    """
    import ray

    pieces = shard_pieces(raw_dir)
    done = finished_shards(out_dir, shard_rows, models)
    names = sorted(set(pieces) | {f"shard-{s:05d}" for s in shard_rows})
    counts: dict[str, Any] = {"read": 0, "embedded": 0, "skipped": 0, "converted": {}, "nodes": {},
                              "shards": len(names), "shards_reused": 0}
    units: list[tuple[str, list[str], int | None]] = []
    for name in names:
        if name == "shard-unnumbered":  # WebDataset rows: one unit per piece the sink wrote
            units += [(f"part-u{i:05d}.parquet", [p], None) for i, p in enumerate(pieces[name])]
            continue
        shard = int(name.split("-")[1])
        out_name = f"part-{shard:05d}.parquet"
        if shard in done:
            embedded, skipped = (_num_rows(cfs.join(out_dir, d, out_name)) for d in ("corpus", "skipped"))
            counts["read"] += embedded + skipped
            counts["embedded"] += embedded
            counts["shards_reused"] += 1
            continue
        paths = pieces.get(name, [])
        if len(rows_covered(paths)) != shard_rows.get(shard, -1):
            raise RuntimeError(f"{name}: {len(rows_covered(paths))} of {shard_rows.get(shard)} rows were written")
        units.append((out_name, paths, shard))
    task = ray.remote(num_cpus=0.5, max_retries=3)(collect_shard) if ray.is_initialized() else None
    if task is not None:
        refs = [task.remote(paths, out_dir, out_name, models) for out_name, paths, _ in units]
        results = _gather(refs)
    else:
        results = [collect_shard(paths, out_dir, out_name, models) for out_name, paths, _ in units]
    nodes: dict[str, set[str]] = {}
    for got in results:
        counts["read"] += got["read"]
        counts["embedded"] += got["embedded"]
        for item, n in got["converted"].items():
            counts["converted"][item] = counts["converted"].get(item, 0) + n
        for kind, values in got["nodes"].items():
            nodes.setdefault(kind, set()).update(values)
    by_stage = write_skipped(cfs.join(out_dir, "skipped.parquet"), [cfs.join(out_dir, "skipped")])
    counts["skipped"] = sum(by_stage.values())
    counts["skipped_by_stage"] = by_stage
    counts["nodes"] = {k: len(v) for k, v in nodes.items()}
    return counts


def _gather(refs: list[Any], window: int = 64) -> list[dict[str, Any]]:
    """Results of the tasks in order, at most ``window`` awaited at once (each result is a few counts)."""
    import ray

    return [r for i in range(0, len(refs), window) for r in ray.get(refs[i : i + window])]


def _num_rows(path: str) -> int:
    import pyarrow.parquet as pq

    fsys, inner = cfs.resolve(path)
    with cfs.named(path):
        return int(pq.ParquetFile(fsys.open_input_file(inner)).metadata.num_rows)


def collect_shard(paths: list[str], out_dir: str, out_name: str, models: list[str]) -> dict[str, Any]:
    """One shard's sink pieces -> its ``embeddings/<model>/``, ``corpus/``, ``skipped/`` parts named out_name.

    A row the sink wrote twice (a retried task) counts once; a later row with an id seen
    earlier in the shard is skipped as a duplicate. Returns the shard's counts.
    """
    if not paths:
        return {"read": 0, "embedded": 0, "converted": {}, "nodes": {}}
    table = pa.concat_tables([_read_piece(p) for p in paths])
    if int(table.column("shard")[0].as_py()) >= 0:
        _, first = np.unique(np.asarray(table.column("row")), return_index=True)
        table = table.take(pa.array(first))  # a piece written twice by a retried task counts once
    table, skip = _split(table, set())
    converted: dict[str, int] = {}
    for note in table.column("notes").to_pylist():
        for item in (note or "").split(","):
            if item:
                converted[item] = converted.get(item, 0) + 1
    nodes = {node.split("_")[0]: sorted(set(table.column(node).to_pylist()))
             for node in ("decode_node", "embed_node") if node in table.column_names}
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
    return {"read": table.num_rows + skip.num_rows, "embedded": table.num_rows, "converted": converted,
            "nodes": nodes}


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


class PairSink:
    """Ray Data sink: settled rows of ``stages.vectors.paired_vectors`` in, the run's parts out.

    Each write task writes ``embeddings/<model>/part-jNNNNNN.parquet`` (``id``, ``embedding``)
    for every model, ``corpus/part-jNNNNNN.parquet`` (``id``, ``uri``, ``caption``,
    ``captions``, ``url``) for the rows both models have, and ``skipped/part-jNNNNNN.parquet``
    for the rest, named by its task index so a retried task rewrites its own files. The
    driver keeps only the per-task counts (``counts`` after the write).
    """

    def __new__(cls, root: str, names: tuple[str, str]) -> Any:
        from ray.data import Datasink

        class _Sink(Datasink):  # type: ignore[misc,type-arg]
            def __init__(self) -> None:
                self.counts: dict[str, Any] = {"embedded": 0, "skipped": 0, "renormalised": dict.fromkeys(names, 0)}

            def write(self, blocks: Any, ctx: Any) -> dict[str, Any]:
                from ray.data.block import BlockAccessor

                from clipscan.stages.vectors import skips, usable

                tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
                tables = [t for t in tables if t.num_rows]
                if not tables:
                    return {"embedded": 0, "skipped": 0, "renormalised": {}}
                table = pa.concat_tables(tables)
                name = f"part-j{ctx.task_idx:06d}.parquet"
                ok = usable(table, names)
                bad = skips(table)
                for model in names:
                    cfs.write_parquet_atomic(cfs.join(root, "embeddings", model, name),
                                             pa.table({"id": ok.column("id"), "embedding": ok.column(model)}))
                captions = pa.array([[c] for c in ok.column("caption").to_pylist()], pa.list_(pa.string()))
                cfs.write_parquet_atomic(cfs.join(root, "corpus", name), pa.table({
                    "id": ok.column("id"), "uri": ok.column("uri"), "caption": ok.column("caption"),
                    "captions": captions, "url": ok.column("url")}))
                cfs.write_parquet_atomic(cfs.join(root, "skipped", name), bad)
                renorm = {m: int(np.asarray(table.column(f"renormalised_{m}")).sum()) for m in names}
                return {"embedded": ok.num_rows, "skipped": bad.num_rows, "renormalised": renorm}

            def on_write_complete(self, write_result: Any) -> None:
                for got in write_result.write_returns:
                    self.counts["embedded"] += got["embedded"]
                    self.counts["skipped"] += got["skipped"]
                    for m, n in got["renormalised"].items():
                        self.counts["renormalised"][m] += n

            def get_name(self) -> str:
                return "ClipscanPairs"

        return _Sink()


def write_skipped(path: str, part_dirs: list[str]) -> dict[str, int]:
    """Stream every ``skipped/part-*.parquet`` under ``part_dirs`` into one ``skipped.parquet`` at path.

    One part in memory at a time. Returns the count per stage.
    """
    import uuid

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    by_stage: dict[str, int] = {}
    fsys, inner = cfs.resolve(path)
    tmp = inner if cfs.is_uri(path) else f"{inner}.tmp-{uuid.uuid4().hex[:8]}"  # object stores: one upload
    if not cfs.is_uri(path):
        os.makedirs(os.path.dirname(inner), exist_ok=True)
    with cfs.named(path), fsys.open_output_stream(tmp) as out, \
            pq.ParquetWriter(out, SKIPPED_SCHEMA, compression="zstd") as writer:
        for part_dir in part_dirs:
            for part in cfs.list_files(part_dir, ".parquet", recursive=False):
                table = _read_piece(part).cast(SKIPPED_SCHEMA)
                for stage in table.column("stage").unique().to_pylist():
                    n = int(pc.sum(pc.equal(table.column("stage"), stage)).as_py() or 0)
                    by_stage[stage] = by_stage.get(stage, 0) + n
                writer.write_table(table)
    if tmp != inner:
        os.replace(tmp, inner)
    return dict(sorted(by_stage.items()))
