"""Precomputed embeddings (``emb:PATH``) read and joined with the other model on id; one-sided ids skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipscan.arrays import embedding_array, embedding_matrix
from clipscan.data.precomputed import EmbeddingsError, embedding_pairs, read_pair
from clipscan.models.registry import ModelLoadError, is_precomputed, load_encoder, parse_spec


def clip_retrieval(root: Path, ids: list[str], x: np.ndarray, parts: int, key: str = "image_path",
                   captions: bool = True) -> str:
    """Write x (n, d) and ids in clip-retrieval's layout, ``parts`` file pairs; returns the root."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    bounds = np.linspace(0, len(ids), parts + 1).astype(int)
    for k, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        np.save(root / "img_emb" / f"img_emb_{k}.npy", x[a:b])
        cols: dict[str, list[str]] = {key: ids[a:b]}
        if captions:
            cols["caption"] = [f"a photo of {i}" for i in ids[a:b]]
            cols["url"] = [f"https://example.com/{i}.jpg" for i in ids[a:b]]
        pq.write_table(pa.table(cols), root / "metadata" / f"metadata_{k}.parquet")
    return str(root)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_emb_spec_has_no_encoder() -> None:
    assert parse_spec("emb:s3://laion/vit-l14@v2").name == "s3://laion/vit-l14@v2"
    assert is_precomputed("emb:/x") and not is_precomputed("hf:tiny-dinov2") and not is_precomputed(None)
    with pytest.raises(ModelLoadError, match="no encoder"):
        load_encoder("emb:/x")


def test_data_path_may_be_left_out_only_when_both_models_are_precomputed() -> None:
    from clipscan.config import ConfigError, DafConfig, load_config

    both = load_config(DafConfig, None, ["output=/tmp/x", "models.probe=emb:/a", "models.reference=emb:s3://b/c"])
    assert both.data.path is None
    with pytest.raises(ConfigError, match="data.path is required unless"):
        load_config(DafConfig, None, ["output=/tmp/x", "models.probe=emb:/a", "models.reference=hf:tiny-dinov2"])


def test_fp16_rows_read_in_blocks_and_normalised(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(25, 8)).astype(np.float16)
    x[3] = 0  # a zero vector cannot be normalised
    ids = [f"img/{i:03d}.jpg" for i in range(25)]
    root = clip_retrieval(tmp_path / "p", ids, x, parts=2)
    pairs = embedding_pairs(root)
    assert [Path(p.vectors).name for p in pairs] == ["img_emb_0.npy", "img_emb_1.npy"]
    blocks = [t for p in pairs for t in read_pair(p, rows=5)]
    assert max(t.num_rows for t in blocks) == 5 and sum(t.num_rows for t in blocks) == 25
    table = pa.concat_tables(blocks)
    assert table.column("id").to_pylist() == ids and table.column("uri").to_pylist() == ids
    assert table.column("url").to_pylist()[1] == "https://example.com/img/001.jpg.jpg"
    got = embedding_matrix(table.column("embedding"))
    keep = [i for i in range(25) if i != 3]
    np.testing.assert_allclose(got[keep], _unit(x[keep]), atol=1e-6)
    reasons = table.column("skip_reason").to_pylist()
    assert reasons[3] == "zero or non-finite embedding" and set(reasons[:3] + reasons[4:]) == {""}
    assert all(table.column("renormalised").to_pylist()[i] for i in keep)  # raw normal rows are not unit


def test_fp32_unit_rows_by_key_are_not_renormalised(tmp_path: Path) -> None:
    x = _unit(np.random.default_rng(1).normal(size=(7, 4)))
    root = clip_retrieval(tmp_path / "w", [f"{i:09d}" for i in range(7)], x, parts=1, key="key", captions=False)
    table = pa.concat_tables(read_pair(embedding_pairs(root)[0], rows=100))
    assert table.column("id").to_pylist()[0] == "000000000" and table.column("uri").to_pylist()[0] == ""
    assert not any(table.column("renormalised").to_pylist()) and table.column("caption").to_pylist()[0] == ""
    np.testing.assert_array_equal(embedding_matrix(table.column("embedding")), x)


def test_bad_layouts_name_the_file(tmp_path: Path) -> None:
    x = np.ones((4, 3), np.float32)
    root = Path(clip_retrieval(tmp_path / "a", list("abcd"), x, parts=2))
    (root / "metadata" / "metadata_1.parquet").unlink()
    with pytest.raises(EmbeddingsError, match="img_emb/ has part 1 but metadata/ does not"):
        embedding_pairs(str(root))
    root = Path(clip_retrieval(tmp_path / "b", list("abcd"), x, parts=1))
    pq.write_table(pa.table({"image_path": list("abc")}), root / "metadata" / "metadata_0.parquet")
    with pytest.raises(EmbeddingsError, match="metadata_0.parquet has 3 rows but .*img_emb_0.npy has 4"):
        list(read_pair(embedding_pairs(str(root))[0], 10))
    with pytest.raises(EmbeddingsError, match="no such file"):
        embedding_pairs(str(tmp_path / "missing"))


