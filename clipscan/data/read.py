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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from clipscan import fs as cfs

if TYPE_CHECKING:

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
    skip: str = ""  # a reason the reader already knows (recorded at stage "read")


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
        RawRow(id=image, uri=cfs.join(image_dir, image), captions=by_image[image])
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
        images = coco_images_dir(path, str(entries[0]["file_name"]) if entries else "")
    caps: dict[Any, list[str]] = {}
    for ann in annotations:
        text = ann.get("caption")
        if isinstance(text, str) and text.strip():
            caps.setdefault(ann.get("image_id"), []).append(text.strip())
    rows = [
        RawRow(id=str(e["id"]), uri=cfs.join(images, e["file_name"]), captions=caps.pop(e["id"], []))
        for e in entries
    ]
    # what is left names images the file does not list: one skipped row per such image id
    for image_id, texts in caps.items():
        rows.append(RawRow(id=str(image_id), uri="", captions=texts,
                           skip=f"{len(texts)} caption annotation(s) for image_id {image_id}, which is not in 'images'"))
    return rows, {"caption_lines_utf8_repaired": bad, "annotations_without_image": sum(len(t) for t in caps.values())}


def coco_images_dir(path: str, first_file: str = "") -> str:
    """The image folder of a COCO captions file: the split's folder beside it or beside its folder.

    COCO ships ``annotations/captions_val2017.json`` with ``val2017/`` next to
    ``annotations/``; a flat copy has ``val2017/`` next to the JSON file.
    """
    split = posixpath.basename(path).rsplit(".", 1)[0].split("_")[-1]
    here = cfs.dirname(path)
    for base in (here, cfs.dirname(here)):
        for name in (split, "images"):
            cand = cfs.join(base, name)
            fsys, inner = cfs.resolve(cand)
            if fsys.get_file_info(inner).type == pafs.FileType.Directory:
                return cand
    if first_file and cfs.exists(cfs.join(here, first_file)):
        return here  # file names that carry their folder
    raise CorpusError(
        f"{path}: no image folder {split!r} or 'images' beside it or beside {here}; set data.images"
    )


def read_manifest_table(path: str) -> tuple[pa.Table, int]:
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


def manifest_file(path: str) -> str:
    """The manifest file at ``path``: the file itself, or a folder's ``manifest.parquet`` (or ``.jsonl``, ``.csv``)."""
    fsys, inner = cfs.resolve(path)
    try:
        is_dir = fsys.get_file_info(inner).type == pafs.FileType.Directory
    except OSError as e:
        raise CorpusError(f"cannot read manifest {path}: {e}") from e
    if is_dir:
        for name in MANIFEST_NAMES:
            if cfs.exists(cfs.join(path, name)):
                return cfs.join(path, name)
    return path


def read_manifest(path: str, images: str | None = None) -> tuple[list[RawRow], dict[str, int]]:
    """A manifest: ``image`` (path or URI, relative to the manifest), ``caption`` (string or list), optional ``id``."""
    path = manifest_file(path)
    table, bad = read_manifest_table(path)
    return manifest_rows(table, bad, path, images)


def manifest_rows(table: pa.Table, bad: int, path: str, images: str | None) -> tuple[list[RawRow], dict[str, int]]:
    """The manifest ``table`` read from ``path`` (``bad``: its lines already repaired) as rows."""
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
        captions = [raw] if isinstance(raw, str | bytes) else list(raw or [])
        clean = []
        for c in captions:
            if isinstance(c, bytes):
                c, n = _decode_text(c, path)
                bad += n
            if c is not None and str(c).strip():
                clean.append(str(c).strip())
        row_id = str(ids[i]) if ids is not None and ids[i] is not None else (posixpath.normpath(image) if image else "")
        rows.append(RawRow(id=row_id, uri=uri, captions=clean))
    return rows, {"caption_lines_utf8_repaired": bad}


READERS = {"flickr8k": read_flickr8k, "coco": read_coco, "manifest": read_manifest}

# str.strip()'s characters, for Arrow's trim: the same captions come out of both paths
PY_WHITESPACE = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
_NEEDS_NORMPATH = r"(^|/)\.\.?(/|$)|//|/$"  # an image path that posixpath.normpath would change


