"""Probe and reference top-k neighbour lists in; per-image discrepancies, MMVP-style pairs and failure cases out.

DAF (section 3.1 of the paper): an image whose nearest neighbours under the probe model
(CLIP) differ from its nearest neighbours under the reference model (DINOv2) shows where
the probe encodes different things alike. ``score`` scores a block of images (overlap@k,
Jaccard, the probe-only neighbours with their reference cosine and rank) and
``row_columns`` writes them as ``DISCREPANCY_SCHEMA`` columns; the search stage
(``stages.search``) calls both per query block and the mine stage (``stages.mine``) ranks
the rows. ``cases`` picks the top failure cases and attaches the captions in the order of
the paper's prompt (Figure 2: the image's own caption first, then its probe-only
neighbours' captions).

Everything here is plain numpy and pyarrow over one block of rows: m * k values, never
an n x n matrix. Neighbour lists follow ``clipscan.stages.index``: row indices, best
first, self excluded, missing entries I = -1 (an approximate index that found fewer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan.columns import require

RankBy = Literal["overlap", "jaccard", "gap", "max_gap"]
RANK_BY: tuple[str, ...] = ("overlap", "jaccard", "gap", "max_gap")

_FLOATS = pa.list_(pa.float32())
_STRINGS = pa.list_(pa.string())

DISCREPANCY_SCHEMA = pa.schema(
    [
        ("rank", pa.int32()),  # 1 = most discrepant
        ("id", pa.string()),
        ("overlap", pa.float32()),  # |P & R| / k
        ("jaccard", pa.float32()),  # |P & R| / |P | R|
        ("probe_neighbours", _STRINGS),  # probe top-k, best first
        ("probe_cos", _FLOATS),  # their probe cosine
        ("probe_neighbours_reference_cos", _FLOATS),  # their reference cosine
        ("reference_neighbours", _STRINGS),  # reference top-k, best first
        ("reference_cos", _FLOATS),  # their reference cosine
        ("reference_neighbours_probe_cos", _FLOATS),  # their probe cosine
        ("probe_only", _STRINGS),  # probe top-k not in the reference top-k, probe order
        ("probe_only_probe_cos", _FLOATS),
        ("probe_only_reference_cos", _FLOATS),
        ("probe_only_reference_rank", pa.list_(pa.int32())),  # 1-based; null beyond depth
        ("reference_only", _STRINGS),  # reference top-k not in the probe top-k, reference order
        ("reference_only_probe_cos", _FLOATS),
        ("reference_only_reference_cos", _FLOATS),
        ("gap", pa.float32()),  # mean of probe cos - reference cos over probe_only; 0 if none
        ("max_gap", pa.float32()),  # largest probe cos - reference cos over probe_only; 0 if none
        ("gap_z", pa.float32()),  # gap in standardised cosines (each model's own top-k scale); what rank_by gap ranks
        ("max_gap_z", pa.float32()),  # max_gap in standardised cosines; what rank_by max_gap ranks
    ]
)

# One row per image as ``discrepancies.parquet`` holds it, in the search's order: every
# field but the rank, which only the ranked top cases carry.
IMAGES_SCHEMA = pa.schema([f for f in DISCREPANCY_SCHEMA if f.name != "rank"])

# Fields that need the whole corpus's cosine scales: added once the search is done.
CALIBRATED = ("gap_z", "max_gap_z")

PAIRS_SCHEMA = pa.schema(
    [
        ("id_a", pa.string()),  # id_a < id_b
        ("id_b", pa.string()),
        ("probe_cos", pa.float32()),
        ("reference_cos", pa.float32()),
        ("direction", pa.string()),  # probe_close | reference_close
    ]
)

CASES_SCHEMA = pa.schema(
    [
        ("rank", pa.int32()),
        ("id", pa.string()),
        ("uri", pa.string()),
        ("caption", pa.string()),
        ("overlap", pa.float32()),
        ("gap", pa.float32()),
        ("neighbour_ids", _STRINGS),  # the probe-only neighbours, probe order
        ("neighbour_uris", _STRINGS),
        ("neighbour_captions", _STRINGS),
        ("neighbour_probe_cos", _FLOATS),
        ("neighbour_reference_cos", _FLOATS),
        ("neighbour_reference_rank", pa.list_(pa.int32())),
        ("texts", _STRINGS),  # own caption, then the neighbours' captions (the prompt's order)
    ]
)

# Elements of the (rows, k, depth) membership test and of the gathered (pairs, d) rows
# per step: bounds the temporaries whatever n is.
_BLOCK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class Scores:
    """Per-image discrepancy arrays for m images (the fields of ``DISCREPANCY_SCHEMA`` but
    rank and ids); (m, k) arrays are row-aligned with the probe / reference top-k."""

    overlap: np.ndarray  # (m,) float32
    jaccard: np.ndarray  # (m,) float32
    gap: np.ndarray  # (m,) float32
    max_gap: np.ndarray  # (m,) float32
    probe_cos: np.ndarray  # (m, k) float32, the probe top-k's probe cosine
    probe_ref_cos: np.ndarray  # (m, k) float32, their reference cosine
    ref_cos: np.ndarray  # (m, k) float32, the reference top-k's reference cosine
    ref_probe_cos: np.ndarray  # (m, k) float32, their probe cosine
    ref_rank: np.ndarray  # (m, k) int32, 1-based reference rank of each probe neighbour, 0 beyond depth
    valid_p: np.ndarray  # (m, k) bool, a probe neighbour is there
    valid_r: np.ndarray  # (m, k) bool
    p_only: np.ndarray  # (m, k) bool, probe neighbour not in the reference top-k
    r_only: np.ndarray  # (m, k) bool, reference neighbour not in the probe top-k

    def take(self, order: np.ndarray) -> Scores:
        """The same images in ``order`` ((m,) int64 positions)."""
        return Scores(**{f: getattr(self, f)[order] for f in self.__dataclass_fields__})


def score(
    P: np.ndarray,
    PD: np.ndarray,
    ref_I: np.ndarray,
    RD: np.ndarray,
    probe_ref_cos: np.ndarray,
    ref_probe_cos: np.ndarray,
    ref_rank: np.ndarray | None = None,
) -> Scores:
    """Overlap@k, Jaccard, probe-only / reference-only masks, reference ranks and gaps of m images.

    P, PD: (m, k) int64 / float32, the probe top-k (ids of any global numbering, -1 where
    missing) and their probe cosine. ref_I: (m, depth) int64, depth >= k, the reference
    list in the same numbering (its first k columns are the reference top-k R; all of it
    gives the rank of a probe-only neighbour); RD: (m, k) float32 the top-k's reference
    cosine. probe_ref_cos: (m, k) the reference cosine of each P entry; ref_probe_cos:
    (m, k) the probe cosine of each R entry. ref_rank: (m, k) int32, each P entry's 1-based
    reference rank, 0 beyond the depth, where it was counted elsewhere (the search shards
    count it; ``ref_I`` then needs only its k columns); by default its place in ``ref_I``.
    Row-wise and pure: a block of rows gives the same values as the whole table.
    """
    k = P.shape[1]
    R = ref_I[:, :k]
    valid_p, valid_r = P >= 0, R >= 0
    if ref_rank is None:
        ref_rank = reference_rank(P, ref_I)  # (m, k), 0 = not within depth
    p_in_r = valid_p & _member(P, R)
    r_in_p = valid_r & _member(R, P)
    inter = p_in_r.sum(axis=1)
    union = valid_p.sum(axis=1) + valid_r.sum(axis=1) - inter
    overlap = (inter / k).astype(np.float32)
    jaccard = np.where(union > 0, inter / np.maximum(union, 1), 0.0).astype(np.float32)
    p_only = valid_p & ~p_in_r
    r_only = valid_r & ~r_in_p
    PD = np.asarray(PD, dtype=np.float32)
    diff = np.where(p_only, PD.astype(np.float64) - probe_ref_cos, 0.0)
    count = p_only.sum(axis=1)
    gap = np.where(count > 0, diff.sum(axis=1) / np.maximum(count, 1), 0.0).astype(np.float32)
    max_gap = np.where(count > 0, np.where(p_only, diff, -np.inf).max(axis=1), 0.0).astype(np.float32)
    return Scores(
        overlap=overlap, jaccard=jaccard, gap=gap, max_gap=max_gap,
        probe_cos=PD, probe_ref_cos=np.asarray(probe_ref_cos, dtype=np.float32),
        ref_cos=np.asarray(RD, dtype=np.float32), ref_probe_cos=np.asarray(ref_probe_cos, dtype=np.float32),
        ref_rank=ref_rank, valid_p=valid_p, valid_r=valid_r, p_only=p_only, r_only=r_only,
    )  # fmt: skip


def row_columns(
    ids: pa.Array, probe_names: pa.Array, reference_names: pa.Array, s: Scores
) -> dict[str, pa.Array]:
    """The ``DISCREPANCY_SCHEMA`` columns but ``rank`` for m images, in the order of ``s``.

    ids: (m,) string. probe_names, reference_names: (m * k,) string, row-major, the ids
    of the probe / reference top-k (any value where the entry is missing).
    """
    vp, vr, po, ro = s.valid_p, s.valid_r, s.p_only, s.r_only
    rank = s.ref_rank
    return {
        "id": ids,
        "overlap": pa.array(s.overlap),
        "jaccard": pa.array(s.jaccard),
        "probe_neighbours": _name_lists(probe_names, vp),
        "probe_cos": _float_lists(s.probe_cos, vp),
        "probe_neighbours_reference_cos": _float_lists(s.probe_ref_cos, vp),
        "reference_neighbours": _name_lists(reference_names, vr),
        "reference_cos": _float_lists(s.ref_cos, vr),
        "reference_neighbours_probe_cos": _float_lists(s.ref_probe_cos, vr),
        "probe_only": _name_lists(probe_names, po),
        "probe_only_probe_cos": _float_lists(s.probe_cos, po),
        "probe_only_reference_cos": _float_lists(s.probe_ref_cos, po),
        "probe_only_reference_rank": _lists(
            pa.array(rank[po].astype(np.int32), mask=rank[po] == 0), po
        ),
        "reference_only": _name_lists(reference_names, ro),
        "reference_only_probe_cos": _float_lists(s.ref_probe_cos, ro),
        "reference_only_reference_cos": _float_lists(s.ref_cos, ro),
        "gap": pa.array(s.gap),
        "max_gap": pa.array(s.max_gap),
    }


def cases(discrepancies: pa.Table, corpus: pa.Table, n: int) -> pa.Table:
    """The top ``n`` images by rank that have at least one probe-only neighbour, with captions.

    discrepancies: the table from ``mine``. corpus: needs ``id``, ``uri``, ``caption``
    (the selected caption) for every id named in those rows; other columns are ignored.
    Returns the ``CASES_SCHEMA`` table in rank order; ``texts`` is the image's caption
    followed by its probe-only neighbours' captions, as the summary prompt takes them.
    """
    needs = ("rank", "id", "probe_only", "probe_only_probe_cos", "probe_only_reference_cos")
    require(discrepancies, needs, "cases")
    require(corpus, ("id", "uri", "caption"), "cases")
    if n < 0:
        raise ValueError(f"cases: n must be >= 0, got {n}")
    has_only = pc.greater(pc.list_value_length(discrepancies.column("probe_only")), 0)
    top = discrepancies.filter(has_only).sort_by("rank").slice(0, n)
    rows = top.to_pylist()
    wanted = {r["id"] for r in rows} | {j for r in rows for j in r["probe_only"]}
    lookup = corpus_lookup(corpus, sorted(wanted))
    missing = sorted(wanted - set(lookup))
    if missing:
        raise ValueError(
            f"cases: {len(missing)} ids of the discrepancies are not in the corpus, e.g. {missing[:5]}"
        )
    out = []
    for r in rows:
        uri, caption = lookup[r["id"]]
        neighbours = r["probe_only"]
        captions = [lookup[j][1] for j in neighbours]
        out.append(
            {
                "rank": r["rank"],
                "id": r["id"],
                "uri": uri,
                "caption": caption,
                "overlap": r.get("overlap"),
                "gap": r.get("gap"),
                "neighbour_ids": neighbours,
                "neighbour_uris": [lookup[j][0] for j in neighbours],
                "neighbour_captions": captions,
                "neighbour_probe_cos": r["probe_only_probe_cos"],
                "neighbour_reference_cos": r["probe_only_reference_cos"],
                "neighbour_reference_rank": r.get("probe_only_reference_rank")
                or [None] * len(neighbours),
                "texts": [caption, *captions],
            }
        )
    return pa.Table.from_pylist(out, schema=CASES_SCHEMA)


# ---------------------------------------------------------------------------------------
# Array helpers, public because the tests and the report use them


def cosine_moments(D: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(3,) float64 count, sum and sum of squares of one model's neighbour cosines D (n, k)
    where ``valid`` and finite; blocks' moments add up to the whole table's (``scale_of``)."""
    values = np.asarray(D, dtype=np.float64)[np.asarray(valid, dtype=bool)]
    values = values[np.isfinite(values)]
    return np.array([values.size, values.sum(), np.square(values).sum()], dtype=np.float64)


