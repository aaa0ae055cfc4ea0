"""TCAC: decoded images with their caption pool in; per (image, transform) top-k captions before and after, change count, own-caption ranks and KL out.

Section 3.2 of "Unveiling Glitches". Four pieces, each usable without Ray:

* Caption pool. Every distinct caption of the corpus is embedded once with the probe's
  text tower (``EmbedText``, an actor stage). An image's pool is its own captions plus
  the ``tcac.pool_k`` nearest other captions of each of them, deduplicated
  (``pool_members``; the search is ``clipscan.stages.index.self_neighbours``). The pool
  (texts, (m, d) text embeddings, per-image members) goes to the object store once and
  every scoring actor reads it from there: no text is embedded per image.
* Transforms, in the decode tasks (``clipscan.stages.transforms.Transform``): each image
  is decoded once and turned into 1 + T versions.
* Scoring (``TcacScore``, an actor stage): the 1 + T versions of every image of a batch
  go through the probe's image tower together; zero-shot probabilities over the image's
  pool are a softmax of the model's own logit scale times the cosines
  (``score_versions``).
* ``collect`` writes ``tcac.parquet`` (parts) and ``skipped.parquet`` from the per-shard
  pieces the pipeline wrote, one task per shard, and adds up each shard's ``Figures``:
  the per-transform figures of ``run.json`` and the rows with the largest change, from
  which ``caption_shifts`` gives the before/after caption shifts of the top images, the
  input of the LLM summary.

Outputs do not depend on how Ray splits the work: encoder forwards always see exactly
``tcac.forward_rows`` inputs (the last chunk padded), because CPU and GPU kernels round
differently for different batch shapes; the scores are float64 sums in a fixed order.
``clipscan.tcac.run_tcac`` runs the job.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs
from clipscan.arrays import embedding_array
from clipscan.columns import require
from clipscan.stages.decode import Decode
from clipscan.stages.rows import SKIPPED_SCHEMA, each, shard_pieces, units, write_skipped

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import DataConfig, EmbedConfig, TcacSection

log = logging.getLogger("clipscan")

T = TypeVar("T")

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


# ---------------------------------------------------------------------------------------
# Caption pool


def caption_inputs(rows: pa.Table) -> tuple[list[str], list[str], list[list[int]]]:
    """Rows (``id``, ``captions``, ``skip_stage``) -> (texts, ids, own).

    texts: every distinct caption of the usable rows (``skip_stage`` empty), sorted (the
    order caption shards number them in, so that both break ties the same way); ids: those
    rows' image ids (the first row of a repeated id wins); own[i]: the indices into texts of
    image i's captions, deduplicated, in the image's order.
    """
    index: dict[str, int] = {}
    texts: list[str] = []
    ids: list[str] = []
    own: list[list[int]] = []
    seen: set[str] = set()
    skip = rows.column("skip_stage").to_pylist()
    for row_id, captions, stage in zip(rows.column("id").to_pylist(), rows.column("captions").to_pylist(), skip, strict=True):
        if stage or row_id in seen or not captions:
            continue
        seen.add(row_id)
        mine: list[int] = []
        for text in captions:
            if text not in index:
                index[text] = len(texts)
                texts.append(text)
            if index[text] not in mine:
                mine.append(index[text])
        ids.append(row_id)
        own.append(mine)
    order = sorted(range(len(texts)), key=texts.__getitem__)
    position = {old: new for new, old in enumerate(order)}
    return [texts[i] for i in order], ids, [[position[c] for c in mine] for mine in own]


def pool_members(own: Sequence[Sequence[int]], neighbours: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each image's pool: its own captions, then the neighbours of each own caption in rank order, deduplicated.

    own: per image, caption indices; neighbours: (m, k) int64 nearest other captions of
    every caption, best first (-1 = none), or None for no neighbours. Returns offsets
    (n + 1,) int64, members (offsets[-1],) int32 caption indices (image i's pool is
    members[offsets[i]:offsets[i + 1]]) and n_own (n,) int32 (its first n_own[i] members
    are its own captions).
    """
    offsets = np.zeros(len(own) + 1, dtype=np.int64)
    members: list[int] = []
    n_own = np.zeros(len(own), dtype=np.int32)
    for i, mine in enumerate(own):
        pool = dict.fromkeys(int(c) for c in mine)
        n_own[i] = len(pool)
        if neighbours is not None:
            for c in mine:
                pool.update(dict.fromkeys(int(j) for j in neighbours[c] if j >= 0))
        members.extend(pool)
        offsets[i + 1] = len(members)
    return offsets, np.asarray(members, dtype=np.int32), n_own


