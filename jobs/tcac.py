"""TCAC: how does the probe's caption ranking move when an image is harmlessly transformed?

    python jobs/tcac.py --config configs/tcac-tiny.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/tcac.py --config configs/tcac.yaml
"""

from __future__ import annotations

import logging
import sys

from clipscan.cli import fail, parse_args, setup_logging
from clipscan.config import TcacConfig
from clipscan.runner import ensure_corpus
from clipscan.tcac import run_tcac

log = logging.getLogger("clipscan")


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
