"""The import arrows of the project's packages point one way (read from the source with `ast`, nothing imported).

Behaviours pinned:
- inside each package (protocol, actors, cache, learner, opd) the module import graph has no cycle: a phase
  module takes the state it needs and never imports the loop that drives it (STYLE.md item 13). Imports under
  `if TYPE_CHECKING:` and inside functions count too: a cycle hidden there is still a cycle in the design.
  Reproduces the cycles of issue 16: `learner.loop` <-> `learner.intake` / `learner.resume` /
  `learner.stopping`, and `cache.cli` <-> `cache.warm` (both failed this test before the fix);
- packages depend one way: opd -> roles (actors, cache, learner) -> protocol. A role never imports another
  role nor opd; protocol imports no role and not opd.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL, ROLES, OPD = "protocol", ("actors", "cache", "learner"), "opd"
PACKAGES = (PROTOCOL, *ROLES, OPD)
# What each package may import of the project's packages (besides itself).
MAY_IMPORT = {PROTOCOL: set(), **{role: {PROTOCOL} for role in ROLES}, OPD: {PROTOCOL, *ROLES}}


def module_files(package: str) -> dict[str, Path]:
    """Every module of `package`, by dotted name (a package's `__init__.py` under the package's name)."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


ALL_MODULES = {name: path for package in PACKAGES for name, path in module_files(package).items()}


def imported(module: str, path: Path) -> Iterator[tuple[str, int]]:
    """The project modules `module` imports, with the line: `from a.b import c` names `a.b.c` when that is a module."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in ALL_MODULES else base), node.lineno


def graph(package: str) -> dict[str, dict[str, int]]:
    """Edges between the modules of one package: importer -> {imported module: line}."""
    modules = module_files(package)
    edges: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        for target, line in imported(name, path):
            if target in modules and target != name and not name.startswith(f"{target}."):
                # a submodule importing its own package's __init__ is how a package re-exports; not a cycle here
                edges[name].setdefault(target, line)
    return edges


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search, colours)."""
    colour: dict[str, int] = dict.fromkeys(edges, 0)  # 0 unseen, 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, {})):
            if colour.get(nxt, 2) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if colour.get(nxt) == 0 and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for start in sorted(edges):
        if colour[start] == 0 and (found := visit(start)):
            return found
    return None


def test_find_cycle_finds_one() -> None:
    """The checker itself can fail: a two-module and a three-module cycle are found, a chain is not."""
    assert find_cycle({"a": {"b": 1}, "b": {"a": 2}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) is None


def test_submodule_imports_are_edges() -> None:
    """`from pkg import mod` is an edge to the module `pkg.mod` (how the loop imports its phases)."""
    edges = graph("learner")
    assert "learner.resume" in edges["learner.loop"] and "learner.stopping" in edges["learner.loop"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_inside_a_package(package: str) -> None:
    edges = graph(package)
    cycle = find_cycle(edges)
    if cycle:
        where = ", ".join(f"{a} imports {b} (line {edges[a][b]})" for a, b in pairwise(cycle))
        pytest.fail(f"import cycle in {package}/: {' -> '.join(cycle)}: {where}; a phase takes the state it needs "
                    "(a typed object or a narrow Protocol) and does not import its caller back")


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_depend_one_way(package: str) -> None:
    wrong = []
    for name, path in module_files(package).items():
        for target, line in imported(name, path):
            top = target.split(".")[0]
            if top in PACKAGES and top != package and top not in MAY_IMPORT[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not wrong, (f"{package} may import only {sorted(MAY_IMPORT[package]) or 'none of the project packages'} "
                       f"(opd -> roles -> protocol; a role never imports another role): " + "; ".join(wrong))
