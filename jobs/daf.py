"""DAF: where do the probe (CLIP) and the reference (DINOv2) disagree about which images are alike?

    python jobs/daf.py --config configs/daf-tiny.yaml [key=value ...]
    ray job submit --working-dir . -- python jobs/daf.py --config configs/daf.yaml
"""

from __future__ import annotations

import logging
import sys

from clipscan.cli import fail, parse_args, setup_logging
from clipscan.config import DafConfig
from clipscan.daf import run_daf


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv, DafConfig, __doc__.splitlines()[0])
    setup_logging()
    try:
        run = run_daf(cfg, overwrite=args.overwrite)
    except Exception as e:  # one line that names the stage; the traceback goes to the log
        logging.getLogger("clipscan").debug("DAF failed", exc_info=True)
        return fail(str(e))
    print(f"report: {run.path('report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
