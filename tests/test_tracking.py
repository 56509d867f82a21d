import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.config import Params
from pipelines.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    OWNER_HOST,
    OWNER_PID,
    OWNER_STARTED,
    client_for,
    dataset_input,
    owner_alive,
    owner_tags,
    stage_run,
    start_parent_run,
    tracking_uri,
)
from tests.helpers import REPO


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
    monkeypatch.setenv("MLOPS_PARENT_RUN_ID", parent)
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


def test_stages_of_one_dvc_experiment_share_its_parent(
    params: Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`dvc exp run` names the experiment in each stage's environment: its stages nest under one
    parent named after it, which each stage reopens and ends; another experiment gets its own,
    and a stage run with neither variable (plain `dvc repro`) stands alone."""
    monkeypatch.delenv("MLOPS_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "0123abc")
    runs = {}
    for experiment, stage in (("exp-a", "prepare"), ("exp-a", "train"), ("exp-b", "prepare")):
        monkeypatch.setenv("DVC_EXP_NAME", experiment)
        with stage_run(stage, params, {}, tmp_path) as run:
            pass
        runs[experiment, stage] = run
    monkeypatch.delenv("DVC_EXP_NAME")
    with stage_run("prepare", params, {}, tmp_path) as alone:
        pass
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    shared = runs["exp-a", "prepare"].parent_run_id
    assert runs["exp-a", "train"].parent_run_id == shared
    assert client.get_run(runs["exp-a", "train"].run_id).data.tags["mlflow.parentRunId"] == shared
    parent = client.get_run(shared)
    assert (parent.info.run_name, parent.info.status) == ("exp-a", "FINISHED")
    assert parent.data.tags["mlops.dvc.baseline"] == "0123abc"
    others = {runs["exp-b", "prepare"].parent_run_id, alone.parent_run_id}
    assert len(others) == 2 and shared not in others


def git_repo(root: Path) -> str:
    """Make `root` a git repository with one commit; returns the commit."""
    user = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    for args in (["init", "-q"], [*user, "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, check=True, capture_output=True)
    return done.stdout.decode().strip()


def test_the_experiment_is_created_as_model_training(
    params: Params, tmp_path: Path, mlflow_uri: str
) -> None:
    """MLflow 3 opens an untagged experiment as GenAI; its kind tag marks it as model training,
    and an experiment created earlier without one gets it too."""
    client = MlflowClient(mlflow_uri)
    start_parent_run(params, tmp_path)
    created = client.get_experiment_by_name(params.tracking.experiment)
    assert created is not None
    assert created.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING == "custom_model_development"
    older = client.create_experiment("older")
    client_for(params.tracking.model_copy(update={"experiment": "older"}), tmp_path)
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING


def test_runs_record_the_dataset_and_the_source(
    params: Params, tmp_path: Path, mlflow_uri: str
) -> None:
    """The UI's Dataset and Source columns: a dataset input (name, digest from the content
    hash, source) on the stage run and its parent, and MLflow's `mlflow.source.*` tags."""
    commit = git_repo(tmp_path)
    content_hash = "8ed58bccbc69d9568a0852f188d4b053eae1df840fdf836ca44c56793a891ef4"
    with stage_run("train", params, {}, tmp_path, data_hash=content_hash) as run:
        pass
    client = MlflowClient(mlflow_uri)
    for run_id, context in ((run.run_id, "train"), (run.parent_run_id, "pipeline")):
        found = client.get_run(run_id)
        assert found.inputs is not None
        (entry,) = found.inputs.dataset_inputs
        assert (entry.dataset.name, entry.dataset.digest) == ("digits", content_hash[:16])
        assert json.loads(entry.dataset.source) == {"uri": "sklearn.datasets.load_digits"}
        assert {t.key: t.value for t in entry.tags} == {"mlflow.data.context": context}
        tags = found.data.tags
        assert tags["mlflow.source.git.commit"] == commit
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.source.name"]


