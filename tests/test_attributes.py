import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipscan.columns import MissingColumns
from clipscan.models import planted
from clipscan.stages import attributes
from clipscan.stages.attributes import AttributeCounts, Counts, LexiconError, load_lexicons
from clipscan.stats import lift_ci
from tests import reference


def test_lift_ci_matches_hand_computed_values() -> None:
    # 30/100 against 10/100: lift 3; se = sqrt(1/30 - 1/100 + 1/10 - 1/100) = 0.336650
    lift, lo, hi = lift_ci(30, 100, 10, 100)
    assert lift == pytest.approx(3.0)
    assert lo == pytest.approx(3.0 * math.exp(-1.959964 * 0.336650), rel=1e-5) == pytest.approx(1.55077, rel=1e-4)
    assert hi == pytest.approx(5.80355, rel=1e-4)
    # a zero cell: 0.5 added to all four cells, 0.5/51 against 5.5/51 -> lift 1/11;
    # se = sqrt(1/0.5 - 1/51 + 1/5.5 - 1/51) = 1.463768
    lift, lo, hi = lift_ci(0, 50, 5, 50)
    assert lift == pytest.approx(1 / 11)
    assert lo == pytest.approx(0.0051595, rel=1e-4) and hi == pytest.approx(1.601577, rel=1e-4)
    # equal rates: lift 1, the interval symmetric in log
    lift, lo, hi = lift_ci(20, 80, 40, 160)
    assert lift == pytest.approx(1.0) and lo * hi == pytest.approx(1.0)
    assert lift_ci(0, 10, 0, 10) == (None, None, None)  # nothing differs anywhere: undefined
    assert lift_ci(0, 0, 1, 5) == (None, None, None)  # no pairs in a group
    with pytest.raises(ValueError, match="0 <= differ <= pairs"):
        lift_ci(5, 4, 1, 5)


def test_describe_and_lexicon_overrides(tmp_path: Path) -> None:
    lex = load_lexicons()
    names = lex.names
    got = dict(zip(names, lex.describe("Two brown dogs run on the left, near the water"), strict=True))
    assert got["colour"] == {"brown"}
    assert got["count"] == {"two", "#objects=1", "#plural"}  # dogs -> dog, plural
    assert got["position"] == {"left", "near"} and got["object"] == {"dog"}
    assert got["action"] == {"run"} and got["scene"] == {"water"}
    a = dict(zip(names, lex.describe("a red circle and a blue square"), strict=True))
    b = dict(zip(names, lex.describe("a red circle"), strict=True))
    assert a["count"] != b["count"] and a["colour"] != b["colour"] and a["size"] == b["size"] == frozenset()

    words = tmp_path / "texture.txt"
    words.write_text("# texture words\nfurry\nshiny  # a comment\n\n", encoding="utf-8")
    custom = load_lexicons(["colour", "texture"], {"texture": str(words)})
    assert custom.words["texture"] == {"furry", "shiny"} and custom.sources["texture"] == str(words)
    assert custom.sources["colour"] == "shipped:colour.txt"
    with pytest.raises(LexiconError, match="'texture': no lexicon file"):
        load_lexicons(["texture"])
    with pytest.raises(LexiconError, match="not in attributes.names"):
        load_lexicons(["colour"], {"texture": str(words)})


