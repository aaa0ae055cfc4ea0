"""A run directory's parts in; their names, row counts and global row numbering out.

The per-image outputs of the embedding stage (``corpus/``, ``embeddings/<model>/``,
``skipped/``) are folders of parts with the same names; the corpus's parts, by name, with
each part's rows in order, number the run's rows: the input order every later stage keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipscan import fs as cfs


@dataclass(frozen=True)
class RunParts:
    """Where a run directory's per-image parts are: ``corpus/``, ``embeddings/<model>/`` and
    ``skipped/``, one file of the same name in each per input shard (or join write task)."""

    root: str

    def corpus(self, name: str | None = None) -> str:
        return cfs.join(self.root, "corpus", *([name] if name else []))

    def embeddings(self, model: str, name: str | None = None) -> str:
        return cfs.join(self.root, "embeddings", model, *([name] if name else []))

    def skipped(self, name: str | None = None) -> str:
        return cfs.join(self.root, "skipped", *([name] if name else []))

    def of_part(self, name: str, models: list[str] | tuple[str, ...]) -> list[str]:
        """Every file of one part: each model's embeddings, then the corpus, then the skips."""
        return [self.embeddings(m, name) for m in models] + [self.corpus(name), self.skipped(name)]

    def folders(self) -> list[str]:
        return [cfs.join(self.root, d) for d in ("embeddings", "corpus", "skipped")]


@dataclass(frozen=True)
class Layout:
    """The run's parts: their names (sorted) and row counts, read from the Parquet footers."""

    run_dir: str
    names: tuple[str, ...]
    rows: tuple[int, ...]

    @classmethod
    def of(cls, run_dir: str) -> Layout:
        import pyarrow.parquet as pq

        parts = RunParts(run_dir)
        names = tuple(p.rsplit("/", 1)[-1] for p in cfs.list_parquet(parts.corpus()))
        if not names:
            raise FileNotFoundError(f"no corpus parts under {parts.corpus()}: the embedding stage wrote none")
        rows = []
        for name in names:
            fsys, inner = cfs.resolve(parts.corpus(name))
            with fsys.open_input_file(inner) as f:
                rows.append(pq.ParquetFile(f).metadata.num_rows)
        return cls(run_dir, names, tuple(rows))

    @property
    def total(self) -> int:
        return sum(self.rows)

    def offsets(self) -> np.ndarray:
        """(parts + 1,) int64: the first global row of each part, then the total."""
        return np.concatenate([[0], np.cumsum(self.rows, dtype=np.int64)])
