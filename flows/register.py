"""`register`: the selected model into the MLflow registry, and the champion gate.

The alias `champion` moves to the new version only when it is at least as accurate as the current
champion on the same test split (both evaluated here, now, with the same code), within
`register.tolerance`; otherwise the new version becomes `challenger` and the run says why. Every
decision is kept as tags on the versions (promotion history).
"""

from __future__ import annotations

import datetime as dt
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.artifacts import read_json
from pipelines.config import Params
from pipelines.quantize import split_inputs
from pipelines.runtime import logits, read_metadata, session
from pipelines.tracking import client_for, run_tags

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Decision:
    version: str
    alias: str
    accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    reason: str


def stage_output(root: Path, stage: str) -> Path:
    """The first output that dvc.yaml declares for `stage` (paths live in dvc.yaml only)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        found = repo.stage.collect(stage)
        return root / str(found[0].outs[0].def_path)


def accuracy_on(onnx_path: Path, prepared_dir: Path) -> float:
    """Accuracy of an ONNX model on this run's test split."""
    x, y = split_inputs(prepared_dir, "test", read_metadata(onnx_path)["preprocessing"])
    return float((logits(session(onnx_path), x).argmax(axis=1) == y).mean())


def gate(new: float, champion: float | None, tolerance: float) -> tuple[bool, str]:
    """Whether the new model may become champion, and why (pure: the policy alone)."""
    if champion is None:
        return True, f"no champion yet; accuracy {new:.4f}"
    if new >= champion - tolerance:
        return True, f"accuracy {new:.4f} >= champion's {champion:.4f} - tolerance {tolerance:g}"
    return False, (
        f"accuracy {new:.4f} < champion's {champion:.4f} - tolerance {tolerance:g} "
        f"on the same test split: kept as {CHALLENGER}"
    )


def current_champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_accuracy(client: Any, version: Any, prepared_dir: Path) -> float:
    """Re-evaluate the current champion's ONNX graph on this run's test split."""
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(version.run_id, "model/model.onnx", tmp)
        return accuracy_on(Path(local), prepared_dir)


def log_candidate(client: Any, params: Params, root: Path, parent: str, select_dir: Path) -> str:
    """A nested `register` run holding what serving needs; returns its run id."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    _, experiment = client_for(params.tracking, root)
    tags = {**run_tags(root), MLFLOW_PARENT_RUN_ID: parent, "mlops.stage": "register"}
    run_id = str(client.create_run(experiment, run_name="register", tags=tags).info.run_id)
    client.log_artifact(run_id, str(select_dir / "model.onnx"), "model")
    client.log_dict(run_id, read_metadata(select_dir / "model.onnx"), "model/metadata.json")
    client.log_artifact(run_id, str(select_dir / "candidates.md"))
    client.log_artifact(run_id, str(select_dir / "winner.json"))
    return run_id


def register(
    params: Params, root: Path, parent: str, select_dir: Path, prepared_dir: Path
) -> Decision:
    """Register the selected model as a new version; move `champion` or set `challenger`."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(params.tracking, root)
    name = params.register_.model_name
    winner = read_json(select_dir / "winner.json")["winner"]
    run_id = log_candidate(client, params, root, parent, select_dir)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name,
        f"runs:/{run_id}/model",
        run_id=run_id,
        tags={
            "candidate": winner["name"],
            "engine": winner["engine"],
            "precision": winner["precision"],
        },
    )
    decision = decide(client, name, str(version.version), select_dir, prepared_dir, params)
    record(client, name, decision, run_id)
    client.set_terminated(run_id)
    return decision


def decide(
    client: Any, name: str, version: str, select_dir: Path, prepared_dir: Path, params: Params
) -> Decision:
    new = accuracy_on(select_dir / "model.onnx", prepared_dir)
    old = current_champion(client, name)
    old_accuracy = champion_accuracy(client, old, prepared_dir) if old is not None else None
    promote, reason = gate(new, old_accuracy, params.register_.tolerance)
    return Decision(
        version,
        CHAMPION if promote else CHALLENGER,
        new,
        str(old.version) if old is not None else None,
        old_accuracy,
        reason,
    )


def record(client: Any, name: str, decision: Decision, run_id: str) -> None:
    """Move the alias and keep the history as tags on the versions involved."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    client.set_registered_model_alias(name, decision.alias, decision.version)
    tags = {
        "gate.decision": decision.alias,
        "gate.reason": decision.reason,
        "gate.accuracy": f"{decision.accuracy:.6f}",
    }
    if decision.alias == CHAMPION:
        tags.update({"promoted_at": now, "promoted_over": decision.champion_version or "none"})
        if decision.champion_version is not None:
            client.set_model_version_tag(name, decision.champion_version, "demoted_at", now)
            client.set_model_version_tag(
                name, decision.champion_version, "demoted_by", decision.version
            )
    for key, value in tags.items():
        client.set_model_version_tag(name, decision.version, key, value)
    for key, value in {
        "register.version": decision.version,
        "register.alias": decision.alias,
        "register.reason": decision.reason,
    }.items():
        client.set_tag(run_id, key, value)
