"""Prepared data that does not fit the params or the model: every stage that turns prepared rows
into model input exits 2 with one `error:` line (no traceback), naming what is wrong."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

import pipelines.distill
import pipelines.evaluate
import pipelines.export
import pipelines.quantize
import pipelines.train
from pipelines.artifacts import read_json, write_json
from pipelines.cli import EXIT_REJECTED
from tests.helpers import REPO
from tests.helpers.modelzoo import trained_model

TEXT_COLUMN = "px_3"  # the fourth feature column of the built-in digits


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained model and its ONNX export, with two broken copies of its prepared data: one with
    text in a feature column (all splits), one with 4 feature columns instead of 64."""
    from pipelines.export import export
    from tests.helpers.params import tiny_params

    root = tmp_path_factory.mktemp("mismatch")
    params = tiny_params()
    prepared, model = trained_model(root, params)
    export(params.export, model, prepared, root / "model.onnx")
    text, narrow = root / "text", root / "narrow"
    shutil.copytree(prepared, text)
    shutil.copytree(prepared, narrow)
    manifest = read_json(prepared / "manifest.json")
    column = manifest["feature_columns"][3]
    assert column == TEXT_COLUMN
    for name in ("train", "val", "test"):
        frame = pd.read_parquet(text / f"{name}.parquet")
        frame[column] = frame[column].astype(str)
        frame.loc[frame.index[1], column] = "n/a"
        frame.to_parquet(text / f"{name}.parquet")
    few = manifest["feature_columns"][:4]
    for name in ("train", "val", "test"):
        frame = pd.read_parquet(narrow / f"{name}.parquet")
        frame[[*few, manifest["label_column"]]].to_parquet(narrow / f"{name}.parquet")
    manifest["feature_columns"] = few
    manifest["preprocessing"] = {**manifest["preprocessing"], "feature_columns": few}
    manifest["preprocessing"].update(input_shape=[4], image_shape=None)
    write_json(narrow / "manifest.json", manifest)
    return {"model": model, "onnx": root / "model.onnx", "text": text, "narrow": narrow}


TRAINING = ["--model", "{out}/new.pt", "--checkpoint-dir", "{out}/ck", "--plots", "{out}/p.csv"]
CASES = {
    "train text": (pipelines.train, "text", TRAINING),
    "distill text": (pipelines.distill, "text", ["--teacher", "{model}", *TRAINING]),
    "evaluate narrow": (pipelines.evaluate, "narrow", ["--model", "{model}", "--plots", "{out}/p"]),
    "evaluate text": (pipelines.evaluate, "text", ["--model", "{model}", "--plots", "{out}/p"]),
    "export narrow": (pipelines.export, "narrow", ["--model", "{model}", "--out", "{out}/m.onnx"]),
    "export text": (pipelines.export, "text", ["--model", "{model}", "--out", "{out}/m.onnx"]),
    "quantize narrow": (pipelines.quantize, "narrow", ["--onnx", "{onnx}", "--out", "{out}/v"]),
    "quantize text": (pipelines.quantize, "text", ["--onnx", "{onnx}", "--out", "{out}/v"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_stage_on_mismatched_prepared_data_exits_2_with_one_error_line(
    case: str,
    zoo: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    mlflow_uri: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    module, data, extra = CASES[case]
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    fill = {"out": tmp_path, "model": zoo["model"], "onnx": zoo["onnx"]}
    argv = ["--prepared", str(zoo[data]), "--metrics", str(tmp_path / "m.json")]
    argv += [arg.format(**fill) for arg in extra]
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    assert exit_info.value.code == EXIT_REJECTED == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    if data == "text":
        assert f"column '{TEXT_COLUMN}'" in errors[0] and "'n/a'" in errors[0]
        assert "run validate" in errors[0]
    else:
        assert "expects 64 feature columns" in errors[0] and "data has 4" in errors[0]
        assert str(zoo[data]) in errors[0]
        assert str(zoo["onnx" if module is pipelines.quantize else "model"]) in errors[0]
