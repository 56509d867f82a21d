"""`package`: the MLflow `champion` -> a BentoML model -> a bento -> an archive.

Run by the `train` flow after `register`, or by hand: `python -m flows.package`. It
1. resolves `models:/<register.model_name>@champion` in the MLflow registry,
2. makes a BentoML model from its ONNX graph and metadata (reused when the newest BentoML model of
   that name already holds the same graph, so `latest` is always the packaged champion),
3. runs `bentoml build` with bentofile.yaml (the lean serving environment, see service.py),
4. exports the bento archive to `package.export_to` (an absolute directory or a URI; default
   dist/bentos/ under the project), and returns where it went.

The inference host then runs `bentoml import <archive>` and `bentoml serve <bento tag>`: it never
reads MLflow or unpickles anything from the training host.
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
from pipelines.config import Params
from pipelines.errors import PipelineError
from pipelines.tracking import client_for

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL_TAG_ENV = "MLOPS_MODEL_TAG"  # which BentoML model service.py loads (and a build packs)


class PackageError(PipelineError):
    """Nothing to package (no champion) or the champion's files are not what serving needs."""


@dataclass(frozen=True)
class Packaged:
    registry_version: str
    model_tag: str
    bento_tag: str
    archive: str


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
    """The BentoML model holding the champion's ONNX graph and metadata; its tag."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(version.run_id, "model", tmp))
        source = {"run_id": version.run_id, "source": f"models:/{name}@champion"}
        return save_bento_model(name, local, str(version.version), source)


def save_bento_model(
    name: str, model_dir: Path, registry_version: str, source: dict[str, str] | None = None
) -> str:
    """A BentoML model `name` from `model_dir` (model.onnx + metadata.json), unless the newest
    model of that name already holds the same graph; returns its tag."""
    import bentoml

    onnx_path, metadata_path = model_dir / "model.onnx", model_dir / "metadata.json"
    for path in (onnx_path, metadata_path):
        if not path.is_file():
            raise PackageError(f"version {registry_version}: no model/{path.name} to package")
    digest = file_sha256(onnx_path)
    newest = _newest(name)
    if newest is not None and newest.info.metadata.get("onnx_sha256") == digest:
        return str(newest.tag)
    precision = str(read_json(metadata_path).get("precision", "unknown"))
    metadata = {
        "registry_version": registry_version,
        "onnx_sha256": digest,
        "precision": precision,
        **(source or {}),
    }
    labels = {"registry_version": registry_version, "precision": precision}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        shutil.copy(onnx_path, Path(model.path) / "model.onnx")
        shutil.copy(metadata_path, Path(model.path) / "metadata.json")
    return str(model.tag)


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


def build(root: Path, model_tag: str, registry_version: str) -> str:
    """`bentoml build` of bentofile.yaml, packing exactly `model_tag`; the bento's tag."""
    import bentoml

    labels = {"registry_version": registry_version, "model": model_tag}
    with _env(MODEL_TAG_ENV, model_tag):
        bento = bentoml.bentos.build_bentofile(
            str(root / "bentofile.yaml"), build_ctx=str(root), labels=labels
        )
    return str(bento.tag)


def package(params: Params, root: Path) -> Packaged:
    import bentoml

    client, version = champion(params, root)
    model_tag = bento_model(client, version, params.register_.model_name)
    bento_tag = build(root, model_tag, str(version.version))
    target = export_target(params, root)
    if "://" not in target:
        Path(target).mkdir(parents=True, exist_ok=True)
    archive = bentoml.bentos.export_bento(bento_tag, target)
    return Packaged(str(version.version), model_tag, bento_tag, str(archive))


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
