"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Run ids travel explicitly. The orchestrator (the Prefect flow) creates the parent run and hands its
id to every stage process in `MLOPS_PARENT_RUN_ID`. Under a plain `dvc repro`, the stage processes
of one `dvc` invocation find each other through a small session file keyed by that `dvc` process,
so they still share one parent. The tracking URI is set in one place: `tracking.uri` in
params.yaml, replaced by `MLFLOW_TRACKING_URI` when that is set.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.artifacts import absolute_sqlite_url
from pipelines.config import Params, TrackingConfig, section_dict

if TYPE_CHECKING:
    from mlflow import MlflowClient

PARENT_ENV = "MLOPS_PARENT_RUN_ID"
SESSION_DIR = Path("mlruns") / ".sessions"
CORE_PACKAGES = (
    "torch",
    "numpy",
    "pandas",
    "scikit-learn",
    "mlflow",
    "great-expectations",
    "dvc",
    "prefect",
    "onnx",
    "onnxruntime",
    "optuna",
    "bentoml",
)
log = logging.getLogger(__name__)


def tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else `cfg.uri` with a relative SQLite path made absolute."""
    return absolute_sqlite_url(os.environ.get("MLFLOW_TRACKING_URI") or cfg.uri, root)


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/"))


def experiment_id(client: MlflowClient, cfg: TrackingConfig, root: Path, uri: str) -> str:
    """The experiment's id, created on first use (artifacts under `cfg.artifacts` when local)."""
    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        return str(found.experiment_id)
    location = (root / cfg.artifacts).resolve().as_uri() if is_local_store(uri) else None
    with contextlib.suppress(Exception):  # a concurrent stage may have created it meanwhile
        return str(client.create_experiment(cfg.experiment, artifact_location=location))
    found = client.get_experiment_by_name(cfg.experiment)
    if found is None:
        raise RuntimeError(f"could not create MLflow experiment {cfg.experiment!r} at {uri}")
    return str(found.experiment_id)


def client_for(cfg: TrackingConfig, root: Path) -> tuple[MlflowClient, str]:
    """A client bound to the configured store, and the experiment id."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, root)
    client = MlflowClient(tracking_uri=uri)
    return client, experiment_id(client, cfg, root, uri)


def git_commit(root: Path) -> str:
    """HEAD's commit, with "-dirty" when tracked files differ; "unknown" outside git."""
    try:
        head = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def package_versions() -> dict[str, str]:
    """Every installed distribution and its version."""
    versions = {(d.metadata["Name"] or "").lower(): d.version for d in metadata.distributions()}
    versions.pop("", None)
    return dict(sorted(versions.items()))


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"model": {"arch": "cnn"}}} -> {"train.model.arch": "cnn"}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def run_tags(root: Path) -> dict[str, str]:
    versions = package_versions()
    tags = {f"pkg.{name}": versions[name] for name in CORE_PACKAGES if name in versions}
    tags["git.commit"] = git_commit(root)
    tags["python"] = platform.python_version()
    return tags


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    flat = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()]
    for start in range(0, len(flat), 100):
        client.log_batch(run_id, params=flat[start : start + 100])


def start_parent_run(params: Params, root: Path, name: str = "pipeline") -> str:
    """Create a pipeline parent run holding every effective param; returns its id."""
    client, exp_id = client_for(params.tracking, root)
    run = client.create_run(
        exp_id, run_name=name, tags={**run_tags(root), "mlops.kind": "pipeline"}
    )
    log_params(client, run.info.run_id, flatten(section_dict(params)))
    return str(run.info.run_id)


def end_parent_run(params: Params, root: Path, run_id: str, status: str = "FINISHED") -> None:
    client, _ = client_for(params.tracking, root)
    client.set_terminated(run_id, status=status)


def _dvc_ancestor() -> str | None:
    """An id for the `dvc` process that started this stage, if one did."""
    import psutil

    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().parents():
            cmd = proc.cmdline()
            if any(Path(part).name == "dvc" for part in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                return f"{proc.pid}-{int(proc.create_time())}"
    return None


def resolve_parent(params: Params, root: Path) -> tuple[str, bool]:
    """The parent run id, and whether this stage owns its status (no orchestrator above)."""
    explicit = os.environ.get(PARENT_ENV)
    if explicit:
        return explicit, False
    session = _dvc_ancestor()
    if session is None:
        return start_parent_run(params, root), True
    marker = root / SESSION_DIR / f"{session}.json"
    if marker.exists():
        return str(json.loads(marker.read_text())["parent_run_id"]), True
    run_id = start_parent_run(params, root, name="dvc-repro")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"parent_run_id": run_id}))
    return run_id, True


@dataclass
class StageRun:
    """A stage's nested MLflow run, addressed by explicit ids."""

    client: MlflowClient
    run_id: str
    parent_run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        log_params(self.client, self.run_id, flatten(params))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Make this run MLflow's active run for a call that needs one (e.g. log_model)."""
        import mlflow

        mlflow.set_tracking_uri(self.client.tracking_uri)
        mlflow.start_run(run_id=self.run_id)
        try:
            yield
        finally:
            mlflow.end_run()  # the stage's own context sets the final status afterwards


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    section: Mapping[str, Any],
    root: Path | None = None,
    data_hash: str | None = None,
) -> Iterator[StageRun]:
    """Open the nested run for `stage`; it ends FINISHED, or FAILED when the body raises."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    root = (root or Path.cwd()).resolve()
    client, exp_id = client_for(params.tracking, root)
    parent_id, owns_parent = resolve_parent(params, root)
    tags = {**run_tags(root), MLFLOW_PARENT_RUN_ID: parent_id, "mlops.stage": stage}
    if data_hash:
        tags["data.content_hash"] = data_hash
    run = StageRun(client, client.create_run(exp_id, run_name=stage, tags=tags).info.run_id, "")
    run.parent_run_id = parent_id
    if owns_parent:
        client.update_run(parent_id, status="RUNNING")
    run.log_params(section)
    run.log_dict({"python": sys.version, "packages": package_versions()}, "environment.json")
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    finally:
        client.set_terminated(run.run_id, status=status)
        if owns_parent:
            client.set_terminated(parent_id, status=status)