def scale_of(moments: np.ndarray) -> tuple[float, float]:
    """(mean, std) of the cosines summarised by ``cosine_moments`` (summed over blocks).

    The scale one model's cosines live on: a CLIP's neighbours sit near 0.9, a DINOv2's
    near 0.6, so raw differences between the two measure scale as much as disagreement.
    Both are rounded to float32, so a table mined whole and one mined block by block
    (whose sums differ in the last float64 bits) standardise with the same numbers. std is
    1 when there are fewer than two values or they are all equal.
    """
    count, total, squares = (float(v) for v in moments)
    if count < 1:
        return 0.0, 1.0
    mean = total / count
    var = max(0.0, squares / count - mean * mean) if count >= 2 else 0.0
    std = float(np.float32(np.sqrt(var)))
    return float(np.float32(mean)), std if std > 0 else 1.0


def cosine_scale(D: np.ndarray, valid: np.ndarray) -> tuple[float, float]:
    """(mean, std) of one model's neighbour cosines D (n, k) where ``valid`` (``scale_of``)."""
    return scale_of(cosine_moments(D, valid))


def calibrated_gaps(
    probe_cos: np.ndarray,
    reference_cos: np.ndarray,
    mask: np.ndarray,
    probe_scale: tuple[float, float],
    reference_scale: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the mean and the largest (z_probe - z_reference) over the entries in ``mask``.

    probe_cos, reference_cos: (n, k) cosines of the same pairs under each model; mask (n, k)
    bool (the probe-only neighbours); each scale the (mean, std) from ``scale_of``, z =
    (cos - mean) / std. Returns two (n,) float32 arrays, 0 for rows without an entry.
    Unchanged when either model's cosines (and its scale) go through any increasing affine
    map, which raw gaps are not.
    """
    mask = np.asarray(mask, dtype=bool)
    rows = np.broadcast_to(np.arange(mask.shape[0])[:, None], mask.shape)[mask]
    return _gaps_z(np.asarray(probe_cos)[mask], np.asarray(reference_cos)[mask], rows, mask.shape[0],
                   probe_scale, reference_scale)


def add_calibrated_gaps(
    table: pa.Table, probe_scale: tuple[float, float], reference_scale: tuple[float, float]
) -> pa.Table:
    """``table`` (discrepancy rows) with ``gap_z`` and ``max_gap_z`` computed from its
    ``probe_only_probe_cos`` / ``probe_only_reference_cos`` lists: the same bits as
    ``calibrated_gaps`` on the arrays those lists were made from, whatever the block."""
    p_lists, r_lists = table.column("probe_only_probe_cos"), table.column("probe_only_reference_cos")
    if isinstance(p_lists, pa.ChunkedArray):
        p_lists, r_lists = p_lists.combine_chunks(), r_lists.combine_chunks()
    rows = np.asarray(pc.list_parent_indices(p_lists).to_numpy(), dtype=np.int64)
    flat = [np.asarray(pc.list_flatten(c).to_numpy(zero_copy_only=False), dtype=np.float32) for c in (p_lists, r_lists)]
    gap_z, max_gap_z = _gaps_z(flat[0], flat[1], rows, table.num_rows, probe_scale, reference_scale)
    for name, values in (("gap_z", gap_z), ("max_gap_z", max_gap_z)):
        if name in table.column_names:
            table = table.drop_columns([name])
        table = table.append_column(name, pa.array(values))
    return table


def _gaps_z(
    probe_cos: np.ndarray, reference_cos: np.ndarray, rows: np.ndarray, n: int,
    probe_scale: tuple[float, float], reference_scale: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    # entries in row order, then column order: bincount sums each row's entries in that order
    zp = (np.asarray(probe_cos, dtype=np.float32).astype(np.float64) - probe_scale[0]) / probe_scale[1]
    zr = (np.asarray(reference_cos, dtype=np.float32).astype(np.float64) - reference_scale[0]) / reference_scale[1]
    diff = zp - zr
    count = np.bincount(rows, minlength=n)
    mean = np.where(count > 0, np.bincount(rows, weights=diff, minlength=n) / np.maximum(count, 1), 0.0)
    top = np.full(n, -np.inf)
    np.maximum.at(top, rows, diff)
    top = np.where(count > 0, top, 0.0)
    return mean.astype(np.float32), top.astype(np.float32)


def hash_ids(ids: np.ndarray) -> np.ndarray:
    """(m,) uint64 hash of each id string (pandas' SipHash with its fixed key: the same in every process)."""
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids, dtype=object), categorize=False)


