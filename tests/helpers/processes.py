"""Servers in subprocesses, for the tests and the benchmarks (which put the repository on
sys.path): a free loopback port, waiting for readiness, and stopping a whole process group.
Light on purpose: only the standard library and httpx."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(
    url: str,
    process: subprocess.Popen[bytes],
    timeout_s: float,
    name: str = "bentoml serve",
    path: str = "/readyz",
    status: int = 200,
) -> None:
    """Until `url``path` answers `status` (200: ready); an error if `process` exits first or
    time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}{path}", timeout=2).status_code == status:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{name} at {url} not ready after {timeout_s} s")


def wait_healthy(
    url: str, server: subprocess.Popen[bytes], timeout_s: float, log_path: Path
) -> None:
    """An MLflow server at `url` answers /health within `timeout_s`; else an error with the tail
    of its log (`log_path`)."""
    try:
        wait_ready(url, server, timeout_s, name="mlflow server", path="/health")
    except (RuntimeError, TimeoutError) as exc:
        raise RuntimeError(f"{exc}: {log_path.read_text()[-3000:]}") from exc


def stop_group(process: subprocess.Popen[bytes], grace_s: float = 20) -> None:
    """SIGTERM a process started with start_new_session=True and all it started; SIGKILL after
    `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


@contextlib.contextmanager
def mlflow_server(root: Path) -> Iterator[str]:
    """A real `mlflow server` with `--serve-artifacts` (clients log and download artifacts over
    HTTP, the store is only the server's: sqlite and a folder under `root`) on a free loopback
    port; its URL once /health answers. RuntimeError with its log's tail if it does not start
    within 120 s."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1", "--serve-artifacts"]
    command += ["--backend-store-uri", f"sqlite:///{root / 'server.db'}"]
    command += ["--artifacts-destination", str(root / "server-artifacts")]
    log_path = root / "mlflow-server.log"
    log = log_path.open("wb")
    server = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, 120, log_path)
        yield url
    finally:
        stop_group(server, grace_s=15)
        log.close()
