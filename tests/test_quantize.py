from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from mlflow import MlflowClient
from onnx import numpy_helper

import pipelines.quantize as quantize_module
from pipelines.artifacts import read_json
from pipelines.config import QuantizeConfig
from pipelines.errors import PipelineError
from pipelines.export import export
from pipelines.quantize import (
    CALIBRATION_METHODS,
    MANIFEST,
    VARIANTS,
    calibration_batches,
    parity_miss,
    quantize,
    split_inputs,
)
from pipelines.runtime import logits, read_metadata, session
from pipelines.select import Family, select
from tests.helpers import REPO
from tests.helpers.modelzoo import trained_model
from tests.helpers.params import tiny_params


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quantize")
    params = tiny_params()
    prepared, model = trained_model(root, params)
    export(params.export, model, prepared, root / "model.onnx")
    return prepared, root / "model.onnx"


def config(**changes: object) -> QuantizeConfig:
    """The tiny model is barely trained (near-tied logits): a low gate keeps its variants, for the
    tests that look at the variants rather than at the gate."""
    return tiny_params().quantize.model_copy(update={"parity_min_agreement": 0.05, **changes})


def test_every_variant_is_written_measured_and_described(fp32: tuple, tmp_path: Path) -> None:
    prepared, onnx_path = fp32
    results = quantize(config(), onnx_path, prepared, tmp_path)
    x, y = split_inputs(prepared, "test", read_metadata(onnx_path)["preprocessing"])
    for variant in VARIANTS:
        path = tmp_path / f"{variant}.onnx"
        measured = float(np.mean(logits(session(path), x).argmax(1) == y))
        assert results[variant]["status"] == "kept"
        assert results[variant]["accuracy"] == pytest.approx(measured)  # measured, not assumed
        assert read_metadata(path)["variant"] == variant
    assert read_metadata(tmp_path / "int8_cpu.onnx")["precision"] == "int8"
    assert read_json(tmp_path / MANIFEST) == results
    # only the declared files: no intermediate (*.pre.onnx) or temp file among the outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [MANIFEST, *(f"{v}.onnx" for v in VARIANTS)]
    )


def qdq_ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_tensorrt_graph_is_symmetric_qdq_without_quantized_bias(
    fp32: tuple, tmp_path: Path
) -> None:
    prepared, onnx_path = fp32
    quantize(config(), onnx_path, prepared, tmp_path)
    graph = onnx.load(str(tmp_path / "int8_qdq.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= qdq_ops(tmp_path / "int8_qdq.onnx")
    zero_points = [
        numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("zero_point")
    ]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)
    int32 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT32]
    assert int32 == []  # biases stay float


@pytest.mark.parametrize("rows", [1, 7, 64, 97, 100, 130])
def test_calibration_batches_are_equal_and_cover_every_row_once(rows: int) -> None:
    x = np.arange(rows, dtype=np.float32).reshape(rows, 1)
    reader = calibration_batches(x, "input")
    batches = list(iter(reader.get_next, None))
    assert len({len(b["input"]) for b in batches}) == 1  # the histogram calibrators need this
    assert max(len(b["input"]) for b in batches) <= 64
    assert np.array_equal(np.concatenate([b["input"] for b in batches]), x)


@pytest.mark.parametrize("method", CALIBRATION_METHODS)
def test_every_method_calibrates_on_a_row_count_not_a_multiple_of_the_batch(
    fp32: tuple, tmp_path: Path, method: str
) -> None:
    prepared, onnx_path = fp32
    results = quantize(
        config(calibration_samples=100, calibration_method=method), onnx_path, prepared, tmp_path
    )
    assert results["calibration"] == {"method": method, "rows": 100}
    assert all(results[v]["status"] == "kept" for v in VARIANTS)
    assert all((tmp_path / f"{v}.onnx").is_file() for v in VARIANTS)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_a_training_split_smaller_than_calibration_samples_is_used_whole(
    fp32: tuple, tmp_path: Path, method: str
) -> None:
    prepared, onnx_path = fp32
    train_rows = len(split_inputs(prepared, "train", read_metadata(onnx_path)["preprocessing"])[0])
    assert train_rows % 64  # not a multiple of the old batch: the case that crashed
    cfg = config(
        calibration_samples=train_rows + 500, calibration_method=method, parity_min_agreement=1.0
    )
    results = quantize(cfg, onnx_path, prepared, tmp_path)
    assert results["calibration"]["rows"] == train_rows
    dropped = [results[v] for v in VARIANTS if results[v]["status"] == "dropped"]
    assert dropped  # the barely trained model misses a 100% gate in INT8
    for entry in dropped:
        if "calibration_method" in entry["reason"]:
            assert f"all {train_rows} rows of the training split" in entry["reason"]
            assert "more than" not in entry["reason"]  # advice that cannot help is not given


