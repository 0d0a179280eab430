"""Imports point down only (DESIGN.md): the core imports neither training, retrieval nor the demo, not even
inside a function, and training and retrieval never import each other.

Read from the source with `ast`, so an import inside a function that no test calls is found too. The CLI
dispatcher names training and retrieval as "module:function" strings; a string is not an import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> the top-level packages no module under it may import
FORBIDDEN = {
    "vlm": ("training", "retrieval", "demo"),
    "training": ("retrieval", "demo"),
    "retrieval": ("training", "demo"),
}
_IMPORT_FUNCTIONS = ("import_module", "__import__")


def _absolute(name: str, level: int, package: tuple[str, ...]) -> str:
    """`name` imported with `level` leading dots by a module of `package`, as an absolute module name."""
    if level == 0:
        return name
    base = package[: len(package) - level + 1]
    return ".".join([*base, name] if name else base)


def _literal_import(node: ast.AST) -> str | None:
    """The literal module name of an `importlib.import_module("x")` or `__import__("x")` call, else None."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    func, arg = node.func, node.args[0]
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name in _IMPORT_FUNCTIONS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    return None


def imported_modules(tree: ast.AST, package: tuple[str, ...]) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import anywhere in `tree`, a module of `package`, in line order."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, _absolute(node.module or "", node.level, package)))
        elif (literal := _literal_import(node)) is not None:
            name = literal.lstrip(".")
            found.append((node.lineno, _absolute(name, len(literal) - len(name), package)))
    return sorted(found)


def test_walker_finds_every_kind_of_import():
    # The walker itself must be able to fail: a synthetic module of vlm.convert with known imports.
    source = '''
import os, training.loop
from retrieval import search
def f():
    from training.finetune import finetune
    import importlib
    return importlib.import_module("retrieval.service"), __import__("demo")
from . import layers
from ..x import y
VERBS = {"serve": ("retrieval.service:serve_main", "a string, not an import")}
'''
    assert imported_modules(ast.parse(source), ("vlm", "convert")) == [
        (2, "os"), (2, "training.loop"), (3, "retrieval"), (5, "training.finetune"), (6, "importlib"),
        (7, "demo"), (7, "retrieval.service"), (8, "vlm.convert"), (9, "vlm.x"),
    ]  # fmt: skip


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT)
        for line, name in imported_modules(ast.parse(path.read_text(), str(rel)), rel.parent.parts):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{rel}:{line}: imports {name}")
    assert not bad, f"{package}/ must not import {', '.join(FORBIDDEN[package])}:\n" + "\n".join(bad)
