"""What a flow run shows in the Prefect UI: links, and a table of DVC's metrics files."""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.config import Params, RunOverrides
from pipelines.tracking import UI_MODEL_TRAINING_QUERY, client_for, flatten, recorded_run

DOCS_ARTIFACT = "data_docs/index.html"  # where the validate stage logs its Data Docs


def mlflow_run_url(params: Params, root: Path, run_id: str, artifact: str | None = None) -> str:
    """The run's page in the MLflow UI (`tracking.ui_url`, or the server itself) in its model
    training view; with `artifact`, that file opened in the run's Artifacts tab."""
    import os

    _, experiment = client_for(params.tracking, root)
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = tracking if tracking.startswith("http") else params.tracking.ui_url
    page = f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"{page}{f'/artifacts/{artifact}' if artifact else ''}?{UI_MODEL_TRAINING_QUERY}"


def data_docs_url(params: Params, root: Path, docs_dir: Path) -> str | None:
    """The Data Docs in `docs_dir` as the MLflow UI shows them (the Artifacts tab of the
    `validate` run that wrote them and logged a copy); None when no run is recorded there."""
    run_id = recorded_run(docs_dir)
    return mlflow_run_url(params, root, run_id, DOCS_ARTIFACT) if run_id else None


def metrics_table(metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """A Markdown table of the scalar metrics of {metrics file: content} (per-class details
    left to MLflow)."""
    rows = ["| file | metric | value |", "|---|---|---|"]
    for path, content in sorted(metrics.items()):
        for name, value in flatten(content).items():
            if isinstance(value, int | float) and "per_class" not in name:
                rows.append(f"| {path} | {name} | {value:.6g} |")
    return "\n".join(rows)


def reproduce_command(overrides: RunOverrides) -> str:
    """The DVC command that reproduces this run's params on the same commit."""
    sets = [f"-S {shlex.quote(f'{k}={v}')}" for k, v in overrides.as_dotted().items()]
    return " ".join(["dvc exp run", *sets]) if sets else "dvc repro"
