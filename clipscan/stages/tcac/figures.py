"""TCAC's figures: per transform, the sums behind the summary, the change histogram and the largest changes."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from clipscan.stages.tcac.score import OUTPUT_COLUMNS, ROW_SCHEMA

# The per-transform sums behind ``Figures.summary``, in this order.
SUMS = ("images", "changed", "changed_any", "changed_margin", "changed_margin_any", "own_left_top1",
        "own_left_top", "own_top1_before", "own_top1_after", "kl", "pool_size")


@dataclass(frozen=True)
class Figures:
    """What the summary, attribute and report stages read of ``tcac.parquet``, gathered part by part.

    Per transform: the sums behind ``summary`` (``SUMS``), the change-count histogram
    (0..top) and the ``keep`` rows with the largest change (``largest_changes`` order).
    ``of`` one table, ``add`` two: a corpus's figures never hold more than ``keep`` rows
    per transform.
    """

    transforms: tuple[str, ...]
    top: int
    keep: int
    sums: np.ndarray  # (T, len(SUMS)) float64
    counts: np.ndarray  # (T, top + 1) int64
    largest: pa.Table  # OUTPUT_COLUMNS

    @classmethod
    def empty(cls, transforms: Sequence[str], top: int, keep: int) -> Figures:
        return cls(tuple(transforms), top, keep, np.zeros((len(transforms), len(SUMS))),
                   np.zeros((len(transforms), top + 1), np.int64), ROW_SCHEMA.empty_table().select(OUTPUT_COLUMNS))

    @classmethod
    def of(cls, table: pa.Table, transforms: Sequence[str], top: int, keep: int) -> Figures:
        import pyarrow.compute as pc

        sums = np.zeros((len(transforms), len(SUMS)))
        counts = np.zeros((len(transforms), top + 1), np.int64)
        names = table.column("transform")
        for t, name in enumerate(transforms):
            rows = table.filter(pc.equal(names, name))

            def col(column: str, rows: pa.Table = rows) -> np.ndarray:
                return np.asarray(rows.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)

            changed, margin, rb, ra = (col(c) for c in ("changed", "changed_margin", "own_rank_before",
                                                           "own_rank_after"))
            sums[t] = [rows.num_rows, changed.sum(), (changed > 0).sum(), margin.sum(), (margin > 0).sum(),
                       ((rb == 1) & (ra > 1)).sum(), ((rb <= top) & (ra > top)).sum(), (rb == 1).sum(),
                       (ra == 1).sum(), col("kl").sum(), col("pool_size").sum()]
            counts[t] = np.bincount(np.clip(changed.astype(np.int64), 0, top), minlength=top + 1)
        return cls(tuple(transforms), top, keep, sums, counts, _largest(table, transforms, keep))

    def add(self, other: Figures) -> Figures:
        if (self.transforms, self.top, self.keep) != (other.transforms, other.top, other.keep):
            raise ValueError("figures of different transforms, top or keep do not add up")
        both = pa.concat_tables([self.largest, other.largest])
        return Figures(self.transforms, self.top, self.keep, self.sums + other.sums, self.counts + other.counts,
                       _largest(both, self.transforms, self.keep))

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per transform: images, mean change count, share changed at all (also counting only the
        changes beyond ``tcac.margin``: mean_changed_margin, share_changed_margin), own-caption
        shares, mean KL.

        own_left_top1: share of images whose own caption is ranked 1 before the transform and
        not after; own_left_top{top}: in the top ``top`` before and not after;
        own_top1_before / own_top1_after: share with an own caption ranked 1.
        """
        out: dict[str, dict[str, Any]] = {}
        for name, row in zip(self.transforms, self.sums, strict=True):
            s = dict(zip(SUMS, row, strict=True))
            n = int(s["images"])

            def mean(key: str, digits: int = 4, s: dict[str, float] = s, n: int = n) -> float:
                return round(float(s[key] / n), digits) if n else 0.0

            out[name] = {
                "images": n,
                "mean_changed": mean("changed"),
                "share_changed": mean("changed_any"),
                "mean_changed_margin": mean("changed_margin"),
                "share_changed_margin": mean("changed_margin_any"),
                "own_left_top1": mean("own_left_top1"),
                f"own_left_top{self.top}": mean("own_left_top"),
                "own_top1_before": mean("own_top1_before"),
                "own_top1_after": mean("own_top1_after"),
                "mean_kl": mean("kl", 6),
            }
        return out

    def mean_pool(self) -> float:
        """Mean pool size over the scored images (each image's first transform row)."""
        return float(self.sums[0, -1] / self.sums[0, 0]) if len(self.transforms) and self.sums[0, 0] else 0.0


def _largest(table: pa.Table, transforms: Sequence[str], n: int) -> pa.Table:
    parts = [largest_changes(table, name, n) for name in transforms]
    return pa.concat_tables(parts) if parts else table.slice(0, 0)


def summarise(table: pa.Table, transforms: Sequence[str], top: int) -> dict[str, dict[str, Any]]:
    """``Figures.summary`` of a whole ``tcac.parquet`` table."""
    return Figures.of(table, transforms, top, 0).summary()


def largest_changes(table: pa.Table, transform: str, n: int) -> pa.Table:
    """The ``n`` rows of ``transform`` with the largest change: change count, then KL, descending; then id."""
    import pyarrow.compute as pc

    rows = table.filter(pc.equal(table.column("transform"), transform))
    return rows.sort_by([("changed", "descending"), ("kl", "descending"), ("id", "ascending")]).slice(0, n)


def caption_shifts(table: pa.Table, transforms: Sequence[str], n: int = 100) -> dict[str, list[dict[str, Any]]]:
    """Per transform, the ``n`` images with the largest change and how their captions moved.

    The input of the LLM summary (issue 5, point 6): each entry has ``id``, ``uri``,
    ``caption``, ``own_captions``, ``before`` and ``after`` (top-k captions, best first),
    ``entered`` (in ``after`` only), ``left`` (in ``before`` only), ``changed``,
    ``own_rank_before``, ``own_rank_after`` and ``kl``. Captions are corpus text: fence
    them in prompts.
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for name in transforms:
        cases = []
        for row in largest_changes(table, name, n).to_pylist():
            before, after = row["top_before"], row["top_after"]
            cases.append({
                "id": row["id"], "uri": row["uri"], "caption": row["caption"],
                "own_captions": row["own_captions"], "before": before, "after": after,
                "entered": [c for c in after if c not in before],
                "left": [c for c in before if c not in after],
                "changed": row["changed"], "own_rank_before": row["own_rank_before"],
                "own_rank_after": row["own_rank_after"], "kl": row["kl"],
            })
        out[name] = cases
    return out
