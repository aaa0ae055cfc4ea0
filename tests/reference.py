"""DAF over whole arrays in memory, as the paper writes it: the reference the pipeline is held to.

``mine`` and ``pairs`` score and rank every image from whole neighbour arrays (n rows,
k or depth columns) held in one process; ``contrast_rows`` builds the attribute
contrast's rows from that whole table. The product computes the same per part and block
(``clipscan.stages.search``, ``clipscan.stages.mine``, ``attributes.build_rows``); the
tests check that the two agree bit for bit, and check these against brute force.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipscan.stages.attributes import CASE_COLUMNS, _MatchPlan, build_rows, probe_only_cosines
from clipscan.stages.discrepancy import (
    DISCREPANCY_SCHEMA,
    PAIRS_SCHEMA,
    RANK_BY,
    RankBy,
    calibrated_gaps,
    corpus_lookup,
    cosine_moments,
    pair_cos,
    row_columns,
    scale_of,
    score,
)


def mine(
    ids: np.ndarray,
    probe_D: np.ndarray,
    probe_I: np.ndarray,
    ref_D: np.ndarray,
    ref_I: np.ndarray,
    x_probe: np.ndarray,
    x_ref: np.ndarray,
    k: int,
    rank_by: RankBy = "overlap",
) -> pa.Table:
    """Score and rank every image by how much its probe and reference neighbours disagree.

    ids: (n,) str (object array, list or pyarrow array), row i's image id.
    probe_D, probe_I: (n, kp) float32 cosine / int64 row index, kp >= k, best first, self
    excluded, I = -1 where missing; the first k columns are the probe top-k (P).
    ref_D, ref_I: (n, depth), depth >= k, the same under the reference model; the first k
    columns are the reference top-k (R), all depth columns give the reference rank of a
    probe-only neighbour (null when it is beyond depth).
    x_probe: (n, d_probe) and x_ref: (n, d_ref) float32, L2-normalised, for the cosine of
    any neighbour under the other model (row-wise float64 dot, rounded to float32).
    rank_by: "overlap" (ascending overlap, then descending gap), "jaccard" (ascending
    Jaccard, then descending gap), "gap" (descending gap_z) or "max_gap" (descending
    max_gap_z, then gap_z); ties always go by id. gap_z and max_gap_z are the gaps in
    standardised cosines (``calibrated_gaps``): two models whose cosines live on different
    scales are compared by how unusual a pair is to each, not by raw cosine.

    Returns the ``DISCREPANCY_SCHEMA`` table, one row per image in rank order.
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"mine: rank_by must be one of {RANK_BY}, got {rank_by!r}")
    ids_pa = _as_ids(ids, "mine")
    n = len(ids_pa)
    probe_D, probe_I, ref_D, ref_I, x_probe, x_ref = _check_lists(
        "mine", n, probe_D, probe_I, ref_D, ref_I, x_probe, x_ref
    )
    if not 1 <= k <= probe_I.shape[1]:
        raise ValueError(
            f"mine: k={k} must be in 1..{probe_I.shape[1]} (probe_I has shape {probe_I.shape})"
        )
    if k > ref_I.shape[1]:
        raise ValueError(
            f"mine: k={k} exceeds the reference depth: ref_I has shape {ref_I.shape}; "
            "the reference lists need depth >= k"
        )

    P, PD = probe_I[:, :k], probe_D[:, :k].astype(np.float32)
    R, RD = ref_I[:, :k], ref_D[:, :k].astype(np.float32)
    rows = np.broadcast_to(np.arange(n, dtype=np.int64)[:, None], (n, k))
    s = score(P, PD, ref_I, RD, pair_cos(x_ref, rows, P), pair_cos(x_probe, rows, R))
    scales = scale_of(cosine_moments(PD, s.valid_p)), scale_of(cosine_moments(RD, s.valid_r))
    gap_z, max_gap_z = calibrated_gaps(s.probe_cos, s.probe_ref_cos, s.p_only, *scales)

    id_key = _id_key(ids_pa)
    if rank_by == "overlap":
        order = np.lexsort((id_key, -s.gap, s.overlap))
    elif rank_by == "jaccard":
        order = np.lexsort((id_key, -s.gap, s.jaccard))
    elif rank_by == "max_gap":
        order = np.lexsort((id_key, -gap_z, -max_gap_z))
    else:
        order = np.lexsort((id_key, -gap_z))
    names_p = ids_pa.take(pa.array(np.maximum(P[order], 0).reshape(-1)))
    names_r = ids_pa.take(pa.array(np.maximum(R[order], 0).reshape(-1)))
    columns = {"rank": pa.array(np.arange(1, n + 1, dtype=np.int32))}
    columns.update(row_columns(ids_pa.take(pa.array(order)), names_p, names_r, s.take(order)))
    columns.update(gap_z=pa.array(gap_z[order]), max_gap_z=pa.array(max_gap_z[order]))
    return pa.Table.from_pydict(columns, schema=DISCREPANCY_SCHEMA)


