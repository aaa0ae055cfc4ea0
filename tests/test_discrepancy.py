"""Tests for clipscan.stages.discrepancy against Python sets and brute-force numpy neighbours."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipscan.data.scenes import PALETTE, SHAPES, make_scene
from clipscan.stages.discrepancy import (
    CASES_SCHEMA,
    DISCREPANCY_SCHEMA,
    PAIRS_SCHEMA,
    cases,
    pair_cos,
    reference_rank,
)
from tests.reference import mine, pairs

K, DEPTH = 10, 40


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sims(x: np.ndarray) -> np.ndarray:
    """(n, n) float64 cosine, self set to -inf."""
    s = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(s, -np.inf)
    return s


def brute_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k, self excluded, ties by index: D float32, I int64."""
    s = sims(x)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1).astype(np.float32), order.astype(np.int64)


def random_data(n: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    """A probe (d 16) and a reference (d 24) that agree in part, so overlaps spread over 0..1."""
    rng = np.random.default_rng(seed)
    x_probe = normalise(rng.normal(size=(n, 16)))
    x_ref = normalise(np.concatenate([x_probe, 0.9 * rng.normal(size=(n, 8)) / 2.0], axis=1))
    x_ref = normalise(x_ref + 0.08 * rng.normal(size=x_ref.shape))
    return lists_for(np.array([f"img-{i:05d}" for i in range(n)], dtype=object), x_probe, x_ref)


def lists_for(ids: np.ndarray, x_probe: np.ndarray, x_ref: np.ndarray) -> dict[str, np.ndarray]:
    probe_D, probe_I = brute_knn(x_probe, K)
    ref_D, ref_I = brute_knn(x_ref, DEPTH)
    return dict(
        ids=ids, probe_D=probe_D, probe_I=probe_I, ref_D=ref_D, ref_I=ref_I,
        x_probe=x_probe, x_ref=x_ref,
    )  # fmt: skip


def run_mine(data: dict[str, np.ndarray], k: int = K, rank_by: str = "overlap") -> pa.Table:
    return mine(**data, k=k, rank_by=rank_by)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return random_data()


@pytest.fixture(scope="module")
def table(data: dict[str, np.ndarray]) -> pa.Table:
    return run_mine(data)


def test_schema_and_one_row_per_image(data, table):
    assert table.schema == DISCREPANCY_SCHEMA
    assert table.num_rows == len(data["ids"])
    assert table.column("rank").to_pylist() == list(range(1, table.num_rows + 1))
    assert sorted(table.column("id").to_pylist()) == list(data["ids"])
    overlaps = set(table.column("overlap").to_pylist())
    assert len(overlaps) > 3, f"the data should spread overlaps, got {overlaps}"


def test_rows_agree_with_python_sets_and_direct_cosines(data, table):
    ids, x_probe, x_ref = data["ids"], data["x_probe"], data["x_ref"]
    row_of = {name: i for i, name in enumerate(ids)}
    s_ref = sims(x_ref)
    top_p = data["probe_D"][:, :K].astype(np.float64)
    top_r = data["ref_D"][:, :K].astype(np.float64)
    p_mu, p_sd, r_mu, r_sd = top_p.mean(), top_p.std(), top_r.mean(), top_r.std()
    for r in table.to_pylist():
        i = row_of[r["id"]]
        probe = [ids[j] for j in data["probe_I"][i, :K]]
        ref = [ids[j] for j in data["ref_I"][i, :K]]
        p, q = set(probe), set(ref)
        assert r["probe_neighbours"] == probe
        assert r["reference_neighbours"] == ref
        assert r["overlap"] == pytest.approx(len(p & q) / K, abs=1e-7)
        assert r["jaccard"] == pytest.approx(len(p & q) / len(p | q), abs=1e-7)
        assert r["probe_only"] == [j for j in probe if j not in q]
        assert r["reference_only"] == [j for j in ref if j not in p]
        np.testing.assert_array_equal(r["probe_cos"], data["probe_D"][i, :K])
        np.testing.assert_array_equal(r["reference_cos"], data["ref_D"][i, :K])
        # cosines under the other model: direct dot products of the two embeddings
        only = [row_of[j] for j in r["probe_only"]]
        np.testing.assert_allclose(
            r["probe_only_reference_cos"], [x_ref[i] @ x_ref[j] for j in only], atol=1e-6
        )
        np.testing.assert_allclose(
            r["probe_only_probe_cos"], [x_probe[i] @ x_probe[j] for j in only], atol=1e-6
        )
        ref_only = [row_of[j] for j in r["reference_only"]]
        np.testing.assert_allclose(
            r["reference_only_probe_cos"], [x_probe[i] @ x_probe[j] for j in ref_only], atol=1e-6
        )
        np.testing.assert_allclose(
            r["reference_only_reference_cos"], [x_ref[i] @ x_ref[j] for j in ref_only], atol=1e-6
        )
        # reference rank: position in the full reference ordering, null beyond the depth
        full = np.argsort(-s_ref[i], kind="stable")
        ranks = [int(np.flatnonzero(full == j)[0]) + 1 for j in only]
        assert r["probe_only_reference_rank"] == [rk if rk <= DEPTH else None for rk in ranks]
        assert all(rk > K for rk in ranks)
        diffs = [
            a - b
            for a, b in zip(r["probe_only_probe_cos"], r["probe_only_reference_cos"], strict=True)
        ]
        assert r["gap"] == pytest.approx(float(np.mean(diffs)) if diffs else 0.0, abs=1e-6)
        # standardised: each model's cosines against the mean and std of its own top-k cosines
        zp = (np.asarray(r["probe_only_probe_cos"], dtype=np.float64) - p_mu) / p_sd
        zr = (np.asarray(r["probe_only_reference_cos"], dtype=np.float64) - r_mu) / r_sd
        assert r["gap_z"] == pytest.approx(float(np.mean(zp - zr)) if diffs else 0.0, abs=1e-4)


def test_ranking_orders(data):
    for rank_by, key in (
        ("overlap", lambda r: (r["overlap"], -r["gap"], r["id"])),
        ("jaccard", lambda r: (r["jaccard"], -r["gap"], r["id"])),
        ("gap", lambda r: (-r["gap_z"], r["id"])),
        ("max_gap", lambda r: (-r["max_gap_z"], -r["gap_z"], r["id"])),
    ):
        rows = run_mine(data, rank_by=rank_by).to_pylist()
        assert rows == sorted(rows, key=key), rank_by
    with pytest.raises(ValueError, match="rank_by"):
        run_mine(data, rank_by="nope")


def test_ties_go_by_id():
    # Identical embeddings under both models: every overlap is 1 and every gap 0.
    rng = np.random.default_rng(3)
    x = normalise(rng.normal(size=(40, 8)))
    ids = np.array([f"z{i:03d}" for i in range(40)][::-1], dtype=object)  # rows not in id order
    table = mine(**lists_for(ids, x, x), k=5)
    assert set(table.column("overlap").to_pylist()) == {1.0}
    assert table.column("id").to_pylist() == sorted(ids)


def test_deterministic_and_independent_of_row_order(data, table):
    assert run_mine(data).equals(table)
    perm = np.random.default_rng(7).permutation(len(data["ids"]))
    shuffled = lists_for(data["ids"][perm], data["x_probe"][perm], data["x_ref"][perm])
    again = run_mine(shuffled)
    assert again.equals(table)
    assert again.sort_by("id").equals(table.sort_by("id"))


def test_k_below_the_list_width(data):
    table = run_mine(data, k=4)
    row_of = {name: i for i, name in enumerate(data["ids"])}
    for r in table.to_pylist()[:50]:
        i = row_of[r["id"]]
        p = set(data["ids"][data["probe_I"][i, :4]])
        q = set(data["ids"][data["ref_I"][i, :4]])
        assert r["overlap"] == pytest.approx(len(p & q) / 4)
        assert len(r["probe_neighbours"]) == 4


def test_missing_neighbours_are_ignored(data):
    d = {key: np.array(v, copy=True) for key, v in data.items()}
    d["probe_I"][:10, -3:] = -1
    d["probe_D"][:10, -3:] = -np.inf
    table = run_mine(d).sort_by("id")
    for i, r in enumerate(table.to_pylist()[:10]):
        p = set(data["ids"][d["probe_I"][i, : K - 3]])
        q = set(data["ids"][d["ref_I"][i, :K]])
        assert r["probe_neighbours"] == list(data["ids"][d["probe_I"][i, : K - 3]])
        assert r["overlap"] == pytest.approx(len(p & q) / K)
        assert r["jaccard"] == pytest.approx(len(p & q) / len(p | q))
        assert np.isfinite(r["gap"])


def test_reference_rank_helper():
    P = np.array([[3, 1, -1], [0, 9, 2]])
    deep = np.array([[1, 2, 3, 4], [2, 0, 5, 6]])
    np.testing.assert_array_equal(reference_rank(P, deep), [[3, 1, 0], [2, 0, 1]])


def test_pair_cos_is_a_gathered_dot(data):
    x = data["x_ref"]
    rows, cols = np.array([0, 5, 7]), np.array([3, -1, 7])
    out = pair_cos(x, rows, cols)
    assert out.dtype == np.float32
    assert out[0] == pytest.approx(float(x[0] @ x[3]), abs=1e-7)
    assert np.isnan(out[1]) and out[2] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(ref_D=np.zeros((300, 5), np.float32), ref_I=np.zeros((300, 5), np.int64)), "depth"),
        (dict(k=0), "k=0"),
        (dict(k=K + 1), "probe_I"),
        (dict(probe_D=np.zeros((300, 9), np.float32)), "probe_D"),
        (dict(ref_I=np.zeros((299, DEPTH), np.int64)), "ref_I"),
        (dict(x_ref=np.zeros((300,), np.float32)), "x_ref"),
        (dict(probe_I=np.full((300, K), 300)), "probe_I"),
        (dict(probe_I=np.zeros((300, K), np.float32)), "probe_I"),
    ],
)
def test_bad_inputs_name_the_argument(data, change, match):
    args = dict(data, k=K)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        mine(**args)


