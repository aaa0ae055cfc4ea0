"""Tests for clipscan.stages.index: FAISS search against numpy brute force, Ray sharding, recall."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from clipscan.stages import index as ix


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _gaussian(n: int = 500, d: int = 32, seed: int = 0) -> np.ndarray:
    return _normalise(np.random.default_rng(seed).standard_normal((n, d)))


def _ties(n: int = 400, seed: int = 1) -> np.ndarray:
    """(n, 16) rows of +-1/4: every dot product is exact, so scores tie massively, and
    with 60 distinct rows each row has ~6 exact duplicates (some more than k + 1)."""
    rng = np.random.default_rng(seed)
    patterns = rng.choice([-0.25, 0.25], size=(60, 16)).astype(np.float32)
    x = patterns[rng.integers(0, 60, n)]
    x[:15] = patterns[0]  # 15 copies of one row: more than k + 1 duplicates
    return x


def _gaussian_with_duplicates(seed: int = 2) -> np.ndarray:
    """Gaussian rows where some rows are exact copies of others, spread across shards."""
    x = _gaussian(600, 32, seed)
    rng = np.random.default_rng(seed)
    x[rng.choice(600, 120, replace=False)] = x[rng.choice(600, 120)]
    return x


def _clustered(n: int = 4000, d: int = 32, clusters: int = 20, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = _normalise(rng.standard_normal((clusters, d)))
    return _normalise(centres[rng.integers(0, clusters, n)] + 0.08 * rng.standard_normal((n, d)))


DATASETS = {"gaussian": _gaussian, "ties": _ties, "duplicates": _gaussian_with_duplicates}


def _brute_knn(xq: np.ndarray, xb: np.ndarray, k: int, exclude_self: bool = False):
    """Reference: float64 scores rounded to float32, ranked by (-score, index)."""
    sims = (xq.astype(np.float64) @ xb.T.astype(np.float64)).astype(np.float32)
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    cols = np.broadcast_to(np.arange(xb.shape[0]), sims.shape)
    order = np.lexsort((cols, -sims), axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), order.astype(np.int64)


# --- exact search against numpy ---------------------------------------------------------


def test_import_is_light():
    code = "import sys, clipscan.stages.index; print(sorted({'faiss', 'ray', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_knn_matches_numpy(name):
    x = DATASETS[name]()
    sims, ids = ix.knn(x[:50], x[100:], 12)
    ref_sims, ref_ids = _brute_knn(x[:50], x[100:], 12)
    assert sims.dtype == np.float32 and ids.dtype == np.int64
    assert sims.shape == ids.shape == (50, 12)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


def test_knn_pads_when_k_exceeds_database():
    x = _gaussian(20, 8)
    sims, ids = ix.knn(x, x[:3], 5)
    assert (ids[:, 3:] == -1).all() and np.isneginf(sims[:, 3:]).all()
    np.testing.assert_array_equal(np.sort(ids[:, :3], axis=1), np.tile([0, 1, 2], (20, 1)))


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("shards,query_block", [(1, 16384), (3, 64), (7, 33)])
def test_self_knn_matches_numpy(name, shards, query_block):
    x = DATASETS[name]()
    sims, ids = ix.self_knn(x, 10, shards=shards, query_block=query_block)
    ref_sims, ref_ids = _brute_knn(x, x, 10, exclude_self=True)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert not (ids == np.arange(len(x))[:, None]).any()


def test_self_knn_large_k_ties():
    # k >= 100 takes FAISS's reservoir path, and the tie groups here exceed k.
    x = _ties()
    sims, ids = ix.self_knn(x, 150, shards=2, query_block=100)
    ref_sims, ref_ids = _brute_knn(x, x, 150, exclude_self=True)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(sims, ref_sims)


def test_drop_self_drops_last_when_self_is_crowded_out():
    ones = np.ones((1, 4), dtype=np.float32)
    _, ids = ix.drop_self(ones, np.array([[0, 1, 2, 3]]), np.array([9]), 3)
    np.testing.assert_array_equal(ids, [[0, 1, 2]])
    _, ids = ix.drop_self(ones, np.array([[0, 1, 2, 3]]), np.array([1]), 3)
    np.testing.assert_array_equal(ids, [[0, 2, 3]])


def test_shard_bounds_cover_rows_unevenly():
    bounds = ix.shard_bounds(10, 3)
    assert bounds == [(0, 3), (3, 6), (6, 10)]
    assert ix.shard_bounds(5, 5) == [(i, i + 1) for i in range(5)]


@pytest.mark.parametrize(
    "call",
    [
        lambda x: ix.self_knn(x, 0),
        lambda x: ix.self_knn(x, len(x)),
        lambda x: ix.self_knn(x, 5, shards=len(x) + 1),
        lambda x: ix.self_knn(x[0], 5),
        lambda x: ix.approx_self_knn(x, 5, index="NotAnIndex"),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call(_gaussian(50, 8))


# --- sharded over Ray ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_sharded_equals_single_process(ray_local, name, shards):
    # 7 shards of 400-600 rows are uneven.
    x = DATASETS[name]()
    sims, ids = ix.sharded_self_knn(x, 10, shards=shards, query_block=128)
    one_sims, one_ids = ix.self_knn(x, 10, shards=shards, query_block=128)
    np.testing.assert_array_equal(ids, one_ids)
    np.testing.assert_allclose(sims, one_sims, atol=1e-5)
    ref_sims, ref_ids = _brute_knn(x, x, 10, exclude_self=True)
    np.testing.assert_array_equal(ids, ref_ids)


@pytest.mark.parametrize("name", ["ties", "duplicates"])
def test_sharded_with_more_shards_than_half_the_rows(ray_local, name):
    # 50 shards over 80 rows hold one or two rows each, fewer than k + 1.
    x = DATASETS[name]()[:80]
    sims, ids = ix.sharded_self_knn(x, 10, shards=50, query_block=32)
    one_sims, one_ids = ix.self_knn(x, 10, shards=50, query_block=32)
    np.testing.assert_array_equal(ids, one_ids)
    np.testing.assert_allclose(sims, one_sims, atol=1e-5)
    ref_sims, ref_ids = _brute_knn(x, x, 10, exclude_self=True)
    np.testing.assert_array_equal(ids, ref_ids)


def test_sharded_default_shards_and_threads(ray_local):
    x = _gaussian(300, 16)
    sims, ids = ix.sharded_self_knn(x, 5)
    ref_sims, ref_ids = _brute_knn(x, x, 5, exclude_self=True)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    nodes: set[str] = set()
    sims2, ids2 = ix.sharded_self_knn(x, 5, shards=2, num_cpus_per_task=2, nodes=nodes)
    np.testing.assert_array_equal(ids2, ids)
    assert len(nodes) == 1  # the local Ray is one node; tests/test_lost_node.py sees the spread over two


# --- approximate search ---------------------------------------------------------------------


def test_ivf_probing_every_list_is_exact():
    x = _gaussian(1000, 32)
    _, exact_ids = ix.self_knn(x, 10)
    _, ids = ix.approx_self_knn(x, 10, index="IVF16,Flat", nprobe=16)
    assert ix.recall_at_k(ids, exact_ids) == 1.0
    assert ix.measure_recall(x, 10, ids, n_queries=200, seed=0) == 1.0


def test_ivf_small_nprobe_recall_bound_on_clustered_data():
    x = _clustered()
    _, exact_ids = ix.self_knn(x, 10)
    _, ids = ix.approx_self_knn(x, 10, index="IVF64,Flat", nprobe=4, seed=0)
    recall = ix.recall_at_k(ids, exact_ids)
    assert 0.9 <= recall < 1.0
    assert abs(ix.measure_recall(x, 10, ids, n_queries=500, seed=1) - recall) < 0.03
    _, ids_again = ix.approx_self_knn(x, 10, index="IVF64,Flat", nprobe=4, seed=0)
    np.testing.assert_array_equal(ids_again, ids)


def test_nlist_is_clamped_for_small_corpora(caplog):
    x = _gaussian(500, 32)
    with caplog.at_level(logging.WARNING, logger=ix.__name__):
        sims, ids = ix.approx_self_knn(x, 5, index="IVF4096,Flat", nprobe=4096)
    assert "IVF12,Flat" in caplog.text and "IVF4096,Flat" in caplog.text
    assert ix.recall_at_k(ids, ix.self_knn(x, 5)[1]) == 1.0


# --- neighbour set comparison ---------------------------------------------------------------


def _set_overlap(a: np.ndarray, b: np.ndarray):
    overlap, jaccard = [], []
    for ra, rb in zip(a, b, strict=True):
        sa, sb = {int(i) for i in ra if i >= 0}, {int(i) for i in rb if i >= 0}
        overlap.append(len(sa & sb) / a.shape[1])
        jaccard.append(len(sa & sb) / len(sa | sb) if sa | sb else 0.0)
    return np.array(overlap), np.array(jaccard)


def test_neighbour_overlap_matches_sets():
    rng = np.random.default_rng(4)
    n, k = 300, 10
    a = np.stack([rng.choice(40, k, replace=False) for _ in range(n)]).astype(np.int64)
    b = np.stack([rng.choice(40, k, replace=False) for _ in range(n)]).astype(np.int64)
    b[:20] = a[:20]  # identical rows
    b[20:40] = a[20:40] + 100  # disjoint rows
    a[40:60, 7:] = -1  # padding from an approximate index
    b[50:70, 5:] = -1
    overlap, jaccard = ix.neighbour_overlap(a, b)
    ref_overlap, ref_jaccard = _set_overlap(a, b)
    assert overlap.dtype == jaccard.dtype == np.float32
    np.testing.assert_allclose(overlap, ref_overlap, rtol=1e-6)
    np.testing.assert_allclose(jaccard, ref_jaccard, rtol=1e-6)
    assert (overlap[:20] == 1).all() and (jaccard[20:40] == 0).all()


def test_neighbour_overlap_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(3, 5\)"):
        ix.neighbour_overlap(np.zeros((3, 4), np.int64), np.zeros((3, 5), np.int64))


def test_a_5000_copy_group_is_searched_once_and_expanded():
    """A placeholder image copied 5,000 times (and a second group of 7): neighbour lists equal
    numpy's (ties by row), searching one row per group, not widening until the group fits."""
    rng = np.random.default_rng(7)
    base = _normalise(rng.normal(size=(600, 16)))
    x = np.concatenate([base, np.repeat(base[:1], 5000, axis=0), np.repeat(base[5:6], 7, axis=0)])
    x = np.ascontiguousarray(x[rng.permutation(len(x))])
    want_D, want_I = _brute_knn(x, x, 10, exclude_self=True)
    searcher = ix._FlatSearcher(x)
    assert searcher._nb == 600  # the database FAISS sees: one row per group
    for shards, block in ((1, 6000), (3, 997)):
        D, I = ix.self_knn(x, 10, shards=shards, query_block=block)
        np.testing.assert_array_equal(I, want_I)
        np.testing.assert_array_equal(D, want_D)
    # identical queries are searched once: the 5,007 copies of a block cost two searches
    copies = np.repeat(base[:2], 3, axis=0)
    groups = ix._DuplicateGroups.of(copies)
    assert groups is not None and groups.first.tolist() == [0, 3] and groups.inverse.tolist() == [0, 0, 0, 1, 1, 1]
    assert ix._DuplicateGroups.of(base) is None


