"""`package`: the MLflow `champion` -> a BentoML model -> a bento -> an archive.

Run by the `train` flow after `register`, or by hand: `python -m flows.package`. It
1. resolves `models:/<register.model_name>@champion` in the MLflow registry,
2. makes a BentoML model from its ONNX graph and metadata (reused when the newest BentoML model of
   that name already holds the same graph, so `latest` is always the packaged champion),
3. runs `bentoml build` with bentofile.yaml (the lean serving environment, see service.py),
4. exports the bento archive to `package.export_to` (an absolute directory or a URI; default
   dist/bentos/ under the project),
5. logs the archive as an MLflow artifact of the version's run, under `bento/`, and tags the
   version `bento_tag` and `bento_artifact` (that artifact's path from the run's root): the
   inference host downloads it through the MLflow server. Once per version: packaging the same
   champion again logs nothing more.

The BentoML model holds the champion's model.onnx, metadata.json, golden.json (the golden set
`select` measured: the inference host's checks read it from the model's directory) and, when the
version has one, the reference profile `reference/` (pipelines/reference.py: the `monitor` flow's
baseline), and for a cascade (pipelines/cascade.py) the student graph and cascade.json. The
inference
host runs `bentoml import <archive>` and `bentoml serve <bento tag>`: it never unpickles anything
from the training host.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.artifacts import file_sha256, read_json
from pipelines.cascade import CASCADE, STUDENT
from pipelines.config import Environment, Params
from pipelines.errors import PipelineError
from pipelines.tracking import client_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_TAG_ENV = Environment.name("model_tag")  # the BentoML model service.py loads (a build packs)
GOLDEN = "golden.json"  # pipelines.select.GOLDEN: the golden set, in the BentoML model's folder
REFERENCE = "reference"  # pipelines.reference.REFERENCE: the reference profile's folder, beside it
BENTO_DIR = "bento"  # artifact folder of the version's run holding its bento archive
BENTO_TAG, BENTO_ARTIFACT = "bento_tag", "bento_artifact"  # model version tags


class PackageError(PipelineError):
    """Nothing to package (no champion) or the champion's files are not what serving needs."""


@dataclass(frozen=True)
class Packaged:
    registry_version: str
    model_tag: str
    bento_tag: str
    archive: str
    artifact: str = ""  # the archive in MLflow: `bento_artifact`, relative to the run's root


def export_target(params: Params, root: Path) -> str:
    """An absolute directory or a URI: BentoML resolves a relative path against `/`."""
    return params.package.export_to or str((root / "dist" / "bentos").resolve())


def champion(params: Params, root: Path) -> Any:
    from mlflow.exceptions import MlflowException

    client, _ = client_for(params.tracking, root)
    name = params.register_.model_name
    try:
        return client, client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        raise PackageError(
            f"model {name!r} has no `champion` in the MLflow registry: run the train flow first"
        ) from None


