"""TCAC's outputs: the sink's pieces -> ``tcac.parquet`` and ``skipped`` parts, with each shard's ``Figures``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs
from clipscan.stages.rows import SKIPPED_SCHEMA, each, shard_pieces, units, write_skipped
from clipscan.stages.tcac.figures import Figures
from clipscan.stages.tcac.repeats import read_repeats
from clipscan.stages.tcac.score import OUTPUT_COLUMNS, ROW_SCHEMA


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
