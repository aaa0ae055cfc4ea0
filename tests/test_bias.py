"""Bias probes (ComCO): probe set, seeded tie-breaks, probes of known bias, figures against numpy, reruns, the tiny job."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipscan.stages import bias
from clipscan.stats import wilson
from tests.conftest import ROOT, load_job, run_without_ray

ZIP_VOCAB = ["red circle", "green square", "blue rectangle", "yellow triangle", "purple diamond",
             "orange star", "cyan cross", "pink hexagon"]
AREAS = [0.06, 0.0375, 0.0234, 0.0146, 0.0092]
FIRST = "py:tests.bias_probes:first_token_by_area"
EVEN = "py:tests.bias_probes:even_by_presence"
IMAGE_ONLY = "py:tests.bias_probes:image_only_by_area"


# --- stage logic, no Ray ----------------------------------------------------------------


def test_ties_are_broken_by_a_seeded_draw_not_by_index() -> None:
    sims = np.zeros((4000, 4), dtype=np.float32)
    sims[:, 3] = -1e-7  # within the tie tolerance: still a tie
    got = bias.first_retrieved(sims, np.random.default_rng(1))
    counts = np.bincount(got, minlength=4)
    assert counts.min() > 850 and counts.max() < 1150, counts  # uniform over the tied columns
    assert np.array_equal(got, bias.first_retrieved(sims, np.random.default_rng(1)))
    sims[:, 2] = 0.01  # a clear winner is always picked
    assert (bias.first_retrieved(sims, np.random.default_rng(1)) == 2).all()
    sims[:, 2] = -np.inf
    assert (bias.first_retrieved(sims, np.random.default_rng(1)) != 2).all()


def test_caption_orders_are_distinct_and_balanced() -> None:
    rng = np.random.default_rng(0)
    assert bias.caption_orders(rng, 3, 24) == [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    orders = bias.caption_orders(rng, 5, 24)
    assert len(orders) == 20 and len(set(orders)) == 20
    at = np.array(orders)
    for p in range(5):  # every object named at every position equally often
        assert np.bincount(at[:, p], minlength=5).tolist() == [4] * 5
    assert len(bias.caption_orders(rng, 5, 3)) == 3


def test_probe_scenes_distinct_in_colour_and_shape() -> None:
    vocab = bias.vocabulary(None)
    assert len(vocab) == 88
    for n in (2, 3, 4, 5):
        for i in range(30):
            sc = bias.make_probe_scene(7, n, i, vocab, 24)
            assert sc == bias.make_probe_scene(7, n, i, vocab, 24)
            assert len({vocab[v][0] for v in sc.objects}) == n and len({vocab[v][1] for v in sc.objects}) == n
            assert sorted(sc.ranks) == list(range(n))
            assert sc.ranks[sc.largest_first[0]] == 0 and sc.ranks[sc.largest_last[-1]] == 0
            assert sc.largest_first[1:] == sc.largest_last[:-1]
    with pytest.raises(ValueError, match="bias.vocabulary"):
        bias.vocabulary(["red blob"])
    with pytest.raises(ValueError, match="distinct in both colour and shape"):
        bias.make_probe_scene(0, 3, 0, bias.vocabulary(["red circle", "blue circle", "green circle"]), 6)


def test_probe_set_objects_cover_their_size_ranks(tmp_path: Path) -> None:
    from PIL import Image

    from clipscan.data.scenes import PALETTE

    vocab = bias.vocabulary(None)
    made = bias.write_probe_set(str(tmp_path / "a"), vocab, [4, 5], 5, 6, AREAS, 0.05, "grey", 3, 160)
    assert made == {"scenes": 10, "objects": 88, "captions": made["captions"]}
    bias.write_probe_set(str(tmp_path / "b"), vocab, [4, 5], 5, 6, AREAS, 0.05, "grey", 3, 160)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")  # same arguments, same bytes
    for row in pq.read_table(tmp_path / "a" / "scenes.parquet").to_pylist():
        px = np.asarray(Image.open(tmp_path / "a" / "images" / f"{row['id']}.png")).reshape(-1, 3)
        areas = [int((px == PALETTE[name.split()[0]]).all(axis=1).sum()) for name in row["names"]]
        want = [AREAS[r] * 160 * 160 for r in row["size_ranks"]]
        assert np.argsort(areas).tolist() == np.argsort(want).tolist(), (row["id"], areas, want)
        assert np.allclose(areas, want, rtol=0.3)  # edge pixels add a little, (row["id"], areas, want)
    captions = pq.read_table(tmp_path / "a" / "captions.parquet").to_pylist()
    assert captions[0]["kind"] == "single" and captions[0]["text"] == "a red circle"
    assert [c["caption_id"] for c in captions] == list(range(len(captions)))


def test_scene_facts_against_a_brute_force_loop(tmp_path: Path) -> None:
    vocab = bias.vocabulary(ZIP_VOCAB)
    bias.write_probe_set(str(tmp_path), vocab, [2, 3, 5], 6, 8, AREAS, 0.05, "grey", 1, 32)
    scenes = pq.read_table(tmp_path / "scenes.parquet")
    captions = pq.read_table(tmp_path / "captions.parquet")
    rng = np.random.default_rng(0)

    def unit(n: int) -> np.ndarray:
        x = rng.standard_normal((n, 16)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    img, single, text = unit(scenes.num_rows), unit(len(vocab)), unit(captions.num_rows)
    facts = bias.scene_facts("m", scenes, captions, img, single, text, 0, distractors=3).to_pylist()
    caps = captions.to_pylist()
    single_text = {c["objects"][0]: text[c["caption_id"]] for c in caps if c["kind"] == "single"}
    st = np.stack([single_text[v] for v in range(len(vocab))])
    for i, (scene, row) in enumerate(zip(scenes.to_pylist(), facts, strict=True)):
        objs, ranks = scene["objects"], scene["size_ranks"]
        hits = [0] * len(objs)
        mine = [c for c in caps if c["scene"] == scene["id"] and c["kind"] == "order"]
        for c in mine:  # random floats: no ties, so a plain argmax
            v = int(np.argmax(st @ text[c["caption_id"]]))
            if v in c["objects"]:
                hits[c["objects"].index(v)] += 1
        assert row["text_hits"] == hits and row["text_captions"] == len(mine)
        v = int(np.argmax(single @ img[i]))
        assert row["image_rank"] == (ranks[objs.index(v)] if v in objs else -1)
        v = int(np.argmax(st @ img[i]))
        assert row["caption_rank"] == (ranks[objs.index(v)] if v in objs else -1)
        assert row["match_candidates"] == 4
    only = bias.scene_facts("m", scenes, captions, img, single, None, 0, distractors=3)
    assert only.column("text_hits").null_count == only.num_rows
    assert only.column("image_rank").to_pylist() == [r["image_rank"] for r in facts]


def test_wilson_interval() -> None:
    lo, hi = wilson(0.5, 100)
    assert abs(lo - 0.4038) < 1e-4 and abs(hi - 0.5962) < 1e-4
    assert wilson(0.0, 20)[0] == 0.0 and wilson(1.0, 20)[1] == 1.0


# --- figures recomputed with numpy from bias.parquet ------------------------------------


def _wilson(p: float, n: int) -> list[float]:
    z = 1.959963984540054
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return [max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))]


def _by_position(values: np.ndarray, n_obj: np.ndarray, width: int) -> dict[str, Any]:
    share = [float(values[n_obj > p, p].mean()) for p in range(width)]
    return {"share": share, "ci": [_wilson(s, int((n_obj > p).sum())) for p, s in enumerate(share)],
            "n": len(n_obj)}


def recompute(parquet: Path, width: int) -> dict[str, Any]:
    rows = pq.read_table(parquet).to_pylist()
    out: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        n_obj = np.array([r["n_objects"] for r in mine])
        onehot = np.array([[r["image_rank"] == p for p in range(width)] for r in mine], dtype=float)
        entry: dict[str, Any] = {"image_size": _by_position(onehot, n_obj, width)}
        if mine[0]["text_captions"] is not None:
            hits = np.array([r["text_hits"] + [0] * (width - len(r["text_hits"])) for r in mine], dtype=float)
            hits /= np.array([r["text_captions"] for r in mine], dtype=float)[:, None]
            entry["text_order"] = _by_position(hits, n_obj, width)
            crank = np.array([[r["caption_rank"] == p for p in range(width)] for r in mine], dtype=float)
            entry["image_size"]["caption"] = _by_position(crank, n_obj, width)
            entry["matching"] = {"largest_first": float(np.mean([r["match_first"] for r in mine])),
                                 "largest_last": float(np.mean([r["match_last"] for r in mine])), "n": len(mine)}
        out[model] = entry
    return out


def assert_close(got: Any, want: Any, where: str = "") -> None:
    if isinstance(want, dict):
        assert set(got) == set(want), (where, sorted(got), sorted(want))
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, f"{where}[{i}]")
    else:
        assert got == pytest.approx(want, abs=1e-12), where


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# --- the job, through its real entry point ----------------------------------------------


def _py_config(path: Path, out: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "models": {"probes": [FIRST, EVEN, IMAGE_ONLY]},
        "output": str(out),
        "seed": 5,
        "embed": {"image_size": 96, "batch_size": 64},
        "bias": {"objects": [2, 3, 4, 5], "scenes": 16, "orders": 24, "vocabulary": ZIP_VOCAB,
                 "distractors": 15},
        "report": {"thumb": 48},
    }))
    return path


@pytest.fixture(scope="module")
def py_runs(tmp_path_factory: pytest.TempPathFactory, ray_local: None) -> tuple[Path, Path]:
    job = load_job("bias")
    outs = []
    for name in ("a", "b"):
        tmp = tmp_path_factory.mktemp(f"bias-{name}")
        assert job.main(["--config", str(_py_config(tmp / "bias.yaml", tmp / "run"))]) == 0
        outs.append(tmp / "run")
    return outs[0], outs[1]


def test_probes_of_known_bias_show_it_and_unbiased_ones_do_not(py_runs: tuple[Path, Path]) -> None:
    out = py_runs[0]
    models = json.loads((out / "bias.json").read_text())["models"]
    summary = json.loads((out / "run.json").read_text())["bias_summary"]
    assert list(models) == [FIRST, EVEN, IMAGE_ONLY]
    chance = summary[FIRST]["text_order"]["chance"]
    assert chance[0] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4) and chance[4] == pytest.approx(0.2)

    first = models[FIRST]
    assert first["text_order"]["n"] == 64
    assert first["text_order"]["share"][0] == 1.0  # the first-named object always wins: weight 1 against 0.6**3
    assert first["text_order"]["ci"][0][0] > chance[0]
    assert first["image_size"]["share"][0] == 1.0  # the largest object always wins: 1.6x the next area
    assert first["image_size"]["ci"][0][0] > chance[0]
    assert first["matching"]["largest_first"] > first["matching"]["largest_last"] + 0.3

    even = models[EVEN]
    # word order changes nothing and every order is named equally often: exactly chance
    assert even["text_order"]["share"] == pytest.approx(chance, abs=1e-12)
    # every object counts the same: exact ties, broken by the seeded draw, so the shares scatter
    # around chance like a fair draw; each within its 99.9 % interval (5 ranks), the largest within its 95 %
    fig, scenes = even["image_size"], summary[EVEN]["image_size"]["scenes"]
    lo, hi = fig["ci"][0]
    assert lo <= chance[0] <= hi
    for p in range(5):
        lo, hi = wilson(fig["share"][p], scenes[p], z=3.29)
        assert lo <= chance[p] <= hi, (p, fig["share"][p], chance[p], (lo, hi))
    assert sum(fig["share"][p] * scenes[p] for p in range(5)) == pytest.approx(64)  # every scene hits one of its objects
    assert abs(even["matching"]["largest_first"] - even["matching"]["largest_last"]) < 0.2

    only = models[IMAGE_ONLY]  # no text tower: image retrieval only
    assert set(only) == {"image_size"} and set(only["image_size"]) == {"share", "ci", "n"}
    assert only["image_size"]["share"][0] == 1.0
    facts = pq.read_table(out / "bias.parquet")
    assert facts.num_rows == 3 * 64 and set(facts.schema.names) == set(bias.FACTS_SCHEMA.names)


def test_figures_match_numpy_and_reruns_are_bit_identical(py_runs: tuple[Path, Path]) -> None:
    a, b = py_runs
    result = json.loads((a / "bias.json").read_text())
    assert_close(result["models"], recompute(a / "bias.parquet", 5), "models")
    assert (a / "bias.json").read_bytes() == (b / "bias.json").read_bytes()
    assert pq.read_table(a / "bias.parquet").equals(pq.read_table(b / "bias.parquet"))
    assert _digest(a / "probe_set") == _digest(b / "probe_set")
    files = sorted(p.relative_to(a) for p in [*(a / "embeddings").rglob("*.parquet"), *(a / "text_embeddings").rglob("*.parquet")])
    assert len(files) == 3 + 3
    for name in files:
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
    info = json.loads((a / "run.json").read_text())
    assert info["status"] == "done" and info["counts"]["embedded"] == 8 + 64 and info["counts"]["skipped"] == 0
    assert {"probe_set", "embed", "caption_embed", "analyse", "report"} <= set(info["stages"])


def test_tiny_config_end_to_end(tmp_path: Path, ray_local: None) -> None:
    out = tmp_path / "run"
    job = load_job("bias")
    argv = ["--config", str(ROOT / "configs" / "bias-tiny.yaml"), f"output={out}", "bias.scenes=5"]
    assert job.main(argv) == 0
    models = json.loads((out / "bias.json").read_text())["models"]
    assert set(models) == {"open_clip:tiny-clip", "hf:tiny-dinov2"}
    clip = models["open_clip:tiny-clip"]
    assert set(clip) == {"text_order", "image_size", "matching"}
    assert len(clip["text_order"]["share"]) == 5 and len(clip["text_order"]["ci"]) == 5
    assert clip["text_order"]["n"] == 20 and clip["matching"]["n"] == 20
    assert set(models["hf:tiny-dinov2"]) == {"image_size"}
    assert_close(models, recompute(out / "bias.parquet", 5), "models")
    page = (out / "report.html").read_text()
    for title in ("Text-order bias", "Image-size bias", "Matching drop", "chance"):
        assert title in page
    assert (out / "plots" / "bias_text_order.png").stat().st_size > 1000
    assert not (out / "_captions").exists() and not (out / "_rows").exists()
    # the same job started without a cluster never starts Ray (the probe set is small) and ends the same
    here = tmp_path / "here"
    run_without_ray("bias", [*argv[:-2], f"output={here}", argv[-1]])
    assert (here / "bias.json").read_bytes() == (out / "bias.json").read_bytes()
    assert json.loads((here / "run.json").read_text())["stages"]["embed"]["executor"] == "local"
    # a rerun of the same config into the same directory reuses what it finds and ends the same
    before = (out / "bias.json").read_bytes()
    assert job.main(argv) == 0
    assert (out / "bias.json").read_bytes() == before
    assert json.loads((out / "run.json").read_text())["stages"]["probe_set"]["reused"] is True


def test_probes_from_the_command_line_and_bad_config_named(tmp_path: Path) -> None:
    from clipscan.config import BiasConfig, ConfigError, load_config

    tiny = str(ROOT / "configs" / "bias-tiny.yaml")
    assert load_config(BiasConfig, tiny, ["models.probes=[open_clip:tiny-clip, hf:x]"]).models.probes == [
        "open_clip:tiny-clip", "hf:x"]
    assert load_config(BiasConfig, tiny, ["models.probes=hf:x"]).models.probes == ["hf:x"]
    with pytest.raises(ConfigError, match="bias.areas"):
        load_config(BiasConfig, tiny, ["bias.areas=[0.1]"])
    job = load_job("bias")
    with pytest.raises(SystemExit):
        job.main(["--config", str(ROOT / "configs" / "bias-tiny.yaml"), f"output={tmp_path}", "bias.objects=[6]"])
    rc = job.main(["--config", str(ROOT / "configs" / "bias-tiny.yaml"), f"output={tmp_path / 'r'}",
                   "bias.vocabulary=[red blob]"])
    assert rc == 1