def test_counts_words_and_pairs_by_hand() -> None:
    lex = load_lexicons(["colour", "size"])
    rows = pa.Table.from_pylist(
        [
            {"rank": 2, "id": "b", "caption": "a red circle", "neighbour_ids": ["x"],
             "neighbour_captions": ["a blue circle", "a red circle"], "reference_captions": ["a red large circle"],
             "matched_captions": [], "rank_matched_captions": ["a red square"]},
            {"rank": 1, "id": "a", "caption": "a small green star", "neighbour_ids": [],
             "neighbour_captions": ["a small red star"], "reference_captions": [],
             "matched_captions": ["a green star"], "rank_matched_captions": []},
        ],
        schema=attributes.ROWS_SCHEMA,
    )
    c = AttributeCounts(lex).counts(rows)
    assert c.pairs.tolist() == [3, 1, 1, 1]
    colour, size = 0, 1
    # probe-only: {red} vs {blue}: 2 words, 2 odd; {red} vs {red}: 1, 0; {green} vs {red}: 2, 2
    assert c.table[0, :, colour].tolist() == [5, 4, 3, 2]
    # size: only a's pair uses it ({small} both); b's captions have no size word and are not counted
    assert c.table[0, :, size].tolist() == [1, 0, 1, 0]
    assert c.table[1, :, size].tolist() == [1, 1, 1, 1] and c.table[2, :, size].tolist() == [1, 1, 1, 1]
    assert c.examples["colour"] == [(1, "a"), (2, "b")]
    # fold through the Arrow row a batch stage returns: nothing lost
    again = Counts.from_row({k: v[0] for k, v in c.to_row().items()}, lex.names)
    assert np.array_equal(again.table, c.table) and again.examples == c.examples
    s = c.summary("rank_matched")
    col = next(a for a in s["attributes"] if a["name"] == "colour")
    assert col["rate"] == 0.8 and col["control_rate"] == 0.0 and col["pairs"] == 3
    assert col["lift"] == pytest.approx(lift_ci(4, 5, 0, 1)[0], abs=1e-4)
    with pytest.raises(MissingColumns, match="stage 'attributes' needs columns"):
        AttributeCounts(lex).counts(rows.drop_columns(["matched_captions"]))


def test_rank_matched_takes_the_nearest_free_rank() -> None:
    deep = ["p1", "r2", "q3", "r4", "r5", "q6"]
    # q3 at rank 3: rank 3 is itself (a probe neighbour), 2 and 4 are free: the better one wins
    assert attributes.rank_matched("me", ["p1", "q3", "q6"], [3], deep) == ["r2"]
    assert attributes.rank_matched("me", ["p1", "q3", "q6"], [3, 3], deep) == ["r2", "r4"]
    # beyond the list: from its end
    assert attributes.rank_matched("me", ["p1", "q3", "q6"], [None], deep) == ["r5"]
    assert attributes.rank_matched("me", ["p1"], [1], []) == []


