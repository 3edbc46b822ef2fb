"""The import graph of ``jaxfit`` points one way: no cycles, imports inside functions included.

Each module's imports of other ``jaxfit`` modules are read from its AST (every ``import``
and ``from ... import`` anywhere in the file, so an import hidden inside a function to dodge
a cycle still counts); ``from pkg import name`` counts an edge to ``pkg.name`` when that is
a module, else to ``pkg``.

Packages are nodes: a package's ``__init__`` is the package node, with the edges of its own
imports (its re-exports included). Importing ``a.b.c`` runs ``a/__init__`` and
``a/b/__init__`` first, so an import also counts as an edge to every package above its
target that does not already contain the importer: ``jaxfit.quant.leaves`` importing
``jaxfit.hf.families`` imports the package ``jaxfit.hf`` (and whatever its ``__init__``
imports). That is how an import cycle between packages is seen even when no two files
import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "jaxfit"


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(p, root): p for p in root.rglob("*.py")}


def _parents(module: str) -> list[str]:
    """``"a.b.c"`` -> ``["a", "a.b"]``: the packages whose ``__init__`` runs first."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> {modules of root's package it imports}`` over every import statement,
    plus the packages above each target that the import initialises (see the module
    docstring)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        own = {*_parents(name), name}  # packages already initialised when ``name`` runs
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
                # the deepest module of the package named by the import
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if not t:
                    continue
                for m in (*_parents(t), t):
                    if m in modules and m not in own:
                        graph[name].add(m)
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


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_cycle_through_package_inits_is_seen(tmp_path):
    """The hf <-> quant cycle of commit 48c5d35, in miniature: no two files import each
    other, but ``pkg.hf`` -> ``pkg.hf.load`` -> ``pkg.quant`` -> ``pkg.quant.leaves`` ->
    (importing ``pkg.hf.families`` runs) ``pkg.hf``."""
    files = {
        "__init__.py": "",
        "hf/__init__.py": "from pkg.hf import load\n",
        "hf/load.py": "from pkg.quant import nf4\n",
        "hf/families.py": "",
        "quant/__init__.py": "from pkg.quant import leaves\n",
        "quant/leaves.py": "from pkg.hf import families\n",
        "quant/nf4.py": "",
    }
    for rel, text in files.items():
        (tmp_path / "pkg" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pkg" / rel).write_text(text)
    graph = import_graph(tmp_path / "pkg")
    assert graph["pkg.quant.leaves"] == {"pkg.hf", "pkg.hf.families"}
    assert graph["pkg.hf.load"] == {"pkg.quant", "pkg.quant.nf4"}
    cycle = find_cycle(graph)
    assert cycle is not None and {"pkg.hf", "pkg.quant"} <= set(cycle), cycle


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_quant_imports_nothing_of_hf():
    """Weight formats sit below the checkpoint loader: ``hf`` passes the rules in."""
    graph = import_graph()
    bad = {
        (m, t)
        for m, deps in graph.items()
        if m == "jaxfit.quant" or m.startswith("jaxfit.quant.")
        for t in deps
        if t == "jaxfit.hf" or t.startswith("jaxfit.hf.")
    }
    assert not bad, bad


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


# The floors of docs/DESIGN.md, top (0) to bottom; a module (or package) is on the floor of
# the longest prefix listed, the bottom floor otherwise. config_docs documents the CLIs'
# configs; inference composes the trainer (a workdir), hf and lora for the sampling CLIs.
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
    "jaxfit.inference": 1,
    "jaxfit.trainer": 2,
    "jaxfit.run": 2,  # build_run: the trainer, the planner and the benchmarks call it
    "jaxfit.workdir": 2,
    "jaxfit.tasks": 3,
    "jaxfit.validation": 3,
    "jaxfit.objectives": 4,
    "jaxfit.lora": 5,  # adapters over any weight leaf; PEFT names from hf's family registry
    "jaxfit.optim": 5,  # 8-bit optimizer states are NF4-style quantised (quant.optim8bit)
    "jaxfit.hf": 6,  # checkpoints; picks what to quantise and hands it to quant's formats
    "jaxfit.quant": 7,  # the weight formats: nothing of hf
    "jaxfit.losses": 8,
    "jaxfit.sampling": 8,  # decoding runs a model (its KV cache)
    "jaxfit.models": 9,
}
BOTTOM = 10


def floor(module: str) -> int:
    best = max((p for p in FLOORS if module == p or module.startswith(p + ".")),
               key=len, default=None)  # fmt: skip
    return FLOORS[best] if best else BOTTOM


def test_packages_are_floors_of_their_own():
    floors = [floor(p) for p in ("jaxfit.lora", "jaxfit.hf", "jaxfit.quant")]
    assert floors == sorted(set(floors)), floors  # distinct, lora over hf over quant
    assert floor("jaxfit.losses") < floor("jaxfit.models") < BOTTOM


def test_imports_point_down_the_floors():
    """Every import (function-level ones and the package ``__init__`` s it runs included)
    goes to the module's own floor or a lower one: e.g. nothing on the bottom floor
    (data, evals, sharding, ...) imports a model, and no model imports a loss."""
    graph = import_graph()
    bad = sorted(
        f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
        for m, deps in graph.items()
        for t in deps
        if floor(t) < floor(m)
    )
    assert not bad, "\n".join(bad)
