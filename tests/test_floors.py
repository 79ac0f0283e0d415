"""Imports flow down the floors, and importing a library sets no environment variables.

Read from the source with ``ast`` (nothing is imported), so imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# kernels and data_pipeline share the ground floor; each package may import its own floor and below.
FLOORS = {"kernels": 0, "data_pipeline": 0, "trainer": 1, "evals": 2, "cluster": 3}


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imported_packages(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_no_package_imports_a_floor_above_it(package):
    offenders = [
        f"{path.relative_to(REPO)} imports {name}"
        for path in modules(package)
        for name in imported_packages(ast.parse(path.read_text()))
        if FLOORS.get(name, -1) > FLOORS[package]
    ]
    assert not offenders, offenders


def sets_environment(node: ast.stmt) -> bool:
    """``os.environ[...] = ...``, ``os.environ.setdefault/update(...)`` or ``os.putenv(...)``."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Assign | ast.AugAssign):
            targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
            if any(isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ" for t in targets):
                return True
        if isinstance(sub, ast.Call) and ast.unparse(sub.func) in (
            "os.environ.setdefault",
            "os.environ.update",
            "os.putenv",
        ):
            return True
    return False


@pytest.mark.parametrize("package", ["kernels", "data_pipeline", "trainer", "evals"])
def test_importing_sets_no_environment_variables(package):
    """Only module-level statements run at import; functions may set what their caller asked for."""
    offenders = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in modules(package)
        for node in ast.parse(path.read_text()).body
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and sets_environment(node)
    ]
    assert not offenders, offenders
