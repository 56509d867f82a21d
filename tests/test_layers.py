"""The layers point one way: flows -> pipelines. pipelines never imports Prefect, DVC or flows;
the serving side never imports the training stack."""

import ast
from pathlib import Path

from tests.helpers import REPO

FORBIDDEN_IN_PIPELINES = {"prefect", "dvc", "flows"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_pipelines_never_import_the_orchestration_layer() -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(imported_modules(path) & FORBIDDEN_IN_PIPELINES)
        for path in (REPO / "pipelines").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def project_imports(path: Path) -> set[str]:
    """The full names of the `pipelines.*` modules `path` imports."""
    return {
        node.module
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipelines")
    }


def test_preprocessing_is_numpy_only() -> None:
    """numpy (and Pillow, imported by `image_to_rows` alone): what the serving image carries;
    of the project, only its typed errors (a module that imports nothing)."""
    path = REPO / "pipelines" / "preprocessing.py"
    assert imported_modules(path) <= {
        "__future__",
        "numpy",
        "collections",
        "typing",
        "io",
        "PIL",
        "pipelines",
    }
    assert project_imports(path) <= {"pipelines.errors"}
    assert imported_modules(REPO / "pipelines" / "errors.py") == set()
