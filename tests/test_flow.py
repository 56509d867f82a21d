"""The `train` flow and the deployments, against one Prefect test harness per session.

The flow runs a tiny fake DVC project (stages are a few lines of Python) so these stay fast;
the real stages run in the slow tier (tests/test_flow_e2e.py).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun
from prefect.exceptions import ParameterTypeError
from prefect.states import State

from flows import deployments
from flows.params_file import render_overridden
from flows.reporting import NO_DATA_DOCS, reproduce_command
from flows.train import StageFailed, StageRejected, ensure_gpu_limit, stage_order, train
from pipelines import telemetry_off
from pipelines.cli import EXIT_REJECTED
from pipelines.config import RunOverrides
from pipelines.errors import ParamsError
from tests.helpers import REPO

STAGE_SCRIPT = '''
"""A fake stage. FAKE_<STAGE>="exit:<code>:<times>" fails the first <times> attempts with
<code>; FAKE_<STAGE>="hang:<times>" starts a child process and sleeps, <times> times;
FAKE_<STAGE>="wait:<file>" waits until <file> exists. Attempts are counted in $FAKE_ATTEMPTS
(default: ./attempts), which outlives a run's experiment worktree."""
import json, os, pathlib, subprocess, sys, time
import yaml

stage = sys.argv[1]
tries = pathlib.Path(os.environ.get("FAKE_ATTEMPTS", "attempts")) / stage
tries.parent.mkdir(exist_ok=True)
attempt = int(tries.read_text()) + 1 if tries.exists() else 1
partial = tries.with_name(f"{stage}.{os.getpid()}.tmp")  # the test reads it while we write
partial.write_text(str(attempt))
partial.replace(tries)
mode = os.environ.get(f"FAKE_{stage.upper()}", "")
if mode.startswith("exit:"):
    _, code, times = mode.split(":")
    if attempt <= int(times):
        print(f"error: {stage} was told to fail:", file=sys.stderr)
        print("  column x: 3 rows\\nsome later output", file=sys.stderr)
        sys.exit(int(code))
if mode.startswith("wait:"):  # until the file named after "wait:" exists (at most 300 s)
    deadline = time.monotonic() + 300
    while not pathlib.Path(mode[5:]).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
if mode.startswith("hang:") and attempt <= int(mode.split(":")[1]):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    (tries.parent / f"{stage}.child").write_text(str(child.pid))
    time.sleep(300)
epochs = yaml.safe_load(open("params.yaml"))["train"]["epochs"]
for folder in ("out", "metrics"):
    pathlib.Path(folder).mkdir(exist_ok=True)
