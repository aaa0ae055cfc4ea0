"""Search rows (``clipscan.stages.search.SEARCH_SCHEMA`` parts) in; per-image discrepancies, the ranked top cases, MMVP pairs and report aggregates out.

Written part by part and run by an executor (``clipscan.pipeline.executor``): in this
process or as Ray tasks, the same functions either way. Nothing sorts the whole corpus:

* ``discrepancies.parquet/`` holds every image's row (``discrepancy.IMAGES_SCHEMA``) in
  the search's order, one part per search part;
* the top ``cases`` images by ``rank_by`` come from a bounded merge of each part's own
  top ``cases``; their global ``rank`` is counted where the rows are (each part counts its
  rows that come first) and summed, so the driver holds ``cases`` rows, never the corpus;
* the plots' points are a seeded sample chosen by a hash of the id, so a row is in it or
  not whatever part it is in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan import fs as cfs
from clipscan.stages import discrepancy as dc

if TYPE_CHECKING:
    from clipscan.pipeline.executor import Executor

# rank_by -> sort keys (pyarrow order); the last key, id, makes the order total.
SORT_KEYS: dict[str, list[tuple[str, str]]] = {
    "overlap": [("overlap", "ascending"), ("gap", "descending"), ("id", "ascending")],
    "jaccard": [("jaccard", "ascending"), ("gap", "descending"), ("id", "ascending")],
    "max_gap": [("max_gap_z", "descending"), ("gap_z", "descending"), ("id", "ascending")],
    "gap": [("gap_z", "descending"), ("id", "ascending")],
}

# Points of the cosine plot at most: a seeded sample of images, all their probe neighbours.
PLOT_POINTS = 200_000


@dataclass
class Figures:
    """Streaming aggregates of the discrepancy rows, for run.json and the report's plots."""

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

    @classmethod
    def of(cls, rows: pa.Table, k: int, fraction: float, seed: int) -> Figures:
        """The aggregates of discrepancy ``rows``; the plot shows the rows ``plot_sample`` keeps."""
        overlap = np.asarray(rows.column("overlap").to_numpy(zero_copy_only=False), dtype=np.float64)
        counts = np.bincount(np.rint(overlap * k).astype(np.int64), minlength=k + 1)[: k + 1]
        shown = rows.filter(pa.array(plot_sample(rows.column("id"), fraction, seed)))
        points = {"px": _flat(shown, "probe_cos"), "py": _flat(shown, "probe_neighbours_reference_cos"),
                  "ox": _flat(shown, "probe_only_probe_cos"), "oy": _flat(shown, "probe_only_reference_cos")}
        return cls(rows.num_rows, k, counts, float(overlap.sum()), points, shown.num_rows)

    @classmethod
    def of_table(cls, discrepancies: pa.Table, seed: int = 0) -> Figures:
        """The aggregates of a whole discrepancy table (the stage sums the same part by part):
        its k from its longest probe list, the plot's sample as ``plot_fraction`` sizes it."""
        k = 0
        if discrepancies.num_rows:
            k = int(pc.max(pc.list_value_length(discrepancies.column("probe_neighbours"))).as_py() or 0)
        return cls.of(discrepancies, k, plot_fraction(discrepancies.num_rows, k), seed)

    def add(self, other: Figures) -> None:
        self.images += other.images
        self.overlap_counts = self.overlap_counts + other.overlap_counts
        self.overlap_sum += other.overlap_sum
        self.sampled_images += other.sampled_images
        self.points = {c: np.concatenate([self.points[c], other.points[c]]) if c in self.points else other.points[c]
                       for c in other.points}


def plot_fraction(n: int, k: int, points: int = PLOT_POINTS) -> float:
    """The share of images whose neighbours the cosine plot shows: all when n * k <= points."""
    return 1.0 if n * max(k, 1) <= points else points / (n * max(k, 1))


