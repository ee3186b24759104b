"""The package's shape, checked: one-way dependencies, no cycles, no private names across
modules, no module over the size limit (the redesign's rules, kept by a test)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "rectdiff"
MAX_LINES = 450
#: packages that sit on top of the core: nothing in the core may import them
APPLICATIONS = ("rectdiff.apps", "rectdiff.stable_diffusion", "rectdiff.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for every import of rectdiff inside ``module``
    (function-level imports included)."""
    path = MODULES[module]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = resolve(module, path, node)
            if target.startswith("rectdiff"):
                names = [alias.name for alias in node.names]
                # `from . import forms`: the names are modules
                submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
                found.append((target, names, node.lineno))
                found.extend((sub, [], node.lineno) for sub in submodules)
        elif isinstance(node, ast.Import):
            found.extend(
                (a.name, [], node.lineno) for a in node.names if a.name.startswith("rectdiff")
            )
    return found


def owner(target: str) -> str:
    """The module file that defines ``target`` (a package resolves to its __init__)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def is_application(module: str) -> bool:
    return any(module == app or module.startswith(app + ".") for app in APPLICATIONS)


def test_every_module_is_within_the_size_limit():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    too_big = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not too_big, f"modules over {MAX_LINES} lines: {too_big}"


def test_the_core_never_imports_the_applications():
    offenders = [
        (m, target, line)
        for m in MODULES
        if not is_application(m)
        for target, _, line in imports(m)
        if is_application(target)
    ]
    assert not offenders, offenders


def test_no_private_name_is_imported_from_another_module():
    offenders = [
        (m, target, name, line)
        for m in MODULES
        for target, names, line in imports(m)
        for name in names
        if name.startswith("_") and not name.startswith("__")
    ]
    assert not offenders, offenders


def test_the_module_import_graph_has_no_cycle():
    # top-level imports only: a function-level import runs after every module has loaded
    graph: dict[str, set[str]] = {}
    for m, path in MODULES.items():
        edges = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                target = resolve(m, path, node)
                if target.startswith("rectdiff"):
                    edges.add(owner(target))
                    edges.update(
                        f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES
                    )
        # a package's __init__ importing its own submodules is the package being assembled
        graph[m] = {
            e
            for e in edges
            if e != m and not (e.startswith(m + ".") and MODULES[m].name == "__init__.py")
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt in graph and not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module)