pathlib.Path(f"out/{stage}.txt").write_text(f"{stage} epochs={epochs}")
json.dump({"epochs": epochs, "score": 0.5}, open(f"metrics/{stage}.json", "w"))
print(f"{stage} done")
'''

# Listed last-first: the order must come from the dependency graph, not from the file.
DVC_YAML = """
stages:
  evaluate:
    cmd: python stage.py evaluate
    deps: [stage.py, out/train.txt]
    outs: [out/evaluate.txt]
    metrics: [{metrics/evaluate.json: {cache: false}}]
  train:
    cmd: python stage.py train
    deps: [stage.py, out/prepare.txt]
    params: [train.epochs]
    outs: [out/train.txt]
    metrics: [{metrics/train.json: {cache: false}}]
  prepare:
    cmd: python stage.py prepare
    deps: [stage.py]
    outs: [out/prepare.txt]
    metrics: [{metrics/prepare.json: {cache: false}}]
"""
STAGES = ["prepare", "train", "evaluate"]


@pytest.fixture(scope="session")
def prefect_api(isolated_stores: Path) -> Iterator[None]:
    """One Prefect test harness (temporary server and database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    os.environ["DO_NOT_TRACK"] = "true"  # Prefect's and MLflow's client telemetry: off
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with prefect_test_harness(server_startup_timeout=120):
        ensure_gpu_limit()
        yield


@pytest.fixture
def fake_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A git + DVC project with three fake stages and a copy of params.yaml (fast settings),
    committed."""
    for name in STAGES:
        monkeypatch.delenv(f"FAKE_{name.upper()}", raising=False)
    monkeypatch.setenv("FAKE_ATTEMPTS", str(tmp_path / "project" / "attempts"))
    return make_fake_project(tmp_path / "project")


def make_fake_project(root: Path) -> Path:
    """The fake project (STAGE_SCRIPT, DVC_YAML) at `root`, a git + DVC repository."""
    from dvc.repo import Repo

    root.mkdir()
    (root / "stage.py").write_text(STAGE_SCRIPT)
    (root / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    timeouts = dict.fromkeys(STAGES, 60)
    set_orchestration(root, retries=1, retry_delay_s=0, stage_timeout_s=timeouts, gpu_stages=[])
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    Repo.init(str(root)).close()
    git_commit(root, "fake project")
    return root


GIT_IDENTITY = ["-c", "user.name=test", "-c", "user.email=test@localhost"]


def git_commit(root: Path, message: str) -> None:
    """Commit everything in `root` (a run with overrides needs a commit for its experiment)."""
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    subprocess.run(["git", *GIT_IDENTITY, "commit", "-qm", message], cwd=root, check=True)


def set_orchestration(root: Path, **values: Any) -> None:
    """Change keys of the project's `orchestration` section (comments kept)."""
    from ruamel.yaml import YAML

    parser = YAML()
    path = root / "params.yaml"
    doc = parser.load(path.read_text())
    doc["orchestration"].update(values)
    with path.open("w") as out:
        parser.dump(doc, out)


def run_flow(root: Path, **parameters: Any) -> State[Any]:
    state: State[Any] = train(project_dir=str(root), return_state=True, **parameters)
    return state


def of_run(state: State[Any]) -> FlowRunFilter:
    """A filter for the flow run that ended in `state`."""
    assert state.state_details.flow_run_id is not None
    return FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))


def task_runs(state: State[Any]) -> dict[str, TaskRun]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=of_run(state))
    return {run.name: run for run in runs}


def attempts(root: Path, stage: str) -> int:
    path = root / "attempts" / stage
    return int(path.read_text()) if path.exists() else 0


def test_stage_order_comes_from_the_dependency_graph(fake_project: Path) -> None:
    assert stage_order(fake_project) == STAGES


def test_stages_run_as_task_runs_then_show_as_cached(prefect_api: None, fake_project: Path) -> None:
    first = run_flow(fake_project)
    assert first.is_completed(), first
    result = first.result()
    assert result["stages"] == dict.fromkeys(STAGES, "Completed")
    runs = task_runs(first)
    assert sorted(runs) == sorted(STAGES)
    assert all(run.state and run.state.is_completed() for run in runs.values())
    assert (fake_project / "out" / "evaluate.txt").exists()

    again = run_flow(fake_project)
    assert again.result()["stages"] == dict.fromkeys(STAGES, "Cached")
    assert {stage: attempts(fake_project, stage) for stage in STAGES} == dict.fromkeys(STAGES, 1)

    forced = run_flow(fake_project, force=True)
    assert forced.result()["stages"] == dict.fromkeys(STAGES, "Completed")


@pytest.mark.parametrize("promoted", [True, False])
def test_only_a_champion_that_moved_is_packaged(
    prefect_api: None, fake_project: Path, monkeypatch: pytest.MonkeyPatch, promoted: bool
) -> None:
    """A rerun whose model is already the champion (`promoted` false) packages nothing."""
    import flows.dvc_outputs
    import flows.package
    import flows.register
    import flows.train

    decision = flows.register.Decision("1", "champion", 0.97, "1", 0.97, "unchanged", promoted)
    packaged: list[str] = []
    monkeypatch.setattr(flows.train, "SELECT_STAGE", "evaluate")  # the fake graph's last stage
    monkeypatch.setattr(flows.dvc_outputs, "stage_output", lambda root, stage: root / stage)
    monkeypatch.setattr(flows.register, "register", lambda *args: decision)
    fake = flows.package.Packaged("1", "m:1", "b:1", "/a.bento")
    monkeypatch.setattr(flows.package, "package", lambda *args: packaged.append("b:1") or fake)
    result = run_flow(fake_project).result()
    assert result["register"]["promoted"] is promoted
    assert (result["package"] is not None, packaged) == (promoted, ["b:1"] if promoted else [])


def fake_champion(monkeypatch: pytest.MonkeyPatch, promoted: bool) -> None:
    """register and package replaced: registry version 1 is (or is not) a new champion."""
    import flows.dvc_outputs
    import flows.package
    import flows.register
    import flows.train

    decision = flows.register.Decision("1", "champion", 0.97, None, None, "new", promoted)
    monkeypatch.setattr(flows.train, "SELECT_STAGE", "evaluate")  # the fake graph's last stage
    monkeypatch.setattr(flows.dvc_outputs, "stage_output", lambda root, stage: root / stage)
    monkeypatch.setattr(flows.register, "register", lambda *args: decision)
    fake = flows.package.Packaged("1", "m:1", "b:1", "/a.bento", "bento/b-1.bento")
    monkeypatch.setattr(flows.package, "package", lambda *args: fake)


def set_deploy(root: Path, **values: Any) -> None:
    """Change keys of the project's `deploy` section."""
    from ruamel.yaml import YAML

    parser = YAML()
    path = root / "params.yaml"
    doc = parser.load(path.read_text())
    doc["deploy"].update(values)
    with path.open("w") as out:
        parser.dump(doc, out)


@pytest.fixture
def deploy_deployment(prefect_api: None) -> Iterator[UUID]:
    """A stand-in `deploy/on-demand` (no pool, no worker: its runs stay Scheduled); removed, with
    its runs, afterwards."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name("deploy")
        deployment_id = client.create_deployment(flow_id, "on-demand")
    try:
        yield deployment_id
    finally:
        with get_client(sync_client=True) as client:
            ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            for run in client.read_flow_runs(deployment_filter=ours):
                client.delete_flow_run(run.id)
            client.delete_deployment(deployment_id)


def deploy_runs(deployment_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    ours = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(deployment_filter=ours)


def test_a_new_champion_starts_the_deploy_deployment_and_nothing_else_does(
    deploy_deployment: UUID, fake_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy.on_new_champion: a new champion starts `deploy/on-demand` for its registry version
    and the train run does not wait for it; a challenger, or the switch off, starts nothing."""
    fake_champion(monkeypatch, promoted=False)  # a challenger (or an unchanged champion)
    assert run_flow(fake_project).result()["deploy"] is None
    set_deploy(fake_project, on_new_champion=False)
    fake_champion(monkeypatch, promoted=True)
    assert run_flow(fake_project).result()["deploy"] is None
    assert deploy_runs(deploy_deployment) == []

    set_deploy(fake_project, on_new_champion=True)
    state = run_flow(fake_project)
    assert state.is_completed(), state
    started = state.result()["deploy"]
    [run] = deploy_runs(deploy_deployment)
    assert started == {"flow_run_id": str(run.id), "flow_run_name": run.name}
    assert run.parameters == {"version": "1"}
    assert run.state is not None and run.state.is_scheduled()  # started, not waited for
    log = flow_log(state, "deploy: started")
    assert f"deploy: started deploy/on-demand for version 1: flow run {run.name}" in log


def test_no_deploy_deployment_is_one_warning_and_the_run_completes(
    prefect_api: None, fake_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_champion(monkeypatch, promoted=True)
    state = run_flow(fake_project)
    assert state.is_completed(), state
    assert state.result()["deploy"] is None
    log = flow_log(state, "python -m flows.deployments")
    lines = [line for line in log.splitlines() if "no deployment deploy/on-demand" in line]
    assert len(lines) == 1 and "version 1 is packaged but not deployed" in lines[0], log


def test_a_gpu_stage_waits_for_a_slot_of_the_gpu_limit(
    prefect_api: None, fake_project: Path
) -> None:
    from prefect.concurrency.sync import concurrency

    set_orchestration(fake_project, gpu_stages=["train"])
    with ThreadPoolExecutor(1) as pool:
        with concurrency("gpu", occupy=1, strict=True):  # another job holds the only slot
            running = pool.submit(run_flow, fake_project)
            wait_until(lambda: attempts(fake_project, "prepare") == 1, timeout_s=60)
            time.sleep(2)
            assert attempts(fake_project, "train") == 0
            assert not running.done()
        state = running.result(timeout=120)
    assert state.is_completed(), state
    assert attempts(fake_project, "train") == 1
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 0


def set_gpu_slots_taken(taken: int) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitUpdate

    with get_client(sync_client=True) as client:
        update = GlobalConcurrencyLimitUpdate(active_slots=taken)
        client.update_global_concurrency_limit("gpu", update)


def flow_log(state: State[Any], expected: str, timeout_s: float = 30) -> str:
    """The flow run's own log lines, once they hold `expected` (shipped in the background)."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    assert state.state_details.flow_run_id is not None
    wanted = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            text = "\n".join(log.message for log in client.read_logs(wanted))
        if expected in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def test_a_gpu_stage_says_it_waits_and_gives_up_on_a_stale_slot(
    prefect_api: None, fake_project: Path
) -> None:
    """A slot no lease holds (what a server restart with in-memory leases left behind): the
    stage logs that it waits, and the run fails after orchestration.gpu_wait_s with an error
    that says how to free the slot, instead of hanging."""
    from flows.train import RESET_GPU_LIMIT, GpuSlotUnavailable

    set_orchestration(fake_project, gpu_stages=["train"], gpu_wait_s=2)
    set_gpu_slots_taken(1)
    try:
        state = run_flow(fake_project)
    finally:
        set_gpu_slots_taken(0)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, GpuSlotUnavailable), error
    assert "within 2 s (orchestration.gpu_wait_s)" in str(error)
    assert RESET_GPU_LIMIT in str(error)
    assert (attempts(fake_project, "prepare"), attempts(fake_project, "train")) == (1, 0)
    waiting = "train waits for a slot of the global concurrency limit 'gpu' (1 of 1 taken)"
    assert waiting in flow_log(state, waiting)


def test_a_finished_gpu_stage_is_not_failed_by_a_lost_release(
    prefect_api: None, fake_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server is unreachable when the stage releases its slot: the run still completes,
    and the slot is released when the flow run ends (Prefect retries leftover leases)."""
    import httpx
    from prefect.client.orchestration import PrefectClient

    async def unreachable(self: Any, lease_id: UUID) -> None:
        raise httpx.ConnectError("All connection attempts failed")

    monkeypatch.setattr(PrefectClient, "release_concurrency_slots_with_lease", unreachable)
    set_orchestration(fake_project, gpu_stages=["train"])
    state = run_flow(fake_project)
    assert state.is_completed(), state
    assert state.result()["stages"]["train"] == "Completed"
    assert "its 'gpu' slot could not be released" in flow_log(state, "could not be released")
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 0


def wait_until(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def test_run_publishes_links_metrics_and_how_to_reproduce(
    prefect_api: None, fake_project: Path
) -> None:
    state = run_flow(fake_project, epochs=3)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        artifacts = {str(a.key): a for a in client.read_artifacts(flow_run_filter=of_run(state))}
    assert set(artifacts) == {"mlflow-run", "data-docs", "run-metrics"}
    parent = state.result()["mlflow_parent_run_id"]
    assert parent in str(artifacts["mlflow-run"].data)
    assert artifacts["data-docs"].data == NO_DATA_DOCS  # the fake dvc.yaml has no validate stage
    table = str(artifacts["run-metrics"].data)
    assert "| train | ran | metrics/train.json | epochs | 3 |" in table
    assert "`dvc exp run --force -S train.epochs=3`" in table


def checkout_files(root: Path) -> dict[str, bytes]:
    """The checkout's files a run with overrides must leave byte for byte as they are."""
    return {name: (root / name).read_bytes() for name in ("params.yaml", "dvc.lock")}


def dvc(root: Path, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def worktrees(root: Path) -> list[str]:
    listed = subprocess.run(
        ["git", "worktree", "list", "--porcelain"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split(" ", 1)[1] for line in listed.splitlines() if line.startswith("worktree ")]


def test_a_run_with_overrides_is_a_dvc_experiment_and_leaves_the_checkout_alone(
    prefect_api: None, fake_project: Path
) -> None:
    """The overrides reach the stages in a worktree of their own; the checkout's params.yaml,
    dvc.lock and outputs stay byte for byte; `dvc exp show` lists the run under the flow run's
    name and `dvc exp apply` brings its params and outputs into the checkout."""
    assert run_flow(fake_project).is_completed()  # the nightly run: dvc.lock in the checkout
    before = checkout_files(fake_project)
    trained = (fake_project / "out" / "train.txt").read_text()
    state = run_flow(fake_project, epochs=7)
    assert state.is_completed(), state
    result = state.result()
    assert result["stages"] == {"prepare": "Cached", "train": "Completed", "evaluate": "Completed"}
    assert checkout_files(fake_project) == before
    assert (fake_project / "out" / "train.txt").read_text() == trained
    assert worktrees(fake_project) == [str(fake_project)]
    assert not any((fake_project / ".dvc" / "tmp" / "flow-runs").iterdir())
    name = result["experiment"]
    assert name == flow_run_name(state)
    assert name in dvc(fake_project, "exp", "show", "--json")
    dvc(fake_project, "exp", "apply", name)
    assert (fake_project / "out" / "train.txt").read_text() == "train epochs=7"
    assert yaml.safe_load((fake_project / "params.yaml").read_text())["train"]["epochs"] == 7


def flow_run_name(state: State[Any]) -> str:
    assert state.state_details.flow_run_id is not None
    with get_client(sync_client=True) as client:
        return str(client.read_flow_run(state.state_details.flow_run_id).name)


RUN_WITH_OVERRIDE = """
import sys
from flows.train import train
train(project_dir=sys.argv[1], epochs=9)
"""


def test_a_killed_run_with_overrides_leaves_the_checkout_alone_and_its_worktree_goes_next_time(
    prefect_api: None, fake_project: Path, tmp_path: Path
) -> None:
    """SIGKILL to the flow process while a stage of a run with overrides runs: params.yaml and
    dvc.lock are byte for byte as before; the next run removes the dead run's worktree."""
    from prefect.settings import PREFECT_API_URL

    assert run_flow(fake_project).is_completed()
    before = checkout_files(fake_project)
    go = tmp_path / "go"
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "FAKE_TRAIN": f"wait:{go}",
    }
    env["PYTHONPATH"] = str(REPO)
    flow = subprocess.Popen(
        [sys.executable, "-c", RUN_WITH_OVERRIDE, str(fake_project)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(lambda: attempts(fake_project, "train") == 2, timeout_s=180)
        assert len(worktrees(fake_project)) == 2  # the run's own, beside the checkout
    finally:  # the whole host goes: the flow process and the stage's own session
        doomed = [flow.pid, *(p.pid for p in psutil.Process(flow.pid).children(recursive=True))]
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        flow.wait()
        go.touch()
    assert checkout_files(fake_project) == before
    assert run_flow(fake_project, epochs=5).is_completed()
    assert worktrees(fake_project) == [str(fake_project)]
    assert not any((fake_project / ".dvc" / "tmp" / "flow-runs").iterdir())
    assert checkout_files(fake_project) == before


def test_rejected_stage_is_not_retried_and_later_stages_never_run(
    prefect_api: None, fake_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_TRAIN", "exit:2:5")
    before = (fake_project / "params.yaml").read_text()
    state = run_flow(fake_project, epochs=4)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, StageRejected)
    assert "train was told to fail" in str(error)
    assert (attempts(fake_project, "train"), attempts(fake_project, "evaluate")) == (1, 0)
    assert task_runs(state)["train"].run_count == 1
    assert (fake_project / "params.yaml").read_text() == before


def test_a_failed_run_names_the_defect_and_shows_only_this_runs_figures(
    prefect_api: None, fake_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flow run's message keeps the indented lines under `error: ` (the failed check, its
    column, the count); the metrics table holds only figures of stages of this run: the earlier
    run's evaluate figures (another model) are left out, not mixed in."""
    epochs = yaml.safe_load((fake_project / "params.yaml").read_text())["train"]["epochs"]
    assert epochs != 4
    assert run_flow(fake_project).is_completed()  # in the checkout: its outputs, dvc.lock
    monkeypatch.setenv("FAKE_EVALUATE", "exit:2:5")
    state = run_flow(fake_project, epochs=4)
    assert state.is_failed()
    message = state.message or ""
    assert "error: evaluate was told to fail:\n  column x: 3 rows" in message
    assert "some later output" not in message
    with get_client(sync_client=True) as client:
        artifacts = {str(a.key): a for a in client.read_artifacts(flow_run_filter=of_run(state))}
    table = str(artifacts["run-metrics"].data)
    assert "| train | ran | metrics/train.json | epochs | 4 |" in table
    assert f"| prepare | up to date | metrics/prepare.json | epochs | {epochs} |" in table
    assert "metrics/evaluate.json" not in table  # the earlier model's figures
    assert "Not in this run (failed or not reached; figures left out): evaluate" in table


def test_the_cli_ends_with_the_defect_and_the_rejected_input_code(
    prefect_api: None,
    fake_project: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`python -m flows.train` on a stage that rejects its input: exit 2, the last lines are
    the defect's, and no traceback anywhere in its output (Prefect's log lines included)."""
    from flows.train import main

    monkeypatch.setenv("MLOPS_PROJECT_DIR", str(fake_project))
    monkeypatch.setenv("FAKE_TRAIN", "exit:2:5")
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    out, err_text = capfd.readouterr()
    assert "Traceback" not in out + err_text
    with_traceback = [r.getMessage() for r in caplog.records if r.exc_info and r.exc_info[0]]
    assert with_traceback == []
    assert any("train was told to fail" in r.getMessage() for r in caplog.records)
    err = err_text.rstrip().splitlines()
    assert err[-2:] == ["error: train was told to fail:", "  column x: 3 rows"]
    assert err[-3].startswith("error: stage 'train' failed (exit 2)")


def test_transient_failure_is_retried(
    prefect_api: None, fake_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_TRAIN", "exit:3:1")
    state = run_flow(fake_project)
    assert state.is_completed(), state
    assert attempts(fake_project, "train") == 2
    assert task_runs(state)["train"].run_count == 2


def test_timeout_kills_the_stage_process_group_and_the_retry_starts_afresh(
    prefect_api: None, fake_project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 s: a `dvc` process and the stage start within it on a loaded host; the others: ample
    set_orchestration(fake_project, stage_timeout_s={"prepare": 300, "train": 20, "evaluate": 300})
    monkeypatch.setenv("FAKE_TRAIN", "hang:1")
    state = run_flow(fake_project)
    assert state.is_completed(), state
    child = int((fake_project / "attempts" / "train.child").read_text())
    assert not alive(child)
    train_run = task_runs(state)["train"]
    assert (train_run.run_count, attempts(fake_project, "train")) == (2, 2)
    expected = f"{StageFailed.__name__}(\"stage 'train' timed out after 20 s; its process"
    assert expected in task_log(train_run, expected)


def task_log(task_run: TaskRun, expected: str, timeout_s: float = 30) -> str:
    """The task run's log as the API has it, once it holds `expected`: Prefect ships log lines
    to the API in the background, so the last ones can arrive after the flow run has ended."""
    from prefect.client.schemas.filters import LogFilter, LogFilterTaskRunId

    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(task_run_id=LogFilterTaskRunId(any_=[task_run.id])))
        text = "\n".join(log.message for log in logs)
        if expected in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_bad_override_is_rejected_before_any_stage_runs(
    prefect_api: None, fake_project: Path
) -> None:
    checked = run_flow(fake_project, epochs=-1).result(raise_on_failure=False)
    assert isinstance(checked, ParameterTypeError)
    assert "epochs: Input should be greater than 0" in str(checked)
    unchecked = train.with_options(validate_parameters=False)
    state = unchecked(project_dir=str(fake_project), arch="resnet", return_state=True)
    error = state.result(raise_on_failure=False)
    assert isinstance(error, ParamsError)
    assert "train.model.arch" in str(error)
    assert not (fake_project / "attempts").exists()


def test_reproduce_command_names_each_override() -> None:
    assert reproduce_command(RunOverrides()) == "dvc repro --force"
    command = reproduce_command(RunOverrides(epochs=2, arch="mlp", data_source="data/my set.csv"))
    assert command == (
        "dvc exp run --force -S train.epochs=2 -S train.model.arch=mlp"
        " -S 'data.source=data/my set.csv'"
    )


def test_the_printed_reproduce_command_reruns_the_stages(
    prefect_api: None, fake_project: Path
) -> None:
    """The run-metrics artifact's command, run as printed in the run's own checkout, runs the
    stages again with the run's values (without `--force` DVC would skip every one)."""
    import shlex

    git_env = {
        f"GIT_{who}_{what}": value
        for who in ("AUTHOR", "COMMITTER")
        for what, value in (("NAME", "test"), ("EMAIL", "test@localhost"))
    }
    state = run_flow(fake_project, epochs=3)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(flow_run_filter=of_run(state))
    text = next(str(a.data) for a in found if a.key == "run-metrics")
    command = text.split("**Reproduce** on this commit: `", 1)[1].split("`", 1)[0]
    assert command == "dvc exp run --force -S train.epochs=3"
    env = {**os.environ, **git_env, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "add", "-A"], cwd=fake_project, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "run"], cwd=fake_project, check=True, env=env)
    done = subprocess.run(
        [sys.executable, "-m", *shlex.split(command)],
        cwd=fake_project,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert {stage: attempts(fake_project, stage) for stage in STAGES} == dict.fromkeys(STAGES, 2)
    assert (fake_project / "out" / "train.txt").read_text() == "train epochs=3"


def test_overridden_params_keep_comments() -> None:
    original = (REPO / "params.yaml").read_text()
    rendered = render_overridden(original, RunOverrides(epochs=5))
    assert "# The one configuration" in rendered
    assert yaml.safe_load(rendered)["train"]["epochs"] == 5


def test_a_stage_past_its_timeout_is_killed_with_its_process_group(tmp_path: Path) -> None:
    """`dvc repro` of a stage whose command starts a child and hangs: past the timeout both are
    gone (one process group), and the call raises TimeoutError naming the stage."""
    from flows.dvc_runner import reproduce

    root = make_fake_project(tmp_path / "project")
    env = {"FAKE_PREPARE": "hang:1", "FAKE_ATTEMPTS": str(root / "attempts")}
    lines: list[str] = []
    # 30 s: DVC and the stage start well within it, even on a loaded CI host
    with pytest.raises(TimeoutError, match="stage 'prepare' timed out after 30 s"):
        reproduce(root, "prepare", False, 30, lines.append, env)
    child = int((root / "attempts" / "prepare.child").read_text())
    assert not alive(child)
    assert "FAKE_PREPARE" not in os.environ  # a stage's environment is its own


# --- deployments -------------------------------------------------------------------------


def read_deployment(name: str) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_deploy_creates_pools_queues_limit_and_deployments(
    prefect_api: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLOPS_PROJECT_DIR", "/path/of/the/deploying/host")
    first = deployments.deploy()
    assert deployments.deploy() == first  # idempotent: same deployments, updated in place
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("training")
        queues = {q.name: q.priority for q in client.read_work_queues(work_pool_name="training")}
        assert client.read_work_pool("inference").type == "process"
        assert client.read_global_concurrency_limit_by_name("gpu").limit == 1
    assert (pool.type, pool.concurrency_limit) == ("process", 1)
    assert queues["on-demand"] == 1 and queues["nightly"] > 1
    nightly, on_demand = read_deployment("train/nightly"), read_deployment("train/on-demand")
    for deployment in (nightly, on_demand):
        assert deployment.entrypoint == "flows/train.py:train"
        assert deployment.enforce_parameter_schema
        assert deployment.work_pool_name == "training"
        assert deployment.pull_steps == [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $MLOPS_PROJECT_DIR }}"
                }
            }
        ]
        assert "/path/of/the/deploying/host" not in str(deployment.model_dump())
    assert (nightly.work_queue_name, on_demand.work_queue_name) == ("nightly", "on-demand")
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [
        ("0 2 * * *", "UTC")
    ]
    assert on_demand.schedules == []
    monitor = read_deployment("monitor/scheduled")
    assert (monitor.work_pool_name, monitor.entrypoint) == ("inference", "flows/monitor.py:monitor")
    assert [s.schedule.cron for s in monitor.schedules] == ["*/30 * * * *"]  # monitor.schedule
    from prefect.automations import Automation

    automation = Automation.read(name="retrain-on-drift")  # one, updated in place
    (action,) = automation.actions
    assert (action.type, action.deployment_id) == ("run-deployment", on_demand.id)
    assert action.parameters == {"reason": "{{ event.payload.reason }}"}
    assert automation.trigger.expect == {"mlops.monitor.drift"}


def test_redeploy_replaces_the_schedule(prefect_api: None, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    set_orchestration(tmp_path, nightly_cron="30 3 * * 1-5", timezone="Europe/Berlin")
    deployments.deploy(params_file=params)
    schedules = read_deployment("train/nightly").schedules
    assert [(s.schedule.cron, s.schedule.timezone) for s in schedules] == [
        ("30 3 * * 1-5", "Europe/Berlin")
    ]
    deployments.deploy()  # back to params.yaml's schedule for the other tests


def test_deploy_from_git_clones_on_the_worker(prefect_api: None) -> None:
    ids = deployments.deploy(
        git_url="file:///srv/git/mlops.git", branch="main", work_dir="/srv/run"
    )
    deployment = read_deployment("train/on-demand")
    assert deployment.id == ids["train/on-demand"]
    step = deployment.pull_steps[0]["prefect.deployments.steps.git_clone"]
    assert (step["repository"], step["branch"]) == ("file:///srv/git/mlops.git", "main")
    assert deployment.job_variables == {
        "env": {**telemetry_off(), "MLOPS_PROJECT_DIR": "."},
        "working_dir": "/srv/run",
    }
    deployments.deploy()


def test_deploy_adds_a_tune_worker_on_the_training_pool(prefect_api: None) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    from flows.dvc_outputs import prepared_dir

    ids = deployments.deploy()
    deployment = read_deployment("tune-worker/on-demand")
    assert deployment.id == ids["tune-worker/on-demand"]
    assert (deployment.work_pool_name, deployment.work_queue_name) == ("training", "tuning")
    assert deployment.entrypoint == "flows/tune.py:tune_worker"
    with get_client(sync_client=True) as client:
        with pytest.raises(PrefectHTTPStatusError, match="Validation failed"):
            client.create_flow_run_from_deployment(deployment.id, parameters={"trials": 0})
        client.create_flow_run_from_deployment(deployment.id, parameters={"trials": 3})
    assert prepared_dir(REPO) == REPO / "data/prepared"  # the prepare stage's output, dvc.yaml


def test_tune_worker_prepares_the_data_then_joins_the_study(
    prefect_api: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows import tune

    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    commands: list[list[str]] = []
    monkeypatch.setattr(
        tune, "run_logged", lambda command, root, timeout_s: commands.append(command)
    )
    tune.tune_worker(trials=2, project_dir=str(tmp_path))
    (dvc, repro, stage), worker = commands[0][-3:], commands[1]
    assert (dvc, repro, stage) == ("dvc", "repro", "validate")
    assert worker[1:5] == ["-m", "pipelines.tune", "--prepared", str(tmp_path / "data/prepared")]
    assert "--worker" in worker and worker[-2:] == ["--trials", "2"]
    index = int(worker[worker.index("--worker-index") + 1])
    assert index >= 1000  # apart from the stage's own workers 0 .. tune.workers - 1


@pytest.mark.parametrize(
    ("parameters", "message"),
    [({"epochs": -1}, "epochs"), ({"arch": "resnet"}, "resnet"), ({"lr": "fast"}, "lr")],
)
def test_bad_parameters_are_rejected_when_the_run_is_created(
    prefect_api: None, parameters: dict[str, Any], message: str
) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    deployment_id: UUID = deployments.deploy()["train/on-demand"]
    with get_client(sync_client=True) as client:
        with pytest.raises(PrefectHTTPStatusError, match="Validation failed") as caught:
            client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
        good = client.create_flow_run_from_deployment(deployment_id, parameters={"epochs": 2})
    assert message in caught.value.response.text
    assert good.parameters == {"epochs": 2}


def test_run_form_shows_what_an_empty_field_uses_and_refuses_unknown_names(
    prefect_api: None,
) -> None:
    """The UI's run form: the documented fields only, typed (no "Property is type None"), each
    titled with the params.yaml value an empty field leaves in force; a misspelt or internal
    name is refused when the run is created, like a bad value."""
    from prefect.exceptions import PrefectHTTPStatusError

    from pipelines.config import load_params

    params = load_params(REPO / "params.yaml")
    deployment_id: UUID = deployments.deploy()["train/on-demand"]
    schema = read_deployment("train/on-demand").parameter_openapi_schema
    fields = schema["properties"]
    assert set(fields) == {"epochs", "lr", "batch_size", "arch", "data_source", "force", "reason"}
    assert schema["additionalProperties"] is False
    for name, field in fields.items():
        assert "anyOf" not in field and field.get("default", False) is not None, field
        assert field.get("description"), name
    assert fields["epochs"]["type"] == "integer"
    assert f"train.epochs, now {params.train.epochs}" in fields["epochs"]["title"]
    assert f"train.model.arch, now {params.train.model.arch}" in fields["arch"]["title"]
    assert fields["arch"]["enum"] == ["mlp", "cnn", "resnet18"]  # the registered architectures
    assert "re-run every stage" in fields["force"]["title"]
    with get_client(sync_client=True) as client:
        for parameters in ({"epoch": 3}, {"project_dir": "/tmp"}):
            with pytest.raises(PrefectHTTPStatusError, match="Validation failed") as caught:
                client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
            assert caught.value.response.status_code == 409
            assert next(iter(parameters)) in caught.value.response.text
        good = client.create_flow_run_from_deployment(deployment_id, parameters={"force": True})
    assert good.parameters == {"force": True}
    tune = read_deployment("tune-worker/on-demand").parameter_openapi_schema
    assert set(tune["properties"]) == {"trials"} and tune["additionalProperties"] is False


def test_deploy_adds_the_inference_hosts_deployments(prefect_api: None) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    ids = deployments.deploy()
    for name, entrypoint in (
        ("deploy/on-demand", "flows/deploy.py:deploy"),
        ("rollback/on-demand", "flows/rollback.py:rollback"),
    ):
        deployment = read_deployment(name)
        assert deployment.id == ids[name]
        assert (deployment.work_pool_name, deployment.entrypoint) == ("inference", entrypoint)
    with get_client(sync_client=True) as client:
        with pytest.raises(PrefectHTTPStatusError, match="Validation failed"):
            client.create_flow_run_from_deployment(ids["deploy/on-demand"], parameters={"v": "1"})
        client.create_flow_run_from_deployment(ids["deploy/on-demand"], parameters={"version": "3"})


def test_the_cli_takes_the_forms_values_and_refuses_a_bad_one_before_anything_starts(
    tmp_path: Path,
) -> None:
    """`python -m flows.train --epochs 0 --arch nope`: one line per bad value, exit 2, and no
    Prefect server or stage was started (PREFECT_API_URL points at a closed port)."""
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "flows.train", "--epochs", "0", "--arch", "nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == EXIT_REJECTED, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "error: invalid override:" and len(lines) == 3, lines
    assert "train.epochs (epochs)" in lines[1] and "train.model.arch (arch)" in lines[2]


def test_a_killed_flow_process_takes_its_stage_command_with_it(tmp_path: Path) -> None:
    """The stage runs in a session of its own (so a timeout can kill its group), out of reach
    of the killed flow's group: `setpriv --pdeathsig` kills it when the flow process dies."""
    import shutil

    if shutil.which("setpriv") is None:
        pytest.skip("util-linux's setpriv is not installed")
    script = (
        "import sys; from pathlib import Path; from flows.dvc_runner import run_logged\n"
        "run_logged([sys.executable, '-c', 'import os, time; print(os.getpid(), flush=True); "
        "time.sleep(120)'], Path('.'), 120, lambda line: print(line, flush=True))\n"
    )
    flow = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert flow.stdout is not None
    stage = int(flow.stdout.readline())
    assert alive(stage)
    flow.kill()
    flow.wait()
    deadline = time.monotonic() + 10
    while alive(stage) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(stage)
