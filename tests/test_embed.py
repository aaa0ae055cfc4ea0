from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipscan.columns import MissingColumns
from clipscan.config import DafConfig, load_config
from clipscan.rundir import Run
from clipscan.stages.decode import Decode, SkipImage, decode_image
from clipscan.stages.embed import (
    Embed,
    embedding_matrix,
    load_corpus,
    load_embeddings,
)
from tests import corpora
from tests.conftest import TINY_PROBE, TINY_REFERENCE


def test_decode_resizes_and_centre_crops() -> None:
    pixels, note = decode_image(corpora.jpeg(0, size=100), 32, 10**8)
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8 and note is None
    wide = corpora.image_bytes(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (300, 100), (200, 0, 0)), "PNG")
    pixels, _ = decode_image(wide, 16, 10**8)
    assert pixels.shape == (16, 16, 3) and tuple(pixels[8, 8]) == (200, 0, 0)
    with pytest.raises(SkipImage, match="zero-byte"):
        decode_image(b"", 16, 10**8)


def test_decode_stage_checks_columns() -> None:
    with pytest.raises(MissingColumns, match="stage 'decode' needs columns \\['uri'"):
        Decode(16, 100)({"id": np.array(["a"]), "skip_stage": np.array([""]), "skip_reason": np.array([""])})


def test_embed_stage_without_ray(scene_corpus: str) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 48, 48, 3), dtype=np.uint8)
    batch = {
        "id": np.array(list("abcde"), dtype=object),
        "uri": np.array([""] * 5, dtype=object),
        "skip_stage": np.array(["", "decode", "", "", ""], dtype=object),
        "skip_reason": np.array(["", "zero-byte file", "", "", ""], dtype=object),
        "pixels": pixels,
    }
    stage = Embed({"probe": TINY_PROBE, "reference": TINY_REFERENCE})
    out = stage(batch)
    assert out.column("emb_probe").null_count == 1
    want = stage.encoders["probe"].embed_images(pixels[[0, 2, 3, 4]])
    got = embedding_matrix(out.column("emb_probe").filter(out.column("emb_probe").is_valid()))
    np.testing.assert_allclose(got, want, atol=1e-5)
    # the reference, built in the loading thread, holds the same weights as one built on its own
    from clipscan.models.registry import load_encoder

    alone = load_encoder(TINY_REFERENCE).embed_images(pixels[[0, 2, 3, 4]])
    got = embedding_matrix(out.column("emb_reference").filter(out.column("emb_reference").is_valid()))
    np.testing.assert_array_equal(got, alone)


def test_a_model_that_fails_to_load_in_the_loading_thread_fails_the_first_batch(tmp_path: Path) -> None:
    from clipscan.models.registry import ModelLoadError

    stage = Embed({"probe": TINY_PROBE, "reference": f"hf:{tmp_path / 'missing'}"})  # the probe loads first
    batch = {"id": np.array(["a"], dtype=object), "skip_stage": np.array([""], dtype=object),
             "pixels": np.zeros((1, 32, 32, 3), dtype=np.uint8)}
    with pytest.raises(ModelLoadError, match="missing does not exist"):
        stage(batch)


def _job_config(manifest: Path | str, out: Path, *extra: str) -> DafConfig:
    return load_config(
        DafConfig,
        None,
        [f"data.path={manifest}", f"output={out}", f"models.probe={TINY_PROBE}",
         f"models.reference={TINY_REFERENCE}", "embed.image_size=48", "embed.batch_size=8", *extra],
    )


def test_every_bad_input_converted_or_skipped(tmp_path: Path, ray_local: None) -> None:
    from clipscan.runner import embed_corpus

    manifest, expected = corpora.bad_corpus(tmp_path / "bad")
    cfg = _job_config(manifest, tmp_path / "run", "data.max_pixels=100000", "data.rows_per_block=4")
    run = Run(cfg.output, "test", cfg)
    counts = embed_corpus(run, cfg, {"probe": TINY_PROBE, "reference": TINY_REFERENCE})
    assert counts["read"] == len(expected) + 1 == counts["embedded"] + counts["skipped"]
    skipped = {(r["id"], r["stage"], r["reason"]) for r in pq.read_table(run.path("skipped.parquet")).to_pylist()}
    ids, _ = load_embeddings(cfg.output, "probe")
    for name, outcome in expected.items():
        kind, _, detail = outcome.partition(":")
        if kind == "skipped":
            stage, _, fragment = detail.partition(":")
            assert any(i == name and s == stage and fragment in r for i, s, r in skipped), (name, skipped)
            assert name not in ids
        else:
            assert name in ids, name
    for note in ("CMYK->RGB", "I;16->RGB", "P->RGB", "RGBA->RGB"):
        assert counts["converted"][note] == 1
    assert sum(1 for i, _, _ in skipped if i == "dup") == 1
    corpus = load_corpus(cfg.output).to_pylist()
    assert "\ufffd" in next(r["caption"] for r in corpus if r["id"] == "latin1")


