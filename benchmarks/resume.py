"""A DAF job killed halfway through its search and rerun: the same discrepancies as a clean run, the finished query blocks kept.

Writes n synthetic ``emb:`` rows per model (clip-retrieval layout, as ``scale.py
--precomputed``), then runs ``jobs/daf.py`` three times as a user would, each a process
of its own with its own local Ray: a run SIGKILLed (its whole process group) once half
of its query blocks are written, the same command again, and a clean run into another
directory. Prints the blocks written before the kill, ``stages.index.blocks_reused`` of
the rerun, each run's wall time, and whether ``discrepancies.parquet``, ``pairs.parquet``
and ``cases.parquet`` are equal to the clean run's.

    python benchmarks/resume.py                       # 100,000 rows, query blocks of 2,000
    python benchmarks/resume.py --n 20000 --query-block 500
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import PROBE_D, REFERENCE_D, write_clip_retrieval  # noqa: E402


def command(probe: str, reference: str, out: Path, query_block: int, extra: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / "daf.py"), f"models.probe=emb:{probe}",
            f"models.reference=emb:{reference}", f"output={out}", "knn.stage_min_rows=1000",
            f"knn.query_block={query_block}", "mining.cases=20", "report.rows=10", *extra]


def blocks(out: Path) -> int:
    return len(list((out / "_search").glob("part-*.parquet")))


def main(argv: list[str] | None = None) -> int:
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="rows per model")
    parser.add_argument("--query-block", type=int, default=2000, help="knn.query_block")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-resume"), help="embeddings and run directories")
    parser.add_argument("override", nargs="*", help="extra DAF overrides, e.g. knn.index=IVF256,Flat")
    args = parser.parse_args(argv)
    work = Path(args.work)
    probe = write_clip_retrieval(work / f"emb-{args.n}-probe", args.n, PROBE_D, "float16", 1, 100_000)
    reference = write_clip_retrieval(work / f"emb-{args.n}-reference", args.n, REFERENCE_D, "float32", 2, 100_000)
    total = -(-args.n // args.query_block)
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    killed, clean = work / "killed", work / "clean"
    for d in (killed, clean):
        shutil.rmtree(d, ignore_errors=True)

    start = time.perf_counter()
    proc = subprocess.Popen(command(probe, reference, killed, args.query_block, args.override), env=env, cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while blocks(killed) < total // 2 and proc.poll() is None:
        time.sleep(0.05)
    if proc.poll() is not None:
        print(f"the job ended (exit {proc.returncode}) before half its blocks were written", file=sys.stderr)
        return 1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_s, before = time.perf_counter() - start, blocks(killed)
    timings = {}
    for name, out in (("rerun", killed), ("clean", clean)):
        t = time.perf_counter()
        code = subprocess.run(command(probe, reference, out, args.query_block, args.override), env=env,
                              cwd=ROOT, stdout=subprocess.DEVNULL).returncode
        if code != 0:
            print(f"the {name} run failed (exit {code})", file=sys.stderr)
            return 1
        timings[name] = time.perf_counter() - t
    index = json.loads((killed / "run.json").read_text())["stages"]["index"]
    print(f"DAF over {args.n:,} emb: rows, knn.query_block={args.query_block} ({total} blocks), {args.override}")
    print(f"killed after {killed_s:.1f} s with {before} blocks written")
    print(f"rerun: {timings['rerun']:.1f} s, stages.index.blocks = {index['blocks']}, "
          f"blocks_reused = {index['blocks_reused']}, index stage {index['wall_s']:.1f} s")
    clean_index = json.loads((clean / "run.json").read_text())["stages"]["index"]
    print(f"clean: {timings['clean']:.1f} s, blocks_reused = {clean_index['blocks_reused']}, "
          f"index stage {clean_index['wall_s']:.1f} s")
    same = True
    for name in ("discrepancies.parquet", "pairs.parquet", "cases.parquet", "skipped.parquet"):
        equal = pq.read_table(killed / name).equals(pq.read_table(clean / name))
        same &= equal
        print(f"{name}: {'equal to' if equal else 'DIFFERENT from'} the clean run's")
    return 0 if same and index["blocks_reused"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
