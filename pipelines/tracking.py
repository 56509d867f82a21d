"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

Run ids travel explicitly, in the environment of the stage processes (`resolve_parent`; the
variables are read through `pipelines.config.environment()`):
- `MLOPS_PARENT_RUN_ID`: the orchestrator (the Prefect flow) creates the parent run and hands its
  id to every stage process; it owns the parent's status. A user can do the same around a plain
  `dvc repro` (`MLOPS_PARENT_RUN_ID=<run id> dvc repro`).
- `DVC_EXP_NAME` (with `DVC_EXP_BASELINE_REV`), which `dvc exp run` sets for every stage command:
  the stages of one DVC experiment share one parent run named after it (tagged
  `mlops.dvc.experiment` and `mlops.dvc.baseline`), created by its first stage.
- neither (a plain `dvc repro`, DVC sets only `DVC_ROOT` and `DVC_STAGE`): each stage run stands
  alone under a parent run of its own.
The tracking URI is set in one place: `tracking.uri` in
params.yaml, replaced by `MLFLOW_TRACKING_URI` when that is set.

What the MLflow UI shows comes from MLflow's own tags and inputs: the experiment is tagged as model
training (`mlflow.experimentKind`), every run carries the `mlflow.source.*` tags (Source column)
and the prepared data set as a dataset input (Dataset column). Every run records its owner (host,
PID, process start time); a run left RUNNING by an owner that no longer exists on this host is
marked KILLED when the next run starts here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.artifacts import absolute_sqlite_url
from pipelines.config import Params, TrackingConfig, environment, section_dict

if TYPE_CHECKING:
    from mlflow import MlflowClient

DVC_EXPERIMENT_TAG, DVC_BASELINE_TAG = "mlops.dvc.experiment", "mlops.dvc.baseline"
# MLflow 3's experiment type tag: its UI reads "custom_model_development" as model training
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# MLflow 3.17's UI opens an experiment in its GenAI view unless the URL says otherwise
UI_MODEL_TRAINING_QUERY = "workflowType=machine_learning"
OWNER_HOST, OWNER_PID, OWNER_STARTED = "mlops.owner.host", "mlops.owner.pid", "mlops.owner.started"
DIGEST_CHARS = 16  # MLflow keeps at most 36 characters of a dataset digest
RUN_FILE = "mlflow_run.json"  # in a stage's report folder: the run that holds its logged copy
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
    return absolute_sqlite_url(environment().tracking_uri or cfg.uri, root)


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/"))


def experiment_id(client: MlflowClient, cfg: TrackingConfig, root: Path, uri: str) -> str:
    """The experiment's id, created on first use (artifacts under `cfg.artifacts` when local)."""
    found = client.get_experiment_by_name(cfg.experiment)
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:  # created before the project set the kind
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return str(found.experiment_id)
    location = (root / cfg.artifacts).resolve().as_uri() if is_local_store(uri) else None
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    with contextlib.suppress(Exception):  # a concurrent stage may have created it meanwhile
        return str(client.create_experiment(cfg.experiment, location, tags))
    found = client.get_experiment_by_name(cfg.experiment)
    if found is None:
        raise RuntimeError(f"could not create MLflow experiment {cfg.experiment!r} at {uri}")
    return str(found.experiment_id)


MONITOR_SUFFIX = "-monitor"


def monitor_experiment_name(experiment: str) -> str:
    """The experiment of the `monitor` flow's runs: `<tracking.experiment>-monitor`. Its own, so
    the inference host's MLflow account needs EDIT on it only, never on the training runs
    (ops/mlflow_users.py grants it)."""
    return f"{experiment}{MONITOR_SUFFIX}"


