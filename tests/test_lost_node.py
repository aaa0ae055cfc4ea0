"""A worker node lost while the embedding stage runs, and another while the search runs:
every row still embedded, and searched, exactly once.

The cluster (``ray.cluster_utils.Cluster``: a head and two workers, each its own raylet)
runs in a subprocess, tests/scripts/lost_node.py, so that it has its own Ray and not the
session's ``ray_local``. The script removes the worker that hosts an encoder actor after
the first rows are written (no graceful drain: its processes are killed), adds a fresh
worker as an autoscaler would and one more, runs the exact neighbour search over the
embeddings with a shard actor on each of the three workers, removes the worker of one
shard actor once the query stream has written its first part, and prints what it found
as JSON.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 320


@pytest.mark.slow
def test_lost_worker_node_loses_and_duplicates_no_row(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "lost_node.py"), "--work", str(tmp_path),
         "--images", str(IMAGES), "--kill-after-rows", "32"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result["error"] + "\n" + proc.stderr[-4000:]

    events = result["events"]
    assert events["nodes_at_start"] == 3 and events["nodes_at_end"] == 4  # head + 3 workers: two lost, three added
    assert "killed_at_rows" in events, "the watcher never removed a node"
    assert events["killed_at_rows"] < IMAGES, f"the node went only after the stage had written every row: {events}"
    assert events["killed_ran_embed"], f"the removed node ran no encoder actor: {events}"

    inputs = result["input_ids"]
    assert len(inputs) == len(set(inputs)) == IMAGES
    for model, ids in result["embedded"].items():
        seen = collections.Counter(ids + result["skipped"])
        duplicated = sorted(i for i, n in seen.items() if n > 1)
        missing = sorted(set(inputs) - set(seen))
        assert not duplicated, f"{model}: {len(duplicated)} ids written twice, e.g. {duplicated[:5]}"
        assert not missing, f"{model}: {len(missing)} ids lost, e.g. {missing[:5]}"
        assert set(seen) == set(inputs)
    assert result["counts"]["read"] == IMAGES == result["counts"]["embedded"] + result["counts"]["skipped"]

    # work spread: encoder actors ran on more than one node
    nodes = result["nodes_seen"]
    # (decode tasks are short; the scheduler may keep them all on one node)
    assert len(nodes["embed"]) > 1 and len(nodes["decode"]) >= 1, nodes
    assert events["killed_node"] in nodes["embed"]

    # the search: one shard actor on each of three workers, one of them removed mid-stream
    search = events["search"]
    assert search["nodes"] == 3 == len(search["shard_nodes"]), search
    assert events["search_killed_node"] in search["shard_nodes"], events
    assert events["search_killed_at_parts"] < events["search_parts"], events  # it went with parts still to come
    searched = collections.Counter(result["searched"])
    embedded = set(result["embedded"]["probe"])
    assert not [i for i, n in searched.items() if n > 1], "rows searched twice"
    assert set(searched) == embedded, f"{len(embedded - set(searched))} rows lost by the search"
    assert events["search_equals_one_process"], "the rows differ from one shard searched in one process"
    recorded = result["run_stages"]["embed"].get("nodes")
    if recorded:  # run.json's per-stage node counts
        assert all(n > 1 for n in recorded.values()), recorded
