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

import functools
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


@register("resnet18", image_input=True)
def resnet18(
    input_shape: tuple[int, ...], num_classes: int, width: int, depth: int, dropout: float
) -> nn.Module:
    """ResNet-18 (He et al. 2016: BasicBlocks [2, 2, 2, 2]) in its small-input (CIFAR) form, as
    is standard for 32x32 images: a 3x3 stride-1 stem and no max pooling, so a 32x32 input keeps
    a 4x4 map before global average pooling. `width` is the stem's channels (64 in the paper;
    doubling per stage), the stem takes the data's channels (C of `input_shape`), `dropout`
    before the linear head; `depth` is not used (the layout is fixed).

    Written here rather than taken from torchvision: no torchvision wheel of this host's CPU
    torch build exists (its CUDA build fails to import there). The module names match
    torchvision's `resnet18` (conv1, bn1, layer1..4, fc), so its state dicts fit apart from the
    stem and head."""
    if len(input_shape) != 3:
        raise ValueError(f"resnet18 needs a (C, H, W) input shape, got {input_shape}")
    return ResNet(input_shape[0], num_classes, width, dropout)


@functools.cache
def _resnet_classes() -> tuple[type, type]:
    """The ResNet modules (built on first use: torch is imported inside functions here)."""
    from torch import Tensor, nn

    class BasicBlock(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(planes)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.downsample: nn.Module | None = None
            if stride != 1 or inplanes != planes:
                self.downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
                )

        def forward(self, x: Tensor) -> Tensor:
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class ResNetModule(nn.Module):
        def __init__(self, channels: int, num_classes: int, width: int, dropout: float) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(channels, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            stages, inplanes = [], width
            for i in range(4):
                planes = width * 2**i
                stride = 1 if i == 0 else 2
                stages.append(
                    nn.Sequential(
                        BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1)
                    )
                )
                inplanes = planes
            self.layer1, self.layer2, self.layer3, self.layer4 = stages
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(dropout)
            self.fc = nn.Linear(inplanes, num_classes)
            for module in self.modules():  # torchvision's initialization
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.ones_(module.weight)
                    nn.init.zeros_(module.bias)

        def forward(self, x: Tensor) -> Tensor:
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(self.dropout(self.avgpool(x).flatten(1)))

    return BasicBlock, ResNetModule


def ResNet(channels: int, num_classes: int, width: int, dropout: float) -> nn.Module:  # noqa: N802
    """The small-input ResNet-18 module (see `resnet18`)."""
    return _resnet_classes()[1](channels, num_classes, width, dropout)


def load_weights(model: nn.Module, path: Path | str) -> None:
    """Load a user's local weights file into `model` (strict): a plain state dict or a model
    file of `save_model`, read with `weights_only=True` (nothing runs, nothing downloads).
    Raises CheckpointError naming the file when it is unreadable or does not fit."""
    content = read_torch(path, "not a readable weights file")
    if isinstance(content, dict) and content.get("format") == MODEL_FORMAT:
        content = content.get("state_dict")
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: not a state dict (a mapping of names to tensors)")
    try:
        model.load_state_dict(content)
    except RuntimeError as exc:
        first = str(exc).splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) if len(first) > 1 else first[0]
        raise CheckpointError(f"{path}: the weights do not fit the model: {detail}") from exc


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
    a `pipelines.scaling.Scaled` (the scaling's buffers, then the network); with `shapes` (a
    channel-pruned model's, `pipelines.prune`), its layers resized to them (`resize`)."""
    kwargs = dict(args["kwargs"])
    kwargs["input_shape"] = tuple(kwargs["input_shape"])
    net = build_model(args["arch"], **kwargs)
    if args.get("scaler"):
        from pipelines.scaling import Scaled, Scaler

        net = Scaled(Scaler(args["scaler"]["shift"], args["scaler"]["scale"]), net)
    if args.get("shapes"):
        resize(net, args["shapes"])
    return net


def resize(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Give `model`'s layers the tensor shapes in `shapes` ({state dict key: shape}, e.g. a
    channel-pruned network's, `pipelines.prune`), in place: the changed tensors are new and
    uninitialized (load a state dict next), and each changed layer's size attributes follow
    them. Raises ValueError naming a key the model does not have, or whose layer cannot change
    shape (Conv, BatchNorm and Linear layers can)."""
    import torch
    from torch import nn

    unknown = sorted(set(shapes) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"the model has no tensor {unknown[0]!r} to resize")
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        changed = [(k, v) for k, v in own if list(v.shape) != shapes.get(prefix + k, list(v.shape))]
        if not changed:
            continue
        resizable = isinstance(module, resizable_types())
        if not resizable:
            kind = type(module).__name__
            raise ValueError(f"{prefix}{changed[0][0]}: a {kind} layer cannot be resized")
        for key, value in changed:
            fresh = torch.empty(shapes[prefix + key], dtype=value.dtype)
            setattr(module, key, nn.Parameter(fresh) if isinstance(value, nn.Parameter) else fresh)
        fit_sizes(module)


def resizable_types() -> tuple[type, ...]:
    """The layer types `resize` knows the size attributes of."""
    from torch import nn

    convolutions = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return (*convolutions, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Linear)


def fit_sizes(module: nn.Module) -> None:
    """A resized layer's size attributes, read back from its tensors."""
    from torch import nn

    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = (int(n) for n in module.weight.shape)
    elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        module.out_channels = int(module.weight.shape[0])
        module.in_channels = int(module.weight.shape[1]) * module.groups
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d | nn.BatchNorm3d):
        stats = module.running_mean if module.running_mean is not None else module.weight
        module.num_features = int(stats.shape[0])


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
