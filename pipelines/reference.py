"""The reference profile: what the model's training data looked like and what the model predicted
on the test split. `select` writes it beside the winner (models/select/reference/, a DVC out);
`register` logs it next to golden.json, `package` packs it in the bento; the `monitor` flow
compares the served sample (the prediction log) with it.

A folder `reference/` of two files:
- `features.parquet`: a seeded sample of up to `monitor.reference_rows` training-split rows, one
  column per feature (the model's feature columns, raw, as `POST /predict` takes them); for a
  model trained on a folder of images, the 4 image statistics of IMAGE_STATS instead, the same
  ones the prediction log records per image (`image_statistics`).
- `reference.json`: {"features": [column names], "labels": [class labels], "kind": "tabular" |
  "image", "predicted_label_distribution": {str(label): share of the test split predicted as it},
  "rows": rows in features.parquet, "model_version": (optional) the registry version}.

numpy at import; pandas (and pyarrow) only in the functions that read or write Parquet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.artifacts import atomic_path, read_json, write_json
from pipelines.errors import ReferenceProfileError

if TYPE_CHECKING:
    import pandas as pd

REFERENCE = "reference"  # the profile's folder, beside the winner and in the bento's model
FEATURES = "features.parquet"
META = "reference.json"
IMAGE_STATS = ("mean", "std", "width", "height")  # per image; mean and std of pixels in [0, 1]
TABULAR, IMAGE = "tabular", "image"
Predict = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Reference:
    """A loaded reference profile (see the module doc). `frame` has exactly `features` as
    columns, `rows` rows; `predicted_label_distribution` sums to 1 over str(label) keys."""

    features: list[str]
    labels: list[Any]
    kind: str
    predicted_label_distribution: dict[str, float]
    rows: int
    frame: pd.DataFrame = field(repr=False)
    model_version: str | None = None


def is_image_model(spec: Mapping[str, Any]) -> bool:
    """True when the model was trained on a folder of image files (its rows are decoded pixels):
    its profile and log hold IMAGE_STATS, not pixel columns."""
    return bool(spec.get("image_decode"))


def profile_columns(spec: Mapping[str, Any]) -> list[str]:
    """The columns of the profile and of the log's `features` for a model's preprocessing spec."""
    return list(IMAGE_STATS) if is_image_model(spec) else list(spec["feature_columns"])


def image_statistics(
    pixels: np.ndarray, value_range: Sequence[float], width: int, height: int
) -> dict[str, float | int]:
    """The 4 statistics of one image: mean and std of its decoded pixel values (the model's raw
    row, any shape, in `value_range`) mapped to [0, 1], and the source file's width and height
    in pixels."""
    low, high = float(value_range[0]), float(value_range[1])
    unit = (np.asarray(pixels, np.float64) - low) / ((high - low) or 1.0)
    return {
        "mean": float(unit.mean()),
        "std": float(unit.std()),
        "width": int(width),
        "height": int(height),
    }


def load_reference(directory: Path) -> Reference:
    """The profile in `directory` (a `reference/` folder). Raises ReferenceProfileError naming
    the file that is missing or does not fit the format."""
    import pandas as pd

    directory = Path(directory)
    meta_path, features_path = directory / META, directory / FEATURES
    for path in (meta_path, features_path):
        if not path.is_file():
            raise ReferenceProfileError(f"{path}: no such file (the reference profile)")
    try:
        meta = read_json(meta_path)
        names = [str(c) for c in meta["features"]]
        distribution = {str(k): float(v) for k, v in meta["predicted_label_distribution"].items()}
        labels, kind = list(meta["labels"]), str(meta.get("kind", TABULAR))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReferenceProfileError(f"{meta_path}: not a reference profile ({exc!r})") from None
    try:
        frame = pd.read_parquet(features_path)
    except (OSError, ValueError) as exc:
        raise ReferenceProfileError(f"{features_path}: unreadable ({exc})") from None
    missing = [c for c in names if c not in frame.columns]
    if missing:
        raise ReferenceProfileError(f"{features_path}: no column(s) {missing[:5]} of {META}")
    version = meta.get("model_version")
    return Reference(
        names,
        labels,
        kind,
        distribution,
        len(frame),
        frame[names].astype("float64"),
        None if version is None else str(version),
    )


def sample_positions(count: int, rows: int, seed: int) -> np.ndarray:
    """Sorted positions of a seeded sample of `rows` of `count` rows (all when count <= rows)."""
    if count <= rows:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=rows, replace=False))


def reference_frame(
    prepared_dir: Path, spec: Mapping[str, Any], rows: int, seed: int
) -> pd.DataFrame:
    """A seeded sample of up to `rows` training-split rows of `prepared_dir` as the profile's
    columns (`profile_columns`): raw feature values, or per image IMAGE_STATS (width and height
    from the prepare stage's files.csv)."""
    import pandas as pd

    from pipelines.prepare import read_files, read_split

    train = read_split(prepared_dir, "train")
    chosen = train.iloc[sample_positions(len(train), rows, seed)].reset_index(drop=True)
    columns = list(spec["feature_columns"])
    if not is_image_model(spec):
        return chosen[columns].astype("float64")
    sizes = read_files(prepared_dir).set_index("path")[["width", "height"]]
    pixels = chosen[columns].to_numpy(np.float64)
    stats = [
        image_statistics(p, spec["value_range"], *sizes.loc[path])
        for p, path in zip(pixels, chosen["path"], strict=True)
    ]
    return pd.DataFrame(stats, columns=list(IMAGE_STATS)).astype("float64")


def label_distribution(predicted: np.ndarray, labels: Sequence[Any]) -> dict[str, float]:
    """{str(label): share of `predicted` (class indices) that is that class}, every label."""
    counts = np.bincount(np.asarray(predicted, np.int64), minlength=len(labels))
    total = max(int(counts.sum()), 1)
    return {str(label): round(int(n) / total, 6) for label, n in zip(labels, counts, strict=False)}


def predicted_classes(prepared_dir: Path, spec: Mapping[str, Any], predict: Predict) -> np.ndarray:
    """The class index `predict` (the winner's engine) gives every test-split row, on the same
    float32 input the service builds."""
    from pipelines.prepare import read_split
    from pipelines.preprocessing import to_model_input

    test = read_split(prepared_dir, "test")
    x = to_model_input(test[list(spec["feature_columns"])].to_numpy(np.float32), spec)
    if len(x) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([predict(x[i : i + 256]).argmax(axis=1) for i in range(0, len(x), 256)])


def write_reference(
    out_dir: Path,
    frame: pd.DataFrame,
    labels: Sequence[Any],
    distribution: Mapping[str, float],
    kind: str,
    model_version: str | None = None,
) -> Path:
    """Write `out_dir`/reference/{features.parquet, reference.json} (see the module doc); the
    folder. reference.json goes last: its presence means a complete profile."""
    folder = Path(out_dir) / REFERENCE
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / FEATURES) as tmp:
        frame.to_parquet(tmp, index=False)
    meta: dict[str, Any] = {
        "features": [str(c) for c in frame.columns],
        "labels": list(labels),
        "kind": kind,
        "predicted_label_distribution": dict(distribution),
        "rows": len(frame),
    }
    if model_version is not None:
        meta["model_version"] = model_version
    write_json(folder / META, meta)
    return folder


def build_reference(
    prepared_dir: Path,
    spec: Mapping[str, Any],
    predict: Predict,
    out_dir: Path,
    rows: int,
    seed: int,
) -> Path:
    """The whole profile for a model (`spec`: its preprocessing, `predict`: its engine) and its
    prepared data, written under `out_dir` (`write_reference`); `rows` is params
    monitor.reference_rows, `seed` prepare.seed."""
    labels = list(read_json(Path(prepared_dir) / "manifest.json")["labels"])
    frame = reference_frame(prepared_dir, spec, rows, seed)
    predicted = predicted_classes(prepared_dir, spec, predict)
    kind = IMAGE if is_image_model(spec) else TABULAR
    return write_reference(out_dir, frame, labels, label_distribution(predicted, labels), kind)
