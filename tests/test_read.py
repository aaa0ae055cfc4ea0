from pathlib import Path

import pyarrow as pa
import pyarrow.csv  # noqa: F401  (pa.csv)
import pyarrow.parquet as pq
import pytest

from clipscan.config import DataConfig
from clipscan.data.corpus import read_corpus
from clipscan.data.read import CorpusError, detect_format, read_table, select_caption
from tests import corpora


def test_select_caption() -> None:
    assert select_caption(["a b", "a b c d", "a b c"], "longest") == "a b c d"
    assert select_caption(["a b", "a b c d"], "first") == "a b"
    assert select_caption([], "longest") == ""


@pytest.mark.parametrize("token_format", [False, True])
def test_flickr8k(tmp_path: Path, token_format: bool) -> None:
    root = corpora.flickr8k(tmp_path / "f8k", token_format=token_format)
    assert detect_format(str(root)) == "flickr8k"
    table, info = read_table(DataConfig(path=str(root)))
    assert table.num_rows == 6 and info["format"] == "flickr8k"
    row = table.to_pylist()[0]
    assert row["id"] == "1000_abc.jpg" and len(row["captions"]) == 5  # ids keep the extension
    assert "longer" in row["caption"]
    assert row["uri"].endswith("Images/1000_abc.jpg") and Path(row["uri"]).is_file()


def test_coco(tmp_path: Path) -> None:
    path = corpora.coco(tmp_path / "coco")
    assert detect_format(str(path)) == "coco"
    table, _ = read_table(DataConfig(path=str(path), caption="first"))
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["100", "101", "102", "103", "104"]
    assert rows[0]["caption"] == "coco 0 0" and Path(rows[0]["uri"]).is_file()


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_manifest_kinds(tmp_path: Path, scene_corpus: str, kind: str) -> None:
    table = pq.read_table(scene_corpus).select(["id", "image", "caption"]).slice(0, 10)
    base = Path(scene_corpus).parent
    if kind == "parquet":
        path = scene_corpus
    elif kind == "jsonl":
        path = str(base / "m.jsonl")
        Path(path).write_text("\n".join(__import__("json").dumps(r) for r in table.to_pylist()))
    else:
        path = str(base / "m.csv")
        rows = ["id,image,caption"] + [f'{r["id"]},{r["image"]},"{r["caption"][0]}"' for r in table.to_pylist()]
        Path(path).write_text("\n".join(rows))
    out, _ = read_table(DataConfig(path=path, limit=10))
    assert out.column("id").to_pylist() == table.column("id").to_pylist()
    assert all(Path(u).is_file() for u in out.column("uri").to_pylist())


def test_bad_rows_marked(tmp_path: Path) -> None:
    manifest, _ = corpora.bad_corpus(tmp_path)
    table, info = read_table(DataConfig(path=str(manifest)))
    rows = {(r["id"], r["caption"]): r for r in table.to_pylist()}
    assert info["caption_lines_utf8_repaired"] == 1
    latin = next(r for (i, _), r in rows.items() if i == "latin1")
    assert "\ufffd" in latin["caption"] and latin["skip_stage"] == ""
    nocap = next(r for (i, _), r in rows.items() if i == "nocaption")
    assert nocap["skip_reason"] == "no caption"
    dups = [r for (i, _), r in rows.items() if i == "dup"]
    assert sorted(r["skip_reason"] for r in dups) == ["", "duplicate id (first seen at row 13)"]


