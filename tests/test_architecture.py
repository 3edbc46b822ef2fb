"""The import graph of ``jaxfit`` points one way: no cycles, imports inside functions included.

Each module's imports of other ``jaxfit`` modules are read from its AST (every ``import``
and ``from ... import`` anywhere in the file, so an import hidden inside a function to dodge
a cycle still counts); ``from pkg import name`` counts an edge to ``pkg.name`` when that is
a module, else to ``pkg``. A package's ``__init__`` counts as the package node.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxfit"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """``module -> {jaxfit modules it imports}`` over every import statement in the file."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                # the deepest jaxfit module named by the import
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _without_package_faces(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exporting its submodules is not a layering edge: an
    edge ``pkg.sub -> pkg`` (a submodule using its own package face) would make every
    re-export a cycle, so edges from a package to its own submodules are dropped."""
    return {m: {t for t in deps if not t.startswith(m + ".")} for m, deps in graph.items()}


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(_without_package_faces(import_graph()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_trainer_does_not_import_the_planner():
    graph = import_graph()
    assert not {m for m in graph["jaxfit.trainer"] if m.startswith("jaxfit.plan")}


@pytest.mark.parametrize(
    "low", ["jaxfit.step", "jaxfit.perf", "jaxfit.models.layers", "jaxfit.checkpoint"]
)
def test_low_modules_import_nothing_above_them(low):
    above = ("jaxfit.trainer", "jaxfit.plan", "jaxfit.tasks", "jaxfit.train")
    bad = {m for m in import_graph()[low] if m.startswith(above)}
    assert not bad, f"{low} imports {bad}"


# The floors of docs/DESIGN.md, top (0) to bottom; a module is on the floor of the longest
# prefix listed, the bottom floor otherwise. config_docs documents the CLIs' configs.
FLOORS: dict[str, int] = {
    **dict.fromkeys(
        [
            "jaxfit.train",
            "jaxfit.evaluate",
            "jaxfit.generate",
            "jaxfit.export",
            "jaxfit.quantize",
            "jaxfit.evaluate_code",
            "jaxfit.plan.__main__",
            "jaxfit.cli",
            "jaxfit.config_docs",
        ],
        0,
    ),  # fmt: skip
    "jaxfit.plan": 1,
    "jaxfit.trainer": 2,
    "jaxfit.run": 2,  # build_run: the trainer, the planner and the benchmarks call it
    "jaxfit.workdir": 2,
    "jaxfit.tasks": 3,
    "jaxfit.validation": 3,
    "jaxfit.objectives": 4,
    "jaxfit.hf": 5,
    "jaxfit.lora": 5,
    "jaxfit.quant": 5,
    "jaxfit.optim": 5,  # 8-bit optimizer states are NF4-style quantised (quant.optim8bit)
}
BOTTOM = 6


def floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")),
               key=len, default=None)  # fmt: skip
    return FLOORS[best] if best else BOTTOM


def test_imports_point_down_the_floors():
    """Every import (function-level ones included) goes to the module's own floor or a
    lower one: e.g. nothing on the bottom floor (models, data, evals, ...) imports a CLI."""
    graph = _without_package_faces(import_graph())
    bad = sorted(
        f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
        for m, deps in graph.items()
        for t in deps
        if floor(t) < floor(m)
    )
    assert not bad, "\n".join(bad)
