"""Work pools, work queues, the `gpu` limit and the `train` deployments, made idempotently.

    python -m flows.deployments                 # workers run their own checkout: $MLOPS_PROJECT_DIR
    python -m flows.deployments --git-url URL   # workers clone URL for each run

Run it against the server in PREFECT_API_URL, from any host: nothing of the deploying host's
file system is recorded. The entrypoint is relative (`flows/train.py:train`) and the first pull
step finds the code on the worker's host, at run time:

- by default `set_working_directory` to `{{ $MLOPS_PROJECT_DIR }}`. Prefect fills `{{ $VAR }}`
  in a pull step when the step runs, on the worker's host, from the environment the worker
  gave the run. Each training host sets MLOPS_PROJECT_DIR to its own checkout before
  `prefect worker start`. (`prefect deploy` with a prefect.yaml would fill it in on the
  deploying host already, where that variable is set: this script sends it unfilled.)
- with `--git-url`, `git_clone` of that repository (and `--branch`) into the run's working
  directory, and the flow runs in the clone: `--work-dir` keeps it between runs (DVC's cache
  and outputs too); without it each run gets a fresh temporary directory, so point
  MLFLOW_TRACKING_URI at a lasting store on the workers.

Pools: `training` (one run at a time: one checkout, one GPU) with the queues `on-demand`
(priority 1, the UI's Run button) and `nightly` (below it), and `inference`. Deployments:
`train/nightly` on `orchestration.nightly_cron` in `orchestration.timezone` (params.yaml) and
`train/on-demand` without a schedule; `tune-worker/on-demand` (queue `tuning`) adds an Optuna
worker to the shared study (flows/tune.py). The API rejects a run whose parameters break the flow's
schema (`enforce_parameter_schema`), before any worker sees it: a bad value, and a name the form
does not show (a misspelt `epoch`; `project_dir`, a worker's path, is for direct calls only).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast
from uuid import UUID

from flows.train import PROJECT_ROOT, ensure_gpu_limit, train
from pipelines import telemetry_off
from pipelines.cli import run_cli
from pipelines.config import (
    Environment,
    OrchestrationConfig,
    Params,
    RunOverrides,
    load_params,
    section_dict,
)

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.deployments.runner import RunnerDeployment
    from prefect.runner.storage import RunnerStorage

PROJECT_DIR_ENV = Environment.name("project_dir")  # MLOPS_PROJECT_DIR: each worker's checkout
TRAINING_POOL = "training"
INFERENCE_POOL = "inference"
POOL_TYPE = "process"
TRAINING_RUNS_AT_ONCE = 1  # one checkout and one GPU per training host
QUEUES = {  # the training pool's queues; a lower number is served first
    "on-demand": (1, "Runs asked for from the UI or the CLI; ahead of scheduled ones"),
    "nightly": (2, "Scheduled off-peak runs"),
    "tuning": (3, "Extra Optuna workers on the shared study (tune-worker)"),
}
ENTRYPOINT = "flows/train.py:train"  # relative to the checkout the pull step enters
TUNE_WORKER_ENTRYPOINT = "flows/tune.py:tune_worker"
PARAMS = PROJECT_ROOT / "params.yaml"
# Flow parameters kept out of the run form (and refused by the API): a worker's file-system path.
INTERNAL_PARAMETERS = ("project_dir",)
FORCE_HELP = "Re-run every stage even when DVC has it up to date (off: DVC runs what changed)."
REASON_HINT = (
    "reason: why this run (optional)",
    "Shown in the run's log and its run-reason artifact. The retrain-on-drift automation fills"
    " it with the monitor's finding (which features drifted, or the production accuracy).",
)


class WorkerCheckout:
    """Deployment storage: the worker host's own checkout, named by $MLOPS_PROJECT_DIR there.

    The pull step keeps the `{{ $VAR }}` placeholder: the worker's flow run fills it in.
    """

    pull_interval: int | None = None

    def __init__(self, env_var: str = PROJECT_DIR_ENV) -> None:
        self.env_var = env_var

    @property
    def destination(self) -> Path:
        return Path()

    def set_base_path(self, path: Path) -> None:
        """Nothing to place: the code is on the worker already."""

    async def pull_code(self) -> None:
        """Nothing to pull: the code is on the worker already."""

    def to_pull_step(self) -> dict[str, Any]:
        directory = "{{ $" + self.env_var + " }}"
        return {"prefect.deployments.steps.set_working_directory": {"directory": directory}}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkerCheckout) and other.env_var == self.env_var

    def __hash__(self) -> int:
        return hash(self.env_var)


def code_source(git_url: str | None, branch: str | None = None) -> RunnerStorage:
    """Where a worker finds the code: its own checkout, or a clone of `git_url`."""
    if not git_url:
        return WorkerCheckout()
    from prefect.runner.storage import GitRepository

    return GitRepository(url=git_url, branch=branch, pull_interval=None)


def job_variables(git_url: str | None, work_dir: str | None) -> dict[str, Any]:
    """The telemetry switches for every flow run (its process imports Prefect before the flow's
    code could set them); for a clone: the flow runs in it (the working directory after
    `git_clone`)."""
    env = telemetry_off()  # this host's values: the defaults unless the user set one
    if not git_url:
        return {"env": env}
    variables: dict[str, Any] = {"env": {**env, PROJECT_DIR_ENV: "."}}
    if work_dir:
        variables["working_dir"] = work_dir
    return variables


def ensure_pool(client: SyncPrefectClient, name: str, runs_at_once: int | None) -> None:
    """A `process` work pool with Prefect's default job template; its limit set if given."""
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        found = client.read_work_pool(name)
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        pool = WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=template)
        client.create_work_pool(pool)
    else:
        if found.type != POOL_TYPE:
            raise ValueError(
                f"work pool {name!r} exists with type {found.type!r}; these flows need a"
                f" {POOL_TYPE!r} pool (delete it: prefect work-pool delete {name})"
            )
    if runs_at_once is not None:
        client.update_work_pool(name, WorkPoolUpdate(concurrency_limit=runs_at_once))


