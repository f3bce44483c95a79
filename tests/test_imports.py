"""Every ddkit module imports on its own, and no import cycle runs between ddkit's packages.

The package graph is read from the source with ``ast`` (module-level and function-level imports
alike): a unit is a subpackage (``ddkit.methods``), a top-level module (``ddkit.cli``) or the root
package ``ddkit`` itself (``import ddkit`` reaches the API, the evaluator and the store).
"""

import ast
import importlib
from pathlib import Path

import pytest

import ddkit

ROOT = Path(ddkit.__file__).parent
MODULES = sorted(".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
                 for path in ROOT.rglob("*.py"))


def unit(module: str) -> str:
    """The package-level unit of a module name: ``ddkit.methods.matching`` -> ``ddkit.methods``."""
    return ".".join(module.split(".")[:2])


def imported_units(path: Path) -> dict[str, int]:
    """{unit: first line} of every ddkit import in the file at ``path``."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "ddkit":  # `from ddkit import distributed` is the module ddkit.distributed
                names = [f"ddkit.{alias.name}" if (ROOT / alias.name).is_dir() or (ROOT / f"{alias.name}.py").is_file()
                         else "ddkit" for alias in node.names]
            else:
                names = [node.module]
        for name in names:
            if name == "ddkit" or name.startswith("ddkit."):
                found.setdefault(unit(name), node.lineno)
    return found


def package_graph() -> dict[str, dict[str, str]]:
    """{unit: {imported unit: "module:line" of the first such import}}."""
    graph: dict[str, dict[str, str]] = {}
    for module in MODULES:
        folder = ROOT.parent / module.replace(".", "/")
        path = folder / "__init__.py" if folder.is_dir() else folder.with_suffix(".py")
        source = unit(module)
        for target, line in imported_units(path).items():
            if target != source:
                graph.setdefault(source, {}).setdefault(target, f"{module}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of units (first == last), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in list(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("module", [m for m in MODULES if m != "ddkit.__main__"])  # that one runs the CLI
def test_every_module_imports(module):
    assert importlib.import_module(module).__name__ == module


def test_no_import_cycle_between_ddkit_packages():
    graph = package_graph()
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(f"{a} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:]))


def test_the_cycle_finder_finds_a_cycle_and_names_it():
    assert find_cycle({"a": {"b": "x"}, "b": {"c": "y"}, "c": {"a": "z"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": "x"}, "b": {}, "c": {"a": "z"}}) is None
    assert unit("ddkit.methods.matching") == "ddkit.methods" and unit("ddkit") == "ddkit"


def function_level_imports(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every import statement inside a function of ``source``."""
    lines = source.splitlines()
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found |= {(inner.lineno, lines[inner.lineno - 1].strip()) for inner in ast.walk(node)
                      if isinstance(inner, (ast.Import, ast.ImportFrom))}
    return sorted(found)


def test_imports_sit_at_module_top_unless_a_comment_gives_the_reason():
    assert function_level_imports("def f():\n    import os  # why\n    import sys\n") == \
        [(2, "import os  # why"), (3, "import sys")]
    unexplained = [f"{path.relative_to(ROOT.parent)}:{line}: {text}" for path in sorted(ROOT.rglob("*.py"))
                   for line, text in function_level_imports(path.read_text()) if "#" not in text]
    assert unexplained == []


def test_importing_ddkit_first_asks_torch_for_huge_pages_unless_told_not_to():
    import os
    import subprocess
    import sys

    code = "import ddkit, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    default = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    kept = subprocess.run([sys.executable, "-c", code], env={**env, "THP_MEM_ALLOC_ENABLE": "0"},
                          capture_output=True, text=True, check=True)
    assert (default.stdout.strip(), kept.stdout.strip()) == ("1", "0")


FAULTS_OF_A_REUSED_MAP = """
import resource, sys, ddkit, torch
def faults_of_a_fresh_map():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(64, 2 ** 20 // 4 + 1)  # 64 MB and a little more, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_map()
print(min(faults_of_a_fresh_map() for _ in range(3)))
"""


def test_importing_ddkit_keeps_freed_memory_for_the_next_tensor_unless_told_not_to():
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    env = {k: v for k, v in os.environ.items() if k not in ("DDKIT_KEEP_FREED_MEMORY", "THP_MEM_ALLOC_ENABLE")}
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # 4 kB pages: a fresh 64 MB map is about 16,000 faults

    def faults(keep: str) -> int:
        run = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REUSED_MAP], env={**env, "DDKIT_KEEP_FREED_MEMORY": keep},
                             capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    kept, default = faults("1"), faults("0")
    assert kept < 100 and default > 10_000, (kept, default)
