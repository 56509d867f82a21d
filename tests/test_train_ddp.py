"""`train` under torchrun: 2 processes, gloo on CPU, against a single-process run.

Tolerance: the DDP run's best validation accuracy is within 0.03 of the single-process run with
the same global batch (and its validation loss within 15%). The runs are not bit-identical:
each rank's loss is the mean over its half of every batch, so the last, odd-sized batch weighs
its rows slightly differently, both ranks draw dropout masks from the same seed, and gloo sums
gradients in another order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from pipelines.config import Params
from pipelines.train import train
from pipelines.training.checkpoints import checkpoint_files
from tests.helpers import REPO
from tests.helpers.params import tiny_params, write_params_file

ACCURACY_TOLERANCE = 0.03
LOSS_TOLERANCE = 0.15  # relative
SMALL = {"train.epochs": 5, "train.patience": 10, "train.num_workers": 0}  # on tiny_params()


class Crash(Exception):
    """Stands for a process dying after some epoch."""


def torchrun(root: Path, prepared: Path, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(nproc), "-m", "pipelines.train", "--prepared"]
    command += [str(prepared), "--model", "models/train/model.pt", "--metrics", "metrics.json"]
    command += ["--plots", "plots.csv", "--checkpoint-dir", "ck"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


@pytest.fixture
def small(tmp_path: Path) -> Params:
    params = tiny_params(SMALL)
    write_params_file(params, tmp_path)
    return params


@pytest.mark.slow
def test_two_gloo_processes_match_one_and_only_rank_0_writes(
    tmp_path: Path, prepared: Path, small: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    single = train(small.train, prepared, tmp_path / "single-ck").metrics

    torchrun(tmp_path, prepared)
    ddp = json.loads((tmp_path / "metrics.json").read_text())
    assert ddp["epochs_run"] == single["epochs_run"] == 5
    assert abs(ddp["val_accuracy"] - single["val_accuracy"]) <= ACCURACY_TOLERANCE
    assert abs(ddp["best_val_loss"] / single["best_val_loss"] - 1) <= LOSS_TOLERANCE
    assert [p.name for p in checkpoint_files(tmp_path / "ck")] == [
        "epoch-00004.ckpt",
        "epoch-00005.ckpt",
    ]
    model = torch.load(tmp_path / "models" / "train" / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in model["state_dict"])  # the bare model
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("digits").experiment_id])
    trains = [r for r in runs if r.data.tags.get("mlops.stage") == "train"]
    assert len(trains) == 1 and trains[0].data.tags["train.world_size"] == "2"
    history = client.get_metric_history(trains[0].info.run_id, "epoch.val_accuracy")
    assert [m.step for m in history] == [1, 2, 3, 4, 5]  # logged once per epoch: rank 0 only


@pytest.mark.slow
def test_torchrun_resumes_from_the_checkpoint_of_a_killed_run(
    tmp_path: Path, prepared: Path, small: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")

    def crash_after_2(epoch: int, row: dict[str, float]) -> None:
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        train(small.train, prepared, tmp_path / "ck", crash_after_2)
    torchrun(tmp_path, prepared)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 2 and metrics["epochs_run"] == 5