@dataclass(frozen=True)
class CaptionPool:
    """Every image's candidate captions and the text embeddings, shared by all scoring actors.

    texts (m,) str; text_emb (m, d) float32 L2-normalised, row j = texts[j]; ids (n,) str
    sorted; offsets, members, n_own as in ``pool_members``, in ``ids`` order.
    """

    texts: np.ndarray
    text_emb: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray
    members: np.ndarray
    n_own: np.ndarray

    @classmethod
    def build(cls, texts: Sequence[str], text_emb: np.ndarray, ids: Sequence[str],
              own: Sequence[Sequence[int]], neighbours: np.ndarray | None) -> CaptionPool:
        if len(text_emb) != len(texts):
            raise ValueError(f"caption pool: {len(texts)} captions but {len(text_emb)} text embeddings")
        order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
        offsets, members, n_own = pool_members([own[i] for i in order], neighbours)
        return cls(
            texts=np.asarray(list(texts), dtype=object),
            text_emb=np.ascontiguousarray(text_emb, dtype=np.float32),
            ids=np.asarray([ids[i] for i in order], dtype=str),
            offsets=offsets,
            members=members,
            n_own=n_own,
        )

    def lookup(self, image_id: str) -> tuple[np.ndarray, int] | None:
        """(members (P,) int32 caption indices, own count) of an image, None if it has no pool."""
        i = int(np.searchsorted(self.ids, image_id))
        if i >= len(self.ids) or self.ids[i] != image_id:
            return None
        return self.members[self.offsets[i]:self.offsets[i + 1]], int(self.n_own[i])

    def sizes(self) -> np.ndarray:
        """(n,) int64 pool size per image."""
        return np.diff(self.offsets)


CAPTION_MODEL = "embedding"  # the one model of the caption shards: ids are the texts


@dataclass(frozen=True)
class Pool:
    """One image's pool: ``texts`` (P,) its candidate captions, own first; ``emb`` (P, d)
    float32 their text embeddings; ``n_own`` how many of the first are its own."""

    texts: np.ndarray
    emb: np.ndarray
    n_own: int


def pools_from(pool: CaptionPool, ids: Sequence[str]) -> list[Pool | None]:
    """Each id's ``Pool`` from a whole ``CaptionPool`` (None: no pool for that id)."""
    out: list[Pool | None] = []
    for image_id in ids:
        found = pool.lookup(image_id)
        out.append(None if found is None else Pool(pool.texts[found[0]], pool.text_emb[found[0]], found[1]))
    return out


