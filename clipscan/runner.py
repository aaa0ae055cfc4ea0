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


def embed_corpus(run: Run, cfg: JobConfig, models: dict[str, str]) -> dict[str, Any]:
    """Read the corpus, embed it with ``models`` ({name: spec}), write embeddings/corpus/skips into the run.

    ``emb:PATH`` models are not embedded: their vectors are read from PATH and joined on id
    with the others (``stages.vectors``); ids that one model lacks are skipped with the
    reason. Afterwards ``embeddings/<name>/`` holds the same ids for every model.
    Resumes: input shards whose outputs an earlier run of the same config finished, or
    whose rows the killed run had all written, are not computed again.
    """
    from clipscan.models.registry import is_precomputed

    configure_data_context()  # also where the caller started or joined Ray without `init_ray`
    computed = {n: s for n, s in models.items() if not is_precomputed(s)}
    if len(computed) == len(models):
        return _embed_computed(run, cfg, computed, run.output)
    staging = run.path("_embedded")  # the embed stage's own parts, joined below into the run's
    counts = _embed_computed(run, cfg, computed, staging) if computed else {}
    with run.stage("vectors") as facts:
        joined = _join_vectors(run, cfg, models, staging)
        repeated = settle_repeats(run, cfg, list(models), joined["embedded"])
        joined["embedded"] -= repeated
        joined["skipped"] += repeated
        facts.update(rows=joined["embedded"], skipped=joined["skipped"], renormalised=joined["renormalised"],
                     repeated=repeated)
    skipped_before = counts.get("skipped", 0)
    counts.update(embedded=joined["embedded"], skipped=skipped_before + joined["skipped"],
                  read=joined["embedded"] + skipped_before + joined["skipped"],
                  renormalised=joined["renormalised"])
    from clipscan.stages import rows

    counts["skipped_by_stage"] = rows.write_skipped(run.path("skipped.parquet"),
                                                     [cfs.join(staging, "skipped"), run.path("skipped")])
    if computed:
        cfs.remove_tree(staging)
    run.count(**{k: v for k, v in counts.items() if k not in ("nodes", "shards", "shards_reused")})
    return counts


def _join_vectors(run: Run, cfg: JobConfig, models: dict[str, str], staging: str) -> dict[str, Any]:
    """Join every model's vectors on id in the pipeline; write the run's parts (``embed.PairSink``)."""
    from clipscan.stages import embed
    from clipscan.stages.vectors import paired_vectors

    for folder in ("embeddings", "corpus", "skipped"):
        cfs.remove_tree(run.path(folder))  # a rerun writes them again whole
    ds = paired_vectors(staging, models, rows_per_block=cfg.data.rows_per_block)
    probe, reference = models
    sink = embed.PairSink(run.output, (probe, reference))
    ds.write_datasink(sink)
    return dict(sink.counts)


def _embed_computed(run: Run, cfg: JobConfig, models: dict[str, str], out_dir: str) -> dict[str, Any]:
    """Embed the corpus with models that have an encoder; parts go under ``out_dir``."""
    from clipscan.data.corpus import read_corpus
    from clipscan.data.read import recorded_shard_rows
    from clipscan.stages import embed, rows

    raw = run.path("_rows")
    records = run.path("inputs")
    names = list(models)

    def done_shards(shard_rows: dict[int, int]) -> set[int]:
        collected = embed.finished_shards(out_dir, shard_rows, names)
        return collected | rows.complete_shards(raw, shard_rows, keep=collected)

    def forget(shard: int) -> None:  # the input of this shard changed since an earlier run wrote it
        part = f"part-{shard:05d}.parquet"
        for path in [cfs.join(run.output, "embeddings", m, part) for m in names] + [
                cfs.join(run.output, d, part) for d in ("corpus", "skipped")]:
            if cfs.exists(path):
                fsys, inner = cfs.resolve(path)
                fsys.delete_file(inner)
        cfs.remove_tree(cfs.join(raw, f"shard-{shard:05d}"))

    with run.stage("read") as facts:
        ds, info = read_corpus(cfg.data, done_shards, records=records, forget=forget)
        facts.update({k: v for k, v in info.items() if k not in ("shard_rows", "sources")})
    total = None if info["format"] == "webdataset" else sum(info["shard_rows"].values()) or None
    with run.stage("embed") as facts:
        if info["todo_shards"]:
            built = embed.build_embed(ds, models, cfg.data, cfg.embed)
            write_shards(built, raw, "embed", total)
        if info.get("numbered"):  # WebDataset: the readers recorded each shard's row count as they read it
            info["shard_rows"] = recorded_shard_rows(records, info["sources"])[0]
        counts = embed.collect(raw, out_dir, names, info["shard_rows"])
        cfs.remove_tree(raw)
        if out_dir == run.output:  # the run's own parts (else the vectors stage settles the joined ones)
            repeated = settle_repeats(run, cfg, names, counts["embedded"])
            if repeated:
                counts["embedded"] -= repeated
                counts["skipped"] += repeated
                counts["skipped_by_stage"] = rows.write_skipped(run.path("skipped.parquet"), [run.path("skipped")])
            facts.update(rows_repeated=repeated)
        facts.update(rows_read=counts["read"], rows_embedded=counts["embedded"], rows_skipped=counts["skipped"],
                     shards=counts["shards"], shards_reused=counts["shards_reused"], nodes=counts["nodes"])
    run.count(**{k: v for k, v in counts.items() if k not in ("nodes", "shards", "shards_reused")})
    if counts["read"] != counts["embedded"] + counts["skipped"]:
        raise RuntimeError(f"row accounting does not add up: {counts}")
    return counts


