"""The house rules of the source tree, read from the code itself (AST, nothing imported): the one-way layering
model <- reporting <- daemon, and no import circle anywhere - counting imports inside functions too (a late import
still ties two modules together), not those under ``if TYPE_CHECKING:``."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("daemon", "model", "reporting")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _runtime_imports(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names) of every import outside ``if TYPE_CHECKING:`` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (``from a import b`` counts as importing a.b when that is a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, names in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if target.split(".")[0] not in PACKAGES:
                continue
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for dep in submodules or [target]:
                if dep in modules and dep != name:
                    graph[name].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_no_import_circles_anywhere() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_layers_point_one_way_model_reporting_daemon() -> None:
    allowed = {"model": {"model"}, "reporting": {"reporting", "model"}, "daemon": {"daemon", "reporting", "model"}}
    wrong = sorted(
        f"{src} imports {dst}"
        for src, deps in import_graph().items()
        for dst in deps
        if dst.split(".")[0] not in allowed[src.split(".")[0]]
    )
    assert wrong == []


def test_a_command_lives_in_the_module_of_its_name() -> None:
    """``chexd NAME`` is defined in daemon/cli/NAME.py (dashes as underscores), sub-apps in the module of theirs."""
    import typer.main

    from daemon.cli import app

    click_app = typer.main.get_command(app)
    misplaced = []
    for name, command in click_app.commands.items():  # type: ignore[attr-defined]
        callback = command.callback if command.callback else None
        module = callback.__module__ if callback else None
        if module is None:  # a sub-app (chexd db, chexd model): its commands' module
            module = next(iter(command.commands.values())).callback.__module__  # type: ignore[attr-defined]
        if module != f"daemon.cli.{name.replace('-', '_')}":
            misplaced.append(f"{name}: {module}")
    assert misplaced == []
