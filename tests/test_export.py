from pathlib import Path

import numpy as np
import pytest

from pipelines.config import Params
from pipelines.errors import ParityError
from pipelines.export import export, verify_onnx
from pipelines.runtime import read_metadata, session
from tests.helpers.modelzoo import tamper, trained_model
from tests.helpers.params import tiny_params


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Params, Path, Path, Path]:
    root = tmp_path_factory.mktemp("export")
    params = tiny_params()
    prepared, model = trained_model(root, params)
    out = root / "model.onnx"
    export(params.export, model, prepared, out)
    return params, prepared, model, out


def test_export_has_a_dynamic_batch_axis_and_describes_itself(exported: tuple) -> None:
    *_, out = exported
    sess = session(out)
    name = sess.get_inputs()[0].name
    for batch in (1, 33):
        assert sess.run(None, {name: np.zeros((batch, 1, 8, 8), np.float32)})[0].shape == (
            batch,
            10,
        )
    meta = read_metadata(out)
    assert meta["labels"] == list(range(10)) and meta["input_shape"] == [1, 8, 8]
    assert meta["precision"] == "fp32" and meta["preprocessing"]["value_range"] == [0.0, 16.0]


def test_export_records_parity_within_the_gate(exported: tuple, tmp_path: Path) -> None:
    params, prepared, model, _ = exported
    metrics = export(params.export, model, prepared, tmp_path / "again.onnx")
    assert metrics["max_abs_diff"] <= params.export.parity_max_abs_diff
    assert metrics["argmax_agreement"] >= params.export.parity_min_agreement
    assert metrics["test_rows"] == 270


def test_parity_gate_fails_on_a_tampered_graph(exported: tuple, tmp_path: Path) -> None:
    import torch

    from pipelines.export import test_inputs
    from pipelines.models import load_model

    params, prepared, model_path, out = exported
    model, meta = load_model(model_path)
    x = test_inputs(prepared, meta["preprocessing"])
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    assert verify_onnx(out, x, reference, params.export)["argmax_agreement"] == 1.0
    tamper(out, tmp_path / "tampered.onnx")
    with pytest.raises(ParityError, match=r"parity gate failed: max \|logit diff\|"):
        verify_onnx(tmp_path / "tampered.onnx", x, reference, params.export)


def test_failed_gate_leaves_no_file(exported: tuple, tmp_path: Path) -> None:
    params, prepared, model, _ = exported
    strict = params.export.model_copy(update={"parity_max_abs_diff": 1e-30})
    with pytest.raises(ParityError):
        export(strict, model, prepared, tmp_path / "strict.onnx")
    assert list(tmp_path.iterdir()) == []


def test_gate_error_names_the_output_and_outputs_have_the_normal_mode(
    exported: tuple, tmp_path: Path
) -> None:
    import stat

    params, prepared, model, _ = exported
    strict = params.export.model_copy(update={"parity_max_abs_diff": 1e-30})
    out = tmp_path / "strict.onnx"
    with pytest.raises(ParityError) as caught:
        export(strict, model, prepared, out)
    assert str(caught.value).startswith("strict.onnx vs PyTorch: parity gate failed")
    assert ".tmp" not in str(caught.value)
    export(params.export, model, prepared, out)
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)


def test_export_is_byte_identical_and_holds_no_path_of_the_environment(
    exported: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    params, prepared, model, out = exported
    raw = out.read_bytes()
    for path in {sys.prefix, sys.base_prefix, str(Path.cwd()), "site-packages", "dist-packages"}:
        assert path.encode() not in raw, path
    assert read_metadata(out)["precision"] == "fp32"  # the project's own metadata is kept
    elsewhere = tmp_path / "another" / "checkout"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    again = elsewhere / "model.onnx"
    export(params.export, model.resolve(), prepared.resolve(), again)
    assert again.read_bytes() == raw


def test_a_tabular_model_exports_with_its_scaling_and_takes_raw_values(tmp_path: Path) -> None:
    """The scaling fitted on the training split is in the graph (the Scaler's buffers as
    initializers): ONNX Runtime on raw feature rows gives the PyTorch model's logits."""
    import onnx
    import torch

    from pipelines.export import test_inputs
    from pipelines.models import load_model
    from tests.helpers.modelzoo import tabular_params

    params = tabular_params(tmp_path)
    prepared, model_path = trained_model(tmp_path, params)
    out = tmp_path / "model.onnx"
    metrics = export(params.export, model_path, prepared, out)
    assert metrics["max_abs_diff"] <= params.export.parity_max_abs_diff
    proto = onnx.load(str(out))
    names = {tensor.name for tensor in proto.graph.initializer}
    assert {"scaler.shift", "scaler.scale"} <= names
    model, meta = load_model(model_path)
    x = test_inputs(prepared, meta["preprocessing"])
    assert x.shape[1:] == (4,) and float(np.abs(x).max()) > 1000  # raw values go in
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    sess = session(out)
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    assert np.abs(got - expected).max() <= 1e-4