class ShardPool:
    """Caption pools asked of caption shards, one batch of images at a time.

    shards: ``clipscan.stages.search.Shard`` objects (or Ray actor handles of them) over
    the corpus's distinct captions: ``id`` the text, sorted, and one model, ``embedding``
    (``CAPTION_MODEL``). For a batch, each
    distinct own caption's vector is fetched from the shard that holds it, its
    ``pool_k`` nearest other captions are searched on every shard and merged (exact, ties
    by text, as ``CaptionPool`` over text-sorted captions with ``self_neighbours``), and
    the vectors of the pool's members are fetched: an actor holds one batch's captions,
    never the corpus's.
    """

    def __init__(self, shards: list[Any], pool_k: int) -> None:
        self.shards, self.pool_k = list(shards), int(pool_k)

    def _ask(self, method: str, *args: Any) -> list[dict[str, Any]]:
        from clipscan.stages.search import ask_shards

        return ask_shards(self.shards, method, *args)

    def vectors(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(rows (m,) int64 global caption rows, -1 where no shard has it; (m, d) float32)."""
        if not texts:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        parts = self._ask("vectors", np.asarray(list(texts), dtype=object))
        return np.max([p["rows"] for p in parts], axis=0), np.sum([p[CAPTION_MODEL] for p in parts], axis=0)

    def pools(self, own: Sequence[Sequence[str]]) -> list[Pool | None]:
        """Each image's ``Pool`` from its own captions (deduplicated, in its order); None where
        it has none, or none of them is in the shards."""
        from clipscan.stages.search import merge_answers

        distinct = list(dict.fromkeys(t for texts in own for t in texts))
        rows, vecs = self.vectors(distinct)
        known = [t for t, r in zip(distinct, rows, strict=True) if r >= 0]
        near: dict[str, list[str]] = {t: [] for t in known}
        if known and self.pool_k > 0:
            sel = rows >= 0
            lists = {CAPTION_MODEL: self.pool_k + 1}
            answers = self._ask("search", np.asarray(known, dtype=object), {CAPTION_MODEL: vecs[sel]}, lists, 0)
            merged = merge_answers(answers, CAPTION_MODEL, self.pool_k + 1, rows[sel])
            for t, ids, names in zip(known, merged["ids"], merged["names"], strict=True):
                near[t] = [str(n) for n in names[ids >= 0]]
        members: list[list[str]] = []
        n_own: list[int] = []
        for texts in own:
            mine = [t for t in dict.fromkeys(texts) if t in near]
            pool = dict.fromkeys(mine)
            for t in mine:
                pool.update(dict.fromkeys(near[t]))
            members.append(list(pool))
            n_own.append(len(mine))
        wanted = list(dict.fromkeys(t for m in members for t in m))
        _, emb = self.vectors(wanted)
        where = {t: i for i, t in enumerate(wanted)}
        return [Pool(np.asarray(m, dtype=object), emb[[where[t] for t in m]], k) if k else None
                for m, k in zip(members, n_own, strict=True)]


    def recall(self, texts: Sequence[str]) -> float:
        """recall@pool_k of the shards' index for these captions as queries: the share of each
        one's exact ``pool_k`` nearest other captions that the (approximate) search found."""
        from clipscan.stages.search import merge_answers

        rows, vecs = self.vectors(list(texts))
        sel = rows >= 0
        if not sel.any() or self.pool_k <= 0:
            return 1.0
        names = np.asarray([t for t, ok in zip(texts, sel, strict=True) if ok], dtype=object)
        lists = {CAPTION_MODEL: self.pool_k + 1}
        found, exact = (merge_answers(self._ask("search", names, {CAPTION_MODEL: vecs[sel]}, lists, 0, e), CAPTION_MODEL,
                               self.pool_k + 1, rows[sel])["ids"] for e in (False, True))
        hits = [len(set(f[f >= 0]) & set(x[x >= 0])) / max(1, int((x >= 0).sum())) for f, x in zip(found, exact,
                                                                                                   strict=True)]
        return float(np.mean(hits))


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
        self.encoder = _load_probe(probe, precision, threads)
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


def _load_probe(probe: str, precision: str, threads: int | None) -> Any:
    import os

    import torch

    from clipscan.models.registry import load_encoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(threads or os.cpu_count() or 1)
    return load_encoder(probe, device, precision)


# ---------------------------------------------------------------------------------------
# Scoring


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

    pool: a ``CaptionPool`` or an object-store reference to one (fetched once per actor),
    or a ``ShardPool`` that asks the caption shards for each batch's pools from the rows'
    ``captions`` (the actor then holds one batch's captions only). All versions of the batch's images go through the image tower in chunks of exactly
    ``forward_rows``. Skipped rows, and images without a pool, give one row with the reason.
    """

    needs = ("id", "uri", "caption", "versions", "skip_stage", "skip_reason")

    def __init__(self, probe: str, pool: Any, transforms: Sequence[str], top: int, forward_rows: int,
                 precision: str = "auto", threads: int | None = None, margin: float = 0.0) -> None:
        if not isinstance(pool, (CaptionPool, ShardPool)):
            import ray

            pool = ray.get(pool)
        self.pool: CaptionPool | ShardPool = pool
        self.transforms = list(transforms)
        self.top = top
        self.margin = float(margin)
        self.rows = forward_rows
        self.encoder = _load_probe(probe, precision, threads)
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
        pools = dict(zip([i for i in range(n) if not stage[i]], self._pools(batch, ids, stage), strict=True))
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

    def _pools(self, batch: dict[str, np.ndarray], ids: list[str], stage: list[str]) -> list[Pool | None]:
        """The pools of the batch's rows that are not skipped, in row order."""
        usable = [i for i in range(len(ids)) if not stage[i]]
        if isinstance(self.pool, CaptionPool):
            return pools_from(self.pool, [ids[i] for i in usable])
        captions = batch.get("captions")
        if captions is None:
            raise KeyError("stage 'tcac-score' asks caption shards for pools and needs the rows' 'captions'")
        return self.pool.pools([[str(t) for t in (captions[i] if captions[i] is not None else [])]
                                for i in usable])


def _append(cols: dict[str, list[Any]], row: dict[str, Any]) -> None:
    for name, values in cols.items():
        values.append(row.get(name))


# ---------------------------------------------------------------------------------------
# Ray wiring


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


# A WebDataset row whose id an earlier row of another block or tar has (the read marks
# repeats within a block only): its place, and the first row's, for ``collect`` to skip it.
REPEATS_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("shard", pa.int32()), ("row", pa.int32()),
                            ("first_uri", pa.string())])
