"""Model architectures by name. Register one more with `@register("name")`.

A factory takes (input_shape, num_classes, width, depth, dropout) and returns an `nn.Module`.
Factories import torch themselves, so reading the registry (params validation) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

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
