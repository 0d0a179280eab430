"""Every public function, method and class of the library has a docstring (issue 8).

Public: a name not starting with "_" (so dunder methods are skipped), at module level or inside a
public class (recursively). Functions nested in functions are private by construction.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vlm", "training", "retrieval", "demo")
_DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def undocumented(tree: ast.AST, prefix: str = "") -> list[tuple[int, str]]:
    """(line, qualified name) of each public def or class under `tree` without a docstring."""
    missing = []
    for node in ast.iter_child_nodes(tree):
        if not isinstance(node, _DEFS) or node.name.startswith("_"):
            continue
        if ast.get_docstring(node) is None:
            missing.append((node.lineno, prefix + node.name))
        if isinstance(node, ast.ClassDef):
            missing += undocumented(node, prefix + node.name + ".")
    return missing


def test_undocumented_finds_gaps():
    # The walker itself must be able to fail: a synthetic module with known gaps.
    source = '''
def public(): pass
def _private(): pass
def documented():
    """Yes."""
class Thing:
    """A class."""
    def __init__(self): pass
    def method(self): pass
    class Inner:
        def deep(self): pass
class _Hidden:
    def ignored(self): pass
'''
    expected = [(2, "public"), (9, "Thing.method"), (10, "Thing.Inner"), (11, "Thing.Inner.deep")]
    assert undocumented(ast.parse(source)) == expected


def test_every_public_def_has_a_docstring():
    missing = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT)
            missing += [f"{rel}:{line}:{name}" for line, name in undocumented(ast.parse(path.read_text()))]
    assert not missing, f"{len(missing)} public functions/classes without a docstring:\n" + "\n".join(missing)
