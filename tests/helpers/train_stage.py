"""A real `python -m pipelines.train` stage in a temporary project, for tests that stop it
(SIGKILL, SIGTERM) and run it again."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO
from tests.helpers.params import tiny_params, write_params_file


@dataclass(frozen=True)
class TrainStage:
    """The stage's command line, its environment and its checkpoint folder."""

    command: list[str]
    env: dict[str, str]
    checkpoints: Path


def train_stage(tmp_path: Path, prepared: Path, epochs: int = 8) -> TrainStage:
    """Writes tmp_path/params.yaml (the tiny params, CNN width 48: ~0.3 s an epoch on a CPU;
    `epochs` epochs and as much patience, so no early stop) and returns how to run the train
    stage there on `prepared`, tracked in tmp_path/mlflow.db (no parent run)."""
    shrunk = {"train.epochs": epochs, "train.patience": epochs, "train.device": "cpu"}
    write_params_file(tiny_params(shrunk, train__model__width=48), tmp_path)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "PYTHONPATH": str(REPO),
    }
    env.pop("MLOPS_PARENT_RUN_ID", None)
    command = [sys.executable, "-m", "pipelines.train", "--prepared", str(prepared)]
    command += ["--model", "models/train/model.pt", "--metrics", "metrics/train.json"]
    command += ["--plots", "plots/train.csv", "--checkpoint-dir", "checkpoints/train"]
    return TrainStage(command, env, tmp_path / "checkpoints" / "train")
