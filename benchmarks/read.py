"""Listing a manifest corpus on the driver: the Arrow path against the row path, side by side.

A manifest (Parquet, CSV, JSONL) is turned into the row table on the driver before the
pipeline starts (see the README's Limits). Manifests whose ``image`` and ``caption`` columns
are strings go column by column through Arrow (``read.manifest_table``); caption lists and
bytes take a Python row each (``read.manifest_rows``), with the same result. For each size
a Parquet manifest of image paths and captions is written once, then each path reads it in
a fresh process, which prints its wall time and its peak RSS (VmHWM) beside the RSS it had
before the read. Printed: both, the ratios row path / Arrow path, and the Arrow path's
bytes per row between the two sizes (what 10^8 rows would need on the driver).

    python benchmarks/read.py                           # 200,000 and 2,000,000 rows
    python benchmarks/read.py --sizes 20000,200000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import vm_status  # noqa: E402


def write_manifest(path: Path, n: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = np.arange(n).astype(str).astype(object)
    pq.write_table(pa.table({
        "image": pa.array(np.char.add(np.char.add("images/", np.char.zfill(i.astype(str), 9)), ".jpg"), pa.string()),
        "caption": pa.array(np.char.add("a photo of thing number ", i.astype(str)), pa.string()),
    }), path)


def _child(path: str, how: str) -> None:
    from clipscan.config import DataConfig
    from clipscan.data import read

    before = vm_status()
    start = time.perf_counter()
    if how == "arrow":
        table, _ = read.read_table(DataConfig(path=path))
    else:
        file = read.manifest_file(path)
        rows, _ = read.manifest_rows(*read.read_manifest_table(file), file, None)
        table = read.rows_to_table(rows, "longest", DataConfig().rows_per_block)
    print(json.dumps({"s": time.perf_counter() - start, "peak": vm_status(), "before": before, "rows": table.num_rows}))


def measure(path: Path, how: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), how], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{how} read failed: {proc.stderr[-2000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200000,2000000", help="comma-separated manifest rows")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(*args.child)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    gib = 2**30
    print(f"{'rows':>10s} {'arrow s':>8s} {'rows s':>8s} {'speed':>6s} {'arrow GiB':>10s} {'rows GiB':>9s}"
          f" {'memory':>7s}   (peak RSS of a fresh process; 'before': its RSS before the read)")
    peaks = []
    with tempfile.TemporaryDirectory(prefix="clipscan-bench-read-") as work:
        for n in sizes:
            path = Path(work) / f"manifest-{n}.parquet"
            write_manifest(path, n)
            arrow, rows = measure(path, "arrow"), measure(path, "rows")
            if not arrow["rows"] == rows["rows"] == n:
                raise RuntimeError(f"rows read: arrow {arrow['rows']}, row path {rows['rows']}, written {n}")
            peaks.append(arrow["peak"])
            print(f"{n:10,d} {arrow['s']:8.2f} {rows['s']:8.2f} {rows['s'] / arrow['s']:5.1f}x"
                  f" {arrow['peak'] / gib:10.2f} {rows['peak'] / gib:9.2f} {rows['peak'] / arrow['peak']:6.1f}x"
                  f"   before {arrow['before'] / gib:.2f}")
    if len(sizes) > 1 and sizes[-1] > sizes[0]:
        per_row = (peaks[-1] - peaks[0]) / (sizes[-1] - sizes[0])
        print(f"Arrow path: {per_row:.0f} bytes of driver peak per manifest row between {sizes[0]:,} and "
              f"{sizes[-1]:,} rows: {per_row * 1e8 / gib:.0f} GiB at 10^8")


if __name__ == "__main__":
    main()
