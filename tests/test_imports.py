"""The house: kvlab's imports run one way, with no cycle (type-only imports included).

Layers, bottom to top (``../shared/STYLE.md``): errors -> registry -> engine primitives and the
stage contracts -> the methods -> engine dispatch and sessions -> bench -> cli. A module imports
only from its own layer or below; the import graph has no cycle; no stage package imports
``kvlab.bench`` or ``kvlab.cli``. Read with :mod:`ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "kvlab"
STAGES = ("position", "prefill", "compress", "quantize", "retrieve")

PRIMITIVES = {
    "kvlab.engine.cache", "kvlab.engine.ragged", "kvlab.engine.rotary", "kvlab.engine.kernels",
    "kvlab.engine.workspace",
    "kvlab.engine.context", "kvlab.engine.progress", "kvlab.engine.prompt", "kvlab.engine.calibration",
    "kvlab.engine.sampling", "kvlab.engine.loading", "kvlab.corpus", "kvlab.recipe",
    "kvlab.compress.decoding", *(f"kvlab.{stage}.base" for stage in STAGES), "kvlab.reuse.base",
}
REUSE_METHODS = {"kvlab.reuse.ape"}
"""The reuse stage's methods (the rest of ``kvlab.reuse``, the sessions, is dispatch)."""
DISPATCH = {
    "kvlab", "kvlab.engine", "kvlab.engine.sequence", "kvlab.engine.forward",
    "kvlab.engine.attention", "kvlab.engine.results", "kvlab.engine.engine",
}
LAYERS = ("errors", "registry", "primitives", "methods", "dispatch", "bench", "cli")


def layer_of(module: str) -> str:
    if module == "kvlab.errors":
        return "errors"
    if module == "kvlab.registry":
        return "registry"
    if module in PRIMITIVES:
        return "primitives"
    if (module.split(".")[1:2] and module.split(".")[1] in STAGES) or module in REUSE_METHODS:
        return "methods"
    if module in DISPATCH or module.startswith("kvlab.reuse"):
        return "dispatch"
    if module.startswith("kvlab.bench"):
        return "bench"
    if module.startswith(("kvlab.cli", "kvlab.server")):
        return "cli"
    raise AssertionError(f"{module} has no layer: add it to tests/test_imports.py")


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the kvlab modules it imports (at any depth of its code, TYPE_CHECKING too).
    An import of a package's ``__init__`` counts only where the package is imported itself."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("kvlab"):
                    target = resolve(name)
                    if target and target != module:
                        graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


GRAPH = import_graph()


def test_there_is_no_import_cycle():
    assert cycles(GRAPH) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["kvlab.engine.cache"].add("kvlab.compress.base")  # compress.base imports cache
    assert any({"kvlab.engine.cache", "kvlab.compress.base"} <= set(c) for c in cycles(planted))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_run_downwards(module):
    here = LAYERS.index(layer_of(module))
    upward = [t for t in sorted(GRAPH[module]) if LAYERS.index(layer_of(t)) > here]
    assert upward == [], f"{module} ({LAYERS[here]}) imports from a higher layer: {upward}"


def test_no_stage_package_imports_the_harness_or_the_cli():
    bad = [
        f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
        if m.split(".")[1:2] and m.split(".")[1] in STAGES
        and t.startswith(("kvlab.bench", "kvlab.cli"))
    ]
    assert bad == []
