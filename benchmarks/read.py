"""Reading a manifest corpus: on the driver (the Arrow path, the row path) and streamed in Ray tasks, side by side.

A manifest below ``data.stream_min_rows`` rows (and any CSV or JSONL one) is turned into the
row table on the driver before the pipeline starts. Manifests whose ``image`` column is
strings and ``caption`` strings or lists of strings go column by column through Arrow
(``read.manifest_table``); byte captions take a Python row each (``read.manifest_rows``),
with the same result. The row path is timed here on the same manifest. A
larger Parquet manifest is streamed (``stream``): the driver reads the footers, Ray tasks
the rows, shard by shard, after a distributed duplicate-id pass.

For each size a Parquet manifest of image paths and captions (row groups of 100,000 rows)
is written once, then each path reads it in a fresh process, which prints its wall time and
the driver's peak RSS (VmHWM) beside the RSS it had before the read. The streamed path
starts a local Ray first (its start is not timed) and reads every row through the
dataset into a Ray task that counts them (where the encoders would take them: the driver
sees counts), the duplicate and digest passes included. Printed: all three, the ratios row path /
Arrow path, the Arrow path's bytes per row between the two sizes (what 10^8 rows would
need on the driver) and the streamed driver's peak at the largest size over the smallest.

    python benchmarks/read.py                           # 200,000 and 2,000,000 rows
    python benchmarks/read.py --sizes 20000,200000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    }), path, row_group_size=100_000)


def _child(path: str, how: str) -> None:
    from clipscan.config import DataConfig
    from clipscan.data import read

    if how == "streamed":
        _streamed(path)
        return
    before = vm_status()
    start = time.perf_counter()
    if how == "arrow":
        table, _ = read.read_table(DataConfig(path=path))
    else:
        file = read.manifest_file(path)
        rows, _ = read.manifest_rows(*read.read_manifest_table(file), file, None)
        table = read.rows_to_table(rows, "longest", DataConfig().rows_per_block)
    print(json.dumps({"s": time.perf_counter() - start, "peak": vm_status(), "before": before, "rows": table.num_rows}))


def _count(batch: Any) -> Any:
    import pyarrow as pa

    return pa.table({"rows": [batch.num_rows]})


def _streamed(path: str) -> None:
    from clipscan.config import DataConfig
    from clipscan.data import read
    from clipscan.data.corpus import read_corpus
    from clipscan.pipeline.cluster import start_local_ray

    work = tempfile.mkdtemp(prefix="clipscan-bench-stream-")
    start_local_ray(os.cpu_count(), os.path.join(work, "ray"), log_to_driver=False)
    before = vm_status()
    start = time.perf_counter()
    ds, info = read_corpus(DataConfig(path=path, stream_min_rows=0), records=os.path.join(work, "records"))
    assert info.get("streamed"), info
    # the rows go where the pipeline's encoders would take them, a Ray worker: the driver sees counts
    rows = int(ds.map_batches(_count, batch_format="pyarrow", batch_size=None, num_cpus=read.READ_CPUS).sum("rows"))
    print(json.dumps({"s": time.perf_counter() - start, "peak": vm_status(), "before": before, "rows": rows}))


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
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'rows':>10s} {'arrow s':>8s} {'rows s':>8s} {'speed':>6s} {'arrow GiB':>10s} {'rows GiB':>9s}"
          f" {'memory':>7s} {'streamed s':>11s} {'streamed GiB':>13s}   (driver peak RSS of a fresh process;"
          " 'before': its RSS before the read)")
    peaks, streamed_peaks = [], []
    with tempfile.TemporaryDirectory(prefix="clipscan-bench-read-") as work:
        for n in sizes:
            path = Path(work) / f"manifest-{n}.parquet"
            write_manifest(path, n)
            arrow, rows, streamed = measure(path, "arrow"), measure(path, "rows"), measure(path, "streamed")
            if not arrow["rows"] == rows["rows"] == streamed["rows"] == n:
                raise RuntimeError(f"rows read: arrow {arrow['rows']}, row path {rows['rows']}, "
                                   f"streamed {streamed['rows']}, written {n}")
            peaks.append(arrow["peak"])
            streamed_peaks.append(streamed["peak"])
            print(f"{n:10,d} {arrow['s']:8.2f} {rows['s']:8.2f} {rows['s'] / arrow['s']:5.1f}x"
                  f" {arrow['peak'] / gib:10.2f} {rows['peak'] / gib:9.2f} {rows['peak'] / arrow['peak']:6.1f}x"
                  f" {streamed['s']:11.2f} {streamed['peak'] / gib:13.2f}"
                  f"   before {arrow['before'] / gib:.2f}, streamed {streamed['before'] / gib:.2f}")
    if len(sizes) > 1 and sizes[-1] > sizes[0]:
        per_row = (peaks[-1] - peaks[0]) / (sizes[-1] - sizes[0])
        print(f"Arrow path: {per_row:.0f} bytes of driver peak per manifest row between {sizes[0]:,} and "
              f"{sizes[-1]:,} rows: {per_row * 1e8 / gib:.0f} GiB at 10^8")
        print(f"Streamed: the driver's peak at {sizes[-1]:,} rows is {streamed_peaks[-1] / streamed_peaks[0]:.2f} "
              f"times its peak at {sizes[0]:,}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
