"""The one preprocessing used by training, evaluation and serving (numpy only: no torch here).

A `spec` is plain data stored in the data manifest and in every model's metadata:
{"feature_columns": [...], "value_range": [low, high], "feature_ranges": [[low, high], ...] or
 None, "input_shape": [C, H, W] or [F], "image_shape": [H, W] or None, "scaling": ...,
 "model_scaling": "standard" | "minmax" | "none"}. Rows whose features are pixels (image_shape
set) can also come from an image file: `image_to_rows` (Pillow, imported only when called).

Two scalings, each in one place only:
- `scaling` (before the model, here): `RANGE_SCALING` for images, the pixels mapped from
  `value_range` to [0, 1] (also what an image file becomes); `"none"` for tabular rows, which
  reach the model as raw feature values.
- `model_scaling` (inside the model, `pipelines.models.Scaler`): per-feature statistics fitted
  on the training split (data.scaling), buffers of the model itself, so the exported ONNX graph
  applies them and nothing else holds a copy.

`value_range` is the validation contract (what values are legal): the envelope of
`feature_ranges` when those are given per feature (data.value_range as a mapping, or `learn`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipelines.errors import FeatureError

RANGE_SCALING = "min-max to [0, 1] over value_range"  # images: pixels before the model


def make_spec(
    feature_columns: Sequence[str],
    ranges: Sequence[Sequence[float]],
    image_shape: Sequence[int] | None,
    model_scaling: str = "none",
    channels: int = 1,
    image_folder: bool = False,
) -> dict[str, Any]:
    """The spec of the data: `ranges` one [low, high] per feature column (all equal when
    data.value_range is one pair: then `feature_ranges` is None); `model_scaling` the scaling the
    model applies itself (fitted in train); `image_folder`: rows are decoded image files
    (`decode_image`), so an image sent to the service is decoded the same way (and `channels`
    may be 3)."""
    pairs = [[float(low), float(high)] for low, high in ranges]
    shape = [channels, *image_shape] if image_shape else [len(feature_columns)]
    uniform = all(pair == pairs[0] for pair in pairs)
    spec = {
        "feature_columns": list(feature_columns),
        "value_range": [min(p[0] for p in pairs), max(p[1] for p in pairs)],
        "feature_ranges": None if uniform else pairs,
        "input_shape": shape,
        "image_shape": list(image_shape) if image_shape else None,
        "scaling": RANGE_SCALING if image_shape else "none",
        "model_scaling": model_scaling,
    }
    if image_folder:
        spec["image_decode"] = {"channels": channels, "resample": "bilinear", **IMAGE_DECODE}
    return spec


# How `decode_image` turns a file into pixels (recorded in the spec: a change shows in metadata).
IMAGE_DECODE = {"gray": "luminance, no inversion", "color": "RGB, alpha dropped"}


def feature_ranges(spec: Mapping[str, Any]) -> list[tuple[float, float]]:
    """[low, high] per feature column: the legal values (specs without `feature_ranges` have
    one `value_range` for all)."""
    pairs = spec.get("feature_ranges") or [spec["value_range"]] * len(spec["feature_columns"])
    return [(float(low), float(high)) for low, high in pairs]


def to_model_input(rows: Any, spec: Mapping[str, Any], source: str = "") -> np.ndarray:
    """(N, F) raw feature rows (array or DataFrame) -> (N, *input_shape) float32: images scaled
    from value_range to [0, 1] (`scaling` RANGE_SCALING; specs written before `scaling` was
    "none" for rows also said so), tabular rows as they are (the model scales them itself).

    Raises FeatureError naming the column and a non-numeric value, or the input shape the spec
    expects against the rows' column count; `source` (e.g. "model m.pt, prepared data d") prefixes
    the message."""
    prefix = f"{source}: " if source else ""
    try:
        values = np.array(rows, dtype=np.float32)  # a copy: the caller's rows stay theirs
    except (TypeError, ValueError):
        column, value = _non_numeric(rows)
        raise FeatureError(
            f"{prefix}feature column {column} holds non-numeric values such as {value!r}; "
            "run validate (python -m pipelines.validate) to list every bad value, then fix the data"
        ) from None
    shape = [int(n) for n in spec["input_shape"]]
    expected = int(np.prod(shape))
    columns = values.shape[1] if values.ndim == 2 else values[0].size if len(values) else expected
    if columns != expected:
        raise FeatureError(
            f"{prefix}the model expects {expected} feature columns (input shape {shape}) but the "
            f"data has {columns}; use a model trained on this data, or prepare the data it was "
            "trained on"
        )
    if spec.get("scaling", RANGE_SCALING) == RANGE_SCALING:
        low, high = spec["value_range"]
        values = (values - np.float32(low)) / np.float32((high - low) or 1.0)
    return values.reshape(len(values), *shape)


def _non_numeric(rows: Any) -> tuple[str, Any]:
    """(column name or position, first value) of the first column that is not numeric."""
    names = list(getattr(rows, "columns", []))
    table = np.asarray(rows, dtype=object)
    for j in range(table.shape[1] if table.ndim == 2 else 0):
        for value in table[:, j]:
            try:
                float(value)
            except (TypeError, ValueError):
                return (repr(names[j]) if names else f"#{j}"), value
    return "?", None


class ImageError(ValueError):
    """An image that cannot become a feature row (corrupt, not an image, wrong model)."""


def image_shape(spec: Mapping[str, Any]) -> tuple[int, int] | None:
    """(H, W) when the features are pixels; specs written before `image_shape` existed give it
    through a (1, H, W) input shape."""
    if spec.get("image_shape"):
        height, width = spec["image_shape"]
        return int(height), int(width)
    shape = spec["input_shape"]
    return (int(shape[1]), int(shape[2])) if len(shape) == 3 else None


def image_to_rows(
    data: bytes, spec: Mapping[str, Any], max_pixels: int = 4096 * 4096
) -> np.ndarray:
    """An image file (PNG, JPEG, ...) -> one raw feature row (1, H*W) in the data's value range.

    The built-in digits were made by counting ink in blocks of a bitmap, with 0 as background and
    `high` as full ink: so grayscale (`luminance`: any mode, at its own bit depth), ink as the
    bright value (a light-background image, the usual scan or drawing, is inverted), area-average
    resize to (H, W), then 0..1 -> [low, high]. Raises ImageError (unreadable, too large, a mode
    with no defined range)."""
    from PIL import Image

    shape = image_shape(spec)
    if shape is None:
        raise ImageError("this model takes tabular rows, not images (its data has no image_shape)")
    if spec.get("image_decode"):  # trained on a folder of image files: decoded as in training
        return decode_image(data, spec, max_pixels=max_pixels).reshape(1, -1)
    with open_image(data, max_pixels) as image:
        gray = luminance(image)
    if gray.mean() > 0.5:  # a light background: make the ink bright
        gray = 1.0 - gray
    height, width = shape
    small = Image.fromarray(gray.astype(np.float32)).resize((width, height), Image.Resampling.BOX)
    low, high = spec["value_range"]
    scaled = np.float32(low) + np.asarray(small, np.float32) * np.float32(high - low)
    return scaled.reshape(1, height * width)


SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}  # unsigned 16-bit grayscale (PNG, TIFF)
WITH_ALPHA = {"RGBA", "RGBa", "LA", "La", "PA"}
# The Pillow modes an image file may have, for `prepare` (a folder's files: `validate` names the
# others) and the service (a 400 naming the mode): those whose every value maps to gray / RGB
# without clipping or guessing. 8-bit modes (1, L, P, RGB, RGBA, LA, PA, RGBX) convert exactly;
# YCbCr and CMYK by Pillow's fixed per-pixel formulas (8 bits in, 8 bits out: CMYK ink beyond
# full black is black); 16-bit grayscale is scaled by its full range 0..65535 (`luminance`,
# `decode_image`), never clipped at 255. Refused: I (32-bit integers) and F (floats) have no
# fixed range (Pillow clips them to 0..255: an F image of 0.5 reads as black), LAB has no
# conversion to RGB, HSV none that a file format stores, and premultiplied RGBa / La are
# lossy.
IMAGE_MODES = (
    "1",
    "L",
    "P",
    "RGB",
    "RGBA",
    "RGBX",
    "LA",
    "PA",
    "CMYK",
    "YCbCr",
    *sorted(SIXTEEN_BIT),
)
# The file formats `open_image` reads (what the service accepts; a folder data set takes PNG
# and JPEG files: `pipelines.image_folder.IMAGE_SUFFIXES`).
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
MODE_HINT = "send 8- or 16-bit grayscale, RGB, RGBA, palette, CMYK or YCbCr"


def check_mode(image: Any) -> None:
    """Raise ImageError naming the image's mode unless it is one of IMAGE_MODES (a PNG's `I`,
    16-bit grayscale in older Pillow, counts as I;16)."""
    mode = image.mode
    if mode not in IMAGE_MODES and not (mode == "I" and image.format == "PNG"):
        raise ImageError(f"image mode {mode} is not supported: {MODE_HINT}")


def is_sixteen_bit(image: Any) -> bool:
    """16-bit grayscale: the I;16 modes, and a PNG's `I` (older Pillow)."""
    return bool(image.mode in SIXTEEN_BIT or (image.mode == "I" and image.format == "PNG"))


