"""Precomputed embedding files in, a Ray Dataset of ``id``, ``embedding`` (L2-normalised float32), caption columns out.

Three layouts, each a list of ``FilePair`` (a vector file and the metadata aligned with it
row by row), one Ray read task per pair, each yielding blocks of at most ``rows`` rows:

- clip-retrieval's output (``emb:PATH``): ``PATH/img_emb/img_emb_N.npy`` (fp16 or fp32,
  ``(n, d)``) with ``PATH/metadata/metadata_N.parquet``; the id is ``image_path`` (then
  also the row's ``uri``), or ``key`` for WebDataset input; ``caption`` and ``url`` when
  present.
- a Parquet dataset (``emb:PATH``, a file or a folder of them) with ``id`` and ``embedding``
  (a list of floats) and optionally ``caption``, ``url``, ``uri``.
- the embed stage's own parts in a run directory: ``embeddings/<model>/part-N.parquet``
  with ``corpus/part-N.parquet``.

Vectors are read in row ranges (the ``.npy`` header gives the offset), never whole files,
so a read task holds one block. Rows are L2-normalised on the way in; ``renormalised``
says a row's norm was not 1 (within 1e-2) and ``skip_reason`` names a row that cannot be
used (a zero or non-finite vector, no id).
"""

from __future__ import annotations

import functools
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipscan import fs as cfs

if TYPE_CHECKING:
    import ray.data

VECTOR_SCHEMA_NAMES = ("id", "embedding", "caption", "uri", "url", "renormalised", "skip_reason")
NORM_TOLERANCE = 1e-2  # a row whose norm is further than this from 1 was not normalised (fp16 rounding is ~1e-3)
UNIT_TOLERANCE = 1e-6  # rows this close to unit norm keep their bits (the embed stage's own parts read back as written)
_NPY = re.compile(r"img_emb_(\d+)\.npy$")
_META = re.compile(r"metadata_(\d+)\.parquet$")


class EmbeddingsError(ValueError):
    """Precomputed embeddings that cannot be read; the message names the path."""


@dataclass(frozen=True)
class FilePair:
    """One read task's input: a vector file (``.npy`` or ``.parquet``) and its row-aligned metadata."""

    vectors: str
    metadata: str | None = None  # None: the vector file carries its own id and caption columns


def embedding_pairs(path: str) -> list[FilePair]:
    """The file pairs of an ``emb:PATH``: clip-retrieval layout if ``PATH/img_emb`` exists, else Parquet."""
    import pyarrow.fs as pafs

    fsys, inner = cfs.resolve(path)
    with cfs.named(path):
        kind = fsys.get_file_info(inner).type
    if kind == pafs.FileType.NotFound:
        raise EmbeddingsError(f"emb:{path}: no such file or folder")
    if kind == pafs.FileType.File:
        return [FilePair(path)]
    if cfs.exists(cfs.join(path, "img_emb")):
        return clip_retrieval_pairs(path)
    files = cfs.list_files(path, ".parquet")
    if not files:
        raise EmbeddingsError(f"emb:{path}: no img_emb/ folder (clip-retrieval layout) and no .parquet files")
    return [FilePair(f) for f in files]


def clip_retrieval_pairs(path: str) -> list[FilePair]:
    """``img_emb/img_emb_N.npy`` matched with ``metadata/metadata_N.parquet`` by N; a missing partner raises."""
    vectors = {int(m.group(1)): f for f in cfs.list_files(cfs.join(path, "img_emb"), ".npy", recursive=False)
               if (m := _NPY.search(f))}
    metadata = {int(m.group(1)): f for f in cfs.list_files(cfs.join(path, "metadata"), ".parquet", recursive=False)
                if (m := _META.search(f))}
    if not vectors:
        raise EmbeddingsError(f"emb:{path}: img_emb/ holds no img_emb_N.npy files")
    unmatched = sorted(set(vectors) ^ set(metadata))
    if unmatched:
        n = unmatched[0]
        have, lack = ("img_emb", "metadata") if n in vectors else ("metadata", "img_emb")
        raise EmbeddingsError(f"emb:{path}: {have}/ has part {n} but {lack}/ does not "
                              f"({len(unmatched)} unmatched parts: {unmatched[:5]})")
    return [FilePair(vectors[n], metadata[n]) for n in sorted(vectors)]


