"""Drift test data: a reference profile of the digits' training rows (written by
pipelines.reference.write_reference, the format `select` writes) and prediction-log lines in the
service's format (pipelines/prediction_log.py), drawn from the held-out rows, shifted or not."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

VERSION = "1"


@dataclass(frozen=True)
class Digits:
    """The 8x8 digits split in two: the reference's rows and the rows served later, with a
    classifier's predictions for both (a nearest-centroid model: cheap, and not perfect)."""

    features: list[str]
    train: np.ndarray
    served: np.ndarray
    served_labels: np.ndarray
    centroids: np.ndarray

    def predict(self, rows: np.ndarray) -> np.ndarray:
        distances = ((rows[:, None, :] - self.centroids[None]) ** 2).sum(axis=2)
        return np.asarray(distances.argmin(axis=1))


def digits() -> Digits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x, y = data.data.astype(float), data.target
    x_train, x_served, y_train, y_served = train_test_split(
        x, y, test_size=0.4, random_state=0, stratify=y
    )
    centroids = np.stack([x_train[y_train == k].mean(axis=0) for k in range(10)])
    features = [f"pixel_{i}" for i in range(x.shape[1])]
    return Digits(features, x_train, x_served, y_served, centroids)


def write_profile(out_dir: Path, data: Digits, version: str | None = VERSION) -> Path:
    """The reference profile of `data` under out_dir/reference/; the folder."""
    import pandas as pd

    from pipelines.reference import TABULAR, write_reference

    frame = pd.DataFrame(data.train, columns=data.features)
    predicted = data.predict(data.served)
    distribution = {str(k): float((predicted == k).mean()) for k in range(10)}
    return write_reference(out_dir, frame, list(range(10)), distribution, TABULAR, version)


def shifted(rows: np.ndarray, columns: Sequence[int], by: float) -> np.ndarray:
    """`rows` with `columns` moved by `by` of their own standard deviation (clipped to 0..16,
    the digits' range)."""
    out = rows.copy()
    spread = rows[:, list(columns)].std(axis=0) + 1e-9
    out[:, list(columns)] = np.clip(out[:, list(columns)] + by * spread, 0, 16)
    return out


def log_lines(
    data: Digits,
    rows: np.ndarray,
    start: int = 0,
    version: str = VERSION,
    rows_per_request: int = 1,
) -> list[dict[str, Any]]:
    """Prediction-log objects for `rows`, request ids `r<start>`..., one second apart."""
    predicted = data.predict(rows)
    t0 = datetime(2026, 11, 30, tzinfo=UTC)
    lines = []
    for i, (row, label) in enumerate(zip(rows, predicted, strict=True)):
        request = start + i // rows_per_request
        lines.append(
            {
                "request_id": f"r{request}",
                "row": i % rows_per_request,
                "timestamp": (t0 + timedelta(seconds=start + i)).isoformat(timespec="milliseconds"),
                "model_version": version,
                "features": dict(zip(data.features, map(float, row), strict=True)),
                "prediction": int(label),
                "confidence": 0.9,
            }
        )
    return lines


def append_lines(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    """Append JSON lines to `path` (made with its folder when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
