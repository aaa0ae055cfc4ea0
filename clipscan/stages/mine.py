"""Search rows (``clipscan.stages.search.SEARCH_SCHEMA`` parts) in; ranked discrepancies, MMVP pairs, failure cases and report aggregates out.

Nothing here holds a whole table: the global rank comes from Ray Data's distributed sort
(ties by id) and is numbered by tasks that write the sorted blocks as parts, each
returning a few figures (overlap counts, a seeded sample of cosines, its first candidate
cases); pairs are filtered per row by the search, de-duplicated by a distributed group-by
and sorted; captions are looked up only for the top ``mining.cases`` images.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan import fs as cfs
from clipscan.stages import discrepancy as dc

if TYPE_CHECKING:
    import ray.data

# rank_by -> sort keys and directions; the last key, id, makes the order total.
SORT_KEYS: dict[str, tuple[list[str], list[bool]]] = {
    "overlap": (["overlap", "gap", "id"], [False, True, False]),
    "jaccard": (["jaccard", "gap", "id"], [False, True, False]),
    "max_gap": (["max_gap_z", "gap_z", "id"], [True, True, False]),
    "gap": (["gap_z", "id"], [True, False]),
}

# Points of the cosine plot at most: a seeded sample of images, all their probe neighbours.
PLOT_POINTS = 200_000


@dataclass
class Figures:
    """Streaming aggregates of the ranked table, for run.json and the report's plots."""

    images: int = 0
    k: int = 0
    overlap_counts: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))  # (k + 1,) images with j shared neighbours
    overlap_sum: float = 0.0
    # the sampled images' probe neighbours: probe cosine, reference cosine; and the probe-only ones
    points: dict[str, np.ndarray] = field(default_factory=dict)
    sampled_images: int = 0

    @property
    def mean_overlap(self) -> float:
        return self.overlap_sum / self.images if self.images else 0.0


# Rows per partition of the distributed sorts (and the group-by): one write task each.
SORT_ROWS = 100_000