def run_pairs(run_dir: str, model: str) -> list[FilePair]:
    """The embed stage's parts of ``model`` in a run directory, each with its corpus part."""
    from clipscan.pipeline.parts import RunParts

    parts = RunParts(run_dir)
    files = cfs.list_files(parts.embeddings(model), ".parquet", recursive=False)
    if not files:
        raise EmbeddingsError(f"{cfs.join(run_dir, 'embeddings', model)}: no embedding parts (did the embed stage run?)")
    return [FilePair(f, parts.corpus(posixpath.basename(f))) for f in files]


def vector_bytes(pairs: list[FilePair]) -> int:
    """Total size of the pairs' vector files in bytes (one listing call per store), to size a shuffle."""
    if not pairs:
        return 0
    fsys, _ = cfs.resolve(pairs[0].vectors)
    with cfs.named(pairs[0].vectors):
        infos = fsys.get_file_info([cfs.resolve(p.vectors)[1] for p in pairs])
    return sum(int(i.size or 0) for i in infos)


def read_pair(pair: FilePair, rows: int) -> Iterator[pa.Table]:
    """Tables of at most ``rows`` rows (``VECTOR_SCHEMA_NAMES``, embedding FixedSizeList<float32, d>)."""
    try:
        if pair.vectors.endswith(".npy"):
            assert pair.metadata is not None
            yield from _read_npy_pair(pair.vectors, pair.metadata, rows)
        else:
            yield from _read_parquet_pair(pair.vectors, pair.metadata, rows)
    except (OSError, ValueError, KeyError, pa.ArrowException) as e:
        if isinstance(e, EmbeddingsError):
            raise
        raise EmbeddingsError(f"{pair.vectors}: cannot read embeddings: {type(e).__name__}: {e}") from e


def _open(path: str) -> Any:
    fsys, inner = cfs.resolve(path)
    with cfs.named(path):
        return fsys.open_input_file(inner)


def _npy_header(f: Any, path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    fmt = np.lib.format
    version = fmt.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(f)
    else:
        shape, fortran, dtype = fmt._read_array_header(f, version)  # type: ignore[attr-defined]
    if fortran or len(shape) != 2 or dtype.kind != "f":
        raise EmbeddingsError(f"{path}: expected a C-order (n, d) float array, got shape {shape} "
                              f"dtype {dtype}{' (Fortran order)' if fortran else ''}")
    return shape, dtype, int(f.tell())


def _meta_batches(path: str, rows: int, columns: tuple[str, ...]) -> tuple[int, Iterator[pa.Table], list[str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(_open(path))
    present = [c for c in columns if c in pf.schema_arrow.names]
    return pf.metadata.num_rows, _rechunk(pf.iter_batches(batch_size=rows, columns=present), rows), present


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one fewer), whatever the files' row groups are,
    so that two files with the same row count are cut at the same rows."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        while held >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, held = rest.to_batches(), rest.num_rows
    if held:
        yield pa.Table.from_batches(pending)


def _read_npy_pair(npy: str, meta: str, rows: int) -> Iterator[pa.Table]:
    f = _open(npy)
    (n, d), dtype, offset = _npy_header(f, npy)
    total, batches, present = _meta_batches(meta, rows, ("image_path", "key", "id", "caption", "url"))
    if total != n:
        raise EmbeddingsError(f"{meta} has {total} rows but {npy} has {n}: they must be aligned row by row")
    id_column = next((c for c in ("image_path", "key", "id") if c in present), None)
    if id_column is None:
        raise EmbeddingsError(f"{meta}: no id column (image_path, key or id); columns: {present}")
    start = 0
    row_bytes = d * dtype.itemsize
    for table in batches:
        m = table.num_rows
        f.seek(offset + start * row_bytes)
        data = f.read(m * row_bytes)
        x = np.frombuffer(data, dtype=dtype).reshape(m, d)
        ids = table.column(id_column)
        uri = ids if id_column == "image_path" else None
        yield _block(x, ids, table, uri, f"{npy}#{start}")
        start += m


def _read_parquet_pair(vectors: str, meta: str | None, rows: int) -> Iterator[pa.Table]:
    total, batches, present = _meta_batches(vectors, rows, ("id", "embedding", "caption", "url", "uri"))
    for needed in ("id", "embedding"):
        if needed not in present:
            raise EmbeddingsError(f"{vectors}: no {needed!r} column; columns: {present}")
    metas: Iterator[pa.Table] | None = None
    if meta is not None:
        meta_total, metas, _ = _meta_batches(meta, rows, ("id", "uri", "caption", "url"))
        if meta_total != total:
            raise EmbeddingsError(f"{meta} has {meta_total} rows but {vectors} has {total}")
    start = 0
    for table in batches:
        side = table
        if metas is not None:
            side = _take_rows(metas, table.num_rows, meta or "")
        yield _block(_matrix(table.column("embedding"), vectors), table.column("id"), side,
                     side.column("uri") if "uri" in side.column_names else None, f"{vectors}#{start}")
        start += table.num_rows


def _take_rows(batches: Iterator[pa.Table], n: int, path: str) -> pa.Table:
    """The next n metadata rows (both files are cut at the same rows by ``_rechunk``)."""
    table = next(batches, None)
    if table is None or table.num_rows != n:
        raise EmbeddingsError(f"{path}: not aligned with its vector file (batch of {table and table.num_rows} rows, "
                              f"expected {n})")
    return table


def _matrix(column: pa.ChunkedArray, path: str) -> np.ndarray:
    arr = column.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
    elif pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = np.unique(np.asarray(arr.value_lengths().fill_null(0)))
        if len(lengths) != 1:
            raise EmbeddingsError(f"{path}: embeddings of different lengths {lengths[:5].tolist()}")
        d = int(lengths[0])
    else:
        raise EmbeddingsError(f"{path}: column 'embedding' is {arr.type}, not a list of floats")
    if arr.null_count:
        raise EmbeddingsError(f"{path}: {arr.null_count} null embeddings")
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False)).reshape(len(arr), d)


