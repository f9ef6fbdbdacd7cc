"""The code base stays easy to change: ruff clean, a tree that shows the architecture, short
modules and functions, keyword-only parameters past five, imports that flow one way (cli ->
commands -> library), no import cycle, and a library that never prints or exits."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "actvar_cli"
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
MAX_TOP_LEVEL_MODULES = 12
MIN_SUBPACKAGES = 5
MAX_POSITIONAL = 5  # past this, parameters are keyword-only
FRONT = ("cli", "commands")  # what the library may never import


def ruff() -> list[str]:
    exe = shutil.which("ruff", path=str(ROOT / ".venv" / "bin")) or shutil.which("ruff")
    return [exe] if exe else [sys.executable, "-m", "ruff"]


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    r = subprocess.run([*ruff(), *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def dotted(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module of the package, subpackages included, by dotted name."""
    return {dotted(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_walk_sees_every_subpackage():
    names = modules()
    subpackages = sorted({n.split(".")[1] for n in names if n.count(".") >= 2})
    assert len(subpackages) >= MIN_SUBPACKAGES, subpackages
    assert "actvar_cli.models.var" in names and "actvar_cli.cli.app" in names  # the checks below cover these


def test_the_tree_shows_the_architecture():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    long = [f"{n}: {len(p.read_text().splitlines())}" for n, (p, _) in modules().items()]
    long = [x for x in long if int(x.rsplit(": ", 1)[1]) > MAX_MODULE_LINES]
    assert not long, long


def functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def body_lines(node) -> int:
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and len(node.body) > 1:
        first = node.body[1]  # the docstring does not count
    return node.end_lineno - first.lineno + 1


def test_no_function_body_is_longer_than_60_lines():
    long = [
        f"{name}.{node.name}: {body_lines(node)} lines"
        for name, (_, tree) in modules().items()
        for node in functions(tree)
        if body_lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long, long


def test_parameters_past_five_are_keyword_only():
    """Command-line functions take their options as Typer parameters and are exempt."""
    wide = []
    for name, (_, tree) in modules().items():
        if name.startswith("actvar_cli.cli"):
            continue
        for node in functions(tree):
            positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
            if len(positional) > MAX_POSITIONAL:
                wide.append(f"{name}.{node.name}: {len(positional)} positional parameters")
    assert not wide, wide


def imports_of(name: str, path: Path, tree: ast.Module, known: set[str]) -> set[str]:
    """Package modules a module imports, at the top or inside functions."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if not base.startswith("actvar_cli"):
            continue
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            found.add(sub if sub in known else base)
    return found & known


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {n: imports_of(n, p, t, known) - {n} for n, (p, t) in mods.items()}


@pytest.mark.slow
def test_no_import_cycles():
    g = graph()
    g = {n: {m for m in deps if not (n.startswith(m + ".") or m == "actvar_cli")} for n, deps in g.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(g):
        if name not in state:
            visit(name, [name])


def layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FRONT) else "base"


def test_imports_flow_from_the_cli_to_the_commands_to_the_library():
    wrong = []
    for name, deps in graph().items():
        mine = layer(name)
        for dep in deps:
            theirs = layer(dep)
            if mine not in FRONT and theirs in FRONT and name != "actvar_cli.__main__":
                wrong.append(f"{name} imports {dep}")
            if mine == "commands" and theirs == "cli":
                wrong.append(f"{name} imports {dep}")
    assert not wrong, wrong


def test_library_modules_never_print_or_exit():
    for name, (_, tree) in modules().items():
        if name.startswith("actvar_cli.cli") or name == "actvar_cli.__main__":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "exit"):
                pytest.fail(f"{name} calls {node.func.id}() at line {node.lineno}")
            if isinstance(node, ast.Attribute) and node.attr == "exit" and getattr(node.value, "id", "") == "sys":
                pytest.fail(f"{name} calls sys.exit at line {node.lineno}")
