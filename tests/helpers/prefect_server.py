"""A real `prefect server start` (all its services: triggers and actions run automations) on a
free loopback port, its home in a temp dir; stopped whatever happens."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.helpers.processes import free_port, stop_group

STARTUP_S = 180  # ~16 s on an idle box; migrations on a fresh home and a loaded CI take longer


def client_env(home: Path, api: str | None = None, **extra: str) -> dict[str, str]:
    """This environment less PREFECT_*/MLOPS_* variables, with its own PREFECT_HOME, telemetry
    off, and PREFECT_API_URL=`api` when given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLOPS_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        **extra,
    )
    if api:
        env["PREFECT_API_URL"] = api
    return env


@contextlib.contextmanager
def prefect_server(base: Path) -> Iterator[str]:
    """The server's API URL once /api/health answers; RuntimeError with its log's tail if it
    exits or does not answer within STARTUP_S."""
    port = free_port()
    log = base / "server.log"
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    env = client_env(base / "home", PREFECT_UI_ENABLED="false")
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(api, process, log)
        yield api
    finally:
        stop_group(process, grace_s=15)


def _wait_healthy(api: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{_tail(log)}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{api}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {STARTUP_S} s:\n{_tail(log)}")


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
