"""The project's modules import one another without a cycle (issue: one rule in one place).

Every ``import`` statement counts, inside functions too (an import inside a function hides a
cycle from Python but not from a reader); only ``if TYPE_CHECKING:`` blocks are left out, since
they never run. The layering ``app -> worker -> kru_core`` (and ``kru_client`` alone) is checked
on the same graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("kru_core", "worker", "app", "kru_client")
#: What each top-level package may import of the others.
LAYERS = {
    "kru_core": set(),
    "worker": {"kru_core"},
    "app": {"worker", "kru_core", "kru_client"},
    "kru_client": set(),
}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            if "migrations" in path.parts and path.parent.name == "versions":
                continue  # Alembic revision scripts are loaded by Alembic, not imported
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module ``name`` imports."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()

    def resolve(module: str) -> str | None:
        while module and module not in modules:
            module = module.rpartition(".")[0]
        return module or None

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if (found := resolve(alias.name)) is not None:
                        targets.add(found)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name if is_package else name.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    module = f"{base}.{child.module}" if child.module else base
                else:
                    module = child.module or ""
                for alias in child.names:
                    if f"{module}.{alias.name}" in modules:  # a submodule
                        targets.add(f"{module}.{alias.name}")
                    elif (found := resolve(module)) is not None:
                        targets.add(found)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    targets.discard(name)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
            connect(v)
    return found


def test_no_import_cycle_among_the_projects_modules() -> None:
    assert _cycles(_graph()) == []


def test_the_layers_import_only_downwards() -> None:
    wrong = [
        f"{name} imports {target}"
        for name, targets in _graph().items()
        for target in targets
        if (top := target.split(".")[0]) != name.split(".")[0]
        and top not in LAYERS[name.split(".")[0]]
    ]
    assert wrong == []


def test_the_walk_sees_imports_inside_functions_and_skips_type_checking(tmp_path: Path) -> None:
    modules = {"pkg": Path("pkg/__init__.py"), "pkg.a": Path("pkg/a.py"), "pkg.b": Path("pkg/b.py")}
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg import b\n"
        "def f():\n    from . import b\n"
    )
    path = tmp_path / "pkg" / "a.py"
    path.parent.mkdir()
    path.write_text(source)
    assert _imports("pkg.a", path, modules) == {"pkg.b"}
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def test_config_and_settings_import_no_torch() -> None:
    """kru_core's names load on first use: the config, its errors and the worker's settings
    (what the CLI, Celery's inspect and the API's schemas read first) come without torch."""
    import subprocess
    import sys

    code = (
        "import sys, kru_core.config, kru_core.errors, worker.settings; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_every_public_name_of_kru_core_resolves() -> None:
    import kru_core

    for name in kru_core.__all__:
        assert getattr(kru_core, name).__module__.startswith("kru_core."), name
