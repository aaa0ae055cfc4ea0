"""Parquet manifests read in Ray tasks, shard by shard: the driver holds the parts' footers, never the rows.

A manifest that ``read.manifest_table`` takes (``image`` strings, ``caption`` strings or
lists of strings, ``id`` strings or integers), one Parquet file or a folder of parts, of at least
``data.stream_min_rows`` rows. Its rows are numbered from the footers: shard ``s`` is
manifest rows ``[s * rows_per_block, (s + 1) * rows_per_block)``, parts in name order.
Three passes of Ray tasks, each reading only the row groups of its shard:

1. duplicate ids: every shard's ``(id, row)`` through Ray Data's distributed group-by (the
   count and first row of each id) and, where some id repeats, a join that finds each later
   row of it. Those rows are written by shard under ``work/duplicates/shard-NNNNN/``;
2. resume digests (``read.shard_digest``: the shard's rows and each image file's stat);
3. the rows themselves, the pipeline's input, in Ray blocks of ``read.READ_BLOCK_ROWS``.

The rows equal ``read.read_table``'s to the bit: the same ids, uris, captions, skip reasons
(a repeated id names the manifest row where it was first seen), shards and rows.
"""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from clipscan import fs as cfs
from clipscan.data.read import (
    READ_BLOCK_ROWS,
    READ_CPUS,
    CorpusError,
    arrow_manifest,
    manifest_ids,
    manifest_table,
    record_digests,
    shard_digest,
)

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import DataConfig

COLUMNS = ("image", "caption", "id")
KEY_BYTES = 64  # about one (id, row) pair in the duplicate pass's shuffle, for its partition count
PARTITION_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Part:
    """One Parquet file of the manifest: where its rows start in the manifest and its row groups' sizes."""

    path: str
    start: int
    groups: tuple[int, ...]

    @property
    def rows(self) -> int:
        return sum(self.groups)


@dataclass(frozen=True)
class Plan:
    """A manifest to stream: its parts, the folder relative images are under, and its shards."""

    path: str
    parts: tuple[Part, ...]
    base: str
    step: int
    rows: int  # after data.limit
    caption: str  # data.caption

    def shards(self) -> list[dict[str, int]]:
        return [{"shard": s, "lo": lo, "hi": min(lo + self.step, self.rows)}
                for s, lo in enumerate(range(0, self.rows, self.step))]


def plan_manifest(cfg: DataConfig, path: str) -> Plan | None:
    """The streamed reading of the manifest at ``path`` (a file or a folder of parts), from its
    footers; None where it is read on the driver (not Parquet, caption bytes, or fewer than
    ``data.stream_min_rows`` rows)."""
    import pyarrow.parquet as pq

    fsys, inner = cfs.resolve(path)
    with cfs.named(path):
        kind = fsys.get_file_info(inner).type
    if kind == pafs.FileType.Directory:
        files = [cfs.join(path, posixpath.basename(p)) for p in cfs.list_parquet(path)]
        if not files:
            return None
    elif path.endswith(".parquet"):
        files = [path]
    else:
        return None
    parts: list[Part] = []
    start, caption_type = 0, None
    for file in files:
        fsys, inner = cfs.resolve(file)
        try:
            with cfs.named(file):
                meta = pq.ParquetFile(fsys.open_input_file(inner)).metadata
        except (OSError, pa.ArrowInvalid) as e:
            raise CorpusError(f"cannot read manifest {file}: {e}") from e
        schema = meta.schema.to_arrow_schema()
        if not arrow_manifest(schema):
            return None
        if parts and "caption" in schema.names and schema.field("caption").type != caption_type:
            raise CorpusError(f"manifest part {file}: caption is {schema.field('caption').type}, "
                              f"the first part's is {caption_type}")
        caption_type = schema.field("caption").type if "caption" in schema.names else None
        groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
        parts.append(Part(file, start, groups))
        start += sum(groups)
    rows = min(start, cfg.limit) if cfg.limit is not None else start
    if rows < cfg.stream_min_rows or not rows:
        return None
    base = cfg.images or cfs.dirname(path)  # as read.manifest_rows: beside the manifest (file or folder)
    return Plan(path, tuple(parts), base, cfg.rows_per_block, rows, cfg.caption)


