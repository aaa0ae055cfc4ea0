"""Embed a generated corpus on a three-node Ray cluster, kill a worker node mid-stage, print a JSON result.

    python tests/scripts/lost_node.py --work DIR [--images 400] [--kill-after-rows 32]

Runs the real embedding stage (``clipscan.runner.embed_corpus``) on a
``ray.cluster_utils.Cluster`` (a head and two workers, separate raylets on this
machine). A watcher thread removes the worker node that hosts an encoder actor once
the sink has written some rows and before it has written them all; then a fresh worker
joins, as the autoscaler would add one, and the search stage runs over the embeddings
(its facts say on how many nodes its shard actors ran). Prints one JSON
object on the last line of stdout: the input ids, the ids found in
``embeddings/<model>/*.parquet``, ``skipped.parquet`` and the search's parts, the nodes that ran decode
tasks and encoder actors, and what happened when. tests/test_lost_node.py checks it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="scratch directory (corpus, run directory)")
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--kill-after-rows", type=int, default=32, help="remove the node once this many rows are written")
    parser.add_argument("--no-kill", action="store_true", help="control run: same cluster, no node removed")
    args = parser.parse_args(argv)

    import ray
    import ray.data
    from ray.cluster_utils import Cluster

    from clipscan import fs as cfs
    from clipscan.config import DafConfig, load_config
    from clipscan.data.scenes import write_corpus
    from clipscan.pipeline.cluster import configure_data_context, worker_pool_config
    from clipscan.rundir import Run
    from clipscan.runner import embed_corpus
    from clipscan.stages import rows

    work = Path(args.work)
    manifest = write_corpus(str(work / "corpus"), args.images, seed=5, size=64)
    out = work / "run"
    cfg = load_config(DafConfig, None, [
        f"data.path={manifest}", f"output={out}", "models.probe=open_clip:tiny-clip",
        "models.reference=hf:tiny-dinov2", "data.rows_per_block=16", "embed.image_size=48",
        "embed.batch_size=8", "embed.actors=2", "embed.cpus_per_actor=1", "embed.threads=1",
        "embed.decode_cpus=0.5",
    ])

    # Cluster records its address in <Ray's default temp dir>/ray_current_cluster and fails where
    # that folder is missing (a machine that never ran Ray): give it a fresh one of its own.
    os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="clipscan-rt-")
    os.makedirs(os.path.join(os.environ["RAY_TMPDIR"], "ray"))
    ray_temp = tempfile.mkdtemp(prefix="clipscan-ln-")  # short: Ray's socket paths must fit in 107 bytes
    # The head takes no tasks (num_cpus=0, as on production clusters), so every decode task
    # and encoder actor runs on a worker. Each worker has three CPUs: the two one-CPU
    # encoder actors and the half-CPU decode tasks still fit on one worker after the other
    # is gone.
    node_args = {"object_store_memory": 150 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "temp_dir": ray_temp,
        # notice a dead raylet in about 2 s instead of Ray's default 15 s; nothing else changes
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
                           **worker_pool_config(3)},
        **node_args})
    workers = [cluster.add_node(num_cpus=3, **node_args) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    configure_data_context()

    events: dict[str, Any] = {"nodes_at_start": len([n for n in ray.nodes() if n["Alive"]])}
    raw = str(out / "_rows")
    started = time.perf_counter()
    stop = threading.Event()
    seen_nodes: dict[str, set[str]] = {"decode": set(), "embed": set()}
    read_pieces: set[str] = set()

    def snapshot() -> None:
        """Record the nodes named in the rows written so far (decode_node, embed_node columns)."""
        import pyarrow.parquet as pq

        for paths in rows.shard_pieces(raw).values():
            for path in paths:
                if path in read_pieces:
                    continue
                try:
                    table = pq.read_table(path, columns=["decode_node", "embed_node"])
                except Exception:  # a piece being replaced right now; read it next time
                    continue
                read_pieces.add(path)
                for col in ("decode", "embed"):
                    seen_nodes[col].update(table.column(f"{col}_node").to_pylist())

    def watch() -> None:
        while not stop.wait(0.25):
            snapshot()
            written = rows.rows_written(raw)
            if args.no_kill or "killed_at_rows" in events or written < args.kill_after_rows:
                continue
            # a worker whose encoder actor has written rows: it is busy, so batches are in flight there
            victims = [w for w in workers if w.node_id in seen_nodes["embed"]]
            if not victims:
                continue
            victim = victims[0]
            events.update(killed_at_rows=written, killed_at_s=round(time.perf_counter() - started, 2),
                          killed_node=victim.node_id, killed_ran_embed=True,
                          killed_ran_decode=victim.node_id in seen_nodes["decode"])
            cluster.remove_node(victim, allow_graceful=False)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    run = Run(str(out), "daf", cfg)
    error = None
    try:
        counts = embed_corpus(run, cfg, {"probe": cfg.models.probe, "reference": cfg.models.reference})
    except Exception as e:  # reported, not raised: the test prints what failed
        counts, error = {}, f"{type(e).__name__}: {e}"
    stop.set()
    watcher.join(timeout=5)
    if error is None:
        # The autoscaler would replace the lost node, and here adds one more: three workers search.
        workers += [cluster.add_node(num_cpus=3, **node_args) for _ in range(2)]
        cluster.wait_for_nodes()
        try:
            error = search_and_lose_a_node(cluster, workers, node_args, out, work / "search", events, args.no_kill)
        except Exception as e:
            error = f"search: {type(e).__name__}: {e}"
    events["worker_nodes"] = [w.node_id for w in workers]
    events["head_node"] = cluster.head_node.node_id
    events["wall_s"] = round(time.perf_counter() - started, 2)
    events["nodes_at_end"] = len([n for n in ray.nodes() if n["Alive"]])

    import pyarrow.parquet as pq

    def ids_in(path: Path) -> list[str]:
        if not path.exists():
            return []
        return pq.read_table(path, columns=["id"]).column("id").to_pylist() if path.is_file() else [
            i for f in sorted(path.glob("*.parquet")) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]

    result = {
        "error": error,
        "searched": ids_in(work / "search"),
        "counts": {k: v for k, v in counts.items() if isinstance(v, (int, float, str, dict))},
        "input_ids": pq.read_table(manifest, columns=["id"]).column("id").to_pylist()
        if "id" in pq.read_schema(manifest).names else None,
        "images": args.images,
        "embedded": {m: ids_in(out / "embeddings" / m) for m in ("probe", "reference")},
        "skipped": ids_in(out / "skipped.parquet"),
        "nodes_seen": {k: sorted(v) for k, v in seen_nodes.items()},
        "run_stages": json.loads(cfs.read_bytes(str(out / "run.json"))).get("stages", {}),
        "events": events,
    }
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(ray_temp, ignore_errors=True)
    shutil.rmtree(os.environ["RAY_TMPDIR"], ignore_errors=True)
    print(json.dumps(result))
    return 0


def search_and_lose_a_node(cluster: Any, workers: list[Any], node_args: dict[str, Any], run_dir: Path, out: Path,
                           events: dict[str, Any], no_kill: bool) -> str | None:
    """The search stage over the run's embeddings, one shard actor per worker; once the query
    stream has written its first part, the worker of one shard actor is removed (no drain) and
    a fresh one added, as the autoscaler would for the restarted actor's CPUs."""
    from clipscan.stages.run_search import RunSearch

    failed: list[str] = []

    def write(stage: RunSearch) -> None:
        try:
            stage.write(str(out))
        except Exception as e:  # reported by the caller
            failed.append(f"search: {type(e).__name__}: {e}")

    # small query blocks: the stream writes many parts, so the node goes while most are still to come
    with RunSearch(str(run_dir), where="ray", k=10, query_block=16) as stage:
        events["search"] = dict(stage.facts, shard_nodes=sorted(set(stage.shard_nodes)))
        writer = threading.Thread(target=write, args=(stage,), daemon=True)
        writer.start()
        # Ray adds and removes nodes from the main thread only: the stream runs in the other one
        while not no_kill and writer.is_alive():
            parts = len(list(out.glob("*.parquet")))
            if parts:
                victim = next(w for w in workers if w.node_id in stage.shard_nodes)
                events.update(search_killed_node=victim.node_id, search_killed_at_parts=parts)
                cluster.remove_node(victim, allow_graceful=False)
                workers.append(cluster.add_node(num_cpus=3, **node_args))
                break
            time.sleep(0.1)
        writer.join()
    events["search_parts"] = len(list(out.glob("*.parquet")))
    if not failed:
        events["search_equals_one_process"] = _equals_one_process(run_dir, out)
    return failed[0] if failed else None


def _equals_one_process(run_dir: Path, out: Path) -> bool:
    """The stage's rows, sorted by id, against the same search in this process over one shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipscan.stages.search import SearchBlock, Shard

    def read(path: Path) -> pa.Table:
        return pa.concat_tables([pq.read_table(f) for f in sorted(path.glob("*.parquet"))])

    table = read(run_dir / "embeddings" / "probe").select(["id"])
    for model in ("probe", "reference"):
        table = table.append_column(model, read(run_dir / "embeddings" / model).column("embedding"))
    # rows numbered in the run's part order, as the stage numbers them
    expected = SearchBlock([Shard.from_table(table, 0)], k=10, depth=100)(table).sort_by("id")
    got = read(out).sort_by("id").select(expected.column_names).cast(expected.schema)
    return bool(got.equals(expected))


if __name__ == "__main__":
    sys.exit(main())