def luminance(image: Any) -> np.ndarray:
    """A Pillow image of any mode -> (H, W) float32 gray levels in [0, 1], 1 = white.

    16-bit grayscale is scaled by its full range (0..65535); palettes are expanded; colour
    (RGB, CMYK, YCbCr) becomes ITU-R 601 luma; transparent pixels are background: a colour
    key keeps its colour, alpha is composited onto white when the visible ink is dark, onto black
    when it is light. Modes not in IMAGE_MODES (I: 32-bit integers, F: floats, LAB,
    HSV, ...) raise ImageError naming the mode."""
    check_mode(image)
    mode = image.mode
    if is_sixteen_bit(image):
        return np.asarray(image, np.float32) / np.float32(65535)
    # A colour key (GIF, PNG tRNS of one colour) marks the background by its colour: keep it.
    # Alpha (a channel, or PNG's alpha per palette entry) is composited.
    if mode in WITH_ALPHA or isinstance(image.info.get("transparency"), bytes):
        gray, alpha = np.moveaxis(np.asarray(image.convert("RGBA").convert("LA"), np.float32), 2, 0)
        return composite(gray / 255, alpha / 255)
    if mode not in {"1", "L"}:
        image = image.convert("RGB")
    return np.asarray(image.convert("L"), np.float32) / np.float32(255)