@contextmanager
def shuffle_partitions(ds: ray.data.Dataset, rows: int) -> Iterator[int]:
    """Sorts and group-bys of ``ds`` (and what derives from it) run ``ceil(rows / SORT_ROWS)``
    partitions while inside.

    Ray Data sizes a sort from its input's estimated block count, and after a map that
    estimate is unknown, so it falls back to the dataset's ``default_hash_shuffle_parallelism``
    (200): 200 partitions, each a task, for a few hundred rows. A dataset shares its
    context with those derived from it; the setting is restored on leaving.
    """
    ctx = ds.context
    before = ctx.default_hash_shuffle_parallelism
    ctx.default_hash_shuffle_parallelism = max(1, -(-rows // SORT_ROWS))
    try:
        yield ctx.default_hash_shuffle_parallelism
    finally:
        ctx.default_hash_shuffle_parallelism = before


def read_parts(path: str) -> ray.data.Dataset:
    """The ``part-*.parquet`` files under ``path`` (local or object storage) as a Dataset of
    one block per file. Ray's default splits a read into 200 blocks whatever its size, and
    a sort or group-by after it then runs 200 partitions: seconds of tasks for a few rows."""
    import ray.data

    files = cfs.list_parquet(path)
    if not files:
        raise FileNotFoundError(f"mine: no parquet parts under {path}")
    fsys, _ = cfs.resolve(path)
    return ray.data.read_parquet(files, filesystem=fsys, override_num_blocks=len(files))


def sample_ranks(n: int, k: int, seed: int, points: int = PLOT_POINTS) -> np.ndarray:
    """(m,) int64 sorted ranks (1-based) of the images whose neighbours the cosine plot shows:
    all of them when n * k <= points, else a seeded sample of points // k."""
    m = n if n * max(k, 1) <= points else max(1, points // max(k, 1))
    return np.sort(np.random.default_rng(seed).choice(n, m, replace=False)) + 1


def cosine_scales(rows: ray.data.Dataset) -> tuple[tuple[float, float], tuple[float, float]]:
    """Each model's (mean, std) of its top-k neighbour cosines over all search rows
    (``discrepancy.scale_of``), from per-block moments: what ``gap_z`` standardises by."""
    sums = rows.select_columns(["probe_cos", "reference_cos"]).map_batches(_moments, batch_format="pyarrow")
    total = np.zeros((2, 3), dtype=np.float64)
    for batch in sums.iter_batches(batch_format="numpy", batch_size=None):
        total += np.asarray(batch["moments"], dtype=np.float64).reshape(-1, 2, 3).sum(axis=0)
    return dc.scale_of(total[0]), dc.scale_of(total[1])


def _moments(batch: pa.Table) -> dict[str, np.ndarray]:
    out = []
    for col in ("probe_cos", "reference_cos"):
        values = np.asarray(pc.list_flatten(batch.column(col)).to_numpy(zero_copy_only=False), dtype=np.float32)
        out.append(dc.cosine_moments(values, np.ones(values.shape, dtype=bool)))
    return {"moments": np.stack(out)[None]}


def write_ranked(
    rows: ray.data.Dataset, out_dir: str, rank_by: str, k: int, seed: int = 0, cases: int = 100,
    scales: tuple[tuple[float, float], tuple[float, float]] | None = None,
) -> tuple[Figures, pa.Table]:
    """Sort the search rows by ``rank_by`` (ties by id) and write them with their rank as
    ``out_dir/part-NNNNN.parquet`` (``DISCREPANCY_SCHEMA``).

    scales: the probe's and the reference's cosine scale for ``gap_z`` (``cosine_scales``;
    computed here when None). Returns the aggregates and the first ``cases`` rows, in rank
    order, that have a probe-only neighbour (whole discrepancy rows: the candidates for
    ``cases`` and the attribute contrast).
    """
    import ray

    if rank_by not in SORT_KEYS:
        raise ValueError(f"mine: rank_by must be one of {tuple(SORT_KEYS)}, got {rank_by!r}")
    keys, descending = SORT_KEYS[rank_by]
    n = rows.count()
    sample = sample_ranks(n, k, seed)
    probe_scale, reference_scale = scales if scales is not None else cosine_scales(rows)
    cfs.remove_tree(out_dir)
    cfs.makedirs(out_dir)
    ranked = rows.select_columns([f.name for f in dc.DISCREPANCY_SCHEMA if f.name not in ("rank", "gap_z", "max_gap_z")])
    calibrate: Any = dc.add_calibrated_gaps
    ranked = ranked.map_batches(calibrate, batch_format="pyarrow",
                                fn_kwargs={"probe_scale": probe_scale, "reference_scale": reference_scale})
    task = ray.remote(num_cpus=0.5)(_write_ranked_part)
    figures = Figures(images=0, k=k, overlap_counts=np.zeros(k + 1, np.int64))
    points: dict[str, list[np.ndarray]] = {c: [] for c in ("px", "py", "ox", "oy")}
    top: list[pa.Table] = []
    have = 0

    def take(result: dict[str, Any]) -> None:
        nonlocal have
        figures.images += result["rows"]
        figures.overlap_counts += result["overlap_counts"]
        figures.overlap_sum += result["overlap_sum"]
        figures.sampled_images += result["sampled"]
        for c in points:
            points[c].append(result[c])
        if have < cases and result["cases"].num_rows:
            top.append(result["cases"].slice(0, cases - have))
            have += top[-1].num_rows

    offset, part, pending = 0, 0, []
    with shuffle_partitions(ranked, n):
        for ref, start, end in _sorted_blocks(ranked.sort(keys, descending=descending)):
            path = cfs.join(out_dir, f"part-{part:05d}.parquet")
            pending.append(task.remote(ref, start, end, offset, path, k, sample, cases))
            offset += end - start
            part += 1
            while len(pending) > 8:  # bounded in flight; results taken in rank order
                take(ray.get(pending.pop(0)))
    for ref in pending:
        take(ray.get(ref))
    if offset != n:
        raise RuntimeError(f"mine: wrote {offset} ranked rows of {n}")
    if part == 0:
        cfs.write_parquet_atomic(cfs.join(out_dir, "part-00000.parquet"), dc.DISCREPANCY_SCHEMA.empty_table())
    figures.points = {c: np.concatenate(v) if v else np.zeros(0, np.float32) for c, v in points.items()}
    candidates = pa.concat_tables(top) if top else dc.DISCREPANCY_SCHEMA.empty_table()
    return figures, candidates


def _sorted_blocks(ds: ray.data.Dataset) -> Iterator[tuple[Any, int, int]]:
    """(block ref, first row, end row) of the non-empty blocks of a sorted Dataset, in order."""
    import ray

    for bundle in ds.iter_internal_ref_bundles():
        for entry, piece in zip(bundle.blocks, bundle.slices, strict=True):
            start, end = (0, entry.metadata.num_rows) if piece is None else (piece.start_offset, piece.end_offset)
            if end is None:
                end = ray.get(ray.remote(_num_rows).remote(entry.ref))
            if end > start:
                yield entry.ref, start, end


def _num_rows(block: Any) -> int:
    return int(_arrow(block).num_rows)


def _arrow(block: Any) -> pa.Table:
    """A Ray Data block as a pyarrow Table (blocks are Arrow here; pandas ones are converted)."""
    return block if isinstance(block, pa.Table) else pa.Table.from_pandas(block, preserve_index=False)


def _write_ranked_part(
    block: pa.Table, start: int, end: int, offset: int, path: str, k: int, sample: np.ndarray, cases: int,
) -> dict[str, Any]:
    table = _arrow(block).slice(start, end - start)
    rank = np.arange(offset + 1, offset + 1 + table.num_rows, dtype=np.int32)
    table = table.add_column(0, "rank", pa.array(rank)).select(dc.DISCREPANCY_SCHEMA.names).cast(dc.DISCREPANCY_SCHEMA)
    cfs.write_parquet_atomic(path, table)
    overlap = table.column("overlap").to_numpy().astype(np.float64)
    shown = table.filter(pa.array(np.isin(rank, sample)))
    has_only = pc.greater(pc.list_value_length(table.column("probe_only")), 0)
    return {
        "rows": table.num_rows,
        "overlap_counts": np.bincount(np.rint(overlap * k).astype(np.int64), minlength=k + 1)[: k + 1],
        "overlap_sum": float(overlap.sum()),
        "sampled": shown.num_rows,
        "px": _flat(shown, "probe_cos"), "py": _flat(shown, "probe_neighbours_reference_cos"),
        "ox": _flat(shown, "probe_only_probe_cos"), "oy": _flat(shown, "probe_only_reference_cos"),
        "cases": table.filter(has_only).slice(0, cases),
    }


def _flat(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False), dtype=np.float32)


# ---------------------------------------------------------------------------------------
# Pairs


def pair_rows(batch: pa.Table) -> pa.Table:
    """Search rows' pair candidates (``id`` and the ``_pair_*`` lists) -> one ``PAIRS_SCHEMA``
    row per candidate, id_a < id_b (a pair found from both ends appears twice)."""
    lengths = pc.list_value_length(batch.column("_pair_with")).to_numpy(zero_copy_only=False)
    own = np.repeat(np.asarray(batch.column("id").to_pylist(), dtype=object), lengths)
    other = np.asarray(pc.list_flatten(batch.column("_pair_with")).to_pylist(), dtype=object)
    first = own <= other if len(own) else np.zeros(0, bool)
    return pa.table(
        {
            "id_a": pa.array(np.where(first, own, other), type=pa.string()),
            "id_b": pa.array(np.where(first, other, own), type=pa.string()),
            "probe_cos": pc.list_flatten(batch.column("_pair_probe_cos")),
            "reference_cos": pc.list_flatten(batch.column("_pair_reference_cos")),
            "direction": pc.list_flatten(batch.column("_pair_direction")),
        },
        schema=dc.PAIRS_SCHEMA,
    )


def write_pairs(rows: ray.data.Dataset, out_dir: str) -> int:
    """The MMVP pairs of the search rows as ``out_dir/part-NNNNN.parquet`` (``PAIRS_SCHEMA``),
    one row per (direction, pair), ordered as ``discrepancy.pairs``: direction, then
    |probe cos - reference cos| descending, then id_a, id_b. Returns the pair count."""
    import ray
    from ray.data.aggregate import Max

    cfs.remove_tree(out_dir)
    cfs.makedirs(out_dir)
    found = rows.select_columns(["id", "_pair_with", "_pair_probe_cos", "_pair_reference_cos", "_pair_direction"])
    found = found.map_batches(pair_rows, batch_format="pyarrow").materialize()
    if found.count() == 0:
        cfs.write_parquet_atomic(cfs.join(out_dir, "part-00000.parquet"), dc.PAIRS_SCHEMA.empty_table())
        return 0
    # Both ends of a pair compute the same cosines (the same float64 products, summed in
    # the same order), so a group holds one value of each.
    task = ray.remote(num_cpus=0.5)(_write_pair_part)
    part, total, pending = 0, 0, []
    with shuffle_partitions(found, found.count()) as partitions:
        unique = found.groupby(["direction", "id_a", "id_b"], num_partitions=partitions).aggregate(
            Max("probe_cos"), Max("reference_cos"))
        ordered = unique.map_batches(_with_spread, batch_format="pyarrow").sort(
            ["direction", "spread", "id_a", "id_b"], descending=[False, True, False, False]
        )
        for ref, start, end in _sorted_blocks(ordered):
            pending.append(task.remote(ref, start, end, cfs.join(out_dir, f"part-{part:05d}.parquet")))
            part += 1
            while len(pending) > 8:  # bounded in flight
                total += ray.get(pending.pop(0))
    return total + sum(ray.get(pending))


def _with_spread(batch: pa.Table) -> pa.Table:
    p = batch.column("max(probe_cos)").cast(pa.float32())
    r = batch.column("max(reference_cos)").cast(pa.float32())
    spread = np.abs(p.to_numpy().astype(np.float64) - r.to_numpy().astype(np.float64))
    return pa.table({"id_a": batch.column("id_a"), "id_b": batch.column("id_b"), "probe_cos": p,
                     "reference_cos": r, "direction": batch.column("direction"), "spread": spread})


def _write_pair_part(block: pa.Table, start: int, end: int, path: str) -> int:
    table = _arrow(block).slice(start, end - start).select(dc.PAIRS_SCHEMA.names).cast(dc.PAIRS_SCHEMA)
    cfs.write_parquet_atomic(path, table)
    return table.num_rows


# ---------------------------------------------------------------------------------------
# Recall, captions


def recall(rows: ray.data.Dataset) -> dict[str, float]:
    """Mean recall@k of the sampled rows under each model (approximate index only)."""
    from clipscan.stages.search import RECALL_COLUMNS

    sums = rows.select_columns(list(RECALL_COLUMNS)).map_batches(_recall_sums, batch_format="pyarrow")
    total = {"probe": [0.0, 0], "reference": [0.0, 0]}
    for batch in sums.iter_batches(batch_format="pyarrow", batch_size=None):
        assert isinstance(batch, pa.Table)
        for model in total:
            total[model][0] += float(pc.sum(batch.column(f"{model}_sum")).as_py() or 0.0)
            total[model][1] += int(pc.sum(batch.column(f"{model}_n")).as_py() or 0)
    return {m: (s / c if c else 1.0) for m, (s, c) in total.items()}


def _recall_sums(batch: pa.Table) -> pa.Table:
    out = {}
    for model in ("probe", "reference"):
        col = batch.column(f"_recall_{model}")
        out[f"{model}_sum"] = [float(pc.sum(col).as_py() or 0.0)]
        out[f"{model}_n"] = [len(col) - col.null_count]
    return pa.table(out)


def corpus_rows(corpus: ray.data.Dataset, wanted: set[str]) -> pa.Table:
    """``id``, ``uri``, ``caption`` of the ``wanted`` ids, filtered in the stream (only they
    reach the driver)."""
    schema = pa.schema([("id", pa.string()), ("uri", pa.string()), ("caption", pa.string())])
    return filter_ids(corpus, wanted, ["id", "uri", "caption"]).cast(schema)


def filter_ids(ds: ray.data.Dataset, wanted: set[str], columns: list[str]) -> pa.Table:
    """The rows of ``ds`` whose ``id`` is in ``wanted``, ``columns`` only, filtered in the
    stream (only they reach the driver). None found: an empty table, every column a string."""
    empty = pa.schema([(c, pa.string()) for c in columns]).empty_table()
    if not wanted:
        return empty
    value_set = pa.array(sorted(wanted), type=pa.string())

    def keep(batch: pa.Table) -> pa.Table:
        batch = batch.select(columns)
        return batch.filter(pc.is_in(batch.column("id"), value_set=value_set))

    found = ds.select_columns(columns).map_batches(keep, batch_format="pyarrow")
    tables = [b for b in found.iter_batches(batch_format="pyarrow", batch_size=None)
              if isinstance(b, pa.Table) and b.num_rows]
    return pa.concat_tables(tables) if tables else empty


def ranks_of(ranked: ray.data.Dataset, wanted: set[str]) -> dict[str, int]:
    """id -> rank of the ``wanted`` ids in the ranked discrepancy parts (filtered in the stream)."""
    if not wanted:
        return {}
    table = filter_ids(ranked, wanted, ["id", "rank"])
    return dict(zip(table.column("id").to_pylist(), table.column("rank").to_pylist(), strict=True))