def bento_model(client: Any, version: Any, name: str) -> str:
    """The BentoML model holding the champion's ONNX graph, metadata and golden set; its tag.
    Raises PackageError naming the version when its `model/` artifact lacks golden.json (a
    version registered before `select` wrote golden sets: run the train flow again)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(version.run_id, "model", tmp))
        if not (local / GOLDEN).is_file():
            raise PackageError(
                f"version {version.version}: no model/{GOLDEN} to package (the golden set the "
                "inference host checks a rollout with; `select` writes it): run the train flow "
                "again to register a version that has one"
            )
        source = {"run_id": version.run_id, "source": f"models:/{name}@champion"}
        return save_bento_model(name, local, str(version.version), source)


def save_bento_model(
    name: str, model_dir: Path, registry_version: str, source: dict[str, str] | None = None
) -> str:
    """A BentoML model `name` from `model_dir` (model.onnx + metadata.json, and golden.json,
    reference/ and a cascade's student.onnx + cascade.json when there), unless the newest model
    of that name already holds the same files: graph, metadata.json (labels, preprocessing),
    golden set, reference profile and cascade (metadata `onnx_sha256`, `metadata_sha256`,
    `golden_sha256`, `reference_sha256`, `cascade_sha256`: "" without one); returns its tag.
    Raises PackageError when cascade.json's student graph is missing."""
    import bentoml

    onnx_path, metadata_path = model_dir / "model.onnx", model_dir / "metadata.json"
    for path in (onnx_path, metadata_path):
        if not path.is_file():
            raise PackageError(f"version {registry_version}: no model/{path.name} to package")
    golden = model_dir / GOLDEN
    digest = file_sha256(onnx_path)
    metadata_digest = file_sha256(metadata_path)
    golden_digest = file_sha256(golden) if golden.is_file() else ""
    reference = model_dir / REFERENCE
    reference_digest = folder_sha256(reference) if reference.is_dir() else ""
    cascade = model_dir / CASCADE
    cascade_digest = file_sha256(cascade) if cascade.is_file() else ""
    if cascade_digest and not (model_dir / STUDENT).is_file():
        raise PackageError(f"version {registry_version}: model/{CASCADE} without model/{STUDENT}")
    newest = _newest(name)
    if (
        newest is not None
        and newest.info.metadata.get("onnx_sha256") == digest
        and newest.info.metadata.get("metadata_sha256") == metadata_digest
        and newest.info.metadata.get("golden_sha256", "") == golden_digest
        and newest.info.metadata.get("reference_sha256", "") == reference_digest
        and newest.info.metadata.get("cascade_sha256", "") == cascade_digest
    ):
        return str(newest.tag)
    precision = str(read_json(metadata_path).get("precision", "unknown"))
    metadata = {
        "registry_version": registry_version,
        "onnx_sha256": digest,
        "metadata_sha256": metadata_digest,
        "golden_sha256": golden_digest,
        "reference_sha256": reference_digest,
        "cascade_sha256": cascade_digest,
        "precision": precision,
        **(source or {}),
    }
    labels = {"registry_version": registry_version, "precision": precision}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        shutil.copy(onnx_path, Path(model.path) / "model.onnx")
        shutil.copy(metadata_path, Path(model.path) / "metadata.json")
        if golden_digest:
            shutil.copy(golden, Path(model.path) / GOLDEN)
        if reference_digest:
            shutil.copytree(reference, Path(model.path) / REFERENCE)
        if cascade_digest:
            shutil.copy(model_dir / STUDENT, Path(model.path) / STUDENT)
            shutil.copy(cascade, Path(model.path) / CASCADE)
    return str(model.tag)


def folder_sha256(folder: Path) -> str:
    """One digest of a folder's files: their relative paths and contents, in sorted order."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder).as_posix()}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def _newest(name: str) -> Any | None:
    import bentoml

    models = [m for m in bentoml.models.list() if m.tag.name == name]
    return max(models, key=lambda m: m.info.creation_time) if models else None


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    saved = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def build(root: Path, model_tag: str, registry_version: str, name: str) -> str:
    """`bentoml build` of bentofile.yaml, packing exactly `model_tag`, as bento `name`
    (register.model_name: bentofile.yaml's `name` is only the default); the bento's tag."""
    import bentoml

    labels = {"registry_version": registry_version, "model": model_tag}
    with _env(MODEL_TAG_ENV, model_tag):
        bento = bentoml.bentos.build_bentofile(
            str(root / "bentofile.yaml"), name=name, build_ctx=str(root), labels=labels
        )
    return str(bento.tag)


def logged_archive(client: Any, version: Any) -> str | None:
    """The version's archive already in MLflow (its `bento_artifact` tag, when that artifact is
    in the run), or None."""
    artifact = version.tags.get(BENTO_ARTIFACT)
    if not artifact:
        return None
    folder = artifact.rpartition("/")[0]
    listed = {f.path for f in client.list_artifacts(version.run_id, folder or None)}
    return str(artifact) if artifact in listed else None


def log_archive(client: Any, name: str, version: Any, bento_tag: str, archive: Path) -> str:
    """Log `archive` under `bento/` of the version's run (through the tracking server's artifact
    proxy when MLflow is remote) and tag the version `bento_tag` and `bento_artifact` (the path
    relative to the run's root, e.g. `bento/digits-classifier-<version>.bento`); returns it."""
    client.log_artifact(version.run_id, str(archive), BENTO_DIR)
    artifact = f"{BENTO_DIR}/{archive.name}"
    client.set_model_version_tag(name, version.version, BENTO_TAG, bento_tag)
    client.set_model_version_tag(name, version.version, BENTO_ARTIFACT, artifact)
    return artifact


def package(params: Params, root: Path) -> Packaged:
    """Package the champion (see the module doc). Raises PackageError: no champion, or its
    `model/` artifact lacks a file serving needs (named)."""
    import bentoml

    client, version = champion(params, root)
    name = params.register_.model_name
    model_tag = bento_model(client, version, name)
    bento_tag = build(root, model_tag, str(version.version), name)
    target = export_target(params, root)
    if "://" not in target:
        Path(target).mkdir(parents=True, exist_ok=True)
    archive = bentoml.bentos.export_bento(bento_tag, target)
    artifact = logged_archive(client, version)
    if artifact is None:
        if "://" not in target:
            artifact = log_archive(client, name, version, bento_tag, Path(archive))
        else:  # the export went to a remote store: log a local copy
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(bentoml.bentos.export_bento(bento_tag, tmp))
                artifact = log_archive(client, name, version, bento_tag, local)
    return Packaged(str(version.version), model_tag, bento_tag, str(archive), artifact)


def main(argv: Sequence[str] | None = None) -> None:
    """Package the MLflow champion as a bento and export the archive (see the module doc)."""
    from pipelines.cli import run_cli

    parser = argparse.ArgumentParser(prog="python -m flows.package", description=main.__doc__)
    parser.add_argument("--params", type=Path, default=PROJECT_ROOT / "params.yaml")
    parser.add_argument("--root", type=Path, default=PROJECT_ROOT, help="the project checkout")
    args = parser.parse_args(argv)

    def run(params: Params) -> None:
        result = package(params, args.root.resolve())
        for key, value in asdict(result).items():
            print(f"{key}: {value}")

    run_cli(run, args.params)


if __name__ == "__main__":
    main()
