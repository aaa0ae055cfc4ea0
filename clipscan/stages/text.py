"""Text embedding: captions in, the probe's text-tower vectors out (TCAC's caption pool, the bias probes' captions).

``EmbedText`` is the batch stage (an actor stage on Ray, a call in-process);
``forward_fixed`` runs any encoder in forwards of exactly ``rows`` inputs, so that an
input's vector is the same bits whatever shares its batch (image towers use it too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipscan.arrays import embedding_array
from clipscan.columns import require

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import EmbedConfig


def forward_fixed(fn: Callable[[Any], np.ndarray], items: Any, rows: int, pad: Any) -> np.ndarray:
    """``fn`` over ``items`` in chunks of exactly ``rows`` (the last padded with ``pad``).

    Matrix kernels pick their blocking, and so their rounding, by shape: a fixed shape
    makes an input's embedding the same bits whatever else shares its Ray batch.
    items: an (n, ...) array (pad: one item to repeat) or a list. Returns fn's (n, d) rows.
    """
    n = len(items)
    out = []
    for start in range(0, n, rows):
        chunk = items[start:start + rows]
        short = rows - len(chunk)
        if short:
            if isinstance(chunk, np.ndarray):
                chunk = np.concatenate([chunk, np.broadcast_to(pad, (short, *chunk.shape[1:]))])
            else:
                chunk = list(chunk) + [pad] * short
        out.append(np.asarray(fn(chunk))[: rows - short])
    if not out:
        raise ValueError("forward_fixed: no items")
    return np.concatenate(out)


class EmbedText:
    """Batch stage: ``text`` (n,) str -> ``key``, ``embedding`` (n, d) float32.

    key: the input column passed through, ``caption_id`` (n,) int64 by default; with
    ``key="id"`` the text itself is the ``id`` (the caption shards' input).
    """

    def __init__(self, probe: str, forward_rows: int, precision: str = "auto", threads: int | None = None,
                 key: str = "caption_id") -> None:
        self.encoder = load_probe(probe, precision, threads)
        if not self.encoder.has_text:
            raise ValueError(f"TCAC needs a probe with a text encoder; {probe} has none")
        self.rows = forward_rows
        self.key = key
        self.needs = ("text",) if key == "id" else (key, "text")

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        require(batch, self.needs, "caption-embed")
        texts = [str(t) for t in batch["text"]]
        emb = forward_fixed(self.encoder.embed_texts, texts, self.rows, "")
        keys = pa.array(texts, pa.string()) if self.key == "id" else pa.array(batch[self.key], pa.int64())
        return pa.table({self.key: keys, "embedding": embedding_array(emb)})


def load_probe(probe: str, precision: str, threads: int | None) -> Any:
    import os

    import torch

    from clipscan.models.registry import load_encoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    return load_encoder(probe, device, precision)


def build_caption_embed(texts: Sequence[str], probe: str, cfg: EmbedConfig, forward_rows: int) -> ray.data.Dataset:
    """Captions -> rows of ``caption_id``, ``embedding`` from the probe's text tower. Builds; executes nothing."""
    import ray.data

    table = pa.table({"caption_id": pa.array(np.arange(len(texts)), pa.int64()), "text": pa.array(list(texts), pa.string())})
    step = max(forward_rows, 1024)
    blocks = [table.slice(i, step) for i in range(0, max(table.num_rows, 1), step)]
    return _embed_texts(ray.data.from_arrow(blocks), probe, cfg, forward_rows, "caption_id", batch_size=forward_rows,
                        max_actors=len(blocks))  # no idle model loads


def _embed_texts(ds: ray.data.Dataset, probe: str, cfg: EmbedConfig, forward_rows: int, key: str,
                 batch_size: int, max_actors: int | None = None) -> ray.data.Dataset:
    """``EmbedText`` over ``ds`` in an actor pool sized from the cluster (no decoding)."""
    from clipscan.stages import rows

    pool = rows.plan(cfg)
    return rows.on_actors(ds, EmbedText, {"probe": probe, "forward_rows": forward_rows, "precision": cfg.precision,
                                          "key": key},
                          pool, batch_size=max(pool.batch_size, batch_size), max_actors=max_actors)


def caption_vectors(texts: ray.data.Dataset, probe: str, cfg: EmbedConfig, forward_rows: int) -> ray.data.Dataset:
    """``text`` rows -> the caption shards' input: ``id`` (the text), ``embedding`` (the
    probe's text tower). Builds; executes nothing."""
    return _embed_texts(texts, probe, cfg, forward_rows, "id", batch_size=max(forward_rows, 1024))


def embed_captions(path: str, texts: Sequence[str], probe: str, cfg: EmbedConfig, forward_rows: int,
                   here: bool) -> tuple[np.ndarray, bool]:
    """((m, d) float32 vectors of ``texts`` from ``probe``'s text tower, reused), kept in ``path``
    (``caption_id``, ``text``, ``embedding``): a rerun over the same texts reads them back.

    here: ``EmbedText`` in this process, block by block; else an actor pool on Ray
    (``build_caption_embed``) writing under a scratch folder beside ``path``. Both give the
    same bits (``forward_fixed``).
    """
    from clipscan import fs as cfs
    from clipscan.arrays import embedding_matrix

    if cfs.exists(path):
        table = cfs.read_parquet(path)
        if "text" in table.column_names and table.column("text").to_pylist() == list(texts):
            return embedding_matrix(table.column("embedding")), True
    if here:
        stage = EmbedText(probe, forward_rows, cfg.precision, cfg.threads)
        step = max(forward_rows, 1024)
        table = pa.concat_tables([
            stage({"caption_id": np.arange(lo, min(lo + step, len(texts))), "text": np.asarray(texts[lo:lo + step])})
            for lo in range(0, len(texts), step)])
    else:
        raw = cfs.join(cfs.dirname(path), "_" + path.rsplit("/", 1)[-1].removesuffix(".parquet"))
        cfs.remove_tree(raw)
        fsys, inner = cfs.resolve(raw)
        build_caption_embed(texts, probe, cfg, forward_rows).write_parquet(inner, filesystem=fsys)
        table = cfs.read_parquet(raw).sort_by("caption_id")
        cfs.remove_tree(raw)
    if table.column("caption_id").to_pylist() != list(range(len(texts))):
        raise RuntimeError(f"caption embedding of {probe} returned {table.num_rows} rows for {len(texts)} captions")
    cfs.write_parquet_atomic(path, pa.table({"caption_id": table.column("caption_id"),
                                             "text": pa.array(list(texts), pa.string()),
                                             "embedding": table.column("embedding")}))
    return embedding_matrix(table.column("embedding")), False


def text_tower(spec: str) -> Callable[[list[str]], np.ndarray] | None:
    """The text tower of the model ``spec`` names, texts -> (n, d) float32 L2-normalised, in
    this process (the LLM summary merges failure types with it); None for a model without
    one (an image-only model, precomputed ``emb:`` vectors)."""
    from clipscan.models.registry import is_precomputed, load_encoder

    if is_precomputed(spec):
        return None
    encoder = load_encoder(spec)
    return encoder.embed_texts if encoder.has_text else None
