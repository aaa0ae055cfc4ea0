"""Per-row pipelines over a corpus's input shards, and how Ray runs them: what every job shares.

A job's per-row stage (DAF's encoders, TCAC's scoring) is a plain batch callable in its
stage module; this module holds the Ray side around it, in one place:

* ``plan_resources``: the actor pool's size, each actor's CPUs and GPUs, its batch size
  and where images are decoded, from the cluster's resources and each node's CPUs
  (``plan`` for the running cluster); ``on_actors`` runs a stage class in that pool;
* ``ShardSink``: the stage's rows written as pieces per input shard, what resume counts
  (``shard_pieces``, ``rows_covered``, ``complete_shards``, ``rows_written``);
* ``units`` and ``each``: the collect step, one Ray task per input shard, its results
  fetched one at a time; ``write_skipped`` streams the shards' skips into one file.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa

from clipscan import fs as cfs

if TYPE_CHECKING:
    import ray.data

    from clipscan.config import EmbedConfig

T = TypeVar("T")

SKIPPED_SCHEMA = pa.schema(
    [("id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)


GPU_BATCH = 256  # images per encoder batch on a GPU actor unless embed.batch_size says otherwise
CPU_BATCH = 64  # the same on a CPU actor
IO_CPUS = 0.25  # CPUs a sink write task reserves: short Parquet writes beside actors that hold the rest


@dataclass(frozen=True)
class EmbedPlan:
    """How Ray runs the encoders: pool size, per-actor resources, and where images are decoded."""

    actors: int
    num_cpus: float
    num_gpus: float
    batch_size: int
    threads: int | None
    decode: str  # "actor" (the encoder actor decodes its own batch), "tasks" (CPU tasks) or "gpu" (nvJPEG in the actor)


def plan_resources(cluster: dict[str, float], cfg: EmbedConfig, node_cpus: list[float] | None = None) -> EmbedPlan:
    """Size the encoder pool from ``ray.cluster_resources()`` and each node's CPUs.

    One actor per GPU where there are GPUs, fed by CPU decode tasks (or decoding on its
    GPU with ``embed.decode: gpu``). On CPU-only clusters one actor per node that decodes
    its own batches and holds the node's CPUs but a sliver for the sink: separate decode
    tasks would take a core from the encoders for work that costs them a few percent, and
    their processes would preempt the encoder's threads. ``node_cpus`` lists the CPUs of
    each node that can run work (default: one node with all of ``cluster``'s CPUs).
    """
    gpus = int(cluster.get("GPU", 0)) if cfg.gpus is None else cfg.gpus
    if gpus > 0:
        return EmbedPlan(
            actors=cfg.actors or gpus,
            num_cpus=cfg.cpus_per_actor or 1.0,
            num_gpus=1.0,
            batch_size=cfg.batch_size or GPU_BATCH,
            threads=cfg.threads,
            decode="tasks" if cfg.decode == "auto" else cfg.decode,
        )
    if cfg.decode == "gpu":
        raise ValueError("embed.decode=gpu needs GPUs, and this cluster has none (set embed.decode=auto)")
    nodes = [c for c in (node_cpus or [float(cluster.get("CPU", 1))]) if c >= 1] or [1.0]
    decode = "actor" if cfg.decode == "auto" else cfg.decode
    actors = cfg.actors or len(nodes)
    per_node = -(-actors // len(nodes))  # actors sharing the smallest node
    room = min(nodes) / per_node
    if decode == "actor":
        per_actor = cfg.cpus_per_actor or max(0.5, room - IO_CPUS)
    else:  # leave a core for the decode tasks: two one-CPU actors on two CPUs starve them and the pipeline stalls
        per_actor = cfg.cpus_per_actor or max(0.5, min(room - 1.0, room - 0.5 * per_node))
    return EmbedPlan(actors=actors, num_cpus=per_actor, num_gpus=0.0, batch_size=cfg.batch_size or CPU_BATCH,
                     threads=cfg.threads or max(1, math.ceil(per_actor)), decode=decode)


def local_batch(cfg: EmbedConfig) -> int:
    """Images per batch of a stage run in the job's own process: ``embed.batch_size``, else
    the GPU or CPU actor's default by what this process has."""
    import torch

    return cfg.batch_size or (GPU_BATCH if torch.cuda.is_available() else CPU_BATCH)


def plan(cfg: EmbedConfig) -> EmbedPlan:
    """``plan_resources`` for the running cluster: its resources (``cluster_resources``) and nodes."""
    return plan_resources(cluster_resources(), cfg, node_cpus())


def on_actors(ds: ray.data.Dataset, stage: type, kwargs: dict[str, Any], pool: EmbedPlan,
              batch_size: int | None = None, max_actors: int | None = None,
              batch_format: str = "numpy") -> ray.data.Dataset:
    """``stage(**kwargs, threads=...)`` over ``ds`` in the actor pool ``pool`` plans: its size (at
    most ``max_actors``), each actor's CPUs, GPUs and torch threads, and ``batch_size`` rows per
    call (default the plan's). Every encoder stage (DAF's, TCAC's captions and scoring) runs
    this way. Builds; executes nothing."""
    import ray.data

    return ds.map_batches(
        stage,
        fn_constructor_kwargs={**kwargs, "threads": pool.threads},
        compute=ray.data.ActorPoolStrategy(size=min(pool.actors, max_actors or pool.actors)),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
        batch_size=batch_size or pool.batch_size,
        batch_format=batch_format,
    )


def node_cpus() -> list[float]:
    """CPUs of every live node that offers any (a head started with ``--num-cpus=0`` offers none)."""
    import ray

    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes()
            if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]


