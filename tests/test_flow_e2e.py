"""End to end (slow tier): a real `prefect server`, `python -m flows.deployments`, a real process
worker running a copy of this repository, a run made like the UI's Run button, and the UI page
of that run in headless Chromium.

Everything listens on loopback ports picked at random; every store lives in a temp dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import FlowRun
from prefect.exceptions import PrefectHTTPStatusError
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.train import stage_order
from pipelines.config import load_params
from tests.helpers import REPO
from tests.helpers.processes import free_port, stop_group

pytestmark = pytest.mark.slow
CHROMIUM = Path("/usr/bin/chromium")  # Debian's; Playwright never downloads a browser
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT = REPO / "test-artifacts" / "flow-run.png"
RUN_TIMEOUT_S = 900
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
PIPELINE_STAGES = {"prepare", "validate", "train", "evaluate"}  # the stages that log to MLflow
# The checkout's params.yaml, committed: fewer timed calls per candidate in `select` and one
# pruning ratio fine-tuned for one epoch, so the run's whole graph takes less time. The model
# (width, gates) is as in params.yaml: its accuracy clears evaluate.min_accuracy at 2 epochs.
SHRUNK = {
    "select": {"latency_iters": 50, "throughput_iters": 10},
    "prune": {"ratios": [0.3], "epochs": 1},
}


@dataclass(frozen=True)
class Stack:
    """The running server, the checkout the worker uses, and where things are."""

    api: str
    ui: str
    checkout: Path
    mlflow_uri: str
    logs: Path


def snapshot(dest: Path) -> Path:
    """This repository's tracked and new (non-ignored) files, committed in a fresh git repo:
    what a fresh clone holds once everything is committed."""
    listed = git(REPO, "ls-files", "-co", "--exclude-standard").split("\n")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "snapshot")
    return dest


def shrunk(checkout: Path) -> Path:
    """`checkout` with `SHRUNK` merged into its params.yaml, committed."""
    import yaml

    params = yaml.safe_load((checkout / "params.yaml").read_text())
    for section, values in SHRUNK.items():
        params[section].update(values)
    (checkout / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(checkout, "commit", "-qam", "shrunk for the end-to-end test")
    return checkout


def git(cwd: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args]
    return subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True).stdout


def base_env(home: Path, api: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLOPS_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",  # Prefect's and MLflow's client telemetry: nothing leaves the host
        MLFLOW_DISABLE_TELEMETRY="true",
        DVC_NO_ANALYTICS="1",
        GX_ANALYTICS_ENABLED="false",
        **extra,
    )
    if api:
        env["PREFECT_API_URL"] = api
    return env


def start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"prefect server exited:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout_s} s:\n{tail(log)}")


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def deploy(stack: Stack, *args: str) -> str:
    """`python -m flows.deployments` from the checkout, as a deploying host would run it."""
    env = base_env(stack.logs / "deployer-home", stack.api, MLOPS_PROJECT_DIR="/not/on/workers")
    command = [sys.executable, "-m", "flows.deployments", *args]
    done = subprocess.run(
        command, cwd=stack.checkout, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Server + deployments + one worker of pool `training`; both killed at teardown."""
    base = tmp_path_factory.mktemp("e2e")
    port = free_port()
    api, ui = f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}"
    server_cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    server_env = base_env(
        base / "server-home",
        PREFECT_UI_API_URL=api,
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=LEASE_STORAGE,  # README: "The gpu slot"
    )
    server = start([*server_cmd, "--port", str(port)], server_env, base, base / "server.log")
    worker: subprocess.Popen[bytes] | None = None
    try:
        wait_healthy(api, server, base / "server.log", timeout_s=120)
        checkout = shrunk(snapshot(base / "checkout"))
        stack = Stack(api, ui, checkout, f"sqlite:///{base / 'mlflow.db'}", base)
        deploy(stack)
        worker = start_worker(stack)
        with temporary_settings(updates={PREFECT_API_URL: api}):
            yield stack
    finally:
        if worker is not None:
            stop_group(worker, grace_s=15)
        stop_group(server, grace_s=15)