_SETTLE_COLUMNS = ["id", "uri", "shard", "row", "captions", "skip_stage", "skip_reason"]


def settle_repeats(ds: ray.data.Dataset, path: str, partitions: int | None = None) -> ray.data.Dataset:
    """WebDataset rows -> the rows whose captions go into the pools, one per id; the later rows
    of a repeated id are written under ``path`` (``REPEATS_SCHEMA``, Parquet parts in Hive
    folders ``shard=N``), where ``collect`` skips them as duplicates.

    The rows are grouped by id (a Ray Data group-by into ``partitions`` hash partitions: no
    process holds the corpus's ids). An id belongs to its first row by (shard, row), or by
    uri where rows are not numbered, that the read did not skip, or skipped only for having
    no caption, as the read does within a block; each later such row of it is a repeat. An
    unnumbered row with the first row's uri too (a key twice in one tar) is left to
    ``collect``, which keeps the first of a piece's rows with one id. Executes the grouping and the
    write; returns the first rows, materialised, for ``caption_texts``.
    """
    fn: Any = _first_of_id
    settled = (ds.select_columns(_SETTLE_COLUMNS).groupby("id", num_partitions=partitions)
               .map_groups(fn, batch_format="pyarrow").materialize())
    cfs.remove_tree(path)
    fsys, inner = cfs.resolve(path)
    repeats: Any = _repeats_of
    settled.map_batches(repeats, batch_format="pyarrow").write_parquet(
        inner, filesystem=fsys, partition_cols=["shard"])
    kept: Any = _firsts_of
    return settled.map_batches(kept, batch_format="pyarrow")


def _first_of_id(group: pa.Table) -> pa.Table:
    """The rows of one id -> the same rows with ``first_uri`` (the uri of the id's first
    claiming row, "" where none) and ``repeat`` (a later claiming row: a duplicate, as the read calls it)."""
    import pyarrow.compute as pc

    group = group.sort_by([("shard", "ascending"), ("row", "ascending"), ("uri", "ascending")])
    stage = pc.fill_null(group.column("skip_stage"), "")
    usable = np.asarray(pc.equal(stage, ""))
    claims = usable | np.asarray(pc.equal(pc.fill_null(group.column("skip_reason"), ""), "no caption"))
    first = int(np.argmax(claims)) if claims.any() else -1
    uri = np.asarray(pc.fill_null(group.column("uri"), ""), dtype=object)
    repeat = np.zeros(group.num_rows, bool)
    if first >= 0:
        unnumbered = np.asarray(group.column("shard"), dtype=np.int64) < 0
        repeat = claims & (np.arange(group.num_rows) > first) & ~(unnumbered & (uri == uri[first]))
    winner = str(uri[first]) if first >= 0 else ""
    return group.append_column("first_uri", pa.array([winner] * group.num_rows, pa.string())).append_column(
        "repeat", pa.array(repeat))


def _repeats_of(batch: pa.Table) -> pa.Table:
    return batch.filter(batch.column("repeat")).select(REPEATS_SCHEMA.names).cast(REPEATS_SCHEMA)


def _firsts_of(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.invert(batch.column("repeat"))).select(["captions", "skip_stage"])


def read_repeats(path: str, shard: int) -> pa.Table:
    """The repeats ``settle_repeats`` wrote for input shard ``shard`` (-1: the unnumbered rows),
    ``REPEATS_SCHEMA`` but ``shard``, which the folder's name holds."""
    folder = cfs.join(path, f"shard={shard}")
    schema = pa.schema([f for f in REPEATS_SCHEMA if f.name != "shard"])
    parts = [cfs.read_parquet(cfs.join(folder, p.rsplit("/", 1)[-1])) for p in cfs.list_parquet(folder)]
    return pa.concat_tables([schema.empty_table()] + [t.select(schema.names).cast(schema) for t in parts])


def caption_texts(ds: ray.data.Dataset, partitions: int | None = None) -> ray.data.Dataset:
    """Corpus rows -> one ``text`` row per distinct caption of the usable rows (a Ray Data
    group-by into ``partitions`` hash partitions, default Ray Data's 200: no process holds
    the corpus's captions). Builds; executes nothing."""
    fn: Any = _texts_of
    texts = ds.select_columns(["captions", "skip_stage"]).map_batches(fn, batch_format="pyarrow")
    return texts.groupby("text", num_partitions=partitions).count().select_columns(["text"])


