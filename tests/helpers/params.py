"""The one shrunk ("tiny") version of the real params.yaml that tests and benchmarks start from.

`tiny_params()` is params.yaml with `SHRUNK` applied: a narrow CNN trained for a couple of epochs
(~0.5 accuracy on the digits in ~1 s). A test that needs more says so at its call site, as
overrides on top, so every difference from the shared settings is visible where it matters.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import yaml

from pipelines.config import Params, load_params, section_dict
from tests.helpers import REPO

SHRUNK: dict[str, object] = {"train.epochs": 2, "train.model.width": 8, "train.patience": 2}


def tiny_params(*layers: Mapping[str, object], **overrides: object) -> Params:
    """params.yaml with `SHRUNK`, then each of `layers` (dotted keys, {"train.lr": 0.1}), then
    `overrides` (keyword form: train__lr=0.1 means "train.lr"); a later value wins.

    Raises pipelines.errors.ParamsError for an unknown key or an invalid value, as load_params.
    """
    merged: dict[str, object] = dict(SHRUNK)
    for layer in layers:
        merged.update(layer)
    merged.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_params(REPO / "params.yaml", overrides=merged)


def write_params_file(params: Params, root: Path) -> Path:
    """`params` as `root`/params.yaml, for stage CLIs run as subprocesses; returns the file."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(section_dict(params), sort_keys=False))
    return path


def image_folder_params(
    *layers: Mapping[str, object],
    source: str = "data/raw/digits",
    size: int = 16,
    channels: int = 1,
    **overrides: object,
) -> Params:
    """params.yaml (not shrunk) for a folder of images at `source` (relative to the project
    root), decoded to `channels` x `size` x `size` pixels in [0, 1]: the `data` keys a folder
    needs, then each of `layers` and `overrides` as in `tiny_params` (a later value wins).

    Raises pipelines.errors.ParamsError for an unknown key or an invalid value, as load_params.
    """
    merged: dict[str, object] = {
        "data.source": source,
        "data.image_shape": [size, size],
        "data.channels": channels,
        "data.features": {"prefix": "px_", "count": channels * size * size},
        "data.value_range": [0.0, 1.0],
    }
    for layer in layers:
        merged.update(layer)
    merged.update({key.replace("__", "."): value for key, value in overrides.items()})
    return load_params(REPO / "params.yaml", overrides=merged)