def ensure_queue(
    client: SyncPrefectClient, pool: str, name: str, priority: int, description: str
) -> None:
    """A work queue of `pool` with this priority (created, or its priority corrected)."""
    from prefect.exceptions import ObjectNotFound

    try:
        queue = client.read_work_queue_by_name(name, work_pool_name=pool)
    except ObjectNotFound:
        client.create_work_queue(
            name, description=description, priority=priority, work_pool_name=pool
        )
        return
    if queue.priority != priority:
        client.update_work_queue(queue.id, priority=priority)


def ensure_infrastructure() -> None:
    """The pools, the training pool's queues, and the global concurrency limit `gpu`."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        ensure_pool(client, TRAINING_POOL, TRAINING_RUNS_AT_ONCE)
        ensure_pool(client, INFERENCE_POOL, None)
        for name, (priority, description) in QUEUES.items():
            ensure_queue(client, TRAINING_POOL, name, priority, description)
    ensure_gpu_limit()


def train_deployments(
    cfg: OrchestrationConfig, storage: RunnerStorage, variables: dict[str, Any]
) -> list[RunnerDeployment]:
    """`train/nightly` (cron in its time zone) and `train/on-demand` (no schedule)."""
    from prefect.schedules import Cron

    nightly = _train_deployment("nightly", storage, variables, Cron(cfg.nightly_cron, cfg.timezone))
    return [nightly, _train_deployment("on-demand", storage, variables, None)]


def _train_deployment(
    queue: str, storage: RunnerStorage, variables: dict[str, Any], schedule: Any
) -> RunnerDeployment:
    from prefect.deployments.runner import RunnerDeployment

    deployment = RunnerDeployment.from_flow(
        train,
        name=queue,
        schedule=schedule,
        work_pool_name=TRAINING_POOL,
        work_queue_name=queue,
        job_variables=dict(variables),
        enforce_parameter_schema=True,
        tags=["training"],
        description=f"{(train.description or '').strip()}\n\nQueue: {queue}.",
    )
    deployment.entrypoint = ENTRYPOINT  # never the deploying host's path
    deployment.storage = storage
    return deployment


def deploy(
    git_url: str | None = None,
    branch: str | None = None,
    work_dir: str | None = None,
    params_file: Path = PARAMS,
) -> dict[str, UUID]:
    """Everything above, created or brought up to date; returns {deployment name: id}."""
    params = load_params(params_file)
    ensure_infrastructure()
    storage = code_source(git_url, branch)
    variables = job_variables(git_url, work_dir)
    deployments = train_deployments(params.orchestration, storage, variables)
    hints = train_form_hints(params)
    ids = {f"train/{d.name}": _apply(d, hints) for d in deployments}
    tune = tune_worker_deployment(storage, variables)
    ids["tune-worker/on-demand"] = _apply(tune, tune_form_hints(params))
    for deployment in inference_deployments(storage, variables):
        ids[f"{deployment.flow_name}/{deployment.name}"] = _apply(deployment, {})
    monitor = monitor_deployment(params, storage, variables)
    ids["monitor/scheduled"] = _apply(monitor, {})
    ensure_retrain_automation(ids["train/on-demand"])
    return ids


MONITOR_ENTRYPOINT = "flows/monitor.py:monitor"
RETRAIN_AUTOMATION = "retrain-on-drift"


def monitor_deployment(
    params: Params, storage: RunnerStorage, variables: dict[str, Any]
) -> RunnerDeployment:
    """`monitor/scheduled` on the `inference` pool: on `monitor.schedule` (cron, in
    `orchestration.timezone`; none when null), and at once from the UI's Run button."""
    from prefect.deployments.runner import RunnerDeployment
    from prefect.schedules import Cron

    from flows.monitor import monitor

    cron = params.monitor.schedule
    deployment = RunnerDeployment.from_flow(
        monitor,
        name="scheduled",
        schedule=Cron(cron, params.orchestration.timezone) if cron else None,
        work_pool_name=INFERENCE_POOL,
        job_variables=dict(variables),
        enforce_parameter_schema=True,
        tags=["inference", "monitor"],
        description=(monitor.description or "").strip(),
    )
    deployment.entrypoint = MONITOR_ENTRYPOINT
    deployment.storage = storage
    return deployment


