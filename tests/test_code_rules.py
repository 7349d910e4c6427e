"""The project's code rules that a parser can check: no module reaches into another module's underscore names.

An underscore name is private to the module that defines it. This test reads every Python file of the
repository with ``ast`` and fails on ``from module import _name`` from one of our modules, on ``module._name``
through an imported module of ours, and on ``value._name`` where this module defines no ``_name`` (so it must
be another module's). The standard library's own public underscore names (namedtuple's ``_replace``,
``os._exit``, ...) are reached through modules that are not ours and are left alone.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SKIPPED_FOLDERS = {".git", "__pycache__", "build", "dist", "node_modules", ".venv", "venv"}
NAMEDTUPLE_API = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def python_files() -> list[Path]:
    return sorted(
        path for path in REPO_ROOT.rglob("*.py")
        if not any(part in SKIPPED_FOLDERS or part.endswith(".egg-info") for part in path.relative_to(REPO_ROOT).parts)
    )  # fmt: skip


def our_top_level_names() -> set[str]:
    """The names our own modules are imported by: top-level packages and modules, the clients' packages and
    the test helpers (tests import each other by file name)."""
    names = {path.stem for path in REPO_ROOT.glob("*.py")}
    names |= {path.parent.name for path in REPO_ROOT.glob("*/__init__.py")}
    names |= {path.parent.name for path in REPO_ROOT.glob("clients/*/*/__init__.py")}
    names |= {path.stem for path in (REPO_ROOT / "tests").glob("*.py")}
    return names


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def names_defined_in(tree: ast.Module) -> set[str]:
    """Every name this module binds: functions, classes, variables, attributes it assigns, import aliases."""
    defined: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
    return defined


def imported_modules(tree: ast.Module) -> dict[str, str]:
    """Local name -> the module it is bound to, for ``import x`` / ``import x.y as z`` / ``from x import y``."""
    modules: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                modules[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                modules[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return modules


@dataclass(frozen=True)
class Reach:
    path: Path
    line: int
    code: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.code}"


def reaches_into_private_names(path: Path, ours: set[str]) -> list[Reach]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    defined = names_defined_in(tree)
    modules = imported_modules(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in ours:
                found += [Reach(path, node.lineno, f"from {node.module} import {alias.name}")
                          for alias in node.names if is_private(alias.name)]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            receiver = node.value
            if isinstance(receiver, ast.Name) and receiver.id in ("self", "cls"):
                continue
            if isinstance(receiver, ast.Name) and receiver.id in modules:
                # Through an imported module: ours is a reach; the standard library's and others' are their API.
                if modules[receiver.id].split(".")[0] in ours:
                    found.append(Reach(path, node.lineno, ast.unparse(node)))
                continue
            if node.attr not in defined and node.attr not in NAMEDTUPLE_API:
                found.append(Reach(path, node.lineno, ast.unparse(node)))
    return found


def test_the_scan_sees_the_repository() -> None:
    files = python_files()
    assert REPO_ROOT / "realtime" / "pipeline.py" in files and REPO_ROOT / "engine" / "tracker.py" in files
    assert {"engine", "realtime", "offline", "flame_client", "run_stream"} <= our_top_level_names()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from engine.tracker import _Candidate\n", ["from engine.tracker import _Candidate"]),
        ("import engine.flame\nengine.flame._skew(1)\n", ["engine.flame._skew"]),
        ("def f(tracker):\n    return tracker._pool\n", ["tracker._pool"]),
        ("class A:\n    def __init__(self):\n        self._n = 0\n    def same(self, other):\n        return other._n\n", []),
        ("import os\nos._exit(0)\n", []),
        ("def f(record):\n    return record._replace(a=1)\n", []),
    ],
)
def test_the_scan_tells_a_reach_from_a_module_s_own_names(tmp_path: Path, source: str, expected: list[str]) -> None:
    module = tmp_path / "example.py"
    module.write_text(source)
    assert [reach.code for reach in reaches_into_private_names(module, our_top_level_names())] == expected


def test_no_module_reaches_into_another_module_s_underscore_names() -> None:
    ours = our_top_level_names()
    reaches = [reach for path in python_files() for reach in reaches_into_private_names(path, ours)]
    assert not reaches, "underscore names are private to their module; make these public or move the code:\n" + "\n".join(map(str, reaches))