def settle_repeats(run: Run, cfg: JobConfig, models: list[str], rows: int) -> int:
    """Settle ids repeated across the run's parts (``stages.repeats``): in this process below
    ``knn.stage_min_rows`` rows, else on Ray. Returns the rows moved to ``skipped/``."""
    from clipscan.pipeline.executor import for_rows
    from clipscan.stages import repeats

    if rows == 0:
        return 0
    from clipscan.config import KnnConfig

    knn = getattr(cfg, "knn", None) or KnnConfig()
    moved = repeats.settle(run.output, models, for_rows(rows, knn.stage_min_rows))
    if moved:
        log.info("%d rows repeat an id an earlier row of the run has; skipped (skipped.parquet)", moved)
    return moved


def write_shards(ds: Any, raw: str, stage: str, total: int | None) -> None:
    """Run a per-row pipeline into ``raw`` (``rows.ShardSink``: pieces per input shard, what
    resume counts), logging its progress as ``stage``. DAF's embedding and TCAC's scoring.

    The write tasks add the rows they wrote to a counter actor, so a progress line costs
    one call, never a listing of the pieces; rows an earlier run left are counted once."""
    import ray

    from clipscan.stages import rows

    counter: Any = ray.remote(num_cpus=0)(rows.RowCounter).remote(rows.rows_written(raw))
    try:
        with Progress(stage, lambda: ray.get(counter.total.remote()), total):
            ds.write_datasink(rows.ShardSink(raw, counter), ray_remote_args={"num_cpus": rows.IO_CPUS})
    finally:
        ray.kill(counter)


class Progress:
    """Logs ``stage: rows done/total (pct), rate, ETA`` every ``interval_s`` while a stage runs.

    On a terminal Ray Data's own progress bars show; in a job log (not a terminal) these
    lines are the progress.
    """

    def __init__(self, stage: str, done: Any, total: int | None, interval_s: float = 15.0) -> None:
        import threading

        self.stage, self.done, self.total, self.interval_s = stage, done, total, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._logged = False

    def __enter__(self) -> Progress:
        import time

        self._start = time.perf_counter()
        if not sys.stderr.isatty():
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if exc[0] is None and not sys.stderr.isatty() and not self._logged:
            try:  # a stage shorter than the interval still says how much it did and how fast
                log.info(self.line())
            except Exception:
                pass

    def line(self) -> str:
        import time

        elapsed = max(time.perf_counter() - self._start, 1e-9)
        done = self.done()
        rate = done / elapsed
        if self.total:
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            return (f"{self.stage}: {done}/{self.total} rows ({100 * done / self.total:.0f}%), "
                    f"{rate:.1f} rows/s, ETA {eta:.0f} s")
        return f"{self.stage}: {done} rows, {rate:.1f} rows/s"

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                log.info(self.line())
                self._logged = True
            except Exception:  # progress is best effort; the stage's own errors surface elsewhere
                continue


def ensure_corpus(cfg: JobConfig) -> None:
    """Generate the scene corpus at ``data.path`` when ``data.generate`` asks and it is missing."""
    root = cfg.data.path
    if root is None or cfg.data.generate is None or cfg.data.format not in ("auto", "manifest") or cfs.exists(root):
        return
    if cfg.data.format == "auto" and not root.endswith((".parquet", "/")) and "." in root.rsplit("/", 1)[-1]:
        return  # a missing shard pattern, JSON or CSV is not where scenes go: the reader says it is missing
    from clipscan.data.scenes import write_corpus

    if cfs.is_uri(root):
        raise ValueError(f"{root} does not exist and data.generate writes to local disk only; "
                         "generate locally and upload it, or set data.generate=null")
    if root.endswith(".parquet"):
        if not root.endswith("manifest.parquet"):
            raise ValueError(f"data.generate writes DIR/manifest.parquet; data.path {root} is another file name")
        root = cfs.dirname(root)
    log.info("generating %d scenes at %s", cfg.data.generate, root)
    write_corpus(root, cfg.data.generate, seed=cfg.seed, size=max(cfg.embed.image_size, 64),
                 max_objects=cfg.data.generate_max_objects)


def fail(message: str) -> int:
    """Print the one-line error and record it in any run of this process still marked running."""
    from clipscan.rundir import fail_open_runs

    fail_open_runs(message)
    print(f"error: {message}", file=sys.stderr)
    return 1
