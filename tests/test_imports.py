"""The package's import graph has no cycle (STYLE.md: imports run one way).

Every module of spmd_moe is parsed (ast), and every import counts, those inside functions
included: a function-level import is how a cycle hides until the function runs. Importing
``a.b.c`` also runs the package ``a.b``'s ``__init__``; that implicit edge is not counted
(a package importing its own submodules is no cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

import spmd_moe

PACKAGE = Path(spmd_moe.__file__).parent


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` (its source at ``path``) imports, anywhere in it."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                # ``from . import kernels`` imports a module; ``from .x import f`` a name of x
                full = f"{target}.{alias.name}"
                found.add(full if full in modules else target)
    return {module for module in found if module in modules and module != name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = module_files(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path back to its start) per strongly connected component of more than
    one module, or of one that imports itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        # Iterative: the graph is small, but recursion limits are not ours to spend.
        work = [(node, iter(sorted(graph[node])))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[current] = min(low[current], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[current])
                if low[current] == index[current]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == current:
                            break
                    if len(component) > 1 or current in graph[current]:
                        components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(component, graph) for component in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A path start -> ... -> start inside one strongly connected component."""
    members, start = set(component), component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 30 and "spmd_moe.backend.kernels.fused" in graph
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The checker itself: a cycle through a function-level import, a ``from . import``
    and a parent-relative import inside a subpackage is found and named."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from .high import g\n")
    (package / "high.py").write_text("from . import sub\n")
    (package / "sub" / "__init__.py").write_text("from .leaf import h\n")
    (package / "sub" / "leaf.py").write_text("from ..low import f\n")
    (package / "alone.py").write_text("import os\nfrom .low import f\n")
    graph = import_graph(package)
    assert graph["pkg.low"] == {"pkg.high"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"} and graph["pkg.sub.leaf"] == {"pkg.low"}
    assert cycles(graph) == [["pkg.high", "pkg.sub", "pkg.sub.leaf", "pkg.low", "pkg.high"]]


def test_commands_take_shared_options_from_below():
    """bench, compare, generate and plot import no other command module (cli imports them)."""
    graph = import_graph()
    commands = {"spmd_moe.commands.cli", "spmd_moe.commands.bench", "spmd_moe.commands.compare",
                "spmd_moe.commands.generate", "spmd_moe.commands.plot"}
    for command in commands - {"spmd_moe.commands.cli"}:
        if command in graph:
            assert not graph[command] & commands, (command, graph[command] & commands)
    assert "spmd_moe.commands.options" in graph
    assert not graph["spmd_moe.commands.options"] & commands


# The floors of the package, lowest first (docs/ARCHITECTURE.md's first table). A module
# imports only modules of its own floor or of floors below it.
FLOORS = ("core", "backend", "parallel", "model", "moe", "engine", "perf", "commands", "tools")


def floor_of(module: str) -> int | None:
    """The floor index of ``spmd_moe.<floor>...`` (None for the package root modules)."""
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((module, target) for module, targets in graph.items()
                  for target in targets
                  if floor_of(module) is not None and floor_of(target) is not None
                  and floor_of(target) > floor_of(module))


def test_every_module_lives_on_a_floor():
    """Only the package's own __init__ and __main__ sit outside the floors."""
    graph = import_graph()
    loose = sorted(m for m in graph if floor_of(m) is None)
    assert loose == ["spmd_moe", "spmd_moe.__main__"], loose
    assert {m.split(".")[1] for m in graph if floor_of(m) is not None} == set(FLOORS)


def test_no_floor_imports_a_higher_one():
    found = upward_imports(import_graph())
    assert not found, "upward imports: " + "; ".join(f"{a} -> {b}" for a, b in found)


def test_the_floor_check_names_an_upward_import():
    graph = {"spmd_moe.core.config": {"spmd_moe.engine.runner"},
             "spmd_moe.engine.runner": {"spmd_moe.core.config"}}
    assert upward_imports(graph) == [("spmd_moe.core.config", "spmd_moe.engine.runner")]
