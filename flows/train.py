"""The `train` flow: the stages of dvc.yaml, in DVC's order, one Prefect task run each.

Operations only: which stages run is DVC's business (`dvc repro --single-item`, so an up-to-date
stage is skipped and shown as such); this flow adds parameters from the UI, retries, timeouts,
the `gpu` concurrency limit, the MLflow parent run, and links to the results.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.states import Completed, State
from prefect.tasks import exponential_backoff

from flows.params_file import effective_params, overridden_params_file
from pipelines.cli import EXIT_REJECTED
from pipelines.config import Arch, BatchSize, DataSource, Epochs, LearningRate, Params, RunOverrides
from pipelines.tracking import PARENT_ENV, end_parent_run, start_parent_run

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SKIPPED = re.compile(r"Stage '[^']+' didn't change, skipping|is cached - skipping run")


class StageFailed(RuntimeError):
    """A stage process failed; it may succeed on a retry (crash, lost resource, timeout)."""


class StageRejected(RuntimeError):
    """A stage rejected its input (bad params, failed data validation): retrying cannot help."""


def stage_order(root: Path) -> list[str]:
    """The stages of dvc.yaml in an order DVC would run them (dependencies first)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        return [stage.addressing for stage in reversed(list(nx.topological_sort(graph)))]


def _retryable(task: Any, task_run: Any, state: State[Any]) -> bool:
    return not isinstance(state.data, StageRejected)


@task(retry_condition_fn=_retryable, log_prints=True)
def run_stage(stage: str, root: Path, env: Mapping[str, str], timeout_s: float) -> State[Any]:
    """`dvc repro --single-item <stage>` in its own process group, its output in the task log."""
    logger = get_run_logger()
    command = ["dvc", "repro", "--single-item", stage]
    logger.info("$ %s", shlex.join(command))
    lines = _run_streaming(command, root, env, timeout_s, logger.info)
    output = "\n".join(lines)
    if SKIPPED.search(output):
        return Completed(message=f"{stage}: up to date in DVC, not re-run", name="Cached")
    return Completed(message=f"{stage}: ran")


def _run_streaming(
    command: list[str], root: Path, env: Mapping[str, str], timeout_s: float, emit: Any
) -> list[str]:
    """Run `command`, sending each output line to `emit`; kill its group past `timeout_s`."""
    proc = subprocess.Popen(
        command,
        cwd=root,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=_pump, args=(proc, lines, emit), daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise StageFailed(f"{shlex.join(command)}: timed out after {timeout_s:g} s") from None
    reader.join()
    _raise_for_exit(command, code, lines)
    return lines


def _pump(proc: subprocess.Popen[str], lines: list[str], emit: Any) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        emit(line.rstrip())


def _raise_for_exit(command: list[str], code: int, lines: list[str]) -> None:
    if code == 0:
        return
    errors = [line for line in lines if line.startswith("error: ")]
    detail = "\n".join(errors) or "\n".join(lines[-20:])
    rejected = re.search(rf"exited with {EXIT_REJECTED}\b", "\n".join(lines))
    kind = StageRejected if rejected else StageFailed
    raise kind(f"{shlex.join(command)} failed (exit {code}):\n{detail}")


@contextlib.contextmanager
def gpu_slot(stage: str, params: Params) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `gpu` around GPU stages."""
    if stage not in params.orchestration.gpu_stages:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency("gpu", occupy=1, strict=True):
        yield


def run_stages(params: Params, root: Path, parent_run_id: str) -> dict[str, str]:
    """Each stage as its own task run, in order; returns stage -> final state name."""
    cfg = params.orchestration
    env = {PARENT_ENV: parent_run_id}
    states: dict[str, str] = {}
    for stage in stage_order(root):
        configured = run_stage.with_options(
            name=stage,
            retries=cfg.retries,
            retry_delay_seconds=exponential_backoff(cfg.retry_delay_s) if cfg.retry_delay_s else 0,
        )
        timeout = cfg.stage_timeout_s.get(stage, max(cfg.stage_timeout_s.values()))
        with gpu_slot(stage, params):
            state = configured(stage, root, env, timeout, return_state=True)
        states[stage] = state.name or state.type.value
        state.result()  # raises the stage's error: later stages never run
    return states


@flow(name="train", log_prints=True)
def train(
    epochs: Epochs | None = None,
    lr: LearningRate | None = None,
    batch_size: BatchSize | None = None,
    arch: Arch | None = None,
    data_source: DataSource | None = None,
    project_dir: str | None = None,
) -> dict[str, Any]:
    """Run the DVC pipeline (prepare → validate → train → evaluate), tracked in MLflow.

    Leave a value empty to use params.yaml's. `project_dir` is the checkout to run in
    (default: this file's project, or $MLOPS_PROJECT_DIR on a worker).
    """
    root = Path(project_dir or os.environ.get("MLOPS_PROJECT_DIR") or PROJECT_ROOT).resolve()
    overrides = RunOverrides(
        epochs=epochs, lr=lr, batch_size=batch_size, arch=arch, data_source=data_source
    )
    params = effective_params(root, overrides)  # rejects a bad value before any stage runs
    with overridden_params_file(root, overrides):
        parent = start_parent_run(params, root, name="train-flow")
        try:
            states = run_stages(params, root, parent)
        except BaseException:
            end_parent_run(params, root, parent, status="FAILED")
            _publish(params, root, parent, overrides, failed=True)
            raise
        end_parent_run(params, root, parent)
    return {
        "mlflow_parent_run_id": parent,
        "stages": states,
        **_publish(params, root, parent, overrides),
    }


def _publish(
    params: Params, root: Path, parent: str, overrides: RunOverrides, failed: bool = False
) -> dict[str, Any]:
    """Prefect artifacts: the MLflow run link, the Data Docs location, metrics, how to reproduce."""
    from flows.reporting import metrics_table, mlflow_run_url, reproduce_command

    url = mlflow_run_url(params, root, parent)
    create_link_artifact(url, link_text="MLflow parent run", key="mlflow-run")
    docs = root / "reports" / "validate" / "index.html"
    create_link_artifact(docs.as_uri(), link_text="Great Expectations Data Docs", key="data-docs")
    table = metrics_table(root)
    create_markdown_artifact(
        f"{table}\n\n**Reproduce:** `{reproduce_command(overrides)}`",
        key="run-metrics",
        description="Failed run: metrics of the stages that finished" if failed else None,
    )
    return {"mlflow_run_url": url, "data_docs": str(docs)}


def ensure_gpu_limit(slots: int = 1) -> None:
    """Create the global concurrency limit `gpu` if the server has none (an existing one stays)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name("gpu")
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name="gpu", limit=slots)
            )


def main() -> None:
    """The main job: the `train` flow on params.yaml, on a temporary local Prefect server
    unless PREFECT_API_URL points at one."""
    ensure_gpu_limit()
    result = train()
    print(f"stages: {result['stages']}\nMLflow parent run: {result['mlflow_run_url']}")


if __name__ == "__main__":
    main()
