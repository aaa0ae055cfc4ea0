"""TCAC's caption pool: every image's candidate captions (its own and their nearest others) and their text vectors.

Written once (``ShardPool``) over the corpus's distinct captions held by caption shards,
``clipscan.stages.search.Shard``: one in the job's process where the images are scored
there (``local_shard``), Ray actors otherwise (``DatasetShards``), chosen by the switch
that runs DAF's search (``knn.stage_min_rows``, no cluster named). A scoring batch asks
the shards for its pools: no process holds the corpus's pools.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import KnnConfig


CAPTION_MODEL = "embedding"  # the one model of the caption shards: ids are the texts


def local_shard(texts: Sequence[str], emb: np.ndarray, knn: KnnConfig, seed: int) -> Any:
    """A caption shard in this process: every one of ``texts`` (distinct, sorted) with its
    (m, d) vector, searched as ``knn`` says (exact, or the FAISS index it names)."""
    from clipscan.stages.search import Shard

    return Shard(pa.array(list(texts), pa.string()), {CAPTION_MODEL: emb}, 0, knn.index, knn.nprobe,
                 knn.train_sample, seed, models=(CAPTION_MODEL,))


@dataclass(frozen=True)
class Pool:
    """One image's pool: ``texts`` (P,) its candidate captions, own first; ``emb`` (P, d)
    float32 their text embeddings; ``n_own`` how many of the first are its own."""

    texts: np.ndarray
    emb: np.ndarray
    n_own: int


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
    fn: Any = distinct_texts
    texts = ds.select_columns(["captions", "skip_stage"]).map_batches(fn, batch_format="pyarrow")
    return texts.groupby("text", num_partitions=partitions).count().select_columns(["text"])


def distinct_texts(batch: pa.Table) -> pa.Table:
    """Rows (``captions``, ``skip_stage``) -> ``text``: the distinct captions of the usable rows."""
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