def plot_sample(ids: pa.Array | pa.ChunkedArray, fraction: float, seed: int) -> np.ndarray:
    """(m,) bool: the ids in the plot's seeded sample (a hash of seed and id below ``fraction``)."""
    if fraction >= 1.0:
        return np.ones(len(ids), dtype=bool)
    values = np.asarray(ids.to_numpy(zero_copy_only=False) if hasattr(ids, "to_numpy") else ids, dtype=object)
    return dc.uniform(seed, dc.hash_ids(values)) < fraction


def _flat(table: pa.Table, column: str) -> np.ndarray:
    return np.asarray(pc.list_flatten(table.column(column)).to_numpy(zero_copy_only=False), dtype=np.float32)


def best(rows: pa.Table, rank_by: str, m: int) -> pa.Table:
    """The first ``m`` of ``rows`` in ``rank_by`` order (``SORT_KEYS``)."""
    if rank_by not in SORT_KEYS:
        raise ValueError(f"mine: rank_by must be one of {tuple(SORT_KEYS)}, got {rank_by!r}")
    if not rows.num_rows:
        return rows
    return rows.take(pc.sort_indices(rows, sort_keys=SORT_KEYS[rank_by])[:m])


def count_before(rows: pa.Table, keys: pa.Table, rank_by: str) -> np.ndarray:
    """(len(keys),) int64: for each row of ``keys`` (the ``SORT_KEYS`` columns), how many
    of ``rows`` come strictly before it in ``rank_by`` order. Sorting both together puts
    each key after the rows before it; equal keys are one id, hence one row, not counted."""
    sort = SORT_KEYS[rank_by]
    names = [c for c, _ in sort]
    both = pa.concat_tables([
        rows.select(names).append_column("_key", pa.array(np.full(rows.num_rows, -1, np.int64))),
        keys.select(names).cast(rows.select(names).schema).append_column(
            "_key", pa.array(np.arange(keys.num_rows, dtype=np.int64))),
    ])
    order = pc.sort_indices(both, sort_keys=[*sort, ("_key", "descending")]).to_numpy()
    key_of = both.column("_key").to_numpy()[order]
    at = np.flatnonzero(key_of >= 0)  # the keys' places in the joint order
    out = np.empty(keys.num_rows, dtype=np.int64)
    out[key_of[at]] = at - np.arange(len(at))  # rows before each = its place - keys before it
    return out


# ---------------------------------------------------------------------------------------
# The per-part steps (plain functions: an executor runs them here or as Ray tasks)


def part_moments(search_dir: str, name: str) -> np.ndarray:
    """(2, 3) float64 cosine moments (``discrepancy.cosine_moments``) of one search part's
    probe and reference top-k cosines."""
    table = cfs.read_parquet(cfs.join(search_dir, name), columns=["probe_cos", "reference_cos"])
    out = []
    for col in ("probe_cos", "reference_cos"):
        values = _flat(table, col)
        out.append(dc.cosine_moments(values, np.ones(values.shape, dtype=bool)))
    return np.stack(out)


# A discrepancy part's schema metadata: what it was mined from and with (``_stamp``), and
# how many pair candidates its task wrote beside it.
MINED_KEY, PAIRS_KEY = b"clipscan.mined", b"clipscan.pairs"


