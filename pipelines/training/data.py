"""The train and val splits as model-ready tensors: the prepare stage's Parquet files through
the shared preprocessing (`pipelines.preprocessing.to_model_input`), labels as class indices.

For a folder of images the training batches come from the image files instead (`ImageBatches`:
decoded per batch, in the DataLoader's worker processes, with the augmentations of
`train.augment`); validation uses the prepared rows, decoded once by `prepare` with the same
`decode_image` and no augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipelines.errors import DataSourceError
from pipelines.preprocessing import decode_image, to_model_input

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.config import AugmentConfig


@dataclass
class Data:
    """Model-ready tensors of the train and val splits (on the host)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    # A folder of images: the training batches, decoded from the files (same order as y_train).
    train_images: ImageBatches | None = None


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


def load_data(
    prepared_dir: Path,
    manifest: dict[str, Any],
    augment: AugmentConfig | None = None,
    root: Path | None = None,
) -> Data:
    """The train and val splits; for a folder of images (found under `root`, the project root:
    the working directory by default) also `train_images`, augmented as `augment` says."""
    from pipelines.prepare import read_split

    tensors: list[torch.Tensor] = []
    frames = {}
    for name in ("train", "val"):
        frame = frames[name] = read_split(prepared_dir, name)
        if frame.empty:
            raise DataSourceError(f"{prepared_dir}: the {name} split has no rows; add data")
        x, y = split_arrays(frame, manifest, name, f"{prepared_dir} ({name} split)")
        tensors += [torch.from_numpy(x), torch.from_numpy(y)]
    x_train, y_train, x_val, y_val = tensors
    data = Data(x_train, y_train, x_val, y_val)
    if manifest.get("image_folder"):
        from pipelines.prepare import read_files

        folder = Path(root or Path.cwd()) / manifest["image_folder"]["root"]
        sizes = read_files(prepared_dir).set_index("path")[["width", "height"]]
        paths = list(frames["train"]["path"])
        data.train_images = ImageBatches(
            folder,
            paths,
            [(int(w), int(h)) for w, h in sizes.loc[paths].itertuples(index=False)],
            data.y_train,
            manifest["preprocessing"],
            augment,
        )
    return data


class ImageBatches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """The training split's image files, fetched a batch at a time: `dataset[indices]` reads,
    decodes (`decode_image`) and augments each file -> (x (B, C, H, W) float32, y (B,) int64).

    Augmentations (`train.augment`) follow torchvision's transforms: RandomResizedCrop's sampling
    of a crop box (area fraction in `scale`, aspect ratio log-uniform in `ratio`, 10 tries, then
    the central crop), resized to image_shape by the same bilinear resize as evaluation; a
    left-right flip with probability 0.5. Random numbers come from torch's default generator,
    which DataLoader seeds in each worker (base seed from the loader's seeded generator)."""

    def __init__(
        self,
        folder: Path,
        paths: Sequence[str],
        sizes: Sequence[tuple[int, int]],
        labels: torch.Tensor,
        spec: dict[str, Any],
        augment: AugmentConfig | None,
    ) -> None:
        self.folder, self.paths, self.sizes, self.labels = folder, list(paths), list(sizes), labels
        self.spec = spec
        crop = augment.random_resized_crop if augment else None
        self.scale = tuple(crop.scale) if crop else None
        self.ratio = tuple(crop.ratio) if crop else None
        self.hflip = bool(augment and augment.hflip)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = np.stack([self.load(int(i)) for i in indices])
        x = to_model_input(rows.reshape(len(rows), -1), self.spec, "training images")
        return torch.from_numpy(x), self.labels[indices]

    def load(self, index: int) -> np.ndarray:
        """One file's pixel row values (C, H, W), augmented."""
        path = self.folder / self.paths[index]
        try:
            content = path.read_bytes()
        except OSError as exc:
            raise DataSourceError(
                f"{path}: cannot be read ({exc.strerror}); run prepare again"
            ) from None
        box = self.crop_box(*self.sizes[index]) if self.scale else None
        flip = self.hflip and bool(torch.rand(()) < 0.5)
        return decode_image(content, self.spec, crop=box, flip=flip)

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(left, upper, right, lower) of a random crop, as torchvision's
        RandomResizedCrop.get_params draws it."""
        assert self.scale is not None and self.ratio is not None
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * float(torch.empty(()).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                return (left, top, left + w, top + h)
        aspect_in = width / height  # fallback: the central crop
        if aspect_in < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect_in > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
        return (left, top, left + w, top + h)
