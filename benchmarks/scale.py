"""DAF at growing corpus sizes: generated scenes in, wall time per stage and growth factors out.

Runs the real DAF job (``clipscan.daf.run_daf``, tiny random-initialised models, nothing
downloaded) on generated scene corpora of each size, one after another on one local Ray,
and prints side by side: the job's wall and CPU time, each stage's wall time from
``run.json``, and between consecutive sizes each stage's growth factor

    growth = (time ratio) / (size ratio)

1.0 is linear in the number of images. A stage whose growth is above --flag (default 1.5)
costs more per image as the corpus grows and is flagged; exact neighbour search is
expected there (it compares all pairs: n^2 work), every other stage should stay near 1
or below (fixed start-up costs make small runs look slow per image).

    python benchmarks/scale.py                              # 2,000 / 20,000 / 100,000 images
    python benchmarks/scale.py --sizes 2000,20000 --image-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import Sampler  # noqa: E402

STAGES = ("read", "embed", "index", "mine", "summarise", "report")
EXPECTED_SUPERLINEAR = {"index": "exact search compares all pairs (n^2)"}


def corpus(work: Path, n: int, size: int, workers: int) -> tuple[str, float]:
    """The generated scene corpus of n images (made once, reused); returns its manifest and the seconds spent."""
    from clipscan.data.scenes import write_corpus

    root = work / f"corpus-{n}-{size}"
    manifest = root / "manifest.parquet"
    if manifest.exists():
        return str(manifest), 0.0
    start = time.perf_counter()
    write_corpus(str(root), n, seed=0, size=size, workers=workers)
    return str(manifest), time.perf_counter() - start


def run_one(work: Path, n: int, args: argparse.Namespace) -> dict[str, Any]:
    from clipscan.config import DafConfig, load_config
    from clipscan.daf import run_daf

    manifest, gen_s = corpus(work, n, args.image_size, args.gen_workers)
    out = work / f"run-{n}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(DafConfig, str(ROOT / "configs" / "daf-tiny.yaml"), [
        f"data.path={manifest}", f"output={out}", "data.generate=null", f"embed.image_size={args.image_size}",
        *args.override,
    ])
    load = os.getloadavg()[0]
    with Sampler() as sampler:
        start = time.perf_counter()
        run_daf(cfg)
        wall = time.perf_counter() - start
    info = json.loads((out / "run.json").read_text())
    return {
        "n": n, "wall_s": wall, "cpu_s": sampler.cpu_seconds, "peak_pss_gib": sampler.peak_pss / 2**30,
        "generate_s": gen_s, "load": load, "embedded": info["counts"].get("embedded"),
        "stages": {s: info["stages"].get(s, {}).get("wall_s") for s in STAGES},
    }


def _k(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def _fmt(x: float | None, width: int = 9) -> str:
    return f"{x:>{width}.1f}" if x is not None else f"{'-':>{width}}"


def table(results: list[dict[str, Any]], flag: float) -> str:
    """Times per size side by side, then the growth factor of each step."""
    sizes = [r["n"] for r in results]
    head = f"{'':<14}" + "".join(f"{n:>12,}" for n in sizes)
    steps = list(zip(results, results[1:], strict=False))
    head += "".join(f"{'growth ' + _k(a['n']) + '->' + _k(b['n']):>18}" for a, b in steps)
    lines = [head, "-" * len(head)]
    flagged = []

    def row(label: str, values: list[float | None], unit: str = "s", growth: bool = True) -> None:
        cells = "".join(f"{_fmt(v, 11)}{unit}" if v is not None else f"{'-':>12}" for v in values)
        for (a, b), (va, vb) in zip(steps, zip(values, values[1:], strict=False), strict=True):
            if not growth or not va or vb is None:
                cells += f"{'':>18}"
                continue
            g = (vb / va) / (b["n"] / a["n"])
            mark = ""
            if g > flag:
                mark = " !" if label.strip() not in EXPECTED_SUPERLINEAR else " *"
                flagged.append((label.strip(), a["n"], b["n"], g))
            cells += f"{g:>16.2f}{mark:<2}"
        lines.append(f"{label:<14}{cells}")

    row("job wall", [r["wall_s"] for r in results])
    row("job CPU", [r["cpu_s"] for r in results])
    for stage in STAGES:
        row(f"  {stage}", [r["stages"][stage] for r in results])
    row("images/s", [r["n"] / r["wall_s"] for r in results], unit=" ", growth=False)
    row("peak PSS GiB", [r["peak_pss_gib"] for r in results], unit=" ", growth=False)
    row("corpus gen", [r["generate_s"] or None for r in results], growth=False)
    row("load avg", [r["load"] for r in results], unit=" ", growth=False)
    lines.append("")
    lines.append(f"growth = (time ratio) / (size ratio); 1.00 = linear. '!' marks a stage above {flag} "
                 "(cost per image rising with size), '*' one where that is expected:")
    for name, why in EXPECTED_SUPERLINEAR.items():
        lines.append(f"  {name}: {why}")
    unexpected = [f for f in flagged if f[0] not in EXPECTED_SUPERLINEAR]
    if unexpected:
        lines.append("FLAGGED: " + "; ".join(f"{s} {a:,}->{b:,}: {g:.2f}" for s, a, b, g in unexpected))
    else:
        lines.append("no stage other than the expected ones grows faster than its work")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,20000,100000", help="comma-separated corpus sizes, images")
    parser.add_argument("--image-size", type=int, default=64, help="generated and decoded side, px")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-scale"), help="corpora and run directories")
    parser.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--gen-workers", type=int, default=os.cpu_count() or 1, help="processes generating scenes")
    parser.add_argument("--flag", type=float, default=1.5, help="flag a stage whose growth factor is above this")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("override", nargs="*", help="extra DAF overrides, e.g. knn.index=IVF256,Flat")
    args = parser.parse_args(argv)
    sizes = sorted(int(s.replace("_", "")) for s in args.sizes.split(","))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    import logging
    import tempfile

    import ray

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="clipscan-bench-"))
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    for n in sizes:
        print(f"DAF on {n:,} images ...", file=sys.stderr, flush=True)
        results.append(run_one(work, n, args))
        r = results[-1]
        print(f"  {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, stages {r['stages']}", file=sys.stderr, flush=True)
    ray.shutdown()
    print(f"DAF (tiny models, {args.image_size} px, {ray_cpus(args.cpus)} CPUs) per corpus size")
    print(table(results, args.flag))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def ray_cpus(cpus: int | None) -> int:
    return cpus or os.cpu_count() or 1


if __name__ == "__main__":
    sys.exit(main())