# --- pairs ---------------------------------------------------------------------------


def clustered_data(seed: int = 1) -> dict[str, np.ndarray]:
    """Rows 0-99: tight clusters of 5 under the probe, unrelated under the reference;
    rows 100-199 the reverse; rows 200-299 random under both."""
    rng = np.random.default_rng(seed)
    n, d = 300, 16
    x_probe, x_ref = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    for lo, x in ((0, x_probe), (100, x_ref)):
        centres = rng.normal(size=(20, d))
        x[lo : lo + 100] = np.repeat(centres, 5, axis=0) + 0.03 * rng.normal(size=(100, d))
    ids = np.array([f"p{(i * 7919) % n:04d}" for i in range(n)], dtype=object)  # shuffled ids
    return lists_for(ids, normalise(x_probe), normalise(x_ref))


def brute_pairs(data, probe_min, reference_max):
    ids, xp, xr = data["ids"], data["x_probe"], data["x_ref"]
    found = {}
    for direction, lists, close_x, far_x in (
        ("probe_close", data["probe_I"], xp, xr),
        ("reference_close", data["ref_I"], xr, xp),
    ):
        for i in range(len(ids)):
            for j in lists[i]:
                close = float(close_x[i].astype(np.float64) @ close_x[j].astype(np.float64))
                far = float(far_x[i].astype(np.float64) @ far_x[j].astype(np.float64))
                if close >= probe_min and far <= reference_max:
                    a, b = sorted((ids[i], ids[j]))
                    pc, rc = (close, far) if direction == "probe_close" else (far, close)
                    found[(direction, a, b)] = (pc, rc)
    return found