def pairs(
    ids: np.ndarray,
    probe_D: np.ndarray,
    probe_I: np.ndarray,
    ref_D: np.ndarray,
    ref_I: np.ndarray,
    x_probe: np.ndarray,
    x_ref: np.ndarray,
    probe_min: float = 0.95,
    reference_max: float = 0.6,
    k: int | None = None,
) -> pa.Table:
    """MMVP-style pairs ("Eyes Wide Shut"): near-duplicates to one model, far apart to the other.

    Inputs as for ``mine``. "probe_close": pairs (i, j) with j in i's probe list, probe
    cosine >= probe_min and reference cosine <= reference_max (the probe conflates them);
    "reference_close": j in i's reference list, reference cosine >= probe_min and probe
    cosine <= reference_max. ``k`` limits both lists to their first k columns (None = all
    columns given). Both cosines are recomputed from the embeddings (float64 dot rounded
    to float32), so a pair found from either end has the same values.

    Returns the ``PAIRS_SCHEMA`` table, id_a < id_b, one row per (direction, pair), sorted
    by direction, then |probe cos - reference cos| descending (the most discrepant first
    in each direction), then id_a, id_b.
    """
    ids_pa = _as_ids(ids, "pairs")
    n = len(ids_pa)
    probe_D, probe_I, ref_D, ref_I, x_probe, x_ref = _check_lists(
        "pairs", n, probe_D, probe_I, ref_D, ref_I, x_probe, x_ref
    )
    if k is not None and not 1 <= k <= min(probe_I.shape[1], ref_I.shape[1]):
        raise ValueError(
            f"pairs: k={k} must be in 1..min(probe_I {probe_I.shape}, ref_I {ref_I.shape}) columns"
        )
    id_key = _id_key(ids_pa)
    found = []
    for which, (lists, sims) in enumerate(((probe_I, probe_D), (ref_I, ref_D))):
        lists, sims = (lists, sims) if k is None else (lists[:, :k], sims[:, :k])
        rows = np.repeat(np.arange(n, dtype=np.int64), lists.shape[1])
        cols = lists.reshape(-1).astype(np.int64)
        # A cheap screen on the listed similarity (with slack for rounding), then exact cosines.
        keep = (cols >= 0) & (cols != rows) & (sims.reshape(-1) >= probe_min - 1e-5)
        rows, cols = rows[keep], cols[keep]
        a = np.where(id_key[rows] <= id_key[cols], rows, cols)
        b = np.where(id_key[rows] <= id_key[cols], cols, rows)
        _, first = np.unique(a * n + b, return_index=True)
        a, b = a[first], b[first]
        p_cos, r_cos = pair_cos(x_probe, a, b), pair_cos(x_ref, a, b)
        close, far = (p_cos, r_cos) if which == 0 else (r_cos, p_cos)
        hit = (close >= probe_min) & (far <= reference_max)
        found.append((np.full(int(hit.sum()), which), a[hit], b[hit], p_cos[hit], r_cos[hit]))
    codes, a, b, p_cos, r_cos = (np.concatenate(parts) for parts in zip(*found, strict=True))
    p_cos, r_cos = p_cos.astype(np.float32), r_cos.astype(np.float32)
    spread = np.abs(p_cos.astype(np.float64) - r_cos.astype(np.float64))
    order = np.lexsort((id_key[b], id_key[a], -spread, codes))
    names = np.array(["probe_close", "reference_close"], dtype=object)
    return pa.Table.from_pydict(
        {
            "id_a": ids_pa.take(pa.array(a[order])),
            "id_b": ids_pa.take(pa.array(b[order])),
            "probe_cos": pa.array(p_cos[order]),
            "reference_cos": pa.array(r_cos[order]),
            "direction": pa.array(names[codes[order]], type=pa.string()),
        },
        schema=PAIRS_SCHEMA,
    )


