"""Helpers for the serving tests: a BentoML model from a tiny exported graph, and a real
`bentoml serve` subprocess on a free loopback port."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from flows.package import save_bento_model
from pipelines.export import export
from pipelines.runtime import read_metadata
from tests.helpers import REPO
from tests.helpers.modelzoo import trained_model, write_golden
from tests.helpers.params import tiny_params
from tests.helpers.processes import free_port, stop_group, wait_ready

MODEL_NAME = tiny_params().register_.model_name


def tiny_bento_model(root: Path, version: str = "1") -> tuple[str, Path]:
    """A trained, exported tiny CNN saved as a BentoML model with a golden set (50 rows);
    (tag, prepared dir)."""
    import json

    params = tiny_params(**{"train.epochs": 8, "train.patience": 8})  # ~0.9 accuracy, ~2 s
    prepared, model = trained_model(root, params)
    model_dir = root / "model"
    model_dir.mkdir()
    export(params.export, model, prepared, model_dir / "model.onnx")
    (model_dir / "metadata.json").write_text(json.dumps(read_metadata(model_dir / "model.onnx")))
    write_golden(model_dir / "model.onnx", prepared, model_dir / "golden.json")
    return save_bento_model(MODEL_NAME, model_dir, version), prepared


@contextlib.contextmanager
def live_service(
    target: str = "service:Classifier",
    env: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    timeout_s: float = 90.0,
    log: Path | None = None,
    cwd: Path = REPO,
    ready_status: int = 200,
) -> Iterator[str]:
    """`bentoml serve <target>` from `cwd` (the project root) on a free loopback port; yields its
    base URL once /readyz answers `ready_status` (200: ready; 503: started, model not loaded),
    and stops the server (and its workers) afterwards."""
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", target, "--host", "127.0.0.1"]
    sink = log.open("wb") if log else subprocess.DEVNULL
    process = subprocess.Popen(
        [*command, "--port", str(port), *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=sink,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout_s, status=ready_status)
        yield url
    finally:
        stop_group(process)
        if log:
            sink.close()  # type: ignore[union-attr]
