"""The comment of every config field, read from the source that sets it (for ``--help``).

Config files follow the Flax-examples habit of a comment above (or after) each field
(``c.optim.lr = 6e-4  # nanoGPT ...``); shared defaults come from functions such as
``jaxfit.optim.default_optim_config`` (``cfg.lr = 1e-5`` under ``# Peak learning rate``).
:func:`field_comments` walks ``get_config`` with :mod:`ast` and :mod:`tokenize`, follows
``c.optim = default_optim_config()`` into the helper (prefixing its fields with
``optim.``), calls that pass the config on (``run_rhythm(c, ...)``, ``_demo(c)``) and
configs built on a sibling file (``sibling_config(__file__, "llama_finetune.py")``),
and maps each dotted field to its comment. The config file is read, not run (the jaxfit
modules it imports names from are imported, to find the helpers' source).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import io
import re
import tokenize
from pathlib import Path
from typing import Any

# Priorities of a comment's origin (lower wins): unconditional statements of a config file's
# get_config, then the shared defaults' own comments, then anything conditional (a demo
# branch's comment describes the demo's value).
_DIRECT, _HELPER, _CONDITIONAL = 0, 1, 2


class _Source:
    """A parsed file: its AST, comments by line, and its module's globals (for names)."""

    def __init__(self, path: Path, namespace: dict[str, Any]):
        self.path = path
        text = path.read_text(encoding="utf-8")
        self.tree = ast.parse(text)
        self.lines = text.splitlines()
        self.trailing: dict[int, str] = {}
        self.full_line: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type != tokenize.COMMENT:
                continue
            line = tok.start[0]
            body = tok.string.lstrip("#").strip().strip("-").strip()
            if self.lines[line - 1][: tok.start[1]].strip():
                self.trailing[line] = body
            else:
                self.full_line[line] = body
        self.namespace = namespace
        self.functions = {
            node.name: node for node in self.tree.body if isinstance(node, ast.FunctionDef)
        }

    def comment(self, node: ast.AST) -> str:
        """The trailing comment of ``node``'s lines, else the comment block right above."""
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1):
            if line in self.trailing:
                return self.trailing[line]
        block, line = [], node.lineno - 1
        while line in self.full_line:
            block.insert(0, self.full_line[line])
            line -= 1
        return " ".join(b for b in block if b)