def test_an_empty_training_split_is_a_clear_error(fp32: tuple, tmp_path: Path) -> None:
    import shutil

    import pandas as pd

    prepared, onnx_path = fp32
    empty = shutil.copytree(prepared, tmp_path / "prepared")
    train = pd.read_parquet(empty / "train.parquet")
    train.iloc[:0].to_parquet(empty / "train.parquet", index=False)
    with pytest.raises(PipelineError, match=r"training split in .* has no rows to calibrate on"):
        quantize(config(), onnx_path, empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_advice_fits_the_variant_and_the_split() -> None:
    cfg = config(calibration_samples=512, calibration_method="entropy", parity_min_agreement=0.9)
    assert parity_miss("int8_cpu", 0.95, 270, cfg, 512) is None
    more = parity_miss("int8_cpu", 0.5, 270, cfg, 512)
    assert more == (
        "agrees with FP32 on 0.5000 of 270 test rows, below quantize.parity_min_agreement 0.9; "
        "try quantize.calibration_method minmax or percentile, or more than 512 "
        "quantize.calibration_samples"
    )
    small = parity_miss("int8_qdq", 0.5, 270, cfg, 300)
    assert small is not None and "all 300 rows of the training split" in small
    assert "more training data" in small and "more than" not in small
    fp16 = parity_miss("fp16", 0.5, 270, cfg, 512)
    assert fp16 is not None and "calibration_method" not in fp16


def roll_classes(path: Path) -> None:
    """Shift the last layer's rows by one class: a graph that runs but never agrees with FP32."""
    proto = onnx.load(str(path))
    for tensor in proto.graph.initializer:
        if tensor.dims and tensor.dims[0] == 10 and len(tensor.dims) <= 2:
            rolled = np.roll(numpy_helper.to_array(tensor), 1, axis=0)
            tensor.CopyFrom(numpy_helper.from_array(rolled, tensor.name))
    onnx.save(proto, str(path))


def test_a_variant_missing_parity_is_dropped_and_select_goes_on(
    fp32: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_uri: str
) -> None:
    prepared, onnx_path = fp32
    real_to_fp16 = quantize_module.to_fp16

    def broken_fp16(src: Path, dst: Path) -> None:
        real_to_fp16(src, dst)
        roll_classes(dst)

    monkeypatch.setattr(quantize_module, "to_fp16", broken_fp16)
    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["quantize"]["parity_min_agreement"] = 0.05
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out, metrics = tmp_path / "variants", tmp_path / "quantize.json"
    argv = ["--onnx", str(onnx_path), "--prepared", str(prepared), "--out", str(out)]
    quantize_module.main([*argv, "--metrics", str(metrics), "--name", "teacher"])  # no exit

    fp16 = read_json(metrics)["fp16"]
    assert fp16["status"] == "dropped" and fp16["argmax_agreement"] == 0.0
    assert fp16["reason"].startswith("agrees with FP32 on 0.0000 of 270 test rows")
    assert read_json(out / MANIFEST)["fp16"] == fp16
    kept = [v for v in VARIANTS if read_json(metrics)[v]["status"] == "kept"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, *(f"{v}.onnx" for v in kept)])
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "attributes.run_name = 'quantize@teacher'",
    )
    assert run.info.status == "FINISHED"
    assert run.data.tags["quantize.fp16.status"] == "dropped"
    assert run.data.tags["quantize.fp16.reason"] == fp16["reason"]

    cfg = tiny_params().select.model_copy(
        update={"latency_iters": 5, "throughput_iters": 2, "max_accuracy_drop": 1.0}
    )
    family = Family("teacher", prepared.parent / "model.pt", onnx_path, out)
    summary = select([family], None, prepared, tmp_path / "select", cfg)
    assert summary["winner"]["name"] != "teacher/onnxruntime-fp16"
    assert summary["dropped"] == {"teacher/onnxruntime-fp16": fp16["reason"]}
    table = (tmp_path / "select" / "candidates.md").read_text()
    row = next(line for line in table.splitlines() if "onnxruntime-fp16" in line)
    assert "(dropped)" in row and fp16["reason"] in row


def test_the_input_scaling_stays_float_in_every_variant(tmp_path: Path) -> None:
    """FP16 blocks the Scaler's nodes (raw values such as 1e4 lose digits in FP16); INT8
    quantizes no Sub or Div: in every variant the scaling reads float32 buffers and raw float32
    input, and the variants agree with FP32 on the raw test rows."""
    from pipelines.quantize import scaling_nodes
    from tests.helpers.modelzoo import tabular_params

    params = tabular_params(tmp_path)
    prepared, model = trained_model(tmp_path, params)
    export(params.export, model, prepared, tmp_path / "model.onnx")
    out = tmp_path / "variants"
    results = quantize(params.quantize, tmp_path / "model.onnx", prepared, out)
    for variant in VARIANTS:
        assert results[variant]["status"] == "kept", (variant, results[variant])
        proto = onnx.load(str(out / f"{variant}.onnx"))
        floats = {
            t.name: t.data_type for t in proto.graph.initializer if t.name.startswith("scaler.")
        }
        assert floats == {
            "scaler.shift": onnx.TensorProto.FLOAT,
            "scaler.scale": onnx.TensorProto.FLOAT,
        }, variant
        nodes = {n.name: n for n in proto.graph.node}
        sub = next(nodes[name] for name in scaling_nodes(proto) if nodes[name].op_type == "Sub")
        assert sub.input[0] == proto.graph.input[0].name, variant  # the raw input, no cast
