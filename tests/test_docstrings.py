"""Every public function, class and method of ddkit says what it does (a docstring), so the API
reference and `help()` never show a bare signature."""

import ast
from pathlib import Path

import ddkit

ROOT = Path(ddkit.__file__).parent


def undocumented(source: str) -> list[str]:
    """Names of the public module-level functions and classes, and the public methods of public
    classes, in ``source`` that have no docstring."""
    missing = []
    for node in ast.parse(source).body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if not ast.get_docstring(node):
            missing.append(node.name)
        if isinstance(node, ast.ClassDef):
            missing += [f"{node.name}.{item.name}" for item in node.body
                        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
                        and not item.name.startswith("_") and not ast.get_docstring(item)]
    return missing


def test_the_check_finds_what_it_should():
    source = 'def a():\n    pass\n\ndef _b():\n    pass\n\nclass C:\n    """C."""\n\n    def m(self):\n        return 1\n'
    assert undocumented(source) == ["a", "C.m"]


def test_every_public_function_class_and_method_has_a_docstring():
    missing = [f"{path.relative_to(ROOT.parent)}: {name}" for path in sorted(ROOT.rglob("*.py"))
               for name in undocumented(path.read_text())]
    assert missing == []
