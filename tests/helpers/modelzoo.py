"""Small trained models for tests: digits prepared and trained for a couple of epochs, once."""

from __future__ import annotations

from pathlib import Path

from pipelines.config import Params
from pipelines.prepare import prepare
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
