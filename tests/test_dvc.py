"""End to end with real DVC: `dvc repro` in a copy of this repository (slow tier)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows.train import stage_order
from tests.helpers import REPO

pytestmark = pytest.mark.slow
FAST = {  # a quick, barely trained model: its logits are close, so quantization moves more
    "  epochs: 30": "  epochs: 2",
    "  width: 32": "  width: 8",
    "min_accuracy: 0.8": "min_accuracy: 0.3",  # it scores ~0.5: the floor set for it
    "parity_min_agreement: 0.97": "parity_min_agreement: 0.8",
    "latency_iters: 300": "latency_iters: 50",
    "throughput_iters: 60": "throughput_iters: 10",
    # pruning: one ratio, one fine-tuning epoch (the stage still runs, exports and quantizes it)
    "ratios: [0.3, 0.5]": "ratios: [0.3]",
    "  epochs: 3 ": "  epochs: 1 ",  # prune.epochs (train's is 30: no match)
}


def copy_project(dest: Path, edits: dict[str, str] = FAST) -> Path:
    """The repo's tracked and new (non-ignored) files, params.yaml with `edits` (text
    replacements), committed in a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in listed:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    edit_params(dest, edits)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        subprocess.run(git, cwd=dest, check=True)
    return dest


def edit_params(root: Path, replacements: dict[str, str]) -> None:
    text = (root / "params.yaml").read_text()
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    (root / "params.yaml").write_text(text)


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns' / 'test.db'}"
    command = [sys.executable, "-m", "dvc", *args]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


STAGES = set(stage_order(REPO))


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = copy_project(tmp_path_factory.mktemp("project"))
    first = dvc(root, "exp", "run", "--name", "first")  # in the workspace, as `dvc repro` does
    assert ran(first.stdout) == STAGES
    yield root


def test_first_experiment_runs_every_stage_under_one_mlflow_parent(project: Path) -> None:
    """`dvc exp run` names the experiment in each stage's environment: one parent run, named
    after it (see pipelines.tracking)."""
    for name in ("prepare", "validate", "train", "evaluate"):
        assert (project / "metrics" / f"{name}.json").is_file()
    assert (project / "reports" / "validate" / "index.html").is_file()
    assert (project / "plots" / "evaluate" / "confusion_matrix.png").is_file()
    from pipelines.reference import load_reference  # select's reference profile (issue 16)

    assert load_reference(project / "models" / "select" / "reference").rows > 0
    client = MlflowClient(f"sqlite:///{project / 'mlruns' / 'test.db'}")
    runs = client.search_runs(client.get_experiment_by_name("digits").experiment_id)
    stages = [r for r in runs if "mlops.stage" in r.data.tags]
    parents = {r.data.tags["mlflow.parentRunId"] for r in stages}
    assert sorted(r.data.tags["mlops.stage"] for r in stages) == sorted(STAGES)
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert (parent.info.status, parent.info.run_name) == ("FINISHED", "first")


def test_second_repro_runs_nothing(project: Path) -> None:
    again = dvc(project, "repro")
    assert ran(again.stdout) == set()
    assert "up to date" in again.stdout


def test_one_train_param_reruns_only_what_depends_on_it(project: Path) -> None:
    edit_params(project, {"  lr: 0.003": "  lr: 0.002"})
    changed = ran(dvc(project, "repro").stdout)
    assert {"train", "evaluate"} <= changed == STAGES - {"prepare", "validate"}


def test_one_evaluate_param_reruns_only_evaluate(project: Path) -> None:
    edit_params(project, {"  batch_size: 512": "  batch_size: 256"})
    assert ran(dvc(project, "repro").stdout) == {"evaluate"}


def test_failed_validation_stops_the_pipeline(project: Path) -> None:
    edit_params(project, {"value_range: [0.0, 16.0]": "value_range: [0.0, 8.0]"})
    failed = dvc(project, "repro", check=False)
    assert failed.returncode != 0
    assert ran(failed.stdout) == {"prepare", "validate"}  # train never starts
    assert "px_" in failed.stdout + failed.stderr  # names the failing columns