def _texts_of(batch: pa.Table) -> pa.Table:
    import pyarrow.compute as pc

    usable = batch.filter(pc.equal(pc.fill_null(batch.column("skip_stage"), ""), ""))
    flat = pc.list_flatten(usable.column("captions")) if usable.num_rows else pa.array([], pa.string())
    return pa.table({"text": pc.unique(flat.cast(pa.string()))})


def text_digest(texts: ray.data.Dataset, column: str = "text") -> dict[str, Any]:
    """``{"captions": count, "digest": hex}`` of a dataset of distinct texts, whatever its
    order or blocks: the sum of every text's 64-bit BLAKE2b, mod 2^64, per block in the
    workers; the job adds one row per block."""
    fn: Any = _digest_of
    total, count = 0, 0
    for batch in texts.map_batches(fn, fn_kwargs={"column": column}, batch_format="pyarrow",
                                   batch_size=None).iter_batches(batch_format="numpy"):
        for hi, lo, n in zip(*(batch[c].tolist() for c in ("hi", "lo", "count")), strict=True):
            total = (total + (hi << 32) + lo) % 2**64
            count += n
    return {"captions": count, "digest": f"{total:016x}"}


def _digest_of(batch: pa.Table, column: str) -> pa.Table:
    import hashlib

    total = sum(int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little")
                for t in batch.column(column).to_pylist()) % 2**64
    return pa.table({"hi": pa.array([total >> 32], pa.int64()), "lo": pa.array([total & 0xFFFFFFFF], pa.int64()),
                     "count": pa.array([batch.num_rows], pa.int64())})


def caption_vectors(texts: ray.data.Dataset, probe: str, cfg: EmbedConfig, forward_rows: int) -> ray.data.Dataset:
    """``text`` rows -> the caption shards' input: ``id`` (the text), ``embedding`` (the
    probe's text tower). Builds; executes nothing."""
    return _embed_texts(texts, probe, cfg, forward_rows, "id", batch_size=max(forward_rows, 1024))


def prepare_batch(batch: dict[str, np.ndarray], size: int, max_pixels: int,
                  transforms: dict[str, dict[str, Any]], seed: int) -> dict[str, np.ndarray]:
    """Decode then transform one batch (a CPU task): rows -> rows with ``versions``."""
    import torch

    from clipscan.stages.transforms import Transform

    torch.set_num_threads(1)  # many small ops per image; the tasks give the parallelism
    decoded = Decode(size, max_pixels)(batch)  # keeps each row's captions: caption shards build pools from them
    return Transform(transforms, seed)(decoded)


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


def build_tcac(ds: ray.data.Dataset, pool: Any, probe: str, data: DataConfig, embed: EmbedConfig,
               tcac: TcacSection, seed: int) -> ray.data.Dataset:
    """Corpus rows -> ``ROW_SCHEMA`` rows: decode and transform in CPU tasks, score in one actor pool.

    pool: an object-store reference to the ``CaptionPool`` (put once by the caller).
    Builds; executes nothing.
    """
    from clipscan.stages import rows

    # transforms cost far more than decoding: they run in CPU tasks wherever the encoders are
    plan = rows.plan(embed.model_copy(update={"decode": "tasks"}))
    batch = scoring_batch(plan.batch_size, tcac.forward_rows, 1 + len(tcac.transforms))
    prepared = ds.map_batches(
        prepare_batch,  # type: ignore[arg-type]  # ray's stub has no room for fn_kwargs
        fn_kwargs={"size": embed.image_size, "max_pixels": data.max_pixels,
                   "transforms": {k: dict(v) for k, v in tcac.transforms.items()}, "seed": seed},
        num_cpus=embed.decode_cpus,
        batch_size=batch,
        batch_format="numpy",
    )
    return rows.on_actors(prepared, TcacScore, {
        "probe": probe, "pool": pool, "transforms": list(tcac.transforms), "top": tcac.top,
        "forward_rows": tcac.forward_rows, "margin": tcac.margin, "precision": embed.precision,
    }, plan, batch_size=batch)


# ---------------------------------------------------------------------------------------
# Outputs


