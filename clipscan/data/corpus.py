"""A ``DataConfig`` in; the corpus's rows (``read.ROW_SCHEMA``) and what was read out, whatever its layout.

Flickr8k, COCO and small manifests are read into one table here (``read``); WebDataset
shards are read in Ray tasks (``read.read_wds_shards``); large Parquet manifests are
streamed from their footers (``stream``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clipscan.data import stream
from clipscan.data.read import (
    READ_BLOCK_ROWS,
    READ_CPUS,
    changed_table_shards,
    corpus_path,
    detect_format,
    expand_shards,
    manifest_file,
    read_table,
    read_wds_shards,
    recorded_shard_rows,
    shard_sources,
)

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import DataConfig


@dataclass
class Corpus:
    """What ``plan_corpus`` read: a corpus parsed into one table on the driver keeps its blocks
    (``blocks``, rows in input order), which a stage can run over in this process or as a Ray
    Dataset (``dataset()``); a corpus read in Ray tasks (WebDataset, a streamed manifest) is
    a Ray Dataset from the start (``blocks`` None)."""

    blocks: list[pa.Table] | None
    ds: Any = None

    def dataset(self) -> ray.data.Dataset:
        """The rows as a Ray Dataset (starts Ray if this process has not)."""
        if self.ds is None:
            import ray.data

            assert self.blocks is not None
            # from_blocks reads each block's metadata here; from_arrow runs a Ray task per block for it
            # (4.3-5.2 s against 1.5-1.8 s for the 1,954 blocks of 2,000,000 rows, 0.5 s for one block)
            self.ds = ray.data.from_blocks(self.blocks)
        return self.ds


def read_corpus(
    cfg: DataConfig,
    done_shards: Callable[[dict[int, int]], set[int]] | None = None,
    records: str | None = None,
    forget: Callable[[int], None] | None = None,
    scratch: str | None = None,
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """``plan_corpus``'s rows as a Ray Dataset (see there)."""
    corpus, info = plan_corpus(cfg, done_shards, records, forget, scratch)
    return corpus.dataset(), info


def plan_corpus(
    cfg: DataConfig,
    done_shards: Callable[[dict[int, int]], set[int]] | None = None,
    records: str | None = None,
    forget: Callable[[int], None] | None = None,
    scratch: str | None = None,
    ray_up: Callable[[], None] | None = None,
) -> tuple[Corpus, dict[str, Any]]:
    """The corpus's rows (see ``ROW_SCHEMA``), in blocks of at most ``READ_BLOCK_ROWS``.

    ``done_shards(shard_rows)`` names the shards an earlier, interrupted run finished; they
    are left out (``info["todo_shards"]`` counts the rest). ``info["shard_rows"]`` maps
    every shard to its row count, ``info["shards"]`` counts the shards.

    WebDataset: each tar is a shard, numbered by its place in the shard list, its rows by
    their place in the tar. Row counts are known once a tar has been read: with
    ``records`` (a folder of the run), the reader records them there and
    ``info["shard_rows"]`` holds those of earlier runs whose tar is unchanged (same size
    and modification time); ``forget(shard)`` is called for each shard whose tar changed,
    so the caller drops what it kept of it. Without ``records``, or with ``data.limit``,
    WebDataset rows are not numbered (shard -1) and do not resume.

    Manifests, folders, Flickr8k and COCO are parsed on the driver into one table, except a
    Parquet manifest of at least ``data.stream_min_rows`` rows (``stream``): its rows are read
    in Ray tasks, and its duplicate ids found by a distributed pass whose rows go under
    ``records`` (else ``scratch``, a folder of the run). Builds the dataset; executes nothing
    beyond parsing caption metadata (or, streamed, the duplicate and digest passes).
    ``ray_up()`` is called before the first use of Ray (the formats read in Ray tasks).
    """
    path = corpus_path(cfg)
    fmt = cfg.format if cfg.format != "auto" else detect_format(path)
    if fmt == "webdataset":
        import ray.data

        if ray_up is not None:
            ray_up()
        sources = shard_sources(expand_shards(path))
        numbered = records is not None and cfg.limit is None
        known: dict[int, int] = {}
        if numbered:
            assert records is not None
            known, changed = recorded_shard_rows(records, sources)
            for shard in sorted(changed):
                if forget is not None:
                    forget(shard)
        done = done_shards(known) if (done_shards is not None and known) else set()
        todo = [s for s in sources if s["shard"] not in done]
        ds: ray.data.Dataset = ray.data.from_items(todo or sources[:1], override_num_blocks=max(1, len(todo)))
        ds = ds.map_batches(
            read_wds_shards,  # type: ignore[arg-type]
            fn_kwargs={"caption": cfg.caption, "records": records if numbered else None,
                       "rows_per_block": cfg.rows_per_block,
                       "max_member_bytes": cfg.decode_memory_mb * 2**20 if cfg.decode_memory_mb else None},
            batch_size=1,
            num_cpus=READ_CPUS,  # short I/O tasks: the encoder actors hold all but a sliver of each CPU node
            batch_format="numpy",
        )
        if not todo:
            ds = ds.limit(0)
        if not numbered:
            ds = ds.map_batches(_unnumbered, num_cpus=READ_CPUS, batch_format="pyarrow")  # type: ignore[arg-type]
            if cfg.limit is not None:
                ds = ds.limit(cfg.limit)
        return Corpus(None, ds), {"format": fmt, "shard_rows": known, "shards": len(sources), "todo_shards": len(todo),
                    "numbered": numbered, **({"sources": sources} if numbered else {})}
    if fmt == "manifest":

        streamed = stream.plan_manifest(cfg, manifest_file(path))
        if streamed is not None:
            work = records or scratch
            if work is None:
                raise ValueError("a streamed manifest needs records or scratch: a folder for its duplicate rows")
            if ray_up is not None:
                ray_up()
            ds, info = stream.read(streamed, work, done_shards, records, forget)
            return Corpus(None, ds), info
    table, info = read_table(cfg)
    step = cfg.rows_per_block
    shard_rows = {i // step: min(step, table.num_rows - i) for i in range(0, table.num_rows, step)}
    if records is not None:
        changed = changed_table_shards(records, table, step)
        for shard in sorted(changed):
            if forget is not None:
                forget(shard)
        info["changed_shards"] = len(changed)
    done = done_shards(shard_rows) if done_shards is not None else set()
    pieces = [table.slice(s * step, n) for s, n in shard_rows.items() if s not in done]
    info.update(shard_rows=shard_rows, shards=len(shard_rows), todo_shards=len(pieces))
    # a shard (the resume unit) is large; its Ray blocks are not, so decode spreads over tasks
    blocks = [t.slice(i, READ_BLOCK_ROWS) for t in pieces for i in range(0, t.num_rows, READ_BLOCK_ROWS)]
    return Corpus(blocks or [table.slice(0, 0)]), info


def _unnumbered(table: pa.Table) -> pa.Table:
    for name in ("shard", "row"):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array([-1] * table.num_rows, pa.int32()))
    return table
