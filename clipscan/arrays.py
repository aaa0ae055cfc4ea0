"""Embedding columns: (n, d) float32 arrays in, Arrow FixedSizeList<float32, d> columns out, and back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def embedding_array(x: np.ndarray) -> pa.FixedSizeListArray:
    """(n, d) float32 -> a FixedSizeList<float32, d> column."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A FixedSizeList<float32, d> column -> (n, d) float32."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    d = arr.type.list_size
    return np.asarray(arr.flatten(), dtype=np.float32).reshape(-1, d)