def mine_part(search_dir: str, name: str, out_path: str, pairs_path: str,
              scales: tuple[tuple[float, float], tuple[float, float]],
              k: int, fraction: float, seed: int, rank_by: str, cases: int) -> dict[str, Any]:
    """One search part -> its discrepancy part at ``out_path`` (``IMAGES_SCHEMA``), its
    pair candidates (written to ``pairs_path`` by the task itself; their count returned),
    its figures and the sort keys (``SORT_KEYS``, id included) of its top ``cases`` rows
    that have a probe-only neighbour (``rank_by`` order).

    A part an earlier, killed run wrote from the same search part with the same settings
    (its stamp in the part's metadata, written after the pair candidates) is read back,
    not mined again (``reused``)."""
    stamp = _stamp(search_dir, name, scales, k, fraction, seed)
    rows, pairs = _kept_part(out_path, stamp)
    if rows is not None and pairs and not cfs.exists(pairs_path):
        rows = None  # its pair candidates are gone (the stage ended after writing the pairs): mined again
    reused = rows is not None
    if rows is None:
        search = cfs.read_parquet(cfs.join(search_dir, name))
        rows = dc.add_calibrated_gaps(search.select([f.name for f in dc.IMAGES_SCHEMA if f.name not in dc.CALIBRATED]),
                                      *scales).select(dc.IMAGES_SCHEMA.names).cast(dc.IMAGES_SCHEMA)
        pairs = _write_pairs_part(pair_rows(search), pairs_path)
        del search
        cfs.write_parquet_atomic(out_path, rows.replace_schema_metadata({MINED_KEY: stamp,
                                                                          PAIRS_KEY: str(pairs).encode()}))
    has_only = pc.greater(pc.list_value_length(rows.column("probe_only")), 0)
    keys = rows.filter(has_only).select([c for c, _ in SORT_KEYS[rank_by]])  # the whole rows are read back for the winners
    return {"figures": Figures.of(rows, k, fraction, seed), "top": best(keys, rank_by, cases), "pairs": pairs,
            "reused": reused}


def _stamp(search_dir: str, name: str, scales: tuple[tuple[float, float], tuple[float, float]], k: int,
           fraction: float, seed: int) -> bytes:
    """What a discrepancy part depends on: its search part (name, size, the digest of its
    query ids) and the mining settings."""
    import hashlib
    import json

    import pyarrow.parquet as pq

    from clipscan.stages.run_search import IDS_KEY

    path = cfs.join(search_dir, name)
    fsys, inner = cfs.resolve(path)
    with cfs.named(path), fsys.open_input_file(inner) as f:
        size = f.size()
        ids = (pq.read_schema(f).metadata or {}).get(IDS_KEY, b"").hex()
    facts = [name, size, ids, [list(s) for s in scales], k, fraction, seed]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest().encode()


def _kept_part(path: str, stamp: bytes) -> tuple[pa.Table | None, int]:
    """A discrepancy part written with ``stamp`` and its pair count; (None, 0) otherwise."""
    import pyarrow.parquet as pq

    if not cfs.exists(path):
        return None, 0
    fsys, inner = cfs.resolve(path)
    with cfs.named(path), fsys.open_input_file(inner) as f:
        meta = pq.read_schema(f).metadata or {}
    if meta.get(MINED_KEY) != stamp:
        return None, 0
    return cfs.read_parquet(path).replace_schema_metadata(None).cast(dc.IMAGES_SCHEMA), int(meta.get(PAIRS_KEY, b"0"))


def _write_pairs_part(pairs: pa.Table, path: str) -> int:
    """A part's pair candidates written where the task runs (none: no file); their count."""
    if pairs.num_rows:
        cfs.write_parquet_atomic(path, pairs)
    return pairs.num_rows


def part_recall(search_dir: str, name: str) -> dict[str, tuple[float, int]]:
    """Per model, the sum and the count of one search part's recall@k values (the sampled rows)."""
    from clipscan.stages.search import RECALL_COLUMNS

    table = cfs.read_parquet(cfs.join(search_dir, name), columns=list(RECALL_COLUMNS))
    return {col.removeprefix("_recall_"): (float(pc.sum(table.column(col)).as_py() or 0.0),
                                           table.num_rows - table.column(col).null_count) for col in RECALL_COLUMNS}


def recall(search_dir: str, executor: Executor) -> dict[str, float]:
    """Mean recall@k of the sampled rows under each model (approximate index only)."""
    names = [p.rsplit("/", 1)[-1] for p in cfs.list_parquet(search_dir)]
    total = {"probe": [0.0, 0], "reference": [0.0, 0]}
    for part in executor.map(part_recall, [(search_dir, n) for n in names]):
        for model, (s, c) in part.items():
            total[model][0] += s
            total[model][1] += c
    return {m: (s / c if c else 1.0) for m, (s, c) in total.items()}