def read_range(parts: tuple[Part, ...], lo: int, hi: int) -> pa.Table:
    """Manifest rows ``[lo, hi)``: only the row groups that hold them are read."""
    import pyarrow.parquet as pq

    pieces = []
    for part in parts:
        if part.start >= hi or part.start + part.rows <= lo:
            continue
        fsys, inner = cfs.resolve(part.path)
        with cfs.named(part.path):
            file = pq.ParquetFile(fsys.open_input_file(inner))
        names = [c for c in COLUMNS if c in file.schema_arrow.names]
        at, wanted, first = part.start, [], None
        for g, n in enumerate(part.groups):
            if at < hi and at + n > lo:
                wanted.append(g)
                first = at if first is None else first
            at += n
        with cfs.named(part.path):
            table = file.read_row_groups(wanted, columns=names)
        assert first is not None
        table = table.slice(max(lo - first, 0), hi - max(lo, first))
        pieces.append(pa.table({c: table.column(c) if c == "caption" else table.column(c).cast(pa.string())
                                for c in names}))
    if not pieces:
        return pa.table({"image": pa.array([], pa.string())})
    return pa.concat_tables(pieces, promote_options="default")


def shard_table(plan: Plan, shard: int, lo: int, hi: int, duplicates: str) -> pa.Table:
    """Shard ``shard`` (manifest rows ``[lo, hi)``) as the row table (``read.ROW_SCHEMA``), with
    the rows the duplicate pass found under ``duplicates`` skipped."""
    built = manifest_table(read_range(plan.parts, lo, hi), 0, plan.base, plan.step, None, first_row=lo,
                           caption=plan.caption)
    assert built is not None  # plan_manifest() checked every part's schema
    table = built[0]
    folder = cfs.join(duplicates, f"shard-{shard:05d}")
    files = [cfs.join(folder, posixpath.basename(p)) for p in cfs.list_parquet(folder)]
    if not files:
        return table
    repeats = pa.concat_tables([cfs.read_parquet(f) for f in files])
    at = repeats.column("row").to_numpy() - lo
    stage = table.column("skip_stage").to_numpy(zero_copy_only=False).astype(object)
    reason = table.column("skip_reason").to_numpy(zero_copy_only=False).astype(object)
    stage[at] = "read"
    reason[at] = [f"duplicate id (first seen at row {f})" for f in repeats.column("first").to_pylist()]
    table = table.set_column(table.schema.get_field_index("skip_stage"), "skip_stage", pa.array(stage, pa.string()))
    return table.set_column(table.schema.get_field_index("skip_reason"), "skip_reason", pa.array(reason, pa.string()))


def _keys(batch: dict[str, np.ndarray], plan: Plan) -> pa.Table:
    tables = []
    for lo, hi in zip(batch["lo"], batch["hi"], strict=True):
        ids, _ = manifest_ids(read_range(plan.parts, int(lo), int(hi)))
        tables.append(pa.table({"id": ids, "row": pa.array(np.arange(lo, hi, dtype=np.int64))}))
    return pa.concat_tables(tables)


def _repeated_ids(batch: pa.Table) -> pa.Table:
    kept = batch.filter(pc.greater(batch.column("count()"), 1))
    return pa.table({"id": kept.column("id"), "first": kept.column("first")})


def _later_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.not_equal(batch.column("row"), batch.column("first"))).select(["row", "first"])


def _write_by_shard(batch: pa.Table, out: str, step: int) -> pa.Table:
    shard = batch.column("row").to_numpy() // step
    for s in np.unique(shard):
        rows = batch.filter(pa.array(shard == s))
        cfs.write_parquet_atomic(cfs.join(out, f"shard-{int(s):05d}", f"{uuid.uuid4().hex}.parquet"), rows)
    return pa.table({"rows": [batch.num_rows]})


