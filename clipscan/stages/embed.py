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

PASS_THROUGH = ("id", "uri", "caption", "captions", "skip_stage", "skip_reason", "notes")
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

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        require(batch, self.needs, "embed")
        ok = np.array([not s for s in batch["skip_stage"]], dtype=bool)
        keep = np.flatnonzero(ok)
        columns: dict[str, Any] = {k: _column(batch[k]) for k in PASS_THROUGH if k in batch}
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
    gpus = int(cluster.get("GPU", 0))
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


def build_embed(
    ds: ray.data.Dataset, models: dict[str, str], data: DataConfig, cfg: EmbedConfig
) -> ray.data.Dataset:
    """Rows (``ROW_SCHEMA``) -> rows with ``emb_<name>`` columns. Builds; executes nothing."""
    import ray
    import ray.data

    plan = plan_resources(ray.cluster_resources(), cfg)
    decoded = ds.map_batches(
        _decode_batch,
        fn_kwargs={"size": cfg.image_size, "max_pixels": data.max_pixels},
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


def _decode_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int) -> dict[str, np.ndarray]:
    return Decode(size, max_pixels)(batch)


def collect(raw_dir: str, out_dir: str, models: list[str]) -> dict[str, Any]:
    """Split the rows the pipeline wrote into per-model embeddings, the corpus table and skips.

    Writes ``embeddings/<model>/part-NNNNN.parquet`` (``id``, ``embedding``),
    ``corpus/part-NNNNN.parquet`` (``id``, ``uri``, ``caption``, ``captions``) and
    ``skipped.parquet`` (``id``, ``uri``, ``stage``, ``reason``) under ``out_dir``.
    A later row with an id already seen is skipped as a duplicate. Returns row counts.
    """
    import pyarrow.compute as pc
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fsys, inner = cfs.resolve(raw_dir)
    files = sorted(
        f.path for f in fsys.get_file_info(pafs.FileSelector(inner, recursive=True))
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )
    seen: set[str] = set()
    skipped: list[pa.Table] = []
    counts: dict[str, Any] = {"read": 0, "embedded": 0, "skipped": 0, "converted": {}}
    for part, path in enumerate(files):
        table = pq.read_table(path, filesystem=fsys)
        counts["read"] += table.num_rows
        ids = table.column("id").to_pylist()
        stage = table.column("skip_stage").to_pylist()
        reason = table.column("skip_reason").to_pylist()
        for i, row_id in enumerate(ids):
            if not stage[i] and row_id in seen:
                stage[i], reason[i] = "embed", "duplicate id (an earlier row has it)"
            if not stage[i]:
                seen.add(row_id)
        bad = pa.array([bool(s) for s in stage])
        if pc.any(bad).as_py():
            skipped.append(
                pa.table(
                    {
                        "id": table.column("id"),
                        "uri": table.column("uri"),
                        "stage": pa.array(stage, pa.string()),
                        "reason": pa.array(reason, pa.string()),
                    }
                ).filter(bad)
            )
        good = table.filter(pc.invert(bad))
        counts["embedded"] += good.num_rows
        for note in good.column("notes").to_pylist() if "notes" in good.column_names else []:
            for item in (note or "").split(","):
                if item:
                    counts["converted"][item] = counts["converted"].get(item, 0) + 1
        name = f"part-{part:05d}.parquet"
        for model in models:
            cfs.write_parquet_atomic(
                cfs.join(out_dir, "embeddings", model, name),
                pa.table({"id": good.column("id"), "embedding": good.column(f"emb_{model}")}),
            )
        cfs.write_parquet_atomic(
            cfs.join(out_dir, "corpus", name),
            good.select([c for c in ("id", "uri", "caption", "captions") if c in good.column_names]),
        )
    table = pa.concat_tables(skipped) if skipped else SKIPPED_SCHEMA.empty_table()
    counts["skipped"] = table.num_rows
    counts["skipped_by_stage"] = {
        s: int(n) for s, n in zip(*np.unique(np.array(table.column("stage").to_pylist(), dtype=object), return_counts=True), strict=True)
    } if table.num_rows else {}
    cfs.write_parquet_atomic(cfs.join(out_dir, "skipped.parquet"), table.cast(SKIPPED_SCHEMA))
    return counts


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
