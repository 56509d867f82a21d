"""The inference host's MLflow account (ops/mlflow_users.py) against a real MLflow server with
basic auth, started as a user starts it (`ops/start mlflow-server`) on loopback (slow tier):
least privilege, so the `monitor` flow's run is written and nothing of training's is writable."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.config import load_params
from tests.helpers import REPO
from tests.helpers.processes import free_port, stop_group, wait_healthy
from tests.test_flow_e2e import base_env

pytestmark = pytest.mark.slow
STARTUP_S = 240  # the MLflow server alone took ~60 s on a loaded 2-core box
EXPERIMENT, MODEL = "grant-test", "grant-model"


@contextlib.contextmanager
def auth_server(base: Path, admin: str) -> Iterator[str]:
    """`ops/start mlflow-server` (basic-auth, serving artifacts) on a free loopback port; its URL
    once /health answers (it needs no credentials)."""
    address = f"127.0.0.1:{free_port()}"
    env = base_env(
        base / "client-home",
        MLOPS_MLFLOW_HOME=str(base / "mlflow"),
        MLOPS_MLFLOW_ADDRESS=address,
        MLOPS_MLFLOW_WORKERS="1",
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(16),
        MLFLOW_AUTH_ADMIN_PASSWORD=admin,
        MLOPS_VENV=sys.prefix,
    )
    log = base / "mlflow-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [str(REPO / "ops" / "start"), "mlflow-server"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{address}"
    try:
        wait_healthy(url, server, STARTUP_S, log)
        yield url
    finally:
        stop_group(server, grace_s=15)


def as_user(monkeypatch: pytest.MonkeyPatch, uri: str, user: str, password: str) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)


def grant(uri: str, admin: str, inference: str, base: Path) -> subprocess.CompletedProcess[str]:
    """ops/mlflow_users.py as the admin, as the README says to run it."""
    command = [sys.executable, str(REPO / "ops" / "mlflow_users.py"), "--user", "inference"]
    env = base_env(
        base / "client-home",
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_TRACKING_USERNAME="admin",
        MLFLOW_TRACKING_PASSWORD=admin,
        MLOPS_MLFLOW_USER_PASSWORD=inference,
    )
    command += ["--model", MODEL, "--experiment", EXPERIMENT]
    return subprocess.run(
        command, check=False, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_inference_account_writes_the_monitor_run_and_nothing_of_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    from flows import monitor
    from pipelines import drift

    admin, inference = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    with auth_server(tmp_path, admin) as uri:
        as_user(monkeypatch, uri, "admin", admin)
        training = MlflowClient(uri).create_experiment(EXPERIMENT)  # what training makes
        training_run = MlflowClient(uri).create_run(training).info.run_id
        for _ in range(2):  # idempotent: a second grant changes nothing
            done = grant(uri, admin, inference, tmp_path)
            assert done.returncode == 0, done.stdout + done.stderr
        assert f"'{EXPERIMENT}-monitor'" in done.stdout

        AuthServiceClient(uri).create_user("nobody", inference)  # signed in, no grant
        as_user(monkeypatch, uri, "inference", inference)
        params = load_params(REPO / "params.yaml", overrides={"tracking.experiment": EXPERIMENT})
        result = drift.DriftResult(300, 300, "1", {"pixel_3": drift.FeatureDrift(0.05, 0.1, False)})
        result.drift_share, result.judged = 0.0, True
        (tmp_path / monitor.REPORT).write_text("<html>report</html>")
        (tmp_path / monitor.RESULT).write_text(json.dumps(result.as_dict()))
        run_id = monitor.log_to_mlflow(params, result, tmp_path)
        as_user(monkeypatch, uri, "nobody", inference)
        with pytest.raises(MlflowException, match="Permission denied"):
            monitor.log_to_mlflow(params, result, tmp_path)  # the grant is what lets it write
        as_user(monkeypatch, uri, "inference", inference)

        client = MlflowClient(uri)
        run = client.get_run(run_id)
        experiment = client.get_experiment(run.info.experiment_id)
        assert experiment.name == f"{EXPERIMENT}-monitor"
        assert run.data.metrics["drift_share"] == 0.0
        assert {a.path for a in client.list_artifacts(run_id)} == {monitor.REPORT, monitor.RESULT}
        client.get_run(training_run)  # training's runs stay readable (the default READ)
        for write in (
            lambda: client.create_run(training),
            lambda: client.set_tag(training_run, "x", "y"),
            lambda: client.set_experiment_tag(training, "x", "y"),
        ):
            with pytest.raises(MlflowException, match="Permission denied"):
                write()
        client.set_registered_model_tag(MODEL, "checked", "yes")  # EDIT on the model, as before
