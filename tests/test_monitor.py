"""The monitor (pipelines/drift.py, flows/monitor.py): drift of logged rows against the
reference profile, production accuracy from feedback, the report, the gauges.

Fast: the statistics on the digits (reference: the training split; served: the held-out rows,
shifted or not), written in the service's log format. Slow: a real `prefect server`,
`python -m flows.deployments` (the monitor deployment and the `retrain-on-drift` automation),
and `python -m flows.monitor` on an unshifted then a shifted log: the automation creates a
`train/on-demand` run whose `reason` names the drifted features.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines import drift, prediction_log
from pipelines.config import MonitorConfig, load_params
from pipelines.reference import Reference, load_reference
from tests.helpers import REPO
from tests.helpers.drift import Digits, append_lines, digits, log_lines, shifted, write_profile

SHIFTED = list(range(16, 32))  # rows 3 and 4 of the 8x8 image: a quarter of the features


def monitor_config(**update: object) -> MonitorConfig:
    base = load_params(REPO / "params.yaml").monitor
    return base.model_copy(update={"window_rows": 300, "min_rows": 100, **update})


@pytest.fixture(scope="module")
def data() -> Digits:
    return digits()


@pytest.fixture(scope="module")
def reference(data: Digits, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    return load_reference(write_profile(tmp_path_factory.mktemp("ref"), data))


def served(data: Digits, seed: int, rows: int = 300) -> np.ndarray:
    return data.served[np.random.default_rng(seed).permutation(len(data.served))[:rows]]


def test_unshifted_windows_raise_no_alarm(
    data: Digits, reference: Reference, tmp_path: Path
) -> None:
    cfg = monitor_config()
    for seed in range(3):
        log = tmp_path / f"w{seed}"
        append_lines(log / "predictions-w0.jsonl", log_lines(data, served(data, seed)))
        result, _ = drift.check(reference, log, cfg)
        assert result.judged and result.rows == 300
        assert not result.alarm, result.reasons
        assert result.drift_share <= cfg.drift_threshold
        assert result.prediction_js < 0.1  # the same model on the same distribution


def test_shifted_features_raise_an_alarm_naming_them(
    data: Digits, reference: Reference, tmp_path: Path
) -> None:
    rows = shifted(served(data, 7), SHIFTED, 1.0)
    append_lines(tmp_path / "predictions-w0.jsonl", log_lines(data, rows))
    result, nannyml_result = drift.check(reference, tmp_path, monitor_config())
    assert result.alarm and result.reasons[0].startswith("drift: ")
    named = set(result.drifted_features)
    assert len(named & {f"pixel_{i}" for i in SHIFTED}) >= 0.75 * len(named), named
    assert len(named) > 0.2 * len(data.features)
    report = drift.write_report(result, nannyml_result, tmp_path / "report.html")
    text = report.read_text()
    assert "Drift report: ALARM" in text and result.drifted_features[0] in text


def test_wrong_feedback_lowers_production_accuracy(
    data: Digits, reference: Reference, tmp_path: Path
) -> None:
    lines = log_lines(data, served(data, 3), rows_per_request=4)
    append_lines(tmp_path / "predictions-w0.jsonl", lines)
    wrong = set(range(0, len(lines), 4))  # every 4th row labelled unlike its prediction: 25 %
    feedback = [
        {
            "request_id": line["request_id"],
            "row": line["row"],
            "label": (line["prediction"] + 1) % 10 if i in wrong else line["prediction"],
            "timestamp": line["timestamp"],
        }
        for i, line in enumerate(lines)
    ]
    append_lines(tmp_path / "feedback-w0.jsonl", feedback)
    result, _ = drift.check(reference, tmp_path, monitor_config(min_accuracy=0.9))
    assert result.feedback_rows == len(lines)
    assert result.accuracy == pytest.approx(0.75)
    assert any(r.startswith("accuracy: 0.750") for r in result.reasons), result.reasons


def test_the_window_is_the_newest_rows_of_the_serving_version(
    data: Digits, reference: Reference, tmp_path: Path
) -> None:
    old = log_lines(data, shifted(served(data, 1, 200), SHIFTED, 2.0), version="0")
    new = log_lines(data, served(data, 2, 200), start=1000)
    # rotated, in another replica's folder (as an inference host keeps them): the older half
    append_lines(tmp_path / "replica-2" / "predictions-w0.jsonl.1", new[:100])
    append_lines(tmp_path / "predictions-w0.jsonl", [*old, *new[100:]])
    (tmp_path / "predictions-w0.jsonl").open("a").write('{"cut by a full disk\n')
    window = drift.read_window(tmp_path, data.features, 150, model_version="1")
    assert list(window["request_id"]) == [f"r{1000 + i}" for i in range(50, 200)]


def test_too_few_rows_are_not_judged(data: Digits, reference: Reference, tmp_path: Path) -> None:
    append_lines(tmp_path / "predictions-w0.jsonl", log_lines(data, served(data, 0, 20)))
    result, nannyml_result = drift.check(reference, tmp_path, monitor_config())
    assert (result.judged, result.alarm, nannyml_result) == (False, False, None)
    assert math.isnan(result.drift_share)


def test_a_log_of_another_model_is_named(reference: Reference, tmp_path: Path) -> None:
    line = {"request_id": "a", "row": 0, "timestamp": "t", "model_version": "1"}
    append_lines(tmp_path / "predictions-w0.jsonl", [{**line, "features": {"x": 1.0}}])
    with pytest.raises(drift.LogError, match="lack feature"):
        drift.check(reference, tmp_path, monitor_config())
    with pytest.raises(drift.LogError, match="no such directory"):
        drift.check(reference, tmp_path / "missing", monitor_config())


def test_prediction_drift_compares_label_shares() -> None:
    same = drift.prediction_drift({"a": 0.5, "b": 0.5}, ["a", "b"] * 50)
    moved = drift.prediction_drift({"a": 0.5, "b": 0.5}, ["a"] * 90 + ["b"] * 10)
    assert same[0] == pytest.approx(0.0, abs=1e-9) and same[1] == pytest.approx(1.0)
    assert moved[0] > 0.3 and moved[1] < 1e-6 and moved[2] == {"a": 0.9, "b": 0.1}


def test_monitor_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="min_rows"):
        monitor_config().model_validate({**monitor_config().model_dump(), "min_rows": 400})
    with pytest.raises(ValueError, match="cron"):
        monitor_config().model_validate({**monitor_config().model_dump(), "schedule": "often"})


# --- slow: the flow, the event and the automation on a real Prefect server ------------------


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tests.helpers.prefect_server import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect")) as api:
        yield api


def run_cli(module: str, api: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    from tests.helpers.prefect_server import client_env

    command = [sys.executable, "-m", module, *args]
    env = client_env(home, api)
    return subprocess.run(
        command, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def deployed(
    prefect_api: str, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess[str]:
    """`python -m flows.deployments` run once against the module's server (it is idempotent:
    the tests that need the deployments and the automation share one run); its result."""
    done = run_cli("flows.deployments", prefect_api, tmp_path_factory.mktemp("deployer"))
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_drift_starts_train_on_demand_with_the_reason(
    prefect_api: str, deployed: subprocess.CompletedProcess[str], data: Digits, tmp_path: Path
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    delete_train_runs(prefect_api)  # none made by another test of the module counts
    assert "monitor/scheduled" in deployed.stdout
    ids = dict(line.split(": ", 1) for line in deployed.stdout.splitlines() if ": " in line)
    train_id = ids["train/on-demand"].split()[0]
    reference = write_profile(tmp_path, data)
    log = tmp_path / "log"

    def train_runs() -> list[Any]:
        wanted = DeploymentFilter(id=DeploymentFilterId(any_=[train_id]))
        with (
            temporary_settings({PREFECT_API_URL: prefect_api}),
            get_client(sync_client=True) as client,
        ):
            return list(client.read_flow_runs(deployment_filter=wanted))

    append_lines(log / "predictions-w0.jsonl", log_lines(data, served(data, 11, 500)))
    monitor_args = ["--log-dir", str(log), "--reference", str(reference)]
    calm = run_cli("flows.monitor", prefect_api, tmp_path / "w", *monitor_args)
    assert calm.returncode == 0 and "no alarm" in calm.stdout, calm.stderr[-3000:]
    time.sleep(5)  # the automation would act within a second or two
    assert train_runs() == []
    gauges = (log / "monitor" / "monitor.prom").read_text()
    assert "mlops_monitor_alarm" in gauges and 'feature="pixel_20"' in gauges

    rows = shifted(served(data, 12, 500), SHIFTED, 1.0)
    append_lines(log / "predictions-w0.jsonl", log_lines(data, rows, start=10_000))
    alarm = run_cli("flows.monitor", prefect_api, tmp_path / "w", *monitor_args)
    assert alarm.returncode == 0 and "ALARM" in alarm.stdout, alarm.stderr[-3000:]
    deadline = time.monotonic() + 90
    while not (runs := train_runs()) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(runs) == 1, "the automation made no train/on-demand run"
    reason = runs[0].parameters["reason"]
    result = json.loads((log / "monitor" / "result.json").read_text())
    assert reason.startswith("drift: ") and result["drifted_features"][0] in reason
    again = run_cli("flows.monitor", prefect_api, tmp_path / "w", *monitor_args)
    assert (
        "ALARM" in again.stdout
        and "not emitted: train/on-demand run" in again.stdout + again.stderr
    )
    time.sleep(5)
    assert len(train_runs()) == 1  # the first run has not finished: drift asks once


def test_the_monitor_dashboard_reads_the_gauges_the_flow_writes(tmp_path: Path) -> None:
    """Every mlops_monitor_* name in monitoring/grafana/monitor.json is one the flow writes."""
    import re

    from flows.monitor import write_gauges

    result = drift.DriftResult(300, 300, "1", {"pixel_20": drift.FeatureDrift(0.3, 0.1, True)})
    result.drift_share, result.reasons = 1.0, ["drift: ..."]
    write_gauges(result, tmp_path / "monitor.prom")
    text = (tmp_path / "monitor.prom").read_text()
    written = set(re.findall(r"^(mlops_monitor_\w+)[{ ]", text, re.MULTILINE))
    assert 'mlops_monitor_feature_drift_statistic{feature="pixel_20",model_version="1"} 0.3' in text
    board = json.loads((REPO / "monitoring" / "grafana" / "monitor.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    used = set().union(*(re.findall(r"mlops_monitor_\w+", e) for e in exprs))
    assert used and used <= written, used - written


@pytest.mark.slow
def test_a_missing_log_is_one_line_and_exit_2(
    prefect_api: str, data: Digits, tmp_path: Path
) -> None:
    reference = write_profile(tmp_path, data)
    done = run_cli(
        "flows.monitor",
        prefect_api,
        tmp_path / "home",
        "--log-dir",
        str(tmp_path / "nowhere"),
        "--reference",
        str(reference),
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nowhere'}: no such directory (the service's prediction log)"
    )


def serve_logged(url: str, rows: np.ndarray, logs: Path, columns: list[str]) -> None:
    """POST `rows` to /predict, 10 a request, each logged (X-Log-Request); returns once the
    log holds them (it is written off the request path), read back as the monitor reads it."""
    import httpx

    def logged() -> int:
        return len(prediction_log.read_predictions(logs, columns)) if logs.is_dir() else 0

    before = logged()
    for i in range(0, len(rows), 10):
        body = {"rows": rows[i : i + 10].tolist()}
        answer = httpx.post(f"{url}/predict", json=body, headers={"X-Log-Request": "1"})
        assert answer.status_code == 200, answer.text
    deadline = time.monotonic() + 60
    while logged() < before + len(rows):
        assert time.monotonic() < deadline, "the served rows never all reached the log"
        time.sleep(0.2)


def train_runs_of(api: str) -> list[Any]:
    """The flow runs of train/on-demand on the server at `api`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("train/on-demand")
        wanted = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        return list(client.read_flow_runs(deployment_filter=wanted))