def test_a_csv_source_is_a_local_dataset(params: Params) -> None:
    data = params.data.model_copy(update={"source": "data/x.csv"})
    csv = params.model_copy(update={"data": data})
    dataset = dataset_input(csv, "ab" * 32, "train").dataset
    assert (dataset.name, dataset.source_type) == ("x.csv", "local")
    assert json.loads(dataset.source) == {"uri": "data/x.csv"}


OWNER = """
import sys, time
from pathlib import Path
from pipelines.config import load_params
from pipelines.tracking import stage_run
params = load_params(Path(sys.argv[1]))
with stage_run("train", params, {}, Path(sys.argv[2]), data_hash="ab" * 32) as run:
    print(run.run_id, run.parent_run_id, flush=True)
    time.sleep(600)
"""


def test_runs_of_a_killed_process_are_marked_killed_by_the_next_start(
    params: Params, tmp_path: Path, mlflow_uri: str
) -> None:
    """A SIGKILLed stage leaves its run and its parent RUNNING; the next start on this host
    marks them KILLED, and leaves alone runs of live processes and of other hosts."""
    client = MlflowClient(mlflow_uri)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", OWNER, str(REPO / "params.yaml"), str(tmp_path)]
    owner = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout is not None
        stage, parent = owner.stdout.readline().split()  # the runs exist, RUNNING
    finally:
        owner.kill()  # SIGKILL: no `finally` in the owner runs
        owner.wait(timeout=60)
    assert {client.get_run(r).info.status for r in (stage, parent)} == {"RUNNING"}
    live = start_parent_run(params, tmp_path)  # this process owns it, and lives
    elsewhere = start_parent_run(params, tmp_path)
    client.set_tag(elsewhere, OWNER_HOST, "another-host")
    client.set_tag(elsewhere, OWNER_PID, str(owner.pid))  # the dead PID, but on another host
    reused = start_parent_run(params, tmp_path)  # a live PID that started later: reused
    client.set_tag(reused, OWNER_STARTED, "1.0")

    start_parent_run(params, tmp_path)  # the next run starts on this host

    status = {r: client.get_run(r).info.status for r in (stage, parent, live, elsewhere, reused)}
    assert status == {
        stage: "KILLED",
        parent: "KILLED",
        live: "RUNNING",
        elsewhere: "RUNNING",
        reused: "KILLED",
    }


def test_an_owner_that_cannot_be_read_counts_as_alive() -> None:
    assert owner_alive({}) is True  # a run from before owners were recorded: left alone
    assert owner_alive(owner_tags()) is True


def test_the_data_docs_link_opens_the_logged_copy_in_the_mlflow_ui(
    params: Params, tmp_path: Path, mlflow_uri: str
) -> None:
    """Not a file:// link (a browser opens nothing from one): the Artifacts tab of the run
    recorded beside the Data Docs, in the UI's model-training view."""
    from flows.reporting import data_docs_url

    docs = tmp_path / "reports" / "validate"
    assert data_docs_url(params, tmp_path, docs) is None  # no run recorded: no link
    with stage_run("validate", params, {}, tmp_path) as run:
        run.record_in(docs)
    _, experiment = client_for(params.tracking, tmp_path)
    page = f"{params.tracking.ui_url}/#/experiments/{experiment}/runs/{run.run_id}"
    expected = f"{page}/artifacts/data_docs/index.html?workflowType=machine_learning"
    assert data_docs_url(params, tmp_path, docs) == expected


def test_a_parent_owned_by_another_process_ends_with_it(
    params: Params, tmp_path: Path, mlflow_uri: str
) -> None:
    """A parent owned by another process than the one that created it: the creator ending leaves
    it alone; the owner killed makes it a ghost, then KILLED."""
    import psutil

    client = MlflowClient(mlflow_uri)
    dvc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        parent = start_parent_run(params, tmp_path, owner=psutil.Process(dvc.pid))
        assert client.get_run(parent).data.tags[OWNER_PID] == str(dvc.pid)
        start_parent_run(params, tmp_path)
        assert client.get_run(parent).info.status == "RUNNING"  # its owner lives
    finally:
        dvc.kill()
        dvc.wait(timeout=60)
    start_parent_run(params, tmp_path)
    assert client.get_run(parent).info.status == "KILLED"