def _as_ids(ids: object, fn: str) -> pa.Array:
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if isinstance(ids, pa.Array):
        arr = ids.cast(pa.string())
    else:
        a = np.asarray(ids, dtype=object)
        if a.ndim != 1:
            raise ValueError(f"{fn}: ids must be 1-D (n,), got shape {a.shape}")
        arr = pa.array(a, type=pa.string())
    if arr.null_count:
        raise ValueError(f"{fn}: ids has {arr.null_count} null entries")
    return arr


def _check_lists(
    fn: str,
    n: int,
    probe_D: np.ndarray,
    probe_I: np.ndarray,
    ref_D: np.ndarray,
    ref_I: np.ndarray,
    x_probe: np.ndarray,
    x_ref: np.ndarray,
) -> tuple[np.ndarray, ...]:
    """Shapes, dtypes and index ranges, with a message naming the argument and the shapes."""
    arrays = {
        "probe_D": np.asarray(probe_D),
        "probe_I": np.asarray(probe_I),
        "ref_D": np.asarray(ref_D),
        "ref_I": np.asarray(ref_I),
        "x_probe": np.asarray(x_probe),
        "x_ref": np.asarray(x_ref),
    }
    shapes = ", ".join(f"{name} {a.shape}" for name, a in arrays.items())
    for name, a in arrays.items():
        if a.ndim != 2 or a.shape[0] != n:
            raise ValueError(
                f"{fn}: {name} must be 2-D with n = len(ids) = {n} rows, got shape {a.shape} "
                f"(all: {shapes})"
            )
    for d_name, i_name in (("probe_D", "probe_I"), ("ref_D", "ref_I")):
        if arrays[d_name].shape != arrays[i_name].shape:
            raise ValueError(
                f"{fn}: {d_name} has shape {arrays[d_name].shape} but {i_name} has shape "
                f"{arrays[i_name].shape}; they must match"
            )
        if arrays[i_name].dtype.kind not in "iu":
            raise ValueError(
                f"{fn}: {i_name} must hold integer row indices, got {arrays[i_name].dtype}"
            )
        index = arrays[i_name]
        if index.size and (index.min() < -1 or index.max() >= n):
            raise ValueError(
                f"{fn}: {i_name} has row indices in [{index.min()}, {index.max()}], "
                f"outside [-1, {n})"
            )
        arrays[i_name] = index.astype(np.int64, copy=False)
    return tuple(arrays.values())


def _id_key(ids_pa: pa.Array) -> np.ndarray:
    """(n,) int64: each id's position in sorted id order, a numeric tie-break key."""
    order = pc.sort_indices(ids_pa).to_numpy()
    key = np.empty(len(ids_pa), dtype=np.int64)
    key[order] = np.arange(len(ids_pa), dtype=np.int64)
    return key