def _strings(table: pa.Table, name: str) -> pa.Array:
    if name not in table.column_names:
        return pa.array([""] * table.num_rows, pa.string())
    return table.column(name).cast(pa.string()).combine_chunks().fill_null("")


def _block(x: np.ndarray, ids: pa.ChunkedArray, meta: pa.Table, uri: pa.ChunkedArray | None, where: str) -> pa.Table:
    """One output block: vectors normalised, bad rows named in ``skip_reason``."""
    from clipscan.arrays import embedding_array

    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1)
    bad = ~np.isfinite(norm) | (norm < 1e-12)
    renormalised = ~bad & (np.abs(norm - 1.0) > NORM_TOLERANCE)
    scale = np.where(bad | (np.abs(norm - 1.0) <= UNIT_TOLERANCE), 1.0, norm).astype(np.float32)
    x = np.where(bad[:, None], np.float32(0.0), x / scale[:, None]).astype(np.float32)
    id_arr = ids.cast(pa.string()).combine_chunks()
    reasons = np.where(bad, "zero or non-finite embedding", "").astype(object)
    if id_arr.null_count:
        missing = np.asarray(id_arr.is_null())
        reasons[missing] = "no id in the metadata"
        id_list = id_arr.to_pylist()
        id_arr = pa.array([v if v is not None else f"{where}+{i}" for i, v in enumerate(id_list)], pa.string())
    return pa.table({
        "id": id_arr,
        "embedding": embedding_array(x),
        "caption": _strings(meta, "caption"),
        "uri": uri.cast(pa.string()).combine_chunks().fill_null("") if uri is not None else _strings(meta, "uri"),
        "url": _strings(meta, "url"),
        "renormalised": pa.array(renormalised, pa.bool_()),
        "skip_reason": pa.array(reasons.tolist(), pa.string()),
    })


def read_vectors(pairs: list[FilePair], rows: int) -> ray.data.Dataset:
    """A Ray Dataset over the pairs: one read task per pair, blocks of at most ``rows`` rows. Builds only."""
    import ray.data

    return ray.data.read_datasource(_datasource(pairs, rows), override_num_blocks=len(pairs))


def _datasource(pairs: list[FilePair], rows: int) -> Any:
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PrecomputedEmbeddings(Datasource):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:
            return [
                ReadTask(functools.partial(read_pair, p, rows),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None,
                                       input_files=(p.vectors, *([p.metadata] if p.metadata else []))))
                for p in pairs
            ]

        def get_name(self) -> str:
            return "PrecomputedEmbeddings"

    return PrecomputedEmbeddings()
