"""Corpus location and layout in, a table of rows out: ``id``, ``uri``, ``captions``, ``caption``, skip columns.

Readers parse the caption side of a corpus (Flickr8k, COCO captions JSON, a manifest
in Parquet/CSV/JSONL) on the driver, where it is metadata only, and hand the rows to Ray
Data in shards; WebDataset shards are read by Ray Data directly. Rows that cannot be
used (no caption, duplicate id) are kept with ``skip_stage``/``skip_reason`` set, so the
job accounts for every row it read.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from clipscan import fs as cfs

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import DataConfig

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("uri", pa.string()),
        ("captions", pa.list_(pa.string())),
        ("caption", pa.string()),
        ("skip_stage", pa.string()),
        ("skip_reason", pa.string()),
        ("notes", pa.string()),
        ("shard", pa.int32()),  # input shard: the unit of parallelism and of resume (-1: none)
        ("row", pa.int32()),  # row within its shard
    ]
)
READ_BLOCK_ROWS = 1024  # rows per Ray block of the corpus rows; shards (data.rows_per_block) hold many blocks
MANIFEST_NAMES = ("manifest.parquet", "manifest.jsonl", "manifest.csv")
FLICKR_CAPTIONS = ("captions.txt", "Flickr8k.token.txt")
FLICKR_IMAGE_DIRS = ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset")


READ_CPUS = 0.25  # CPUs a WebDataset read task reserves


class CorpusError(ValueError):
    """A corpus that cannot be read at all; the message names the path."""


@dataclass
class RawRow:
    id: str
    uri: str
    captions: list[str]
    notes: list[str] = field(default_factory=list)


def _decode_text(data: bytes, where: str) -> tuple[str, int]:
    """UTF-8 text, with invalid bytes replaced; returns the text and how many lines needed it."""
    try:
        return data.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        bad = sum(1 for line in text.splitlines() if "\ufffd" in line)
        return text, bad


def detect_format(path: str) -> str:
    """Guess the corpus layout of ``path``: flickr8k | coco | manifest | webdataset."""
    fsys, inner = cfs.resolve(path)
    try:
        info = fsys.get_file_info(inner)
        names = (
            {f.base_name for f in fsys.get_file_info(pafs.FileSelector(inner))}
            if info.type == pafs.FileType.Directory else set()
        )
    except OSError as e:  # unreachable store, no credentials: say which corpus
        raise CorpusError(f"cannot read corpus path {path}: {e}") from e
    name = posixpath.basename(inner.rstrip("/"))
    if info.type == pafs.FileType.Directory:
        if any(n in names for n in FLICKR_CAPTIONS):
            return "flickr8k"
        if any(n in names for n in MANIFEST_NAMES):
            return "manifest"
        if any(n.endswith(".tar") for n in names):
            return "webdataset"
        raise CorpusError(
            f"cannot tell the corpus layout of directory {path}: expected one of "
            f"{', '.join(FLICKR_CAPTIONS + MANIFEST_NAMES)} or .tar shards; set data.format"
        )
    if name.endswith(".tar") or "{" in name:
        return "webdataset"
    if name.endswith(".json"):
        return "coco"
    if name.endswith((".parquet", ".csv", ".jsonl")):
        return "manifest"
    if name.endswith(".txt"):
        return "flickr8k"
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"corpus path {path} does not exist")
    raise CorpusError(f"cannot tell the corpus layout of {path}; set data.format")


def _find_images_dir(base: str, override: str | None, candidates: Iterable[str]) -> str:
    if override:
        return override
    for cand in candidates:
        p = cfs.join(base, cand)
        fsys, inner = cfs.resolve(p)
        if fsys.get_file_info(inner).type == pafs.FileType.Directory:
            return p
    return base


def read_flickr8k(path: str, images: str | None = None) -> tuple[list[RawRow], dict[str, int]]:
    """Flickr8k: a folder with ``captions.txt`` (CSV ``image,caption``) or ``Flickr8k.token.txt``."""
    fsys, inner = cfs.resolve(path)
    if fsys.get_file_info(inner).type == pafs.FileType.Directory:
        base = path
        for name in FLICKR_CAPTIONS:
            if cfs.exists(cfs.join(path, name)):
                captions_file = cfs.join(path, name)
                break
        else:
            raise CorpusError(f"{path}: no {' or '.join(FLICKR_CAPTIONS)} in this folder")
    else:
        captions_file, base = path, cfs.dirname(path)
    text, bad = _decode_text(cfs.read_bytes(captions_file), captions_file)
    image_dir = _find_images_dir(base, images, FLICKR_IMAGE_DIRS)
    by_image: dict[str, list[str]] = {}
    order: list[str] = []
    if captions_file.endswith("Flickr8k.token.txt") or "\t" in text.split("\n", 1)[0]:
        pairs = []
        for line in text.splitlines():
            if not line.strip():
                continue
            key, _, caption = line.partition("\t")
            pairs.append((key.split("#", 1)[0].strip(), caption.strip()))
    else:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None or [h.strip().lower() for h in header[:2]] != ["image", "caption"]:
            raise CorpusError(f"{captions_file}: expected a CSV header 'image,caption', got {header}")
        pairs = [(r[0].strip(), ",".join(r[1:]).strip()) for r in reader if r]
    for image, caption in pairs:
        if image not in by_image:
            by_image[image] = []
            order.append(image)
        if caption:
            by_image[image].append(caption)
    rows = [
        RawRow(id=image.rsplit(".", 1)[0], uri=cfs.join(image_dir, image), captions=by_image[image])
        for image in order
    ]
    return rows, {"caption_lines_utf8_repaired": bad}


def read_coco(path: str, images: str | None = None) -> tuple[list[RawRow], dict[str, int]]:
    """COCO captions JSON (``images`` + ``annotations``); images in ``data.images`` or a folder named after the split."""
    raw, bad = _decode_text(cfs.read_bytes(path), path)
    try:
        doc = json.loads(raw)
        entries, annotations = doc["images"], doc["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CorpusError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from e
    if images is None:
        stem = posixpath.basename(path).rsplit(".", 1)[0]
        split = stem.split("_")[-1]
        images = _find_images_dir(cfs.dirname(path), None, (split, "images"))
    caps: dict[Any, list[str]] = {}
    for ann in annotations:
        text = ann.get("caption")
        if isinstance(text, str) and text.strip():
            caps.setdefault(ann.get("image_id"), []).append(text.strip())
    rows = [
        RawRow(id=str(e["id"]), uri=cfs.join(images, e["file_name"]), captions=caps.get(e["id"], []))
        for e in entries
    ]
    return rows, {"caption_lines_utf8_repaired": bad}


def _read_manifest_table(path: str) -> tuple[pa.Table, int]:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    fsys, inner = cfs.resolve(path)
    try:
        if path.endswith(".parquet"):
            return pq.read_table(inner, filesystem=fsys), 0
        text, bad = _decode_text(cfs.read_bytes(path), path)
        if path.endswith(".csv"):
            opts = pacsv.ConvertOptions(column_types={"id": pa.string(), "image": pa.string(), "caption": pa.string()})
            return pacsv.read_csv(io.BytesIO(text.encode()), convert_options=opts), bad
        if path.endswith(".jsonl"):
            lines = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        lines.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise CorpusError(f"{path}:{n}: not a JSON object: {e}") from e
            for row in lines:
                if "id" in row and row["id"] is not None:
                    row["id"] = str(row["id"])
            return (pa.Table.from_pylist(lines) if lines else pa.table({"image": pa.array([], pa.string())})), bad
    except (OSError, pa.ArrowInvalid) as e:
        raise CorpusError(f"cannot read manifest {path}: {e}") from e
    raise CorpusError(f"manifest {path}: expected .parquet, .csv or .jsonl")


def read_manifest(path: str, images: str | None = None) -> tuple[list[RawRow], dict[str, int]]:
    """A manifest: ``image`` (path or URI, relative to the manifest), ``caption`` (string or list), optional ``id``."""
    fsys, inner = cfs.resolve(path)
    try:
        is_dir = fsys.get_file_info(inner).type == pafs.FileType.Directory
    except OSError as e:
        raise CorpusError(f"cannot read manifest {path}: {e}") from e
    if is_dir:
        for name in MANIFEST_NAMES:
            if cfs.exists(cfs.join(path, name)):
                path = cfs.join(path, name)
                break
    table, bad = _read_manifest_table(path)
    if "image" not in table.column_names:
        raise CorpusError(f"manifest {path} has no 'image' column (columns: {table.column_names})")
    base = images or cfs.dirname(path)
    ids = table.column("id").to_pylist() if "id" in table.column_names else None
    caps = table.column("caption").to_pylist() if "caption" in table.column_names else None
    rows = []
    for i, image in enumerate(table.column("image").to_pylist()):
        image = "" if image is None else str(image)
        uri = image if (cfs.is_uri(image) or image.startswith("/")) else cfs.join(base, image)
        raw = caps[i] if caps is not None else None
        captions = [raw] if isinstance(raw, str) else list(raw or [])
        clean = []
        for c in captions:
            if isinstance(c, bytes):
                c, n = _decode_text(c, path)
                bad += n
            if c is not None and str(c).strip():
                clean.append(str(c).strip())
        row_id = str(ids[i]) if ids is not None and ids[i] is not None else posixpath.splitext(image)[0]
        rows.append(RawRow(id=row_id, uri=uri, captions=clean))
    return rows, {"caption_lines_utf8_repaired": bad}


READERS = {"flickr8k": read_flickr8k, "coco": read_coco, "manifest": read_manifest}


def select_caption(captions: list[str], how: str) -> str:
    """The image's caption: the longest (the paper's choice; ties go to the first) or the first."""
    if not captions:
        return ""
    if how == "first":
        return captions[0]
    return max(captions, key=len)


def rows_to_table(rows: list[RawRow], caption: str, rows_per_block: int | None = None) -> pa.Table:
    """Build the row table: select captions, mark rows with no caption and duplicate ids as skipped.

    With ``rows_per_block``, row n goes to shard ``n // rows_per_block``; without, shard -1.
    """
    first_seen: dict[str, int] = {}
    cols: dict[str, list[Any]] = {name: [] for name in ROW_SCHEMA.names}
    for n, row in enumerate(rows):
        stage = reason = ""  # empty, never null: Ray turns all-null string columns into floats
        if row.id in first_seen:
            stage, reason = "read", f"duplicate id (first seen at row {first_seen[row.id]})"
        elif not row.captions:
            stage, reason = "read", "no caption"
        first_seen.setdefault(row.id, n)
        cols["id"].append(row.id)
        cols["uri"].append(row.uri)
        cols["captions"].append(row.captions)
        cols["caption"].append(select_caption(row.captions, caption))
        cols["skip_stage"].append(stage)
        cols["skip_reason"].append(reason)
        cols["notes"].append(",".join(row.notes))
        cols["shard"].append(n // rows_per_block if rows_per_block else -1)
        cols["row"].append(n % rows_per_block if rows_per_block else -1)
    return pa.table(cols, schema=ROW_SCHEMA)


def corpus_path(cfg: DataConfig) -> str:
    """``data.path``, which a job that reads images needs (only an all-``emb:`` DAF run leaves it out)."""
    if cfg.path is None:
        raise CorpusError("data.path is not set: this job reads the corpus (only DAF with both models emb: "
                          "runs without one)")
    return cfg.path


def read_table(cfg: DataConfig) -> tuple[pa.Table, dict[str, Any]]:
    """Parse a Flickr8k, COCO or manifest corpus into the row table (driver side, metadata only)."""
    path = corpus_path(cfg)
    fmt = cfg.format if cfg.format != "auto" else detect_format(path)
    if fmt not in READERS:
        raise CorpusError(f"format {fmt!r} is not read into a table; use read_corpus")
    rows, counts = READERS[fmt](path, cfg.images)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    return rows_to_table(rows, cfg.caption, cfg.rows_per_block), {"format": fmt, **counts}


def _wds_rows(samples: pa.Table, caption: str) -> pa.Table:
    """Normalise WebDataset samples (``__key__``, ``__url__``, ``jpg``/``png``/..., ``txt``/``json``)."""
    batch = {name: samples.column(name).to_pylist() for name in samples.column_names}
    keys = [str(k) for k in batch["__key__"]]
    urls = [str(u) for u in batch.get("__url__", [""] * len(keys))]
    image_bytes: list[bytes | None] = [None] * len(keys)
    for ext in ("jpg", "jpeg", "png", "webp", "bmp"):
        if ext in batch:
            for i, v in enumerate(batch[ext]):
                if image_bytes[i] is None and v is not None:
                    image_bytes[i] = bytes(v)
    captions: list[list[str]] = [[] for _ in keys]
    for i in range(len(keys)):
        txt = batch["txt"][i] if "txt" in batch else None
        meta = batch["json"][i] if "json" in batch else None
        if isinstance(txt, bytes):
            txt = txt.decode("utf-8", errors="replace")
        if isinstance(meta, bytes):
            try:
                meta = json.loads(meta)
            except json.JSONDecodeError:
                meta = None
        if isinstance(txt, str) and txt.strip():
            captions[i].append(txt.strip())
        if isinstance(meta, dict):
            extra = meta.get("captions") or meta.get("caption") or []
            captions[i].extend([extra] if isinstance(extra, str) else [str(c) for c in extra])
    table = rows_to_table(
        [RawRow(k, f"{u}#{k}", c) for k, u, c in zip(keys, urls, captions, strict=True)], caption
    )
    return table.append_column("image_bytes", pa.array(image_bytes, type=pa.binary()))


def expand_shards(path: str) -> list[str]:
    """WebDataset shard paths: ``a-{000..009}.tar`` brace ranges, a folder of ``.tar`` files, or one file."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", path)
    if match:
        lo, hi = match.group(1), match.group(2)
        width = len(lo)
        head, tail = path[: match.start()], path[match.end() :]
        return [p for i in range(int(lo), int(hi) + 1) for p in expand_shards(f"{head}{i:0{width}d}{tail}")]
    fsys, inner = cfs.resolve(path)
    info = fsys.get_file_info(inner)
    if info.type == pafs.FileType.Directory:
        found = sorted(
            f.path for f in fsys.get_file_info(pafs.FileSelector(inner)) if f.path.endswith(".tar")
        )
        if not found:
            raise CorpusError(f"no .tar shards in {path}")
        prefix = path.split("://", 1)[0] + "://" if cfs.is_uri(path) else ""
        return [prefix + f for f in found]
    if info.type == pafs.FileType.NotFound:
        raise CorpusError(f"WebDataset shard {path} does not exist")
    return [path]


