"""Slow tier: the Prefect server restarts while a GPU stage holds the `gpu` slot.

A real `prefect server start` with the lease storage the README prescribes (on disk, so a lease
outlives a restart); the `train` flow runs the fake project of tests/test_flow.py in a process
of its own, its `train` stage inside the `gpu` limit. The server is stopped and started again
while the stage runs: the run completes, the slot is free afterwards, and the next run gets it.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.helpers.processes import free_port, stop_group
from tests.test_flow import attempts, make_fake_project, set_orchestration, wait_until
from tests.test_flow_e2e import base_env, start, tail, wait_healthy

pytestmark = pytest.mark.slow
LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"  # README: "The gpu slot"
RUN_FLOW = textwrap.dedent(
    """
    import sys
    from flows.train import ensure_gpu_limit, train
    ensure_gpu_limit()
    state = train(project_dir=sys.argv[1], return_state=True)
    print("final state:", state.type.value, state.message)
    sys.exit(0 if state.is_completed() else 1)
    """
)


class Server:
    """`prefect server start` on one port and one PREFECT_HOME, restartable."""

    def __init__(self, base: Path) -> None:
        self.base, self.port = base, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        env = base_env(
            self.base / "server-home", PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=LEASE_STORAGE
        )
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
        log = self.base / f"server-{self.starts}.log"
        self.proc = start([*command, "--port", str(self.port)], env, self.base, log)
        wait_healthy(self.api, self.proc, log, timeout_s=120)

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s=15)
            self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path)
    running.start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: running.api}):
            yield running
    finally:
        running.stop()


def run_flow_process(server: Server, root: Path, log: Path, **env: str) -> subprocess.Popen[bytes]:
    environment = base_env(root.parent / "flow-home", server.api, **env)
    command = [sys.executable, "-c", RUN_FLOW, str(root)]
    return start(command, environment, Path(__file__).resolve().parents[1], log)


def gpu_slots_taken() -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name("gpu").active_slots


def test_a_server_restart_mid_stage_neither_fails_the_run_nor_keeps_the_slot(
    server: Server, tmp_path: Path
) -> None:
    root = make_fake_project(tmp_path / "project")
    set_orchestration(root, gpu_stages=["train"], gpu_wait_s=120)
    go = tmp_path / "go"
    first = run_flow_process(server, root, tmp_path / "first.log", FAKE_TRAIN=f"wait:{go}")
    try:
        wait_until(lambda: attempts(root, "train") == 1, timeout_s=180)  # inside the slot now
        assert gpu_slots_taken() == 1
        server.stop()
        server.start()  # the same database and lease files
        go.touch()
        assert first.wait(timeout=300) == 0, tail(tmp_path / "first.log")
    finally:
        go.touch()
        if first.poll() is None:
            stop_group(first)
    assert gpu_slots_taken() == 0
    set_orchestration(root, gpu_wait_s=20)  # a stale slot would fail this run after 20 s
    second = run_flow_process(server, root, tmp_path / "second.log")
    assert second.wait(timeout=300) == 0, tail(tmp_path / "second.log")
    assert "waits for a slot" not in (tmp_path / "second.log").read_text()
