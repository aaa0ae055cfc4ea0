"""Decoded pixel batches in, one L2-normalised embedding column per model out.

``Embed`` is a plain callable class over a batch (``dict[str, np.ndarray]``) that holds
every encoder the job needs and runs all of them on the same decoded pixels, so each
image is decoded once and read once. ``build_embed`` says how Ray runs it: decode in
CPU tasks or in the actor, encoders in one actor pool sized and wired by
``clipscan.stages.rows`` (``plan``, ``on_actors``). ``collect`` splits the
written rows into one Parquet dataset per model (``id``, ``embedding``), the corpus
table and ``skipped.parquet``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs
from clipscan.arrays import embedding_array, embedding_matrix
from clipscan.columns import require
from clipscan.pipeline.parts import RunParts
from clipscan.stages import rows
from clipscan.stages.decode import Decode
from clipscan.stages.rows import SKIPPED_SCHEMA, each, shard_pieces, units, write_skipped

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import DataConfig, EmbedConfig

PASS_THROUGH = ("id", "uri", "caption", "captions", "skip_stage", "skip_reason", "notes", "shard", "row",
                "decode_node")


class Embed:
    """Batch stage: ``pixels`` (n, S, S, 3) uint8 -> ``emb_<name>`` (n, d) float32 per model.

    Skipped rows pass through with null embeddings; the device is CUDA when the actor
    was given a GPU, with fp16 by default there and fp32 on CPU.

    The first model is built in the constructor and the others in a thread beside it, so
    that a fresh actor's imports and builds of the second model overlap the first model's
    passes over the first batch (`encoder` waits for a model the first time it is used; a
    model that failed to load raises there, with its own error).
    """

    needs = ("id", "pixels", "skip_stage")

    def __init__(self, models: dict[str, str], precision: str = "auto", threads: int | None = None) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        import torch

        from clipscan.models.registry import Encoder, load_encoder

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.names = list(models)
        self.encoders: dict[str, Encoder] = {self.names[0]: load_encoder(models[self.names[0]], device, precision)}
        self._loading: dict[str, Future[Encoder]] = {}
        if len(self.names) > 1:
            pool = ThreadPoolExecutor(1, thread_name_prefix="clipscan-load")
            self._loading = {n: pool.submit(load_encoder, models[n], device, precision) for n in self.names[1:]}
            pool.shutdown(wait=False)  # the thread runs the builds submitted; the constructor returns now
        self.dims: dict[str, int] = {}  # embedding width per model, learnt from the first batch it embeds
        self.node = _node_id()

    def encoder(self, name: str) -> Any:
        """Model ``name``'s encoder, once its build in the loading thread has finished."""
        if name not in self.encoders:
            self.encoders[name] = self._loading.pop(name).result()
        return self.encoders[name]

    def dim(self, name: str, pixels: np.ndarray) -> int:
        """Model ``name``'s embedding width: known from an earlier batch, else from one blank image."""
        if name not in self.dims:
            side = pixels.shape[1:3] if pixels.ndim == 4 else (32, 32)
            blank = np.zeros((1, *side, 3), dtype=np.uint8)
            self.dims[name] = int(self.encoder(name).embed_images(blank).shape[1])
        return self.dims[name]

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        require(batch, self.needs, "embed")
        ok = np.array([not s for s in batch["skip_stage"]], dtype=bool)
        keep = np.flatnonzero(ok)
        columns: dict[str, Any] = {k: _column(batch[k]) for k in PASS_THROUGH if k in batch}
        columns["embed_node"] = pa.array([self.node] * len(ok), pa.string())
        for name in self.names:
            emb = self.encoder(name).embed_images(batch["pixels"][keep]) if len(keep) else None
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


def build_embed(
    ds: ray.data.Dataset, models: dict[str, str], data: DataConfig, cfg: EmbedConfig
) -> ray.data.Dataset:
    """Rows (``ROW_SCHEMA``) -> rows with ``emb_<name>`` columns. Builds; executes nothing."""
    pool = rows.plan(cfg)
    kwargs: dict[str, Any] = {"models": models, "precision": cfg.precision}
    if pool.decode == "tasks":
        ds = ds.map_batches(
            _decode_batch,  # type: ignore[arg-type]
            fn_kwargs={"size": cfg.image_size, "data": data},
            num_cpus=cfg.decode_cpus,
            batch_size=pool.batch_size,
            batch_format="numpy",
        )
        stage: type = Embed
    else:
        stage = DecodeEmbed
        kwargs.update(size=cfg.image_size, data=data, gpu_decode=pool.decode == "gpu")
    return rows.on_actors(ds, stage, kwargs, pool)


