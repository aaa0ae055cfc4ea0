"""Paths and URIs in, pyarrow filesystems and atomic writes out (local, s3://, gs://).

Object storage is reached through pyarrow's filesystems, configured the way their
SDKs are: S3 credentials, region and endpoint from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_ENDPOINT_URL`` for MinIO/moto/R2, an instance profile on EC2), GCS from
``GOOGLE_APPLICATION_CREDENTIALS`` or the VM's service account. pyarrow's URI options
(``s3://bucket/key?endpoint_override=...``) work for single files but not for directories
that get joined onto; use the environment for those. Errors from a store name the path.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import posixpath
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

GCS_RETRY_ENV = "CLIPSCAN_GCS_RETRY_S"  # seconds a GCS call retries transient errors before failing
GCS_RETRY_S = 120


def is_uri(path: str) -> bool:
    """True for ``scheme://...`` paths other than ``file://``."""
    return "://" in path and not path.startswith("file://")


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local path or an object-storage URI."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    if not is_uri(path):
        return pafs.LocalFileSystem(), os.path.abspath(path)
    uri = path
    if path.startswith("gs://") and "?" not in path:
        # google-cloud-cpp retries for 15 minutes by default, so a job without GCS
        # credentials would sit silent that long before failing; bound it.
        uri = f"{path}?retry_limit_seconds={int(float(os.environ.get(GCS_RETRY_ENV, GCS_RETRY_S)))}"
    scheme, _, rest = uri.partition("://")
    rest, query_sep, query = rest.partition("?")
    bucket, _, key = rest.partition("/")
    try:
        fs = _store(scheme, bucket, query_sep + query, _store_env())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise ValueError(f"{path}: not a usable filesystem URI ({e})") from e
    return fs, f"{bucket}/{key}".rstrip("/") if key else bucket


def _store_env() -> tuple[tuple[str, str], ...]:
    """The environment a store's configuration comes from: a changed endpoint or key gets a new filesystem."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(("AWS_", "GOOGLE_", "GCS_"))))


@functools.lru_cache(maxsize=64)
def _store(scheme: str, bucket: str, query: str, env: tuple[tuple[str, str], ...]) -> pafs.FileSystem:
    """One filesystem per store and options per process: creating one resolves credentials and
    region, which costs a round trip to the store or the metadata server."""
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}{query}")
    return fs


@contextlib.contextmanager
def named(path: str) -> Iterator[None]:
    """Re-raise an ``OSError`` from a store so that its message starts with ``path``.

    pyarrow's S3/GCS errors name the bucket operation, not the URI the job was given.
    ``FileNotFoundError`` keeps its type so callers can still tell a missing file apart.
    """
    try:
        yield
    except OSError as e:
        if path in str(e):
            raise
        cls = FileNotFoundError if isinstance(e, FileNotFoundError) else OSError
        raise cls(f"{path}: {e}") from e


def join(base: str, *parts: str) -> str:
    """Join path parts with ``/`` for URIs and ``os.path.join`` for local paths."""
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def dirname(path: str) -> str:
    return posixpath.dirname(path) if is_uri(path) else os.path.dirname(os.path.abspath(path))


def exists(path: str) -> bool:
    fs, inner = resolve(path)
    with named(path):
        return fs.get_file_info(inner).type != pafs.FileType.NotFound


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    with named(path):
        fs.create_dir(inner, recursive=True)


def remove_tree(path: str) -> None:
    """Delete a directory (or prefix) and everything under it; nothing if it is missing."""
    fsys, inner = resolve(path)
    try:
        fsys.delete_dir(inner)
    except (FileNotFoundError, OSError):
        pass


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with named(path), fs.open_input_stream(inner) as f:
        return bytes(f.read())


def list_files(path: str, suffix: str = "", recursive: bool = True) -> list[str]:
    """Files under directory ``path`` whose names end with ``suffix``, sorted, as full paths or URIs.

    A ``FileSelector`` gives paths inside the filesystem (``bucket/key`` for S3); these
    are turned back into ``s3://bucket/key`` so that ``resolve`` finds the same store.
    An empty list when ``path`` does not exist.
    """
    fs, inner = resolve(path)
    with named(path):
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
    prefix = path.split("://", 1)[0] + "://" if is_uri(path) else ""
    return sorted(prefix + f.path for f in infos if f.type == pafs.FileType.File and f.path.endswith(suffix))


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it into place.

    Object stores have no rename; a single PUT is already atomic there, so the
    object is written directly.
    """
    fs, inner = resolve(path)
    parent = posixpath.dirname(inner) if is_uri(path) else os.path.dirname(inner)
    if is_uri(path):
        with named(path), fs.open_output_stream(inner) as f:
            f.write(data)  # object stores have no directories to create first
        return
    fs.create_dir(parent, recursive=True)
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


def list_parquet(path: str) -> list[str]:
    """The ``.parquet`` files directly under a directory, sorted by name ([] if it is missing)."""
    fs, inner = resolve(path)
    with named(path):
        if fs.get_file_info(inner).type != pafs.FileType.Directory:
            return []
        return sorted(
            f.path
            for f in fs.get_file_info(pafs.FileSelector(inner, recursive=False))
            if f.type == pafs.FileType.File and f.path.endswith(".parquet")
        )


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file or a directory of part files (sorted by name); ``columns`` only, where given."""
    import pyarrow.parquet as pq

    fs, inner = resolve(path)
    with named(path):
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no Parquet file or directory at {path}")
        if info.type == pafs.FileType.File:
            return pq.read_table(inner, filesystem=fs, columns=columns)
        files = sorted(
            f.path
            for f in fs.get_file_info(pafs.FileSelector(inner, recursive=False))
            if f.type == pafs.FileType.File and f.path.endswith(".parquet")
        )
        if not files:
            raise FileNotFoundError(f"directory {path} holds no .parquet files")
        return pa.concat_tables([pq.read_table(f, filesystem=fs, columns=columns) for f in files])