def test_matched_pairs_do_not_depend_on_batching() -> None:
    rng = np.random.default_rng(0)
    n, k = 200, 5
    ids = np.array([f"i{i:03d}" for i in range(n)], dtype=object)
    x = rng.standard_normal((n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (x + 0.05 * rng.standard_normal((n, 8))).astype(np.float32)  # mostly agreeing: sampling keeps some
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    pD, pI = _knn(x, k)
    rD, rI = _knn(y, 20)
    table = reference.mine(ids, pD, pI, rD, rI, x, y, k)
    target = np.asarray(table.column("probe_only_probe_cos").combine_chunks().flatten(), dtype=np.float64)
    whole = reference.matched_pairs(table, target, seed=3)
    split = reference.matched_pairs(pa.Table.from_batches(table.to_batches(max_chunksize=17)), target, seed=3)
    assert whole == split and 0 < len(whole) < len(target)
    lists = dict(zip(table.column("id").to_pylist(), table.column("probe_neighbours").to_pylist(), strict=True))
    only = dict(zip(table.column("id").to_pylist(), table.column("probe_only").to_pylist(), strict=True))
    assert all(j in lists[i] and j not in only[i] for i, j in whole)  # agreeing pairs only
    assert reference.matched_pairs(table, target, seed=4) != whole


# ---------------------------------------------------------------------------------------
# Planted blind spots: probes that cannot see one attribute, against a reference that sees
# them all, on generated scenes whose captions state them.


def _knn(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    index = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, index, 1).astype(np.float32), index.astype(np.int64)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from clipscan.data.scenes import write_corpus

    root = tmp_path_factory.mktemp("scenes")
    manifest = pq.read_table(write_corpus(str(root), 600, seed=0, size=64, max_objects=3))
    images = np.stack([np.asarray(Image.open(root / p).convert("RGB")) for p in manifest.column("image").to_pylist()])
    ids = manifest.column("id").to_pylist()
    captions = [max(c, key=len) for c in manifest.column("caption").to_pylist()]
    corpus = pa.table({"id": ids, "uri": ids, "caption": captions})
    return {"images": images, "ids": np.array(ids, dtype=object), "corpus": corpus,
            "reference": _embed(planted.sees_all(), images)}


def _embed(model: planted.Planted, images: np.ndarray) -> np.ndarray:
    pil = [Image.fromarray(i) for i in images]
    x = np.concatenate([model.embed_images(pil[s : s + 100]) for s in range(0, len(pil), 100)])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _contrast(scenes: dict[str, object], probe: planted.Planted) -> list[dict[str, object]]:
    ids, ref = scenes["ids"], scenes["reference"]
    x = _embed(probe, scenes["images"])  # type: ignore[arg-type]
    pD, pI = _knn(x, 10)
    rD, rI = _knn(ref, 100)  # type: ignore[arg-type]
    table = reference.mine(ids, pD, pI, rD, rI, x, ref, 10)  # type: ignore[arg-type]
    rows = reference.contrast_rows(table, scenes["corpus"], 600, seed=0,  # type: ignore[arg-type]
                                    deep_reference=reference.deep_lookup(ids, rI))
    summary = attributes.count_rows(rows, load_lexicons()).summary()
    for a in summary["attributes"]:
        print(f"{a['name']:9s} lift {a['lift']} ci {a['ci']} rate {a['rate']} control {a['control_rate']} pairs {a['pairs']}")
    return summary["attributes"]


@pytest.mark.parametrize("blind", ["colour", "count", "size", "position"])
def test_planted_blind_spot_comes_first(scenes: dict[str, object], blind: str) -> None:
    ranked = _contrast(scenes, getattr(planted, f"blind_{blind}")())
    first = ranked[0]
    assert first["name"] == blind and first["ci"][0] > 1  # type: ignore[index,operator]
    # measured lower bounds (600 scenes, seed 0): colour 1.199, count 9.46, size 1.82, position
    # 1.42; the largest other one 1.04 (scene, for the colour-blind probe: a gradient or striped
    # background names two colours, so colour words carry some of the background's pattern)
    others = [a["ci"][0] for a in ranked[1:] if a["ci"][0] is not None]  # type: ignore[index]
    assert max(others) < first["ci"][0]  # type: ignore[operator,type-var]


def test_probe_that_sees_everything_shows_no_blind_spot(scenes: dict[str, object]) -> None:
    ranked = _contrast(scenes, planted.sees_all_noisy())
    assert sum(a["pairs"] for a in ranked) > 0  # type: ignore[misc]  # there are probe-only pairs to judge
    assert all(a["ci"][0] is None or a["ci"][0] <= 1 for a in ranked)  # type: ignore[index,operator]


def test_ray_stage_counts_as_the_plain_function(ray_local: None) -> None:
    import ray.data

    lex = load_lexicons()
    rows = pa.Table.from_pylist(
        [{"rank": i, "id": f"c{i}", "caption": f"a {c} circle on the left", "neighbour_ids": ["n"],
          "neighbour_captions": ["two red squares", "a large blue circle"], "reference_captions": [f"a {c} star"],
          "matched_captions": [], "rank_matched_captions": ["a green circle at the top"]}
         for i, c in enumerate(["red", "blue", "green", "yellow"] * 25, start=1)],
        schema=attributes.ROWS_SCHEMA,
    )
    plain = attributes.count_rows(rows, lex, block=7)
    on_ray = attributes.count_dataset(ray.data.from_arrow(rows), lex, batch_size=16, actors=1)
    assert np.array_equal(plain.table, on_ray.table) and plain.pairs.tolist() == on_ray.pairs.tolist() == [200, 100, 0, 100]
    assert plain.examples == on_ray.examples and plain.examples["colour"][0] == (1, "c1")


def test_report_section_names_the_top_attribute_and_escapes() -> None:
    from clipscan.report.daf import attributes_html

    data = {"control": "rank_matched", "planted": "colour", "planted_found": True, "attributes": [
        {"name": "colour", "lift": 1.5, "ci": [1.2, 1.9], "rate": 0.6, "control_rate": 0.4, "pairs": 100,
         "examples": ["<img src=x>", "b"]},
        {"name": "size", "lift": 0.9, "ci": [0.7, 1.1], "rate": 0.3, "control_rate": 0.33, "pairs": 80, "examples": []},
    ]}
    html = attributes_html(data)
    assert "planted check of the method" in html and "and it does" in html
    assert "<b>colour</b> 1.5 times as often" in html and "&lt;img src=x&gt;" in html and "<img src=x>" not in html
    assert html.count("&#9650;") == 2  # colour's row and the legend; size's lower bound is below 1
    none = attributes_html({"attributes": [{**data["attributes"][1]}]})
    assert "No attribute differs more often" in none and "planted" not in none