def collect(raw_dir: str, out_dir: str, transforms: Sequence[str], shard_rows: dict[int, int] | None = None,
            top: int = 10, keep: int = 100, repeats: str | None = None) -> tuple[dict[str, Any], Figures]:
    """Rows the pipeline wrote (``ShardSink`` pieces) -> ``tcac.parquet/`` and ``skipped/`` parts,
    ``skipped.parquet``, and the ``Figures`` the later stages read; one Ray task per input shard.

    ``tcac.parquet/part-NNNNN.parquet`` holds input shard NNNNN's rows in input order, each
    image's rows in config transform order (WebDataset: one ``part-uNNNNN`` per sink piece).
    A row a retried task wrote twice counts once; a later image of the shard with an id
    already scored in it is skipped as a duplicate (the read stage marks ids repeated across
    shards; with ``repeats``, the folder ``settle_repeats`` wrote, so are the WebDataset rows
    whose id an earlier block or tar has). With ``shard_rows`` ({shard: rows}), a shard whose
    pieces do not cover all its rows raises. The driver holds the listing, the counts and one shard's ``Figures`` at a
    time. Returns (counts: read, scored and skipped images, rows of tcac.parquet,
    skipped_by_stage, converted; figures with ``keep`` rows per transform).
    """
    pieces = shard_pieces(raw_dir)
    todo = units(pieces, shard_rows or {})
    for folder in ("tcac.parquet", "skipped"):
        cfs.remove_tree(cfs.join(out_dir, folder))  # every shard is collected again from its pieces
    args = [(paths, out_dir, out_name, list(transforms), top, keep, repeats) for out_name, paths, _ in todo]
    figures = Figures.empty(transforms, top, keep)
    counts: dict[str, Any] = {"read": 0, "scored": 0, "rows": 0, "converted": {}}
    for got in each(collect_shard, args):
        figures = figures.add(got.pop("figures"))
        for key in ("read", "scored", "rows"):
            counts[key] += got[key]
        for item, n in got["converted"].items():
            counts["converted"][item] = counts["converted"].get(item, 0) + n
    if not todo:  # nothing scored: the layout is still a folder of parts
        cfs.write_parquet_atomic(cfs.join(out_dir, "tcac.parquet", "part-00000.parquet"),
                                 ROW_SCHEMA.empty_table().select(OUTPUT_COLUMNS))
    by_stage = write_skipped(cfs.join(out_dir, "skipped.parquet"), [cfs.join(out_dir, "skipped")])
    counts.update(skipped=sum(by_stage.values()), skipped_by_stage=by_stage)
    counts["read"] += counts["skipped"]
    return counts, figures


def collect_shard(paths: list[str], out_dir: str, out_name: str, transforms: list[str], top: int,
                  keep: int, repeats: str | None = None) -> dict[str, Any]:
    """One input shard's sink pieces -> ``tcac.parquet/<out_name>`` and ``skipped/<out_name>``; returns its
    counts and ``Figures``."""
    import pyarrow.compute as pc

    if not paths:
        return {"read": 0, "scored": 0, "rows": 0, "converted": {}, "figures": Figures.empty(transforms, top, keep)}
    table = pa.concat_tables([cfs.read_parquet(p).select(ROW_SCHEMA.names).cast(ROW_SCHEMA) for p in paths])
    n_t = len(transforms)
    position = np.asarray(pc.fill_null(pc.index_in(table.column("transform"), value_set=pa.array(transforms,
                                                                                                 pa.string())), n_t))
    shard = int(table.column("shard")[0].as_py()) if table.num_rows else -1
    if shard >= 0:  # input order; a retried write counts once
        _, first = np.unique(np.asarray(table.column("row"), np.int64) * (n_t + 1) + position, return_index=True)
        table, position = table.take(pa.array(first)), position[first]
    if repeats and table.num_rows:
        table, position = _skip_repeats(table, position, read_repeats(repeats, shard), numbered=shard >= 0)
    skipped = np.asarray(pc.not_equal(table.column("skip_stage"), ""))
    starts = (position == 0) & ~skipped  # an image's rows start with its first transform's
    image = np.cumsum(starts | skipped) - 1
    ids = np.asarray(table.column("id").to_numpy(zero_copy_only=False), dtype=object)
    _, first_of = np.unique(ids[starts], return_index=True)
    repeated = np.ones(int(starts.sum()), dtype=bool)
    repeated[first_of] = False
    dup = np.isin(image, image[starts][repeated])
    kept = table.filter(pa.array(~skipped & ~dup))
    skip_rows = skipped | (starts & dup)
    reasons = table.filter(pa.array(skip_rows))
    skip = pa.table({
        "id": reasons.column("id"), "uri": reasons.column("uri"),
        "stage": pc.if_else(pc.equal(reasons.column("skip_stage"), ""), "tcac", reasons.column("skip_stage")),
        "reason": pc.if_else(pc.equal(reasons.column("skip_stage"), ""), "duplicate id (an earlier row has it)",
                             reasons.column("skip_reason")),
    }).cast(SKIPPED_SCHEMA)
    converted: dict[str, int] = {}
    notes = table.filter(pa.array(starts & ~dup)).column("notes")
    for note in notes.filter(pc.not_equal(notes, "")).to_pylist():
        for item in note.split(","):
            converted[item] = converted.get(item, 0) + 1
    output = kept.select(OUTPUT_COLUMNS)
    cfs.write_parquet_atomic(cfs.join(out_dir, "tcac.parquet", out_name), output)
    cfs.write_parquet_atomic(cfs.join(out_dir, "skipped", out_name), skip)
    scored = int((starts & ~dup).sum())
    return {"read": scored, "scored": scored, "rows": output.num_rows, "converted": converted,
            "figures": Figures.of(output, transforms, top, keep)}


