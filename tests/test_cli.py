"""Every entry point turns bad input into one `error: ...` line and exit 2, before it touches
anything; and never calls out for telemetry, whoever starts it."""

from __future__ import annotations

import importlib
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipelines.cli import EXIT_REJECTED
from pipelines.config import STAGES
from tests.helpers import REPO

# One bad value per stage, in the stage's own section where it has one (tune: the case).
BAD = {
    "prepare": ("prepare.val_fraction", 2),
    "validate": ("validate.max_duplicate_fraction", 5),
    "tune": ("train.lr", 0),
    "train": ("train.epochs", 100_000_000),
    "evaluate": ("evaluate.batch_size", 0),
    "distill": ("distill.alpha", 2),
    "export": ("export.opset", 1),
    "quantize": ("quantize.calibration_method", "bogus"),
    "convert": ("convert.opt_batch", 0),
    "select": ("select.policy", "fastest"),
    "prune": ("prune.epochs", 0),
}


def stage_commands() -> dict[str, list[str]]:
    """dvc.yaml's stage commands as argv lists (a `foreach` stage: its first item)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    commands = {}
    for name, stage in stages.items():
        cmd = stage["cmd"] if "cmd" in stage else stage["do"]["cmd"]
        if "foreach" in stage:
            items = stage["foreach"]
            key, item = next(iter(items.items())) if isinstance(items, dict) else (0, items[0])
            cmd = cmd.replace("${key}", str(key)).replace("${item}", str(item))
        commands[name] = shlex.split(cmd)
    return commands


COMMANDS = stage_commands()


def write_params(root: Path, key: str, value: Any) -> None:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[leaf] = value
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_every_stage_has_a_bad_param_case() -> None:
    assert set(COMMANDS) == set(BAD) == set(STAGES)


@pytest.mark.parametrize("stage", sorted(COMMANDS))
def test_a_bad_param_is_one_error_line_and_exit_2(
    stage: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    python, dash_m, module, *args = COMMANDS[stage]
    assert (python, dash_m) == ("python", "-m")
    key, value = BAD[stage]
    write_params(tmp_path, key, value)
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == EXIT_REJECTED
    err = capsys.readouterr().err
    assert err.startswith(f"error: params.yaml: invalid parameters: {key}: "), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written


def test_tune_cli_rejects_a_bad_param_without_a_traceback(tmp_path: Path) -> None:
    """The issue's case, as `dvc exp run -S train.lr=0` runs it: a real process."""
    write_params(tmp_path, "train.lr", 0)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, *COMMANDS["tune"][1:]],
        check=False,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_REJECTED, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: params.yaml: invalid parameters: train.lr: Input should be greater than 0 (got 0)"
    ]


@pytest.mark.parametrize("key", ["train.device", "tune.space.train.device"])
def test_tune_checks_cuda_once_before_the_first_trial(
    key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import torch

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tune"]["enabled"] = True
    if key == "train.device":
        raw["train"]["device"] = "cuda"
    else:
        raw["tune"]["space"]["train.device"] = {"type": "categorical", "choices": ["cpu", "cuda"]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from pipelines.tune import main

    for argv in (COMMANDS["tune"][3:], ["--prepared", "data/prepared", "--worker"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == EXIT_REJECTED
        err = capsys.readouterr().err
        assert err == f"error: {key}: 'cuda' but this host has no CUDA device; use auto or cpu\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # no study, no trial


@pytest.mark.parametrize("module", ["flows.package", "flows.deployments"])
def test_other_clis_reject_a_bad_param(
    module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_params(tmp_path, "register.tolerance", 2)
    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(["--params", str(tmp_path / "params.yaml")])
    assert info.value.code == EXIT_REJECTED
    err = capsys.readouterr().err
    assert "invalid parameters: register.tolerance: " in err and "Traceback" not in err


# --- telemetry --------------------------------------------------------------------------------

PROBE = """
import importlib, json, os, sys
importlib.import_module(sys.argv[1])
print(json.dumps({key: os.environ.get(key) for key in sys.argv[2:]}))
"""


@pytest.mark.parametrize("module", ["pipelines.prepare", "flows.train", "service"])
def test_entry_points_switch_telemetry_off_in_a_clean_environment(module: str) -> None:
    """Started without any of the switches (not through `make`), the project's entry points
    set them before the libraries are imported; a value the user set is kept."""
    from pipelines import TELEMETRY_OFF

    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF}
    env.update(PYTHONPATH=str(REPO), DO_NOT_TRACK="false")  # the user's own choice
    done = subprocess.run(
        [sys.executable, "-c", PROBE, module, *TELEMETRY_OFF],
        check=True,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    seen = yaml.safe_load(done.stdout.splitlines()[-1])
    assert seen == {**TELEMETRY_OFF, "DO_NOT_TRACK": "false"}


def test_prefect_reads_the_switch_when_a_flow_module_is_run(tmp_path: Path) -> None:
    """`python -m flows.<name>`: the package sets the switches before Prefect reads its
    settings (Prefect initialises its analytics when it is imported)."""
    from pipelines import TELEMETRY_OFF

    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF}
    env["PYTHONPATH"] = str(REPO)
    probe = (
        "import flows.train\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.analytics_enabled)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.stdout.splitlines()[-1] == "False"


def test_deployed_flow_runs_get_the_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker starts each flow run as `python -m prefect.engine`: Prefect is imported before
    the flow's code, so the deployment's job variables carry the switches."""
    from flows.deployments import job_variables
    from pipelines import TELEMETRY_OFF

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")  # set by the deploying user: kept
    for variables in (job_variables(None, None), job_variables("file:///x.git", None)):
        env = variables["env"]
        assert {k: env[k] for k in TELEMETRY_OFF} == {
            **TELEMETRY_OFF,
            "MLFLOW_DISABLE_TELEMETRY": "false",
        }
