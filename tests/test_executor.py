"""The two executors run a stage's per-part function the same way: results in the order of
the arguments, whichever process ran each call."""

from __future__ import annotations

import numpy as np

from clipscan.pipeline.executor import Local, RayTasks, for_rows


def _part(i: int, table: np.ndarray, scale: float) -> tuple[float, int]:
    import os

    return float(table[i].sum() * scale), os.getpid()


def test_local_and_ray_give_the_same_results_in_order(ray_local: None) -> None:
    big = np.arange(50_000, dtype=np.float64).reshape(100, 500)  # 400 KB: put in the object store once
    args = [(i, big, 0.5) for i in range(40)]
    local = list(Local().map(_part, args))
    ray_results = list(RayTasks(in_flight=3).map(_part, args))
    assert [r[0] for r in local] == [r[0] for r in ray_results] == [float(big[i].sum() * 0.5) for i in range(40)]
    import os

    assert {r[1] for r in local} == {os.getpid()} and os.getpid() not in {r[1] for r in ray_results}


def test_for_rows_picks_this_process_below_the_threshold() -> None:
    assert for_rows(99, 100).name == "local" and for_rows(100, 100).name == "ray"
