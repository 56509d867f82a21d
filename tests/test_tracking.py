import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.config import Params
from pipelines.tracking import PARENT_ENV, stage_run, start_parent_run, tracking_uri


def test_relative_sqlite_uri_is_under_the_project_root(
    params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(params.tracking, tmp_path) == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(params.tracking, tmp_path) == "http://tracking:5000"


def test_stage_runs_nest_under_an_explicit_parent(
    params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = start_parent_run(params, tmp_path)
    monkeypatch.setenv(PARENT_ENV, parent)
    with stage_run("prepare", params, {"prepare": {"seed": 1}}, tmp_path, data_hash="abc") as run:
        run.log_metrics({"rows": 3.0})
    with pytest.raises(RuntimeError), stage_run("train", params, {}, tmp_path) as failing:
        raise RuntimeError("boom")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    done, failed = client.get_run(run.run_id), client.get_run(failing.run_id)
    assert done.data.tags["mlflow.parentRunId"] == parent == failed.data.tags["mlflow.parentRunId"]
    assert (done.info.status, failed.info.status) == ("FINISHED", "FAILED")
    assert done.data.params["prepare.seed"] == "1"
    assert done.data.tags["data.content_hash"] == "abc"
    assert done.data.tags["pkg.torch"].startswith("2.")
    assert done.data.tags["git.commit"]
    assert done.data.metrics["rows"] == 3.0
    parent_run = client.get_run(parent)
    assert parent_run.data.params["train.model.arch"] == "cnn"
    assert parent_run.info.status == "RUNNING"  # the orchestrator owns its parent's status
