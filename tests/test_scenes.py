"""Tests for clipscan.data.scenes: determinism, manifest facts, colour twins, the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipscan.data.scenes import (
    BACKGROUND_COLOURS,
    MANIFEST_SCHEMA,
    PALETTE,
    SIZE_ORDER,
    Background,
    Obj,
    caption_for,
    make_scene,
    render,
    write_corpus,
)

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    write_corpus(str(out), 24, seed=7, size=96)
    return out


def test_same_seed_same_bytes(corpus: Path, tmp_path: Path) -> None:
    write_corpus(str(tmp_path / "again"), 24, seed=7, size=96)
    write_corpus(str(tmp_path / "other"), 24, seed=8, size=96)
    assert _files(tmp_path / "again") == _files(corpus)
    assert (tmp_path / "again" / "manifest.parquet").read_bytes() == (
        corpus / "manifest.parquet"
    ).read_bytes()
    assert _files(tmp_path / "other") != _files(corpus)


def test_worker_count_does_not_change_bytes(corpus: Path, tmp_path: Path) -> None:
    write_corpus(str(tmp_path), 24, seed=7, size=96, workers=2)
    assert _files(tmp_path) == _files(corpus)
    assert pq.read_table(tmp_path / "manifest.parquet").equals(
        pq.read_table(corpus / "manifest.parquet")
    )


def test_manifest_schema_and_facts(corpus: Path) -> None:
    table = pq.read_table(corpus / "manifest.parquet")
    assert table.schema.remove_metadata().equals(MANIFEST_SCHEMA)
    assert not list(corpus.glob("*.tmp-*")), "temporary manifest left behind"
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == [f"scene-{i:06d}" for i in range(24)]
    for i, row in enumerate(rows):
        assert row["image"] == f"images/{row['id']}.jpg"
        assert (corpus / row["image"]).is_file()
        n = row["n_objects"]
        assert 1 <= n <= 5
        for key in ("shapes", "colours", "sizes", "diameters", "xs", "ys"):
            assert len(row[key]) == n, key
        assert all(0 < v < 1 for v in row["xs"] + row["ys"])
        assert set(row["sizes"]) <= set(SIZE_ORDER)
        assert row["twin"] is None
        assert 3 <= len(row["caption"]) <= 5
        assert len(set(row["caption"])) == len(row["caption"])
        for caption in row["caption"]:
            for shape, colour in zip(row["shapes"], row["colours"], strict=True):
                assert f"{colour} {shape}" in caption, (caption, colour, shape)
        # The manifest states the same facts as the scene it was rendered from.
        scene = make_scene(7, i)
        assert row["shapes"] == [o.shape for o in scene.objects]
        assert row["xs"] == [o.x for o in scene.objects]
        assert row["background"] == scene.background.name
        assert row["caption"] == list(scene.captions)
        assert row["caption"][0] == caption_for(scene.objects, "sized", scene.background)


def test_colour_twins_differ_in_one_colour_only(tmp_path: Path) -> None:
    write_corpus(str(tmp_path), 8, seed=3, size=96, twins="colour")
    rows = pq.read_table(tmp_path / "manifest.parquet").to_pylist()
    for k in range(0, 8, 2):
        a, b = rows[k], rows[k + 1]
        assert a["twin"] == b["twin"] == f"twin-{k // 2:06d}"
        for key in ("n_objects", "shapes", "sizes", "diameters", "xs", "ys", "background"):
            assert a[key] == b[key], key
        changed = [
            i for i, (x, y) in enumerate(zip(a["colours"], b["colours"], strict=True)) if x != y
        ]
        assert len(changed) == 1
        # Captions keep their wording: only the changed colour word (and its article) differs.
        old, new = a["colours"][changed[0]], b["colours"][changed[0]]
        shape = a["shapes"][changed[0]]

        def plain(caption: str) -> str:
            return re.sub(r"\ban\b", "a", caption)

        assert [plain(c).replace(f"{old} {shape}", f"{new} {shape}") for c in a["caption"]] == [
            plain(c) for c in b["caption"]
        ]
        # Pixels differ, and only inside the recoloured object's bounding circle.
        original, twin = make_scene(3, k), make_scene(3, k, twin=True)
        diff = np.any(np.asarray(render(original, 96)) != np.asarray(render(twin, 96)), axis=2)
        assert diff.any()
        obj = original.objects[changed[0]]
        ys, xs = np.nonzero(diff)
        dist = np.hypot((xs + 0.5) / 96 - obj.x, (ys + 0.5) / 96 - obj.y)
        assert dist.max() <= obj.diameter / 2 + 2 / 96
        assert (tmp_path / a["image"]).read_bytes() != (tmp_path / b["image"]).read_bytes()


def test_object_centre_has_its_palette_colour() -> None:
    for i in range(40):
        scene = make_scene(11, i)
        pixels = np.asarray(render(scene, 224)).astype(int)
        assert pixels.shape == (224, 224, 3)
        for obj in scene.objects:
            centre = pixels[int(obj.y * 224), int(obj.x * 224)]
            assert np.abs(centre - PALETTE[obj.colour]).max() <= 2, (i, obj)


def test_layout_is_non_overlapping_and_sizes_distinct_when_asked() -> None:
    for i in range(200):
        scene = make_scene(2, i, n_objects=5)
        objs = scene.objects
        assert len(objs) == 5
        assert len({(o.shape, o.colour) for o in objs}) == 5
        for a in range(5):
            for b in range(a + 1, 5):
                gap = np.hypot(objs[a].x - objs[b].x, objs[a].y - objs[b].y)
                assert gap >= (objs[a].diameter + objs[b].diameter) / 2
        distinct = make_scene(2, i, n_objects=3, distinct_sizes=True)
        assert sorted(o.size for o in distinct.objects) == sorted(SIZE_ORDER)
    assert make_scene(2, 5) == make_scene(2, 5)
    with pytest.raises(ValueError, match="n_objects"):
        make_scene(2, 5, n_objects=4, distinct_sizes=True)


def test_caption_for_follows_the_given_order() -> None:
    red = Obj("circle", "red", "large", 0.2, 0.5, 0.3)
    blue = Obj("square", "blue", "small", 0.8, 0.1, 0.15)
    grey = Background("grey", "plain", BACKGROUND_COLOURS["grey"])
    assert caption_for([red, blue]) == "a red circle and a blue square"
    assert caption_for([blue, red], "list") == "a blue square, a red circle"
    assert caption_for([blue, red], "count") == "two objects: a blue square and a red circle"
    assert (
        caption_for([red, blue], "sized", grey)
        == "a large red circle and a small blue square on a grey background"
    )
    assert caption_for([red, blue], "placed", grey) == (
        "a large red circle on the left and a small blue square at the top right,"
        " on a grey background"
    )
    orange = Obj("hexagon", "orange", "medium", 0.5, 0.5, 0.25)
    assert caption_for([orange], "sized") == "a medium-sized orange hexagon"
    assert caption_for([orange], "placed") == "a medium-sized orange hexagon in the centre"
    assert caption_for([orange]) == "an orange hexagon"
    with pytest.raises(ValueError, match="detail"):
        caption_for([red], "verbose")


def test_object_colours_stand_out_from_every_background() -> None:
    for name, rgb in PALETTE.items():
        for background, brgb in BACKGROUND_COLOURS.items():
            assert np.linalg.norm(np.subtract(rgb, brgb)) >= 80, (name, background)


def test_bad_arguments_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="twins"):
        write_corpus(str(tmp_path), 4, twins="shape")
    with pytest.raises(ValueError, match="even"):
        write_corpus(str(tmp_path), 3, twins="colour")


def test_cli_writes_a_corpus_and_stays_light(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "clipscan.data.scenes", "--n", "6", "--out", str(tmp_path)]
        + ["--seed", "1", "--size", "64", "--twins", "colour"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert lines[0] == str(tmp_path / "manifest.parquet")
    assert "images/s" in lines[1]
    assert pq.read_table(lines[0]).num_rows == 6
    heavy = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, clipscan.data.scenes; print(sorted({'torch', 'ray'} & set(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        check=True,
    )
    assert heavy.stdout.strip() == "[]"


def test_max_objects_caps_the_count() -> None:
    from clipscan.data.scenes import make_scene, write_corpus

    counts = {len(make_scene(0, i, max_objects=2).objects) for i in range(60)}
    assert counts == {1, 2}
    assert len(make_scene(0, 7).objects) == len(make_scene(0, 7, max_objects=5).objects)  # the default stream
    with pytest.raises(ValueError, match="max_objects must be in 1..5"):
        make_scene(0, 0, max_objects=6)
    with pytest.raises(ValueError, match="max_objects must be in 1..5"):
        write_corpus("/nonexistent-never-written", 2, max_objects=0)
