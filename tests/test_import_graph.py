"""The packages depend one way only, and no module imports itself back through others.

Every import in the source is read with `ast` (module-level and function-level alike: an
import inside a function is still a dependency), resolved to the repository's own modules, and
checked against the layering documented in docs/architecture.md:

    audit  <  consent  <  federated  <  exchange (shared)  <  exchange.study
           <  exchange.coordinator, exchange.node  <  exchange.study.lifecycle
           <  the coordinator's HTTP layer  <  exchange.demo  <  exchange.commands
           <  exchange.cli

(`exchange`'s shared modules are settings, logging, db, http_signing and text_safety; each database's
migrations belong to the package whose tables they create. `exchange.study` holds what the
node shares with the coordinator (the study's translation, its tables, the runners); its
`lifecycle` (and the privacy `reports`) run on the coordinator's journal and registry, and the
coordinator's controllers, app and console call them.)
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("audit", "consent", "federated", "exchange")

#: Rank of each layer: a module may import only from layers of lower or equal rank
#: (equal: within the same layer; cycles are checked separately).
LAYERS: tuple[tuple[str, str, int], ...] = (  # (module prefix, layer, rank): longest prefix first
    ("audit", "audit", 0),
    ("consent", "consent", 1),
    ("federated", "federated", 2),
    ("exchange.study.lifecycle", "exchange.study.lifecycle", 6),
    ("exchange.study.reports", "exchange.study.lifecycle", 6),  # reads through the journal
    ("exchange.study", "exchange.study", 4),
    ("exchange.migrations.coordinator", "exchange.coordinator", 5),
    ("exchange.migrations.node", "exchange.node", 5),
    ("exchange.coordinator.controllers", "exchange.coordinator.http", 7),
    ("exchange.coordinator.app", "exchange.coordinator.http", 7),
    ("exchange.coordinator", "exchange.coordinator", 5),
    ("exchange.console", "exchange.coordinator.http", 7),  # the web console, served by the app
    ("exchange.node", "exchange.node", 5),
    ("exchange.demo", "exchange.demo", 8),
    ("exchange.commands", "exchange.commands", 9),
    ("exchange.cli", "exchange.cli", 10),
    ("exchange", "exchange", 3),
)
#: Imports between two packages of the same rank that are allowed (one direction only).
SIBLING_EDGES = {("exchange.node", "exchange.coordinator")}  # the node is the coordinator's client


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The repository module `name` refers to (a module, or a name inside one), else None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(module: str) -> tuple[str, int]:
    for prefix, layer, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer, rank
    raise AssertionError(f"{module} is in no layer")


def _parents(module: str) -> set[str]:
    """A package's __init__ is imported with any of its modules: not a dependency edge."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_upward_imports() -> None:
    upward = []
    for module, targets in _graph().items():
        layer, rank = _layer(module)
        for target in targets - _parents(module):
            other, other_rank = _layer(target)
            if other_rank > rank or (
                other_rank == rank and other != layer and (layer, other) not in SIBLING_EDGES
            ):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = _graph()
    graph = {m: {t for t in targets if t not in _parents(m)} for m, targets in graph.items()}
    # Tarjan's strongly connected components, iteratively.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
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
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_walk_sees_function_level_imports() -> None:
    """The checks above would be empty if imports inside functions were missed."""
    graph = _graph()
    assert "exchange.demo.collect" in graph["exchange.demo.consortium"]  # imported in a method
    assert "exchange.study.spec" in graph["exchange.study.lifecycle"]
    assert defaultdict(set, graph)["exchange.cli"]
