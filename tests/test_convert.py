from pathlib import Path

import pytest

from pipelines import tensorrt_engine
from pipelines.artifacts import read_json
from pipelines.convert import convert
from tests.modelzoo import tiny_params

REASON = tensorrt_engine.unavailable_reason()


@pytest.mark.skipif(REASON is None, reason="TensorRT and a CUDA device are present")
def test_convert_records_skipped_with_the_reason(tmp_path: Path) -> None:
    result = convert(
        tiny_params().convert,
        [("teacher", tmp_path / "a.onnx", tmp_path)],
        tmp_path,
        tmp_path / "out",
    )
    assert result == {"status": "skipped", "reason": REASON, "plans": []}
    assert read_json(tmp_path / "out" / "plans.json") == result


@pytest.mark.gpu
@pytest.mark.skipif(REASON is not None, reason=f"TensorRT plans cannot be built here: {REASON}")
def test_plans_build_with_a_batch_profile_and_keep_parity(tmp_path: Path) -> None:
    from pipelines.export import export
    from pipelines.quantize import quantize
    from tests.modelzoo import trained_model

    params = tiny_params()
    prepared, model = trained_model(tmp_path, params)
    export(params.export, model, prepared, tmp_path / "model.onnx")
    quantize(params.quantize, tmp_path / "model.onnx", prepared, tmp_path / "variants")
    result = convert(
        params.convert,
        [("teacher", tmp_path / "model.onnx", tmp_path / "variants")],
        prepared,
        tmp_path / "plans",
    )
    assert result["status"] == "built" and len(result["plans"]) == len(params.convert.precisions)
    for plan in result["plans"]:
        assert plan["argmax_agreement"] >= params.convert.parity_min_agreement
        assert plan["tensorrt_version"] and plan["compute_capability"]
        engine = tensorrt_engine.Engine(Path(plan["plan"]))
        import numpy as np

        for batch in (1, params.convert.max_batch):
            assert engine(np.zeros((batch, 1, 8, 8), np.float32)).shape == (batch, 10)
