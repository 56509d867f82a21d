"""A folder of images as a data set: one sub-folder per class of PNG / JPEG files (the layout
torchvision's `ImageFolder` reads), e.g. data/raw/pets/{cat,dog}/*.png.

`scan` lists every file with its label (the sub-folder's name), the sha256 of its bytes and what
Pillow reads of it (width, height, mode, or the error that stops it decoding); `assign_splits`
puts each file in train/val/test by content (seeded, stratified per class: see there); `pixel_rows`
decodes the files of the splits with `pipelines.preprocessing.decode_image`, the one decoding
that training, evaluation and serving use. numpy, pandas and Pillow only.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.errors import DataSourceError
from pipelines.preprocessing import (
    IMAGE_MODES,
    ImageError,
    decode_image,
    is_sixteen_bit,
    open_image,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FILE_COLUMNS = ("path", "label", "sha256", "width", "height", "mode", "error")
log = logging.getLogger(__name__)


def scan(folder: Path, labels: list[int] | list[str]) -> pd.DataFrame:
    """Every PNG/JPEG file in `folder`/<class>/ (sorted by path) as a row of FILE_COLUMNS.

    `path` is relative to `folder` (POSIX); `label` is the sub-folder's name, as an int when the
    configured labels are ints; `error` is None, or why Pillow cannot decode the file (width,
    height and mode then are what its header gave, or null). Files with other suffixes and files
    directly in `folder` are skipped (logged). Raises DataSourceError when `folder` is missing or
    holds no class folder with images."""
    if not folder.is_dir():
        raise DataSourceError(f"{folder}: no such folder (data.source in params.yaml)")
    numeric = all(isinstance(label, int) for label in labels)
    rows, skipped = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder)
        if len(relative.parts) < 2 or path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(relative.as_posix())
            continue
        name = relative.parts[0]
        label: int | str = int(name) if numeric and name.lstrip("-").isdigit() else name
        rows.append({"path": relative.as_posix(), "label": label, **inspect(path.read_bytes())})
    if skipped:
        log.info(
            "prepare: %s: skipped %d file(s) that are no <class>/<image>.png|.jpg|.jpeg, e.g. %s",
            folder,
            len(skipped),
            ", ".join(skipped[:3]),
        )
    if not rows:
        raise DataSourceError(
            f"{folder}: no PNG or JPEG files in class sub-folders (expected "
            f"{folder}/<class>/<image>.png)"
        )
    return pd.DataFrame(rows, columns=list(FILE_COLUMNS)).astype(
        {"width": "Int64", "height": "Int64"}
    )


def inspect(content: bytes) -> dict[str, object]:
    """sha256, width, height, mode of an image file's bytes, and the error if it does not
    decode (fully: a truncated file whose header reads fine still fails)."""
    found: dict[str, object] = {
        "sha256": hashlib.sha256(content).hexdigest(),
        "width": None,
        "height": None,
        "mode": None,
        "error": None,
    }
    try:
        with open_image(content) as image:
            # a PNG's `I` (older Pillow) is 16-bit grayscale: recorded as what it is
            mode = "I;16" if image.mode == "I" and is_sixteen_bit(image) else image.mode
            found.update(width=image.width, height=image.height, mode=mode)
    except ImageError as exc:
        found["error"] = str(exc)
    return found


def split_key(sha256: str, seed: int) -> str:
    """The order files are split in: a digest of (seed, content), so a split depends only on the
    files' contents and the seed (not on names, order or the file system)."""
    return hashlib.sha256(f"{seed}:{sha256}".encode()).hexdigest()


def assign_splits(
    files: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> pd.Series:
    """The split ("train", "val", "test"; None for files that do not decode or whose mode is
    not one of `IMAGE_MODES`: `validate` names them) of each file.

    Per class, the distinct contents are ordered by `split_key`; the first round(n *
    test_fraction) go to test, the next round(n * val_fraction) to val, the rest to train (n:
    distinct contents of the class). Identical files share a content, so they land in the same
    split; renaming, adding a file of another class or reordering changes nothing else."""
    result = pd.Series([None] * len(files), index=files.index, dtype=object)
    good = files[files["error"].isna() & files["mode"].isin(IMAGE_MODES)]
    for _, group in good.groupby("label", sort=True):
        contents = sorted(set(group["sha256"]), key=lambda sha: split_key(sha, seed))
        n = len(contents)
        n_test = math.floor(n * test_fraction + 0.5)
        n_val = math.floor(n * val_fraction + 0.5)
        where = {
            sha: "test" if i < n_test else "val" if i < n_test + n_val else "train"
            for i, sha in enumerate(contents)
        }
        result[group.index] = group["sha256"].map(where)
    return result


def pixel_rows(
    folder: Path, files: pd.DataFrame, spec: dict[str, object], columns: list[str]
) -> pd.DataFrame:
    """The decoded files as rows: `columns` (C*H*W pixel values, float32) + path + sha256."""
    pixels = np.empty((len(files), len(columns)), np.float32)
    for i, path in enumerate(files["path"]):
        pixels[i] = decode_image((folder / path).read_bytes(), spec).reshape(-1)
    frame = pd.DataFrame(pixels, columns=columns)
    frame["path"] = files["path"].to_numpy()
    frame["sha256"] = files["sha256"].to_numpy()
    return frame
