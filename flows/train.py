"""The `train` flow: the stages of dvc.yaml, in DVC's order, one Prefect task run each.

Operations only: which stages run is DVC's business (`dvc repro --single-item`, so an up-to-date
stage is skipped and shown as such), one `dvc` process per stage (flows/dvc_runner.py); this
flow adds parameters from the UI, retries, timeouts, the `gpu` concurrency limit, the MLflow
parent run, and links to the results. A run with values from the UI runs as a DVC experiment in
a worktree of its own (flows/experiment.py): the checkout's params.yaml and dvc.lock stay as
they are; a run without updates them, like `dvc repro`.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, cast

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State
from prefect.tasks import exponential_backoff

from flows.dvc_runner import StageOutcome, metrics, metrics_files, reproduce, stage_order
from flows.experiment import experiment_workspace, save_experiment
from flows.params_file import effective_params, run_overrides
from pipelines.cli import EXIT_REJECTED
from pipelines.config import (
    Arch,
    BatchSize,
    DataSource,
    Environment,
    Epochs,
    LearningRate,
    Params,
    RunOverrides,
    environment,
)
from pipelines.errors import ParamsError, PipelineError
from pipelines.tracking import end_parent_run, start_parent_run, tracking_uri

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SELECT_STAGE = "select"  # its winner goes through the champion gate (a pipeline without: none)


class StageFailed(RuntimeError):
    """A stage process failed; it may succeed on a retry (crash, lost resource, timeout)."""


class StageRejected(RuntimeError):
    """A stage rejected its input (bad params, failed data validation): retrying cannot help."""


def _retryable(task: Any, task_run: Any, state: State[Any]) -> bool:
    """Retry a failed stage unless it rejected its input."""
    return not isinstance(state.result(raise_on_failure=False), StageRejected)


@task(retry_condition_fn=_retryable, cache_policy=NO_CACHE, log_prints=True)
def run_stage(
    stage: str,
    root: Path,
    timeout_s: float,
    force: bool = False,
    env: Mapping[str, str] | None = None,
    grace_s: float = 0.0,
) -> State[Any]:
    """`dvc repro --single-item <stage>` in `root` (a process of its own, `env` set for it
    alone), output in the task log. DVC decides whether the stage runs: Prefect never caches a
    stage (`NO_CACHE`). Past `timeout_s` the stage gets SIGTERM and `grace_s` seconds to save a
    checkpoint and exit, then its process group is killed (a retry resumes from the checkpoint).
    """
    logger = get_run_logger()
    logger.info("$ dvc repro --single-item%s %s", " --force" if force else "", stage)
    try:
        outcome = reproduce(root, stage, force, timeout_s, logger.info, env, grace_s)
    except TimeoutError as exc:
        raise StageFailed(str(exc)) from None
    try:
        _raise_for(outcome)
    except StageRejected as exc:  # a Failed state, not an exception: no traceback in the log
        logger.error("%s", exc)
        return Failed(message=str(exc), data=exc)
    if not outcome.ran:
        return Completed(message=f"{stage}: up to date in DVC, not re-run", name="Cached")
    return Completed(message=f"{stage}: ran")


def _raise_for(outcome: StageOutcome) -> None:
    """StageRejected for exit status EXIT_REJECTED (bad input), StageFailed for any other."""
    if outcome.code == 0:
        return
    detail = "\n".join(defect_lines(outcome.lines) or outcome.lines[-20:])
    kind = StageRejected if outcome.code == EXIT_REJECTED else StageFailed
    raise kind(f"stage {outcome.stage!r} failed (exit {outcome.code}): {outcome.error}\n{detail}")


def defect_lines(lines: Sequence[str]) -> list[str]:
    """The stage's `error: ` lines with the indented lines that continue each (the failed
    expectation, its column, the count): what `dvc repro` shows of the defect."""
    kept: list[str] = []
    in_error = False
    for line in lines:
        in_error = line.startswith("error: ") or (in_error and line[:1] in (" ", "\t"))
        if in_error:
            kept.append(line)
    return kept


class GpuSlotUnavailable(RuntimeError):
    """No slot of the global concurrency limit `gpu` came free within orchestration.gpu_wait_s."""


GPU_LIMIT = "gpu"
RESET_GPU_LIMIT = f"prefect global-concurrency-limit update {GPU_LIMIT} --active-slots 0"


@contextlib.contextmanager
def gpu_slot(stage: str, params: Params) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `gpu` around GPU stages.

    Waits at most `orchestration.gpu_wait_s` (logged when every slot is taken), then raises
    GpuSlotUnavailable. Once the stage has run, neither a failed lease renewal nor a failed
    release fails it (the Prefect server was away, say): they are logged, and the slot comes
    back when the flow run retries the release on exit, or when the server finds the lease
    expired (README: "The gpu slot")."""
    if stage not in params.orchestration.gpu_stages:
        yield
        return
    from prefect.concurrency.sync import concurrency

    wait_s = params.orchestration.gpu_wait_s
    logger = get_run_logger()
    _log_if_waiting(logger, stage, wait_s)
    entered, failed = False, False
    try:
        with concurrency(
            GPU_LIMIT,
            occupy=1,
            timeout_seconds=wait_s,
            strict=True,
            raise_on_lease_renewal_failure=False,
        ):
            entered = True
            try:
                yield
            except BaseException:
                failed = True
                raise
    except TimeoutError:
        if entered:
            raise
        raise GpuSlotUnavailable(
            f"{stage}: no slot of the global concurrency limit {GPU_LIMIT!r} came free within"
            f" {wait_s:g} s (orchestration.gpu_wait_s). If no other run is using it, the slot is"
            f" stale (a Prefect server restart without persistent leases); free it with:"
            f" {RESET_GPU_LIMIT}"
        ) from None
    except Exception as exc:
        if failed or not entered:
            raise
        logger.warning(
            "%s finished, but its %r slot could not be released (%s); the flow run retries the"
            " release when it ends, and the server frees the slot when the lease expires",
            stage,
            GPU_LIMIT,
            exc,
        )


