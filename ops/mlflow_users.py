"""The inference host's MLflow account, made by the admin on the training host (idempotent).

    MLFLOW_TRACKING_URI=http://train.example:5000 MLFLOW_TRACKING_USERNAME=admin \\
    MLFLOW_TRACKING_PASSWORD=... MLOPS_MLFLOW_USER_PASSWORD=... \\
        .venv/bin/python ops/mlflow_users.py --user inference --model digits-classifier

The user is created (or its password reset) with the password from MLOPS_MLFLOW_USER_PASSWORD
(or --password-file), and gets EDIT on the registered model (made empty if it is not there yet):
the inference host reads everything through the server's default READ (ops/mlflow-auth.ini:
versions, aliases, the bento archives) and writes only that model's version tags
(deployed_at, rolled_back_at, rollback_reason). Nothing else: no runs, no other models.
Bad input (no password, a server refusing the admin's credentials) is one line, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

PASSWORD_ENV = "MLOPS_MLFLOW_USER_PASSWORD"


def ensure_user(tracking_uri: str, user: str, password: str, model: str) -> None:
    """`user` exists with `password` and holds EDIT on registered model `model`.

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
    try:
        auth.grant_user_permission(user, "registered_model", model, "EDIT")
    except MlflowException as exc:  # a grant of its own already: made EDIT again
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(user, "registered_model", model)
        auth.grant_user_permission(user, "registered_model", model, "EDIT")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ops/mlflow_users.py", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--user", default="inference", help="the account to make (inference)")
    parser.add_argument("--model", required=True, help="the registered model it may tag")
    parser.add_argument("--password-file", type=Path, help=f"else ${PASSWORD_ENV}")
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

    try:
        ensure_user(uri, args.user, password, args.model)
    except MlflowException as exc:
        print(f"error: {uri}: {exc.message.splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"{args.user}: EDIT on registered model {args.model!r}, READ elsewhere ({uri})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