def part_ranks(out_dir: str, name: str, keys: pa.Table, rank_by: str) -> np.ndarray:
    """(len(keys),) int64 rows of one discrepancy part that come before each key."""
    names = [c for c, _ in SORT_KEYS[rank_by]]
    return count_before(cfs.read_parquet(cfs.join(out_dir, name), columns=names), keys, rank_by)


def part_rows(path: str, name: str, wanted: pa.Array, columns: list[str]) -> pa.Table:
    """The rows of one part whose ``id`` is in ``wanted``, ``columns`` only."""
    table = cfs.read_parquet(cfs.join(path, name), columns=columns)
    return table.filter(pc.is_in(table.column("id"), value_set=wanted))


# ---------------------------------------------------------------------------------------
# The stage


@dataclass
class Mined:
    """What the mine stage leaves for the later stages: small tables, never the corpus."""

    figures: Figures
    candidates: pa.Table  # the top ``cases`` rows with a probe-only neighbour, rank order, ``DISCREPANCY_SCHEMA``
    pairs: int  # MMVP pairs written
    reused: int = 0  # discrepancy parts a killed run had written, kept


def mine(search_dir: str, out_dir: str, pairs_dir: str, rank_by: str, k: int, executor: Executor,
         seed: int = 0, cases: int = 100) -> Mined:
    """The search parts under ``search_dir`` -> ``out_dir`` (discrepancy parts numbered in
    the search parts' name order), ``pairs_dir`` (``PAIRS_SCHEMA`` parts) and the ranked top ``cases``.

    Four passes over the parts: the cosine moments (what ``gap_z`` standardises by), the
    rows (written, with each part's figures and the keys of its top rows), the ranks of
    the global top rows, and their whole rows (read back by id). A rerun after a kill
    keeps the discrepancy parts (and their pair candidates) it finds from the same search
    parts and settings (``Mined.reused``).
    """
    if rank_by not in SORT_KEYS:
        raise ValueError(f"mine: rank_by must be one of {tuple(SORT_KEYS)}, got {rank_by!r}")
    names = [p.rsplit("/", 1)[-1] for p in cfs.list_parquet(search_dir)]
    if not names:
        raise FileNotFoundError(f"mine: no parquet parts under {search_dir}")
    total = np.zeros((2, 3), dtype=np.float64)
    for moments in executor.map(part_moments, [(search_dir, n) for n in names]):
        total += moments
    scales = dc.scale_of(total[0]), dc.scale_of(total[1])
    outs = [f"part-{i:05d}.parquet" for i in range(len(names))]  # the search's order, numbered
    candidates_dir = cfs.join(pairs_dir, "_candidates")
    _keep_only(out_dir, outs)
    _keep_only(candidates_dir, outs)
    _keep_only(pairs_dir, [])  # the pairs are written again from the candidates
    rows = _rows_in(search_dir, names)
    fraction = plot_fraction(rows, k)
    figures = Figures(k=k, overlap_counts=np.zeros(k + 1, np.int64),
                      points={c: np.zeros(0, np.float32) for c in ("px", "py", "ox", "oy")})
    top = dc.IMAGES_SCHEMA.empty_table().select([c for c, _ in SORT_KEYS[rank_by]])
    args = [(search_dir, n, cfs.join(out_dir, o), cfs.join(candidates_dir, o), scales, k, fraction, seed, rank_by,
             cases) for n, o in zip(names, outs, strict=True)]
    reused = 0
    for part in executor.map(mine_part, args):
        figures.add(part["figures"])
        top = best(pa.concat_tables([top, part["top"]]), rank_by, cases)
        reused += part["reused"]
    ranks = np.ones(top.num_rows, dtype=np.int64)
    candidates = dc.DISCREPANCY_SCHEMA.empty_table()
    if top.num_rows:
        for before in executor.map(part_ranks, [(out_dir, n, top, rank_by) for n in outs]):
            ranks += before
        rows = lookup_rows(out_dir, set(top.column("id").to_pylist()), dc.IMAGES_SCHEMA.names, executor)
        at = {i: r for r, i in enumerate(rows.column("id").to_pylist())}
        rows = rows.take(pa.array([at[i] for i in top.column("id").to_pylist()]))  # rank order
        candidates = rows.add_column(0, "rank", pa.array(ranks.astype(np.int32))).cast(dc.DISCREPANCY_SCHEMA)
    pair_count = write_pairs(candidates_dir, pairs_dir, executor)
    cfs.remove_tree(candidates_dir)
    return Mined(figures, candidates, pair_count, reused)