def composite(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Gray levels over a background that contrasts with the visible ink (alpha-weighted mean
    below 0.5: dark ink on white; otherwise light ink on black). Both (H, W) in [0, 1]."""
    weight = float(alpha.sum())
    ink_is_dark = weight == 0 or float((gray * alpha).sum()) / weight < 0.5
    background = np.float32(1.0 if ink_is_dark else 0.0)
    return alpha * gray + (1 - alpha) * background


def open_image(data: bytes, max_pixels: int = 4096 * 4096) -> Any:
    """A decoded Pillow image (pixels loaded); raises ImageError when `data` is no readable
    image or has more than `max_pixels` pixels."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if image.width * image.height > max_pixels:
            raise ImageError(
                f"image has {image.width * image.height} pixels: over the limit of {max_pixels}"
            )
        image.load()
    except UnidentifiedImageError:
        raise ImageError(
            f"not a readable image: {', '.join(IMAGE_FORMATS[:-1])} or {IMAGE_FORMATS[-1]} expected"
        ) from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"not a readable image: {exc}") from None
    return image


def decode_image(
    data: bytes,
    spec: Mapping[str, Any],
    crop: tuple[float, float, float, float] | None = None,
    flip: bool = False,
    max_pixels: int = 4096 * 4096,
) -> np.ndarray:
    """An image file of a folder data set -> raw pixel row values (C, H, W) float32 in the data's
    value range: the one decoding of `prepare` (the splits' rows), training (with `crop` and
    `flip`: the augmentations) and the service's `/predict_image` (without).

    Channels 1: `luminance` (1 = white; no inversion); channels 3: RGB (alpha dropped; 16-bit
    gray at its full range). Modes outside IMAGE_MODES raise ImageError naming the mode.
    Each channel in [0, 1] is resized to (H, W) with Pillow's bilinear filter (antialiased when
    shrinking), from `crop` = (left, upper, right, lower) in source pixels when given (the whole
    image otherwise), mirrored left-right when `flip`, then mapped 0..1 -> [low, high].
    Raises ImageError (unreadable, too large, a mode with no defined range)."""
    from PIL import Image

    channels = int(spec["input_shape"][0])
    height, width = image_shape(spec) or (0, 0)
    with open_image(data, max_pixels) as image:
        if channels == 1:
            planes = [luminance(image)]
        elif is_sixteen_bit(image):  # gray at its own depth, not clipped at 255 by convert
            planes = [np.asarray(image, np.float32) / np.float32(65535)] * 3
        else:
            check_mode(image)
            rgb = np.asarray(image.convert("RGB"), np.float32) / np.float32(255)
            planes = [rgb[:, :, c] for c in range(3)]
    resized = []
    for plane in planes:
        small = Image.fromarray(plane.astype(np.float32)).resize(
            (width, height), Image.Resampling.BILINEAR, box=crop
        )
        resized.append(np.asarray(small, np.float32))
    pixels = np.stack(resized)
    if flip:
        pixels = pixels[:, :, ::-1]
    low, high = spec["value_range"]
    return np.float32(low) + np.clip(pixels, 0, 1) * np.float32(high - low)
