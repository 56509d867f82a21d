"""Bentos on the inference host: resolve a registry version through MLflow, download its archive
through the MLflow server, check it before anything is imported, `bentoml import` it into the
host's own BENTOML_HOME, and keep the last `deploy.keep_versions`.

The archive is read as a tar of text and JSON (bento.yaml, golden.json): nothing is unpickled,
and a bad archive is refused before the host's store is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inference.errors import FetchError
from inference.settings import HostSettings

CHAMPION = "champion"
TAG_BENTO = "bento_tag"
TAG_ARTIFACT = "bento_artifact"


@dataclass(frozen=True)
class Bento:
    """A bento checked for this host: its tag, registry version, model tag and golden set."""

    tag: str
    version: str  # the registry version (its `registry_version` label)
    model_tag: str
    golden: dict[str, Any]


def resolve(model_name: str, version: str | None) -> tuple[str, str, str, str]:
    """(registry version, run id, bento tag, archive artifact path) of `version` (default the
    `champion` alias) of `model_name`. FetchError names an unknown version or missing tags."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    what = f"{model_name} version {version}" if version else f"{model_name}@{CHAMPION}"
    try:
        found = (
            client.get_model_version(model_name, version)
            if version
            else client.get_model_version_by_alias(model_name, CHAMPION)
        )
    except MlflowException as exc:
        raise FetchError(f"{what}: not in the MLflow registry ({exc.error_code})") from None
    tags = found.tags or {}
    if TAG_BENTO not in tags or TAG_ARTIFACT not in tags:
        raise FetchError(f"{what}: no packaged bento (tags {TAG_BENTO}/{TAG_ARTIFACT} missing)")
    return str(found.version), str(found.run_id), tags[TAG_BENTO], tags[TAG_ARTIFACT]


def download(run_id: str, artifact: str, dst: Path) -> Path:
    """The archive `artifact` of run `run_id`, downloaded through the MLflow server into dst."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        local = Path(MlflowClient().download_artifacts(run_id, artifact, str(dst)))
    except (MlflowException, OSError) as exc:
        raise FetchError(f"archive {artifact} of run {run_id}: cannot download ({exc})") from None
    if not local.is_file():
        raise FetchError(f"archive {artifact} of run {run_id}: not a file")
    return local


def _member(tar: tarfile.TarFile, name: str) -> bytes | None:
    for candidate in (name, "./" + name):
        try:
            handle = tar.extractfile(candidate)
        except KeyError:
            continue
        return handle.read() if handle else None
    return None


def inspect(archive: Path, model_name: str, version: str | None = None) -> Bento:
    """Check an exported bento archive without importing it: a readable tar with bento.yaml,
    the bento named `model_name`, its `registry_version` label equal to `version` (when given),
    and its model's golden.json. FetchError (one line naming the archive) otherwise."""
    import yaml

    try:
        with tarfile.open(archive, "r:*") as tar:
            info = yaml.safe_load(_member(tar, "bento.yaml") or b"") or {}
            labels = info.get("labels") or {}
            model_tag = str(labels.get("model", ""))
            golden = _member(tar, f"models/{model_tag.replace(':', '/')}/golden.json")
    except (tarfile.TarError, OSError, EOFError, yaml.YAMLError) as exc:
        reason = str(exc).splitlines()[0].rstrip(":") if str(exc) else type(exc).__name__
        raise FetchError(f"archive {archive}: not a readable bento archive ({reason})") from None
    if not info:
        raise FetchError(f"archive {archive}: no bento.yaml (not a bento archive)")
    if info.get("name") != model_name:
        raise FetchError(f"archive {archive}: a bento of {info.get('name')!r}, not {model_name!r}")
    found = str(labels.get("registry_version", ""))
    if version is not None and found != version:
        raise FetchError(f"archive {archive}: holds registry version {found!r}, not {version!r}")
    if golden is None:
        raise FetchError(f"archive {archive}: its model {model_tag!r} holds no golden.json")
    return Bento(
        f"{info['name']}:{info['version']}", found, model_tag, read_golden(golden, archive)
    )


GOLDEN_KEYS = ("rows", "labels", "probabilities", "predictions")


def read_golden(raw: bytes, where: Path) -> dict[str, Any]:
    """golden.json's content (JSON only), its four lists of equal length; FetchError otherwise."""
    try:
        golden = json.loads(raw)
    except ValueError as exc:
        raise FetchError(f"{where}: golden.json is not JSON ({exc})") from None
    if not isinstance(golden, dict) or any(
        not isinstance(golden.get(k), list) for k in GOLDEN_KEYS
    ):
        raise FetchError(f"{where}: golden.json lacks one of {', '.join(GOLDEN_KEYS)}")
    if len({len(golden[k]) for k in GOLDEN_KEYS}) != 1 or not golden["rows"]:
        raise FetchError(f"{where}: golden.json's lists are empty or of different lengths")
    return golden