def _keep_only(path: str, names: list[str]) -> None:
    """Remove the ``.parquet`` files directly under ``path`` not named in ``names``; make ``path``."""
    keep = set(names)
    for listed in cfs.list_parquet(path):  # paths within their file system: named again under ``path``
        name = listed.rsplit("/", 1)[-1]
        if name not in keep:
            fsys, inner = cfs.resolve(cfs.join(path, name))
            fsys.delete_file(inner)
    cfs.makedirs(path)


def _rows_in(path: str, names: list[str]) -> int:
    """Rows of the parts, from their footers."""
    import pyarrow.parquet as pq

    total = 0
    for name in names:
        fsys, inner = cfs.resolve(cfs.join(path, name))
        with fsys.open_input_file(inner) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def ranks_of(out_dir: str, wanted: set[str], rank_by: str, executor: Executor) -> dict[str, int]:
    """id -> global rank of the ``wanted`` ids among the discrepancy parts: their rows are
    found by id, then every part counts its rows that come before them."""
    keys = lookup_rows(out_dir, wanted, [c for c, _ in SORT_KEYS[rank_by]], executor)
    if not keys.num_rows:
        return {}
    names = [p.rsplit("/", 1)[-1] for p in cfs.list_parquet(out_dir)]
    ranks = np.ones(keys.num_rows, dtype=np.int64)
    for before in executor.map(part_ranks, [(out_dir, n, keys, rank_by) for n in names]):
        ranks += before
    return dict(zip(keys.column("id").to_pylist(), ranks.tolist(), strict=True))


def lookup_rows(path: str, wanted: set[str], columns: list[str], executor: Executor) -> pa.Table:
    """The rows of the parts under ``path`` whose ``id`` is in ``wanted`` (``columns``, each a
    string where none is found); only they reach the caller."""
    empty = pa.schema([(c, pa.string()) for c in columns]).empty_table()
    if not wanted:
        return empty
    names = [p.rsplit("/", 1)[-1] for p in cfs.list_parquet(path)]
    value_set = pa.array(sorted(wanted), pa.string())
    found = [t for t in executor.map(part_rows, [(path, n, value_set, columns) for n in names]) if t.num_rows]
    return pa.concat_tables(found) if found else empty


def corpus_rows(run_dir: str, wanted: set[str], executor: Executor) -> pa.Table:
    """``id``, ``uri``, ``caption`` of the ``wanted`` ids, read from the run's ``corpus/`` parts."""
    schema = pa.schema([("id", pa.string()), ("uri", pa.string()), ("caption", pa.string())])
    from clipscan.pipeline.parts import RunParts

    return lookup_rows(RunParts(run_dir).corpus(), wanted, schema.names, executor).cast(schema)


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


# Rows per partition of the pairs' group-by and sort on Ray: one write task each.
SORT_ROWS = 100_000

PAIR_ORDER = [("direction", "ascending"), ("spread", "descending"), ("id_a", "ascending"), ("id_b", "ascending")]


