"""TCAC: how does the probe's caption ranking move when an image is harmlessly transformed?

    python jobs/tcac.py --config configs/tcac-tiny.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/tcac.py --config configs/tcac.yaml
"""

from __future__ import annotations

import logging
import sys

from clipscan import fs as cfs
from clipscan.config import TcacConfig
from clipscan.runner import fail, parse_args, setup_logging
from clipscan.stages.tcac import run_tcac

log = logging.getLogger("clipscan")


def ensure_corpus(cfg: TcacConfig) -> None:
    """Generate the scene corpus at ``data.path`` when ``data.generate`` asks and it is missing."""
    if cfg.data.generate is None or cfg.data.format not in ("auto", "manifest") or cfs.exists(cfg.data.path):
        return
    from clipscan.data.scenes import write_corpus

    root = cfg.data.path
    if root.endswith(".parquet"):
        if not root.endswith("manifest.parquet"):
            raise ValueError(f"data.generate writes DIR/manifest.parquet; data.path {root} is another file name")
        root = cfs.dirname(root)
    log.info("generating %d scenes at %s", cfg.data.generate, root)
    write_corpus(root, cfg.data.generate, seed=cfg.seed, size=max(cfg.embed.image_size, 64))


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv, TcacConfig, __doc__.splitlines()[0])
    setup_logging()
    try:
        ensure_corpus(cfg)
        run = run_tcac(cfg, overwrite=args.overwrite)
    except Exception as e:  # one line that names the stage; the traceback goes to the log
        log.debug("TCAC failed", exc_info=True)
        return fail(str(e))
    print(f"report: {run.path('report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
