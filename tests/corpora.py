"""Small on-disk corpora for tests: every reader layout, and one of every kind of bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def jpeg(seed: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# name -> (file bytes or None for a missing file, captions, expected outcome)
def bad_corpus(root: Path) -> tuple[Path, dict[str, str]]:
    """A CSV manifest with one row of each bad-input kind; returns it and id -> expected outcome.

    Outcomes: ``ok``, ``converted:<note>`` or ``skipped:<stage>:<reason fragment>``.
    """
    images = root / "images"
    images.mkdir(parents=True)
    good = jpeg(1)
    rgb = np.random.default_rng(2).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    files: dict[str, bytes | None] = {
        "good": good,
        "corrupt": b"\xff\xd8\xff\xe0" + bytes(np.random.default_rng(3).integers(0, 256, 500, dtype=np.uint8)),
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "text": b"this is not an image, just a text file with a .jpg name\n",
        "huge": image_bytes(Image.new("RGB", (500, 400), (10, 20, 30)), "PNG"),
        "cmyk": image_bytes(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "gray16": image_bytes(Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
        "palette": image_bytes(Image.fromarray(rgb).convert("P"), "PNG"),
        "alpha": image_bytes(Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA"), "PNG"),
        "missing": None,
        "nocaption": good,
        "latin1": good,
        "dup": good,
    }
    for name, data in files.items():
        if data is not None:
            (images / f"{name}.jpg").write_bytes(data)
    expected = {
        "good": "ok",
        "corrupt": "skipped:decode:corrupt",
        "truncated": "skipped:decode:truncated",
        "empty": "skipped:decode:zero-byte",
        "text": "skipped:decode:not an image",
        "huge": "skipped:decode:above the limit",
        "cmyk": "converted:CMYK->RGB",
        "gray16": "converted:I;16->RGB",
        "palette": "converted:P->RGB",
        "alpha": "converted:RGBA->RGB",
        "missing": "skipped:decode:missing file",
        "nocaption": "skipped:read:no caption",
        "latin1": "ok",
        "dup": "ok",
    }
    lines = [b"id,image,caption"]
    for name in files:
        caption = b"" if name == "nocaption" else f"a picture called {name}".encode()
        if name == "latin1":
            caption = b"caf\xe9 au lait on a table"  # not UTF-8
        lines.append(f"{name},images/{name}.jpg,".encode() + caption)
    lines.append(b"dup,images/good.jpg,the second row with id dup")
    manifest = root / "manifest.csv"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    return manifest, expected


def flickr8k(root: Path, n: int = 6, token_format: bool = False) -> Path:
    (root / "Images").mkdir(parents=True)
    lines = [] if token_format else ["image,caption"]
    for i in range(n):
        name = f"{1000 + i}_abc.jpg"
        (root / "Images" / name).write_bytes(jpeg(i))
        for j in range(5):
            text = f"image {i} caption {j}" + " longer" * (j == 2)
            lines.append(f"{name}#{j}\t{text}" if token_format else f'{name},"{text}, with a comma"')
    (root / ("Flickr8k.token.txt" if token_format else "captions.txt")).write_text("\n".join(lines) + "\n")
    return root


def coco(root: Path, n: int = 5) -> Path:
    (root / "val2017").mkdir(parents=True)
    images, annotations = [], []
    for i in range(n):
        name = f"{i:012d}.jpg"
        (root / "val2017" / name).write_bytes(jpeg(i))
        images.append({"id": 100 + i, "file_name": name})
        for j in range(3):
            annotations.append({"id": i * 10 + j, "image_id": 100 + i, "caption": f"coco {i} {j}" + "!" * j})
    path = root / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path


def webdataset(root: Path, n: int = 8, shards: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    per = n // shards
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(s * per, (s + 1) * per):
                key = f"sample{i:05d}"
                for ext, data in (("jpg", jpeg(i)), ("txt", f"wds caption {i}".encode()),
                                  ("json", json.dumps({"captions": [f"extra caption {i}"]}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


def clip_retrieval(root: Path, n: int, d: int, seed: int, files: int = 2, clusters: int = 50) -> Path:
    """n clustered unit vectors in clip-retrieval's layout (img_emb/img_emb_N.npy,
    metadata/metadata_N.parquet with image_path and caption): an ``emb:`` model's input."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(exist_ok=True)
    centres = np.random.default_rng(7).normal(size=(clusters, d))
    for f, rows in enumerate(np.array_split(np.arange(n), files)):
        rng = np.random.default_rng([seed, f])
        x = centres[rows % clusters] + 0.5 * rng.normal(size=(len(rows), d))
        np.save(root / "img_emb" / f"img_emb_{f}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32"))
        pq.write_table(pa.table({"image_path": [f"images/{i:07d}.jpg" for i in rows],
                                 "caption": [f"an image of cluster {i % clusters}" for i in rows]}),
                       root / "metadata" / f"metadata_{f}.parquet")
    return root
