"""Two hosts on one machine (slow tier): network namespaces `tw-train` and `tw-infer` on a bridge,
each with its own address, every server started the way a user starts it (`ops/start`), with
authentication on at every door.

- "train" (10.231.11.1): the Prefect server (PREFECT_SERVER_API_AUTH_STRING), the MLflow server
  (basic-auth, serving artifacts) and the training worker.
- "infer" (10.231.11.2): the inference worker, which reaches the training host only over the link,
  with its own checkout, its own MLflow account (`inference`, made by ops/mlflow_users.py) and
  MLOPS_SERVING_HOME in a temp dir.

Needs root and iproute2 (`ip netns`); skipped with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.netns import Host, lan, skip_reason
from tests.processes import stop_group
from tests.test_flow_e2e import base_env, tail

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
]
PREFIX = "tw"  # namespaces tw-train, tw-infer; bridge twbr (removed whatever happens)
SUBNET = "10.231.11"
PREFECT_PORT, MLFLOW_PORT, SERVING_PORT = 4200, 5000, 8080  # each host has its own ports
START = REPO / "ops" / "start"
STARTUP_S = 240  # a loaded 2-core CI box: the MLflow server alone took ~60 s here under load


@dataclass
class Cluster:
    """The two hosts, their secrets and what runs where; `procs` are stopped at teardown."""

    train: Host
    infer: Host
    base: Path
    prefect_auth: str = field(default_factory=lambda: f"mlops:{secrets.token_urlsafe(16)}")
    mlflow_admin: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    mlflow_inference: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    api_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def prefect_api(self) -> str:
        return f"http://{self.train.address}:{PREFECT_PORT}/api"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.train.address}:{MLFLOW_PORT}"

    @property
    def serving_url(self) -> str:
        return f"http://{self.infer.address}:{SERVING_PORT}"

    def log(self, name: str) -> Path:
        return self.base / f"{name}.log"

    def start(self, name: str, host: Host, command: list[str], env: dict[str, str]) -> None:
        self.procs[name] = host.popen(command, self.log(name), env, self.base)

    def training_env(self, **extra: str) -> dict[str, str]:
        """What the training host's worker (and its admin) has: the servers' addresses, the
        Prefect auth string, MLflow's admin account."""
        return base_env(
            self.base / "train-home",
            self.prefect_api,
            PREFECT_API_AUTH_STRING=self.prefect_auth,
            MLFLOW_TRACKING_URI=self.mlflow_uri,
            MLFLOW_TRACKING_USERNAME="admin",
            MLFLOW_TRACKING_PASSWORD=self.mlflow_admin,
            MLOPS_VENV=sys.prefix,
            **extra,
        )


def wait_up(cluster: Cluster, name: str, url: str, timeout_s: float = STARTUP_S) -> None:
    """Until GET `url` answers (any status below 500) from the root namespace; a failure with
    the process's log if it exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    proc = cluster.procs[name]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{name} exited with {proc.returncode}:\n{tail(cluster.log(name))}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=3).status_code < 500:
                return
        time.sleep(1)
    pytest.fail(f"{name} not up at {url} after {timeout_s} s:\n{tail(cluster.log(name))}")


def start_training_servers(cluster: Cluster) -> None:
    """`ops/start prefect-server` and `ops/start mlflow-server` in "train", listening on its
    address; both up, and the inference host's MLflow account made."""
    train = cluster.train
    prefect_env = base_env(
        cluster.base / "prefect-home",
        PREFECT_SERVER_API_AUTH_STRING=cluster.prefect_auth,
        PREFECT_SERVER_API_HOST=train.address,
        PREFECT_SERVER_API_PORT=str(PREFECT_PORT),
        MLOPS_VENV=sys.prefix,
    )
    cluster.start("prefect-server", train, [str(START), "prefect-server"], prefect_env)
    mlflow_env = base_env(
        cluster.base / "mlflow-client-home",
        MLOPS_MLFLOW_HOME=str(cluster.base / "mlflow"),
        MLOPS_MLFLOW_ADDRESS=f"{train.address}:{MLFLOW_PORT}",
        MLOPS_MLFLOW_WORKERS="1",
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_urlsafe(16),
        MLFLOW_AUTH_ADMIN_PASSWORD=cluster.mlflow_admin,
        MLOPS_VENV=sys.prefix,
    )
    cluster.start("mlflow-server", train, [str(START), "mlflow-server"], mlflow_env)
    wait_up(cluster, "prefect-server", f"{cluster.prefect_api}/health")
    wait_up(cluster, "mlflow-server", f"{cluster.mlflow_uri}/health")
    users = [sys.executable, str(REPO / "ops" / "mlflow_users.py"), "--user", "inference"]
    env = cluster.training_env(MLOPS_MLFLOW_USER_PASSWORD=cluster.mlflow_inference)
    done = train.run([*users, "--model", "digits-classifier"], env)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Both hosts with the training host's servers up; everything stopped and the namespaces
    removed afterwards."""
    base = tmp_path_factory.mktemp("two-hosts")
    with lan(PREFIX, {"train": 1, "infer": 2}, SUBNET) as hosts:
        cluster = Cluster(hosts["train"], hosts["infer"], base)
        try:
            start_training_servers(cluster)
            yield cluster
        finally:
            for proc in reversed(list(cluster.procs.values())):
                stop_group(proc, grace_s=15)


PROBE = """
import json, sys, httpx
out = []
for method, url, auth, headers in json.loads(sys.argv[1]):
    try:
        r = httpx.request(method, url, auth=tuple(auth) if auth else None, headers=headers,
                          json={} if method == "POST" else None, timeout=10)
        out.append(r.status_code)
    except httpx.HTTPError as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""


Request = tuple[str, str, "tuple[str, str] | None", dict[str, str]]  # method, url, auth, headers


def probe(host: Host, requests: list[Request]) -> list[int | str]:
    """The status of each (method, url, basic auth, headers) request made from `host`."""
    done = host.run([sys.executable, "-c", PROBE, json.dumps(requests)])
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_prefect_api_refuses_requests_without_its_credentials(cluster: Cluster) -> None:
    api = cluster.prefect_api
    user, password = cluster.prefect_auth.split(":", 1)
    statuses = probe(
        cluster.infer,
        [
            ("POST", f"{api}/deployments/filter", None, {}),
            ("POST", f"{api}/deployments/filter", (user, "wrong"), {}),
            ("GET", f"{api}/work_pools/training", None, {}),
            ("POST", f"{api}/deployments/filter", (user, password), {}),
            ("GET", f"{api}/health", None, {}),  # the health probe stays open (Prefect's choice)
        ],
    )
    assert statuses == [401, 401, 401, 200, 200]


def test_mlflow_refuses_requests_without_credentials(cluster: Cluster) -> None:
    uri = cluster.mlflow_uri
    search = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    artifacts = f"{uri}/api/2.0/mlflow-artifacts/artifacts"
    statuses = probe(
        cluster.infer,
        [
            ("GET", search, None, {}),
            ("GET", artifacts, None, {}),
            ("GET", search, ("inference", "wrong"), {}),
            ("GET", search, ("inference", cluster.mlflow_inference), {}),
            ("GET", artifacts, ("inference", cluster.mlflow_inference), {}),
        ],
    )
    assert statuses == [401, 401, 401, 200, 200]