def _log_if_waiting(logger: Any, stage: str, wait_s: float) -> None:
    """Say so in the run's log when every slot of `gpu` is taken: the stage will wait."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(GPU_LIMIT)
    if limit.active_slots >= limit.limit:
        logger.info(
            "%s waits for a slot of the global concurrency limit %r (%d of %d taken), at most"
            " %g s (orchestration.gpu_wait_s). If no run holds it, it is stale (a run killed on a"
            " temporary server, which never expires leases): free it with: %s",
            stage,
            GPU_LIMIT,
            limit.active_slots,
            limit.limit,
            wait_s,
            RESET_GPU_LIMIT,
        )


def run_stages(
    params: Params,
    root: Path,
    stages: Sequence[str],
    env: Mapping[str, str],
    force: bool = False,
    states: dict[str, str] | None = None,
) -> dict[str, str]:
    """Each of `stages` in `root` as its own task run, in order, each stage process getting
    `env`; returns stage -> final state name (also filled into `states` as they end, so a
    caller sees them when a stage fails)."""
    cfg = params.orchestration
    states = {} if states is None else states
    for stage in stages:
        timeout = cfg.stage_timeout_s.get(stage, max(cfg.stage_timeout_s.values()))
        with gpu_slot(stage, params):
            state = _stage_task(stage, params)(
                stage, root, timeout, force, env, cfg.stop_grace_s, return_state=True
            )
        states[stage] = state.name or state.type.value
        state.result()  # raises the stage's error: later stages never run
    return states


def _stage_task(stage: str, params: Params) -> Any:
    """`run_stage` named after the stage, with the configured retries."""
    cfg = params.orchestration
    delays = exponential_backoff(cfg.retry_delay_s) if cfg.retry_delay_s else 0
    return run_stage.with_options(
        name=stage, task_run_name=stage, retries=cfg.retries, retry_delay_seconds=delays
    )


@flow(name="train", log_prints=True)
def train(
    epochs: Epochs | None = None,
    lr: LearningRate | None = None,
    batch_size: BatchSize | None = None,
    arch: Arch | None = None,
    data_source: DataSource | None = None,
    force: bool = False,
    project_dir: str | None = None,
) -> dict[str, Any] | State[Any]:
    """Run the stages of dvc.yaml in DVC's order, one task run each, tracked in MLflow.

    Leave a value empty to use params.yaml's; a run with values is a DVC experiment named
    after the flow run (`dvc exp show`, `dvc exp apply <name>` in the checkout). `force`
    re-runs every stage even when DVC has it up to date. `project_dir` is the checkout to run
    in (default: $MLOPS_PROJECT_DIR, else the checkout this file was loaded from).
    """
    try:
        root = Path(project_dir or environment().project_dir or PROJECT_ROOT).resolve()
        overrides = run_overrides(
            epochs=epochs, lr=lr, batch_size=batch_size, arch=arch, data_source=data_source
        )
        params = effective_params(root, overrides)  # rejects a bad value before any stage runs
    except ParamsError as exc:
        return rejected(exc)
    from prefect.runtime import flow_run

    name = str(flow_run.name)
    with contextlib.ExitStack() as stack:
        work = root
        if overrides.as_dotted():  # the run's own worktree: the checkout's files stay as they are
            try:
                work = stack.enter_context(experiment_workspace(root, overrides, name))
            except ParamsError as exc:
                return rejected(exc)
        return _run(params, root, work, overrides, force, experiment=name if work != root else None)


def _run(
    params: Params,
    root: Path,
    work: Path,
    overrides: RunOverrides,
    force: bool,
    experiment: str | None,
) -> dict[str, Any] | State[Any]:
    """The stages in `work` (the checkout `root`, or an experiment's worktree), then the
    champion gate, the hand-off, and what the UI shows."""
    with ThreadPoolExecutor(1) as pool:
        order = pool.submit(stage_order, work)  # DVC reads the graph while MLflow starts here
        parent = start_parent_run(params, root, name="train-flow", source="flows/train.py")
    env = Environment(parent_run_id=parent).exported()
    if work != root:  # the stages' MLflow runs go to the checkout's store, not the worktree's
        env |= Environment(tracking_uri=tracking_uri(params.tracking, root)).exported()
    states: dict[str, str] = {}
    stages: list[str] = []
    try:
        stages = order.result()
        run_stages(params, work, stages, env, force, states)
        if experiment:
            save_experiment(work, experiment)
            logger = get_run_logger()
            logger.info("saved as DVC experiment %r: dvc exp apply %s", experiment, experiment)
        decision = register_task(params, root, work, parent) if SELECT_STAGE in states else None
        # only a champion that moved in this run: an unchanged one is not packaged again
        bento = package_task(params, root) if decision and decision["promoted"] else None
        # a new champion goes to the inference host (deploy.on_new_champion); never a challenger
        handoff = bento if params.deploy.on_new_champion else None
        deploy = start_deploy(handoff["registry_version"]) if handoff else None
    except BaseException as exc:
        end_parent_run(params, root, parent, status="FAILED")
        _publish(params, root, work, parent, overrides, stages, states, failed=True)
        if isinstance(exc, StageRejected):
            return rejected(exc)
        raise
    end_parent_run(params, root, parent)
    links = _publish(params, root, work, parent, overrides, stages, states, experiment)
    return {
        "mlflow_parent_run_id": parent,
        "stages": states,
        "experiment": experiment,
        "register": decision,
        "package": bento,
        "deploy": deploy,
        **links,
    }


def rejected(exc: Exception) -> State[Any]:
    """The flow run's end for a rejected input: Failed with the defect's lines as its message,
    logged without a traceback (a retry or a traceback cannot help the user)."""
    get_run_logger().error("%s", exc)
    return Failed(message=str(exc), data=exc)


def _publish(
    params: Params,
    root: Path,
    work: Path,
    parent: str,
    overrides: RunOverrides,
    stages: list[str],
    states: dict[str, str],
    experiment: str | None = None,
    failed: bool = False,
) -> dict[str, Any]:
    """Prefect artifacts: the MLflow run link, the Data Docs location, metrics (read in `work`,
    where the stages ran), how to reproduce, and the DVC experiment the run was saved as."""
    from flows.reporting import (
        NO_DATA_DOCS,
        data_docs_index,
        data_docs_url,
        metrics_table,
        mlflow_run_url,
        reproduce_command,
    )

    url = mlflow_run_url(params, root, parent)
    create_link_artifact(url, link_text="MLflow parent run", key="mlflow-run")
    figures = metrics(work)
    docs = data_docs_index(work)  # where dvc.yaml's validate stage writes them
    docs_url = data_docs_url(params, root, docs.parent) if docs else None  # not file://
    if docs_url:
        create_link_artifact(docs_url, link_text="Great Expectations Data Docs", key="data-docs")
    else:
        where = f"No validate run in MLflow; on the worker: `{docs}`" if docs else NO_DATA_DOCS
        create_markdown_artifact(where, key="data-docs")
    table = metrics_table(figures, metrics_files(work, stages), states)
    saved = (
        f"\n\n**DVC experiment** `{experiment}` (`dvc exp show` in the checkout lists it):"
        f" `dvc exp apply {experiment}` brings its params, dvc.lock and outputs into the checkout"
        if experiment
        else ""
    )
    create_markdown_artifact(
        f"{table}\n\n**Reproduce** on this commit: `{reproduce_command(overrides)}` (`--force`"
        " reruns every stage: in this checkout DVC finds their outputs recorded and would skip"
        f" them all){saved}",
        key="run-metrics",
        description="Failed run: metrics of the stages that finished" if failed else None,
    )
    return {"mlflow_run_url": url, "data_docs": str(docs) if docs else None}


@task(cache_policy=NO_CACHE, task_run_name="register")
def register_task(params: Params, root: Path, work: Path, parent: str) -> dict[str, Any]:
    """The selected model (of the stages that ran in `work`) into the MLflow registry through
    the champion gate (flows/register.py)."""
    from flows.dvc_outputs import prepared_dir, stage_output
    from flows.register import register

    decision = register(params, root, parent, stage_output(work, SELECT_STAGE), prepared_dir(work))
    create_markdown_artifact(
        f"Model `{params.register_.model_name}` version {decision.version} is "
        f"**{decision.alias}**: {decision.reason}",
        key="champion-gate",
    )
    get_run_logger().info(
        "register: version %s -> %s (%s)", decision.version, decision.alias, decision.reason
    )
    return asdict(decision)


@task(cache_policy=NO_CACHE, task_run_name="package")
def package_task(params: Params, root: Path) -> dict[str, Any]:
    """A new champion becomes a bento archive for the inference host (flows/package.py)."""
    from flows.package import package

    packaged = package(params, root)
    create_markdown_artifact(
        f"Bento `{packaged.bento_tag}` (model `{packaged.model_tag}`, registry version "
        f"{packaged.registry_version}) exported to `{packaged.archive}`, and in MLflow as "
        f"`{packaged.artifact}` of the version's run (tag `bento_artifact`).\n\n"
        f"On the inference host: `bentoml import {packaged.archive}` then "
        f"`bentoml serve {packaged.bento_tag}`.",
        key="bento",
    )
    get_run_logger().info("package: %s -> %s", packaged.bento_tag, packaged.archive)
    return asdict(packaged)


DEPLOY_DEPLOYMENT = "deploy/on-demand"  # the inference host's deploy flow (flows/deployments.py)


def start_deploy(version: str) -> dict[str, str] | None:
    """Hand a new champion to the inference host: start `deploy/on-demand` for registry version
    `version` and return at once (the deploy run is the inference worker's; its outcome is not
    this run's). Returns the started run's id and name; None, with one warning line, when the
    Prefect server has no such deployment (no inference pool set up): the train run goes on."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound
    from prefect.runtime import flow_run

    logger = get_run_logger()
    try:
        started = cast(  # called from sync code: the FlowRun itself, not a coroutine
            "FlowRun",
            run_deployment(
                DEPLOY_DEPLOYMENT,
                parameters={"version": version},
                timeout=0,
                idempotency_key=f"train-{flow_run.id}-deploy-{version}",  # a retried train run
            ),
        )
    except ObjectNotFound:
        logger.warning(
            "deploy: no deployment %s on this Prefect server, so version %s is packaged but not "
            "deployed; set up the inference pool with `python -m flows.deployments`",
            DEPLOY_DEPLOYMENT,
            version,
        )
        return None
    logger.info(
        "deploy: started %s for version %s: flow run %s (%s)",
        DEPLOY_DEPLOYMENT,
        version,
        started.name,
        started.id,
    )
    return {"flow_run_id": str(started.id), "flow_run_name": str(started.name)}


def ensure_gpu_limit(slots: int = 1) -> None:
    """Create the global concurrency limit `gpu` if the server has none (an existing one stays)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots)
            )


def main(argv: Sequence[str] | None = None) -> None:
    """The main job: the `train` flow on params.yaml, on a temporary local Prefect server
    unless PREFECT_API_URL points at one. Values given here (--epochs 5 ...) make the run a DVC
    experiment, as the UI's form does."""
    parser = argparse.ArgumentParser(prog="python -m flows.train", description=main.__doc__)
    parser.add_argument("--force", action="store_true", help="re-run up-to-date stages too")
    for name, key in RunOverrides.KEYS.items():  # the UI's form, on the command line
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, metavar="VALUE", help=f"this run's {key}")
    args = parser.parse_args(argv)
    try:  # a bad value: one line and exit 2, before a server or a stage starts
        given = {k: v for k, v in vars(args).items() if k in RunOverrides.KEYS and v is not None}
        values = run_overrides(**given).model_dump(exclude_none=True)
    except ParamsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_REJECTED)
    ensure_gpu_limit()
    state = train(force=args.force, **values, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):  # the last lines: the defect, no traceback
        print(f"error: {result}", file=sys.stderr)
        rejected_input = isinstance(result, StageRejected | PipelineError)
        sys.exit(EXIT_REJECTED if rejected_input else 1)
    assert isinstance(result, dict), result
    print(f"stages: {result['stages']}\nMLflow parent run: {result['mlflow_run_url']}")
    if result["package"]:
        print(f"bento: {result['package']['bento_tag']} -> {result['package']['archive']}")
    if result.get("deploy"):
        print(f"deploy: flow run {result['deploy']['flow_run_name']} started on the inference pool")
    gc.freeze()  # exit without a last full collection of Prefect's and MLflow's heap: ~1 s


if __name__ == "__main__":
    main()