def write_pairs(candidates_dir: str, out_dir: str, executor: Executor) -> int:
    """The pair candidates' parts -> ``out_dir/part-NNNNN.parquet`` (``PAIRS_SCHEMA``), one row
    per (direction, pair), ordered as ``discrepancy.pairs``: direction, then |probe cos -
    reference cos| descending, then id_a, id_b. Returns the pair count.

    Both ends of a pair compute the same cosines (the same float64 products, summed in the
    same order), so a pair's rows differ in nothing but where they were found. On Ray the
    group-by and the sort run in Ray Data (pairs are few beside the images: the thresholds
    keep near-duplicates only), in this process in Arrow.
    """
    files = cfs.list_parquet(candidates_dir)
    if not files:
        cfs.write_parquet_atomic(cfs.join(out_dir, "part-00000.parquet"), dc.PAIRS_SCHEMA.empty_table())
        return 0
    if executor.name == "local":
        found = pa.concat_tables([cfs.read_parquet(cfs.join(candidates_dir, f.rsplit("/", 1)[-1])) for f in files])
        unique = found.group_by(["direction", "id_a", "id_b"], use_threads=False).aggregate(
            [("probe_cos", "max"), ("reference_cos", "max")])
        ordered = _with_spread(unique)
        ordered = ordered.take(pc.sort_indices(ordered, sort_keys=PAIR_ORDER))
        table = ordered.select(dc.PAIRS_SCHEMA.names).cast(dc.PAIRS_SCHEMA)
        cfs.write_parquet_atomic(cfs.join(out_dir, "part-00000.parquet"), table)
        return table.num_rows
    return _write_pairs_ray(candidates_dir, files, out_dir)


def _write_pairs_ray(candidates_dir: str, files: list[str], out_dir: str) -> int:
    import ray
    import ray.data
    from ray.data.aggregate import Max

    fsys, _ = cfs.resolve(candidates_dir)
    found = ray.data.read_parquet(files, filesystem=fsys, override_num_blocks=len(files))
    rows = found.count()
    ctx = found.context
    before = ctx.default_hash_shuffle_parallelism
    partitions = ctx.default_hash_shuffle_parallelism = max(1, -(-rows // SORT_ROWS))
    try:
        unique = found.groupby(["direction", "id_a", "id_b"], num_partitions=partitions).aggregate(
            Max("probe_cos"), Max("reference_cos"))
        ordered = unique.map_batches(_with_spread, batch_format="pyarrow").sort(
            [c for c, _ in PAIR_ORDER], descending=[o == "descending" for _, o in PAIR_ORDER])
        total, part = 0, 0
        for bundle in ordered.iter_internal_ref_bundles():
            for entry in bundle.blocks:
                table = ray.get(entry.ref)
                table = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table, preserve_index=False)
                if not table.num_rows:
                    continue
                table = table.select(dc.PAIRS_SCHEMA.names).cast(dc.PAIRS_SCHEMA)
                cfs.write_parquet_atomic(cfs.join(out_dir, f"part-{part:05d}.parquet"), table)
                total += table.num_rows
                part += 1
    finally:
        ctx.default_hash_shuffle_parallelism = before
    if part == 0:
        cfs.write_parquet_atomic(cfs.join(out_dir, "part-00000.parquet"), dc.PAIRS_SCHEMA.empty_table())
    return total


def _with_spread(batch: pa.Table) -> pa.Table:
    p = batch.column("probe_cos_max" if "probe_cos_max" in batch.column_names else "max(probe_cos)").cast(pa.float32())
    r = batch.column("reference_cos_max" if "reference_cos_max" in batch.column_names
                     else "max(reference_cos)").cast(pa.float32())
    spread = np.abs(p.to_numpy().astype(np.float64) - r.to_numpy().astype(np.float64))
    return pa.table({"id_a": batch.column("id_a"), "id_b": batch.column("id_b"), "probe_cos": p,
                     "reference_cos": r, "direction": batch.column("direction"), "spread": spread})
