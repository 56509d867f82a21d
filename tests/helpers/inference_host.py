"""Helpers for the inference host's tests: test bentos (one trained tiny graph, a golden set
measured on it, packed per registry version), an MLflow registry that holds their archives the
way flows.package logs them, and a host under a temp MLOPS_SERVING_HOME."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from inference.settings import HostSettings, host_settings
from pipelines.config import Params
from pipelines.export import export
from pipelines.prepare import read_split
from pipelines.preprocessing import to_model_input
from pipelines.runtime import logits, read_metadata, session, softmax
from tests.helpers import REPO
from tests.helpers.modelzoo import trained_model
from tests.helpers.params import tiny_params
from tests.helpers.processes import free_port

MODEL_NAME = tiny_params().register_.model_name
API_KEY = "host-test-key"


def tiny_graph(root: Path) -> tuple[Path, Path]:
    """A trained tiny CNN exported to ONNX with its metadata: (model dir, prepared dir)."""
    return trained_graph(root, tiny_params(**{"train.epochs": 8, "train.patience": 8}))


def trained_graph(root: Path, params: Params) -> tuple[Path, Path]:
    """The model `params` describe, trained under `root`, exported to ONNX with its metadata in
    root/graph: (model dir, prepared dir)."""
    prepared, model = trained_model(root, params)
    model_dir = root / "graph"
    model_dir.mkdir()
    export(params.export, model, prepared, model_dir / "model.onnx")
    (model_dir / "metadata.json").write_text(json.dumps(read_metadata(model_dir / "model.onnx")))
    return model_dir, prepared


def golden_set(model_dir: Path, prepared: Path, rows: int, wrong_labels: bool = False) -> dict:
    """golden.json in the brief's format: test rows, their labels, and this graph's predictions
    (as select measures them). `wrong_labels` shifts each label by one class: the graph then
    scores ~0 accuracy on it, as a model trained on shuffled labels would."""
    frame = read_split(prepared, "test").iloc[:rows]
    x = frame.drop(columns=["label"]).to_numpy()
    spec = read_metadata(model_dir / "model.onnx")["preprocessing"]
    probs = softmax(logits(session(model_dir / "model.onnx"), to_model_input(x, spec)))
    labels = frame["label"].to_numpy().astype(int)
    if wrong_labels:
        labels = (labels + 1) % probs.shape[1]
    return {
        "rows": x.tolist(),
        "labels": labels.tolist(),
        "probabilities": probs.tolist(),
        "predictions": probs.argmax(axis=1).tolist(),
        "engine": "onnxruntime",
        "precision": "fp32",
        "onnx_sha256": "test",
    }


def build_bento(
    model_dir: Path, golden: dict, version: str, out: Path, service_file: Path | None = None
) -> Path:
    """A bento archive of registry `version`: a BentoML model (graph, metadata, golden.json)
    and the project's bentofile; with `service_file`, that module (wrapping service.py) is the
    bento's service. Returns the exported archive."""
    import bentoml

    from flows.package import MODEL_TAG_ENV

    labels = {"registry_version": version, "precision": "fp32"}
    with bentoml.models.create(MODEL_NAME, labels=labels, metadata=labels) as model:
        for name in ("model.onnx", "metadata.json"):
            shutil.copy(model_dir / name, Path(model.path) / name)
        (Path(model.path) / "golden.json").write_text(json.dumps(golden))
    ctx, bentofile = REPO, REPO / "bentofile.yaml"
    if service_file is not None:
        ctx = out / f"ctx-{version}"
        shutil.copytree(REPO, ctx, ignore=_only_sources)
        shutil.copy(service_file, ctx / service_file.name)
        text = bentofile.read_text().replace(
            '"service:Classifier"', f'"{service_file.stem}:SERVICE"'
        )
        bentofile = ctx / "bentofile.yaml"
        bentofile.write_text(
            text.replace("  - service.py\n", f"  - service.py\n  - {service_file.name}\n")
        )
    out.mkdir(parents=True, exist_ok=True)
    archive = out / f"v{version}.bento"
    # A fresh interpreter per build: service.py reads MLOPS_MODEL_TAG once, at import.
    labels = {"registry_version": version, "model": str(model.tag)}
    code = (
        "import bentoml, json, sys; a = json.loads(sys.argv[1]); "
        "b = bentoml.bentos.build_bentofile(a[0], build_ctx=a[1], labels=a[2]); "
        "bentoml.bentos.export_bento(str(b.tag), a[3])"
    )
    arg = json.dumps([str(bentofile), str(ctx), labels, str(archive)])
    env = {**os.environ, MODEL_TAG_ENV: str(model.tag)}
    subprocess.run([sys.executable, "-c", code, arg], check=True, env=env, cwd=ctx, timeout=300)
    return archive