def test_parquet_dataset_with_list_embeddings(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    x = np.random.default_rng(2).normal(size=(6, 5)).astype(np.float32)
    pq.write_table(pa.table({"id": list("uvwxyz"), "embedding": [list(map(float, r)) for r in x],
                             "caption": list("UVWXYZ")}), folder / "part-0.parquet")
    pairs = embedding_pairs(str(folder))
    table = pa.concat_tables(read_pair(pairs[0], rows=4))
    assert table.column("caption").to_pylist() == list("UVWXYZ")
    np.testing.assert_allclose(embedding_matrix(table.column("embedding")), _unit(x), atol=1e-6)


def test_joined_vectors_and_one_sided_skips(tmp_path: Path, ray_local: None) -> None:
    from clipscan.stages.vectors import joined_vectors, skipped_vectors

    rng = np.random.default_rng(3)
    probe_ids = [f"i{i:03d}" for i in range(0, 60)]
    ref_ids = [f"i{i:03d}" for i in range(5, 70)]
    xp = rng.normal(size=(60, 8)).astype(np.float16)
    xr = rng.normal(size=(65, 6)).astype(np.float32)
    models = {"probe": clip_retrieval(tmp_path / "p", probe_ids, xp, parts=3),
              "reference": clip_retrieval(tmp_path / "r", ref_ids, xr, parts=2, captions=False)}
    models = {k: f"emb:{v}" for k, v in models.items()}
    joined = joined_vectors(str(tmp_path / "run"), models, rows_per_block=16).to_arrow_refs()
    import ray

    table = pa.concat_tables(ray.get(joined)).sort_by("id")
    assert table.schema.field("probe").type == pa.list_(pa.float32(), 8)
    assert table.schema.field("reference").type == pa.list_(pa.float32(), 6)
    both = sorted(set(probe_ids) & set(ref_ids))
    assert table.column("id").to_pylist() == both
    np.testing.assert_allclose(embedding_matrix(table.column("probe")), _unit(xp[5:60]), atol=1e-6)
    np.testing.assert_allclose(embedding_matrix(table.column("reference")), _unit(xr[:55]), atol=1e-6)
    assert table.column("caption").to_pylist()[0] == "a photo of i005"  # from the side that has captions
    skipped = pa.concat_tables(ray.get(skipped_vectors(str(tmp_path / "run"), models, 16).to_arrow_refs()))
    reasons = dict(zip(skipped.column("id").to_pylist(), skipped.column("reason").to_pylist(), strict=True))
    assert set(reasons) == set(probe_ids) ^ set(ref_ids)
    assert reasons["i000"] == "no reference embedding (the id is in probe only)"
    assert reasons["i069"] == "no probe embedding (the id is in reference only)"
    assert set(skipped.column("stage").to_pylist()) == {"join"}


def test_daf_with_both_models_precomputed_and_no_corpus(tmp_path: Path, ray_local: None) -> None:
    from tests.conftest import load_job

    rng = np.random.default_rng(4)
    centres = rng.normal(size=(6, 8))
    labels = rng.integers(0, 6, size=80)
    xp = (centres[labels] + 0.3 * rng.normal(size=(80, 8))).astype(np.float16)
    xr = (centres[labels][:, :6] + 0.3 * rng.normal(size=(80, 6))).astype(np.float32)
    ids = [f"photos/{i:04d}.jpg" for i in range(80)]
    probe = clip_retrieval(tmp_path / "probe", ids[:78], xp[:78], parts=2)
    reference = clip_retrieval(tmp_path / "ref", ids[2:], xr[2:], parts=3, captions=False)
    out = tmp_path / "run"
    code = load_job("daf").main([
        f"models.probe=emb:{probe}", f"models.reference=emb:{reference}", f"output={out}",
        "knn.k=5", "mining.rank_depth=10", "mining.cases=5", "report.rows=3", "data.rows_per_block=20",
    ])
    assert code == 0
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "done" and "embed" not in info["stages"]  # no image was read or embedded
    assert info["counts"]["embedded"] == 76 and info["counts"]["skipped"] == 4
    assert info["counts"]["read"] == 80 and info["counts"]["renormalised"] == {"probe": 78, "reference": 78}
    skipped = pq.read_table(out / "skipped.parquet").to_pylist()
    assert sorted(r["id"] for r in skipped) == [ids[0], ids[1], ids[78], ids[79]]
    assert {r["stage"] for r in skipped} == {"join"}
    discrepancies = pq.read_table(out / "discrepancies.parquet")
    assert sorted(discrepancies.column("id").to_pylist()) == ids[2:78]
    corpus = pq.read_table(out / "corpus")
    assert corpus.column("url").to_pylist()[0].startswith("https://example.com/photos/")
    html = (out / "report.html").read_text()
    assert "a photo of photos/" in html  # the caption stands in for the image no one can read
    assert embedding_array(np.zeros((1, 2), np.float32)).type.list_size == 2


def test_one_model_embedded_one_precomputed(tmp_path: Path, scene_corpus: str, ray_local: None) -> None:
    from clipscan.config import DafConfig, DataConfig, load_config
    from clipscan.data.read import read_table
    from clipscan.rundir import Run
    from clipscan.runner import embed_corpus
    from clipscan.stages.embed import load_corpus, load_embeddings
    from tests.conftest import TINY_PROBE

    corpus_ids = read_table(DataConfig(path=scene_corpus, limit=30))[0].column("id").to_pylist()
    ref_ids = corpus_ids[4:] + ["not-in-the-corpus"]
    x = np.random.default_rng(5).normal(size=(len(ref_ids), 6)).astype(np.float32)
    folder = tmp_path / "ref"
    folder.mkdir()
    pq.write_table(pa.table({"id": ref_ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6)}),
                   folder / "part-0.parquet")
    models = {"probe": TINY_PROBE, "reference": f"emb:{folder}"}
    cfg = load_config(DafConfig, None, [f"data.path={scene_corpus}", f"output={tmp_path / 'run'}",
                                        f"models.probe={TINY_PROBE}", f"models.reference=emb:{folder}",
                                        "data.limit=30", "data.rows_per_block=16", "embed.image_size=48"])
    run = Run(cfg.output, "test", cfg)
    counts = embed_corpus(run, cfg, models)
    assert counts["embedded"] == 26 and counts["skipped"] == 5 and counts["read"] == 31
    ids_p, xp = load_embeddings(cfg.output, "probe")
    ids_r, xr = load_embeddings(cfg.output, "reference")
    assert list(ids_p) == list(ids_r) == sorted(corpus_ids[4:]) and xp.shape[1] == 32
    order = np.argsort(np.array(ref_ids[:-1], dtype=object), kind="stable")
    np.testing.assert_allclose(xr, _unit(x[:-1][order]), atol=1e-6)
    corpus = load_corpus(cfg.output)
    assert corpus.column("uri").to_pylist()[0].endswith(".png") or corpus.column("uri").to_pylist()[0]
    reasons = {r["id"]: r["reason"] for r in pq.read_table(run.path("skipped.parquet")).to_pylist()}
    assert reasons["not-in-the-corpus"] == "no probe embedding (the id is in reference only)"
    assert all(reasons[i] == "no reference embedding (the id is in probe only)" for i in corpus_ids[:4])
    assert not Path(run.path("_embedded")).exists()


