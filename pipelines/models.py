"""Models: the architectures by name, and the model files the stages hand each other.

A factory takes (input_shape, num_classes, width, depth, dropout) and returns an `nn.Module`;
register one more with `@register("name")`. `model_args` gives the construction args a run
stores, `rebuild` builds from them.

The model file (`save_model` / `load_model`, written by `train` and `distill`, read by
`evaluate`, `export`, `select` and `distill`'s teacher) is `torch.save` of a plain dict (format
`MODEL_FORMAT`: construction args, CPU state dict, metadata), written atomically through an open
handle so the same model gives the same bytes, and read back with `weights_only=True`
(`read_torch`: no code runs on load). Torch is imported inside the functions, so reading the
registry (params validation) stays cheap.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pipelines.artifacts import atomic_path
from pipelines.errors import CheckpointError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipelines.config import TrainConfig

Factory = Callable[..., "nn.Module"]
ARCHITECTURES: dict[str, Factory] = {}
IMAGE_INPUT: set[str] = set()  # architectures that need (C, H, W) rows: data.image_shape set


def register(name: str, *, image_input: bool = False) -> Callable[[Factory], Factory]:
    """Register a factory under `name`; `image_input`: it needs rows shaped as images."""

    def decorate(factory: Factory) -> Factory:
        ARCHITECTURES[name] = factory
        if image_input:
            IMAGE_INPUT.add(name)
        return factory

    return decorate


def build_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build from the construction args stored in checkpoints: {"arch": ..., **kwargs}."""
    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; registered: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


@register("mlp")
def mlp(
    input_shape: tuple[int, ...], num_classes: int, width: int, depth: int, dropout: float
) -> nn.Module:
    """`depth` hidden layers of `width` units on the flattened input."""
    from torch import nn

    in_features = 1
    for size in input_shape:
        in_features *= size
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
        in_features = width
    layers.append(nn.Linear(in_features, num_classes))
    return nn.Sequential(*layers)


@register("cnn", image_input=True)
def cnn(
    input_shape: tuple[int, ...], num_classes: int, width: int, depth: int, dropout: float
) -> nn.Module:
    """`depth` conv blocks (3x3 conv, batch norm, ReLU; 2x2 pooling while the map allows),
    channels `width`, 2*width, ..., then global average pooling and a linear head."""
    from torch import nn

    if len(input_shape) != 3:
        raise ValueError(f"cnn needs a (C, H, W) input shape, got {input_shape}")
    channels, height, width_px = input_shape
    layers: list[nn.Module] = []
    for block in range(depth):
        out = width * 2**block
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
        if min(height, width_px) >= 4:
            layers.append(nn.MaxPool2d(2))
            height, width_px = height // 2, width_px // 2
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout)]
    layers.append(nn.Linear(channels, num_classes))
    return nn.Sequential(*layers)


# --- model files --------------------------------------------------------------------------------

MODEL_FORMAT = "mlops-train-model/1"


class TrainedModel(Protocol):
    """What a model file holds (`pipelines.train.TrainResult` is one)."""

    model: nn.Module
    model_args: dict[str, Any]
    metadata: dict[str, Any]


def model_args(
    cfg: TrainConfig, manifest: dict[str, Any], scaler: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The construction args stored with checkpoints and models: build_model(arch, **kwargs),
    behind the input scaling `scaler` (`pipelines.scaling.fit_scaler`'s statistics) when given."""
    kwargs = {
        "input_shape": list(manifest["preprocessing"]["input_shape"]),
        "num_classes": len(manifest["labels"]),
        "width": cfg.model.width,
        "depth": cfg.model.depth,
        "dropout": cfg.model.dropout,
    }
    args: dict[str, Any] = {"arch": cfg.model.arch, "kwargs": kwargs}
    if scaler is not None:
        args["scaler"] = scaler
    return args


def rebuild(args: dict[str, Any]) -> nn.Module:
    """A fresh (untrained) model from the construction args of `model_args`: with a `scaler`,
    a `pipelines.scaling.Scaled` (the scaling's buffers, then the network)."""
    kwargs = dict(args["kwargs"])
    kwargs["input_shape"] = tuple(kwargs["input_shape"])
    net = build_model(args["arch"], **kwargs)
    if not args.get("scaler"):
        return net
    from pipelines.scaling import Scaled, Scaler

    return Scaled(Scaler(args["scaler"]["shift"], args["scaler"]["scale"]), net)


def save_model(path: Path, trained: TrainedModel) -> None:
    """The self-describing model file: plain dicts, lists, strings, numbers and tensors only;
    the same model and metadata give the same bytes (see `save_torch`)."""
    content = {
        "format": MODEL_FORMAT,
        "model_args": trained.model_args,
        "state_dict": cpu_copy(trained.model.state_dict()),
        "metadata": trained.metadata,
    }
    save_torch(path, content)


def load_model(path: Path | str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by `save_model` (CPU, eval mode) and return it with its metadata."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file; run the train stage first")
    content = read_torch(path, "not a readable model file")
    if not isinstance(content, dict) or content.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not a train model file ({MODEL_FORMAT})")
    try:
        model = rebuild(content["model_args"])
        model.load_state_dict(content["state_dict"])
        metadata: dict[str, Any] = content["metadata"]
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: the weights do not fit the stored model args: {exc}"
        ) from exc
    model.eval()
    return model, metadata


def cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of a state dict's tensors (the device's stay untouched)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in tensors.items()}


def save_torch(path: Path, content: Any) -> None:
    """`torch.save` through an open handle of a temp file, then os.replace: a kill leaves the
    old file or the new one, whole. Through a handle the archive's inner name is always
    `archive` (a file name would be recorded), so the same content gives the same bytes."""
    import torch

    with atomic_path(Path(path)) as tmp, tmp.open("wb") as handle:
        torch.save(content, handle)


def read_torch(path: Path | str, what: str) -> Any:
    """`torch.load` of `path` on the CPU with `weights_only=True` (tensors and plain data only:
    loading runs no code). Raises CheckpointError "`path`: `what`: <one-line reason>" when the
    file is missing, truncated or not a torch file."""
    import torch

    try:
        with Path(path).open("rb") as handle:
            return torch.load(handle, map_location="cpu", weights_only=True)
    except (
        OSError,
        EOFError,
        RuntimeError,
        ValueError,
        struct.error,
        pickle.UnpicklingError,
    ) as exc:
        raise CheckpointError(f"{path}: {what}: {load_error(exc)}") from exc


def load_error(exc: Exception) -> str:
    """The gist of a torch.load error in one line (weights_only refusals run to a page)."""
    text = str(exc).split("WeightsUnpickler error: ")[-1].strip()
    return text.splitlines()[0] if text else type(exc).__name__
