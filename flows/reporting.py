"""What a flow run shows in the Prefect UI: links and tables built from DVC's metrics files."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from pipelines.config import Params, RunOverrides
from pipelines.tracking import client_for, flatten


def mlflow_run_url(params: Params, root: Path, run_id: str) -> str:
    """The run's page in the MLflow UI (`tracking.ui_url`, or the server itself)."""
    import os

    _, experiment = client_for(params.tracking, root)
    tracking = os.environ.get("MLFLOW_TRACKING_URI", "")
    base = tracking if tracking.startswith("http") else params.tracking.ui_url
    return f"{base.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"


def dvc_metrics(root: Path) -> dict[str, dict[str, Any]]:
    """Every metrics file dvc.yaml declares, as {path: flat metrics}."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        shown = repo.metrics.show()
    files = shown.get("", {}).get("data", {})
    return {path: flatten(entry.get("data", {})) for path, entry in files.items()}


def metrics_table(root: Path) -> str:
    """A Markdown table of the run's scalar metrics (per-class details left to MLflow)."""
    rows = ["| file | metric | value |", "|---|---|---|"]
    for path, metrics in sorted(dvc_metrics(root).items()):
        for name, value in metrics.items():
            if isinstance(value, int | float) and "per_class" not in name:
                rows.append(f"| {path} | {name} | {value:.6g} |")
    return "\n".join(rows)


def reproduce_command(overrides: RunOverrides) -> str:
    """The DVC command that reproduces this run's params on the same commit."""
    sets = [f"-S {shlex.quote(f'{k}={v}')}" for k, v in overrides.as_dotted().items()]
    return " ".join(["dvc exp run", *sets]) if sets else "dvc repro"