def _skip_repeats(table: pa.Table, position: np.ndarray, repeats: pa.Table,
                  numbered: bool) -> tuple[pa.Table, np.ndarray]:
    """One shard's scored rows with each repeat (``REPEATS_SCHEMA``) turned into one skipped
    row, ``duplicate id``, as the read stage skips a repeat it sees; ``position`` follows."""
    import pyarrow.compute as pc

    if not repeats.num_rows:
        return table, position
    if numbered:  # a repeat is its row
        keys, known = table.column("row"), repeats.column("row")
    else:  # unnumbered: its id and uri
        keys = pc.binary_join_element_wise(table.column("id"), table.column("uri"), "\n")
        known = pc.binary_join_element_wise(repeats.column("id"), repeats.column("uri"), "\n")
    at = pc.index_in(keys, value_set=known)
    lose = np.asarray(pc.is_valid(at))
    if not lose.any():
        return table, position
    skipped = np.asarray(pc.not_equal(table.column("skip_stage"), ""))
    one = ~lose | skipped | (position == 0)  # a scored repeat keeps one row, its first transform's
    table, position, at = table.filter(pa.array(one)), position[one], at.filter(pa.array(one))
    lose = np.asarray(pc.is_valid(at))
    first = repeats.take(pc.fill_null(at, 0)).column("first_uri")
    reason = pc.binary_join_element_wise("duplicate id (first seen at ", first, ")", "")
    mask = pa.array(lose)
    for name, value in (("skip_stage", pa.scalar("read")), ("skip_reason", reason)):
        at_col = table.schema.get_field_index(name)
        table = table.set_column(at_col, name, pc.if_else(mask, value, table.column(name)))
    return table, position


# The per-transform sums behind ``Figures.summary``, in this order.
SUMS = ("images", "changed", "changed_any", "changed_margin", "changed_margin_any", "own_left_top1",
        "own_left_top", "own_top1_before", "own_top1_after", "kl", "pool_size")