def retrain_automation(train_deployment: UUID) -> Any:
    """The automation: each `mlops.monitor.drift` event (flows/monitor.py) runs the deployment
    `train_deployment` (train/on-demand) with the event's reason as the run's `reason`."""
    from prefect.automations import Automation
    from prefect.events.actions import RunDeployment
    from prefect.events.schemas.automations import EventTrigger, Posture

    from flows.monitor import EVENT

    return Automation(
        name=RETRAIN_AUTOMATION,
        description="The monitor flow found drift (or low production accuracy): retrain.",
        trigger=EventTrigger(
            expect={EVENT},
            match={"prefect.resource.id": "mlops.model.*"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            RunDeployment(
                source="selected",
                deployment_id=train_deployment,
                parameters={"reason": "{{ event.payload.reason }}"},
                job_variables=None,
            )
        ],
    )


def ensure_retrain_automation(train_deployment: UUID) -> UUID:
    """Create `retrain-on-drift`, or bring the one of that name up to date; its id."""
    from prefect.automations import Automation

    wanted = retrain_automation(train_deployment)
    try:  # called from sync code: the sync variants (typed as their async twins)
        found = cast("Automation", Automation.read(name=RETRAIN_AUTOMATION))
    except ValueError:  # Prefect's "Automation with name ... not found"
        created = cast("Automation", wanted.create())
        assert created.id is not None
        return created.id
    assert found.id is not None
    wanted.id = found.id
    wanted.update()
    return found.id


INFERENCE_ENTRYPOINTS = {
    "deploy": "flows/deploy.py:deploy",
    "rollback": "flows/rollback.py:rollback",
}


def inference_deployments(
    storage: RunnerStorage, variables: dict[str, Any]
) -> list[RunnerDeployment]:
    """`deploy/on-demand` and `rollback/on-demand` on the `inference` pool: run by the inference
    host's worker (the train flow starts `deploy/on-demand` after packaging a new champion)."""
    from prefect.deployments.runner import RunnerDeployment

    from flows.deploy import deploy as deploy_flow
    from flows.rollback import rollback as rollback_flow

    made = []
    for flow_ in (deploy_flow, rollback_flow):
        deployment = RunnerDeployment.from_flow(
            flow_,
            name="on-demand",
            work_pool_name=INFERENCE_POOL,
            job_variables=dict(variables),
            enforce_parameter_schema=True,
            tags=["inference"],
            description=(flow_.description or "").strip(),
        )
        deployment.entrypoint = INFERENCE_ENTRYPOINTS[flow_.name]
        deployment.storage = storage
        made.append(deployment)
    return made


def _lookup(params: Params, dotted: str) -> Any:
    node: Any = section_dict(params)
    for part in dotted.split("."):
        node = node[part]
    return node


def train_form_hints(params: Params) -> dict[str, tuple[str, str]]:
    """{parameter: (title, description)} for the `train` run form: what an empty field means.

    The value shown is params.yaml's when deployed; the run itself reads the worker's
    params.yaml at run time (a deployment default would freeze the value instead)."""
    hints = {"force": ("force: re-run every stage", FORCE_HELP), "reason": REASON_HINT}
    for name, key in RunOverrides.KEYS.items():
        value = _lookup(params, key)
        hints[name] = (
            f"{name} (empty: params.yaml {key}, now {value})",
            f"Left empty: {key} from params.yaml on the worker ({value!r} in the"
            f" params.yaml this deployment was made from).",
        )
    return hints


def tune_form_hints(params: Params) -> dict[str, tuple[str, str]]:
    """The `tune-worker` run form's hint for `trials`."""
    return {
        "trials": (
            f"trials (empty: until the study holds tune.trials, now {params.tune.trials})",
            "At most this many trials from this worker; left empty: until the study holds"
            " tune.trials trials or tune.timeout_s has passed.",
        )
    }


def run_form_schema(
    schema: Mapping[str, Any], hints: Mapping[str, tuple[str, str]]
) -> dict[str, Any]:
    """A flow's parameter schema as the UI's run form should show it, and as the API enforces it.

    Optional fields lose their `null` branch and `null` default (the form showed them as
    "Property is type None"; an empty field is simply not sent), `hints` give each field its
    title and description, INTERNAL_PARAMETERS leave the form, and unknown names are refused
    (`additionalProperties: false`: a misspelt `epoch` fails when the run is created)."""
    form = copy.deepcopy(dict(schema))
    properties: dict[str, Any] = form["properties"]
    for name in INTERNAL_PARAMETERS:
        properties.pop(name, None)
    for name, field in properties.items():
        branches = [b for b in field.pop("anyOf", []) if b != {"type": "null"}]
        if len(branches) == 1:
            field.update(branches[0])
        elif branches:
            field["anyOf"] = branches
        if "default" in field and field["default"] is None:
            del field["default"]
        if name in hints:
            field["title"], hint = hints[name]
            known = str(field.get("description") or "").rstrip(". ")
            field["description"] = f"{known}. {hint}" if known else hint
    form["required"] = [name for name in form.get("required", []) if name in properties]
    form["additionalProperties"] = False
    return form


def tune_worker_deployment(storage: RunnerStorage, variables: dict[str, Any]) -> RunnerDeployment:
    """`tune-worker/on-demand` on the training pool's `tuning` queue: run it on as many hosts
    as should join the study (they share it through MLOPS_TUNE_STORAGE, e.g. PostgreSQL)."""
    from prefect.deployments.runner import RunnerDeployment

    from flows.tune import tune_worker

    deployment = RunnerDeployment.from_flow(
        tune_worker,
        name="on-demand",
        work_pool_name=TRAINING_POOL,
        work_queue_name="tuning",
        job_variables=dict(variables),
        enforce_parameter_schema=True,
        tags=["training", "tuning"],
        description=(tune_worker.description or "").strip(),
    )
    deployment.entrypoint = TUNE_WORKER_ENTRYPOINT
    deployment.storage = storage
    return deployment


def _apply(deployment: RunnerDeployment, hints: Mapping[str, tuple[str, str]]) -> UUID:
    """Create the deployment, or update the one of that name (its schedules replaced), then
    give it the run form's schema (`run_form_schema`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    deployment_id = deployment.apply()  # sync here: no event loop is running
    assert isinstance(deployment_id, UUID)
    with get_client(sync_client=True) as client:
        schema = client.read_deployment(deployment_id).parameter_openapi_schema or {}
        update = DeploymentUpdate(parameter_openapi_schema=run_form_schema(schema, hints))
        client.update_deployment(deployment_id, update)
    return deployment_id


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--git-url", help="workers clone this repository for each run")
    parser.add_argument("--branch", help="the branch to clone (default: the remote's default)")
    parser.add_argument(
        "--work-dir",
        help="with --git-url: an existing directory on the workers to keep the clone in"
        " (default: a new temporary one per run)",
    )
    parser.add_argument("--params", type=Path, default=PARAMS, help="params.yaml to read")
    args = parser.parse_args(argv)
    if args.work_dir and not args.git_url:
        parser.error("--work-dir goes with --git-url")
    run_cli(lambda _: _deploy_and_print(args), args.params)  # a bad params.yaml: one line, exit 2


def _deploy_and_print(args: argparse.Namespace) -> None:
    ids = deploy(args.git_url, args.branch, args.work_dir, args.params)
    source = args.git_url or f"${PROJECT_DIR_ENV} on each worker"
    for name, deployment_id in ids.items():
        print(f"{name}: {deployment_id} (code: {source})")


if __name__ == "__main__":
    main()