def monitor_client(cfg: TrackingConfig, root: Path) -> tuple[MlflowClient, str]:
    """A client bound to the configured store, and the id of the monitor's experiment
    (monitor_experiment_name), created on first use where the account may (a local store, the
    admin); behind MLflow's basic auth the admin makes it with the grant. Raises MlflowException
    when the server refuses."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg, root)
    client = MlflowClient(tracking_uri=uri)
    name = monitor_experiment_name(cfg.experiment)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return client, str(found.experiment_id)
    location = (root / cfg.artifacts).resolve().as_uri() if is_local_store(uri) else None
    return client, str(client.create_experiment(name, location))


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


def run_tags(root: Path, source: str | None = None, owner: Any = None) -> dict[str, str]:
    """Package versions, the commit, MLflow's source tags (`source`: the entry point, by
    default this process's script relative to `root`) and the owner (a psutil.Process, by
    default this one: the run is a ghost once it is gone)."""
    versions = package_versions()
    tags = {f"pkg.{name}": versions[name] for name in CORE_PACKAGES if name in versions}
    tags["git.commit"] = git_commit(root)
    tags["python"] = platform.python_version()
    return tags | source_tags(root, tags["git.commit"], source) | owner_tags(owner)


def source_tags(root: Path, commit: str, source: str | None = None) -> dict[str, str]:
    """MLflow's `mlflow.source.*` tags, which fill the UI's Source column."""
    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_COMMIT,
        MLFLOW_GIT_DIRTY,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
    )

    tags = {
        MLFLOW_SOURCE_NAME: source or entry_point(root),
        MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.LOCAL),
    }
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit.removesuffix("-dirty")
        tags[MLFLOW_GIT_DIRTY] = str(commit.endswith("-dirty")).lower()
    return tags


def entry_point(root: Path) -> str:
    """This process's script, relative to `root` when inside it (`pipelines/train.py`)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else Path(sys.executable)
    return script.relative_to(root).as_posix() if script.is_relative_to(root) else str(script)


def dataset_input(params: Params, content_hash: str, context: str) -> Any:
    """The prepared data set as an MLflow dataset input: named after `data.source`, with the
    first DIGEST_CHARS hex digits of the prepared splits' content hash as its digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    source = params.data.source
    builtin = source == "digits"  # scikit-learn's, see pipelines/prepare.py
    dataset = Dataset(
        name=source if builtin else Path(source).name,
        digest=content_hash[:DIGEST_CHARS],
        source_type="code" if builtin else "local",
        source=json.dumps({"uri": "sklearn.datasets.load_digits" if builtin else source}),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def log_dataset(
    client: MlflowClient, run_id: str, params: Params, content_hash: str, context: str
) -> None:
    """Record the prepared data set as an input of the run (once per run and digest: MLflow
    keeps the first context a run logged it with)."""
    client.log_inputs(run_id, datasets=[dataset_input(params, content_hash, context)])


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param

    flat = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in params.items()]
    for start in range(0, len(flat), 100):
        client.log_batch(run_id, params=flat[start : start + 100])


def start_parent_run(
    params: Params,
    root: Path,
    name: str = "pipeline",
    source: str | None = None,
    owner: Any = None,
    extra_tags: Mapping[str, str] | None = None,
) -> str:
    """Create a pipeline parent run holding every effective param; returns its id.

    `source`: the entry point shown in MLflow's Source column (default: this process's script);
    `owner`: the psutil.Process whose death ends the run (default: this process). Runs of this
    host left RUNNING by a dead owner are marked KILLED first.
    """
    client, exp_id = client_for(params.tracking, root)
    reap_dead_runs(client, exp_id)
    tags = {**run_tags(root, source, owner), "mlops.kind": "pipeline", **(extra_tags or {})}
    run = client.create_run(exp_id, run_name=name, tags=tags)
    log_params(client, run.info.run_id, flatten(section_dict(params)))
    return str(run.info.run_id)


def owner_tags(process: Any = None) -> dict[str, str]:
    """Tags naming the process that owns a run: host, PID and start time (seconds since epoch)."""
    import psutil

    proc = process or psutil.Process()
    started = f"{proc.create_time():.3f}"
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(proc.pid), OWNER_STARTED: started}


def owner_alive(tags: Mapping[str, str]) -> bool:
    """False only when the run's owner provably no longer exists: same PID with another start
    time (reused), no such process, or a zombie. Unknown or unreadable owners count as alive."""
    import psutil

    try:
        proc = psutil.Process(int(tags[OWNER_PID]))
        same = abs(proc.create_time() - float(tags[OWNER_STARTED])) < 1.0
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (KeyError, ValueError):
        return True
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # e.g. AccessDenied: it exists
        return True


def reap_dead_runs(client: MlflowClient, exp_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose owner process is gone (a killed
    `dvc repro` or flow); runs of other hosts and of live processes are left alone. Returns
    the ids marked."""
    query = f"attributes.status = 'RUNNING' and tags.`{OWNER_HOST}` = '{socket.gethostname()}'"
    killed = []
    for run in client.search_runs([exp_id], filter_string=query, max_results=1000):
        if not owner_alive(run.data.tags):
            client.set_terminated(run.info.run_id, status="KILLED")
            killed.append(run.info.run_id)
    if killed:
        log.warning("MLflow: marked %d run(s) of dead processes KILLED: %s", len(killed), killed)
    return killed


