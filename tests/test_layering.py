"""The house is one-way: every module of moekit imports only from its own floor or below,
and no group of modules imports itself round in a circle.

Imports are read from the source with `ast`, so a lazy import inside a function counts as
much as one at the top (it is still a dependency). ``from package import submodule`` is an
edge to the submodule; ``import a.b.c`` to ``a.b.c`` (the package initialisers Python runs
on the way are not edges: a package's ``__init__`` gathering its own modules is no circle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import moekit

ROOT = Path(moekit.__file__).parent

# The floors, bottom up; a module may import its own floor and those below. The unit of a
# module is its top-level name under moekit (``moekit.io.load`` → ``io``).
FLOORS: list[set[str]] = [
    {"errors", "progress", "devices", "torchrun", "version"},
    {"arch"},
    {"data", "distributed"},
    {"methods", "zoo"},
    {"io"},
    {"calib"},
    {"recipe", "runtime", "eval", "analyze", "build"},
    {"train", "compression", "planning"},
    {"__init__"},  # the public API, `moekit` itself
    {"cli", "__main__"},
]
# Within one floor, different units stay independent unless listed here (lower, higher).
SIDEWAYS_ALLOWED: set[tuple[str, str]] = {
    ("errors", "devices"), ("errors", "progress"), ("cli", "__main__"),
    ("recipe", "runtime"), ("eval", "runtime"), ("recipe", "eval"),
    ("analyze", "eval"), ("build", "eval"), ("build", "recipe"),
    ("planning", "compression"), ("train", "compression"),
}
# arch is the ground floor: torch, transformers and accelerate, moekit's errors, nothing else.
ARCH_MAY_IMPORT = {"arch", "errors"}

FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _resolve(name: str) -> str | None:
    """The moekit module ``name`` refers to (an attribute's module for ``a.b.attr``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            subs = [f"{source}.{a.name}" for a in node.names if f"{source}.{a.name}" in MODULES]
            names = subs + ([source] if len(subs) < len(node.names) else [])
        else:
            continue
        for name in names:
            if name == "moekit" or name.startswith("moekit."):
                target = _resolve(name)
                if target is not None and target != module:
                    out.add(target)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _wrong_way(module: str, target: str) -> bool:
    a, b = _unit(module), _unit(target)
    if a == b:
        return False
    if a == "arch":
        return b not in ARCH_MAY_IMPORT
    if FLOOR[a] != FLOOR[b]:
        return FLOOR[a] < FLOOR[b]
    return (b, a) not in SIDEWAYS_ALLOWED


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_unit_has_a_floor():
    assert {_unit(m) for m in MODULES} <= set(FLOOR), sorted({_unit(m) for m in MODULES} - set(FLOOR))


def test_imports_go_down():
    wrong = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if _wrong_way(m, t))
    assert wrong == [], "imports that go up or sideways:\n" + "\n".join(wrong)


def test_no_import_circles():
    assert _cycles(GRAPH) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The reader finds an import inside a function and resolves a relative one, so the two
    tests above can fail."""
    assert "moekit.io.layered" in GRAPH["moekit.io.load"] or "moekit.io.load" in GRAPH["moekit.io.layered"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _wrong_way("moekit.arch.edit", "moekit.io.load") and not _wrong_way("moekit.io.load", "moekit.arch.edit")
