"""Feature scaling fitted on the training split and applied inside the model graph.

`fit_scaler` computes per-feature statistics (data.scaling: `standard` = mean and standard
deviation, `minmax` = minimum and range) from the training split's model input; `Scaled` puts a
`Scaler` (the statistics as buffers) in front of the network. The statistics are part of the
model's state dict, so evaluation, export (the ONNX graph takes raw feature values), quantization
and serving all apply the same numbers and no second copy exists to drift.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

SCALINGS = ("standard", "minmax", "none")
SCALER_PREFIX = "scaler."  # the buffers' names in the state dict and the exported graph


def fit_scaler(kind: str, x: np.ndarray) -> dict[str, Any] | None:
    """Statistics of `x` (N, *input_shape) float32, the training split's model input, per
    feature over the N rows: {"kind", "shift", "scale"} as nested lists of input_shape (the
    model computes (x - shift) / scale). A constant feature gets scale 1. None for `none`.
    Raises ValueError for an unknown kind or an empty split."""
    if kind not in SCALINGS:
        raise ValueError(f"unknown scaling {kind!r}; allowed: {', '.join(SCALINGS)}")
    if kind == "none":
        return None
    if len(x) == 0:
        raise ValueError("cannot fit a scaling on an empty training split")
    values = np.asarray(x, dtype=np.float64)
    if kind == "standard":
        shift, scale = values.mean(axis=0), values.std(axis=0)
    else:
        shift = values.min(axis=0)
        scale = values.max(axis=0) - shift
    scale = np.where(scale > 1e-12, scale, 1.0)
    return {
        "kind": kind,
        "shift": shift.astype(np.float32).tolist(),
        "scale": scale.astype(np.float32).tolist(),
    }


class Scaler(nn.Module):
    """(x - shift) / scale, element-wise over the input shape (the batch axis broadcast)."""

    shift: torch.Tensor
    scale: torch.Tensor

    def __init__(self, shift: Any, scale: Any) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class Scaled(nn.Module):
    """A network behind its input scaling (state dict keys `scaler.*` and `net.*`)."""

    def __init__(self, scaler: Scaler, net: nn.Module) -> None:
        super().__init__()
        self.scaler, self.net = scaler, net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.scaler(x))
