"""Small hand-made ONNX graphs and model folders whose files disagree, for the service's load
checks (service.check_graph, service.read_model_metadata)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pipelines.artifacts import write_json
from pipelines.cascade import CASCADE, STUDENT, TEACHER, Threshold, describe


def linear_graph(path: Path, input_shape: list[int], classes: int) -> Path:
    """A graph input (batch, *input_shape) -> Flatten -> MatMul -> logits (batch, classes), with
    fixed random weights (seed 0), saved at `path`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    features = int(np.prod(input_shape))
    weights = np.random.default_rng(0).normal(size=(features, classes)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def with_labels(folder: Path, labels: list[int | str]) -> None:
    """Replace the labels of `folder`/metadata.json."""
    meta = json.loads((folder / "metadata.json").read_text())
    (folder / "metadata.json").write_text(json.dumps({**meta, "labels": labels}))


def labels_cut(folder: Path) -> str:
    """Two labels beside a 10-class graph (the service answered 500: IndexError)."""
    with_labels(folder, [0, 1])
    return TEACHER


def labels_extended(folder: Path) -> str:
    """A valid 3-class graph beside 10 labels (the service answered 200, wrongly)."""
    meta = json.loads((folder / "metadata.json").read_text())
    linear_graph(folder / TEACHER, meta["preprocessing"]["input_shape"], 3)
    return TEACHER


def student_of_three_classes(folder: Path) -> str:
    """A cascade whose student gives 3 scores per row, its hash in cascade.json matching."""
    meta = json.loads((folder / "metadata.json").read_text())
    linear_graph(folder / STUDENT, meta["preprocessing"]["input_shape"], 3)
    figures = Threshold(0.5, 0.5, 0.0, 0.0)
    write_json(folder / CASCADE, describe(folder / TEACHER, folder / STUDENT, figures))
    return STUDENT


def graph_of_other_input(folder: Path) -> str:
    """A 10-class graph that takes 16 features where metadata.json describes 64."""
    linear_graph(folder / TEACHER, [1, 4, 4], 10)
    return TEACHER


MISMATCHES = [labels_cut, labels_extended, student_of_three_classes, graph_of_other_input]


def broken_copy(good: Path, dest: Path, breakage: object) -> str:
    """`good` copied to `dest` and broken by `breakage` (one of MISMATCHES); the file named."""
    shutil.copytree(good, dest)
    return str(breakage(dest))  # type: ignore[operator]


def save_folder(name: str, folder: Path) -> str:
    """`folder`'s files as a new BentoML model `name` in the current store, as they are (no
    packaging checks, no reuse of an older model); its tag."""
    import bentoml

    with bentoml.models.create(name) as model:
        shutil.copytree(folder, model.path, dirs_exist_ok=True)
    return str(model.tag)
