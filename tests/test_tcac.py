"""Tests for the TCAC job: caption pool, scoring, bad inputs, determinism and the job end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from clipscan.columns import MissingColumns
from clipscan.stages.rows import ShardSink
from clipscan.stages.tcac.collect import _skip_repeats, collect
from clipscan.stages.tcac.figures import Figures, caption_shifts, summarise
from clipscan.stages.tcac.pool import CAPTION_MODEL, ShardPool, distinct_texts, text_digest
from clipscan.stages.tcac.repeats import _first_of_id, _firsts_of, _repeats_of
from clipscan.stages.tcac.score import (
    OUTPUT_COLUMNS,
    ROW_SCHEMA,
    TcacScore,
    build_tcac,
    score_versions,
    scoring_batch,
)
from clipscan.stages.text import forward_fixed
from clipscan.stages.transforms import SeededTransforms
from tests import corpora
from tests.conftest import TINY_PROBE, load_job, run_without_ray

ROOT = Path(__file__).resolve().parents[1]
TRANSFORMS = {"rot0": {"op": "rotation", "degrees": 0}, "hflip": {"p": 1.0}, "elastic": {"alpha": 50.0, "sigma": 5.0}}


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------
# Caption pool


def test_distinct_texts_of_the_usable_rows() -> None:
    rows = pa.table({
        "id": ["a", "b", "c", "a", "d"],
        "captions": [["x", "y", "x"], ["y", "z"], ["w"], ["q"], []],
        "skip_stage": ["", "", "read", "", None],
    })
    assert sorted(distinct_texts(rows).column("text").to_pylist()) == ["q", "x", "y", "z"]  # not skipped c's


def _shards(texts: list[str], emb: np.ndarray, n: int, **kwargs: Any) -> list[Any]:
    """``n`` in-process caption shards over ``texts`` (sorted) and their vectors."""
    from clipscan.arrays import embedding_array
    from clipscan.stages import index as ix
    from clipscan.stages.search import Shard

    table = pa.table({"id": pa.array(texts, pa.string()), "embedding": embedding_array(emb)})
    return [Shard.from_table(table.slice(lo, hi - lo), lo, models=(CAPTION_MODEL,), **kwargs)
            for lo, hi in ix.shard_bounds(len(texts), n)]


def brute_force_pool(x: np.ndarray, own: list[list[int]], k: int) -> list[list[int]]:
    sims = x.astype(np.float64) @ x.astype(np.float64).T
    np.fill_diagonal(sims, -np.inf)
    near = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    pools = []
    for mine in own:
        pool = list(dict.fromkeys(mine))
        for c in mine:
            pool += [int(j) for j in near[c] if j not in pool]
        pools.append(pool)
    return pools


@pytest.mark.parametrize("shards", [1, 3])
def test_pool_matches_numpy_brute_force(shards: int) -> None:
    rng = np.random.default_rng(0)
    m, k = 80, 6
    x = unit(rng, m, 16)
    texts = [f"t{j:03d}" for j in range(m)]  # sorted: row j is text j
    own = [sorted(rng.choice(m, size=int(rng.integers(1, 6)), replace=False).tolist()) for _ in range(25)]
    pools = ShardPool(_shards(texts, x, shards), k).pools([[texts[c] for c in mine] for mine in own])
    for mine, want, pool in zip(own, brute_force_pool(x, own, k), pools, strict=True):
        assert pool is not None and pool.texts.tolist() == [texts[c] for c in want] and pool.n_own == len(mine)
        np.testing.assert_array_equal(pool.emb, x[want])


# ---------------------------------------------------------------------------------------
# Scoring


def test_score_versions_against_softmax_reference() -> None:
    rng = np.random.default_rng(1)
    z, text = unit(rng, 4, 8), unit(rng, 12, 8)
    s = score_versions(z, text, n_own=2, logit_scale=30.0, top=5)
    logits = 30.0 * z.astype(np.float64) @ text.astype(np.float64).T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")
    np.testing.assert_array_equal(s.top, order[:, :5])
    np.testing.assert_allclose(s.p, np.take_along_axis(p, order[:, :5], 1), rtol=1e-6)
    ranks = np.argsort(order, axis=1) + 1
    np.testing.assert_array_equal(s.own_rank, ranks[:, :2].min(1))
    for t in range(1, 4):
        assert s.changed[t - 1] == 5 - len(set(order[0, :5]) & set(order[t, :5]))
        np.testing.assert_allclose(s.kl[t - 1], (p[0] * np.log(p[0] / p[t])).sum(), rtol=1e-5)
    same = score_versions(np.repeat(z[:1], 3, 0), text, 2, 30.0, 5)
    assert not same.changed.any() and not same.kl.any() and len(set(same.own_rank)) == 1
    # changes beyond the margin, brute force: an entered caption counts when it gained at
    # least the margin on every caption that left
    for margin in (0.0, 0.01, 0.05):
        m = score_versions(z, text, n_own=2, logit_scale=30.0, top=5, margin=margin)
        for t in range(1, 4):
            entered = [c for c in order[t, :5] if c not in order[0, :5]]
            left = [d for d in order[0, :5] if d not in order[t, :5]]
            want = sum(all((p[t, c] - p[t, d]) - (p[0, c] - p[0, d]) >= margin for d in left) for c in entered)
            assert m.changed_margin[t - 1] == want <= m.changed[t - 1]
    assert (score_versions(z, text, 2, 30.0, 5, margin=0.0).changed_margin == s.changed).all()


def test_near_tie_swap_is_not_a_change_beyond_the_margin() -> None:
    # two captions almost equally close to the image: a tiny nudge swaps them at the k-th place
    text = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    z0 = np.array([0.9, 0.3, 0.3 - 1e-4], dtype=np.float64)
    z1 = np.array([0.9, 0.3 - 1e-4, 0.3], dtype=np.float64)
    z = np.stack([z0 / np.linalg.norm(z0), z1 / np.linalg.norm(z1)]).astype(np.float32)
    s = score_versions(z, text, n_own=1, logit_scale=100.0, top=2, margin=0.01)
    assert s.changed.tolist() == [1] and s.changed_margin.tolist() == [0]


def test_forward_fixed_same_bits_whatever_the_split() -> None:
    from clipscan.models.registry import load_encoder

    enc = load_encoder(TINY_PROBE)
    x = np.random.default_rng(2).integers(0, 256, size=(11, 32, 32, 3), dtype=np.uint8)
    pad = np.zeros((32, 32, 3), np.uint8)
    whole = forward_fixed(enc.embed_images, x, 8, pad)
    parts = np.concatenate([forward_fixed(enc.embed_images, x[i:i + 3], 8, pad) for i in range(0, 11, 3)])
    np.testing.assert_array_equal(whole, parts)
    texts = ["a red circle", "two objects", "x", "a blue star on grey"]
    np.testing.assert_array_equal(forward_fixed(enc.embed_texts, texts, 4, ""),
                                  np.concatenate([forward_fixed(enc.embed_texts, [t], 4, "") for t in texts]))


def test_scoring_batch_fills_whole_forward_passes() -> None:
    assert scoring_batch(16, 64, 2) == 32 and scoring_batch(64, 64, 8) == 64
    assert scoring_batch(5, 16, 4) == 8 and scoring_batch(16, 64, 7) == 64
    assert scoring_batch(8, 64, 7) == 8  # 64 images would be too many: padding is cheaper


def _pool_for(enc, captions: dict[str, list[str]], k: int = 4, shards: int = 1) -> ShardPool:
    texts = sorted({t for caps in captions.values() for t in caps})
    return ShardPool(_shards(texts, forward_fixed(enc.embed_texts, texts, 16, ""), shards), k)


def test_score_stage_identity_and_shared_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    from clipscan.models.registry import load_encoder

    enc = load_encoder(TINY_PROBE)
    caps = {f"s{i}": [f"caption {i} {w}" for w in ("red", "blue", "round")] for i in range(6)}
    pool = _pool_for(enc, caps)
    st = SeededTransforms(TRANSFORMS, seed=0)
    pixels = np.random.default_rng(3).integers(0, 256, size=(6, 48, 48, 3), dtype=np.uint8)
    ids = list(caps)
    versions = np.stack([np.concatenate([p[None], st(p, i)]) for p, i in zip(pixels, ids, strict=True)])
    batch = {
        "id": np.array(ids + ["bad"], dtype=object), "uri": np.array([""] * 7, dtype=object),
        "caption": np.array(["c"] * 7, dtype=object),
        "captions": np.array([caps[i] for i in ids] + [None], dtype=object),
        "versions": np.concatenate([versions, np.zeros((1, *versions.shape[1:]), np.uint8)]),
        "skip_stage": np.array([""] * 6 + ["decode"], dtype=object),
        "skip_reason": np.array([""] * 6 + ["zero-byte file"], dtype=object),
    }
    stage = TcacScore(TINY_PROBE, pool, list(TRANSFORMS), top=5, forward_rows=8)
    monkeypatch.setattr(stage.encoder, "embed_texts", lambda texts: pytest.fail("text embedded per image"))
    out = stage(batch)
    assert out.schema == ROW_SCHEMA and out.num_rows == 6 * 3 + 1
    skip = out.filter(pc.equal(out.column("skip_stage"), "decode")).to_pylist()
    assert [(r["id"], r["transform"], r["skip_reason"]) for r in skip] == [("bad", "", "zero-byte file")]
    rows = [r for r in out.to_pylist() if not r["skip_stage"]]
    for r in rows:
        assert len(r["top_before"]) == min(5, r["pool_size"]) and r["own_captions"] == caps[r["id"]]
        if r["pool_size"] <= 5:
            assert abs(sum(r["p_before"]) - 1) < 1e-5
    identity = [r for r in rows if r["transform"] == "rot0"]
    assert len(identity) == 6
    for r in identity:
        assert r["changed"] == 0 and r["kl"] == 0 and r["top_after"] == r["top_before"]
        assert r["own_rank_after"] == r["own_rank_before"] and r["p_after"] == r["p_before"]
    # the stage's result does not depend on how the rows are batched
    halves = [stage({k: v[s] for k, v in batch.items()}) for s in (slice(0, 4), slice(4, 7))]
    assert pa.concat_tables(halves).equals(out)

    # the same rows scored against three caption shards give the same table
    sharded = TcacScore(TINY_PROBE, _pool_for(enc, caps, shards=3), list(TRANSFORMS), top=5, forward_rows=8)
    assert sharded(batch).equals(out)
    with pytest.raises(MissingColumns, match=r"'tcac-score' needs columns \['captions'\]; it has \["):
        sharded({k: v for k, v in batch.items() if k != "captions"})


# ---------------------------------------------------------------------------------------
# With Ray


def _cfg(manifest: Path | str, out: Path, *extra: str):
    from clipscan.config import TcacConfig, load_config

    return load_config(TcacConfig, None, [
        f"data.path={manifest}", f"output={out}", f"models.probe={TINY_PROBE}", "embed.image_size=48",
        "embed.batch_size=8", f"tcac.transforms={json.dumps(TRANSFORMS)}", "tcac.pool_k=4", "tcac.top=5",
        "tcac.forward_rows=16", *extra,
    ])


def test_bad_images_skipped_with_reasons(tmp_path: Path, ray_local: None) -> None:
    import ray

    from clipscan.arrays import embedding_array
    from clipscan.data.corpus import read_corpus
    from clipscan.data.read import read_table
    from clipscan.models.registry import load_encoder
    from clipscan.pipeline.cluster import configure_data_context
    from clipscan.stages.search import DatasetShards

    manifest, expected = corpora.bad_corpus(tmp_path / "bad")
    cfg = _cfg(manifest, tmp_path / "run", "data.max_pixels=100000", "data.rows_per_block=4")
    configure_data_context()
    texts = sorted(distinct_texts(read_table(cfg.data)[0]).column("text").to_pylist())
    emb = forward_fixed(load_encoder(TINY_PROBE).embed_texts, texts, 16, "")
    vectors = ray.data.from_arrow(pa.table({"id": texts, "embedding": embedding_array(emb)}))
    ds, info = read_corpus(cfg.data)
    with DatasetShards(vectors, k=2, models=(CAPTION_MODEL,), shard_cpus=0.0, id_order=True) as shards:
        built = build_tcac(ds, ShardPool(shards.actors, 2), TINY_PROBE, cfg.data, cfg.embed, cfg.tcac, cfg.seed)
        built.write_datasink(ShardSink(str(tmp_path / "raw")))
    counts, figures = collect(str(tmp_path / "raw"), str(tmp_path / "run"), list(TRANSFORMS),
                                   info["shard_rows"], top=5, keep=3)
    assert counts["read"] == len(expected) + 1 == counts["scored"] + counts["skipped"]
    assert counts["rows"] == counts["scored"] * len(TRANSFORMS)
    skipped = pq.read_table(tmp_path / "run" / "skipped.parquet").to_pylist()
    assert len(skipped) == counts["skipped"] == sum(counts["skipped_by_stage"].values())
    scored = set(pq.read_table(tmp_path / "run" / "tcac.parquet").column("id").to_pylist())
    for name, outcome in expected.items():
        kind, _, detail = outcome.partition(":")
        if kind == "skipped":
            stage, _, fragment = detail.partition(":")
            assert any(r["id"] == name and r["stage"] == stage and fragment in r["reason"] for r in skipped), name
            assert name not in scored
        else:
            assert name in scored, name
    assert any(r["id"] == "dup" and r["stage"] == "read" and "duplicate" in r["reason"] for r in skipped)
    assert counts["converted"].get("CMYK->RGB") == 1
    # the figures gathered shard by shard are those of the whole table
    whole = Figures.of(pq.read_table(tmp_path / "run" / "tcac.parquet"), list(TRANSFORMS), 5, 3)
    np.testing.assert_array_equal(figures.sums, whole.sums)
    np.testing.assert_array_equal(figures.counts, whole.counts)
    assert figures.largest.equals(whole.largest) and figures.largest.num_rows == 3 * len(TRANSFORMS)
    assert figures.summary() == summarise(pq.read_table(tmp_path / "run" / "tcac.parquet"), list(TRANSFORMS), 5)


def _scored_first_shard(run: Path) -> None:
    """The sink's piece of input shard 0, rebuilt from a finished run's ``tcac.parquet``, left in
    ``_rows/`` as a run killed after scoring that shard (and no other) leaves it."""
    first = pq.read_table(run / "tcac.parquet" / "part-00000.parquet")
    n = first.num_rows
    piece = first.append_column("shard", pa.array([0] * n, pa.int32())).append_column(
        "row", pa.array([i // len(TRANSFORMS) for i in range(n)], pa.int32()))
    for column in ("notes", "skip_stage", "skip_reason"):
        piece = piece.append_column(column, pa.array([""] * n, pa.string()))
    (run / "_rows" / "shard-00000").mkdir(parents=True)
    pq.write_table(piece.select(ROW_SCHEMA.names).cast(ROW_SCHEMA),
                   run / "_rows" / "shard-00000" / f"rows-000000-{n // len(TRANSFORMS) - 1:06d}.parquet")


def test_job_end_to_end_and_deterministic(tmp_path: Path, ray_local: None) -> None:
    main = load_job("tcac").main
    manifest = tmp_path / "corpus" / "manifest.parquet"
    common = ["--config", str(ROOT / "configs" / "tcac-tiny.yaml"), f"data.path={manifest}", "data.generate=16",
              "embed.image_size=48", f"tcac.transforms={json.dumps(TRANSFORMS)}", "tcac.pool_k=4",
              "tcac.report_top=3", "tcac.forward_rows=16", "report.thumb=48"]
    assert main([*common, f"output={tmp_path / 'a'}", "embed.batch_size=8"]) == 0
    # b: other batches, two caption shards, six input shards
    assert main([*common, f"output={tmp_path / 'b'}", "embed.batch_size=5", "embed.actors=2",
                 "embed.cpus_per_actor=0.5", "data.rows_per_block=3", "knn.stage_min_rows=2", "knn.shards=2"]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    table = pq.read_table(a / "tcac.parquet")  # parts: a writes one (one input shard), b six
    assert table.equals(pq.read_table(b / "tcac.parquet"))
    assert [p.name for p in (a / "tcac.parquet").iterdir()] == ["part-00000.parquet"]
    assert len(list((b / "tcac.parquet").iterdir())) == 6
    assert pq.read_table(a / "skipped.parquet").equals(pq.read_table(b / "skipped.parquet"))
    pool_a, pool_b = (json.loads((d / "run.json").read_text())["stages"]["caption_pool"] for d in (a, b))
    assert (pool_a["where"], pool_b["where"], pool_b["search"]["shards"]) == ("shards", "shards", 2)
    assert pool_a["captions"] == pool_b["captions"] > 16
    caps_a, caps_b = pq.read_table(a / "captions.parquet"), pq.read_table(b / "captions.parquet")
    assert caps_a.select(["text", "embedding"]).equals(caps_b.select(["text", "embedding"]))

    # c: the same job as a, started without a cluster: below knn.stage_min_rows it never starts
    # Ray (the captions embedded and the images scored in its own process), with the same bits
    c = tmp_path / "c"
    run_without_ray("tcac", [*common, f"output={c}", "embed.batch_size=8"])
    run_a, run_c = (json.loads((d / "run.json").read_text()) for d in (a, c))
    assert (run_a["stages"]["score"]["executor"], run_c["stages"]["score"]["executor"]) == ("ray", "local")
    assert run_c["stages"]["caption_pool"]["where"] == "local"
    assert pq.read_table(c / "tcac.parquet").equals(table)
    assert pq.read_table(c / "skipped.parquet").equals(pq.read_table(a / "skipped.parquet"))
    assert pq.read_table(c / "captions.parquet").select(["text", "embedding"]).equals(caps_a.select(["text", "embedding"]))
    assert run_c["tcac_summary"] == run_a["tcac_summary"] and run_c["counts"] == run_a["counts"]

    # b again, as after a kill with its first input shard scored: the pools still cover every
    # caption (the captions are read back, not embedded again) and the rows are the same
    _scored_first_shard(b)
    assert main([*common, f"output={b}", "embed.batch_size=5", "embed.actors=2", "embed.cpus_per_actor=0.5",
                 "data.rows_per_block=3", "knn.stage_min_rows=2", "knn.shards=2"]) == 0
    again = json.loads((b / "run.json").read_text())["stages"]
    assert again["read"]["todo_shards"] == 5 and again["caption_pool"]["reused"] is True
    assert pq.read_table(b / "tcac.parquet").equals(table)
    assert table.num_rows == 16 * 3 and table.column_names == OUTPUT_COLUMNS

    rows = table.to_pylist()
    assert all(r["changed"] == 0 and r["kl"] == 0 for r in rows if r["transform"] == "rot0")
    assert any(r["changed"] > 0 for r in rows if r["transform"] == "elastic")
    # pool sizes agree with a brute-force pool over the written caption embeddings
    caps = pq.read_table(a / "captions.parquet")
    from clipscan.arrays import embedding_matrix

    emb = embedding_matrix(caps.column("embedding"))
    index = {t: i for i, t in enumerate(caps.column("text").to_pylist())}
    for r in rows[:: len(TRANSFORMS)]:
        own = [index[c] for c in r["own_captions"]]
        assert r["pool_size"] == len(brute_force_pool(emb, [own], 4)[0])

    info = json.loads((a / "run.json").read_text())
    assert info["status"] == "done" and info["counts"]["read"] == 16 == info["counts"]["scored"]
    summary = info["tcac_summary"]
    assert list(summary) == list(TRANSFORMS) and summary["rot0"]["mean_changed"] == 0
    assert summary["rot0"]["own_left_top1"] == 0 and "own_left_top10" in summary["hflip"]
    assert {"read", "caption_pool", "score", "summary", "attributes", "report"} <= set(info["stages"])
    contrast = json.loads((a / "attributes.json").read_text())["transforms"]
    assert list(contrast) == list(TRANSFORMS) and contrast["rot0"]["pairs"] == 0  # nothing moved, nothing compared
    assert contrast["elastic"]["pairs"] > 0 and contrast["elastic"]["control"] == "left the top list"
    html = (a / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "") and "<script" not in html
    assert html.count('class="tcase"') == 3 * len(TRANSFORMS)
    assert all((a / "plots" / f"changes_{n}.png").exists() for n in TRANSFORMS)
    shifts = caption_shifts(table, list(TRANSFORMS), n=2)
    case = shifts["elastic"][0]
    assert len(shifts["hflip"]) == 2 and case["changed"] == max(r["changed"] for r in rows if r["transform"] == "elastic")
    assert set(case["entered"]) == set(case["after"]) - set(case["before"])


def test_report_escapes_captions(tmp_path: Path) -> None:
    from clipscan.report.tcac import write_tcac_report

    evil = '<script>alert("x")</script> & a red circle'
    row = {
        "id": "<b>id</b>", "uri": str(tmp_path / "missing.jpg"), "caption": evil, "own_captions": [evil],
        "transform": "hflip", "pool_size": 2, "top_before": [evil, "a blue square"], "p_before": [0.6, 0.4],
        "top_after": ["a blue square", "a <i>new</i> one"], "p_after": [0.7, 0.3], "changed": 1,
        "own_rank_before": 1, "own_rank_after": 3, "kl": 0.2,
    }
    table = pa.Table.from_pylist([row], schema=pa.schema([ROW_SCHEMA.field(c) for c in OUTPUT_COLUMNS]))
    summary = summarise(table, ["hflip"], top=2)
    assert summary["hflip"]["own_left_top1"] == 1.0 and summary["hflip"]["own_left_top2"] == 1.0
    figures = Figures.of(table, ["hflip"], 2, 5)
    path = write_tcac_report(str(tmp_path), {"images": 1}, summary, figures, {"hflip": {}}, seed=0,
                             image_size=32, max_pixels=10**6, top=2, images=5, thumb=32)
    html = Path(path).read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "<i>new</i>" not in html
    assert 'class="left own"' in html and 'class="entered"' in html


def test_pools_from_caption_shards_ties_and_unknown_captions() -> None:
    """Pools asked of 1, 2 and 3 caption shards are the same texts in the same order and the
    same vectors, an exact tie broken by text as brute force breaks it by row; captions no
    shard holds are left out, and an image with none gets no pool."""
    rng = np.random.default_rng(3)
    texts = sorted({f"a {c} {s}" for c in ("red", "blue", "green", "grey") for s in ("cube", "ball", "cone", "ring",
                                                                                     "star", "disc")})
    emb = rng.normal(size=(len(texts), 8)).astype(np.float32)
    emb[5] = emb[4]  # an exact tie
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    own = [list(rng.choice(len(texts), size=int(rng.integers(1, 4)), replace=True)) for _ in range(40)]
    pool_k = 4
    want = brute_force_pool(emb, [list(dict.fromkeys(int(c) for c in mine)) for mine in own], pool_k)
    asked = [[texts[c] for c in mine] + ["not a caption"] for mine in own]
    for n in (1, 2, 3):
        parts = _shards(texts, emb, n)
        for w, got in zip(want, ShardPool(parts, pool_k).pools(asked), strict=True):
            assert got is not None and got.texts.tolist() == [texts[c] for c in w]
            assert np.array_equal(got.emb, emb[w])
        assert ShardPool(parts, pool_k).pools([["not a caption"], []]) == [None, None]
        assert ShardPool(parts, pool_k).recall(texts) == 1.0  # exact shards find every neighbour


def test_caption_shards_recall_of_an_approximate_index() -> None:
    """recall@pool_k of approximate caption shards: 1.0 when every IVF list is probed, below
    it with one list, and equal to the share of numpy's exact neighbours the pools keep."""
    from clipscan.arrays import embedding_array
    from clipscan.stages import index as ix
    from clipscan.stages.search import Shard

    rng = np.random.default_rng(5)
    texts = [f"caption {i:04d}" for i in range(600)]
    emb = rng.normal(size=(len(texts), 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    table = pa.table({"id": pa.array(texts, pa.string()), "embedding": embedding_array(emb)})
    pool_k, queries = 5, texts[::7]

    def shards(nprobe: int) -> ShardPool:
        return ShardPool([Shard.from_table(table.slice(lo, hi - lo), lo, models=(CAPTION_MODEL,),
                                                index="IVF8,Flat", nprobe=nprobe)
                               for lo, hi in ix.shard_bounds(len(texts), 2)], pool_k)

    assert shards(8).recall(queries) == 1.0
    low = shards(1)
    got = low.recall(queries)
    sims = emb[::7] @ emb.T
    sims[np.arange(len(queries)), np.arange(0, len(texts), 7)] = -np.inf  # a caption is not its own neighbour
    exact = np.argsort(-sims, axis=1)[:, :pool_k]
    kept = [len({texts[j] for j in row} & set(p.texts[1:].tolist())) / pool_k
            for row, p in zip(exact, low.pools([[q] for q in queries]), strict=True)]
    assert got < 1.0 and got == pytest.approx(float(np.mean(kept)))



def test_text_digest_changes_with_any_caption_not_with_order(ray_local: None) -> None:
    import ray.data

    from clipscan.pipeline.cluster import configure_data_context

    configure_data_context()
    texts = [f"caption {i}" for i in range(50)]
    one = text_digest(ray.data.from_items([{"text": t} for t in texts], override_num_blocks=3))
    other = text_digest(ray.data.from_items([{"text": t} for t in texts[::-1]], override_num_blocks=5))
    changed = text_digest(ray.data.from_items([{"text": t} for t in [*texts[:-1], "caption x"]]))
    assert one == other and one["captions"] == 50 and changed["digest"] != one["digest"]


def test_webdataset_corpus_scores_on_caption_shards(tmp_path: Path, ray_local: None) -> None:
    """A WebDataset corpus (its size unknown until read) builds its pools on caption shards;
    every sample is scored once, with the same rows as the same images in a manifest. A key
    that an earlier tar has is skipped as the manifest's read skips a repeated id: its
    caption enters no pool."""
    import pyarrow as pa
    import webdataset as wds

    from tests import corpora
    from tests.test_bad_inputs import _img2dataset_shards

    main = load_job("tcac").main
    root = tmp_path / "wds"
    _img2dataset_shards(root, shards=2, per=6)
    with wds.TarWriter(str(root / "00002.tar")) as sink:  # 000000003 repeats the first tar's fourth sample
        for i, (key, caption) in enumerate([("000000003", "a repeated key"), ("000020000", "photo 000020000")]):
            sink.write({"__key__": key, "jpg": corpora.jpeg(900 + i, size=40), "txt": caption})
    common = ["--config", str(ROOT / "configs" / "tcac-tiny.yaml"), "data.generate=null", "embed.image_size=48",
              f"tcac.transforms={json.dumps(TRANSFORMS)}", "tcac.pool_k=4", "tcac.report_top=3",
              "tcac.forward_rows=16", "report.thumb=48", "embed.batch_size=4", "attributes.enabled=false"]
    # an IVF caption index probing every list: its recall is measured, and it finds what exact search does
    assert main([*common, f"data.path={root}/{{00000..00002}}.tar", f"output={tmp_path / 'w'}",
                 "knn.index=IVF2,Flat", "knn.nprobe=2"]) == 0
    info = json.loads((tmp_path / "w" / "run.json").read_text())
    assert info["stages"]["caption_pool"]["where"] == "shards" and info["counts"]["scored"] == 13
    assert info["recall"] == {"captions": 1.0} == {"captions": info["stages"]["caption_pool"]["search"]["recall_at_k"]}
    got = pq.read_table(tmp_path / "w" / "tcac.parquet").sort_by([("id", "ascending"), ("transform", "ascending")])
    assert got.num_rows == 13 * len(TRANSFORMS) and len(set(got.column("id").to_pylist())) == 13
    skipped = pq.read_table(tmp_path / "w" / "skipped.parquet").to_pylist()
    assert skipped == [{"id": "000000003", "uri": f"{root}/00002.tar#000000003.jpg", "stage": "read",
                        "reason": f"duplicate id (first seen at {root}/00000.tar#000000003.jpg)"}]
    captions = pq.read_table(tmp_path / "w" / "captions.parquet")
    assert "a repeated key" not in captions.column("text").to_pylist()
    assert json.loads((tmp_path / "w" / "captions.json").read_text())["captions"] == captions.num_rows

    # resume: each tar is numbered as it is read, so a run killed with the first tar scored
    # reuses it; a tar changed since (another modification time) is scored again
    import os

    w = tmp_path / "w"
    for changed in (False, True):
        _scored_first_shard(w)
        if changed:
            os.utime(root / "00000.tar", (1e9, 1e9))
        assert main([*common, f"data.path={root}/{{00000..00002}}.tar", f"output={w}",
                     "knn.index=IVF2,Flat", "knn.nprobe=2"]) == 0
        assert json.loads((w / "run.json").read_text())["stages"]["read"]["todo_shards"] == (3 if changed else 2)
        again = pq.read_table(w / "tcac.parquet").sort_by([("id", "ascending"), ("transform", "ascending")])
        assert again.equals(got) and pq.read_table(w / "skipped.parquet").to_pylist() == skipped

    # the same images and captions as a manifest, below the threshold: pools built in this process
    import tarfile

    images, rows = tmp_path / "images", []
    images.mkdir()
    for shard in ("00000", "00001", "00002"):
        with tarfile.open(root / f"{shard}.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        for name, data in members.items():
            if name.endswith(".jpg"):
                key = name[:-4]
                (images / f"{shard}-{name}").write_bytes(data)
                rows.append({"id": key, "image": str(images / f"{shard}-{name}"),
                             "caption": members[f"{key}.txt"].decode()})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    assert main([*common, f"data.path={tmp_path / 'manifest.parquet'}", f"output={tmp_path / 'm'}"]) == 0
    want = pq.read_table(tmp_path / "m" / "tcac.parquet").sort_by([("id", "ascending"), ("transform", "ascending")])
    keep = [c for c in OUTPUT_COLUMNS if c != "uri"]
    assert got.select(keep).equals(want.select(keep))
    assert [r["reason"] for r in pq.read_table(tmp_path / "m" / "skipped.parquet").to_pylist()] == [
        "duplicate id (first seen at row 3)"]


def test_first_row_of_an_id_and_its_repeats_skipped_once() -> None:
    """``settle_repeats``' rule per id (the first claiming row by shard, row; later claiming
    rows repeat it) and ``collect``'s use of it: a scored repeat becomes one skipped row,
    matched by row when numbered and by id and uri when not."""
    group = pa.table({"id": ["k"] * 4, "uri": ["c#k", "a#k", "b#k", "d#k"], "shard": pa.array([2, 0, 1, 3], pa.int32()),
                      "row": pa.array([0, 5, 1, 0], pa.int32()), "captions": [["x"], ["y"], ["z"], []],
                      "skip_stage": ["", "read", "", "read"],
                      "skip_reason": ["", "cannot read the image member", "", "no caption"]})
    settled = _first_of_id(group)
    assert settled.column("uri").to_pylist() == ["a#k", "b#k", "c#k", "d#k"]  # by shard, row
    assert settled.column("repeat").to_pylist() == [False, False, True, True]  # b#k claims first; "no caption" repeats
    assert set(settled.column("first_uri").to_pylist()) == {"b#k"}
    twice = _first_of_id(group.set_column(2, "shard", pa.array([-1] * 4, pa.int32())).set_column(
        1, "uri", pa.array(["t#k"] * 4)))  # unnumbered rows of one uri: a key twice in one tar, left to collect
    assert not any(twice.column("repeat").to_pylist())
    assert _firsts_of(settled).column("captions").to_pylist() == [["y"], ["z"]]

    def rows(shard: int) -> pa.Table:  # image "k" scored under two transforms, "m" skipped at decode
        return pa.Table.from_pylist([
            {"id": "k", "uri": "c#k", "transform": "t0", "shard": shard, "row": 0, "skip_stage": "", "skip_reason": ""},
            {"id": "k", "uri": "c#k", "transform": "t1", "shard": shard, "row": 0, "skip_stage": "", "skip_reason": ""},
            {"id": "m", "uri": "c#m", "transform": None, "shard": shard, "row": 1, "skip_stage": "decode",
             "skip_reason": "zero-byte file"},
        ], schema=pa.schema([ROW_SCHEMA.field(n) for n in ("id", "uri", "transform", "shard", "row",
                                                                  "skip_stage", "skip_reason")]))

    repeats = _repeats_of(settled.slice(2, 1).set_column(2, "shard", pa.array([-1], pa.int32())))
    position = np.array([0, 1, 2])
    for table, known in ((rows(2), _repeats_of(settled)), (rows(-1), repeats)):
        got, pos = _skip_repeats(table, position, known, numbered=table.column("shard")[0].as_py() >= 0)
        assert got.column("id").to_pylist() == ["k", "m"] and pos.tolist() == [0, 2]
        assert got.column("skip_stage").to_pylist() == ["read", "decode"]
        assert got.column("skip_reason").to_pylist() == ["duplicate id (first seen at b#k)", "zero-byte file"]
    other = _repeats_of(settled.slice(3, 1).set_column(2, "shard", pa.array([-1], pa.int32())))  # d#k
    assert _skip_repeats(rows(-1), position, other, numbered=False)[0].equals(rows(-1))
