"""The `tune` stage: the space from params, pruning, failed trials, MLflow trial runs, parallel
workers on one SQLite study, a killed study resumed, and `train` applying the best values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

import pipelines.train
from pipelines.config import Params, load_params, section_dict, validate_params
from pipelines.errors import ParamsError, PipelineError
from pipelines.train import effective_params, tuned_values
from pipelines.tune import (
    DISABLED,
    objective,
    open_study,
    study_name,
    suggest,
    tune,
)
from tests.helpers import REPO
from tests.helpers.params import tiny_params

SMALL_SPACE = {
    "train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True},
    "train.model.width": {"type": "int", "low": 4, "high": 8},
}


def tune_params(tmp_path: Path, space: dict[str, Any] | None = None, **tune: Any) -> Params:
    """tiny_params() with three epochs; tuning on, a few trials, a study under tmp."""
    raw = section_dict(tiny_params(train__epochs=3, train__patience=10, train__num_workers=0))
    raw["tune"].update(
        enabled=True,
        trials=4,
        workers=1,
        heartbeat_s=1,
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        space=space or SMALL_SPACE,
    )
    raw["tune"].update(tune)
    return validate_params(raw)


def write_params(root: Path, params: Params) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(section_dict(params), sort_keys=False))
    return path


def stored(params: Params, prepared: Path) -> optuna.Study:
    name = study_name(params, json.loads((prepared / "manifest.json").read_text())["content_hash"])
    return optuna.load_study(study_name=name, storage=params.tune.storage)


def test_the_search_space_is_read_from_params_yaml() -> None:
    params = load_params(REPO / "params.yaml")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = suggest(study.ask(), params.tune.space)
        assert set(values) == set(params.tune.space)
        for key, value in values.items():
            dim = params.tune.space[key]
            if dim.type == "categorical":
                assert value in (dim.choices or [])
            else:
                assert dim.low is not None and dim.high is not None
                assert dim.low <= value <= dim.high
                assert isinstance(value, int if dim.type == "int" else float)
    lr = study.trials[0].distributions["train.lr"]
    assert isinstance(lr, optuna.distributions.FloatDistribution) and lr.log


def test_space_keys_and_bounds_are_checked_against_the_train_models(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"train\.epoch: not a train param; allowed: .*train\.lr"):
        tune_params(tmp_path, space={"train.epoch": {"type": "int", "low": 1, "high": 3}})
    with pytest.raises(ParamsError, match="give `choices`"):
        tune_params(tmp_path, space={"train.model.arch": {"type": "categorical"}})
    with pytest.raises(ParamsError, match="log scale needs low > 0"):
        tune_params(
            tmp_path, space={"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}
        )
    bad_choice = {"train.model.arch": {"type": "categorical", "choices": ["mlp", "vit"]}}
    with pytest.raises(ParamsError, match=r"tune\.space\.train\.model\.arch: 'vit'"):
        tune_params(tmp_path, space=bad_choice)
    too_big = {"train.lr": {"type": "float", "low": 0.1, "high": 20.0}}
    with pytest.raises(
        ParamsError,
        match=r"tune\.space\.train\.lr: 20\.0 is not allowed \(train\.lr: .*less than 10",
    ):
        tune_params(tmp_path, space=too_big)


def test_disabled_tuning_writes_an_empty_result(tmp_path: Path, prepared: Path) -> None:
    params = tune_params(tmp_path, enabled=False)
    content, metrics = tune(params, prepared, tmp_path)
    assert content == DISABLED and content["params"] == {} and metrics == {"enabled": False}
    assert not (tmp_path / "study.db").exists()


def test_pruning_stops_a_trial_with_bad_params_early(tmp_path: Path, prepared: Path) -> None:
    pruner = {"kind": "median", "startup_trials": 1, "warmup_epochs": 1, "min_epochs": 1}
    params = tune_params(tmp_path, pruner={**pruner, "reduction_factor": 3})
    params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 6})})
    study = open_study(params, "prune", optuna.storages.InMemoryStorage(), 0)
    study.enqueue_trial({"train.lr": 3e-3, "train.model.width": 8})  # learns
    study.enqueue_trial({"train.lr": 1e-3, "train.model.width": 4})  # far slower: pruned
    study.optimize(objective(params, prepared), n_trials=2)
    good, bad = study.trials
    assert good.state == TrialState.COMPLETE and len(good.intermediate_values) == 6
    assert bad.state == TrialState.PRUNED
    assert len(bad.intermediate_values) == 2  # the first epoch it could be pruned at
    assert bad.intermediate_values[2] < good.intermediate_values[2]


def test_each_trial_is_a_nested_mlflow_run_and_a_crash_fails_only_its_trial(
    tmp_path: Path, prepared: Path, mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_train, calls = pipelines.train.train, []

    def crash_second(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(pipelines.train, "train", crash_second)
    params = tune_params(tmp_path, trials=4)
    client = MlflowClient(mlflow_uri)
    experiment = client.create_experiment("digits")
    parent = client.create_run(experiment).info.run_id
    content, metrics = tune(params, prepared, tmp_path, trials_parent=parent)

    assert metrics["trials"] == 5 and metrics["trials_failed"] == 1  # the study went on
    assert metrics["trials_complete"] + metrics["trials_pruned"] == 4  # the failed one retried
    assert set(content["params"]) == set(SMALL_SPACE) and content["enabled"] is True
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(runs) == 5
    by_number = {int(r.data.tags["tune.trial"]): r for r in runs}
    crashed = by_number[1]
    assert crashed.info.status == "FAILED" and crashed.data.tags["tune.state"] == "failed"
    assert "out of memory" in crashed.data.tags["tune.error"]
    finished = by_number[0]
    assert finished.data.tags["tune.state"] == "complete" and finished.info.status == "FINISHED"
    assert set(finished.data.params) == set(SMALL_SPACE)
    history = client.get_metric_history(finished.info.run_id, "epoch.val_accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    study = stored(params, prepared)
    assert study.trials[0].user_attrs["mlflow_run_id"] == finished.info.run_id


def test_failed_trials_do_not_use_up_the_budget_and_a_rerun_goes_on(
    tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    none = {"kind": "none", "startup_trials": 0, "warmup_epochs": 0, "min_epochs": 1}
    params = tune_params(
        tmp_path, trials=2, max_failed_trials=2, pruner={**none, "reduction_factor": 3}
    )
    real_train = pipelines.train.train

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: no kernel image (simulated)")

    monkeypatch.setattr(pipelines.train, "train", broken)
    with pytest.raises(
        PipelineError, match=r"worker 0: 2 failed trials \(tune\.max_failed_trials 2\)"
    ):
        tune(params, prepared, tmp_path)
    assert [t.state for t in stored(params, prepared).trials] == [TrialState.FAIL] * 2

    monkeypatch.setattr(pipelines.train, "train", real_train)  # the cause fixed: run again
    content, metrics = tune(params, prepared, tmp_path)
    assert (metrics["trials_complete"], metrics["trials_failed"], metrics["trials"]) == (2, 2, 4)
    assert content["best_trial"] in {2, 3}


def test_train_applies_the_best_values_only_when_tuning_is_enabled(tmp_path: Path) -> None:
    best = tmp_path / "best_params.json"
    best.write_text(json.dumps({"enabled": True, "params": {"train.lr": 0.01}}))
    (tmp_path / "on").mkdir(), (tmp_path / "off").mkdir()
    on = write_params(tmp_path / "on", tune_params(tmp_path))
    params, values = effective_params(on, best)
    assert params.train.lr == 0.01 and values == {"train.lr": 0.01}
    off = write_params(tmp_path / "off", tune_params(tmp_path, enabled=False))
    params, values = effective_params(off, best)
    assert params.train.lr == load_params(REPO / "params.yaml").train.lr and values == {}
    best.write_text(json.dumps(DISABLED))
    assert tuned_values(best) == {}
    best.write_text(json.dumps({"enabled": True, "params": {"train.lr": -1}}))
    with pytest.raises(ParamsError, match=r"train\.lr: Input should be greater than 0"):
        effective_params(on, best)
    best.write_text(json.dumps({"enabled": True, "params": {"evaluate.batch_size": 8}}))
    with pytest.raises(ParamsError, match="only train params can be tuned"):
        tuned_values(best)


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(tmp_path: Path, prepared: Path) -> None:
    params = tune_params(
        tmp_path,
        trials=8,
        workers=2,
        pruner={
            "kind": "none",
            "startup_trials": 0,
            "warmup_epochs": 0,
            "min_epochs": 1,
            "reduction_factor": 3,
        },
    )
    content, metrics = tune(params, prepared, tmp_path)
    trials = stored(params, prepared).trials
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == metrics["trials"]
    assert 8 <= len(trials) <= 9  # at most workers - 1 over: each checks after its trial
    assert {t.user_attrs["worker"] for t in trials} == {0, 1}  # both contributed
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert content["best_trial"] in numbers


@pytest.mark.slow
def test_a_killed_study_resumes_with_its_finished_trials(tmp_path: Path, prepared: Path) -> None:
    none = {"kind": "none", "startup_trials": 0, "warmup_epochs": 0, "min_epochs": 1}
    params = tune_params(tmp_path, trials=10, pruner={**none, "reduction_factor": 3})
    params = params.model_copy(update={"train": params.train.model_copy(update={"epochs": 8})})
    path = write_params(tmp_path, params)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "pipelines.tune", "--params", str(path), "--worker"]
    # the schema first: this process polls the file while the worker runs, and two processes
    # creating a fresh SQLite schema at once collide (as `tune` does, which creates it first)
    optuna.storages.RDBStorage(params.tune.storage)
    worker = subprocess.Popen([*command, "--prepared", str(prepared)], cwd=tmp_path, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        time.sleep(0.2)
        try:
            done = [t for t in stored(params, prepared).trials if t.state.is_finished()]
        except KeyError:  # the worker has not created the study yet
            continue
        if len(done) >= 2:
            break
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    before = {t.number: t.value for t in stored(params, prepared).trials if t.state.is_finished()}
    assert 2 <= len(before) < 10, "the worker finished before it was killed: slow the trials"
    time.sleep(2 * params.tune.heartbeat_s + 0.5)  # the killed trial's heartbeat goes stale

    tune(params, prepared, tmp_path)
    after = stored(params, prepared).trials
    assert {t.number: t.value for t in after if t.number in before} == before  # kept
    assert len(after) >= 10 and all(t.state.is_finished() for t in after)
    killed = [t for t in after if t.state == TrialState.FAIL]
    assert len(killed) <= 1  # the trial that was running when the worker died, failed


@pytest.mark.slow
def test_the_stage_cli_then_train_with_the_tuned_values(
    tmp_path: Path, prepared: Path, mlflow_uri: str
) -> None:
    params = tune_params(tmp_path, trials=3, workers=2)
    write_params(tmp_path, params)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tune_cmd = [sys.executable, "-m", "pipelines.tune", "--prepared", str(prepared)]
    tune_cmd += ["--out", "models/tune/best_params.json", "--metrics", "metrics/tune.json"]
    subprocess.run(tune_cmd, cwd=tmp_path, env=env, check=True)
    best = json.loads((tmp_path / "models" / "tune" / "best_params.json").read_text())
    assert best["enabled"] and set(best["params"]) == set(SMALL_SPACE)
    train_cmd = [sys.executable, "-m", "pipelines.train", "--prepared", str(prepared)]
    train_cmd += ["--model", "m/model.pt", "--metrics", "m/train.json", "--plots", "m/t.csv"]
    train_cmd += ["--checkpoint-dir", "ck", "--tuned", "models/tune/best_params.json"]
    subprocess.run(train_cmd, cwd=tmp_path, env=env, check=True)
    model = torch.load(tmp_path / "m" / "model.pt", weights_only=True)
    assert model["metadata"]["tuned_params"] == best["params"]
    assert model["metadata"]["train_config"]["lr"] == best["params"]["train.lr"]
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    stages = {r.data.tags.get("mlops.stage"): r for r in runs}
    assert json.loads(stages["train"].data.tags["train.tuned_params"]) == best["params"]
    assert float(stages["train"].data.params["train.lr"]) == best["params"]["train.lr"]
    trials = [r for r in runs if r.data.tags.get("mlops.stage") == "tune.trial"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {stages["tune"].info.run_id}
    assert {r.data.tags["tune.worker"] for r in trials} <= {"0", "1"} and len(trials) >= 3


@pytest.mark.parametrize(
    ("storage", "shown"),
    [("mysql://u:secret@db/optuna", "unsupported scheme 'mysql'"), ("sqlite://", "needs a file")],
)
def test_an_unsupported_storage_url_is_refused_when_params_load(
    tmp_path: Path, storage: str, shown: str
) -> None:
    raw = section_dict(tune_params(tmp_path))
    raw["tune"]["storage"] = storage
    with pytest.raises(ParamsError, match=r"tune\.storage") as info:
        validate_params(raw)
    assert shown in str(info.value) and "secret" not in str(info.value)


def test_an_unreachable_storage_is_one_error_line_without_the_password(
    tmp_path: Path, prepared: Path
) -> None:
    write_params(tmp_path, tune_params(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "pipelines.tune", "--prepared", str(prepared)]
    cmd += ["--worker", "--untracked", "--trials", "1"]
    bad = {**env, "MLOPS_TUNE_STORAGE": "mysql://u:secret@db/optuna"}
    out = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=bad, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "error: MLOPS_TUNE_STORAGE" in out.stderr and "secret" not in out.stderr
    # Nothing listens on port 1 of loopback: the connection is refused at once.
    down = {**env, "MLOPS_TUNE_STORAGE": "postgresql://optuna:secret@127.0.0.1:1/optuna"}
    out = subprocess.run(
        cmd, check=False, cwd=tmp_path, env=down, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "postgresql://optuna:***@127.0.0.1:1/optuna" in errors[0]
    assert "secret" not in out.stderr