def cluster_resources() -> dict[str, float]:
    """Resources now, or, where GPU workers scale from zero, the most the autoscaler can add.

    Sizing the pool from the GPUs present at start would plan a CPU actor on a cluster
    whose GPU group is still at zero nodes, and the autoscaler would never add one.
    """
    import ray

    now = dict(ray.cluster_resources())
    if now.get("GPU"):
        return now
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler config published (local Ray, older Ray)
        most = {}
    if most.get("GPU"):
        now["GPU"] = float(most["GPU"])
    return now


class RowCounter:
    """Rows written so far, added to by the write tasks (a Ray actor in ``runner.write_shards``):
    what a progress line reads in one call."""

    def __init__(self, start: int = 0) -> None:
        self.rows = int(start)

    def add(self, rows: int) -> None:
        self.rows += int(rows)

    def total(self) -> int:
        return self.rows


class ShardSink:
    """Ray Data sink: rows with ``shard``/``row`` in, ``<root>/shard-NNNNN/rows-A-B.parquet`` out.

    Each write task splits its rows by input shard and writes each piece atomically, named
    by its first and last row, so a retried task rewrites the same file and a shard is
    finished once its pieces cover all its rows. Rows without a shard (-1) go to
    ``shard-unnumbered`` under a name unique to the write task. ``counter`` (a
    ``RowCounter`` actor handle) is told how many rows each task wrote.
    """

    def __new__(cls, root: str, counter: Any = None) -> Any:
        from ray.data import Datasink

        class _Sink(Datasink):  # type: ignore[misc,type-arg]
            def __init__(self, root: str, counter: Any) -> None:
                self.root, self.counter = root, counter

            def write(self, blocks: Any, ctx: Any) -> list[tuple[int, int]]:
                from ray.data.block import BlockAccessor

                tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
                tables = [t for t in tables if t.num_rows]
                if not tables:
                    return []
                written = write_pieces(self.root, pa.concat_tables(tables), ctx.task_idx)
                if self.counter is not None:  # waited for, so the count is whole when the write ends
                    import ray

                    try:
                        ray.get(self.counter.add.remote(sum(n for s, n in written if s >= 0)))
                    except ray.exceptions.RayError:  # progress is best effort; the rows are written
                        pass
                return written

            def get_name(self) -> str:
                return "ClipscanShards"

        return _Sink(root, counter)


def write_pieces(root: str, table: pa.Table, task: int) -> list[tuple[int, int]]:
    """Rows with ``shard``/``row`` -> one piece per input shard under ``root`` (``ShardSink``'s
    layout); ``task`` names the pieces of rows without a shard. Returns (shard, rows) per piece."""
    import uuid

    import pyarrow.compute as pc

    written = []
    for shard in sorted(set(table.column("shard").to_pylist())):
        piece = table.filter(pc.equal(table.column("shard"), shard)).sort_by("row")
        rows = piece.column("row").to_pylist()
        if shard < 0:
            name = f"shard-unnumbered/task-{task:06d}-{uuid.uuid4().hex[:8]}.parquet"
        else:
            name = f"shard-{shard:05d}/rows-{rows[0]:06d}-{rows[-1]:06d}.parquet"
        cfs.write_parquet_atomic(cfs.join(root, name), piece)
        written.append((int(shard), piece.num_rows))
    return written


def shard_pieces(raw_dir: str) -> dict[str, list[str]]:
    """``{"shard-00003": [piece paths sorted by first row]}`` of what the sink wrote so far."""
    pieces: dict[str, list[str]] = {}
    for path in cfs.list_files(raw_dir, ".parquet"):
        pieces.setdefault(path.rstrip("/").split("/")[-2], []).append(path)
    return {k: sorted(v) for k, v in pieces.items()}


