"""Paths and URIs in, pyarrow filesystems and atomic writes out (local, s3://, gs://)."""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local path or an object-storage URI."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    fs, inner = pafs.FileSystem.from_uri(path)
    return fs, inner


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for URIs and ``os.path.join`` for local paths."""
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(os.path.abspath(path))


def exists(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return bytes(f.read())


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it into place.

    Object stores have no rename; a single PUT is already atomic there, so the
    object is written directly.
    """
    fs, inner = resolve(path)
    parent = posixpath.dirname(inner) if is_uri(path) else os.path.dirname(inner)
    fs.create_dir(parent, recursive=True)
    if is_uri(path):
        with fs.open_output_stream(inner) as f:
            f.write(data)
        return
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, inner)


def write_json_atomic(path: str, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def write_parquet_atomic(path: str, table: pa.Table) -> None:
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes_atomic(path, buf.getvalue())


def read_parquet(path: str) -> pa.Table:
    """Read one Parquet file or a directory of part files (sorted by name)."""
    import pyarrow.parquet as pq

    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no Parquet file or directory at {path}")
    if info.type == pafs.FileType.File:
        return pq.read_table(inner, filesystem=fs)
    files = sorted(
        f.path
        for f in fs.get_file_info(pafs.FileSelector(inner, recursive=False))
        if f.type == pafs.FileType.File and f.path.endswith(".parquet")
    )
    if not files:
        raise FileNotFoundError(f"directory {path} holds no .parquet files")
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])
