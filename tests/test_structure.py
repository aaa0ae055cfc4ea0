"""The package's shape: no module imports another that (directly or not) imports it back,
counting imports inside functions too (a lazy import hides a circle, it does not remove it)."""

from __future__ import annotations

import ast

from tests.conftest import ROOT


def module_imports() -> dict[str, set[str]]:
    package = ROOT / "clipscan"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    graph = module_imports()
    assert "clipscan.stages.mine" in graph and "clipscan.pipeline.executor" in graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_stages_do_not_import_the_job_modules() -> None:
    """Stage modules are the jobs' parts: none reaches into a job (``clipscan.daf``, ``clipscan.tcac``...)."""
    graph = module_imports()
    jobs = {"clipscan.daf", "clipscan.tcac", "clipscan.bias", "clipscan.runner"}
    offenders = {m: graph[m] & jobs for m in graph if m.startswith("clipscan.stages") and graph[m] & jobs}
    assert offenders == {}
