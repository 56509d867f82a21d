"""The layers point one way: flows -> pipelines. pipelines never imports Prefect, DVC or flows;
the serving side never imports the training stack."""

import ast
from pathlib import Path

from tests.conftest import REPO

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


def test_preprocessing_is_numpy_only() -> None:
    """numpy (and Pillow, imported by `image_to_rows` alone): what the serving image carries."""
    assert imported_modules(REPO / "pipelines" / "preprocessing.py") <= {
        "__future__",
        "numpy",
        "collections",
        "typing",
        "io",
        "PIL",
    }
