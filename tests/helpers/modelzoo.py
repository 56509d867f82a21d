"""Small trained models for tests: digits prepared and trained for a couple of epochs, once."""

from __future__ import annotations

from pathlib import Path

from pipelines.config import Params, load_params
from pipelines.prepare import prepare
from tests.helpers import REPO
from tests.helpers.params import tiny_params


def trained_model(root: Path, params: Params | None = None) -> tuple[Path, Path]:
    """(prepared dir, model file) under `root`; `params` defaults to tiny_params()."""
    from pipelines.models import save_model
    from pipelines.train import train

    params = params or tiny_params()
    prepared = root / "prepared"
    prepare(params.data, params.prepare, root, prepared)
    result = train(params.train, prepared, root / "checkpoints")
    model = root / "model.pt"
    save_model(model, result)
    return prepared, model


def write_golden(onnx_path: Path, prepared: Path, out: Path, rows: int = 50) -> Path:
    """A golden set (pipelines.select.golden_set) for `onnx_path`, by ONNX Runtime, at `out`."""
    from pipelines.artifacts import write_json
    from pipelines.select import golden_set, onnx_predictor

    write_json(out, golden_set(onnx_predictor(onnx_path, 0), prepared, onnx_path, rows, 0))
    return out


def tamper(src: Path, dst: Path) -> None:
    """Scale the last layer's weights: a graph that still loads and runs, but is wrong."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(src))
    weights = max(proto.graph.initializer, key=lambda t: len(t.dims) == 2 and t.dims[0] == 10)
    array = numpy_helper.to_array(weights)
    weights.CopyFrom(numpy_helper.from_array(-3 * array, weights.name))
    onnx.save(proto, str(dst))


# A user's own tabular data: generated rows, features on very different scales.
TABULAR_FEATURES = ["tiny", "unit", "hundreds", "myriads"]
TABULAR_SCALES = (0.01, 1.0, 100.0, 10_000.0)


def tabular_csv(path: Path, rows: int = 240, seed: int = 0) -> Path:
    """`rows` rows of 3 classes (label 0-2): per class a centre, plus unit noise, then each
    feature times its scale in TABULAR_SCALES and shifted by 5 scales (all positive)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % 3
    centres = rng.normal(scale=4.0, size=(3, len(TABULAR_FEATURES)))
    scales = np.asarray(TABULAR_SCALES)
    x = (centres[labels] + rng.normal(size=(rows, len(scales))) + 5.0) * scales
    frame = pd.DataFrame(x, columns=TABULAR_FEATURES)
    frame["label"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def tabular_params(root: Path, **overrides: object) -> Params:
    """params.yaml pointed at a generated `tabular_csv` under `root`/data/raw (the README's own
    data edits: tabular rows, ranges learned), small and quick."""
    tabular_csv(root / "data" / "raw" / "rows.csv")
    data = {
        "data.name": "rows",
        "data.source": "data/raw/rows.csv",
        "data.label_column": "label",
        "data.features": TABULAR_FEATURES,
        "data.labels": [0, 1, 2],
        "data.value_range": "learn",
        "data.image_shape": None,
    }
    small = {"train.epochs": 8, "train.model.width": 16, "train.patience": 8}
    return load_params(REPO / "params.yaml", overrides={**data, **small, **overrides})
