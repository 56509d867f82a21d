import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipelines import convert as convert_module
from pipelines import tensorrt_engine
from pipelines.artifacts import read_json, write_json
from pipelines.convert import convert
from pipelines.runtime import session
from tests.helpers.params import tiny_params

REASON = tensorrt_engine.unavailable_reason()


@pytest.mark.skipif(REASON is None, reason="TensorRT and a CUDA device are present")
def test_convert_records_skipped_with_the_reason(tmp_path: Path) -> None:
    result = convert(
        tiny_params().convert,
        [("teacher", tmp_path / "a.onnx", tmp_path)],
        tmp_path,
        tmp_path / "out",
    )
    assert result == {"status": "skipped", "reason": REASON, "plans": [], "dropped": []}
    assert read_json(tmp_path / "out" / "plans.json") == result


@pytest.mark.tensorrt
def test_plans_build_with_a_batch_profile_and_keep_parity(tmp_path: Path) -> None:
    from pipelines.export import export
    from pipelines.quantize import quantize
    from tests.helpers.modelzoo import trained_model

    params = tiny_params()
    prepared, model = trained_model(tmp_path, params)
    export(params.export, model, prepared, tmp_path / "model.onnx")
    lenient = params.quantize.model_copy(update={"parity_min_agreement": 0.05})  # tiny model
    quantize(lenient, tmp_path / "model.onnx", prepared, tmp_path / "variants")
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


def linear_onnx(path: Path, weights: np.ndarray, preprocessing: dict) -> None:
    """A (N, 1, 8, 8) -> (N, 10) linear graph with export's metadata: a stand-in model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pipelines.export import embed_metadata

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["x"], ["flat"]),
            helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        ],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    embed_metadata(proto, {"preprocessing": preprocessing})
    onnx.save(proto, str(path))


def test_plans_from_dropped_or_disagreeing_variants_are_dropped_with_the_reason(
    tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorRT replaced by ONNX Runtime on the plan (a copy of the source graph), so the stage's
    own logic runs here: each plan is built, dropped for its source, or dropped at parity."""

    def build(onnx_path: Path, plan_path: Path, cfg: object) -> None:
        shutil.copyfile(onnx_path, plan_path)
        write_json(plan_path.with_suffix(".json"), {"tensorrt_version": "stand-in"})

    def predictor(plan: Path) -> Callable[[np.ndarray], np.ndarray]:
        return lambda x: session(plan).run(None, {"x": x})[0]

    monkeypatch.setattr(tensorrt_engine, "unavailable_reason", lambda: None)
    monkeypatch.setattr(tensorrt_engine, "predictor", predictor)
    monkeypatch.setattr(convert_module, "build", build)
    spec = read_json(prepared / "manifest.json")["preprocessing"]
    weights = np.random.default_rng(0).normal(size=(64, 10))
    linear_onnx(tmp_path / "fp32.onnx", weights, spec)
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    teacher.mkdir()
    student.mkdir()
    linear_onnx(teacher / "fp16.onnx", weights, spec)  # agrees
    why = "agrees with FP32 on 0.5000 of 270 test rows, below quantize.parity_min_agreement 0.97"
    write_json(teacher / "variants.json", {"int8_qdq": {"status": "dropped", "reason": why}})
    linear_onnx(student / "fp16.onnx", np.roll(weights, 1, axis=1), spec)  # never agrees
    families = [
        ("teacher", tmp_path / "fp32.onnx", teacher),
        ("student", tmp_path / "fp32.onnx", student),
    ]

    result = convert(tiny_params().convert, families, prepared, tmp_path / "plans")

    assert result["status"] == "built"
    assert [(p["family"], p["precision"], p["argmax_agreement"]) for p in result["plans"]] == [
        ("teacher", "fp16", 1.0)
    ]
    reasons = {(d["family"], d["precision"]): d["reason"] for d in result["dropped"]}
    assert (
        reasons[("teacher", "int8")] == f"no int8_qdq.onnx in {teacher}: quantize dropped it: {why}"
    )
    assert reasons[("student", "fp16")].startswith(
        "student-fp16.plan agrees with FP32 ONNX on 0.0000"
    )
    assert reasons[("student", "int8")] == f"no int8_qdq.onnx in {student}: not written"
    assert sorted(p.name for p in (tmp_path / "plans").iterdir()) == [
        "plans.json",
        "teacher-fp16.json",
        "teacher-fp16.plan",
    ]