def uniform(seed: int, key: np.ndarray) -> np.ndarray:
    """Uniform [0, 1) float64 per uint64 ``key``, a splitmix64 hash of (seed, key): the same
    in every process, so a seeded sample does not depend on how the rows are split."""
    with np.errstate(over="ignore"):
        z = key.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def reference_rank(P: np.ndarray, deep: np.ndarray) -> np.ndarray:
    """1-based position of each P[i, j] in row i of ``deep``, 0 where absent or P[i, j] < 0.

    P: (n, k) int64 row indices; deep: (n, depth) int64 neighbour lists. Returns (n, k)
    int32. Worked in row blocks so the (rows, k, depth) comparison stays bounded.
    """
    n, k = P.shape
    depth = deep.shape[1]
    out = np.zeros((n, k), dtype=np.int32)
    step = max(1, _BLOCK_ELEMENTS // max(1, k * depth))
    for s in range(0, n, step):
        e = min(n, s + step)
        eq = P[s:e, :, None] == deep[s:e, None, :]
        hit = eq.any(axis=2) & (P[s:e] >= 0)
        out[s:e] = np.where(hit, eq.argmax(axis=2) + 1, 0)
    return out


def pair_cos(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Cosine of x[rows] and x[cols], element-wise: float64 dot products rounded to float32.

    x: (n, d) float32, L2-normalised; rows, cols: int64 arrays of the same shape (any).
    Returns float32 of that shape, NaN where cols < 0 (a missing neighbour). Gathers a
    bounded number of rows at a time; never forms an n x n matrix.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    shape = np.broadcast_shapes(rows.shape, cols.shape)
    r = np.broadcast_to(rows, shape).reshape(-1)
    c = np.broadcast_to(cols, shape).reshape(-1)
    out = np.full(r.shape, np.nan, dtype=np.float32)
    ok = np.flatnonzero((c >= 0) & (r >= 0))
    step = max(1, _BLOCK_ELEMENTS // 2 // max(1, x.shape[1]))
    for s in range(0, ok.size, step):
        sel = ok[s : s + step]
        out[sel] = dot_rows(x[r[sel]], x[c[sel]])
    return out.reshape(shape)


def dot_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(m,) float32: row-wise dot products of two (m, d) float32 arrays, float64 rounded to
    float32, the same bits for a row whoever computes it (``pair_cos``, a search shard)."""
    return np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64)).astype(np.float32)


def corpus_lookup(corpus: pa.Table, wanted: list[str]) -> dict[str, tuple[str, str]]:
    """id -> (uri, caption) for the ``wanted`` ids found in ``corpus`` (filtered first, so a
    large corpus is never turned into Python objects). Null captions become ""."""
    if not wanted:
        return {}
    small = corpus.select(["id", "uri", "caption"]).filter(
        pc.is_in(corpus.column("id"), value_set=pa.array(sorted(set(wanted)), type=pa.string()))
    )
    return {
        i: (u or "", c or "")
        for i, u, c in zip(
            small.column("id").to_pylist(),
            small.column("uri").to_pylist(),
            small.column("caption").to_pylist(),
            strict=True,
        )
    }


# ---------------------------------------------------------------------------------------
# Internals


def _member(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(n, k) bool: A[i, j] occurs in row i of B (both (n, *) int64)."""
    return reference_rank(A, B) > 0


def _lists(values: pa.Array, mask: np.ndarray) -> pa.Array:
    """A list array of the row-major ``values`` where ``mask`` (rows, k) is set, one list per row."""
    offsets = np.zeros(mask.shape[0] + 1, dtype=np.int64)
    np.cumsum(mask.sum(axis=1), out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError(
            f"{offsets[-1]} list entries exceed one list array; mine fewer rows at once"
        )
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)


def _name_lists(names: pa.Array, mask: np.ndarray) -> pa.Array:
    return _lists(names.filter(pa.array(mask.reshape(-1))), mask)


def _float_lists(values: np.ndarray, mask: np.ndarray) -> pa.Array:
    return _lists(pa.array(values[mask].astype(np.float32)), mask)
