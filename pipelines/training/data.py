"""The train and val splits as model-ready tensors: the prepare stage's Parquet files through
the shared preprocessing (`pipelines.preprocessing.to_model_input`), labels as class indices."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.errors import DataSourceError
from pipelines.preprocessing import to_model_input

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class Data:
    """Model-ready tensors of the train and val splits (on the host)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor


def split_arrays(
    frame: pd.DataFrame, manifest: dict[str, Any], name: str, source: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Model input (N, *input_shape) float32 and class indices (position in manifest labels)."""
    label = manifest["label_column"]
    index = {value: i for i, value in enumerate(manifest["labels"])}
    classes = frame[label].map(index)
    if classes.isna().any():
        unknown = sorted(map(str, frame.loc[classes.isna(), label].unique()))
        raise DataSourceError(
            f"{name} split: label values {', '.join(unknown)} are not in the manifest's labels "
            f"{manifest['labels']}; fix data.labels in params.yaml or the data"
        )
    rows = frame[manifest["feature_columns"]]
    x = to_model_input(rows, manifest["preprocessing"], source or f"{name} split")
    return x, np.array(classes, dtype=np.int64)  # a writable copy for torch


def load_data(prepared_dir: Path, manifest: dict[str, Any]) -> Data:
    from pipelines.prepare import read_split

    tensors: list[torch.Tensor] = []
    for name in ("train", "val"):
        frame = read_split(prepared_dir, name)
        if frame.empty:
            raise DataSourceError(f"{prepared_dir}: the {name} split has no rows; add data")
        x, y = split_arrays(frame, manifest, name, f"{prepared_dir} ({name} split)")
        tensors += [torch.from_numpy(x), torch.from_numpy(y)]
    return Data(*tensors)