def end_parent_run(params: Params, root: Path, run_id: str, status: str = "FINISHED") -> None:
    client, _ = client_for(params.tracking, root)
    client.set_terminated(run_id, status=status)


def resolve_parent(params: Params, root: Path) -> tuple[str, bool]:
    """The parent run id, and whether this stage owns its status (no orchestrator above): the
    orchestrator's (`MLOPS_PARENT_RUN_ID`), the DVC experiment's (`DVC_EXP_NAME`), or a new one
    of this stage's own. See the module docstring."""
    env = environment()
    if env.parent_run_id:
        return env.parent_run_id, False
    if env.dvc_experiment:
        return experiment_parent(params, root, env.dvc_experiment, env.dvc_baseline), True
    return start_parent_run(params, root), True


def experiment_parent(params: Params, root: Path, experiment: str, baseline: str) -> str:
    """The parent run of DVC experiment `experiment` (on `baseline`, a commit): the newest run
    tagged with both, or a new one named after the experiment (its first stage). DVC runs one
    experiment's stages one after another, so the first stage's run is there for the next."""
    client, exp_id = client_for(params.tracking, root)
    query = (
        f"tags.`{DVC_EXPERIMENT_TAG}` = '{experiment}' and tags.`{DVC_BASELINE_TAG}` = '{baseline}'"
    )
    found = client.search_runs(
        [exp_id], filter_string=query, max_results=1, order_by=["attributes.start_time DESC"]
    )
    if found:
        return str(found[0].info.run_id)
    tags = {DVC_EXPERIMENT_TAG: experiment, DVC_BASELINE_TAG: baseline}
    return start_parent_run(params, root, name=experiment, source="dvc exp run", extra_tags=tags)


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

    def record_in(self, folder: Path) -> None:
        """Write `folder`/RUN_FILE naming this run, whose artifacts hold the folder's copy."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RUN_FILE).write_text(json.dumps({"run_id": self.run_id}) + "\n")

    def log_dataset(self, params: Params, content_hash: str, context: str) -> None:
        """Record the prepared data set (content hash from its manifest) as an input of this
        run (with `context`, the stage) and of its parent (context "pipeline")."""
        log_dataset(self.client, self.run_id, params, content_hash, context)
        log_dataset(self.client, self.parent_run_id, params, content_hash, "pipeline")

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


def recorded_run(folder: Path) -> str | None:
    """The run id `StageRun.record_in` wrote in `folder`, or None when there is none."""
    try:
        return str(json.loads((folder / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError):
        return None


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
    reap_dead_runs(client, exp_id)
    parent_id, owns_parent = resolve_parent(params, root)
    tags = {**run_tags(root), "mlops.stage": stage}
    tags[MLFLOW_PARENT_RUN_ID] = parent_id
    if data_hash:
        tags["data.content_hash"] = data_hash
    run = StageRun(client, client.create_run(exp_id, run_name=stage, tags=tags).info.run_id, "")
    run.parent_run_id = parent_id
    if owns_parent:
        client.update_run(parent_id, status="RUNNING")
    if data_hash:
        run.log_dataset(params, data_hash, stage)
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
