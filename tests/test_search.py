"""Tests for clipscan.stages.search and clipscan.stages.mine: the sharded search stage and the
streaming rank, pairs and cases against numpy brute force and the whole-table ``mine``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute
import pyarrow.parquet as pq
import pytest

from clipscan.arrays import embedding_array
from clipscan.columns import MissingColumns
from clipscan.stages import discrepancy as dc
from clipscan.stages import index as ix
from clipscan.stages import mine as mn
from clipscan.stages import search as sr
from tests import reference

K, DEPTH = 10, 40


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_pair(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A probe (d 16) and a reference (d 24) that agree in part, so overlaps spread."""
    rng = np.random.default_rng(seed)
    x_probe = normalise(rng.normal(size=(n, 16)))
    x_ref = normalise(np.concatenate([x_probe, 0.45 * rng.normal(size=(n, 8))], axis=1))
    return x_probe, normalise(x_ref + 0.08 * rng.normal(size=x_ref.shape))


def duplicate_pair(n: int = 240, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Many exact duplicates under both models (groups larger than k + 1), and rows that are
    duplicates under the probe only: massive ties at every cut."""
    rng = np.random.default_rng(seed)
    patterns = rng.choice([-0.25, 0.25], size=(20, 16)).astype(np.float32)
    group = rng.integers(0, 20, n)
    group[:30] = 0  # 30 copies of one image
    x_probe = patterns[group]
    ref_patterns = normalise(rng.normal(size=(40, 12)))
    x_ref = ref_patterns[np.where(rng.random(n) < 0.5, group, group + 20)]
    return x_probe, x_ref


def clustered_pair(n: int = 240, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Generated scenes' stand-in: clusters the probe merges in pairs and the reference keeps
    apart, so MMVP pairs exist in both directions."""
    rng = np.random.default_rng(seed)
    centres = normalise(rng.normal(size=(12, 24)))
    c = rng.integers(0, 12, n)
    x_ref = normalise(centres[c] + 0.05 * rng.normal(size=(n, 24)))
    merged = normalise(centres[c // 2 * 2][:, :16] + 0.02 * rng.normal(size=(n, 16)))
    x_probe = merged.copy()
    x_probe[: n // 4] = normalise(rng.normal(size=(n // 4, 16)))  # probe-far, reference-close
    return x_probe, x_ref


DATA = {"random": random_pair, "duplicates": duplicate_pair, "generated": clustered_pair}


def ids_for(n: int, seed: int = 0) -> np.ndarray:
    """Ids whose sorted order is not the row order (so sorting by id matters)."""
    perm = np.random.default_rng(seed + 100).permutation(n)
    return np.array([f"img-{i:05d}" for i in perm], dtype=object)


def brute_knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k, self excluded, ties by row: float64 scores rounded to float32."""
    s = (x.astype(np.float64) @ x.astype(np.float64).T).astype(np.float32)
    np.fill_diagonal(s, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(len(x)), s.shape), -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), order.astype(np.int64)


def sorted_inputs(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids sorted ascending with their vectors (the order the search numbers rows in)."""
    x_probe, x_ref = DATA[name]()
    ids = ids_for(len(x_probe))
    order = np.argsort(ids)
    return ids[order], x_probe[order], x_ref[order]


def vectors_table(ids: np.ndarray, x_probe: np.ndarray, x_ref: np.ndarray) -> pa.Table:
    return pa.table({"id": pa.array(list(ids), pa.string()), "probe": embedding_array(x_probe),
                     "reference": embedding_array(x_ref),
                     "uri": [f"mem://{i}" for i in ids], "caption": [f"a photo of {i}" for i in ids]})


def search_blocks(table: pa.Table, shards: int, block: int, **kwargs) -> pa.Table:
    """The search stage without Ray: Shard objects over contiguous id-sorted row ranges."""
    n = table.num_rows
    held = [sr.Shard.from_table(table.slice(lo, hi - lo), lo) for lo, hi in ix.shard_bounds(n, shards)]
    stage = sr.SearchBlock(held, K, DEPTH, **kwargs)
    shuffled = table.take(pa.array(np.random.default_rng(shards * 7 + block).permutation(n)))
    return pa.concat_tables([stage(shuffled.slice(s, block)) for s in range(0, n, block)])


def today(ids: np.ndarray, x_probe: np.ndarray, x_ref: np.ndarray, shards: int,
          rank_by: str = "overlap") -> tuple[pa.Table, pa.Table]:
    """Today's exact path: self_knn per model, then the whole-table mine and pairs."""
    probe_D, probe_I = ix.self_knn(x_probe, K, shards=shards, query_block=64)
    ref_D, ref_I = ix.self_knn(x_ref, DEPTH, shards=shards, query_block=64)
    table = reference.mine(ids, probe_D, probe_I, ref_D, ref_I, x_probe, x_ref, K, rank_by=rank_by)
    pairs = reference.pairs(ids, probe_D, probe_I, ref_D, ref_I, x_probe, x_ref, probe_min=0.9, reference_max=0.6, k=K)
    return table, pairs


def local_pairs(rows: pa.Table) -> pa.Table:
    """The stream's pair candidates, de-duplicated and ordered as ``write_pairs`` does."""
    flat = mn.pair_rows(rows).to_pylist()
    unique = {(p["direction"], p["id_a"], p["id_b"]): p for p in flat}
    out = sorted(unique.values(), key=lambda p: (p["direction"], -abs(np.float64(p["probe_cos"]) - np.float64(p["reference_cos"])), p["id_a"], p["id_b"]))
    return pa.Table.from_pylist(out, schema=dc.PAIRS_SCHEMA)


def assert_same_rows(got: pa.Table, want: pa.Table) -> None:
    """Ids and lists identical, cosines within 1e-6 (in practice the same bits)."""
    assert got.num_rows == want.num_rows
    for name in want.column_names:
        a, b = got.column(name).to_pylist(), want.column(name).to_pylist()
        if pa.types.is_list(want.schema.field(name).type) and pa.types.is_floating(want.schema.field(name).type.value_type):
            assert [len(r) for r in a] == [len(r) for r in b], name
            np.testing.assert_allclose(np.concatenate([np.asarray(r, float) for r in a] or [np.zeros(0)]),
                                       np.concatenate([np.asarray(r, float) for r in b] or [np.zeros(0)]),
                                       atol=1e-6, err_msg=name)
        elif pa.types.is_floating(want.schema.field(name).type):
            np.testing.assert_allclose(np.asarray(a, float), np.asarray(b, float), atol=1e-6, err_msg=name)
        else:
            assert a == b, name


# --- the stage without Ray, against today's path and numpy ------------------------------


@pytest.mark.parametrize("name", sorted(DATA))
@pytest.mark.parametrize("shards,block", [(1, 240), (2, 64), (3, 37), (3, 1000)])
def test_block_search_equals_today_and_brute_force(name: str, shards: int, block: int) -> None:
    ids, x_probe, x_ref = sorted_inputs(name)
    rows = search_blocks(vectors_table(ids, x_probe, x_ref), shards, block, probe_min=0.9)
    assert rows.schema == sr.SEARCH_SCHEMA
    want, want_pairs = today(ids, x_probe, x_ref, shards)
    got = rows.sort_by("id")
    want_by_id = want.sort_by("id").drop_columns(["rank", *sr.CALIBRATED])
    assert got.select(want_by_id.column_names).equals(want_by_id)  # the same bits as today
    # gap_z from the rows' lists and block-summed scales: the whole-table values, bit for bit
    scales = [dc.scale_of(sum(dc.cosine_moments(*_flat_valid(b, col)) for b in got.to_batches(max_chunksize=block)))
              for col in ("probe_cos", "reference_cos")]
    calibrated = dc.add_calibrated_gaps(got, *scales).select(["id", *sr.CALIBRATED])
    assert calibrated.equals(want.sort_by("id").select(["id", *sr.CALIBRATED]))
    # and today's exact lists are numpy's
    _, probe_I = brute_knn(x_probe, K)
    _, ref_I = brute_knn(x_ref, K)
    assert got.column("probe_neighbours").to_pylist() == [list(ids[r]) for r in probe_I]
    assert got.column("reference_neighbours").to_pylist() == [list(ids[r]) for r in ref_I]
    assert_same_rows(local_pairs(rows), want_pairs)
    if name == "generated":
        directions = set(want_pairs.column("direction").to_pylist())
        assert directions == {"probe_close", "reference_close"}, directions


def test_shard_replies_are_bounded_by_k_and_ranks_counted_where_the_lists_are() -> None:
    """The reference lists to the mining depth stay on the shards: each reply carries k + 1
    columns whatever the depth, the ranks are counted there and summed, and the kept lists
    are let go once counted."""
    ids, x_probe, x_ref = sorted_inputs("generated")
    table = vectors_table(ids, x_probe, x_ref)
    held = [sr.Shard.from_table(table.slice(lo, hi - lo), lo) for lo, hi in ix.shard_bounds(table.num_rows, 3)]
    replies: list[dict] = []
    for shard in held:
        search = shard.search

        def spy(*a, _search=search, **kw):  # type: ignore[no-untyped-def]
            out = _search(*a, **kw)
            replies.append(out)
            return out

        shard.search = spy  # type: ignore[method-assign]
    stage = sr.SearchBlock(held, K, DEPTH)
    rows = stage(table.slice(0, 50))
    assert replies and all(r[m]["ids"].shape[1] == K + 1 for r in replies for m in ("probe", "reference"))
    assert all(not shard._held for shard in held)
    want, _ = today(ids, x_probe, x_ref, 3)
    wanted = want.sort_by("id").filter(pyarrow.compute.is_in(want.sort_by("id").column("id"),
                                                             value_set=rows.column("id"))).sort_by("id")
    got = rows.sort_by("id")
    assert got.column("probe_only_reference_rank").to_pylist() == wanted.column("probe_only_reference_rank").to_pylist()
    assert any(r is None for rr in got.column("probe_only_reference_rank").to_pylist() for r in rr)  # beyond the depth
    assert any(r for rr in got.column("probe_only_reference_rank").to_pylist() for r in rr if r)
    shallow = sr.SearchBlock(held, K, K)(table.slice(0, 50))  # a reference list no deeper than k
    assert shallow.column("reference_neighbours").equals(rows.column("reference_neighbours"))
    assert all(not shard._held for shard in held)
    # a shard that restarts between the search and the count has lost its lists: the block is searched again
    restarted = held[1]
    count = restarted.count_before
    calls: list[int] = []

    def lost_once(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            restarted._held.clear()
        return count(*a, **kw)

    restarted.count_before = lost_once  # type: ignore[method-assign]
    assert stage(table.slice(0, 50)).equals(rows) and len(calls) == 2
    assert all(not shard._held for shard in held)


def _flat_valid(batch: pa.RecordBatch, column: str) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow.compute as pc

    values = pc.list_flatten(batch.column(column)).to_numpy(zero_copy_only=False)
    return values, np.ones(values.shape, dtype=bool)


def test_brute_force_cosines_and_ranks() -> None:
    ids, x_probe, x_ref = sorted_inputs("random")
    rows = search_blocks(vectors_table(ids, x_probe, x_ref), 2, 50).sort_by("id")
    s_ref = x_ref.astype(np.float64) @ x_ref.astype(np.float64).T
    np.fill_diagonal(s_ref, -np.inf)
    row_of = {v: i for i, v in enumerate(ids)}
    for r in rows.to_pylist()[:60]:
        i = row_of[r["id"]]
        only = [row_of[j] for j in r["probe_only"]]
        np.testing.assert_allclose(r["probe_only_reference_cos"], s_ref[i, only], atol=1e-6)
        full = np.argsort(-s_ref[i], kind="stable")
        ranks = [int(np.flatnonzero(full == j)[0]) + 1 for j in only]
        assert r["probe_only_reference_rank"] == [rk if rk <= DEPTH else None for rk in ranks]


def test_approximate_shards_measure_recall() -> None:
    ids, x_probe, x_ref = sorted_inputs("random")
    table = vectors_table(ids, x_probe, x_ref)
    shards = [sr.Shard.from_table(table.slice(lo, hi - lo), lo, index="IVF,Flat", nprobe=1) for lo, hi in ix.shard_bounds(240, 2)]
    everything = [sr.Shard.from_table(table.slice(lo, hi - lo), lo, index="IVF4,Flat", nprobe=4) for lo, hi in ix.shard_bounds(240, 2)]
    sample = np.arange(0, 240, 3)
    low = sr.SearchBlock(shards, K, DEPTH, recall_rows=sample)(table)
    full = sr.SearchBlock(everything, K, DEPTH, recall_rows=sample)(table)
    for col in sr.RECALL_COLUMNS:
        assert low.column(col).null_count == full.column(col).null_count == 240 - len(sample)
        assert np.nanmean(full.column(col).to_numpy(zero_copy_only=False)) == 1.0  # every list probed: exact
        assert 0.2 < np.nanmean(low.column(col).to_numpy(zero_copy_only=False)) < 1.0


def test_sized_index_and_missing_ids() -> None:
    assert sr.sized_index("IVF,Flat", 10_000) == "IVF400,Flat"
    assert sr.sized_index("IVF4096,Flat", 10) == "IVF4096,Flat"
    assert sr.sized_index("OPQ16,IVF,PQ16", 100) == "OPQ16,IVF40,PQ16"
    ids, x_probe, x_ref = sorted_inputs("random")
    table = vectors_table(ids, x_probe, x_ref)
    stage = sr.SearchBlock([sr.Shard.from_table(table.slice(0, 100), 0)], K, DEPTH)
    with pytest.raises(RuntimeError, match="in no shard"):
        stage(table.slice(150, 10))
    with pytest.raises(MissingColumns, match=r"stage .search. needs columns \[.reference.\]"):
        stage(table.select(["id", "probe"]))


def test_one_model_shards_search_and_hand_out_vectors() -> None:
    """TCAC's captions: shards of one model (``text``) search like DAF's and give the vectors
    of the ids asked, from whichever shard holds them."""
    x = normalise(np.random.default_rng(7).normal(size=(90, 12)))
    ids = np.array([f"caption {i:03d}" for i in range(90)], dtype=object)  # sorted: row = caption id
    table = pa.table({"id": pa.array(ids, pa.string()), "text": embedding_array(x)})
    bounds = ix.shard_bounds(len(ids), 3)
    shards = [sr.Shard.from_table(table.slice(lo, hi - lo), lo, models=("text",)) for lo, hi in bounds]
    sims, rows = brute_knn(x, 5)
    answers = [s.search(ids, {"text": x}, {"text": 6}, 6) for s in shards]
    merged = sr.merge_answers(answers, "text", 6, np.max([a["self"] for a in answers], axis=0))
    assert np.array_equal(merged["ids"], rows) and np.array_equal(merged["sims"], sims)
    assert np.array_equal(merged["cos_text"], sims)
    assert merged["names"].tolist() == ids[rows].tolist()

    asked = np.array(["caption 004", "nope", "caption 089", "caption 045"], dtype=object)
    parts = [s.vectors(asked) for s in shards]
    got_rows = np.max([p["rows"] for p in parts], axis=0)
    assert got_rows.tolist() == [4, -1, 89, 45]
    got = sum(p["text"] for p in parts)  # each vector comes from one shard, zeros from the others
    assert np.array_equal(got[[0, 2, 3]], x[[4, 89, 45]]) and not got[1].any()


def test_plan_shards_per_node() -> None:
    cpu = [("head", 0.0, 0.0), ("a", 16.0, 0.0), ("b", 8.0, 0.0)]
    plans = sr.plan_shards(cpu)
    assert [(p.node_id, p.num_cpus, p.threads, p.num_gpus) for p in plans] == [("a", 15.0, 16, 0), ("b", 7.0, 8, 0)]
    plans = sr.plan_shards(cpu, shards=3)
    assert sorted(p.node_id for p in plans) == ["a", "a", "b"]
    assert {p.num_cpus for p in plans if p.node_id == "a"} == {7.5}
    gpu = [("head", 8.0, 0.0), ("g1", 32.0, 4.0), ("g2", 16.0, 2.0)]
    plans = sr.plan_shards(gpu)
    assert len(plans) == 6 and all(p.num_gpus == 1 for p in plans) and "head" not in {p.node_id for p in plans}
    assert sr.plan_shards([("local", 2.0, 0.0)], shards=3)[0].num_cpus == pytest.approx(1 / 3, abs=1e-3)
    with pytest.raises(RuntimeError, match="no node"):
        sr.plan_shards([("head", 0.0, 0.0)])


# --- the pipeline on Ray -----------------------------------------------------------------


def write_run(run, table: pa.Table, parts: int) -> None:
    """``table``'s rows, in its order, as a run's ``corpus/`` and ``embeddings/<model>/`` parts."""
    from clipscan import fs as cfs

    for i, rows in enumerate(np.array_split(np.arange(table.num_rows), parts)):
        part = table.take(pa.array(rows))
        cfs.write_parquet_atomic(str(run / "corpus" / f"part-{i:05d}.parquet"), part.select(["id", "uri", "caption"]))
        for model in ("probe", "reference"):
            cfs.write_parquet_atomic(str(run / "embeddings" / model / f"part-{i:05d}.parquet"),
                                     pa.table({"id": part.column("id"), "embedding": part.column(model)}))


def check_mined(out, result, ids, x_probe, x_ref, shards: int, rank_by: str, cases: int) -> None:
    """The mine stage's parts, top cases, pairs and figures against today's whole-table path
    over the rows in their input order (``ids``, ``x_*``: the run's order, ties by it)."""
    from clipscan.pipeline.executor import Local

    want, want_pairs = today(ids, x_probe, x_ref, shards, rank_by)
    got = pq.read_table(out / "d")
    assert got.schema == dc.IMAGES_SCHEMA
    assert got.column("id").to_pylist() == list(ids)  # every image once, in the input order
    at = {i: r for r, i in enumerate(want.column("id").to_pylist())}
    want_in_order = want.take(pa.array([at[i] for i in ids])).drop_columns(["rank"])
    assert got.equals(want_in_order)  # every cosine: the same bits
    has_only = want.filter(pa.compute.greater(pa.compute.list_value_length(want.column("probe_only")), 0))
    assert result.candidates.equals(has_only.slice(0, cases))  # the top cases with their global ranks
    got_pairs = pq.read_table(out / "p")
    assert result.pairs == got_pairs.num_rows == want_pairs.num_rows
    assert_same_rows(got_pairs, want_pairs)
    expected = mn.Figures.of_table(want)
    figures = result.figures
    assert figures.images == len(ids) and figures.k == K
    np.testing.assert_array_equal(figures.overlap_counts, expected.overlap_counts)
    assert figures.mean_overlap == pytest.approx(float(want.column("overlap").to_numpy().astype(np.float64).mean()))
    for c in ("px", "py", "ox", "oy"):
        np.testing.assert_array_equal(np.sort(figures.points[c]), np.sort(expected.points[c]))
    some = set(ids[::17])
    ranks = mn.ranks_of(str(out / "d"), some, rank_by, Local())
    assert ranks == {i: r for i, r in zip(want.column("id").to_pylist(), want.column("rank").to_pylist(), strict=True)
                     if i in some}


def shuffled_run(name: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, pa.Table]:
    """A corpus whose input order is not its id order: ids, both models' vectors and the table, in input order."""
    ids, x_probe, x_ref = sorted_inputs(name)
    order = np.random.default_rng(seed).permutation(len(ids))
    ids, x_probe, x_ref = ids[order], x_probe[order], x_ref[order]
    return ids, x_probe, x_ref, vectors_table(ids, x_probe, x_ref)


# 1, 2 and 3 shard actors over the same run: the same bits as the in-process twin and as
# today's whole-table path; each per-part step of the mine stage runs as a Ray task
@pytest.mark.parametrize("shards,block,rank_by", [(1, 64, "gap"), (2, 50, "overlap"), (3, 97, "max_gap")])
def test_search_and_mine_on_ray_equal_today(ray_local: None, tmp_path, shards: int, block: int, rank_by: str) -> None:
    from clipscan.pipeline.executor import RayTasks
    from clipscan.stages.run_search import RunSearch

    name = {1: "random", 2: "duplicates", 3: "generated"}[shards]
    ids, x_probe, x_ref, table = shuffled_run(name, shards)
    write_run(tmp_path / "run", table, parts=4)
    with RunSearch(str(tmp_path / "run"), where="ray", k=K, rank_depth=DEPTH, shards=shards, query_block=block,
                   probe_min=0.9) as stage:
        assert stage.facts["shards"] == shards and stage.facts["nodes"] == 1 and stage.facts["index"] == "exact"
        stage.write(str(tmp_path / "search"))
        deep = stage.reference_lists(list(ids[:5]))
    _, ref_I = brute_knn(x_ref, DEPTH)
    assert deep == {i: list(ids[r]) for i, r in zip(ids[:5], ref_I[:5], strict=True)}
    result = mn.mine(str(tmp_path / "search"), str(tmp_path / "d"), str(tmp_path / "p"), rank_by, K,
                     RayTasks(in_flight=2), cases=25)
    check_mined(tmp_path, result, ids, x_probe, x_ref, 1, rank_by, 25)


# the in-process twin: the same stages, one shard in this process, every step here
@pytest.mark.parametrize("name,block,rank_by,parts", [("random", 64, "overlap", 3), ("duplicates", 37, "jaccard", 1),
                                                     ("generated", 240, "gap", 5)])
def test_local_search_and_mine_equal_today(tmp_path, name: str, block: int, rank_by: str, parts: int) -> None:
    from clipscan.pipeline.executor import Local
    from clipscan.stages.run_search import RunSearch

    ids, x_probe, x_ref, table = shuffled_run(name, parts)
    write_run(tmp_path / "run", table, parts)
    with RunSearch(str(tmp_path / "run"), k=K, rank_depth=DEPTH, query_block=block, probe_min=0.9) as stage:
        stage.write(str(tmp_path / "search"))
        assert stage.facts["blocks_reused"] == 0 and stage.facts["where"] == "local"
        deep = stage.reference_lists(list(ids[:5]))
    _, ref_I = brute_knn(x_ref, DEPTH)
    assert deep == {i: list(ids[r]) for i, r in zip(ids[:5], ref_I[:5], strict=True)}
    result = mn.mine(str(tmp_path / "search"), str(tmp_path / "d"), str(tmp_path / "p"), rank_by, K, Local(), cases=25)
    check_mined(tmp_path, result, ids, x_probe, x_ref, 1, rank_by, 25)
    assert mn.corpus_rows(str(tmp_path / "run"), set(ids[:3]), Local()).sort_by("id").column("id").to_pylist() == \
        sorted(ids[:3])


def test_mine_keeps_the_parts_a_killed_run_wrote(tmp_path) -> None:
    """A rerun of the mine stage keeps every discrepancy part (and its pair candidates) written
    from the same search parts and settings: the same outputs; another seed mines again."""
    from clipscan.pipeline.executor import Local
    from clipscan.stages.run_search import RunSearch

    _, _, _, table = shuffled_run("generated", 0)
    write_run(tmp_path / "run", table, 4)
    search, out, pairs = tmp_path / "search", tmp_path / "d", tmp_path / "p"
    with RunSearch(str(tmp_path / "run"), k=K, rank_depth=DEPTH, query_block=40, probe_min=0.9) as stage:
        stage.write(str(search))

    def run(seed: int = 0) -> mn.Mined:
        return mn.mine(str(search), str(out), str(pairs), "overlap", K, Local(), seed=seed, cases=20)

    clean = run()
    assert clean.reused == 0 and clean.pairs > 0
    discrepancies, pair_table = pq.read_table(out), pq.read_table(pairs)
    assert run().reused == 0  # the pair candidates of a finished stage are gone: mined again

    def killed(*a, **kw):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:  # killed once every part is mined, before the pairs
        patch.setattr(mn, "write_pairs", killed)
        with pytest.raises(KeyboardInterrupt):
            run()
    parts = sorted(out.glob("part-*.parquet"))
    for part in parts[2:]:  # and two parts lost
        part.unlink()
    again = run()
    assert again.reused == 2
    assert pq.read_table(out).equals(discrepancies) and pq.read_table(pairs).equals(pair_table)
    assert again.candidates.equals(clean.candidates) and again.pairs == clean.pairs
    assert again.figures.overlap_counts.tolist() == clean.figures.overlap_counts.tolist()
    assert run(seed=1).reused == 0


def test_search_keeps_the_blocks_a_killed_run_wrote(tmp_path) -> None:
    """A rerun keeps every block it finds (the same plan) and computes the rest: the same bits;
    another plan (here knn.k) starts over."""
    from clipscan.stages.run_search import RunSearch

    _, _, _, table = shuffled_run("random", 0)
    write_run(tmp_path / "run", table, 3)
    search = tmp_path / "search"
    with RunSearch(str(tmp_path / "run"), k=K, rank_depth=DEPTH, query_block=30) as stage:
        stage.write(str(search))
        assert stage.facts["blocks"] == 9 and stage.facts["blocks_reused"] == 0
    first = {p.name: pq.read_table(p) for p in search.glob("part-*.parquet")}
    for p in sorted(search.glob("part-*.parquet"))[4:]:  # killed after four blocks
        p.unlink()
    with RunSearch(str(tmp_path / "run"), k=K, rank_depth=DEPTH, query_block=30) as stage:
        stage.write(str(search))
        assert stage.facts["blocks_reused"] == 4
    assert {p.name: pq.read_table(p) for p in search.glob("part-*.parquet")} == first
    with RunSearch(str(tmp_path / "run"), k=5, rank_depth=DEPTH, query_block=30) as stage:
        stage.write(str(search))
        assert stage.facts["blocks_reused"] == 0
    # parts rewritten with their rows in another order (another join's output): no block is kept
    write_run(tmp_path / "run", table.take(pa.array(np.arange(table.num_rows)[::-1])), 3)
    with RunSearch(str(tmp_path / "run"), k=5, rank_depth=DEPTH, query_block=30) as stage:
        stage.write(str(search))
        assert stage.facts["blocks_reused"] == 0


def test_plot_sample_is_bounded_and_seeded() -> None:
    assert mn.plot_fraction(10**8, 10) == mn.PLOT_POINTS / 10**9 and mn.plot_fraction(50, 10) == 1.0
    ids = pa.array([f"img-{i}" for i in range(100_000)])
    kept = mn.plot_sample(ids, 0.02, seed=3)
    assert 1700 < kept.sum() < 2300
    np.testing.assert_array_equal(kept, mn.plot_sample(ids, 0.02, seed=3))
    np.testing.assert_array_equal(kept[500:], mn.plot_sample(ids.slice(500), 0.02, seed=3))  # by id, not position
    assert not np.array_equal(kept, mn.plot_sample(ids, 0.02, seed=4))


def test_count_before_equals_a_sort() -> None:
    rng = np.random.default_rng(0)
    rows = pa.table({"overlap": rng.integers(0, 3, 500).astype(np.float32) / 2,
                     "gap": rng.integers(0, 4, 500).astype(np.float32), "id": [f"i{j:04d}" for j in rng.permutation(500)]})
    order = rows.take(pc_sort(rows)).column("id").to_pylist()
    keys = rows.slice(100, 40)
    got = mn.count_before(rows, keys, "overlap")
    assert got.tolist() == [order.index(i) for i in keys.column("id").to_pylist()]
    outside = keys.set_column(2, "id", pa.array([i + "x" for i in keys.column("id").to_pylist()]))
    assert mn.count_before(rows, outside, "overlap").tolist() == [order.index(i) + 1 for i in keys.column("id").to_pylist()]


def pc_sort(rows: pa.Table) -> pa.Array:
    import pyarrow.compute as pc

    return pc.sort_indices(rows, sort_keys=mn.SORT_KEYS["overlap"])


def test_ivf_flat_shard_keeps_one_copy_and_answers_as_a_flat_one() -> None:
    """An IVF-Flat shard drops its own vectors once the lists hold them: exact search (the
    recall baseline), the carried cosines and ``vectors`` read the lists back and give the
    same bits as a Flat shard; a lossy index keeps the vectors beside its codes."""
    ids, x_probe, x_ref = sorted_inputs("random")
    table = vectors_table(ids, x_probe, x_ref)
    flat = sr.Shard.from_table(table, 0)
    lists = sr.Shard.from_table(table, 0, index="IVF4,Flat", nprobe=1)
    assert lists.x == {} and sorted(flat.x) == list(sr.MODELS)
    depth = {"probe": K + 1, "reference": DEPTH + 1}
    a, b = (s.search(ids, {"probe": x_probe, "reference": x_ref}, depth, K + 1, exact=True) for s in (flat, lists))
    for model in sr.MODELS:
        for col in ("sims", "ids", "cos_probe", "cos_reference"):
            assert np.array_equal(a[model][col], b[model][col], equal_nan=True), (model, col)
    asked = np.array([ids[5], "nope", ids[200]], dtype=object)
    got, want = lists.vectors(asked), flat.vectors(asked)
    assert got["rows"].tolist() == [5, -1, 200]
    assert all(np.array_equal(got[m], want[m]) for m in sr.MODELS)
    lossy = sr.Shard.from_table(table, 0, index="IVF4,SQ8", nprobe=4)
    assert sorted(lossy.x) == list(sr.MODELS)


def test_sorted_ids_find_rows_through_hash_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ids are found by a 64-bit hash confirmed against the Arrow ids; where hashes collide
    (forced here: two hash values for all ids) the rows are still exact."""
    names = np.array(sorted(f"img-{i}" for i in range(300)), dtype=object)
    asked = np.array([names[0], "img-x", names[299], names[150], "zzz", names[7]], dtype=object)
    want = [0, -1, 299, 150, -1, 7]
    assert sr.ShardIds(pa.array(names, pa.string())).find(asked).tolist() == want
    monkeypatch.setattr(dc, "hash_ids", lambda ids: np.array([len(s) % 2 for s in ids], dtype=np.uint64))
    assert sr.ShardIds(names).find(asked).tolist() == want
    assert sr.ShardIds(names[::-1]).find(asked).tolist() == [299, -1, 0, 149, -1, 292]  # any row order
    with pytest.raises(ValueError, match="repeated ids"):
        sr.ShardIds(np.concatenate([names, names[:1]]))


@pytest.mark.parametrize("index", ["Flat", "IVF4,Flat"])
def test_models_searched_side_by_side_give_the_same_bits_as_one_after_another(index: str) -> None:
    """A shard with two threads searches its two models at once, one thread each; with one
    thread, one after the other: every array of the answer is the same bits."""
    ids, x_probe, x_ref = sorted_inputs("generated")
    table = vectors_table(ids, x_probe, x_ref)
    queries = {"probe": x_probe[::3], "reference": x_ref[::3]}
    depth = {"probe": K + 1, "reference": DEPTH + 1}
    answers = []
    for threads in (1, 2):
        shard = sr.Shard.from_table(table, 0, index=index, nprobe=2, threads=threads)
        answers.append(shard.search(ids[::3], queries, depth, K + 1))
    one, two = answers
    np.testing.assert_array_equal(one["self"], two["self"])
    for model in depth:
        for key, value in one[model].items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(value, two[model][key], err_msg=f"{model} {key}")
            else:
                assert value.equals(two[model][key]), (model, key)
    import faiss

    assert faiss.omp_get_max_threads() == 2  # the shard's threads, untouched by the per-model ones


def test_one_shard_puts_shuffled_rows_in_id_order_and_refuses_repeated_ids(ray_local: None) -> None:
    """The shard actor of a one-shard search takes rows in any order: it holds them in id
    order (the rows a sorted input gives); a repeated id is refused, naming the shard."""
    import ray
    import ray.data

    ids, x_probe, x_ref = sorted_inputs("random")
    table = vectors_table(ids, x_probe, x_ref).select(["id", "probe", "reference"])
    shuffled = table.take(pa.array(np.random.default_rng(5).permutation(table.num_rows)))
    actor = ray.remote(sr._ShardActor).remote(
        ray.data.from_arrow([shuffled.slice(s, 50) for s in range(0, table.num_rows, 50)]).to_arrow_refs(),
        0, "Flat", 1, 1000, 0, 1)
    got = ray.get(actor.vectors.remote(ids))
    np.testing.assert_array_equal(got["rows"], np.arange(len(ids)))
    np.testing.assert_array_equal(got["probe"], x_probe)
    np.testing.assert_array_equal(got["reference"], x_ref)
    ray.kill(actor)

    repeated = pa.concat_tables([shuffled, shuffled.slice(0, 1)])
    bad = ray.remote(sr._ShardActor).remote([ray.put(repeated)], 0, "Flat", 1, 1000, 0, 1)
    with pytest.raises(ray.exceptions.RayActorError, match="repeated ids"):
        ray.get(bad.rows.remote())
