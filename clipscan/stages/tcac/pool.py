"""TCAC's caption pool: every image's candidate captions (its own and their nearest others) and their text vectors.

Written once, run two ways by ``tcac.pool``'s switch: ``CaptionPool`` holds the whole pool
(built in the job's process and shared through the object store), ``ShardPool`` asks the
caption shards (``clipscan.stages.search.Shard`` actors) for one scoring batch's pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import ray.data


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
