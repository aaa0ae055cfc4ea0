"""The one check every stage makes of its input: the columns it needs are there."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa


class MissingColumns(ValueError):
    """A stage's input lacks columns it needs; the message names the stage, the missing
    columns and the columns present."""


def require(batch: pa.Table | pa.RecordBatch | Mapping[str, Any] | Iterable[str], needs: Iterable[str],
            stage: str) -> None:
    """Raise ``MissingColumns`` unless ``batch`` (a table, a record batch, a batch mapping or
    column names) has every column of ``needs``."""
    present = list(batch.schema.names) if isinstance(batch, (pa.Table, pa.RecordBatch)) else list(batch)
    missing = [c for c in needs if c not in present]
    if missing:
        raise MissingColumns(f"stage {stage!r} needs columns {missing}; it has {sorted(present)}")
