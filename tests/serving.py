"""Helpers for the serving tests: a BentoML model from a tiny exported graph, and a real
`bentoml serve` subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx

from flows.package import save_bento_model
from pipelines.export import export
from pipelines.runtime import read_metadata
from tests.conftest import REPO
from tests.modelzoo import tiny_params, trained_model

MODEL_NAME = tiny_params().register_.model_name


def tiny_bento_model(root: Path, version: str = "1") -> tuple[str, Path]:
    """A trained, exported tiny CNN saved as a BentoML model; (tag, prepared dir)."""
    import json

    params = tiny_params(**{"train.epochs": 8, "train.patience": 8})  # ~0.9 accuracy, ~2 s
    prepared, model = trained_model(root, params)
    model_dir = root / "model"
    model_dir.mkdir()
    export(params.export, model, prepared, model_dir / "model.onnx")
    (model_dir / "metadata.json").write_text(json.dumps(read_metadata(model_dir / "model.onnx")))
    return save_bento_model(MODEL_NAME, model_dir, version), prepared


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def live_service(
    target: str = "service:Classifier",
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    timeout_s: float = 90.0,
    log: Path | None = None,
) -> Iterator[str]:
    """`bentoml serve <target>` from the project root on a free loopback port; yields its base
    URL once /readyz answers 200, and stops the server (and its workers) afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1"]
    sink = log.open("wb") if log else subprocess.DEVNULL
    process = subprocess.Popen(
        [*command, "--port", str(port), *args],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=sink,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout_s)
        yield url
    finally:
        stop_group(process)
        if log:
            sink.close()  # type: ignore[union-attr]


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process started with start_new_session=True and all it started; SIGKILL after
    20 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, 15)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bentoml serve exited with {process.returncode} before ready")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")