def _only_sources(directory: str, names: list[str]) -> list[str]:
    keep = {"service.py", "params.yaml", "bentofile.yaml", "pipelines"}
    if Path(directory).resolve() == REPO.resolve():
        return [n for n in names if n not in keep]
    return [n for n in names if n == "__pycache__"]


def register_archive(archive: Path, version: str, champion: bool = False) -> None:
    """Log `archive` under bento/ of a new run and register it as the next version of the model,
    with the tags flows.package sets (bento_tag, bento_artifact); `champion` moves the alias."""
    import mlflow
    from mlflow import MlflowClient

    from inference.store import inspect

    client = MlflowClient()
    tag = inspect(archive, MODEL_NAME).tag
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(archive), "bento")
    if not client.search_registered_models(f"name='{MODEL_NAME}'"):
        client.create_registered_model(MODEL_NAME)
    mv = client.create_model_version(MODEL_NAME, f"runs:/{run.info.run_id}/bento", run.info.run_id)
    assert str(mv.version) == version, (mv.version, version)
    client.set_model_version_tag(MODEL_NAME, version, "bento_tag", tag)
    client.set_model_version_tag(MODEL_NAME, version, "bento_artifact", f"bento/{archive.name}")
    if champion:
        client.set_registered_model_alias(MODEL_NAME, "champion", version)


def host_for(home: Path) -> HostSettings:
    """Settings of a host under `home`: proxy on a free loopback port, replicas in a range."""
    low = 30000 + (free_port() % 200) * 100
    env = {
        "MLOPS_SERVING_HOME": str(home),
        "MLOPS_SERVING_ADDRESS": f"127.0.0.1:{free_port()}",
        "MLOPS_SERVING_PORTS": f"{low}-{low + 99}",
        "MLOPS_API_KEY": API_KEY,
    }
    return host_settings(env)


@dataclass
class Load:
    """A bounded constant stream of /predict requests through the proxy in a thread: statuses
    and the model versions that answered.

    It behaves as the README asks clients to: a request whose keep-alive connection the proxy
    closed without any answer (nginx's reload closes idle client connections; one sent at that
    instant meets the close) is sent once more on a new connection, and counted in `retried`.
    /predict is idempotent, so the retry is safe."""

    url: str
    rows: list[list[float]]
    max_requests: int = 3000
    max_s: float = 240.0
    statuses: Counter = field(default_factory=Counter)
    versions: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    retried: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        headers = {"x-api-key": API_KEY}
        with httpx.Client(timeout=30, headers=headers) as client:
            for i in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                body = {"rows": self.rows[i % 5 : i % 5 + 2]}
                try:
                    try:
                        r = client.post(f"{self.url}/predict", json=body)
                    except httpx.RemoteProtocolError:  # closed unanswered: once more, new conn
                        self.retried += 1
                        r = client.post(f"{self.url}/predict", json=body)
                    self.statuses[r.status_code] += 1
                    if r.status_code == 200:
                        self.versions[r.json()[0]["model_version"]] += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:100]}")
                except httpx.HTTPError as exc:
                    self.statuses["error"] += 1
                    self.failures.append(repr(exc))
                time.sleep(0.01)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(60)

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != 200)


def rows_of(golden: dict) -> list[list[float]]:
    return [list(map(float, r)) for r in np.asarray(golden["rows"])[:10]]