def arrow_manifest(schema: pa.Schema) -> bool:
    """Whether ``manifest_table`` takes a manifest of this schema: ``image`` strings, ``caption``
    strings or lists of strings, ``id`` (if any) strings or integers."""
    strings = (pa.string(), pa.large_string())
    names = schema.names
    if "image" not in names or schema.field("image").type not in strings:
        return False
    if "caption" in names:
        kind = schema.field("caption").type
        lists = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        if kind not in strings and not (lists and kind.value_type in strings):
            return False
    return "id" not in names or schema.field("id").type in strings or pa.types.is_integer(schema.field("id").type)


def manifest_ids(table: pa.Table) -> tuple[pa.Array, pa.Array]:
    """(ids, image paths) of an ``arrow_manifest`` table: the ``id`` column, else the image path
    normalised (``posixpath.normpath``, only where it changes it); a null image is ""."""
    import pyarrow.compute as pc

    image = pc.fill_null(table.column("image").combine_chunks().cast(pa.string()), "")
    fixed = pc.match_substring_regex(image, _NEEDS_NORMPATH)
    normed = image
    if pc.any(fixed).as_py():
        at = np.flatnonzero(fixed.to_numpy(zero_copy_only=False))
        values = image.to_numpy(zero_copy_only=False, writable=True)  # through Python only where a path needs it
        values[at] = [posixpath.normpath(v) for v in values[at]]
        normed = pa.array(values, pa.string())
    if "id" not in table.column_names:
        return normed, image
    given = table.column("id").combine_chunks().cast(pa.string())
    return pc.if_else(pc.is_null(given), normed, given), image


