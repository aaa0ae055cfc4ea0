"""The run's embedded parts in; every id once (its first row in the run's order), each later row moved to ``skipped/`` with where the id was first seen.

An id can repeat across input shards: one key in two WebDataset tars, one ``emb:`` id in
two blocks of a join partition. Each part settles its own rows when it is written; this
step settles them across parts, before the search, for every input. Rows are ordered by
the run's numbering (``pipeline.parts.Layout``: parts by name, rows in order). The
repeated ids are found by a group-by on id (Arrow in this process; Ray Data's on a
cluster: no process holds more than its partition), the later rows written per part
under ``_repeats/``, then each part with some drops its rows from ``corpus/`` and
``embeddings/<model>/`` and appends them to its ``skipped/`` part, so a part's embedded
and skipped rows still add up to the rows it read (what resume checks).
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan import fs as cfs
from clipscan.pipeline.parts import Layout, RunParts

STAGE = "repeats"


def part_keys(run_dir: str, name: str, offset: int) -> pa.Table:
    """``id``, ``key`` (its global row number) of one corpus part."""
    ids = cfs.read_parquet(RunParts(run_dir).corpus(name), columns=["id"]).column("id")
    return pa.table({"id": ids, "key": pa.array(np.arange(offset, offset + len(ids), dtype=np.int64))})


def later_rows(keys: pa.Table) -> pa.Table:
    """Rows (``id``, ``key``) -> the rows whose id an earlier key has: ``key``, ``first``."""
    firsts = keys.group_by("id", use_threads=False).aggregate([("key", "min"), ("key", "count")])
    firsts = firsts.filter(pc.greater(firsts.column("key_count"), 1))
    if not firsts.num_rows:
        return pa.table({"key": pa.array([], pa.int64()), "first": pa.array([], pa.int64())})
    joined = keys.join(firsts.select(["id", "key_min"]), "id")
    later = joined.filter(pc.not_equal(joined.column("key"), joined.column("key_min")))
    return pa.table({"key": later.column("key"), "first": later.column("key_min")})


def write_by_part(later: pa.Table, out: str, offsets: np.ndarray) -> int:
    """``later`` rows into ``out/part-PPPPP/<unique>.parquet`` by the part holding each key."""
    if not later.num_rows:
        return 0
    part = np.searchsorted(offsets, later.column("key").to_numpy(), side="right") - 1
    for p in np.unique(part):
        rows = later.filter(pa.array(part == p))
        cfs.write_parquet_atomic(cfs.join(out, f"part-{int(p):05d}", f"{uuid.uuid4().hex}.parquet"), rows)
    return later.num_rows


def _later_by_part(batch: pa.Table, out: str, offsets: np.ndarray) -> pa.Table:
    later = batch.filter(pc.not_equal(batch.column("key"), batch.column("min(key)")))
    n = write_by_part(pa.table({"key": later.column("key"), "first": later.column("min(key)")}), out, offsets)
    return pa.table({"rows": [n]})


def _repeated(batch: pa.Table) -> pa.Table:
    kept = batch.filter(pc.greater(batch.column("count()"), 1))
    return kept.select(["id", "min(key)"])


def drop_later(layout: Layout, p: int, found: str, models: list[str]) -> int:
    """Part ``p``: drop the rows listed under ``found/part-PPPPP/`` from its corpus and
    embedding parts and append them to its skipped part; returns how many."""
    from clipscan.stages.rows import SKIPPED_SCHEMA

    folder = cfs.join(found, f"part-{p:05d}")
    files = cfs.list_parquet(folder)
    if not files:
        return 0
    later = pa.concat_tables([cfs.read_parquet(cfs.join(folder, f.rsplit("/", 1)[-1])) for f in files])
    offsets = layout.offsets()
    name, run_dir = layout.names[p], layout.run_dir
    local = later.column("key").to_numpy() - offsets[p]
    parts = RunParts(run_dir)
    corpus = cfs.read_parquet(parts.corpus(name))
    keep = np.ones(corpus.num_rows, dtype=bool)
    keep[local] = False
    where = [_first_seen(layout, int(f)) for f in later.column("first").to_numpy()]
    skipped = pa.table({
        "id": corpus.column("id").take(pa.array(local)), "uri": corpus.column("uri").take(pa.array(local)),
        "stage": pa.array([STAGE] * len(local), pa.string()),
        "reason": pa.array([f"repeated id (first seen at {w})" for w in where], pa.string()),
    }).cast(SKIPPED_SCHEMA)
    mask = pa.array(keep)
    for model in models:
        path = parts.embeddings(model, name)
        cfs.write_parquet_atomic(path, cfs.read_parquet(path).filter(mask))
    skipped_path = parts.skipped(name)
    before = cfs.read_parquet(skipped_path).cast(SKIPPED_SCHEMA) if cfs.exists(skipped_path) else None
    cfs.write_parquet_atomic(skipped_path, pa.concat_tables([t for t in (before, skipped) if t is not None]))
    cfs.write_parquet_atomic(parts.corpus(name), corpus.filter(mask))  # last: what resume reads
    return len(local)


def _first_seen(layout: Layout, key: int) -> str:
    """Where global row ``key`` is: its uri and its place in the run."""
    offsets = layout.offsets()
    p = int(np.searchsorted(offsets, key, side="right") - 1)
    row = key - int(offsets[p])
    uri = cfs.read_parquet(RunParts(layout.run_dir).corpus(layout.names[p]), columns=["uri"]).column("uri")[row]
    return f"{uri.as_py()} (corpus/{layout.names[p]}, row {row})"


def settle(run_dir: str, models: list[str], executor: Any) -> int:
    """Settle the run's repeated ids across parts (see the module); returns the rows moved
    to ``skipped/``. ``executor``: ``pipeline.executor.Local`` (an Arrow group-by here) or
    ``RayTasks`` (Ray Data's group-by and join; each part's drops a Ray task)."""
    layout = Layout.of(run_dir)
    offsets = layout.offsets()
    found = cfs.join(run_dir, "_repeats")
    cfs.remove_tree(found)
    args = [(run_dir, name, int(offsets[p])) for p, name in enumerate(layout.names)]
    if executor.name == "local":
        keys = pa.concat_tables(list(executor.map(part_keys, args)))
        if write_by_part(later_rows(keys), found, offsets) == 0:
            return 0
    elif not _find_on_ray(args, found, offsets):
        return 0
    moved = sum(executor.map(drop_later, [(layout, p, found, models) for p in range(len(layout.names))]))
    cfs.remove_tree(found)
    return int(moved)


def _find_on_ray(args: list[tuple[str, str, int]], found: str, offsets: np.ndarray) -> int:
    import ray
    import ray.data
    from ray.data.aggregate import Count, Min

    from clipscan.stages.mine import SORT_ROWS

    total = int(offsets[-1])
    partitions = max(1, -(-total // (10 * SORT_ROWS)), int(ray.cluster_resources().get("CPU", 1)))

    def keys() -> ray.data.Dataset:
        items = [{"run_dir": a[0], "name": a[1], "offset": a[2]} for a in args]
        return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _keys_batch, batch_size=1, batch_format="pyarrow", num_cpus=0.5)  # type: ignore[arg-type]

    firsts = keys().groupby("id", num_partitions=partitions).aggregate(Count(), Min("key")).map_batches(
        _repeated, batch_format="pyarrow", batch_size=None).materialize()  # type: ignore[arg-type]
    if not firsts.count():
        return 0
    later = keys().join(firsts, "inner", num_partitions=partitions, on=("id",))
    written = later.map_batches(_later_by_part, fn_kwargs={"out": found, "offsets": offsets},  # type: ignore[arg-type]
                                batch_format="pyarrow", batch_size=None).sum("rows")
    return int(written) if isinstance(written, int | float) else 0


def _keys_batch(batch: pa.Table) -> pa.Table:
    return pa.concat_tables([part_keys(r["run_dir"], r["name"], r["offset"]) for r in batch.to_pylist()])