def read_corpus(
    cfg: DataConfig, done_shards: Callable[[dict[int, int]], set[int]] | None = None
) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """The corpus as a Ray Dataset of rows (see ``ROW_SCHEMA``), one block per input shard.

    ``done_shards(shard_rows)`` names the shards an earlier, interrupted run finished; they
    are left out (``info["todo_shards"]`` counts the rest).
    ``info["shard_rows"]`` maps every shard to its row count (empty for WebDataset, whose
    rows are not numbered before they are read: those runs do not resume).
    Builds the dataset; executes nothing beyond parsing caption metadata on the driver.
    """
    import ray.data

    path = corpus_path(cfg)
    fmt = cfg.format if cfg.format != "auto" else detect_format(path)
    if fmt == "webdataset":
        shards = expand_shards(path)
        fsys = cfs.resolve(shards[0])[0]
        # short I/O tasks: the encoder actors hold all but a sliver of each CPU node
        ds = ray.data.read_webdataset([cfs.resolve(s)[1] for s in shards], filesystem=fsys, decoder=None,
                                      num_cpus=READ_CPUS)
        if cfg.limit is not None:
            ds = ds.limit(cfg.limit)
        ds = ds.map_batches(
            _wds_rows,  # type: ignore[arg-type]
            fn_kwargs={"caption": cfg.caption},
            num_cpus=READ_CPUS,
            batch_format="pyarrow",
        )
        return ds, {"format": fmt, "shard_rows": {}, "todo_shards": len(shards)}
    table, info = read_table(cfg)
    step = cfg.rows_per_block
    shard_rows = {i // step: min(step, table.num_rows - i) for i in range(0, table.num_rows, step)}
    done = done_shards(shard_rows) if done_shards is not None else set()
    todo = [table.slice(s * step, n) for s, n in shard_rows.items() if s not in done]
    info.update(shard_rows=shard_rows, todo_shards=len(todo))
    # a shard (the resume unit) is large; its Ray blocks are not, so decode spreads over tasks
    blocks = [t.slice(i, READ_BLOCK_ROWS) for t in todo for i in range(0, t.num_rows, READ_BLOCK_ROWS)]
    return ray.data.from_arrow(blocks or [table.slice(0, 0)]), info