def start_worker(stack: Stack) -> subprocess.Popen[bytes]:
    """A worker whose flow runs use `stack.checkout` ($MLOPS_PROJECT_DIR) and a temp MLflow."""
    env = base_env(
        stack.logs / "worker-home",
        stack.api,
        MLOPS_PROJECT_DIR=str(stack.checkout),
        MLFLOW_TRACKING_URI=stack.mlflow_uri,
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", "training"]
    command += ["--work-queue", "on-demand"]  # never a `train/nightly` run that falls due now
    return start([*command, "--name", "e2e-worker"], env, stack.logs, stack.logs / "worker.log")


def run_deployment(stack: Stack, name: str, parameters: dict[str, Any]) -> FlowRun:
    """What the UI's Run button does, then wait for the run to end."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(name)
        flow_run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
        return wait_final(client, flow_run.id, stack)


def wait_final(client: SyncPrefectClient, flow_run_id: Any, stack: Stack) -> FlowRun:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        flow_run = client.read_flow_run(flow_run_id)
        if flow_run.state and flow_run.state.is_final():
            return flow_run
        time.sleep(2)
    log = tail(stack.logs / "worker.log")
    pytest.fail(f"flow run not finished after {RUN_TIMEOUT_S} s:\n{log}")


@pytest.fixture(scope="module")
def finished(stack: Stack) -> FlowRun:
    """One run of `train/on-demand` with epochs=2, finished."""
    flow_run = run_deployment(stack, "train/on-demand", {"epochs": 2})
    assert flow_run.state is not None
    assert flow_run.state.is_completed(), (
        f"{flow_run.state!r}\n{tail(stack.logs / 'worker.log', 120)}"
    )
    return flow_run


def artifacts(flow_run: FlowRun) -> dict[str, Any]:
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
    with get_client(sync_client=True) as client:
        return {str(a.key): a for a in client.read_artifacts(flow_run_filter=flow_runs)}


def link(artifact: Any) -> str:
    """The URL of a link artifact (stored as Markdown: `[text](url)`)."""
    found = re.fullmatch(r"\[[^\]]*\]\((.+)\)", artifact.data)
    assert found, artifact.data
    return found.group(1)


def test_deployment_records_no_path_of_the_deploying_host(stack: Stack) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train/on-demand")
    assert deployment.entrypoint == "flows/train.py:train"
    assert deployment.path is None
    assert deployment.pull_steps
    directory = deployment.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    assert directory == {"directory": "{{ $MLOPS_PROJECT_DIR }}"}
    assert str(stack.checkout) not in deployment.model_dump_json()


def test_each_stage_is_a_completed_task_run(stack: Stack, finished: FlowRun) -> None:
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[finished.id]))
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=flow_runs)
        deployment = client.read_deployment_by_name("deploy/on-demand")
        deploys = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        )
    # the new champion's hand-off to the inference host: one deploy/on-demand run of its registry
    # version, linked under the train run by a task run, waiting for an inference worker (none
    # runs in this test)
    links = {run.id: run for run in runs}
    handoff = [run for run in deploys if run.parent_task_run_id in links]
    assert len(handoff) == 1, [(r.name, r.parameters) for r in deploys]
    assert str(handoff[0].parameters["version"]).isdigit()
    assert handoff[0].state is not None and handoff[0].state.type.value == "SCHEDULED"
    links.pop(handoff[0].parent_task_run_id)
    states = {str(run.name): run.state.type.value for run in links.values() if run.state}
    stages = stage_order(stack.checkout)
    # the champion gate after the stages; a first run's model becomes champion and is packaged
    gate = ["register", "package"] if "select" in stages else []
    assert states == dict.fromkeys([*stages, *gate], "COMPLETED")
    assert finished.parameters["epochs"] == 2


def test_run_links_mlflow_data_docs_and_metrics(stack: Stack, finished: FlowRun) -> None:
    found = artifacts(finished)
    assert "/#/experiments/" in link(found["mlflow-run"])
    docs = link(found["data-docs"])  # the validate run's copy in the MLflow UI, not a file://
    assert docs.startswith(f"{load_params(stack.checkout / 'params.yaml').tracking.ui_url}/#/")
    assert docs.endswith("/artifacts/data_docs/index.html?workflowType=machine_learning")
    table = found["run-metrics"].data
    assert "| metrics/train.json |" in table and "| metrics/evaluate.json |" in table
    assert "dvc exp run --force -S train.epochs=2" in table


def test_the_run_is_a_dvc_experiment_and_the_checkout_is_untouched(
    stack: Stack, finished: FlowRun
) -> None:
    """A run with a value from the UI ran in a worktree of its own, now removed: the checkout's
    tracked files (params.yaml, dvc.lock, metrics) are as committed, none of its outputs were
    written, and `dvc exp show` there lists the run under the flow run's name."""
    assert git(stack.checkout, "status", "--porcelain", "--untracked-files=no") == ""
    assert not (stack.checkout / "reports" / "validate").exists()
    assert git(stack.checkout, "worktree", "list", "--porcelain").count("worktree ") == 1
    shown = subprocess.run(
        [sys.executable, "-m", "dvc", "exp", "show", "--json"],
        cwd=stack.checkout,
        env=base_env(stack.logs / "dvc-home"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f'"{finished.name}"' in shown
    assert "run-metrics" in artifacts(finished)
    assert f"dvc exp apply {finished.name}" in artifacts(finished)["run-metrics"].data


def test_mlflow_parent_run_holds_one_nested_run_per_stage(stack: Stack, finished: FlowRun) -> None:
    parent_id = link(artifacts(finished)["mlflow-run"]).split("?")[0].rsplit("/", 1)[-1]
    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "2"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert {run.info.run_name for run in children} >= PIPELINE_STAGES
    assert all(run.info.status == "FINISHED" for run in children)
    committed = git(stack.checkout, "show", "HEAD:params.yaml")
    assert (stack.checkout / "params.yaml").read_text() == committed


@pytest.mark.parametrize(
    ("parameters", "reason"),
    [
        ({"epochs": -1}, "-1 is less than or equal to the minimum of 0"),
        ({"arch": "resnet"}, "'resnet' is not one of ['mlp', 'cnn', 'resnet18']"),
    ],
)
def test_bad_parameters_are_rejected_when_the_run_is_created(
    stack: Stack, parameters: dict[str, Any], reason: str
) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train/on-demand")
        with pytest.raises(PrefectHTTPStatusError) as caught:
            client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    assert caught.value.response.status_code == 409
    detail = caught.value.response.json()["detail"]
    field = next(iter(parameters))
    assert f"Validation failed for field '{field}'" in detail
    assert reason in detail


def test_the_ui_shows_the_run_and_its_stages(stack: Stack, finished: FlowRun) -> None:
    """The flow run's page in headless Chromium: each stage in its Task Runs tab."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1100})
            page.goto(f"{stack.ui}/runs/flow-run/{finished.id}")
            page.get_by_text(finished.name, exact=True).first.wait_for(timeout=60_000)
            page.locator("li#task-runs").click()
            task_runs = page.locator("#task-runs-content")
            for stage in stage_order(stack.checkout):
                task_runs.get_by_text(stage, exact=True).first.wait_for(timeout=30_000)
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
    assert SCREENSHOT.stat().st_size > 10_000


def test_the_run_form_shows_the_values_an_empty_field_uses(stack: Stack) -> None:
    """The deployment's Custom run form in headless Chromium: each field titled with the
    params.yaml value it leaves in force, no "Property is type None", no worker path."""
    from pipelines.config import load_params

    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    epochs = load_params(stack.checkout / "params.yaml").train.epochs
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train/on-demand")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1400})
            page.goto(f"{stack.ui}/deployments/deployment/{deployment.id}/run")
            title = f"epochs (empty: params.yaml train.epochs, now {epochs})"
            page.get_by_text(title).first.wait_for(timeout=60_000)
            text = page.locator("body").inner_text()
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT.with_name("run-form.png")), full_page=True)
        finally:
            browser.close()
    assert "train.model.arch, now" in text and "re-run every stage" in text
    assert "Property is type None" not in text
    assert "project_dir" not in text


def test_the_data_docs_link_opens_in_the_mlflow_ui(stack: Stack, finished: FlowRun) -> None:
    """The Prefect UI's Data Docs link, opened in headless Chromium against `mlflow server` on
    the run's store (at the link's `tracking.ui_url`, here a free port): the Data Docs render
    in the run's Artifacts tab, in the UI's model-training view (not GenAI's)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    ui_url = load_params(stack.checkout / "params.yaml").tracking.ui_url
    docs = link(artifacts(finished)["data-docs"])
    with mlflow_ui(stack) as base, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(docs.replace(ui_url, base, 1))
            page.get_by_text("validations", exact=True).first.wait_for(timeout=120_000)
            frame = page.frame_locator("iframe")  # MLflow renders HTML artifacts in one
            frame.get_by_text("Validation Results").first.wait_for(timeout=60_000)
            page.get_by_text("Model registry").first.wait_for(timeout=10_000)
            page.screenshot(path=str(SCREENSHOT.with_name("data-docs.png")))
        finally:
            browser.close()


@contextlib.contextmanager
def mlflow_ui(stack: Stack) -> Iterator[str]:
    """`mlflow server` on the worker's MLflow store, on a free loopback port; its base URL."""
    port = free_port()
    log = stack.logs / "mlflow-server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", stack.mlflow_uri]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = start(command, base_env(stack.logs / "mlflow-home"), stack.logs, log)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", server, log, timeout_s=180)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(server, grace_s=15)


def test_a_git_deployment_runs_a_fresh_clone(stack: Stack, finished: FlowRun) -> None:
    """`--git-url`: the worker clones the repository for the run and the flow runs in the clone
    (its commit is on the MLflow run); a missing data file is rejected without retries."""
    source = stack.logs / "source"
    git(stack.logs, "clone", "-q", str(stack.checkout), str(source))
    git(source, "commit", "-q", "--allow-empty", "-m", "only in the git server")
    bare = stack.logs / "mlops.git"
    git(stack.logs, "clone", "-q", "--bare", str(source), str(bare))
    head = git(bare, "rev-parse", "HEAD").strip()
    assert head != git(stack.checkout, "rev-parse", "HEAD").strip()
    work = stack.logs / "git-work"  # the worker host's directory for clones: it must exist
    work.mkdir()
    deploy(stack, "--git-url", bare.as_uri(), "--work-dir", str(work))
    try:
        flow_run = run_deployment(stack, "train/on-demand", {"data_source": "data/missing.csv"})
    finally:
        deploy(stack)
    assert flow_run.state is not None and flow_run.state.is_failed()
    assert "no such file" in (flow_run.state.message or ""), flow_run.state.message
    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    experiment = client.get_experiment_by_name("digits")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`mlops.kind` = 'pipeline' and attributes.status = 'FAILED'",
    )
    commits = [run.data.tags["git.commit"].removesuffix("-dirty") for run in runs]
    assert commits == [head]  # the clone as cloned: the run's values went to its own worktree
    assert (work / "mlops" / ".git").is_dir()
