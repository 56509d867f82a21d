"""A stage dies with whoever started it, and holds the state it keeps between runs alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.config import load_params, section_dict
from pipelines.errors import InUseError
from pipelines.lifecycle import exclusive
from tests.helpers import REPO
from tests.helpers.locks import held_elsewhere

# A parent that starts a stage-like child (its body runs under run_cli, as every stage's does),
# prints the child's PID and waits for it.
# A parent that starts a stage-like child (its body runs under run_cli, as every stage's does)
# either directly or, as `dvc repro` does, through a shell (`sh -c`; dash does not exec it), and
# waits for it. The child prints its PID once past run_cli's start.
PARENT = """
import shlex, subprocess, sys
how, code, params = sys.argv[1:]
argv = [sys.executable, "-c", code, params]
if how == "shell":
    argv = ["/bin/sh", "-c", shlex.join(argv)]
subprocess.Popen(argv).wait()
"""
CHILD = """
import os, sys, time
from pipelines.cli import run_cli
def body(params):
    print(os.getpid(), flush=True)
    time.sleep(120)
run_cli(body, sys.argv[1])
"""


def gone(pid: int, within_s: float) -> bool:
    """Whether `pid` exits within `within_s`: no longer listed, or a zombie (dead, not yet
    reaped) whose threads have all ended (its files, and so its locks, are released only then)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            threads = len(list(Path(f"/proc/{pid}/task").iterdir()))
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X") and threads <= 1:
            return True
        time.sleep(0.05)
    return False


def test_a_second_holder_fails_at_once_naming_the_first(tmp_path: Path) -> None:
    target = tmp_path / "checkpoints" / "train"
    with held_elsewhere(target) as pid:
        start = time.monotonic()
        with pytest.raises(InUseError) as refused, exclusive(target):
            pytest.fail("entered a held lock")
        assert time.monotonic() - start < 5  # no waiting for the holder
        assert str(refused.value) == f"{target} is in use by PID {pid}"
    with exclusive(target):  # the holder was killed: the kernel dropped its lock
        assert (tmp_path / "checkpoints" / ".train.lock").read_text() == f"{os.getpid()}\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("how", ["direct", "shell"])
def test_a_killed_parent_takes_its_stage_down(how: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, how, CHILD, str(REPO / "params.yaml")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())  # past run_cli's start
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert gone(child, within_s=10), f"stage {child} outlived its killed parent"
    finally:
        if not gone(child, within_s=0.1):
            os.kill(child, signal.SIGKILL)


def test_a_second_tune_stage_on_the_same_sqlite_study_fails_fast(
    prepared: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pipelines.tune import main

    params = load_params(REPO / "params.yaml", overrides={"tune.enabled": True})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(section_dict(params), sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLOPS_TUNE_STORAGE", raising=False)
    study = Path(params.tune.storage.removeprefix("sqlite:///"))
    argv = ["--prepared", str(prepared), "--out", "best.json", "--metrics", "tune.json"]
    with held_elsewhere(study) as pid, pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {study} is in use by PID {pid}"
    assert not Path("best.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_kill_9_of_dvc_repro_takes_train_down_and_the_rerun_resumes(
    prepared: Path, tmp_path: Path
) -> None:
    """The issue's case: `kill -9` of `dvc repro` during `train` left it running, orphaned."""
    params = load_params(
        REPO / "params.yaml",
        overrides={"train.epochs": 500, "train.patience": 500, "train.device": "cpu"},
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(section_dict(params), sort_keys=False))
    command = (
        f"{sys.executable} -m pipelines.train --prepared {prepared} --model model.pt "
        "--metrics train.json --plots train.csv --checkpoint-dir checkpoints/train"
    )
    stage = {"cmd": command, "params": ["train"], "outs": ["model.pt"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": stage}}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}
    env.pop("SHELL", None)  # dvc then runs the stage through /bin/sh, which does not exec it
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True
    )
    repro = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=tmp_path, env=env, start_new_session=True
    )
    lock = tmp_path / "checkpoints" / ".train.lock"
    deadline = time.monotonic() + 120
    while not list((tmp_path / "checkpoints" / "train").glob("epoch-*.ckpt")):
        assert repro.poll() is None, "dvc repro ended before train wrote a checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.1)
    stage_pid = int(lock.read_text())
    repro.send_signal(signal.SIGKILL)  # dvc alone: its stage is in the same session, not killed
    repro.wait()
    try:
        assert gone(stage_pid, within_s=10), "train outlived the killed dvc repro"
    finally:
        if not gone(stage_pid, within_s=0.1):
            os.killpg(repro.pid, signal.SIGKILL)
    with exclusive(tmp_path / "checkpoints" / "train"):  # a rerun is not refused as "in use"
        assert list((tmp_path / "checkpoints" / "train").glob("epoch-*.ckpt"))  # and resumes
