"""Image files for the serving tests: one digit in every Pillow mode (light to import: numpy and
Pillow only, so the Schemathesis hooks can use them too)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def with_alpha(gray: np.ndarray, alpha: np.ndarray) -> Image.Image:
    return Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])


def digit_image(row: np.ndarray) -> Image.Image:
    """An 8x8 row in 0..16 as a 64x64 8-bit grayscale picture: dark ink on white."""
    gray = (255 - np.asarray(row, np.float64).reshape(8, 8) / 16 * 255).round().astype(np.uint8)
    return Image.fromarray(gray).resize((64, 64), Image.Resampling.NEAREST)


def mode_variants(base: Image.Image) -> dict[str, tuple[bytes, float]]:
    """The same digit in each Pillow mode and a few formats: name -> (file, tolerance of its row
    against the 8-bit grayscale original's, in data units of 0..16). Dithered (mode 1) and
    quantized (64 palette colours) variants lose a little; the others nothing."""
    gray = np.asarray(base)
    ink = 255 - gray
    black, white = np.zeros_like(ink), np.full_like(ink, 255)
    wide = Image.fromarray(gray.astype(np.uint16) * 257)  # I;16: 0..65535
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE)
    return {
        "L png": (encoded(base, "PNG"), 0.0),
        "1 png (dithered)": (encoded(base.convert("1"), "PNG"), 1.5),
        "P png": (encoded(palette, "PNG"), 0.05),
        "P gif, white transparent": (
            encoded(palette, "GIF", transparency=palette.getpixel((0, 0))),
            0.05,
        ),
        "RGB png": (encoded(base.convert("RGB"), "PNG"), 0.05),
        "RGBA png, ink on transparent black": (
            encoded(with_alpha(black, ink).convert("RGBA"), "PNG"),
            0.05,
        ),
        "LA png, black ink on transparent": (encoded(with_alpha(black, ink), "PNG"), 0.05),
        "LA png, white ink on transparent": (encoded(with_alpha(white, ink), "PNG"), 0.05),
        "P png with alpha (quantized)": (
            encoded(with_alpha(black, ink).convert("RGBA").quantize(64), "PNG"),
            2.0,
        ),
        "CMYK tiff": (encoded(base.convert("CMYK"), "TIFF"), 0.05),
        "CMYK jpeg": (encoded(base.convert("CMYK"), "JPEG", quality=95), 0.3),
        "YCbCr tiff": (encoded(base.convert("YCbCr"), "TIFF"), 0.05),
        "L jpeg": (encoded(base, "JPEG", quality=95), 0.3),
        "I;16 png": (encoded(wide, "PNG"), 0.05),
        "I;16 tiff": (encoded(wide, "TIFF"), 0.05),
        "RGBA webp": (encoded(base.convert("RGBA"), "WEBP", lossless=True), 0.05),
    }


def png(draw_one: bool = True, size: int = 64, background: int = 255) -> bytes:
    """A `size`-square grayscale PNG: a vertical stroke (a "1") on `background`, or blank."""
    image = Image.new("L", (size, size), background)
    if draw_one:
        from PIL import ImageDraw

        ImageDraw.Draw(image).line(
            [(size // 2, 6), (size // 2, size - 6)], fill=255 - background, width=size // 8
        )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_digit_folder(
    folder: Any,
    per_class: int = 20,
    size: int = 32,
    broken: int = 0,
    classes: int = 10,
    names: list[str] | None = None,
) -> list[str]:
    """A folder of images in the ImageFolder layout: scikit-learn's digits drawn at `size` x
    `size` (dark ink on white, bilinear), `per_class` files per class <folder>/<name>/ (the
    digit, or `names[digit]` for the first len(names) digits), every other one PNG, the rest
    JPEG (quality 95); then `broken` truncated PNGs in the first class. Returns the broken
    files' paths relative to `folder`."""
    from pathlib import Path

    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(folder)
    folders = list(names) if names else [str(label) for label in range(classes)]
    for label, name in enumerate(folders):
        (root / name).mkdir(parents=True, exist_ok=True)
        rows = digits.data[digits.target == label][:per_class]
        for i, row in enumerate(rows):
            gray = (255 - row.reshape(8, 8) / 16 * 255).round().astype(np.uint8)
            image = Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR)
            if i % 2:
                image.save(root / name / f"{i:04d}.jpg", "JPEG", quality=95)
            else:
                image.save(root / name / f"{i:04d}.png", "PNG")
    broken_files = []
    for i in range(broken):
        whole = encoded(Image.new("L", (size, size), 255), "PNG")
        path = f"{folders[0]}/broken-{i}.png"
        (root / path).write_bytes(whole[: len(whole) // 2])
        broken_files.append(path)
    return broken_files