def test_unknown_layout_names_path(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    with pytest.raises(CorpusError, match=str(tmp_path / "x")):
        detect_format(str(tmp_path / "x"))
    with pytest.raises(CorpusError, match="does not exist"):
        detect_format(str(tmp_path / "nope.bin"))


def test_webdataset(tmp_path: Path, ray_local: None) -> None:
    root = corpora.webdataset(tmp_path / "wds")
    ds, info = read_corpus(DataConfig(path=str(root / "shard-{00000..00001}.tar"), format="webdataset"))
    rows = sorted(ds.take_all(), key=lambda r: r["id"])
    assert len(rows) == 8 and rows[0]["id"] == "sample00000"
    assert rows[0]["captions"] == ["wds caption 0", "extra caption 0"]
    assert rows[0]["caption"] == "extra caption 0" and rows[0]["image_bytes"][:2] == b"\xff\xd8"


def test_coco_images_found_beside_the_annotations_folder(tmp_path: Path) -> None:
    flat = corpora.coco(tmp_path / "coco")  # coco/captions_val2017.json, coco/val2017/
    (tmp_path / "coco" / "annotations").mkdir()
    path = flat.rename(tmp_path / "coco" / "annotations" / flat.name)  # as COCO ships it
    table, info = read_table(DataConfig(path=str(path)))
    assert all(Path(u).is_file() for u in table.column("uri").to_pylist())
    assert info["annotations_without_image"] == 0
    (tmp_path / "coco" / "val2017").rename(tmp_path / "coco" / "elsewhere")
    with pytest.raises(CorpusError, match="no image folder 'val2017'.*set data.images"):
        read_table(DataConfig(path=str(path)))


def test_default_ids_keep_extension_and_folder(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    for name in ("hopper.jpg", "hopper.png", "a/hopper.png"):
        (tmp_path / name).write_bytes(corpora.jpeg(0))
    (tmp_path / "m.csv").write_text("image,caption\nhopper.jpg,x\nhopper.png,y\na/hopper.png,z\n./hopper.jpg,again\n")
    table, _ = read_table(DataConfig(path=str(tmp_path / "m.csv")))
    assert table.column("id").to_pylist() == ["hopper.jpg", "hopper.png", "a/hopper.png", "hopper.jpg"]
    assert table.column("skip_reason").to_pylist()[:3] == ["", "", ""]
    assert table.column("skip_reason").to_pylist()[3].startswith("duplicate id")


ODD_IMAGES = ["a.jpg", "./b.jpg", "c//d.jpg", "e/../f.jpg", "g/", "/abs/h.jpg", "s3://bucket/i.jpg",
              "file://j.jpg", "", None, "k/./l.jpg", "...", "m/.n.jpg", "a.jpg", "//o.jpg"]
ODD_CAPTIONS = ["  a cat  ", "", None, "\x1c a dog \x1f", "\u3000", "a cat", "tab\tin", "\n", "é", "two  spaces",
                "x", "y", "z", "dup of a", "last"]


@pytest.mark.parametrize("kind", ["parquet", "csv", "jsonl", "parquet-lists"])
@pytest.mark.parametrize("ids", ["none", "strings", "ints"])
@pytest.mark.parametrize("base,limit,step", [(None, None, 4), ("s3://bucket/root", 11, None), ("/data/", None, 100)])
def test_manifest_columns_equal_the_row_path(tmp_path: Path, kind: str, ids: str, base: str | None, limit: int | None,
                                             step: int | None) -> None:
    """The Arrow path gives the row path's table to the bit: ids (normalised paths, given ids,
    repeats), uris, trimmed captions, skip reasons, shards and rows."""
    import json

    from clipscan.data.read import manifest_table, read_manifest, read_manifest_table, rows_to_table

    cols: dict[str, list[object]] = {"image": list(ODD_IMAGES), "caption": list(ODD_CAPTIONS)}
    if ids == "strings":
        cols["id"] = ["x1", None, "x1", "x2", "", None, "x3", "x2", "x4", "x5", "x6", "x7", "x8", "x9", "x1"]
    elif ids == "ints":
        cols["id"] = [3, 1, 3, None, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, -1]
    if kind == "parquet-lists":  # several captions a row: data.caption picks one
        cols["caption"] = [[c, "  ", None, f"long {c}"] if i % 3 == 0 else [] if i % 3 == 1 else None if i == 2 else
                           [c, c] for i, c in enumerate(cols["caption"])]
    if kind.startswith("parquet"):
        path = tmp_path / "m.parquet"
        pq.write_table(pa.table(cols), path)
    elif kind == "jsonl":
        path = tmp_path / "m.jsonl"
        path.write_text("\n".join(json.dumps(dict(zip(cols, r, strict=True))) for r in zip(*cols.values(), strict=True)))
    else:
        if ids == "ints" or None in cols["image"]:  # CSV has no null string: write what it can hold
            cols = {k: ["" if v is None else v for v in vals] for k, vals in cols.items()}
        path = tmp_path / "m.csv"
        pa.csv.write_csv(pa.table({k: pa.array([None if v is None else str(v) for v in vals], pa.string())
                                   for k, vals in cols.items()}), path)
    for how in ("longest", "first"):
        got = manifest_table(*read_manifest_table(str(path)), base or str(tmp_path), step, limit, caption=how)
        assert got is not None
        rows, counts = read_manifest(str(path), base)
        want = rows_to_table(rows[:limit] if limit is not None else rows, how, step)
        assert got[1] == counts
        for name in want.column_names:
            assert got[0].column(name).to_pylist() == want.column(name).to_pylist(), name
        assert got[0].equals(want)


def test_manifest_with_caption_bytes_takes_the_row_path(tmp_path: Path) -> None:
    from clipscan.data.read import manifest_table, read_manifest_table

    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": ["a.jpg", "b.jpg"], "caption": [b"one \xff", b" three "]}), path)
    assert manifest_table(*read_manifest_table(str(path)), str(tmp_path), 4, None) is None
    table, _ = read_table(DataConfig(path=str(path)))
    assert table.column("caption").to_pylist() == ["one \ufffd", "three"]


def _parts_manifest(root: Path, n: int, ids: str) -> Path:
    """A manifest folder of two Parquet parts (row groups of 9 and 13 rows) with ids repeated
    within and across parts, null and blank captions, paths that normalise to the same id."""
    folder = root / "manifest.parquet"
    folder.mkdir(parents=True)
    cols: dict[str, list[object]] = {
        "image": [f"i{i % 11}.jpg" if i % 3 == 0 else f"./x/{i}.jpg" if i % 5 else f"x/{i}.jpg" for i in range(n)],
        "caption": [None if i % 7 == 0 else "  " if i % 13 == 0 else f" caption {i} " for i in range(n)],
    }
    if ids == "ints":
        cols["id"] = [None if i % 17 == 0 else i % 40 for i in range(n)]
    if ids == "caption lists":
        cols["caption"] = [None if c is None else [c, f"a longer {c}", ""] if i % 2 else [c]
                           for i, c in enumerate(cols["caption"])]
    table = pa.table(cols)
    pq.write_table(table.slice(0, n // 2), folder / "part-0.parquet", row_group_size=9)
    pq.write_table(table.slice(n // 2), folder / "part-1.parquet", row_group_size=13)
    return folder


@pytest.mark.parametrize("ids", ["paths", "ints", "caption lists"])
@pytest.mark.parametrize("step,limit", [(7, None), (50, None), (1000, None), (8, 61)])
def test_streamed_manifest_equals_the_driver_table(tmp_path: Path, ray_local: None, ids: str, step: int,
                                                   limit: int | None) -> None:
    """Read in Ray tasks shard by shard, after the distributed duplicate pass: the driver's
    table to the bit (ids, uris, captions, skip reasons naming the first row, shards, rows)."""
    _parts_manifest(tmp_path, 103, ids)
    ds, info = read_corpus(DataConfig(path=str(tmp_path), rows_per_block=step, limit=limit, stream_min_rows=1),
                           records=str(tmp_path / "records"))
    assert info["streamed"] is True and info["manifest_parts"] == 2 and info["duplicate_rows"] > 0
    got = pa.Table.from_pylist(sorted(ds.take_all(), key=lambda r: (r["shard"], r["row"])))
    want, _ = read_table(DataConfig(path=str(tmp_path), rows_per_block=step, limit=limit))
    assert sum(info["shard_rows"].values()) == want.num_rows == (limit or 103)
    for name in want.column_names:
        assert got.column(name).to_pylist() == want.column(name).to_pylist(), name
    repeated = [r for r in want.column("skip_reason").to_pylist() if r.startswith("duplicate id")]
    assert len(repeated) == info["duplicate_rows"]


def test_streamed_manifest_forgets_only_the_shard_whose_input_changed(tmp_path: Path, ray_local: None) -> None:
    folder = _parts_manifest(tmp_path, 103, "paths")
    cfg = DataConfig(path=str(tmp_path), rows_per_block=10, stream_min_rows=1)
    records = str(tmp_path / "records")
    _, info = read_corpus(cfg, records=records)
    assert info["changed_shards"] == 0 and info["todo_shards"] == 11
    part = pq.read_table(folder / "part-1.parquet")
    captions = part.column("caption").to_pylist()
    captions[20] = "an edited caption"  # manifest row 51 + 20 = 71: shard 7
    pq.write_table(part.set_column(1, "caption", pa.array(captions, pa.string())), folder / "part-1.parquet")
    forgotten: list[int] = []
    ds, info = read_corpus(cfg, done_shards=lambda rows: set(rows) - {7, 9}, records=records,
                           forget=forgotten.append)
    assert forgotten == [7] and info["changed_shards"] == 1 and info["todo_shards"] == 2
    assert sorted({r["shard"] for r in ds.take_all()}) == [7, 9]


def test_small_csv_and_caption_bytes_manifests_are_read_on_the_driver(tmp_path: Path) -> None:
    from clipscan.data.stream import plan_manifest

    _parts_manifest(tmp_path / "a", 30, "paths")
    assert plan_manifest(DataConfig(path=str(tmp_path / "a"), stream_min_rows=30),
                         str(tmp_path / "a" / "manifest.parquet")) is not None
    assert plan_manifest(DataConfig(path=str(tmp_path / "a"), stream_min_rows=31),
                         str(tmp_path / "a" / "manifest.parquet")) is None  # below data.stream_min_rows
    assert plan_manifest(DataConfig(path=str(tmp_path / "a"), stream_min_rows=1, limit=5),
                         str(tmp_path / "a" / "manifest.parquet")).rows == 5  # type: ignore[union-attr]
    (tmp_path / "m.csv").write_text("image,caption\na.jpg,x\n")
    assert plan_manifest(DataConfig(path=str(tmp_path / "m.csv"), stream_min_rows=0), str(tmp_path / "m.csv")) is None
    pq.write_table(pa.table({"image": ["a.jpg"], "caption": [b"one"]}), tmp_path / "bytes.parquet")
    assert plan_manifest(DataConfig(path=str(tmp_path), stream_min_rows=0), str(tmp_path / "bytes.parquet")) is None