def find_duplicates(plan: Plan, out: str) -> int:
    """Write every manifest row whose id an earlier row has, as ``row``, ``first`` (that earlier
    row), under ``out/shard-NNNNN/``; returns how many. Two shuffles of ``(id, row)`` at most:
    the group-by always, the join only where some id repeats."""
    import ray
    import ray.data
    from ray.data.aggregate import Count, Min

    cfs.remove_tree(out)
    specs = plan.shards()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    partitions = max(-(-plan.rows * KEY_BYTES // PARTITION_BYTES), cpus, 1)

    def keys() -> ray.data.Dataset:
        return ray.data.from_items(specs, override_num_blocks=len(specs)).map_batches(
            _keys, fn_kwargs={"plan": plan}, batch_size=1, num_cpus=READ_CPUS, batch_format="numpy")  # type: ignore[arg-type]

    firsts = keys().groupby("id", num_partitions=partitions).aggregate(
        Count(), Min("row", alias_name="first")).map_batches(
        _repeated_ids, batch_format="pyarrow", batch_size=None).materialize()  # type: ignore[arg-type]
    if not firsts.count():
        return 0
    later = keys().join(firsts, "inner", num_partitions=partitions, on=("id",)).map_batches(
        _later_rows, batch_format="pyarrow", batch_size=None)  # type: ignore[arg-type]
    written = later.map_batches(_write_by_shard, fn_kwargs={"out": out, "step": plan.step},  # type: ignore[arg-type]
                                batch_format="pyarrow", batch_size=None).sum("rows")
    return int(written) if isinstance(written, int | float) else 0


def _digest(plan: Plan, spec: dict[str, int], duplicates: str) -> tuple[int, str]:
    return spec["shard"], shard_digest(shard_table(plan, spec["shard"], spec["lo"], spec["hi"], duplicates))


def _read(batch: dict[str, np.ndarray], plan: Plan, duplicates: str) -> pa.Table:
    return pa.concat_tables([shard_table(plan, int(s), int(lo), int(hi), duplicates)
                             for s, lo, hi in zip(batch["shard"], batch["lo"], batch["hi"], strict=True)])


def read(
    plan: Plan,
    work: str,
    done_shards: Callable[[dict[int, int]], set[int]] | None = None,
    records: str | None = None,
    forget: Callable[[int], None] | None = None,
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """``read.read_corpus`` for a streamed manifest (arguments as there; ``work``: a folder of
    the run for the duplicate rows). Runs the duplicate pass and, with ``records``, the digest
    pass; builds the row dataset."""
    import ray
    import ray.data

    specs = plan.shards()
    duplicates = cfs.join(work, "duplicates")
    info: dict[str, Any] = {"format": "manifest", "caption_lines_utf8_repaired": 0, "streamed": True,
                            "manifest_parts": len(plan.parts),
                            "duplicate_rows": find_duplicates(plan, duplicates)}
    shard_rows = {s["shard"]: s["hi"] - s["lo"] for s in specs}
    if records is not None:
        task = ray.remote(num_cpus=READ_CPUS)(_digest)
        held = ray.put(plan)
        now = dict(ray.get([task.remote(held, spec, duplicates) for spec in specs]))
        changed = record_digests(records, now, plan.step)
        for shard in sorted(changed):
            if forget is not None:
                forget(shard)
        info["changed_shards"] = len(changed)
    done = done_shards(shard_rows) if done_shards is not None else set()
    todo = [s for s in specs if s["shard"] not in done]
    info.update(shard_rows=shard_rows, shards=len(specs), todo_shards=len(todo))
    ds = ray.data.from_items(todo or specs[:1], override_num_blocks=max(1, len(todo))).map_batches(
        _read, fn_kwargs={"plan": plan, "duplicates": duplicates},  # type: ignore[arg-type]
        batch_size=1, num_cpus=READ_CPUS, batch_format="numpy")
    if not todo:
        ds = ds.limit(0)
    # a shard (the resume unit) is large; its Ray blocks are not, so decode and encoders spread over it
    return _fused(ds.repartition(target_num_rows_per_block=READ_BLOCK_ROWS)), info


def _fused(ds: ray.data.Dataset) -> ray.data.Dataset:
    """``ds`` (ending in a repartition) with the repartition's tasks reserving what the read's do.

    Ray Data gives a repartition's tasks a whole CPU, which the encoder actors hold: it would
    wait for ever. With the read's reservation the two fuse into one task. Ray 2.60 offers no
    argument for it; its logical operator's ``ray_remote_args`` is set instead.
    """
    op = getattr(getattr(ds, "_logical_plan", None), "dag", None)
    args = getattr(op, "ray_remote_args", None)
    if not isinstance(args, dict):
        raise RuntimeError("this Ray Data's repartition has no ray_remote_args: streamed manifests need Ray 2.60")
    args["num_cpus"] = READ_CPUS
    return ds