@pytest.mark.parametrize("probe_min, reference_max", [(0.95, 0.6), (0.7, 0.2)])
def test_pairs_match_a_double_loop(probe_min, reference_max):
    data = clustered_data()
    table = pairs(**data, probe_min=probe_min, reference_max=reference_max)
    assert table.schema == PAIRS_SCHEMA
    expected = brute_pairs(data, probe_min, reference_max)
    rows = table.to_pylist()
    got = {
        (r["direction"], r["id_a"], r["id_b"]): (r["probe_cos"], r["reference_cos"]) for r in rows
    }
    assert len(got) == len(rows), "duplicate pairs"
    assert set(got) == set(expected)
    assert {d for d, _, _ in got} == {"probe_close", "reference_close"}
    for key, (pc, rc) in expected.items():
        assert got[key] == pytest.approx((pc, rc), abs=1e-6)
    assert all(r["id_a"] < r["id_b"] for r in rows)
    order = [(r["direction"], -abs(r["probe_cos"] - r["reference_cos"]), r["id_a"]) for r in rows]
    assert order == sorted(order)
    assert pairs(**data, probe_min=probe_min, reference_max=reference_max).equals(table)


def test_pairs_none_found(data):
    table = pairs(**data, probe_min=0.999, reference_max=-0.99)
    assert table.num_rows == 0 and table.schema == PAIRS_SCHEMA


