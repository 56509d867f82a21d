from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import ParityError
from pipelines.export import export
from pipelines.quantize import VARIANTS, quantize, split_inputs
from pipelines.runtime import logits, read_metadata, session
from tests.modelzoo import tiny_params, trained_model


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quantize")
    params = tiny_params()
    prepared, model = trained_model(root, params)
    export(params.export, model, prepared, root / "model.onnx")
    return prepared, root / "model.onnx"


def test_every_variant_is_written_measured_and_described(fp32: tuple, tmp_path: Path) -> None:
    prepared, onnx_path = fp32
    results = quantize(tiny_params().quantize, onnx_path, prepared, tmp_path)
    x, y = split_inputs(prepared, "test", read_metadata(onnx_path)["preprocessing"])
    for variant in VARIANTS:
        path = tmp_path / f"{variant}.onnx"
        measured = float(np.mean(logits(session(path), x).argmax(1) == y))
        assert results[variant]["accuracy"] == pytest.approx(measured)  # measured, not assumed
        assert read_metadata(path)["variant"] == variant
    assert read_metadata(tmp_path / "int8_cpu.onnx")["precision"] == "int8"


def qdq_ops(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_tensorrt_graph_is_symmetric_qdq_without_quantized_bias(
    fp32: tuple, tmp_path: Path
) -> None:
    import onnx
    from onnx import numpy_helper

    prepared, onnx_path = fp32
    quantize(tiny_params().quantize, onnx_path, prepared, tmp_path)
    graph = onnx.load(str(tmp_path / "int8_qdq.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= qdq_ops(tmp_path / "int8_qdq.onnx")
    zero_points = [
        numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("zero_point")
    ]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    int32 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert int32 == []  # biases stay float


def test_bad_calibration_is_caught_by_the_gate(fp32: tuple, tmp_path: Path) -> None:
    prepared, onnx_path = fp32
    cfg = tiny_params().quantize.model_copy(
        update={"calibration_samples": 1, "parity_min_agreement": 0.999}
    )
    with pytest.raises(
        ParityError, match=r"agrees with FP32 on .* below quantize.parity_min_agreement"
    ):
        quantize(cfg, onnx_path, prepared, tmp_path)
