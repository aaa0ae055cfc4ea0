"""A job's corpus in; the run's per-image parts (``corpus/``, ``embeddings/<model>/``, ``skipped/``) and counts out.

The read -> embed -> sink -> collect -> counts loop every job starts with: the corpus is
read (``data.corpus``), each input shard's rows go through the encoder stage into the
sink's pieces (in this process below ``knn.stage_min_rows`` rows, without starting Ray;
else in a Ray actor pool), the pieces are collected into the run's parts, ids repeated
across parts are settled, and the row accounting is checked and recorded. Ray is started
(or joined) only where a stage runs on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from clipscan import fs as cfs
from clipscan.config import JobConfig
from clipscan.pipeline.cluster import configure_data_context, in_process, init_ray
from clipscan.pipeline.parts import RunParts
from clipscan.pipeline.progress import Progress

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from clipscan.rundir import Run

log = logging.getLogger("clipscan")


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
    init_ray(cfg)  # the join of precomputed vectors runs on Ray Data
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
                                                     [RunParts(staging).skipped(), RunParts(run.output).skipped()])
    if computed:
        cfs.remove_tree(staging)
    run.count(**{k: v for k, v in counts.items() if k not in ("nodes", "shards", "shards_reused")})
    return counts


def _join_vectors(run: Run, cfg: JobConfig, models: dict[str, str], staging: str) -> dict[str, Any]:
    """Join every model's vectors on id in the pipeline; write the run's parts (``embed.PairSink``)."""
    from clipscan.stages import embed
    from clipscan.stages.vectors import paired_vectors

    for folder in RunParts(run.output).folders():
        cfs.remove_tree(folder)  # a rerun writes them again whole
    ds = paired_vectors(staging, models, rows_per_block=cfg.data.rows_per_block)
    probe, reference = models
    sink = embed.PairSink(run.output, (probe, reference))
    ds.write_datasink(sink)
    return dict(sink.counts)


def _embed_computed(run: Run, cfg: JobConfig, models: dict[str, str], out_dir: str) -> dict[str, Any]:
    """Embed the corpus with models that have an encoder; parts go under ``out_dir``."""
    from clipscan.data.corpus import plan_corpus
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
        for path in RunParts(run.output).of_part(part, names):
            if cfs.exists(path):
                fsys, inner = cfs.resolve(path)
                fsys.delete_file(inner)
        cfs.remove_tree(cfs.join(raw, f"shard-{shard:05d}"))

    with run.stage("read") as facts:
        corpus, info = plan_corpus(cfg.data, done_shards, records=records, forget=forget,
                                   ray_up=lambda: init_ray(cfg))
        facts.update({k: v for k, v in info.items() if k not in ("shard_rows", "sources")})
    total = None if info["format"] == "webdataset" else sum(info["shard_rows"].values()) or None
    here = corpus.blocks is not None and total is not None and in_process(cfg, total)
    with run.stage("embed") as facts:
        if info["todo_shards"] and here:
            assert corpus.blocks is not None
            write_here(corpus.blocks, *embed.local_stage(models, cfg.data, cfg.embed), raw, "embed", total)
        elif info["todo_shards"]:
            init_ray(cfg)
            built = embed.build_embed(corpus.dataset(), models, cfg.data, cfg.embed)
            write_shards(built, raw, "embed", total)
        facts.update(executor="local" if here else "ray")
        if info.get("numbered"):  # WebDataset: the readers recorded each shard's row count as they read it
            info["shard_rows"] = recorded_shard_rows(records, info["sources"])[0]
        counts = embed.collect(raw, out_dir, names, info["shard_rows"])
        cfs.remove_tree(raw)
        if out_dir == run.output:  # the run's own parts (else the vectors stage settles the joined ones)
            repeated = settle_repeats(run, cfg, names, counts["embedded"])
            if repeated:
                counts["embedded"] -= repeated
                counts["skipped"] += repeated
                counts["skipped_by_stage"] = rows.write_skipped(run.path("skipped.parquet"),
                                                                 [RunParts(run.output).skipped()])
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
    from clipscan.pipeline.cluster import executor_for
    from clipscan.stages import repeats

    if rows == 0:
        return 0
    moved = repeats.settle(run.output, models, executor_for(cfg, rows))
    if moved:
        log.info("%d rows repeat an id an earlier row of the run has; skipped (skipped.parquet)", moved)
    return moved


def write_here(blocks: list[pa.Table], stage: Callable[[dict[str, np.ndarray]], pa.Table], batch_size: int,
               raw: str, name: str, total: int | None) -> None:
    """``write_shards`` in this process: ``stage`` over every block's rows, ``batch_size`` at a
    time, written under ``raw`` as the sink writes them (``rows.write_pieces``), so collect
    and resume see the same pieces; progress logged as ``name``."""
    from ray.data.block import BlockAccessor  # Ray Data's own batch conversion; Ray is not started

    from clipscan.stages import rows

    done = [rows.rows_written(raw)]
    task = 0
    with Progress(name, lambda: done[0], total):
        for block in blocks:
            for start in range(0, block.num_rows, batch_size):
                batch = BlockAccessor.for_block(block.slice(start, batch_size)).to_batch_format("numpy")
                written = rows.write_pieces(raw, stage(batch), task)
                task += 1
                done[0] += sum(n for shard, n in written if shard >= 0)


def write_shards(ds: Any, raw: str, stage: str, total: int | None) -> None:
    """Run a per-row pipeline into ``raw`` (``rows.ShardSink``: pieces per input shard, what
    resume counts), logging its progress as ``stage``. DAF's embedding and TCAC's scoring.

    The write tasks add the rows they wrote to a counter actor on the driver's node (which
    lives as long as the job), so a progress line costs one call, never a listing of the
    pieces; rows an earlier run left are counted once."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from clipscan.stages import rows

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    counted: Any = ray.remote(rows.RowCounter)
    counter = counted.options(num_cpus=0, scheduling_strategy=here).remote(rows.rows_written(raw))
    try:
        with Progress(stage, lambda: ray.get(counter.total.remote()), total):
            ds.write_datasink(rows.ShardSink(raw, counter), ray_remote_args={"num_cpus": rows.IO_CPUS})
    finally:
        ray.kill(counter)


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
