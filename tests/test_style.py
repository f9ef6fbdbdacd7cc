"""The code base stays easy to change: ruff clean, short functions, a thin CLI, no import cycles."""

import ast
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = ROOT / "actvar_cli"
MAX_FUNCTION_LINES = 80
MAX_CLI_LINES = 600


def ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    return [exe] if exe else [sys.executable, "-m", "ruff"]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    r = subprocess.run([*ruff(), *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def test_no_function_body_is_longer_than_80_lines():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(node.body) > 1:
                    first = node.body[1]  # the docstring does not count
                lines = node.end_lineno - first.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def test_the_cli_is_thin():
    assert len((PACKAGE / "cli.py").read_text().splitlines()) <= MAX_CLI_LINES


def imports_of(tree: ast.Module) -> set[str]:
    """Package modules a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("actvar_cli."):
            found.add(node.module.split(".")[1])
    return found


@pytest.mark.slow
def test_no_import_cycles():
    graph = {name: imports_of(tree) & set(modules()) - {name} for name, tree in modules().items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_library_modules_never_print_or_exit():
    allowed = {"cli", "render", "__main__"}
    for name, tree in modules().items():
        if name in allowed:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "exit"):
                pytest.fail(f"{name} calls {node.func.id}() at line {node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "exit" and getattr(node.value, "id", "") == "sys":
                pytest.fail(f"{name} calls sys.exit at line {node.lineno}")
