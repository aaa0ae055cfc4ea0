"""TCAC's repeated WebDataset ids across blocks and tars: found by a Ray Data group-by, skipped by ``collect``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs

if TYPE_CHECKING:
    import ray.data

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
