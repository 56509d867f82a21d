"""The inference host's MLflow account, made by the admin on the training host (idempotent).

    MLFLOW_TRACKING_URI=http://train.example:5000 MLFLOW_TRACKING_USERNAME=admin \\
    MLFLOW_TRACKING_PASSWORD=... MLOPS_MLFLOW_USER_PASSWORD=... \\
        .venv/bin/python ops/mlflow_users.py --user inference --model digits-classifier

The user is created (or its password reset) with the password from MLOPS_MLFLOW_USER_PASSWORD
(or --password-file), and gets EDIT on two things, each made empty if it is not there yet:
- the registered model: it writes that model's version tags (deployed_at, rolled_back_at,
  rollback_reason);
- the monitor's experiment `<experiment>-monitor` (pipelines.tracking.monitor_experiment_name;
  `--experiment` defaults to params.yaml's tracking.experiment): the `monitor` flow's runs.
It reads everything else through the server's default READ (ops/mlflow-auth.ini: versions,
aliases, the bento archives, the training runs). Nothing more: no training runs, no other models
or experiments. Bad input (no password, a server refusing the admin's credentials) is one line,
exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PASSWORD_ENV = "MLOPS_MLFLOW_USER_PASSWORD"


def ensure_user(
    tracking_uri: str, user: str, password: str, model: str, experiment: str | None = None
) -> None:
    """`user` exists with `password` and holds EDIT on registered model `model` and, given the
    project's `experiment`, on its monitor experiment (monitor_experiment_name(experiment)).

    Needs admin credentials in MLFLOW_TRACKING_USERNAME/PASSWORD. Raises MlflowException
    (mlflow.exceptions.RestException) when the server refuses a call."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient

    auth = AuthServiceClient(tracking_uri)
    try:
        auth.get_user(user)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(user, password)
    else:
        auth.update_user_password(user, password)
    client = MlflowClient(tracking_uri)
    try:
        client.get_registered_model(model)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(model)
    grant_edit(auth, user, "registered_model", model)
    if experiment is not None:
        from pipelines.tracking import monitor_experiment_name

        name = monitor_experiment_name(experiment)
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else client.create_experiment(name)
        grant_edit(auth, user, "experiment", str(experiment_id))


def grant_edit(auth: Any, user: str, kind: str, what: str) -> None:
    """EDIT for `user` on the registered model (kind "registered_model", `what` its name) or the
    experiment (kind "experiment", `what` its id); a grant it already has is made EDIT again."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(user, kind, what, "EDIT")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(user, kind, what)
        auth.grant_user_permission(user, kind, what, "EDIT")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ops/mlflow_users.py", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--user", default="inference", help="the account to make (inference)")
    parser.add_argument("--model", required=True, help="the registered model it may tag")
    parser.add_argument("--password-file", type=Path, help=f"else ${PASSWORD_ENV}")
    parser.add_argument(
        "--experiment",
        help="the project's MLflow experiment (default: params.yaml's tracking.experiment); "
        "the user gets EDIT on <experiment>-monitor",
    )
    args = parser.parse_args(argv)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("http://", "https://")):
        print(
            "error: MLFLOW_TRACKING_URI must name the MLflow server (http://...)", file=sys.stderr
        )
        return 2
    if args.password_file:
        password = args.password_file.read_text().strip()
    else:
        password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        print(f"error: no password for {args.user!r}: set {PASSWORD_ENV}", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", message="starlette.middleware.wsgi is deprecated")
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import monitor_experiment_name

    experiment = args.experiment or project_experiment()
    try:
        ensure_user(uri, args.user, password, args.model, experiment)
    except MlflowException as exc:
        print(f"error: {uri}: {exc.message.splitlines()[0]}", file=sys.stderr)
        return 2
    print(
        f"{args.user}: EDIT on registered model {args.model!r} and on experiment "
        f"{monitor_experiment_name(experiment)!r}, READ elsewhere ({uri})"
    )
    return 0


def project_experiment() -> str:
    """params.yaml's tracking.experiment (null there: data.name) in this checkout."""
    from pipelines.config import load_params

    return load_params(Path(__file__).resolve().parents[1] / "params.yaml").tracking.experiment


if __name__ == "__main__":
    sys.exit(main())