def test_ivf_flat_lists_filled_list_by_list_equal_faiss_add() -> None:
    """``add_vectors`` fills an IVF-Flat index's lists one list at a time (exact sizes):
    the same lists, ids, bytes and search results as FAISS's own ``add``; other indexes
    are added to by ``add`` itself."""
    import faiss

    from clipscan.stages.index import add_vectors

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 16), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def built(spec: str, add) -> faiss.Index:
        idx = faiss.index_factory(16, spec, faiss.METRIC_INNER_PRODUCT)
        idx.train(x[:8000])
        add(idx)
        return idx

    a = built("IVF32,Flat", lambda i: i.add(x))
    b = built("IVF32,Flat", lambda i: add_vectors(i, x, batch=3000))
    assert a.ntotal == b.ntotal == len(x)
    _assert_same_lists(a, b, 32, 16)
    a.nprobe = b.nprobe = 4
    for got, want in zip(b.search(x[:500], 10), a.search(x[:500], 10), strict=True):
        np.testing.assert_array_equal(got, want)
    sq = built("IVF8,SQ8", lambda i: add_vectors(i, x))  # not IVF-Flat: FAISS's add
    assert sq.ntotal == len(x)


def _assert_same_lists(a, b, nlist: int, d: int) -> None:  # type: ignore[no-untyped-def]
    """Two IVF-Flat indexes hold the same lists: sizes, ids and vector bytes, in order."""
    import faiss

    for lst in range(nlist):
        size = a.invlists.list_size(lst)
        assert b.invlists.list_size(lst) == size
        for get, width in ((a.invlists.get_ids, 1), (a.invlists.get_codes, 4 * d)):
            other = getattr(b.invlists, get.__name__)
            np.testing.assert_array_equal(faiss.rev_swig_ptr(get(lst), size * width),
                                          faiss.rev_swig_ptr(other(lst), size * width))


