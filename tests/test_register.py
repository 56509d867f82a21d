import json
import os
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.register import CHALLENGER, CHAMPION, gate, register
from pipelines.export import export
from pipelines.tracking import start_parent_run
from tests.modelzoo import tiny_params, trained_model
from tests.test_export import tamper


def test_gate_policy() -> None:
    assert gate(0.90, None, 0.0) == (True, "no champion yet; accuracy 0.9000")
    assert gate(0.95, 0.95, 0.0)[0] and gate(0.949, 0.95, 0.002)[0]
    refused, why = gate(0.90, 0.95, 0.01)
    assert not refused and "0.9000 < champion's 0.9500" in why and "challenger" in why


def select_dir(root: Path, onnx_path: Path) -> Path:
    out = root / "select"
    out.mkdir()
    shutil.copy(onnx_path, out / "model.onnx")
    winner = {"name": "teacher/onnxruntime-fp32", "engine": "onnxruntime", "precision": "fp32"}
    (out / "winner.json").write_text(json.dumps({"winner": winner}))
    (out / "candidates.md").write_text("| table |\n")
    return out


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'registry.db'}")
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def test_champion_gate_refuses_a_worse_model_and_keeps_the_alias(
    tmp_path: Path, registry: MlflowClient
) -> None:
    params = tiny_params()
    prepared, model = trained_model(tmp_path, params)
    export(params.export, model, prepared, tmp_path / "good.onnx")
    tamper(tmp_path / "good.onnx", tmp_path / "bad.onnx")
    parent = start_parent_run(params, tmp_path)
    name = params.register_.model_name

    first = register(
        params, tmp_path, parent, select_dir(tmp_path / "a", tmp_path / "good.onnx"), prepared
    )
    assert (first.alias, first.champion_version) == (CHAMPION, None)

    worse = register(
        params, tmp_path, parent, select_dir(tmp_path / "b", tmp_path / "bad.onnx"), prepared
    )
    assert worse.alias == CHALLENGER and worse.accuracy < first.accuracy
    assert str(registry.get_model_version_by_alias(name, CHAMPION).version) == first.version
    assert str(registry.get_model_version_by_alias(name, CHALLENGER).version) == worse.version
    assert (
        "kept as challenger" in registry.get_model_version(name, worse.version).tags["gate.reason"]
    )

    same = register(
        params, tmp_path, parent, select_dir(tmp_path / "c", tmp_path / "good.onnx"), prepared
    )
    assert same.alias == CHAMPION and same.champion_version == first.version
    old = registry.get_model_version(name, first.version).tags
    assert old["demoted_by"] == same.version and "demoted_at" in old
    assert registry.get_model_version(name, same.version).tags["promoted_over"] == first.version


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path) -> None:
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