def bentoml_cli(settings: HostSettings, *args: str) -> str:
    """`bentoml args...` against the host's BENTOML_HOME; stdout. FetchError on failure."""
    env = {**os.environ, "BENTOML_HOME": str(settings.bentoml_home), "BENTOML_DO_NOT_TRACK": "1"}
    command = [str(Path(sys.executable).with_name("bentoml")), *args]
    done = subprocess.run(
        command, check=False, capture_output=True, text=True, env=env, timeout=600
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
        raise FetchError(f"bentoml {' '.join(args)}: {tail[0] if tail else done.returncode}")
    return done.stdout


def bento_dir(settings: HostSettings, tag: str) -> Path:
    """A bento's directory in the host's store (BentoML's layout: bentos/<name>/<version>)."""
    name, _, version = tag.partition(":")
    return settings.bentoml_home / "bentos" / name / version


def imported(settings: HostSettings) -> list[str]:
    """Tags of the bentos in the host's store."""
    root = settings.bentoml_home / "bentos"
    return sorted(
        f"{p.parent.name}:{p.name}" for p in root.glob("*/*") if (p / "bento.yaml").is_file()
    )


def import_archive(settings: HostSettings, archive: Path, bento: Bento) -> None:
    """`bentoml import` the checked archive into the host's store (a no-op when that tag is
    already there). A failed import removes what it left."""
    if bento.tag in imported(settings):
        return
    try:
        bentoml_cli(settings, "import", str(archive))
    except FetchError:
        remove(settings, bento.tag)
        raise
    if bento.tag not in imported(settings):
        raise FetchError(f"archive {archive}: imported, yet {bento.tag} is not in the store")


def labels_of(settings: HostSettings, tag: str) -> dict[str, Any]:
    """The bento.yaml of an imported bento; {} when it is not imported."""
    import yaml

    path = bento_dir(settings, tag) / "bento.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def model_dir(settings: HostSettings, tag: str, model_tag: str) -> Path:
    """Where an imported bento's model lies: `bentoml import` moves it into the host's model
    store (models/<name>/<version>); older bentos keep it inside (bentos/.../models/...)."""
    inside = bento_dir(settings, tag) / "models" / model_tag.replace(":", "/")
    stored = settings.bentoml_home / "models" / model_tag.replace(":", "/")
    return inside if inside.is_dir() else stored


def local(settings: HostSettings, tag: str, model_name: str) -> Bento:
    """A bento already imported on the host (a kept version): its Bento, golden set included."""
    info = labels_of(settings, tag)
    if not info:
        raise FetchError(f"bento {tag}: not imported on this host (kept: {imported(settings)})")
    if info.get("name") != model_name:
        raise FetchError(f"bento {tag}: a bento of {info.get('name')!r}, not {model_name!r}")
    labels = info.get("labels") or {}
    model_tag = str(labels.get("model", ""))
    golden = model_dir(settings, tag, model_tag) / "golden.json"
    if not golden.is_file():
        raise FetchError(f"bento {tag}: its model {model_tag!r} holds no golden.json")
    return Bento(
        tag,
        str(labels.get("registry_version", "")),
        model_tag,
        read_golden(golden.read_bytes(), golden),
    )


def remove(settings: HostSettings, tag: str) -> None:
    """Delete a bento from the host's store (its models travel inside it)."""
    model_tag = str((labels_of(settings, tag).get("labels") or {}).get("model", ""))
    if bento_dir(settings, tag).exists():
        bentoml_cli(settings, "delete", "-y", tag)
    others = {
        str((labels_of(settings, t).get("labels") or {}).get("model")) for t in imported(settings)
    }
    stored = settings.bentoml_home / "models" / model_tag.replace(":", "/")
    if model_tag and model_tag not in others and stored.is_dir():  # no kept bento uses it
        bentoml_cli(settings, "models", "delete", "-y", model_tag)


def prune(settings: HostSettings, keep: int, protected: set[str]) -> list[str]:
    """Delete all but the newest `keep` bentos (by creation time), never one in `protected`
    (the running and the previous version); the deleted tags."""
    tags = imported(settings)
    newest = sorted(tags, key=lambda t: bento_dir(settings, t).stat().st_mtime, reverse=True)
    doomed = [t for t in newest[keep:] if t not in protected]
    for tag in doomed:
        remove(settings, tag)
    return doomed
