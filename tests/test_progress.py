"""Progress of a per-row stage: the write tasks count their rows into one counter, so a
progress line is one call whatever the corpus (no listing of the pieces)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest


def test_write_shards_counts_rows_into_the_counter(tmp_path: Path, ray_local: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    import ray.data

    from clipscan import runner
    from clipscan.pipeline import progress
    from clipscan.pipeline.progress import Progress
    from clipscan.stages import rows

    table = pa.table({"shard": [0] * 30 + [1] * 20, "row": list(range(30)) + list(range(20)), "x": list(range(50))})
    ds = ray.data.from_arrow([table.slice(i, 10) for i in range(0, 50, 10)])
    lines: list[str] = []
    seen_counts: list[int] = []

    class Spy(Progress):
        def line(self) -> str:
            seen_counts.append(self.done())
            out = super().line()
            lines.append(out)
            return out

    monkeypatch.setattr(runner, "Progress", Spy)
    assert progress.Progress is Progress
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(rows, "rows_written", _counting(rows.rows_written, calls))
    runner.write_shards(ds, str(tmp_path / "raw"), "embed", 50)
    assert rows.rows_covered(rows.shard_pieces(str(tmp_path / "raw"))["shard-00000"]) == set(range(30))
    assert seen_counts and seen_counts[-1] == 50 and lines[-1].startswith("embed: 50/50 rows (100%)")
    assert len(calls) == 1  # the pieces are listed once, at the start (what an earlier run left), never per line
    assert ray.is_initialized()


def _counting(fn, calls: list):  # type: ignore[no-untyped-def]
    def wrapped(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(a)
        return fn(*a, **kw)

    return wrapped
