"""What a flow run shows in the Prefect UI: links, and a table of DVC's metrics files."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipelines.config import Params, RunOverrides, environment
from pipelines.tracking import UI_MODEL_TRAINING_QUERY, flatten, recorded_run, tracking_uri

DOCS_ARTIFACT = "data_docs/index.html"  # where the validate stage logs its Data Docs
NO_DATA_DOCS = "No `validate` stage in dvc.yaml: no Data Docs"


def mlflow_run_url(params: Params, root: Path, run_id: str, artifact: str | None = None) -> str:
    """The run's page in the MLflow UI (`tracking.ui_url`, or the server itself) in its model
    training view; with `artifact`, that file opened in the run's Artifacts tab. The run's own
    experiment (the training experiment, or the monitor's): a read of the run."""
    from mlflow import MlflowClient

    experiment = (
        MlflowClient(tracking_uri(params.tracking, root)).get_run(run_id).info.experiment_id
    )
    tracking = environment().tracking_uri or ""
    base = tracking if tracking.startswith("http") else params.tracking.ui_url
    page = f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"{page}{f'/artifacts/{artifact}' if artifact else ''}?{UI_MODEL_TRAINING_QUERY}"


def data_docs_index(root: Path) -> Path | None:
    """The Data Docs' front page: `pipelines.validate.DOCS_INDEX` in the folder that dvc.yaml
    declares as the `validate` stage's output; None when dvc.yaml has no `validate` stage."""
    from flows.dvc_outputs import data_docs_dir
    from pipelines.validate import DOCS_INDEX

    docs_dir = data_docs_dir(root)
    return docs_dir / DOCS_INDEX if docs_dir is not None else None


def data_docs_url(params: Params, root: Path, docs_dir: Path) -> str | None:
    """The Data Docs in `docs_dir` as the MLflow UI shows them (the Artifacts tab of the
    `validate` run that wrote them and logged a copy); None when no run is recorded there."""
    run_id = recorded_run(docs_dir)
    return mlflow_run_url(params, root, run_id, DOCS_ARTIFACT) if run_id else None


# A stage's figures belong to this run when it ran in it, or DVC found it up to date with this
# run's inputs; a stage that failed or was never reached keeps an earlier run's file.
CURRENT_STATES = {"Completed": "ran", "Cached": "up to date"}


def metrics_table(
    metrics: Mapping[str, Mapping[str, Any]],
    files: Mapping[str, Sequence[str]],
    states: Mapping[str, str],
) -> str:
    """A Markdown table of the scalar metrics (per-class details left to MLflow) of the stages
    that ran in this run or were up to date (`states`: stage -> its task run's state name;
    `files`: stage -> its metrics files), each row naming its stage and what it did. Stages
    that failed or never ran are listed below the table, their files left out."""
    rows = ["| stage | in this run | file | metric | value |", "|---|---|---|---|---|"]
    for stage, paths in files.items():
        done = CURRENT_STATES.get(states.get(stage, ""))
        for path in sorted(paths) if done else []:
            for name, value in flatten(metrics.get(path, {})).items():
                if isinstance(value, int | float) and "per_class" not in name:
                    rows.append(f"| {stage} | {done} | {path} | {name} | {value:.6g} |")
    left = [s for s, paths in files.items() if paths and states.get(s) not in CURRENT_STATES]
    if left:
        rows.append(
            f"\nNot in this run (failed or not reached; figures left out): {', '.join(left)}"
        )
    return "\n".join(rows)


def reproduce_command(overrides: RunOverrides) -> str:
    """The DVC command that reproduces this run's params on the same commit: `--force`, since in
    the run's own checkout DVC finds every stage up to date (or in its run cache) and would
    otherwise skip them all."""
    sets = [f"-S {shlex.quote(f'{k}={v}')}" for k, v in overrides.as_dotted().items()]
    return " ".join(["dvc exp run --force", *sets]) if sets else "dvc repro --force"
