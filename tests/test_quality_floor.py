"""The absolute quality floor: a diverged run is rejected in `train`, a model below
`evaluate.min_accuracy` in `evaluate` (exit 2, one line, before export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pipelines import evaluate
from pipelines.config import section_dict
from pipelines.errors import PipelineError
from pipelines.train import train
from pipelines.training.checkpoints import checkpoint_files
from pipelines.training.loop import cross_entropy
from tests.helpers.modelzoo import trained_model
from tests.helpers.params import tiny_params


@pytest.fixture(scope="module")
def weak_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared dir, model file): 2 epochs of a width-8 CNN, ~0.54 test accuracy."""
    return trained_model(tmp_path_factory.mktemp("weak"))


def run_evaluate(
    root: Path, prepared: Path, model: Path, floor: float, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """`python -m pipelines.evaluate` in `root` with `evaluate.min_accuracy: floor`."""
    params = section_dict(tiny_params(**{"evaluate.min_accuracy": floor}))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    argv = ["--params", str(root / "params.yaml"), "--model", str(model)]
    argv += ["--prepared", str(prepared), "--metrics", str(root / "metrics" / "evaluate.json")]
    argv += ["--plots", str(root / "plots")]
    capsys.readouterr()
    try:
        evaluate.main(argv)
    except SystemExit as exc:
        return int(exc.code or 0), capsys.readouterr().err
    return 0, capsys.readouterr().err


def test_evaluate_rejects_a_model_below_the_floor(
    tmp_path: Path,
    weak_model: tuple[Path, Path],
    mlflow_uri: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    prepared, model = weak_model
    code, err = run_evaluate(tmp_path, prepared, model, 0.8, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: test accuracy 0.") and "Traceback" not in err
    assert "below evaluate.min_accuracy 0.8" in last
    assert not (tmp_path / "metrics" / "evaluate.json").exists()  # nothing for `export` to take

    code, err = run_evaluate(tmp_path, prepared, model, 0.3, capsys)  # the floor set for it
    assert code == 0, err
    accuracy = json.loads((tmp_path / "metrics" / "evaluate.json").read_text())["accuracy"]
    assert 0.3 <= accuracy < 0.8


def test_the_floor_is_inclusive_and_a_nan_accuracy_is_below_it() -> None:
    evaluate.check_floor(0.8, 0.8)
    with pytest.raises(evaluate.AccuracyFloorError, match=r"0\.7999 is below .* 0\.8"):
        evaluate.check_floor(0.7999, 0.8)
    with pytest.raises(evaluate.AccuracyFloorError):
        evaluate.check_floor(float("nan"), 0.0)


def test_a_non_finite_loss_is_rejected_in_the_epoch_it_appears(
    tmp_path: Path, weak_model: tuple[Path, Path]
) -> None:
    prepared, _ = weak_model
    cfg = tiny_params(**{"train.epochs": 4, "train.patience": 4}).train
    epochs: list[int] = []

    def diverging(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = cross_entropy(logits, x, y)
        return loss * float("inf") if len(epochs) >= 1 else loss  # diverges in epoch 2

    with pytest.raises(PipelineError, match=r"train: epoch 2: train_loss is (nan|inf)"):
        train(cfg, prepared, tmp_path / "ck", lambda e, row: epochs.append(e), (diverging, "x"))
    assert epochs == [1]  # epoch 2 was neither recorded nor reported
    kept = [p.name for p in checkpoint_files(tmp_path / "ck")]
    assert kept == ["epoch-00001.ckpt"]  # the diverged state is not checkpointed


def test_every_stage_after_the_model_runs_the_floor_first() -> None:
    """`dvc repro export@teacher` (or any later stage) alone still runs `evaluate`: each stage that
    uses the trained model, but for `evaluate` and `distill` (whose model has its own gates
    downstream), has `evaluate` upstream in DVC's graph."""
    import re
    import subprocess
    import sys

    from tests.helpers import REPO

    dot = subprocess.run(
        [sys.executable, "-m", "dvc", "dag", "--dot"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    parents: dict[str, set[str]] = {}
    for src, dst in re.findall(r'"([^"]+)" -> "([^"]+)"', dot):
        parents.setdefault(dst, set()).add(src)

    def upstream(stage: str) -> set[str]:
        seen: set[str] = set()
        todo = [stage]
        while todo:
            for parent in parents.get(todo.pop(), set()) - seen:
                seen.add(parent)
                todo.append(parent)
        return seen

    after_model = {s for s in parents if "train" in upstream(s)} - {"evaluate", "distill"}
    assert any(s.startswith("export@") for s in after_model)
    missing = sorted(s for s in after_model if "evaluate" not in upstream(s))
    assert missing == [], f"stages that skip the accuracy floor: {missing}"