def _chain(node: ast.AST) -> list[str] | None:
    """``["c", "optim", "lr"]`` for ``c.optim.lr``; ``None`` for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.insert(0, node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *parts]
    return None


class _Collector:
    def __init__(self):
        self.found: dict[str, tuple[int, str]] = {}
        self.sources: dict[Path, _Source] = {}
        self.visited: set[tuple[Path, str, str]] = set()

    def add(self, path: str, comment: str, priority: int) -> None:
        if comment and (path not in self.found or priority < self.found[path][0]):
            self.found[path] = (priority, comment)

    def source_of(self, path: Path, namespace: dict[str, Any]) -> _Source:
        if path not in self.sources:
            self.sources[path] = _Source(path, namespace)
        return self.sources[path]

    def function(
        self, src: _Source, name: str, roots: dict[str, str], priority: int, result: str = ""
    ) -> None:
        """Record the fields function ``name`` of ``src`` sets on the variables of
        ``roots`` (``{variable: dotted prefix}``) and on the variable it returns (whose
        fields land under ``result``), with their comments."""
        key = (src.path, name, repr(sorted(roots.items())), result)
        if name not in src.functions or key in self.visited:
            return
        self.visited.add(key)
        fn = src.functions[name]
        roots = dict(roots)
        for node in ast.walk(fn):
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Name):
                roots.setdefault(node.value.id, result)
        self._body(src, fn.body, roots, priority)

    def _body(self, src: _Source, body: list[ast.stmt], roots: dict[str, str], priority: int):
        for stmt in body:
            if isinstance(stmt, ast.If | ast.For | ast.With | ast.While | ast.Try):
                for block in ("body", "orelse", "finalbody"):
                    self._body(src, getattr(stmt, block, []), roots, _CONDITIONAL)
                for handler in getattr(stmt, "handlers", []):
                    self._body(src, handler.body, roots, _CONDITIONAL)
            elif isinstance(stmt, ast.Assign | ast.AnnAssign):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for target in targets:
                    self._assign(src, stmt, target, roots, priority)
            elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                self._call(src, stmt.value, roots, priority)

    def _assign(self, src: _Source, stmt, target, roots, priority) -> None:
        chain = _chain(target)
        value = stmt.value
        if chain is None:
            return
        if len(chain) == 1:  # c = other_config.get_config(...): c becomes a root
            if isinstance(value, ast.Call) and chain[0] not in roots:
                roots[chain[0]] = ""
            return
        if chain[0] not in roots:
            return
        path = ".".join(filter(None, [roots[chain[0]], *chain[1:]]))
        self.add(path, src.comment(stmt), priority)
        if isinstance(value, ast.Call):
            self._keywords(src, value, path, priority)
            callee = self._resolve(src, value.func)
            if callee is not None:
                self.function(*callee, {}, _HELPER, result=path)

    def _keywords(self, src: _Source, call: ast.Call, path: str, priority: int) -> None:
        """``ConfigDict(dict(a=1,  # comment``: fields ``path.a``."""
        for kw in call.keywords:
            if kw.arg is not None:
                self.add(f"{path}.{kw.arg}", src.trailing.get(kw.value.lineno, ""), priority)
        for arg in call.args:
            if isinstance(arg, ast.Call):
                self._keywords(src, arg, path, priority)

    def _call(self, src: _Source, call: ast.Call, roots, priority) -> None:
        chain = _chain(call.func)
        if chain and chain[-1] == "update" and chain[0] in roots:  # c.model.update(a=1)
            path = ".".join(filter(None, [roots[chain[0]], *chain[1:-1]]))
            self._keywords(src, call, path, priority)
            return
        callee = self._resolve(src, call.func)
        if callee is None:
            return
        fn_src, name = callee
        params = [a.arg for a in fn_src.functions[name].args.args]
        passed = {}
        for param, arg in zip(params, call.args, strict=False):
            if isinstance(arg, ast.Name) and arg.id in roots:
                passed[param] = roots[arg.id]
        if passed:  # run_rhythm(c, ...), _demo(c, ...)
            self.function(fn_src, name, passed, _HELPER if fn_src is not src else priority)

    def _resolve(self, src: _Source, func: ast.AST) -> tuple[_Source, str] | None:
        """The source and name of a called function defined in a readable file."""
        if not isinstance(func, ast.Name):
            return None
        if func.id in src.functions:
            return src, func.id
        obj = src.namespace.get(func.id, getattr(builtins, func.id, None))
        if not inspect.isfunction(obj):
            return None
        try:
            path = Path(inspect.getsourcefile(obj) or "")
        except TypeError:
            return None
        if not path.is_file() or "site-packages" in path.parts:
            return None
        module = importlib.import_module(obj.__module__)
        fn_src = self.source_of(path, vars(module))
        return (fn_src, obj.__name__) if obj.__name__ in fn_src.functions else None


def _namespace(path: Path) -> dict[str, Any]:
    """The names a config file imports (``from jaxfit.optim import default_optim_config``),
    resolved by importing those modules; the config file itself is not run."""
    names: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                continue
            for alias in node.names:
                if hasattr(module, alias.name):
                    names[alias.asname or alias.name] = getattr(module, alias.name)
    return names


# How a config builds on another beside it: ``sibling_config(__file__, "x.py", ...)`` or
# ``Path(__file__).with_name("x.py")``.
_SIBLING = r"""(?:sibling_config\(\s*__file__\s*,|with_name\()\s*["']([\w.]+\.py)["']"""


def field_comments(config_file: str | Path) -> dict[str, str]:
    """``{dotted field: comment}`` for the fields ``config_file``'s ``get_config`` sets.

    Follows helper functions imported from readable (non-site-packages) modules and
    configs built on sibling files (``sibling_config(__file__, "x.py")``, transitively;
    their comments rank below the file's own); a field without a comment anywhere is
    absent. Raises ``OSError`` / ``SyntaxError`` for an unreadable file.
    """
    path = Path(config_file)
    files = [path]
    for file in files:  # grows: siblings of siblings (llama3_8b_qlora -> llama_qlora -> ...)
        siblings = re.findall(_SIBLING, file.read_text())
        files += [
            file.with_name(s)
            for s in siblings
            if file.with_name(s).is_file() and file.with_name(s) not in files
        ]
    out = _Collector()
    for i, file in enumerate(files):
        src = out.source_of(file, _namespace(file))
        out.function(src, "get_config", {}, _DIRECT if i == 0 else _HELPER)
    return {k: comment for k, (_, comment) in out.found.items()}


def flatten(config) -> dict[str, Any]:
    """``{dotted path: value}`` of a ``ConfigDict`` (leaves only, in insertion order)."""
    out: dict[str, Any] = {}

    def walk(node, prefix):
        for key, value in node.items():
            path = f"{prefix}{key}"
            if hasattr(value, "items") and not isinstance(value, dict | str):
                walk(value, path + ".")
            else:
                out[path] = value

    walk(config, "")
    return out


_ABBREVIATIONS = ("al", "e.g", "i.e", "incl", "cf", "vs", "etc", "Fig", "Eq", "approx")


def one_line(comment: str, width: int = 96) -> str:
    """The first sentence of ``comment`` (two when the first is a mere heading such as
    ``"Source."``), cut to ``width`` characters at a word."""
    ends = [
        m.start()
        for m in re.finditer(r"\.\s+(?=[A-Z\"'(])", comment)
        if not comment[: m.start()].endswith(_ABBREVIATIONS)
    ]
    text = comment
    for end in ends:
        if end >= 16:
            text = comment[:end]
            break
    text = text.rstrip(".")
    if len(text) <= width:
        return text
    return text[: width - 3].rsplit(" ", 1)[0] + "..."


def describe(config, config_file: str | Path | None = None, *, width: int = 120) -> str:
    """The fields of ``config`` as lines ``path = default  # comment`` of at most about
    ``width`` characters (for ``--help``); a group with a comment of its own (``optim``)
    gets it as a heading. Fields are in alphabetical order."""
    comments = {}
    if config_file:
        try:
            comments = field_comments(config_file)
        except (OSError, SyntaxError, UnicodeDecodeError):
            comments = {}
    rows = []
    for path, value in flatten(config).items():
        text = f"{path} = {value!r}"
        rows.append((path, text if len(text) <= 60 else text[:56] + " ..."))
    pad = min(max((len(text) for _, text in rows), default=0), 44)
    room = max(width - pad - 6, 40)
    lines, groups = [], set()
    for path, text in rows:
        parts = path.split(".")
        for depth in range(1, len(parts)):
            group = ".".join(parts[:depth])
            if group not in groups:
                groups.add(group)
                if comments.get(group):
                    lines.append(f"  # {group}: {one_line(comments[group], width - 8)}")
        comment = comments.get(path, "")
        if not comment:
            lines.append(f"  {text}")
        elif len(text) > pad:
            lines.append(f"  {text}\n  {'':{pad}}  # {one_line(comment, room)}")
        else:
            lines.append(f"  {text:{pad}}  # {one_line(comment, room)}")
    return "\n".join(lines)
