"""The `tune-worker` flow: one more Optuna worker on the shared study, run by a training host.

The `tune` stage (dvc.yaml) runs `tune.workers` workers on its own host. To let more hosts join
the study, point every host at one PostgreSQL storage (`MLOPS_TUNE_STORAGE` in the Prefect
worker's environment) and run this flow there (deployment `tune-worker/on-demand`, see
flows/deployments.py): it brings the prepared data up to date with DVC (`validate` and what it
needs; deterministic, so the study name, which fingerprints the data, is the same on every
host), then runs `python -m pipelines.tune --worker` until the study holds `tune.trials`
trials, `trials` of its own are done, or `tune.timeout_s`.
The trials show in MLflow under a `tune-worker` run.
"""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Annotated, Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from flows.dvc_outputs import prepared_dir
from flows.train import PROJECT_ROOT, StageFailed
from pipelines.config import environment, load_params

STAGE = "tune"
DATA_STAGE = "validate"  # brings the prepared data up to date (and checks it) first


def run_logged(command: list[str], root: Path, timeout_s: float) -> None:
    """Run `command` in `root`, its output in the task's log; StageFailed when it fails."""
    logger = get_run_logger()
    logger.info("$ %s", shlex.join(command))
    try:
        done = subprocess.run(
            command, cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise StageFailed(f"{command[2]} ran past {timeout_s:.0f} s and was killed") from None
    for line in (done.stdout + done.stderr).splitlines()[-200:]:
        logger.info(line)
    if done.returncode != 0:
        raise StageFailed(f"{shlex.join(command)} exited with {done.returncode}")


@task(cache_policy=NO_CACHE, task_run_name="prepare-data")
def prepare_data(root: Path, timeout_s: float) -> None:
    run_logged([sys.executable, "-m", "dvc", "repro", DATA_STAGE], root, timeout_s)


def host_worker_index() -> int:
    """A sampler seed offset of this host's own (tune.seed + it): stable across runs, and apart
    from the stage's local workers 0 .. tune.workers - 1."""
    return 1000 + zlib.crc32(socket.gethostname().encode()) % 1_000_000


@task(cache_policy=NO_CACHE, task_run_name="tune-worker")
def run_worker(root: Path, trials: int | None, timeout_s: float) -> None:
    command = [sys.executable, "-m", "pipelines.tune", "--prepared", str(prepared_dir(root))]
    command += ["--worker", "--worker-index", str(host_worker_index())]
    if trials:
        command += ["--trials", str(trials)]
    run_logged(command, root, timeout_s)


@flow(name="tune-worker", log_prints=True)
def tune_worker(
    trials: Annotated[int, Field(gt=0)] | None = None, project_dir: str | None = None
) -> dict[str, Any]:
    """Join the shared Optuna study as one more worker.

    `trials`: at most this many trials from this worker (empty: until the study is full or
    `tune.timeout_s`). `project_dir`: the checkout (default: $MLOPS_PROJECT_DIR)."""
    root = Path(project_dir or environment().project_dir or PROJECT_ROOT).resolve()
    params = load_params(root / "params.yaml")
    timeouts = params.orchestration.stage_timeout_s
    prepare_data(root, timeouts.get(DATA_STAGE, max(timeouts.values())))
    run_worker(root, trials, timeouts.get(STAGE, max(timeouts.values())))
    return {"project_dir": str(root), "trials": trials}
