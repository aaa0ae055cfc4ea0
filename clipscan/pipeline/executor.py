"""A stage's per-part function and its arguments in; its results out, in order, from this process or from Ray tasks.

A stage that works part by part (a Parquet part of the run, a block of rows) is written
once as a plain function; the executor decides where each call runs. ``Local`` calls it
here, one part after another: the job's own process for small corpora and the tests'
twin. ``RayTasks`` runs each call as a Ray task (retried where a node is lost) with a
bounded number in flight, so the driver holds a window of results, never one per part.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Executor(Protocol):
    name: str

    def map(self, fn: Callable[..., T], args: Iterable[tuple[Any, ...]]) -> Iterator[T]:
        """``fn(*a)`` for every ``a`` of ``args``, results in the order of ``args``."""
        ...


class Local:
    """Every call in this process, one after another."""

    name = "local"

    def map(self, fn: Callable[..., T], args: Iterable[tuple[Any, ...]]) -> Iterator[T]:
        for a in args:
            yield fn(*a)


# Arguments at least this large (a table's or an array's nbytes) are put in the object store once.
SHARED_BYTES = 1 << 16


class RayTasks:
    """Every call a Ray task of ``num_cpus``; at most ``in_flight`` submitted and not yet taken."""

    name = "ray"

    def __init__(self, num_cpus: float = 0.5, in_flight: int = 16, max_retries: int = 3) -> None:
        self.num_cpus, self.in_flight, self.max_retries = num_cpus, max(1, in_flight), max_retries

    def map(self, fn: Callable[..., T], args: Iterable[tuple[Any, ...]]) -> Iterator[T]:
        import ray

        task = ray.remote(num_cpus=self.num_cpus, max_retries=self.max_retries)(fn)
        pending: deque[Any] = deque()
        shared: dict[int, tuple[Any, Any]] = {}  # an argument every call shares goes to the object store once
        for a in args:
            pending.append(task.remote(*(self._shared(v, shared, ray) for v in a)))
            if len(pending) >= self.in_flight:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())

    @staticmethod
    def _shared(value: Any, shared: dict[int, tuple[Any, Any]], ray: Any) -> Any:
        """A large table or array as one object-store reference for every call that passes it."""
        nbytes = getattr(value, "nbytes", 0)
        if not isinstance(nbytes, int) or nbytes < SHARED_BYTES:
            return value
        if id(value) not in shared:
            shared[id(value)] = (value, ray.put(value))  # the value is kept so its id is not reused
        return shared[id(value)][1]


def for_rows(rows: int, stage_min_rows: int) -> Executor:
    """``Local`` below ``stage_min_rows`` rows (Ray's fixed cost per task would be most of
    the time), else ``RayTasks``."""
    return Local() if rows < stage_min_rows else RayTasks()