def delete_train_runs(api: str) -> None:
    """Earlier tests' train/on-demand runs (never picked up: no worker) deleted."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    runs = train_runs_of(api)
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        for run in runs:
            client.delete_flow_run(run.id)


@pytest.mark.slow
def test_served_load_then_shifted_load_on_a_real_service(
    prefect_api: str, deployed: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    """A real `bentoml serve` (service.py) logs what it serves; the reference profile is the
    one `select` builds (pipelines.reference.build_reference). Traffic drawn from the test
    split: no alarm over two windows; the same traffic with a quarter of the features shifted:
    an alarm naming them, and the automation's train/on-demand run with that reason."""
    from pipelines.prepare import read_split
    from pipelines.reference import build_reference
    from pipelines.runtime import read_metadata
    from pipelines.select import onnx_predictor
    from tests.helpers.serving import live_service, tiny_bento_model

    delete_train_runs(prefect_api)
    tag, prepared = tiny_bento_model(tmp_path)
    onnx = tmp_path / "model" / "model.onnx"
    spec = read_metadata(onnx)["preprocessing"]
    profile = build_reference(prepared, spec, onnx_predictor(onnx, 0), tmp_path, 2000, 0)
    columns = list(spec["feature_columns"])
    test = read_split(prepared, "test")[columns].to_numpy(float)
    logs, rng = tmp_path / "logs", np.random.default_rng(0)
    env = {"MLOPS_MODEL_TAG": tag, "MLOPS_LOG_DIR": str(logs), "MLOPS_API_KEY": ""}
    args = ("--log-dir", str(logs), "--reference", str(profile))
    with live_service(env=env, log=tmp_path / "serve.log") as url:
        for _ in range(2):  # two windows of unshifted traffic
            serve_logged(url, test[rng.integers(0, len(test), 500)], logs, columns)
            calm = run_cli("flows.monitor", prefect_api, tmp_path / "w", *args)
            assert calm.returncode == 0 and "no alarm" in calm.stdout, calm.stderr[-3000:]
        serve_logged(
            url, shifted(test[rng.integers(0, len(test), 500)], SHIFTED, 1.0), logs, columns
        )
    alarm = run_cli("flows.monitor", prefect_api, tmp_path / "w", *args)
    assert alarm.returncode == 0 and "ALARM" in alarm.stdout, alarm.stderr[-3000:]
    named = json.loads((logs / "monitor" / "result.json").read_text())["drifted_features"]
    assert len(set(named) & {columns[i] for i in SHIFTED}) >= 0.75 * len(named), named
    deadline = time.monotonic() + 90
    while not (runs := train_runs_of(prefect_api)) and time.monotonic() < deadline:
        time.sleep(1)
    assert len(runs) == 1, "the automation made no train/on-demand run"
    assert named[0] in runs[0].parameters["reason"]


