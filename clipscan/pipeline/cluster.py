"""A job's Ray: joined (``ray.address``, ``RAY_ADDRESS``) or started on this machine, and the Ray Data settings every pipeline runs with."""

from __future__ import annotations

import os
import sys
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipscan.config import JobConfig
    from clipscan.pipeline.executor import Executor


def init_ray(cfg: JobConfig) -> None:
    """Connect to the cluster named by ``ray.address``/``RAY_ADDRESS``, or start a local Ray.

    Either way this process's Ray Data runs with `configure_data_context`.
    """
    import ray

    if ray.is_initialized():
        configure_data_context()
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        configure_data_context()
    else:
        start_local_ray(cfg.ray.num_cpus)


def in_process(cfg: JobConfig, rows: int) -> bool:
    """Whether a per-row stage over ``rows`` rows runs in the job's own process rather than on
    Ray: fewer than ``knn.stage_min_rows`` rows, no cluster named (``ray.address``,
    ``RAY_ADDRESS``) and no Ray started by the caller. Starting Ray and its workers (about
    6 s, then 9-10 s of imports per worker on 2 cores) would be most of a small job's time;
    a job sent to a cluster runs its stages there, where the GPUs are."""
    import ray

    named = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    return rows < stage_min_rows(cfg) and not named and not ray.is_initialized()


def stage_min_rows(cfg: JobConfig) -> int:
    """``knn.stage_min_rows`` of a job's config (its default for a job without ``knn``)."""
    from clipscan.config import KnnConfig

    return int((getattr(cfg, "knn", None) or KnnConfig()).stage_min_rows)


def executor_for(cfg: JobConfig, rows: int) -> Executor:
    """The executor of a per-part stage over ``rows`` rows (``executor.for_rows`` at
    ``knn.stage_min_rows``), with the job's Ray started or joined where it is ``RayTasks``."""
    from clipscan.pipeline.executor import for_rows

    executor = for_rows(rows, stage_min_rows(cfg))
    if executor.name == "ray":
        init_ray(cfg)
    return executor


def start_local_ray(num_cpus: int | None, temp_dir: str | None = None, **init_kwargs: Any) -> None:
    """Start a Ray on this machine the way a clipscan job runs one, and configure Ray Data for it.

    No dashboard, a fresh temp dir (``temp_dir``, else a new one) so nothing an earlier Ray
    left behind is reused, the worker pool of `worker_pool_config`, and
    `configure_data_context`. ``init_kwargs`` go to ``ray.init`` as they are
    (``object_store_memory``, ``log_to_driver``).
    """
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=False,
             _temp_dir=temp_dir or tempfile.mkdtemp(prefix="clipscan-ray-"),
             _system_config=worker_pool_config(num_cpus), **init_kwargs)
    configure_data_context()


# Idle worker processes a local Ray keeps at least (Ray's default keeps one per CPU).
IDLE_WORKERS = 8


def worker_pool_config(num_cpus: int | None) -> dict[str, Any]:
    """The ``_system_config`` of a Ray that clipscan starts on this machine.

    A job's stages run tasks of several shapes (Ray Data's own at 1 CPU, writers at 0.5,
    sorts' map and reduce tasks) one after another. With Ray's default, a node keeps one
    idle worker per CPU and kills the rest after a second idle; the next stage then starts
    fresh processes, about 2 s each on 2 cores, and a 120-row sort took 10 s instead of
    0.3 s. Keeping a few more idle workers costs their memory (about 100 MB each) while
    Ray runs. Clusters started with ``ray start`` keep their own setting
    (``RAY_num_workers_soft_limit``); their nodes have more CPUs, hence more idle workers.
    """
    return {"num_workers_soft_limit": max(IDLE_WORKERS, num_cpus or os.cpu_count() or 1)}


def configure_data_context() -> None:
    """The Ray Data settings every clipscan pipeline runs with (this process's ``DataContext``,
    which Ray Data hands to the tasks and actors it starts)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # part files and row order are the same on every run
    ctx.enable_progress_bars = sys.stderr.isatty()
    if "RAY_DATA_USE_DATASOURCE_V2" not in os.environ:
        # Ray Data's V2 Parquet reader starts footer-reading actors on every read: about 2-3 s
        # per read on 2 cores before the first row, and a DAF job reads its parts a dozen
        # times. The V1 reader lists and reads the same files in tasks. The variable, when
        # set, is the user's choice and is kept.
        ctx.use_datasource_v2 = False
    if "RAY_DATA_SHUFFLE_INPUT_BATCH_BYTES" not in os.environ:
        # A sort's or group-by's map task takes its input blocks up to this many bytes at once:
        # Ray's default, 1 GiB, made each map task of the mine stage's rank sort hold 1.84 GiB
        # at 2,000,000 rows, more than the search's shard actor with its vectors and indexes.
        # With one block's worth the largest worker of that run is the shard actor.
        ctx.shuffle_input_batch_bytes = ctx.target_max_block_size or ctx.shuffle_input_batch_bytes
