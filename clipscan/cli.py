"""What every job script does around its job: the command line in, a validated config out; logging; the one-line failure."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TypeVar

from pydantic import BaseModel

from clipscan.config import ConfigError, load_config

C = TypeVar("C", bound=BaseModel)


def parse_args(argv: list[str] | None, cls: type[C], description: str) -> tuple[C, argparse.Namespace]:
    """``--config FILE [--overwrite] [key=value ...]`` -> the validated config and the namespace."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", help="YAML job config (see configs/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. knn.k=20 output=runs/x")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    return cfg, args


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                            stream=sys.stderr)
    logging.getLogger("clipscan").setLevel(logging.INFO)


def fail(message: str) -> int:
    """Print the one-line error and record it in any run of this process still marked running."""
    from clipscan.rundir import fail_open_runs

    fail_open_runs(message)
    print(f"error: {message}", file=sys.stderr)
    return 1