# --- a scene-like blind spot, and cases ------------------------------------------------


def scene_data(n: int = 240):
    """Probe embedding: the scene's colours only (blind to shape); reference: shapes and
    colours. The probe should conflate scenes with the same colours and other shapes."""
    rng = np.random.default_rng(5)
    colours, shapes = list(PALETTE), list(SHAPES)
    scenes = [make_scene(11, i) for i in range(n)]
    xp = np.zeros((n, len(colours)))
    xr = np.zeros((n, len(colours) + len(shapes)))
    for i, s in enumerate(scenes):
        for o in s.objects:
            xp[i, colours.index(o.colour)] += 1
            xr[i, colours.index(o.colour)] += 1
            xr[i, len(colours) + shapes.index(o.shape)] += 2
    xp = normalise(xp + 0.05 * rng.normal(size=xp.shape))
    xr = normalise(xr + 0.05 * rng.normal(size=xr.shape))
    ids = np.array([f"scene-{i:06d}" for i in range(n)], dtype=object)
    corpus = pa.table(
        {
            "id": list(ids),
            "uri": [f"/data/images/scene-{i:06d}.jpg" for i in range(n)],
            "caption": [max(s.captions, key=len) for s in scenes],
            "captions": [list(s.captions) for s in scenes],
        }
    )
    return lists_for(ids, xp, xr), scenes, corpus


def test_scene_blind_spot_is_found():
    data, scenes, _ = scene_data()
    table = run_mine(data)
    row_of = {name: i for i, name in enumerate(data["ids"])}

    def shape_overlap(i, j):
        a, b = {o.shape for o in scenes[i].objects}, {o.shape for o in scenes[j].objects}
        return len(a & b) / len(a | b)

    only, ref_only = [], []
    for r in table.to_pylist()[:60]:
        i = row_of[r["id"]]
        only += [shape_overlap(i, row_of[j]) for j in r["probe_only"]]
        ref_only += [shape_overlap(i, row_of[j]) for j in r["reference_only"]]
    assert table.column("overlap").to_numpy()[:60].mean() < 0.6
    # probe-only neighbours share the colours but not the shapes
    assert np.mean(only) + 0.2 < np.mean(ref_only), (np.mean(only), np.mean(ref_only))