def test_gauges_are_pushed_when_a_pushgateway_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With MLOPS_PUSHGATEWAY_URL set, the gauges go to /metrics/job/mlops_monitor there (a
    stand-in HTTP server records what a Pushgateway would receive)."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from flows.monitor import write_gauges

    received: list[tuple[str, str, bytes]] = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.command, self.path, body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            """Quiet."""

    server = HTTPServer(("127.0.0.1", 0), Gateway)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLOPS_PUSHGATEWAY_URL", f"127.0.0.1:{server.server_port}")
        result = drift.DriftResult(300, 300, "1", {"pixel_3": drift.FeatureDrift(0.05, 0.1, False)})
        write_gauges(result, tmp_path / "monitor.prom")
    finally:
        server.shutdown()
    ((method, path, body),) = received
    assert (method, path) == ("PUT", "/metrics/job/mlops_monitor")
    assert b'mlops_monitor_feature_drift_statistic{feature="pixel_3",model_version="1"}' in body


def test_a_refused_mlflow_run_is_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's 403 for an account without EDIT on the experiment: no run, one warning line."""
    from mlflow.exceptions import MlflowException

    from flows import monitor

    def refuse(*args: object) -> str:
        raise MlflowException("Permission denied\nmore detail", error_code="PERMISSION_DENIED")

    warned: list[str] = []

    class Logger:
        def warning(self, message: str, *args: object) -> None:
            warned.append(message % args)

    monkeypatch.setattr(monitor, "log_to_mlflow", refuse)
    params = load_params(REPO / "params.yaml")
    assert monitor.mlflow_run_or_warning(params, None, tmp_path, Logger()) is None
    (line,) = warned
    assert line.startswith("MLflow run not written (Permission denied)") and "EDIT" in line