@dataclass(frozen=True)
class Figures:
    """What the summary, attribute and report stages read of ``tcac.parquet``, gathered part by part.

    Per transform: the sums behind ``summary`` (``SUMS``), the change-count histogram
    (0..top) and the ``keep`` rows with the largest change (``largest_changes`` order).
    ``of`` one table, ``add`` two: a corpus's figures never hold more than ``keep`` rows
    per transform.
    """

    transforms: tuple[str, ...]
    top: int
    keep: int
    sums: np.ndarray  # (T, len(SUMS)) float64
    counts: np.ndarray  # (T, top + 1) int64
    largest: pa.Table  # OUTPUT_COLUMNS

    @classmethod
    def empty(cls, transforms: Sequence[str], top: int, keep: int) -> Figures:
        return cls(tuple(transforms), top, keep, np.zeros((len(transforms), len(SUMS))),
                   np.zeros((len(transforms), top + 1), np.int64), ROW_SCHEMA.empty_table().select(OUTPUT_COLUMNS))

    @classmethod
    def of(cls, table: pa.Table, transforms: Sequence[str], top: int, keep: int) -> Figures:
        import pyarrow.compute as pc

        sums = np.zeros((len(transforms), len(SUMS)))
        counts = np.zeros((len(transforms), top + 1), np.int64)
        names = table.column("transform")
        for t, name in enumerate(transforms):
            rows = table.filter(pc.equal(names, name))

            def col(column: str, rows: pa.Table = rows) -> np.ndarray:
                return np.asarray(rows.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)

            changed, margin, rb, ra = (col(c) for c in ("changed", "changed_margin", "own_rank_before",
                                                           "own_rank_after"))
            sums[t] = [rows.num_rows, changed.sum(), (changed > 0).sum(), margin.sum(), (margin > 0).sum(),
                       ((rb == 1) & (ra > 1)).sum(), ((rb <= top) & (ra > top)).sum(), (rb == 1).sum(),
                       (ra == 1).sum(), col("kl").sum(), col("pool_size").sum()]
            counts[t] = np.bincount(np.clip(changed.astype(np.int64), 0, top), minlength=top + 1)
        return cls(tuple(transforms), top, keep, sums, counts, _largest(table, transforms, keep))

    def add(self, other: Figures) -> Figures:
        if (self.transforms, self.top, self.keep) != (other.transforms, other.top, other.keep):
            raise ValueError("figures of different transforms, top or keep do not add up")
        both = pa.concat_tables([self.largest, other.largest])
        return Figures(self.transforms, self.top, self.keep, self.sums + other.sums, self.counts + other.counts,
                       _largest(both, self.transforms, self.keep))

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per transform: images, mean change count, share changed at all (also counting only the
        changes beyond ``tcac.margin``: mean_changed_margin, share_changed_margin), own-caption
        shares, mean KL.

        own_left_top1: share of images whose own caption is ranked 1 before the transform and
        not after; own_left_top{top}: in the top ``top`` before and not after;
        own_top1_before / own_top1_after: share with an own caption ranked 1.
        """
        out: dict[str, dict[str, Any]] = {}
        for name, row in zip(self.transforms, self.sums, strict=True):
            s = dict(zip(SUMS, row, strict=True))
            n = int(s["images"])

            def mean(key: str, digits: int = 4, s: dict[str, float] = s, n: int = n) -> float:
                return round(float(s[key] / n), digits) if n else 0.0

            out[name] = {
                "images": n,
                "mean_changed": mean("changed"),
                "share_changed": mean("changed_any"),
                "mean_changed_margin": mean("changed_margin"),
                "share_changed_margin": mean("changed_margin_any"),
                "own_left_top1": mean("own_left_top1"),
                f"own_left_top{self.top}": mean("own_left_top"),
                "own_top1_before": mean("own_top1_before"),
                "own_top1_after": mean("own_top1_after"),
                "mean_kl": mean("kl", 6),
            }
        return out

    def mean_pool(self) -> float:
        """Mean pool size over the scored images (each image's first transform row)."""
        return float(self.sums[0, -1] / self.sums[0, 0]) if len(self.transforms) and self.sums[0, 0] else 0.0


def _largest(table: pa.Table, transforms: Sequence[str], n: int) -> pa.Table:
    parts = [largest_changes(table, name, n) for name in transforms]
    return pa.concat_tables(parts) if parts else table.slice(0, 0)


def summarise(table: pa.Table, transforms: Sequence[str], top: int) -> dict[str, dict[str, Any]]:
    """``Figures.summary`` of a whole ``tcac.parquet`` table."""
    return Figures.of(table, transforms, top, 0).summary()


def largest_changes(table: pa.Table, transform: str, n: int) -> pa.Table:
    """The ``n`` rows of ``transform`` with the largest change: change count, then KL, descending; then id."""
    import pyarrow.compute as pc

    rows = table.filter(pc.equal(table.column("transform"), transform))
    return rows.sort_by([("changed", "descending"), ("kl", "descending"), ("id", "ascending")]).slice(0, n)


def caption_shifts(table: pa.Table, transforms: Sequence[str], n: int = 100) -> dict[str, list[dict[str, Any]]]:
    """Per transform, the ``n`` images with the largest change and how their captions moved.

    The input of the LLM summary (issue 5, point 6): each entry has ``id``, ``uri``,
    ``caption``, ``own_captions``, ``before`` and ``after`` (top-k captions, best first),
    ``entered`` (in ``after`` only), ``left`` (in ``before`` only), ``changed``,
    ``own_rank_before``, ``own_rank_after`` and ``kl``. Captions are corpus text: fence
    them in prompts.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for name in transforms:
        cases = []
        for row in largest_changes(table, name, n).to_pylist():
            before, after = row["top_before"], row["top_after"]
            cases.append({
                "id": row["id"], "uri": row["uri"], "caption": row["caption"],
                "own_captions": row["own_captions"], "before": before, "after": after,
                "entered": [c for c in after if c not in before],
                "left": [c for c in before if c not in after],
                "changed": row["changed"], "own_rank_before": row["own_rank_before"],
                "own_rank_after": row["own_rank_after"], "kl": row["kl"],
            })
        out[name] = cases
    return out