def contrast_rows(
    discrepancies: pa.Table,
    corpus: pa.Table,
    cases: int,
    seed: int = 0,
    bins: int = 10,
    deep_reference: Callable[[list[str]], Mapping[str, Sequence[str]]] | None = None,
) -> pa.Table:
    """``ROWS_SCHEMA`` rows for the top ``cases`` images of ``mine``'s table that have a
    probe-only neighbour (the whole table in memory; ``build_rows`` is the streaming form).

    Each row: the image's caption, its probe-only neighbours' captions, its reference
    neighbours' captions (control) and ``matched_captions``: agreeing pairs (j in both top-k
    lists of image i, any image) sampled so their probe cosines follow the probe-only pairs'
    (``bins`` quantile bins, one agreeing pair per probe-only pair where there are enough),
    each kept or not by a hash of (seed, id, position), so the choice does not depend on
    how the table is split. A matched pair is attached to the image it comes from.
    ``rank_matched_captions``: for each probe-only neighbour at reference rank r, the
    image's reference neighbour nearest to rank r that is not a probe neighbour (so as far
    from the image, to the reference, as the probe-only one, but not singled out by the
    probe), from ``deep_reference`` (case ids -> each one's reference list to the mining
    depth, best first; ``deep_lookup`` builds it); without it this control stays empty.
    corpus: ``id``, ``caption`` (and ``uri``) of every image.
    """
    missing = [c for c in CASE_COLUMNS + ("probe_cos",) if c not in discrepancies.column_names]
    if missing:
        raise KeyError(f"stage 'attributes' needs columns {missing}; the table has {discrepancies.column_names}")
    has_only = pc.greater(pc.list_value_length(discrepancies.column("probe_only")), 0)
    top = discrepancies.filter(has_only).sort_by("rank").slice(0, max(0, cases))
    matched = matched_pairs(discrepancies, probe_only_cosines(top), seed, bins)
    return build_rows(top, matched, lambda ids: _ranks(discrepancies, ids),
                      lambda wanted: corpus_lookup(corpus, wanted), deep_reference)



def matched_pairs(discrepancies: pa.Table, target_cos: np.ndarray, seed: int, bins: int = 10) -> list[tuple[str, str]]:
    """Agreeing pairs (i, j): j in both top-k lists of i, sampled to the distribution of
    ``target_cos`` (the probe cosines of the probe-only pairs) over ``bins`` quantile bins.

    Two passes over the table's record batches (counting, then sampling), so the memory is
    one batch plus the chosen pairs; ``matched_pairs_parts`` runs the same passes part by
    part.
    """
    plan = _MatchPlan.of(target_cos, bins)
    if plan is None:
        return []
    for batch in discrepancies.to_batches():
        plan.have += plan.count(batch)
    out: list[tuple[str, str]] = []
    for batch in discrepancies.to_batches():
        ids, nbr = plan.choose(batch, seed)
        out += list(zip(ids.tolist(), nbr.tolist(), strict=True))
    return out


def _ranks(discrepancies: pa.Table, ids: Iterable[str]) -> dict[str, int]:
    wanted = sorted(ids)
    if not wanted:
        return {}
    small = discrepancies.select(["id", "rank"]).filter(
        pc.is_in(discrepancies.column("id"), value_set=pa.array(wanted, type=pa.string()))
    )
    return dict(zip(small.column("id").to_pylist(), small.column("rank").to_pylist(), strict=True))


def deep_lookup(ids: Any, ref_I: np.ndarray) -> Callable[[list[str]], dict[str, list[str]]]:
    """id -> that image's reference list (``ref_I`` row as ids, best first, -1 dropped), for
    the ids asked; ``ids`` (n,) and ``ref_I`` (n, depth) int64 as ``mine`` takes them."""
    ids_pa = pa.array(np.asarray(ids, dtype=object), type=pa.string())

    def lookup(wanted: list[str]) -> dict[str, list[str]]:
        if not wanted:
            return {}
        rows = pc.index_in(pa.array(wanted, type=pa.string()), value_set=ids_pa).to_numpy(zero_copy_only=False)
        out = {}
        for w, r in zip(wanted, rows, strict=True):
            if r is None or not np.isfinite(r):
                continue
            lst = ref_I[int(r)]
            out[w] = ids_pa.take(pa.array(lst[lst >= 0])).to_pylist()
        return out

    return lookup
