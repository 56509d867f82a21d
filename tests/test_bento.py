"""The serving side stays lean, and `package` refuses what it cannot do."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.package import PackageError, export_target, package
from pipelines.config import load_params
from pipelines.errors import ParamsError
from tests.helpers import REPO

HEAVY = ("torch", "mlflow", "prefect", "dvc", "great_expectations", "sklearn", "optuna")


def test_importing_the_service_loads_no_training_stack() -> None:
    code = (
        "import sys, service; "
        f"print([m for m in {HEAVY!r} "
        "if any(k == m or k.startswith(m + '.') for k in sys.modules)])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_bento_pins_match_the_tested_constraints() -> None:
    pins = dict(
        line.split("==", 1)
        for line in (REPO / "constraints.txt").read_text().splitlines()
        if "==" in line
    )
    pins = {name.lower(): version for name, version in pins.items()}
    for bentofile in ("bentofile.yaml", "bentofile.gpu.yaml"):
        packages = yaml.safe_load((REPO / bentofile).read_text())["python"]["packages"]
        for requirement in packages:
            name, _, version = requirement.partition("==")
            name = re.split(r"[<>=!~ ]", name)[0]
            if version and name.lower() in pins:
                assert pins[name.lower()] == version, (bentofile, requirement)
            assert not name.lower().startswith(HEAVY), (bentofile, requirement)


def test_bento_includes_every_module_the_service_imports() -> None:
    """Whatever service.py pulls from pipelines/ at import time must be inside the bento."""
    code = (
        "import sys, service; "
        "print('\\n'.join(sorted(m.__file__ for n, m in sys.modules.items() "
        "if n.startswith('pipelines') and getattr(m, '__file__', None))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    used = {Path(line).relative_to(REPO).as_posix() for line in out.stdout.split()}
    included = set(yaml.safe_load((REPO / "bentofile.yaml").read_text())["include"])
    assert used <= included, used - included


def test_export_target_must_be_absolute_or_a_uri(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"package.export_to: .*absolute path or a URI"):
        load_params(REPO / "params.yaml", overrides={"package.export_to": "dist/bentos"})
    uri = load_params(REPO / "params.yaml", overrides={"package.export_to": "s3://b/bentos"})
    assert export_target(uri, tmp_path) == "s3://b/bentos"
    default = load_params(REPO / "params.yaml")
    assert export_target(default, tmp_path) == str(tmp_path.resolve() / "dist" / "bentos")


def test_package_without_a_champion_names_the_problem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(PackageError, match="no `champion` in the MLflow registry"):
        package(load_params(REPO / "params.yaml"), REPO)


def test_package_and_select_name_the_golden_set_alike() -> None:
    from flows.package import GOLDEN
    from pipelines.select import GOLDEN as WRITTEN

    assert GOLDEN == WRITTEN == "golden.json"


def test_a_changed_metadata_json_alone_is_a_new_bento_model(tmp_path: Path) -> None:
    """The newest BentoML model is reused only when every file it carries is the same: the same
    folder again gives its tag; the same graph with other labels in metadata.json is a new
    model holding the new file (before, it reused the old one and served the old labels)."""
    import bentoml

    from flows.package import save_bento_model
    from tests.helpers.graphs import linear_graph

    folder = tmp_path / "model"
    folder.mkdir()
    linear_graph(folder / "model.onnx", [4], 3)
    metadata = {"labels": [0, 1, 2], "precision": "fp32"}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    name = "metadata-reuse-test"
    first = save_bento_model(name, folder, "1")
    assert save_bento_model(name, folder, "1") == first
    (folder / "metadata.json").write_text(json.dumps({**metadata, "labels": ["a", "b", "c"]}))
    second = save_bento_model(name, folder, "2")
    assert second != first
    stored = json.loads((Path(bentoml.models.get(second).path) / "metadata.json").read_text())
    assert stored["labels"] == ["a", "b", "c"]
