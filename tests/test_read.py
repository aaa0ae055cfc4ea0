from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipscan.config import DataConfig
from clipscan.data.read import CorpusError, detect_format, read_corpus, read_table, select_caption
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
