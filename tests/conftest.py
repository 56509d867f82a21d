"""Shared fixtures and hooks. Every store (MLflow, Prefect, BentoML, DVC cache) is isolated per
session; tests marked `gpu` or `tensorrt` are skipped, with the reason, where the host lacks it.
Helpers the tests share live in tests/helpers/ (they never import this file)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from pipelines.config import Params, load_params
from tests.helpers import REPO
from tests.helpers.params import tiny_params


@cache
def missing(marker: str) -> str | None:
    """Why a test marked `marker` cannot run on this host, or None when it can."""
    if marker == "gpu":
        import torch

        return None if torch.cuda.is_available() else "no CUDA device"
    from pipelines import tensorrt_engine

    reason = tensorrt_engine.unavailable_reason()
    return reason and f"TensorRT plans cannot be built here: {reason}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark a `gpu` / `tensorrt` test skipped where the host lacks it, with what is missing
    (`-ra` lists it under the test's own name)."""
    for item in items:
        for marker in ("gpu", "tensorrt"):
            if item.get_closest_marker(marker) and (reason := missing(marker)):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def isolated_stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point MLflow, Prefect, BentoML and GX at a session temp dir; never the network."""
    base = tmp_path_factory.mktemp("stores")
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{base / 'mlflow.db'}",
        "PREFECT_HOME": str(base / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "BENTOML_HOME": str(base / "bentoml"),
        "MLOPS_LOG_DIR": str(base / "serve-logs"),  # service.py's prediction log
        "GX_ANALYTICS_ENABLED": "false",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    os.environ.pop("MLOPS_PARENT_RUN_ID", None)
    yield base
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def params() -> Params:
    """The real params.yaml, shrunk for tests: tests.helpers.params.tiny_params()."""
    return tiny_params()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A temp project root with a copy of params.yaml, for stage CLIs run as subprocesses."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data").mkdir()
    return tmp_path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default digits, prepared once per test module."""
    from pipelines.prepare import prepare

    params = load_params(REPO / "params.yaml")
    out = tmp_path_factory.mktemp("prepared")
    prepare(params.data, params.prepare, REPO, out)
    return out


@pytest.fixture
def mlflow_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow store for one test, and no inherited parent run."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLOPS_PARENT_RUN_ID", raising=False)
    return uri


@pytest.fixture(scope="session")
def bento_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The tiny digits model in the session's BentoML store: (its tag, its prepared data)."""
    from tests.helpers.serving import tiny_bento_model

    return tiny_bento_model(tmp_path_factory.mktemp("service"))


@pytest.fixture(scope="session")
def service_client(bento_model: tuple[str, Path]) -> Iterator[Any]:
    """service.py in-process (Starlette's TestClient) serving `bento_model`: ONE app per test
    process, shared by the modules that need it, because BentoML registers its Prometheus
    metrics in the process's registry when an app starts, and a second app's registration is a
    DuplicateTimeseries. service.py reads its model tag when imported, and `package` (a bento
    build) imports it for its own model: import it afresh, for this model."""
    import sys

    from starlette.testclient import TestClient

    sys.modules.pop("service", None)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLOPS_MODEL_TAG", bento_model[0])
        import service

        with TestClient(service.SERVICE.to_asgi(), raise_server_exceptions=False) as test_client:
            yield test_client