def test_settle_skips_every_row_of_a_duplicated_id() -> None:
    from clipscan.stages.vectors import settle, skips, usable

    def vectors(rows: list[list[float] | None], d: int) -> pa.Array:
        flat = [v for r in rows for v in (r or [0.0] * d)]
        mask = pa.array([r is None for r in rows])
        return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), d, mask=mask)

    text = pa.array(["", "", "", ""], pa.string())
    batch = pa.table({
        "id": ["a", "dup", "dup", "b"],
        "probe": vectors([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], None], 2),
        "probe_caption": pa.array(["cap a", "x", "y", None]), "probe_uri": text, "probe_url": text,
        "probe_renormalised": [False, True, False, None], "probe_skip_reason": ["", "", "", None],
        "reference": vectors([[1.0], [1.0], [1.0], [1.0]], 1),
        "reference_caption": text, "reference_uri": text, "reference_url": text,
        "reference_renormalised": [False, False, False, False], "reference_skip_reason": ["", "", "", ""],
    })
    settled = settle(batch, ("probe", "reference"))
    assert usable(settled, ("probe", "reference")).column("id").to_pylist() == ["a"]
    reasons = dict(zip(*(skips(settled).column(c).to_pylist() for c in ("id", "reason")), strict=True))
    assert reasons == {"dup": "duplicate id (2 rows pair up under it)",
                       "b": "no probe embedding (the id is in reference only)"}
    assert settled.column("caption").to_pylist()[0] == "cap a"
