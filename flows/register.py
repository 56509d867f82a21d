"""`register`: the selected model into the MLflow registry, and the champion gate.

The alias `champion` moves to the new version only when its accuracy reaches the absolute floor
`evaluate.min_accuracy` and it is at least as accurate as the current champion on the same test
split (both evaluated now, with the same code: `pipelines/champion.py`), within
`register.tolerance`; otherwise the new version becomes `challenger` and the run says why. Every
decision is kept as tags on the versions (promotion history). This module holds the registry
calls only.

Idempotent: each version records its ONNX graph's SHA-256 (tag `onnx_sha256`) and, for a cascade
(pipelines/cascade.py), its cascade.json's (tag `cascade_sha256`). A graph (cascade) that is
already a version is not registered again: when that version is the champion, nothing changes
(and the flow packages nothing); otherwise the gate is applied to that version again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import tempfile
from pathlib import Path
from typing import Any

from pipelines.artifacts import file_sha256, read_json
from pipelines.cascade import CASCADE, STUDENT
from pipelines.champion import CHALLENGER, CHAMPION, accuracy_on, judge
from pipelines.config import Params
from pipelines.reference import REFERENCE
from pipelines.runtime import read_metadata
from pipelines.select import CANDIDATES, GOLDEN, MODEL, WINNER
from pipelines.tracking import client_for, run_tags

ONNX_HASH_TAG = "onnx_sha256"  # on each version: the SHA-256 of its model.onnx
CASCADE_HASH_TAG = "cascade_sha256"  # ... of its cascade.json, on cascade versions only


@dataclasses.dataclass(frozen=True)
class Decision:
    version: str
    alias: str
    accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    reason: str
    promoted: bool  # `champion` moved to `version` in this run (the flow then packages it)


def current_champion(client: Any, name: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_graph(client: Any, version: Any, folder: str) -> Path:
    """The registered ONNX graph of model version `version`, downloaded into `folder` (with its
    cascade files beside it when the version is a cascade)."""
    if CASCADE_HASH_TAG in (version.tags or {}):
        return Path(client.download_artifacts(version.run_id, "model", folder)) / MODEL
    return Path(client.download_artifacts(version.run_id, "model/model.onnx", folder))


def log_candidate(client: Any, params: Params, root: Path, parent: str, select_dir: Path) -> str:
    """A nested `register` run holding what serving needs (artifact `model/`: model.onnx,
    metadata.json and, when `select` wrote them, golden.json, the reference profile `reference/`
    and a cascade's student graph and cascade.json); returns its run id."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    _, experiment = client_for(params.tracking, root)
    tags = {**run_tags(root), MLFLOW_PARENT_RUN_ID: parent, "mlops.stage": "register"}
    run_id = str(client.create_run(experiment, run_name="register", tags=tags).info.run_id)
    client.log_artifact(run_id, str(select_dir / MODEL), "model")
    client.log_dict(run_id, read_metadata(select_dir / MODEL), "model/metadata.json")
    if (select_dir / GOLDEN).is_file():  # the deploy checks' rows; `package` requires it
        client.log_artifact(run_id, str(select_dir / GOLDEN), "model")
    if (select_dir / REFERENCE).is_dir():  # the monitor flow's baseline; `package` packs it
        client.log_artifacts(run_id, str(select_dir / REFERENCE), f"model/{REFERENCE}")
    if (select_dir / CASCADE).is_file():  # the cascade's second graph; `package` packs both
        client.log_artifact(run_id, str(select_dir / STUDENT), "model")
        client.log_artifact(run_id, str(select_dir / CASCADE), "model")
    client.log_artifact(run_id, str(select_dir / CANDIDATES))
    client.log_artifact(run_id, str(select_dir / WINNER))
    return run_id


def register(
    params: Params, root: Path, parent: str, select_dir: Path, prepared_dir: Path
) -> Decision:
    """Register the selected model as a new version; move `champion` or set `challenger`.
    A graph already registered (same ONNX SHA-256) is not registered again (see the module doc)."""
    from mlflow.exceptions import MlflowException

    client, _ = client_for(params.tracking, root)
    name = params.register_.model_name
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    digest = file_sha256(select_dir / MODEL)
    cascade = file_sha256(select_dir / CASCADE) if (select_dir / CASCADE).is_file() else None
    existing = registered_version(client, name, digest, cascade)
    if existing is not None:
        return regate(client, name, existing, select_dir, prepared_dir, params)
    winner = read_json(select_dir / WINNER)["winner"]
    run_id = log_candidate(client, params, root, parent, select_dir)
    version = client.create_model_version(
        name,
        f"runs:/{run_id}/model",
        run_id=run_id,
        tags={
            "candidate": winner["name"],
            "engine": winner["engine"],
            "precision": winner["precision"],
            ONNX_HASH_TAG: digest,
            **({CASCADE_HASH_TAG: cascade} if cascade else {}),
        },
    )
    decision = decide(client, name, str(version.version), select_dir, prepared_dir, params)
    record(client, name, decision)
    set_run_tags(client, run_id, decision)
    client.set_terminated(run_id)
    return decision


def registered_version(
    client: Any, name: str, digest: str, cascade: str | None = None
) -> Any | None:
    """The newest version of `name` whose ONNX graph has SHA-256 `digest` and whose cascade.json
    has SHA-256 `cascade` (None: a version that is no cascade), or None."""
    found = [
        v
        for v in client.search_model_versions(
            f"name = '{name}' and tags.{ONNX_HASH_TAG} = '{digest}'"
        )
        if (v.tags or {}).get(CASCADE_HASH_TAG) == cascade
    ]
    return max(found, key=lambda v: int(v.version)) if found else None


def regate(
    client: Any, name: str, existing: Any, select_dir: Path, prepared_dir: Path, params: Params
) -> Decision:
    """The selected graph is already version `existing`: the champion stays as it is when that
    version is the champion; else the gate is applied to `existing` again (nothing registered)."""
    version = str(existing.version)
    old = current_champion(client, name)
    if old is not None and str(old.version) == version:
        accuracy = accuracy_on(select_dir / MODEL, prepared_dir)
        reason = (
            f"the same ONNX graph is already version {version}, the champion: "
            "champion unchanged, nothing registered"
        )
        return Decision(version, CHAMPION, accuracy, version, accuracy, reason, promoted=False)
    decision = decide(client, name, version, select_dir, prepared_dir, params)
    already = f"the same ONNX graph is already version {version} (not registered again)"
    decision = dataclasses.replace(decision, reason=f"{already}; {decision.reason}")
    record(client, name, decision)
    return decision


def decide(
    client: Any, name: str, version: str, select_dir: Path, prepared_dir: Path, params: Params
) -> Decision:
    """The gate (`pipelines.champion.judge`) for `version` against the current champion."""
    old = current_champion(client, name)
    with tempfile.TemporaryDirectory() as tmp:
        champion = champion_graph(client, old, tmp) if old is not None else None
        verdict = judge(select_dir / MODEL, champion, prepared_dir, params)
    return Decision(
        version,
        CHAMPION if verdict.promote else CHALLENGER,
        verdict.accuracy,
        str(old.version) if old is not None else None,
        verdict.champion_accuracy,
        verdict.reason,
        promoted=verdict.promote,
    )


def record(client: Any, name: str, decision: Decision) -> None:
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


def set_run_tags(client: Any, run_id: str, decision: Decision) -> None:
    """The decision on the nested `register` run."""
    for key, value in {
        "register.version": decision.version,
        "register.alias": decision.alias,
        "register.reason": decision.reason,
    }.items():
        client.set_tag(run_id, key, value)