def test_training_sample_grows_with_the_list_count(caplog) -> None:
    """An IVF list count asks for 39 training rows a list even where ``train_sample`` is
    smaller: a shard of many rows keeps its lists instead of being clamped by the sample."""
    import logging

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12_000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with caplog.at_level(logging.WARNING):
        idx = ix.build_index(x, "IVF256,Flat", 4, 1000, 0, "test")
    assert ix._ivf_or_none(idx).nlist == 256 and "too few" not in caplog.text
    small = ix.build_index(x[:5000], "IVF256,Flat", 4, 1000, 0, "test")  # 5000 // 39 = 128 lists at most
    assert ix._ivf_or_none(small).nlist == 128


class _Pieces:
    """``ix.Rows`` over an array cut into uneven pieces, counting how often it is read whole."""

    def __init__(self, x: np.ndarray, cuts: list[int]) -> None:
        self.x, self.cuts, self.rows, self.whole = x, cuts, len(x), 0

    def chunks(self):  # type: ignore[no-untyped-def]
        edges = [0, *self.cuts, len(self.x)]
        for a, b in zip(edges[:-1], edges[1:], strict=True):
            yield self.x[a:b].copy()

    def __call__(self) -> np.ndarray:
        self.whole += 1
        return self.x.copy()


def test_ivf_flat_built_piece_by_piece_equals_the_whole_array() -> None:
    """A shard that reads its rows piece by piece fills an IVF-Flat index without the whole
    array: the same lists, ids, bytes and answers as ``build_index`` over the array. Other
    indexes, and a training sample as large as the rows, read the array whole."""
    import faiss

    rng = np.random.default_rng(1)
    x = rng.standard_normal((9_000, 16), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    source = _Pieces(x, [1, 700, 701, 4000, 8999])
    whole = ix.build_index(x, "IVF16,Flat", 4, 2000, 5, "test")
    built, kept, norm = ix.build_index_chunked(source, "IVF16,Flat", 4, 2000, 5, "test")
    assert kept is None and source.whole == 0 and norm == pytest.approx(ix._max_norm(x))
    a, b = faiss.extract_index_ivf(whole), faiss.extract_index_ivf(built)
    assert a.ntotal == b.ntotal == len(x) and a.nprobe == b.nprobe == 4
    _assert_same_lists(a, b, 16, 16)
    for got, want in zip(built.search(x[:300], 10), whole.search(x[:300], 10), strict=True):
        np.testing.assert_array_equal(got, want)
    _, kept, _ = ix.build_index_chunked(source, "IVF16,SQ8", 4, 2000, 5, "test")
    assert kept is not None and source.whole == 1
    _, kept, _ = ix.build_index_chunked(source, "IVF16,Flat", 4, 10**6, 5, "test")
    assert kept is not None and source.whole == 2
    blocks = list(ix._reblocked(source, 37))
    assert [at for at, _ in blocks] == list(range(0, len(x), 37))
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), x)