def local_stage(models: dict[str, str], data: DataConfig, cfg: EmbedConfig) -> tuple[DecodeEmbed, int]:
    """``build_embed``'s stage for this process (one ``DecodeEmbed``) and its batch size: for
    corpora small enough that starting Ray and its workers would be most of the time."""
    import torch

    if cfg.decode == "gpu" and not torch.cuda.is_available():
        raise ValueError("embed.decode=gpu needs a GPU, and this process has none (set embed.decode=auto)")
    stage = DecodeEmbed(models, cfg.precision, cfg.threads, cfg.image_size, data, gpu_decode=cfg.decode == "gpu")
    return stage, rows.local_batch(cfg)


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


def finished_shards(out_dir: str, shard_rows: dict[int, int], models: list[str]) -> set[int]:
    """Shards whose outputs an earlier run already collected, checked against the expected row counts."""
    import pyarrow.parquet as pq

    done = set()
    for shard, n in shard_rows.items():
        name = f"part-{shard:05d}.parquet"
        paths = RunParts(out_dir).of_part(name, models)
        if not all(cfs.exists(p) for p in paths):
            continue
        written = []
        for path in paths:
            fsys, inner = cfs.resolve(path)
            written.append(pq.ParquetFile(fsys.open_input_file(inner)).metadata.num_rows)
        embedded, skipped = written[0], written[-1]
        if all(r == embedded for r in written[:-1]) and embedded + skipped == n:
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
    pieces = shard_pieces(raw_dir)
    done = finished_shards(out_dir, shard_rows, models)
    counts: dict[str, Any] = {"read": 0, "embedded": 0, "skipped": 0, "converted": {}, "nodes": {},
                              "shards": len(set(pieces) | {f"shard-{s:05d}" for s in shard_rows}),
                              "shards_reused": len(done)}
    for shard in done:
        out_name = f"part-{shard:05d}.parquet"
        parts = RunParts(out_dir)
        embedded, skipped = _num_rows(parts.corpus(out_name)), _num_rows(parts.skipped(out_name))
        counts["read"] += embedded + skipped
        counts["embedded"] += embedded
    results = each(collect_shard, [(paths, out_dir, out_name, models)
                                   for out_name, paths, _ in units(pieces, shard_rows, done)])
    nodes: dict[str, set[str]] = {}
    for got in results:
        counts["read"] += got["read"]
        counts["embedded"] += got["embedded"]
        for item, n in got["converted"].items():
            counts["converted"][item] = counts["converted"].get(item, 0) + n
        for kind, values in got["nodes"].items():
            nodes.setdefault(kind, set()).update(values)
    by_stage = write_skipped(cfs.join(out_dir, "skipped.parquet"), [RunParts(out_dir).skipped()])
    counts["skipped"] = sum(by_stage.values())
    counts["skipped_by_stage"] = by_stage
    counts["nodes"] = {k: len(v) for k, v in nodes.items()}
    return counts


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
    table = pa.concat_tables([cfs.read_parquet(p) for p in paths])
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
            RunParts(out_dir).embeddings(model, out_name),
            pa.table({"id": table.column("id"), "embedding": table.column(f"emb_{model}")}),
        )
    cfs.write_parquet_atomic(
        RunParts(out_dir).corpus(out_name),
        table.select([c for c in ("id", "uri", "caption", "captions") if c in table.column_names]),
    )
    cfs.write_parquet_atomic(RunParts(out_dir).skipped(out_name), skip)
    return {"read": table.num_rows + skip.num_rows, "embedded": table.num_rows, "converted": converted,
            "nodes": nodes}


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
    table = cfs.read_parquet(RunParts(run_dir).embeddings(model))
    ids = np.array(table.column("id").to_pylist(), dtype=object)
    order = np.argsort(ids, kind="stable")
    return ids[order], embedding_matrix(table.column("embedding"))[order]


def load_corpus(run_dir: str) -> pa.Table:
    """The embedded rows' ``id``, ``uri``, ``caption``, ``captions``, sorted by id."""
    table = cfs.read_parquet(RunParts(run_dir).corpus())
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
                    cfs.write_parquet_atomic(RunParts(root).embeddings(model, name),
                                             pa.table({"id": ok.column("id"), "embedding": ok.column(model)}))
                captions = pa.array([[c] for c in ok.column("caption").to_pylist()], pa.list_(pa.string()))
                cfs.write_parquet_atomic(RunParts(root).corpus(name), pa.table({
                    "id": ok.column("id"), "uri": ok.column("uri"), "caption": ok.column("caption"),
                    "captions": captions, "url": ok.column("url")}))
                cfs.write_parquet_atomic(RunParts(root).skipped(name), bad)
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