def manifest_captions(column: pa.ChunkedArray, how: str) -> tuple[pa.Array, pa.Array, np.ndarray]:
    """(captions, caption, has) of a manifest's ``caption`` column of strings or lists of strings:
    each row's captions trimmed (``str.strip``), the empty ones and nulls dropped; the one
    ``select_caption`` picks ("" where none is left); whether any is left."""
    import pyarrow.compute as pc

    col = column.combine_chunks()
    n = len(col)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        values, parents = pc.list_flatten(col), pc.list_parent_indices(col).to_numpy()
    else:
        values, parents = col, np.arange(n)
    text = pc.utf8_trim(pc.fill_null(values.cast(pa.string()), ""), characters=PY_WHITESPACE)
    keep = pc.greater(pc.utf8_length(text), 0)
    text, parents = text.filter(keep), parents[keep.to_numpy(zero_copy_only=False)]
    counts = np.bincount(parents, minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    has = counts > 0
    starts = offsets[:-1][has]
    if how == "first" or len(text) == len(starts):  # one caption a row: nothing to choose
        pick = starts
    else:  # the longest, ties to the first: the smallest index that reaches its row's longest
        length = pc.utf8_length(text).to_numpy(zero_copy_only=False)
        longest = np.repeat(np.maximum.reduceat(length, starts), counts[has])
        pick = np.minimum.reduceat(np.where(length == longest, np.arange(len(text)), len(text)), starts)
    index = np.zeros(n, dtype=np.int64)
    index[has] = pick
    chosen = pc.fill_null(text.take(pa.array(index, mask=~has)), "")  # in Arrow: no Python string per row
    return pa.ListArray.from_arrays(pa.array(offsets), text), chosen, has


def manifest_table(table: pa.Table, bad: int, base: str, rows_per_block: int | None,
                   limit: int | None, first_row: int = 0,
                   caption: str = "longest") -> tuple[pa.Table, dict[str, int]] | None:
    """``rows_to_table(manifest_rows(...))`` computed column by column in Arrow, for an
    ``arrow_manifest`` ``table`` (captions strings or lists of strings, ``caption`` picks one
    as ``select_caption`` does). ``base``: the folder relative image paths are under. None for
    any other manifest (caption bytes), which takes the row path. ``first_row``: the manifest
    row ``table`` starts at (a slice of a larger manifest), which duplicate-id reasons count from.
    """
    import pyarrow.compute as pc

    if not arrow_manifest(table.schema):
        return None
    if limit is not None:
        table = table.slice(0, limit)
    n = table.num_rows
    ids, image = manifest_ids(table)
    prefix = base if base.endswith("/") else base + "/"
    # cfs.is_uri, or a local absolute path, over the column
    absolute = pc.or_(pc.and_(pc.match_substring(image, "://"), pc.invert(pc.starts_with(image, "file://"))),
                      pc.starts_with(image, "/"))
    uri = pc.if_else(absolute, image, pc.binary_join_element_wise(prefix, image, ""))
    given = table.column("caption") if "caption" in table.column_names else pa.chunked_array([pa.nulls(n, pa.string())])
    captions, text, has = manifest_captions(given, caption)
    # the first row of each id: a stable sort by id puts it first in its run
    order = pc.sort_indices(ids).to_numpy()
    by_id = ids.take(pa.array(order))
    starts = np.ones(n, dtype=bool)
    if n > 1:
        starts[1:] = pc.not_equal(by_id.slice(1), by_id.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    first = np.empty(n, dtype=np.int64)
    first[order] = order[np.flatnonzero(starts)[np.cumsum(starts) - 1]]
    repeated = first != np.arange(n)
    no_caption = ~has
    reason = pc.if_else(pa.array(repeated), pc.binary_join_element_wise(
        "duplicate id (first seen at row ", pa.array(first + first_row).cast(pa.string()), ")", ""),
        pc.if_else(pa.array(no_caption), "no caption", ""))
    row_no = np.arange(first_row, first_row + n, dtype=np.int64)
    cols = {
        "id": ids, "uri": uri, "captions": captions, "caption": text,
        "skip_stage": pa.array(np.where(repeated | no_caption, "read", ""), pa.string()),
        "skip_reason": reason, "notes": pa.repeat(pa.scalar("", pa.string()), n),
        "shard": pa.array(row_no // rows_per_block if rows_per_block else np.full(n, -1), pa.int32()),
        "row": pa.array(row_no % rows_per_block if rows_per_block else np.full(n, -1), pa.int32()),
    }
    return pa.table(cols, schema=ROW_SCHEMA), {"caption_lines_utf8_repaired": bad}


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
        if row.skip:
            stage, reason = "read", row.skip
        elif row.id in first_seen:
            stage, reason = "read", f"duplicate id (first seen at row {first_seen[row.id]})"
        elif not row.captions:
            stage, reason = "read", "no caption"
        if not row.skip:
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
        raise CorpusError(f"format {fmt!r} is not read into a table; use clipscan.data.corpus.read_corpus")
    if fmt == "manifest":
        path = manifest_file(path)
        table, bad = read_manifest_table(path)
        fast = manifest_table(table, bad, cfg.images or cfs.dirname(path), cfg.rows_per_block, cfg.limit,
                              caption=cfg.caption)
        if fast is not None:
            return fast[0], {"format": fmt, **fast[1]}
        rows, counts = manifest_rows(table, bad, path, cfg.images)
    else:
        rows, counts = READERS[fmt](path, cfg.images)
    if cfg.limit is not None:
        rows = rows[: cfg.limit]
    return rows_to_table(rows, cfg.caption, cfg.rows_per_block), {"format": fmt, **counts}


WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
WDS_SCHEMA = ROW_SCHEMA.append(pa.field("image_bytes", pa.binary()))
OVERSIZE = " oversize"  # not an extension: marks a sample with a member too large to read


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def wds_sample_row(key: str, members: dict[str, bytes], shard_uri: str) -> tuple[RawRow, bytes | None]:
    """One WebDataset sample (``{ext: bytes}``) -> its row and image bytes.

    The uri ``shard.tar#member`` names the image member, so the report reads it back
    (``clipscan.stages.decode.read_image_bytes``). Captions come from ``txt`` and from
    ``json`` (``caption`` or ``captions``), each text once.
    """
    if OVERSIZE in members:
        return RawRow(key, f"{shard_uri}#{key}", [], skip=members[OVERSIZE].decode()), None
    ext = next((e for e in WDS_IMAGE_EXTS if e in members), None)
    captions: list[str] = []
    if "txt" in members:
        captions.append(members["txt"].decode("utf-8", errors="replace").strip())
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (ValueError, UnicodeDecodeError):
            meta = None
        if isinstance(meta, dict):
            extra = meta.get("captions") or meta.get("caption") or []
            captions.extend([extra] if isinstance(extra, str) else [str(c) for c in extra if c is not None])
    captions = _unique(c.strip() for c in captions if c and c.strip())
    if ext is None:
        row = RawRow(key, f"{shard_uri}#{key}", captions,
                     skip=f"no image in the sample (members: {', '.join(sorted(members)) or 'none'})")
        return row, None
    return RawRow(key, f"{shard_uri}#{key}.{ext}", captions), members[ext]


def _wds_samples(shard_uri: str, max_member_bytes: int | None = None) -> Iterable[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` of each sample of a tar, in member order (WebDataset: ``dir/key.ext``)."""
    import tarfile

    fsys, inner = cfs.resolve(shard_uri)
    with fsys.open_input_stream(inner) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        key: str | None = None
        members: dict[str, bytes] = {}
        for member in tar:
            if not member.isfile():
                continue
            folder, _, base = member.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot or base.startswith("."):
                continue  # not a sample member (no extension): WebDataset ignores these too
            this = f"{folder}/{stem}" if folder else stem
            if this != key or ext.lower() in members:
                if key is not None:
                    yield key, members
                key, members = this, {}
            if max_member_bytes is not None and member.size > max_member_bytes:  # not read: the stream skips it
                members[OVERSIZE] = (f"member {member.name} is {member.size / 2**20:.0f} MiB, more than the decoder's "
                                     f"{max_member_bytes / 2**20:.0f} MiB (data.decode_memory_mb)").encode()
                continue
            handle = tar.extractfile(member)
            members[ext.lower()] = handle.read() if handle is not None else b""
        if key is not None:
            yield key, members


def read_wds_shards(batch: dict[str, Any], caption: str, records: str | None,
                    rows_per_block: int, max_member_bytes: int | None = None) -> Iterable[pa.Table]:
    """WebDataset shards (``shard``, ``uri``, ``size``, ``mtime`` per row) -> ``WDS_SCHEMA`` rows.

    A sample is numbered by its shard and its place in the tar, before decoding, so a
    retried task rewrites the same rows. A tar that cannot be read or breaks part-way ends
    its shard with one skipped row that names the shard and the error. With ``records``,
    each finished shard's row count and source (size, mtime) go to
    ``records/shard-NNNNN.json`` (see ``recorded_shard_rows``).
    """
    for shard, uri, size, mtime in zip(batch["shard"], batch["uri"], batch["size"], batch["mtime"], strict=True):
        shard, n = int(shard), 0
        rows: list[RawRow] = []
        blobs: list[bytes | None] = []

        def block(rows: list[RawRow], blobs: list[bytes | None], first: int, shard: int = shard) -> pa.Table:
            table = rows_to_table(rows, caption)
            n_rows = len(rows)
            table = table.set_column(table.schema.get_field_index("shard"), "shard",
                                     pa.array([shard] * n_rows, pa.int32()))
            table = table.set_column(table.schema.get_field_index("row"), "row",
                                     pa.array(range(first, first + n_rows), pa.int32()))
            return table.append_column("image_bytes", pa.array(blobs, pa.binary()))

        try:
            for key, members in _wds_samples(str(uri), max_member_bytes):
                row, data = wds_sample_row(key, members, str(uri))
                rows.append(row)
                blobs.append(data)
                if len(rows) == rows_per_block:
                    yield block(rows, blobs, n)
                    n += len(rows)
                    rows, blobs = [], []
        except Exception as e:  # a broken shard is one skipped row; the other shards go on
            rows.append(RawRow(f"{uri}#{n + len(rows)}", str(uri), [],
                               skip=f"cannot read WebDataset shard {uri} after {n + len(rows)} samples: "
                                    f"{type(e).__name__}: {e}"))
            blobs.append(None)
        if rows:
            yield block(rows, blobs, n)
            n += len(rows)
        if records is not None:
            cfs.write_json_atomic(cfs.join(records, f"shard-{shard:05d}.json"),
                                  {"source": str(uri), "size": int(size), "mtime": int(mtime), "rows": n})


def shard_sources(shards: list[str]) -> list[dict[str, Any]]:
    """Size and modification time of every shard file (one stat each, on the driver): what resume compares."""
    out = []
    for i, uri in enumerate(shards):
        fsys, inner = cfs.resolve(uri)
        info = fsys.get_file_info(inner)
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        out.append({"shard": i, "uri": uri, "size": int(info.size or 0), "mtime": int(mtime)})
    return out


def recorded_shard_rows(records: str, sources: list[dict[str, Any]]) -> tuple[dict[int, int], set[int]]:
    """Row counts of the shards whose record matches the shard file now, and the shards whose file changed.

    A record whose shard file has another size or modification time is removed: that
    shard is read again.
    """
    rows: dict[int, int] = {}
    changed: set[int] = set()
    for src in sources:
        path = cfs.join(records, f"shard-{src['shard']:05d}.json")
        if not cfs.exists(path):
            continue
        try:
            rec = json.loads(cfs.read_bytes(path))
        except (ValueError, OSError):
            rec = {}
        if all(rec.get(k) == src[k] for k in ("size", "mtime")) and rec.get("source") == src["uri"]:
            rows[src["shard"]] = int(rec["rows"])
        else:
            changed.add(src["shard"])
            fsys, inner = cfs.resolve(path)
            fsys.delete_file(inner)
    return rows, changed


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


def shard_digest(rows: pa.Table) -> str:
    """A digest of one shard's input: its rows (id, uri, captions, skip reason) and each image file's size and mtime.

    Runs where the files are (a Ray task per group of shards): one stat per image.
    """
    import hashlib
    import os

    h = hashlib.blake2b(digest_size=16)
    cols = rows.select(["id", "uri", "captions", "skip_reason"]).to_pydict()
    uris = cols["uri"]
    stats: list[tuple[int, int]] = []
    remote = [u for u in uris if u and cfs.is_uri(u)]
    found: dict[str, tuple[int, int]] = {}
    if remote:
        fsys = cfs.resolve(remote[0])[0]
        for uri, finfo in zip(remote, fsys.get_file_info([cfs.resolve(u)[1] for u in remote]), strict=True):
            found[uri] = (int(finfo.size or -1), int(finfo.mtime_ns or 0))
    for uri in uris:
        if uri in found:
            stats.append(found[uri])
            continue
        try:
            st = os.stat(uri) if uri else None
            stats.append((st.st_size, st.st_mtime_ns) if st is not None else (-1, 0))
        except OSError:
            stats.append((-1, 0))
    h.update(json.dumps([cols["id"], uris, cols["captions"], cols["skip_reason"], stats]).encode())
    return h.hexdigest()


def _digest_group(pieces: list[tuple[int, pa.Table]]) -> list[tuple[int, str]]:
    return [(shard, shard_digest(rows)) for shard, rows in pieces]


def table_digests(table: pa.Table, step: int, group: int = 64) -> dict[int, str]:
    """``shard_digest`` of every shard of the row table, computed in Ray tasks of ``group`` shards each.

    Up to ``group`` shards are hashed in this process: a first task would wait about a
    second and a half for a worker to start, longer than hashing them here.
    """
    import ray

    starts = list(range(0, table.num_rows, step))
    if len(starts) <= group:
        return dict(_digest_group([(i // step, table.slice(i, step)) for i in starts]))
    task = ray.remote(num_cpus=0.25)(_digest_group)
    refs = [task.remote([(i // step, table.slice(i, step)) for i in starts[g : g + group]])
            for g in range(0, len(starts), group)]
    return {shard: digest for ref in refs for shard, digest in ray.get(ref)}


def changed_table_shards(records: str, table: pa.Table, step: int) -> set[int]:
    """Shards whose input differs from what ``records/table.json`` says an earlier run read; records the new digests.

    An edited manifest (a caption, a path) or a replaced image file (another size or
    modification time) changes its shard's digest.
    """
    return record_digests(records, table_digests(table, step), step)


def record_digests(records: str, now: dict[int, str], step: int) -> set[int]:
    """The shards whose digest in ``now`` differs from ``records/table.json``'s; writes ``now`` there."""
    path = cfs.join(records, "table.json")
    before: dict[str, str] = {}
    if cfs.exists(path):
        try:
            before = dict(json.loads(cfs.read_bytes(path)).get("shards", {}))
        except (ValueError, OSError, AttributeError):
            before = {}
    changed = {s for s, d in now.items() if str(s) in before and before[str(s)] != d}
    cfs.write_json_atomic(path, {"rows_per_block": step, "shards": {str(s): d for s, d in sorted(now.items())}})
    return changed
