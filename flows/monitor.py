"""The inference host's `monitor` flow: is what the host serves still what the model learnt?

The newest `monitor.window_rows` rows of the prediction log against the serving version's
reference profile (pipelines/drift.py does the statistics, with NannyML). Each run writes:
- an HTML report (in `<log dir>/monitor/`, and in the MLflow run; a Prefect link artifact opens
  it in the MLflow UI), and a Markdown summary artifact;
- Prometheus gauges (`mlops_monitor_*`) in `<log dir>/monitor/monitor.prom` (node_exporter's
  textfile collector format), pushed to a Pushgateway when MLOPS_PUSHGATEWAY_URL is set;
- an MLflow run `monitor` in the experiment `<tracking.experiment>-monitor` (metrics per feature
  and overall, the report, result.json);
- on an alarm (drift share over `monitor.drift_threshold`, or production accuracy under
  `monitor.min_accuracy`), the Prefect event `mlops.monitor.drift` with the reason: the
  automation `retrain-on-drift` (flows/deployments.py) starts `train/on-demand` with it; not
  while a run it started earlier has not finished (one retraining per lasting drift).

The window holds the logged rows of the serving version only (state.json's registry version;
with `--reference`, the profile's `model_version` when it names one, else every row).

Runs on the `inference` pool (deployment `monitor/scheduled`, on `monitor.schedule`; its Run
button runs it at once) or by hand: `python -m flows.monitor [--log-dir D] [--reference R]`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.states import Failed, State

from pipelines.cli import EXIT_REJECTED
from pipelines.config import Params, environment, load_params
from pipelines.errors import PipelineError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PARAMS = PROJECT_ROOT / "params.yaml"
EVENT = "mlops.monitor.drift"  # the automation `retrain-on-drift` listens for it
REPORT, RESULT, GAUGES = "drift_report.html", "result.json", "monitor.prom"


class MonitorInputError(PipelineError):
    """The flow cannot find what to compare (no log directory, no reference profile)."""


def log_dir_of(params: Params, given: str | None, serving: str | None) -> Path:
    """`given`, else MLOPS_LOG_DIR, else on an inference host the log folder of the `serving`
    version (its replicas' folders inside: inference/supervisor.py), else params.yaml
    serve.log_dir (relative: to the checkout)."""
    if not given and environment().log_dir is None and serving is not None:
        from inference.settings import host_settings
        from inference.supervisor import prediction_log_dir

        return prediction_log_dir(host_settings(), serving, "replica").parent
    path = Path(given) if given else environment().log_dir or params.serve.log_dir
    return path if path.is_absolute() else PROJECT_ROOT / path


def reference_dir_of(params: Params, given: str | None) -> tuple[Path, str | None]:
    """(`given`, None), else (the `reference/` folder of the BentoML model of the version this
    inference host serves (state.json under MLOPS_SERVING_HOME), that registry version).
    MonitorInputError when neither exists."""
    if given:
        return Path(given), None
    from inference import store
    from inference.errors import HostSettingsError
    from inference.settings import host_settings
    from inference.state import read_state

    try:
        settings = host_settings()
    except HostSettingsError as exc:
        raise MonitorInputError(
            f"no reference profile: pass --reference DIR, or run on an inference host ({exc})"
        ) from None
    current = read_state(settings.home).current
    if current is None:
        raise MonitorInputError(f"{settings.home}: this inference host serves no version yet")
    bento = store.local(settings, current.bento, params.register_.model_name)
    return store.model_dir(settings, current.bento, bento.model_tag) / "reference", current.version


@flow(name="monitor", log_prints=True)
def monitor(
    log_dir: str | None = None, reference: str | None = None
) -> dict[str, Any] | State[Any]:
    """Judge the newest window of the prediction log against the serving version's reference
    profile; report it (HTML, gauges, MLflow) and emit `mlops.monitor.drift` on an alarm.
    `log_dir`: the service's log directory (default: MLOPS_LOG_DIR; on an inference host the
    serving version's; else serve.log_dir); `reference`: a `reference/` folder (default: the
    serving version's, on an inference host)."""
    from pipelines import drift
    from pipelines.reference import load_reference

    logger = get_run_logger()
    params = load_params(PARAMS)
    try:
        folder, serving = reference_dir_of(params, reference)
        logs = log_dir_of(params, log_dir, serving)
        result, nannyml_result = drift.check(load_reference(folder), logs, params.monitor, serving)
    except PipelineError as exc:
        logger.error("%s", exc)
        return Failed(message=str(exc), data=exc)
    logger.info("%s", summary_line(result))
    out = logs / "monitor"
    drift.write_report(result, nannyml_result, out / REPORT)
    (out / RESULT).write_text(json.dumps(result.as_dict(), indent=2))
    write_gauges(result, out / GAUGES)
    run_id = mlflow_run_or_warning(params, result, out, logger)
    publish(params, result, run_id, out / REPORT)
    if result.alarm and not retrain_pending(logger):
        emit_drift_event(params, result)
    return {**result.as_dict(), "mlflow_run_id": run_id, "report": str(out / REPORT)}


def summary_line(result: Any) -> str:
    """One line: rows, drift share, drifted features, prediction shift, accuracy, verdict."""
    if not result.judged:
        return f"{result.rows} logged rows: fewer than monitor.min_rows, not judged"
    accuracy = "n/a" if math.isnan(result.accuracy) else f"{result.accuracy:.3f}"
    return (
        f"{result.rows} logged rows ({result.requests} requests), model version"
        f" {result.model_version}: drift share {result.drift_share:.3f}"
        f" ({', '.join(result.drifted_features[:10]) or 'no feature'}), predicted labels JS"
        f" {result.prediction_js:.3f}, accuracy {accuracy} on {result.feedback_rows} rows"
        f" with feedback: {'; '.join(result.reasons) or 'no alarm'}"
    )


def gauges(result: Any) -> Any:
    """A prometheus_client registry with the run's figures (NaN: not measured)."""
    from prometheus_client import CollectorRegistry, Gauge

    registry = CollectorRegistry()
    version = str(result.model_version or "")

    def gauge(name: str, doc: str, value: float, **labels: str) -> None:
        g = Gauge(f"mlops_monitor_{name}", doc, ["model_version", *labels], registry=registry)
        g.labels(model_version=version, **labels).set(value)

    gauge("drift_share", "Share of features whose drift test alerts", result.drift_share)
    gauge("alarm", "1 when the last window alarmed (drift or accuracy)", float(result.alarm))
    gauge("rows", "Logged rows in the last window judged", float(result.rows))
    gauge("prediction_js_distance", "Predicted labels vs reference (JS)", result.prediction_js)
    gauge("accuracy", "Production accuracy on rows with feedback", result.accuracy)
    gauge("feedback_rows", "Rows with feedback in the window", float(result.feedback_rows))
    family = Gauge(
        "mlops_monitor_feature_drift_statistic",
        "Kolmogorov-Smirnov D of each feature, window vs reference",
        ["model_version", "feature"],
        registry=registry,
    )
    for name, found in result.features.items():
        family.labels(model_version=version, feature=name).set(found.statistic)
    stamp = Gauge(
        "mlops_monitor_last_run_timestamp_seconds", "End of the last run", registry=registry
    )
    stamp.set_to_current_time()
    return registry


def write_gauges(result: Any, path: Path) -> None:
    """The gauges as a textfile (node_exporter's collector reads it); pushed to the
    Pushgateway at MLOPS_PUSHGATEWAY_URL when set (job `mlops_monitor`)."""
    from prometheus_client import push_to_gateway, write_to_textfile

    registry = gauges(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)
    gateway = environment().pushgateway_url
    if gateway:
        push_to_gateway(gateway, job="mlops_monitor", registry=registry)


def mlflow_metrics(result: Any) -> dict[str, float]:
    """The run's metrics: overall figures and `drift_<feature>` statistics (NaN left out)."""
    found = {
        "rows": float(result.rows),
        "drift_share": result.drift_share,
        "prediction_js_distance": result.prediction_js,
        "prediction_chi2_p": result.prediction_p,
        "accuracy": result.accuracy,
        "feedback_rows": float(result.feedback_rows),
        "alarm": float(result.alarm),
    }
    found |= {f"drift_{n}": f.statistic for n, f in result.features.items()}
    return {k: v for k, v in found.items() if not math.isnan(v)}


def log_to_mlflow(params: Params, result: Any, out: Path) -> str:
    """An MLflow run `monitor` in the monitor's experiment (`<tracking.experiment>-monitor`,
    pipelines.tracking.monitor_experiment_name): metrics, the report, result.json."""
    from mlflow.entities import Metric

    from pipelines.tracking import monitor_client

    client, experiment = monitor_client(params.tracking, PROJECT_ROOT)
    tags = {"mlops.kind": "monitor", "model_version": str(result.model_version or "")}
    run = client.create_run(experiment, run_name="monitor", tags=tags)
    run_id = str(run.info.run_id)
    now = int(run.info.start_time)
    metrics = [Metric(k, v, now, 0) for k, v in mlflow_metrics(result).items()]
    client.log_batch(run_id, metrics=metrics)
    for name in (REPORT, RESULT):
        client.log_artifact(run_id, str(out / name))
    client.set_terminated(run_id)
    return run_id


def mlflow_run_or_warning(params: Params, result: Any, out: Path, logger: Any) -> str | None:
    """log_to_mlflow's run id; None, with one warning line, when the MLflow server refuses or
    cannot be reached (the report, the gauges and the event do not depend on it)."""
    from mlflow.exceptions import MlflowException
    from requests.exceptions import RequestException

    try:
        return log_to_mlflow(params, result, out)
    except (MlflowException, RequestException, OSError) as exc:
        logger.warning(
            "MLflow run not written (%s): the report stays at %s. Behind MLflow's basic auth"
            " the inference host's account needs EDIT on the monitor's experiment, granted by"
            " ops/mlflow_users.py (README: Drift and retraining)",
            str(exc).splitlines()[0][:300],
            out / REPORT,
        )
        return None


def publish(params: Params, result: Any, run_id: str | None, report: Path) -> None:
    """Prefect artifacts: a link to the report in the MLflow UI (else its path on the host),
    and the verdict in Markdown."""
    from flows.reporting import mlflow_run_url

    if run_id:
        url = mlflow_run_url(params, PROJECT_ROOT, run_id, REPORT)
        create_link_artifact(url, link_text="Drift report (MLflow)", key="drift-report")
    else:
        create_markdown_artifact(
            f"Drift report on the inference host: `{report}`", key="drift-report"
        )
    rows = "\n".join(
        f"| {n} | {f.statistic:.4f} | {f.threshold:.4f} |"
        for n, f in sorted(result.features.items(), key=lambda kv: -kv[1].statistic)[:15]
    )
    create_markdown_artifact(
        f"**{'ALARM' if result.alarm else 'No alarm'}**: {summary_line(result)}\n\n"
        f"| feature | K-S D | critical D |\n|---|---|---|\n{rows}",
        key="drift-summary",
    )


RETRAIN_DEPLOYMENT = "train/on-demand"  # what the automation `retrain-on-drift` runs


def retrain_pending(logger: Any) -> bool:
    """True (and a log line) when a run of train/on-demand started by the automation (it has
    a `reason`) has not finished yet: a drift that lasts until the new model serves asks once."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import ObjectNotFound

    unfinished = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED]
    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(RETRAIN_DEPLOYMENT)
        except ObjectNotFound:
            return False
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])),
            flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=unfinished))
            ),
        )
    asked = [r for r in runs if r.parameters.get("reason")]
    if asked:
        logger.info(
            "not emitted: %s run %s, asked for by an earlier alarm, has not finished (%s)",
            RETRAIN_DEPLOYMENT,
            asked[0].name,
            asked[0].state_name,
        )
    return bool(asked)


def emit_drift_event(params: Params, result: Any) -> None:
    """`mlops.monitor.drift` about the model, the reason and the figures in its payload."""
    from prefect.events import emit_event

    name = params.register_.model_name
    emit_event(
        EVENT,
        resource={"prefect.resource.id": f"mlops.model.{name}", "prefect.resource.name": name},
        payload={
            "reason": "; ".join(result.reasons),
            "model_version": result.model_version,
            "drifted_features": result.drifted_features,
            "drift_share": _finite(result.drift_share),
            "accuracy": _finite(result.accuracy),
            "rows": result.rows,
        },
    )
    get_run_logger().warning("emitted %s: %s", EVENT, "; ".join(result.reasons))


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.monitor", description=monitor.description
    )
    parser.add_argument("--log-dir", help="the service's log directory (default: MLOPS_LOG_DIR)")
    parser.add_argument("--reference", help="a reference/ folder (default: the serving version's)")
    args = parser.parse_args(argv)
    state: Any = monitor(log_dir=args.log_dir, reference=args.reference, return_state=True)
    result = state.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        print(f"error: {result}", file=sys.stderr)
        sys.exit(EXIT_REJECTED if isinstance(result, PipelineError) else 1)
    print(f"{'ALARM' if result['alarm'] else 'no alarm'}: report {result['report']}")


if __name__ == "__main__":
    main()