def test_in_process_embedding_writes_what_the_ray_pipeline_writes(tmp_path: Path, ray_local: None,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The embed stage below ``knn.stage_min_rows`` runs in the job's process (no Ray): the
    same decode and encoder stage, the same pieces, skips, conversions and parts as on Ray."""
    import pyarrow as pa

    from clipscan import runner
    from clipscan.pipeline.parts import RunParts

    manifest, _ = corpora.bad_corpus(tmp_path / "bad")
    out: dict[str, dict[str, object]] = {}
    for where in ("local", "ray"):
        monkeypatch.setattr(runner, "in_process", lambda cfg, rows, here=where == "local": here)
        cfg = _job_config(manifest, tmp_path / where, "data.max_pixels=100000", "data.rows_per_block=4")
        run = Run(cfg.output, "test", cfg)
        counts = runner.embed_corpus(run, cfg, {"probe": TINY_PROBE, "reference": TINY_REFERENCE})
        facts = run.info["stages"]["embed"]
        parts = RunParts(cfg.output)
        out[where] = {
            "executor": facts["executor"],
            "counts": {k: v for k, v in counts.items() if k != "nodes"},
            "skipped": pq.read_table(run.path("skipped.parquet")).sort_by("id"),
            "corpus": pa.concat_tables([pq.read_table(p) for p in sorted(Path(parts.corpus()).glob("*.parquet"))]),
            "embeddings": {m: load_embeddings(cfg.output, m) for m in ("probe", "reference")},
        }
    here, ray = out["local"], out["ray"]
    assert (here["executor"], ray["executor"]) == ("local", "ray")
    assert here["counts"] == ray["counts"] and here["counts"]["skipped"] > 0  # type: ignore[index]
    assert here["skipped"].equals(ray["skipped"])  # type: ignore[union-attr]
    assert here["corpus"].equals(ray["corpus"])  # type: ignore[union-attr]
    for model in ("probe", "reference"):
        (ids_a, x_a), (ids_b, x_b) = here["embeddings"][model], ray["embeddings"][model]  # type: ignore[index]
        assert list(ids_a) == list(ids_b)
        np.testing.assert_allclose(x_a, x_b, atol=1e-5)


def test_pipeline_matches_direct_embedding(tmp_path: Path, scene_corpus: str, ray_local: None) -> None:
    from clipscan.models.registry import load_encoder
    from clipscan.runner import embed_corpus

    cfg = _job_config(scene_corpus, tmp_path / "run", "data.limit=40", "data.rows_per_block=16")
    counts = embed_corpus(Run(cfg.output, "test", cfg), cfg, {"probe": TINY_PROBE, "reference": TINY_REFERENCE})
    assert counts == {"read": 40, "embedded": 40, "skipped": 0, "converted": {}, "skipped_by_stage": {},
                      "nodes": {"decode": 1, "embed": 1}, "shards": 3, "shards_reused": 0}
    ids, x = load_embeddings(cfg.output, "reference")
    assert list(ids) == sorted(ids) and x.shape == (40, 32)
    corpus = load_corpus(cfg.output)
    uris = corpus.column("uri").to_pylist()
    pixels = np.stack([decode_image(Path(u).read_bytes(), 48, 10**8)[0] for u in uris[:6]])
    want = load_encoder(TINY_REFERENCE).embed_images(pixels)
    np.testing.assert_allclose(x[:6], want, atol=1e-4)


def test_all_skipped_batch_keeps_the_embedding_width() -> None:
    import pyarrow as pa

    stage = Embed({"probe": TINY_PROBE, "reference": TINY_REFERENCE})
    batch = {
        "id": np.array(["a", "b"], dtype=object), "uri": np.array(["", ""], dtype=object),
        "skip_stage": np.array(["decode", "decode"], dtype=object),
        "skip_reason": np.array(["zero-byte file"] * 2, dtype=object),
        "pixels": np.zeros((2, 48, 48, 3), dtype=np.uint8),
    }
    skipped = stage(batch)
    batch["skip_stage"] = np.array(["", ""], dtype=object)
    embedded = stage(batch)
    for name in ("emb_probe", "emb_reference"):
        assert skipped.column(name).null_count == 2
        assert skipped.schema.field(name).type == embedded.schema.field(name).type
    pa.concat_tables([skipped, embedded])  # parts of one shard concatenate
def test_progress_logs_a_line_for_a_stage_shorter_than_its_interval() -> None:
    import logging

    from clipscan.pipeline.progress import Progress

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("clipscan")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with Progress("embed", lambda: 5, 10, interval_s=60):
            pass
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [line.split(",")[0] for line in lines] == ["embed: 5/10 rows (50%)"]
