"""The one preprocessing used by training, evaluation and serving (numpy only: no torch here).

A `spec` is plain data stored in the data manifest and in every model's metadata:
{"feature_columns": [...], "value_range": [low, high], "input_shape": [C, H, W] or [F]}.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def make_spec(
    feature_columns: Sequence[str],
    value_range: Sequence[float],
    image_shape: Sequence[int] | None,
) -> dict[str, Any]:
    shape = [1, *image_shape] if image_shape else [len(feature_columns)]
    return {
        "feature_columns": list(feature_columns),
        "value_range": [float(value_range[0]), float(value_range[1])],
        "input_shape": shape,
        "scaling": "min-max to [0, 1] over value_range",
    }


def to_model_input(rows: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """(N, F) raw feature rows -> (N, *input_shape) float32 scaled to [0, 1]."""
    low, high = spec["value_range"]
    scale = (high - low) or 1.0
    x = (np.asarray(rows, dtype=np.float32) - np.float32(low)) / np.float32(scale)
    return x.reshape(len(x), *spec["input_shape"])