def rows_covered(paths: list[str]) -> set[int]:
    """Row numbers a shard's pieces cover, from their names ``rows-A-B.parquet``."""
    covered: set[int] = set()
    for path in paths:
        stem = path.rsplit("/", 1)[-1][: -len(".parquet")]
        _, first, last = stem.split("-")
        covered.update(range(int(first), int(last) + 1))
    return covered


def complete_shards(raw_dir: str, shard_rows: dict[int, int], keep: set[int] | None = None) -> set[int]:
    """Shards whose pieces under raw_dir cover all their rows: a killed run wrote them whole.

    The pieces of every other shard not in ``keep`` are removed; that shard is computed again
    from scratch.
    """
    done = set()
    for name, paths in shard_pieces(raw_dir).items():
        shard = int(name.split("-")[1]) if name != "shard-unnumbered" else -1
        if shard in shard_rows and len(rows_covered(paths)) == shard_rows[shard]:
            done.add(shard)
        elif shard not in (keep or set()):
            cfs.remove_tree(cfs.join(raw_dir, name))
    return done


def rows_written(raw_dir: str) -> int:
    """Rows the sink has written so far (for progress lines)."""
    return sum(len(rows_covered(v)) for k, v in shard_pieces(raw_dir).items() if k != "shard-unnumbered")


def write_skipped(path: str, part_dirs: list[str]) -> dict[str, int]:
    """Stream every ``skipped/part-*.parquet`` under ``part_dirs`` into one ``skipped.parquet`` at path.

    One part in memory at a time. Returns the count per stage.
    """
    import uuid

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    by_stage: dict[str, int] = {}
    fsys, inner = cfs.resolve(path)
    tmp = inner if cfs.is_uri(path) else f"{inner}.tmp-{uuid.uuid4().hex[:8]}"  # object stores: one upload
    if not cfs.is_uri(path):
        os.makedirs(os.path.dirname(inner), exist_ok=True)
    with cfs.named(path), fsys.open_output_stream(tmp) as out, \
            pq.ParquetWriter(out, SKIPPED_SCHEMA, compression="zstd") as writer:
        for part_dir in part_dirs:
            for part in cfs.list_files(part_dir, ".parquet", recursive=False):
                table = cfs.read_parquet(part).cast(SKIPPED_SCHEMA)
                for stage in table.column("stage").unique().to_pylist():
                    n = int(pc.sum(pc.equal(table.column("stage"), stage)).as_py() or 0)
                    by_stage[stage] = by_stage.get(stage, 0) + n
                writer.write_table(table)
    if tmp != inner:
        os.replace(tmp, inner)
    return dict(sorted(by_stage.items()))


def units(pieces: dict[str, list[str]], shard_rows: dict[int, int], done: set[int] | None = None,
          ) -> list[tuple[str, list[str], int | None]]:
    """The collect step's units: (output part name, the sink's pieces, input shard or None).

    One unit per input shard (``part-NNNNN.parquet``) not in ``done``; rows with no input
    shard (WebDataset read without numbering) give one ``part-uNNNNN`` unit per piece.
    Raises where a shard's pieces do not cover all its ``shard_rows``.
    """
    out: list[tuple[str, list[str], int | None]] = []
    for name in sorted(set(pieces) | {f"shard-{s:05d}" for s in shard_rows}):
        if name == "shard-unnumbered":
            out += [(f"part-u{i:05d}.parquet", [p], None) for i, p in enumerate(pieces[name])]
            continue
        shard = int(name.split("-")[1])
        if shard in (done or set()):
            continue
        paths = pieces.get(name, [])
        if shard in shard_rows and len(rows_covered(paths)) != shard_rows[shard]:
            raise RuntimeError(f"{name}: {len(rows_covered(paths))} of {shard_rows[shard]} rows were written")
        out.append((f"part-{shard:05d}.parquet", paths, shard))
    return out


def each(fn: Callable[..., T], args: list[tuple[Any, ...]], num_cpus: float = 0.5) -> Iterator[T]:
    """``fn(*a)`` for every ``a``, in order: Ray tasks (retried) when Ray is up, all submitted at
    once and their results fetched one at a time, so the caller holds one result at a time."""
    import ray

    if not ray.is_initialized():
        yield from (fn(*a) for a in args)
        return
    task = ray.remote(num_cpus=num_cpus, max_retries=3)(fn)
    refs = [task.remote(*a) for a in args]
    for i in range(len(refs)):
        ref, refs[i] = refs[i], None
        yield ray.get(ref)
        del ref
