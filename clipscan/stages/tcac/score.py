"""TCAC's scoring: every version of an image through the probe's image tower, zero-shot over its caption pool.

Transforms run in the decode tasks (``prepare_batch``: each image is decoded once and
turned into 1 + T versions); ``TcacScore`` (an actor stage) sends the versions of a
batch's images through the image tower together, in forwards of exactly
``tcac.forward_rows`` inputs, and scores each against its pool (``score_versions``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipscan.columns import require
from clipscan.stages.decode import Decode
from clipscan.stages.tcac.pool import ShardPool
from clipscan.stages.text import forward_fixed, load_probe

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import DataConfig, EmbedConfig, TcacSection

STRINGS = pa.list_(pa.string())
PROBS = pa.list_(pa.float32())
# One row per (image, transform); a skipped image is one row with transform "" and its reason.
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),  # the image's caption (data.caption: longest / first)
        ("own_captions", STRINGS),  # every caption of the image, deduplicated, in corpus order
        ("transform", pa.string()),
        ("pool_size", pa.int32()),  # captions the probabilities are spread over
        ("top_before", STRINGS),  # top-k captions of the original image, best first
        ("p_before", PROBS),  # their probabilities
        ("top_after", STRINGS),  # top-k captions of the transformed image, best first
        ("p_after", PROBS),
        ("changed", pa.int32()),  # captions of top_after that are not in top_before (0..k)
        ("changed_margin", pa.int32()),  # of those, the ones that gained >= tcac.margin probability on every caption that left
        ("own_rank_before", pa.int32()),  # best 1-based rank of any own caption, original
        ("own_rank_after", pa.int32()),  # the same, transformed
        ("kl", pa.float32()),  # KL(before || after) over the pool, nats
        ("shard", pa.int32()),  # input shard and row within it: what resume counts (-1: none)
        ("row", pa.int32()),
        ("notes", pa.string()),
        ("skip_stage", pa.string()),
        ("skip_reason", pa.string()),
    ]
)
OUTPUT_COLUMNS = [name for name in ROW_SCHEMA.names if name not in ("shard", "row", "notes", "skip_stage", "skip_reason")]


@dataclass(frozen=True)
class Scores:
    """One image's scores: version 0 is the original, versions 1..T the transforms.

    top (V, k) int64 positions into the pool, best first; p (V, k) float32 their
    probabilities; own_rank (V,) int32; changed (T,) int32; kl (T,) float32;
    changed_margin (T,) int32, the changes beyond the probability margin.
    """

    top: np.ndarray
    p: np.ndarray
    own_rank: np.ndarray
    changed: np.ndarray
    kl: np.ndarray
    changed_margin: np.ndarray | None = None


def score_versions(z: np.ndarray, text: np.ndarray, n_own: int, logit_scale: float, top: int,
                   margin: float = 0.0) -> Scores:
    """Zero-shot probabilities of every version of one image over its caption pool.

    z: (V, d) float32 L2-normalised image embeddings, row 0 the original; text: (P, d)
    float32 L2-normalised pool embeddings, rows 0..n_own-1 the image's own captions.
    p = softmax(logit_scale * cosine) per version. Cosines are float64 sums along d (the
    same bits whatever the batch); ties rank by pool position. Own rank: best 1-based
    rank of an own caption. Changed: how many of the top min(top, P) after the transform
    were not there before. Changed beyond the margin: those of them that gained at least
    ``margin`` probability on every caption that left, i.e. (p_after(c) - p_after(d)) -
    (p_before(c) - p_before(d)) >= margin for each c that entered and d that left; a swap
    of two near-tied captions (fp16 noise, a flat tail) gains almost nothing and does not
    count. KL(p_original || p_transformed) in nats.
    """
    if z.ndim != 2 or text.ndim != 2 or z.shape[1] != text.shape[1]:
        raise ValueError(f"score_versions: z {z.shape} and text {text.shape} must be (V, d) and (P, d)")
    if not 1 <= n_own <= len(text):
        raise ValueError(f"score_versions: n_own={n_own} must be in 1..P={len(text)}")
    cos = np.multiply(z[:, None, :], text[None, :, :], dtype=np.float64).sum(axis=-1)
    logits = float(logit_scale) * cos
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    v, n = p.shape
    order = np.lexsort((np.broadcast_to(np.arange(n), p.shape), -p), axis=1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(1, n + 1), p.shape), axis=1)
    k = min(top, n)
    best = order[:, :k]
    before = set(best[0].tolist())
    changed = np.array([k - len(before.intersection(best[t].tolist())) for t in range(1, v)], dtype=np.int32)
    kl = np.maximum((p[0] * (logp[0] - logp[1:])).sum(axis=1), 0.0)
    beyond = np.zeros(v - 1, dtype=np.int32)
    for t in range(1, v):
        after = best[t].tolist()
        entered = np.array([c for c in after if c not in before], dtype=np.int64)
        if entered.size:
            left = np.array(sorted(before.difference(after)), dtype=np.int64)
            gain = p[t] - p[0]  # (P,) probability each caption gained
            swing = gain[entered][:, None] - gain[left][None, :]
            beyond[t - 1] = int((swing.min(axis=1) >= margin).sum())
    return Scores(
        top=best,
        p=np.take_along_axis(p, best, axis=1).astype(np.float32),
        own_rank=rank[:, :n_own].min(axis=1).astype(np.int32),
        changed=changed,
        kl=kl.astype(np.float32),
        changed_margin=beyond,
    )


class TcacScore:
    """Batch stage: ``versions`` (n, 1 + T, S, S, 3) uint8 -> one ``ROW_SCHEMA`` row per (image, transform).

    pool: a ``ShardPool`` that asks the caption shards for each batch's pools from the rows'
    ``captions`` (a scoring actor holds one batch's captions only). All versions of the
    batch's images go through the image tower in chunks of exactly ``forward_rows``.
    Skipped rows, and images without a pool, give one row with the reason.
    """

    needs = ("id", "uri", "caption", "captions", "versions", "skip_stage", "skip_reason")

    def __init__(self, probe: str, pool: ShardPool, transforms: Sequence[str], top: int, forward_rows: int,
                 precision: str = "auto", threads: int | None = None, margin: float = 0.0) -> None:
        self.pool = pool
        self.transforms = list(transforms)
        self.top = top
        self.margin = float(margin)
        self.rows = forward_rows
        self.encoder = load_probe(probe, precision, threads)
        self.logit_scale = float(self.encoder.logit_scale)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        require(batch, self.needs, "tcac-score")
        versions = batch["versions"]
        n, v = versions.shape[:2]
        if v != 1 + len(self.transforms):
            raise ValueError(f"stage 'tcac-score': {v} versions per image, expected 1 + {len(self.transforms)} transforms")
        ids = [str(i) for i in batch["id"]]
        stage = [str(s or "") for s in batch["skip_stage"]]
        reason = [str(r or "") for r in batch["skip_reason"]]
        usable = [i for i in range(n) if not stage[i]]
        captions = batch["captions"]
        pools = dict(zip(usable, self.pool.pools([[str(t) for t in (captions[i] if captions[i] is not None else [])]
                                                  for i in usable]), strict=True))
        for i, pool in pools.items():
            if pool is None:
                stage[i], reason[i] = "tcac", "no caption pool for this id (it had no usable caption at read)"
        keep = [i for i in range(n) if not stage[i]]
        row_of = {i: r for r, i in enumerate(keep)}
        z = np.zeros((0, v, 1), np.float32)
        if keep:
            flat = versions[keep].reshape(-1, *versions.shape[2:])
            z = forward_fixed(self.encoder.embed_images, flat, self.rows, np.zeros(flat.shape[1:], np.uint8))
            z = z.reshape(len(keep), v, -1)
        cols: dict[str, list[Any]] = {name: [] for name in ROW_SCHEMA.names}
        notes = batch.get("notes")
        shard = batch.get("shard", np.full(n, -1))
        row = batch.get("row", np.full(n, -1))
        for i in range(n):
            base = {
                "id": ids[i], "uri": str(batch["uri"][i] or ""), "caption": str(batch["caption"][i] or ""),
                "shard": int(shard[i]), "row": int(row[i]), "notes": str(notes[i] or "") if notes is not None else "",
            }
            if stage[i]:
                _append(cols, {**base, "own_captions": [], "transform": "", "skip_stage": stage[i], "skip_reason": reason[i]})
                continue
            pool = pools[i]
            assert pool is not None
            s = score_versions(z[row_of[i]], pool.emb, pool.n_own, self.logit_scale, self.top, self.margin)
            texts = pool.texts
            before = texts[s.top[0]].tolist()
            own = texts[:pool.n_own].tolist()
            for t, name in enumerate(self.transforms, start=1):
                _append(cols, {
                    **base, "own_captions": own, "transform": name, "pool_size": len(texts),
                    "top_before": before, "p_before": s.p[0].tolist(),
                    "top_after": texts[s.top[t]].tolist(), "p_after": s.p[t].tolist(),
                    "changed": int(s.changed[t - 1]), "own_rank_before": int(s.own_rank[0]),
                    "changed_margin": int(s.changed_margin[t - 1]) if s.changed_margin is not None else None,
                    "own_rank_after": int(s.own_rank[t]), "kl": float(s.kl[t - 1]),
                    "skip_stage": "", "skip_reason": "",
                })
        return pa.table(cols, schema=ROW_SCHEMA)


def _append(cols: dict[str, list[Any]], row: dict[str, Any]) -> None:
    for name, values in cols.items():
        values.append(row.get(name))


def prepare(batch: dict[str, np.ndarray], size: int, data: DataConfig,
            transforms: dict[str, dict[str, Any]], seed: int) -> dict[str, np.ndarray]:
    """Decode (with ``data``'s limits and plugins) then transform one batch: rows -> rows with ``versions``."""
    from clipscan.stages.transforms import Transform

    decoded = Decode.for_data(size, data)(batch)  # keeps each row's captions: caption shards build pools from them
    return Transform(transforms, seed)(decoded)


def prepare_batch(batch: dict[str, np.ndarray], size: int, data: DataConfig,
                  transforms: dict[str, dict[str, Any]], seed: int) -> dict[str, np.ndarray]:
    """``prepare`` as a CPU task of its own, on one thread."""
    import torch

    torch.set_num_threads(1)  # many small ops per image; the tasks give the parallelism
    return prepare(batch, size, data, transforms, seed)


class PrepareScore:
    """``build_tcac``'s two steps in this process, one batch at a time: ``prepare``, then ``TcacScore``."""

    def __init__(self, pool: ShardPool, probe: str, data: DataConfig, embed: EmbedConfig, tcac: TcacSection,
                 seed: int) -> None:
        self.kwargs = _prepare_kwargs(data, embed, tcac, seed)
        self.score = TcacScore(**_score_kwargs(probe, pool, embed, tcac), threads=embed.threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self.score(prepare(batch, **self.kwargs))


def local_stage(pool: ShardPool, probe: str, data: DataConfig, embed: EmbedConfig, tcac: TcacSection,
                seed: int) -> tuple[PrepareScore, int]:
    """``build_tcac``'s stage for this process and its batch size (as ``scoring_batch`` rounds it)."""
    from clipscan.stages import rows

    batch = scoring_batch(rows.local_batch(embed), tcac.forward_rows, 1 + len(tcac.transforms))
    return PrepareScore(pool, probe, data, embed, tcac, seed), batch


def scoring_batch(batch_size: int, forward_rows: int, versions: int) -> int:
    """Images per scoring batch: ``batch_size`` rounded up so its images x versions fill whole forward passes.

    Every pass has exactly ``forward_rows`` inputs; a batch that ends mid-pass pads the
    rest with blanks the encoder computes for nothing (half of the work at 16 images,
    2 versions and 64 rows). A multiple of forward_rows / gcd(forward_rows, versions)
    images never does; where that multiple is above 4 x batch_size, batch_size stays.
    """
    step = forward_rows // math.gcd(forward_rows, versions)
    rounded = -(-batch_size // step) * step
    return rounded if rounded <= 4 * batch_size else batch_size


def build_tcac(ds: ray.data.Dataset, pool: ShardPool, probe: str, data: DataConfig, embed: EmbedConfig,
               tcac: TcacSection, seed: int) -> ray.data.Dataset:
    """Corpus rows -> ``ROW_SCHEMA`` rows: decode and transform in CPU tasks, score in one actor pool.

    pool: a ``ShardPool`` over caption shard actors. Builds; executes nothing.
    """
    from clipscan.stages import rows

    # transforms cost far more than decoding: they run in CPU tasks wherever the encoders are
    plan = rows.plan(embed.model_copy(update={"decode": "tasks"}))
    batch = scoring_batch(plan.batch_size, tcac.forward_rows, 1 + len(tcac.transforms))
    prepared = ds.map_batches(
        prepare_batch,  # type: ignore[arg-type]  # ray's stub has no room for fn_kwargs
        fn_kwargs=_prepare_kwargs(data, embed, tcac, seed),
        num_cpus=embed.decode_cpus,
        batch_size=batch,
        batch_format="numpy",
    )
    return rows.on_actors(prepared, TcacScore, _score_kwargs(probe, pool, embed, tcac), plan, batch_size=batch)


def _prepare_kwargs(data: DataConfig, embed: EmbedConfig, tcac: TcacSection, seed: int) -> dict[str, Any]:
    """``prepare``'s arguments besides the batch, in either executor."""
    return {"size": embed.image_size, "data": data, "transforms": {k: dict(v) for k, v in tcac.transforms.items()},
            "seed": seed}


def _score_kwargs(probe: str, pool: ShardPool, embed: EmbedConfig, tcac: TcacSection) -> dict[str, Any]:
    """``TcacScore``'s arguments, in either executor (an actor sets its own threads)."""
    return {"probe": probe, "pool": pool, "transforms": list(tcac.transforms), "top": tcac.top,
            "forward_rows": tcac.forward_rows, "margin": tcac.margin, "precision": embed.precision}