def test_cases_texts_follow_the_prompt_order():
    data, _, corpus = scene_data()
    table = run_mine(data)
    rows = corpus.to_pylist()
    caption = {r["id"]: r["caption"] for r in rows}
    uri = {r["id"]: r["uri"] for r in rows}
    out = cases(table, corpus, 25)
    assert out.schema == CASES_SCHEMA
    eligible = [r for r in table.to_pylist() if r["probe_only"]]
    assert out.column("id").to_pylist() == [r["id"] for r in eligible[:25]]
    for c, r in zip(out.to_pylist(), eligible, strict=False):
        assert c["rank"] == r["rank"]
        assert c["caption"] == caption[c["id"]] and c["uri"] == uri[c["id"]]
        assert c["neighbour_ids"] == r["probe_only"]
        assert c["neighbour_uris"] == [uri[j] for j in r["probe_only"]]
        assert c["texts"][0] == caption[c["id"]]
        assert c["texts"][1:] == [caption[j] for j in r["probe_only"]]
        assert c["neighbour_probe_cos"] == r["probe_only_probe_cos"]
        assert c["neighbour_reference_cos"] == r["probe_only_reference_cos"]


def test_cases_skip_images_without_probe_only_neighbours():
    rng = np.random.default_rng(2)
    x = normalise(rng.normal(size=(30, 8)))
    ids = np.array([f"a{i:02d}" for i in range(30)], dtype=object)
    data = lists_for(ids, x, x)  # identical models: no probe-only neighbour anywhere
    corpus = pa.table({"id": list(ids), "uri": ["u"] * 30, "caption": ["c"] * 30})
    assert cases(run_mine(data, k=5), corpus, 10).num_rows == 0


def test_cases_names_ids_missing_from_the_corpus():
    data, _, corpus = scene_data(60)
    table = run_mine(data)
    with pytest.raises(ValueError, match="not in the corpus"):
        cases(table, corpus.slice(0, 30), 10)
    with pytest.raises(ValueError, match="caption"):
        cases(table, corpus.drop_columns(["caption"]), 10)


def test_calibrated_gap_ranks_disagreement_not_scale():
    """Raw gaps change order when one model's cosines are rescaled; standardised ones do not."""
    from clipscan.stages.discrepancy import calibrated_gaps, cosine_scale

    rng = np.random.default_rng(5)
    probe = rng.uniform(0.6, 0.9, size=(50, 4))
    ref = rng.uniform(0.2, 0.8, size=(50, 4))
    mask = rng.random((50, 4)) < 0.6
    valid = np.ones_like(mask)
    base, _ = calibrated_gaps(probe, ref, mask, cosine_scale(probe, valid), cosine_scale(ref, valid))
    squeezed = 0.5 + 0.3 * ref  # a reference whose cosines sit higher and closer together
    again, _ = calibrated_gaps(probe, squeezed, mask, cosine_scale(probe, valid), cosine_scale(squeezed, valid))
    np.testing.assert_allclose(again, base, atol=1e-5)
    raw = np.where(mask, probe - ref, 0).sum(1) / np.maximum(mask.sum(1), 1)
    raw_squeezed = np.where(mask, probe - squeezed, 0).sum(1) / np.maximum(mask.sum(1), 1)
    assert not np.array_equal(np.argsort(-raw), np.argsort(-raw_squeezed))
    # by hand: one row, one pair; probe scale (0.8, 0.1), reference (0.5, 0.2)
    z, top = calibrated_gaps(np.array([[0.9]]), np.array([[0.3]]), np.array([[True]]), (0.8, 0.1), (0.5, 0.2))
    assert z[0] == pytest.approx((0.9 - 0.8) / 0.1 - (0.3 - 0.5) / 0.2) == pytest.approx(2.0) and top[0] == z[0]
    assert cosine_scale(np.array([[0.5]]), np.array([[True]])) == (0.5, 1.0)
