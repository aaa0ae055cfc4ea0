"""Pieces every job script shares: argument parsing, logging, starting Ray, the embedding stage.

Job scripts in ``jobs/`` stay thin: they parse, then call these in order.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from clipscan import fs as cfs
from clipscan.config import ConfigError, JobConfig, load_config

if TYPE_CHECKING:
    from clipscan.rundir import Run

C = TypeVar("C", bound=BaseModel)
log = logging.getLogger("clipscan")


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


def init_ray(cfg: JobConfig) -> None:
    """Connect to the cluster named by ``ray.address``/``RAY_ADDRESS``, or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(
        num_cpus=cfg.ray.num_cpus,
        include_dashboard=False,
        _temp_dir=tempfile.mkdtemp(prefix="clipscan-ray-"),
    )


def configure_data_context() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # part files and row order are the same on every run
    ctx.enable_progress_bars = sys.stderr.isatty()


def embed_corpus(run: Run, cfg: JobConfig, models: dict[str, str]) -> dict[str, Any]:
    """Read the corpus, embed it with ``models`` ({name: spec}), write embeddings/corpus/skips into the run."""
    from clipscan.data.read import read_corpus
    from clipscan.stages.embed import build_embed, collect

    with run.stage("read") as facts:
        ds, info = read_corpus(cfg.data)
        facts.update(info)
    with run.stage("embed") as facts:
        configure_data_context()
        raw = run.path("_rows")
        built = build_embed(ds, models, cfg.data, cfg.embed)
        built.write_parquet(raw)
        counts = collect(raw, run.output, list(models))
        _remove_tree(raw)
        facts.update(rows_read=counts["read"], rows_embedded=counts["embedded"], rows_skipped=counts["skipped"])
    run.count(**counts)
    if counts["read"] != counts["embedded"] + counts["skipped"]:
        raise RuntimeError(f"row accounting does not add up: {counts}")
    return counts


def _remove_tree(path: str) -> None:
    fsys, inner = cfs.resolve(path)
    try:
        fsys.delete_dir(inner)
    except (FileNotFoundError, OSError):
        pass


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1
