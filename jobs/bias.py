"""Bias probes (ComCO): text-order bias, object-size bias and the matching drop of every probe model.

    python jobs/bias.py --config configs/bias-tiny.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/bias.py --config configs/bias.yaml
"""

from __future__ import annotations

import logging
import sys

from clipscan.bias import run_bias
from clipscan.cli import fail, parse_args, setup_logging
from clipscan.config import BiasConfig

log = logging.getLogger("clipscan")


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv, BiasConfig, __doc__.splitlines()[0])
    setup_logging()
    try:
        run = run_bias(cfg, overwrite=args.overwrite)
    except Exception as e:  # one line that names the stage; the traceback goes to the log
        log.debug("bias probes failed", exc_info=True)
        return fail(str(e))
    print(f"report: {run.path('report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
