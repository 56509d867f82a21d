"""The `validate` gate: each kind of bad data is caught with a message a user can act on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.artifacts import read_json, write_json
from pipelines.config import Params, load_params, section_dict
from pipelines.errors import DataSourceError, DataValidationError
from pipelines.prepare import manifest, prepare
from pipelines.validate import main, validate

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TABULAR = {
    "data.source": "data/raw.csv",
    "train.model.arch": "mlp",
    "distill.model.arch": "mlp",
    "data.features": ["a", "b"],
    "data.labels": [0, 1],
    "data.value_range": [0, 10],
    "data.image_shape": None,
    "validate.min_rows_per_class": 5,
}


def table(rows: int = 40) -> pd.DataFrame:
    """Clean two-feature data: in range, no duplicate rows, two balanced classes."""
    i = np.arange(rows)
    return pd.DataFrame({"a": i * 10 / rows, "b": (i * 7) % 11, "label": i % 2})


def tabular_params(**overrides: Any) -> Params:
    return load_params(PARAMS, overrides={**TABULAR, **overrides})


def prepared(tmp_path: Path, frame: pd.DataFrame, **overrides: Any) -> tuple[Params, Path]:
    """Write `frame` as data/raw.csv and run the real `prepare` on it."""
    (tmp_path / "data").mkdir(exist_ok=True)
    frame.to_csv(tmp_path / "data" / "raw.csv", index=False)
    params = tabular_params(**overrides)
    prepare(params.data, params.prepare, tmp_path, tmp_path / "prepared")
    return params, tmp_path / "prepared"


def failure(params: Params, prepared_dir: Path, docs_dir: Path) -> list[str]:
    """The lines of the gate's error (header first); Data Docs must exist all the same."""
    with pytest.raises(DataValidationError) as info:
        validate(params.data, params.validate_, prepared_dir, docs_dir)
    assert (docs_dir / "index.html").is_file()
    assert read_json(docs_dir / "summary.json")["success"] is False
    message = str(info.value)
    assert "Traceback" not in message
    return message.splitlines()


def test_digits_default_passes_and_writes_data_docs(tmp_path: Path) -> None:
    params = load_params(PARAMS)
    prepare(params.data, params.prepare, tmp_path, tmp_path / "prepared")
    summary = validate(params.data, params.validate_, tmp_path / "prepared", tmp_path / "docs")
    assert summary["success"] is True
    assert summary["failed"] == 0
    assert summary["evaluated"] == summary["successful"] > 4 * 64
    assert summary["docs_index"] == str(tmp_path / "docs" / "index.html")
    assert (tmp_path / "docs" / "index.html").is_file()
    checks = {r["check"] for r in summary["results"]}
    assert {
        "min rows per class",
        "class imbalance",
        "duplicate rows",
        "train/test leakage",
    } <= checks
    assert len(list((tmp_path / "docs" / "validations").rglob("*.html"))) == 3


def test_null_value(tmp_path: Path) -> None:
    frame = table()
    frame.loc[3, "a"] = np.nan
    lines = failure(*prepared(tmp_path, frame), tmp_path / "docs")
    assert lines[0].startswith("data validation failed: 1 of ")
    assert (
        lines[1].strip()
        == "expect_column_values_to_not_be_null on 'a': 1 of 40 rows unexpected (null)"
    )


def test_out_of_range_value(tmp_path: Path) -> None:
    frame = table()
    frame.loc[5, "b"] = 99
    lines = failure(*prepared(tmp_path, frame), tmp_path / "docs")
    assert len(lines) == 2
    assert "expect_column_values_to_be_between on 'b': 1 of 40 rows unexpected" in lines[1]
    assert "outside [0.0, 10.0]; e.g. 99" in lines[1]


def test_unknown_label(tmp_path: Path) -> None:
    frame = table()
    frame.loc[7, "label"] = 5
    lines = failure(*prepared(tmp_path, frame), tmp_path / "docs")
    assert len(lines) == 2
    assert "expect_column_values_to_be_in_set on 'label': 1 of 40 rows unexpected" in lines[1]
    assert "not in data.labels; e.g. 5" in lines[1]


def test_missing_column_is_named_without_a_cascade(tmp_path: Path) -> None:
    lines = failure(*prepared(tmp_path, table().drop(columns="b")), tmp_path / "docs")
    assert lines[1].strip() == "expect_column_to_exist on 'b': the column is missing from the data"
    assert len(lines) == 3  # header, the missing column, one line for what could not run
    assert "could not run" in lines[2]
    assert "because of missing column(s) 'b'" in lines[2]


def test_non_numeric_column(tmp_path: Path) -> None:
    frame = table().astype({"b": object})
    frame.loc[2, "b"] = "x"
    lines = failure(*prepared(tmp_path, frame), tmp_path / "docs")
    # pandas 3 reads text as a `str` column; pandas 2 as `object`, checked value by value
    assert lines[1].strip().startswith("expect_column_values_to_be_in_type_list on 'b': ")
    assert "not numeric" in lines[1]
    assert len(lines) <= 3  # what cannot run on text values is one folded line at most


# pandas' default NA tokens (read_csv's `na_values` documentation), and other text
NA_TOKENS = [
    *["#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN"],
    *["<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null", "-", "x"],
]


def test_text_in_a_numeric_column_is_non_numeric_not_null(tmp_path: Path) -> None:
    frame = table().astype({"a": object})
    for row, token in enumerate(NA_TOKENS):
        frame.loc[2 * row, "a"] = token
    frame.loc[1, "a"] = None  # a real empty cell: still a null
    lines = [line.strip() for line in failure(*prepared(tmp_path, frame), tmp_path / "docs")]
    type_line = next(line for line in lines if "in_type_list on 'a'" in line)
    count = len(NA_TOKENS)
    assert f"{count} of 40 rows unexpected (not numeric; e.g. '#N/A', '#N/A N/A'" in type_line
    assert type_line.endswith("; source rows 1, 3, 5, 7, 9, ...)")
    assert "expect_column_values_to_not_be_null on 'a': 1 of 40 rows unexpected (null)" in lines


def test_header_only_csv_has_no_rows(tmp_path: Path) -> None:
    lines = failure(*prepared(tmp_path, table().iloc[:0]), tmp_path / "docs")
    assert "expect_table_row_count_to_be_between: 0 rows, need >= 1" in lines[1]
    assert "min rows per class: label 0 has 0 rows, need >= 5" in [x.strip() for x in lines]


def test_zero_byte_file_is_rejected_by_prepare(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw.csv").write_bytes(b"")
    params = tabular_params()
    with pytest.raises(DataSourceError, match="empty"):
        prepare(params.data, params.prepare, tmp_path, tmp_path / "prepared")


def test_too_few_rows_of_one_class(tmp_path: Path) -> None:
    frame = table()
    frame["label"] = [0] * 37 + [1] * 3
    lines = failure(*prepared(tmp_path, frame), tmp_path / "docs")
    stripped = [line.strip() for line in lines]
    assert "min rows per class: label 1 has 3 rows, need >= 5" in stripped
    assert any(
        line.startswith("class imbalance: the largest class has 12.33x") for line in stripped
    )


def test_duplicate_rows(tmp_path: Path) -> None:
    frame = pd.concat([table(), table().iloc[:2]], ignore_index=True)
    lines = failure(*prepared(tmp_path, frame), tmp_path / "docs")
    assert any(line.strip().startswith("duplicate rows: 4 of 42 rows share") for line in lines)


def test_train_test_leakage(tmp_path: Path) -> None:
    params = tabular_params(**{"validate.max_duplicate_fraction": 0.2})
    frame = table()
    splits = {"train": frame.iloc[:28], "val": frame.iloc[28:34], "test": frame.iloc[34:]}
    splits["test"] = pd.concat([splits["test"], frame.iloc[[0, 5]]], ignore_index=True)
    out = tmp_path / "prepared"
    for name, part in splits.items():
        out.mkdir(exist_ok=True)
        part.to_parquet(out / f"{name}.parquet", index=False)
    write_json(out / "manifest.json", manifest(params.data, splits, None))
    lines = failure(params, out, tmp_path / "docs")
    assert [line.strip() for line in lines[1:]] == [
        "train/test leakage: 2 test rows identical to train rows"
    ]


def test_cli_fails_writes_summary_and_logs_to_mlflow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = table()
    frame.loc[3, "a"] = np.nan
    params, _ = prepared(tmp_path, frame)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(section_dict(params)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLOPS_PARENT_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = ["--prepared", "prepared", "--docs", "docs", "--metrics", "metrics/validate.json"]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code != 0
    assert "expect_column_values_to_not_be_null on 'a'" in capsys.readouterr().err
    summary = read_json(tmp_path / "metrics" / "validate.json")
    assert summary["success"] is False
    assert summary["failed"] == 1
    assert_failed_run_with_docs(uri)


def assert_failed_run_with_docs(uri: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("digits")
    assert experiment is not None
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`mlops.stage` = 'validate'"
    )
    assert [run.info.status for run in runs] == ["FAILED"]
    run_id = runs[0].info.run_id
    assert client.get_metric_history(run_id, "expectations_failed")[0].value == 1
    docs = {Path(a.path).name for a in client.list_artifacts(run_id, "data_docs")}
    assert {"index.html", "summary.json"} <= docs


def test_learned_and_per_feature_ranges_are_the_contract(tmp_path: Path) -> None:
    """`value_range: learn`: the ranges prepare recorded from the training split; a test value
    far outside its own column's range fails, naming the column and that range."""
    from tests.helpers.modelzoo import tabular_params

    params = tabular_params(tmp_path)
    prepared = tmp_path / "prepared"
    result = prepare(params.data, params.prepare, tmp_path, prepared)
    test = pd.read_parquet(prepared / "test.parquet")
    test.loc[0, "unit"] = 1000.0  # inside every other column's range, not in `unit`'s
    test.to_parquet(prepared / "test.parquet", index=False)
    with pytest.raises(DataValidationError) as info:
        validate(params.data, params.validate_, prepared, tmp_path / "docs")
    low, high = result["learned_ranges"]["unit"]
    assert "on 'unit': 1 of" in str(info.value)
    assert f"outside [{low}, {high}]" in str(info.value)


def test_infinite_prepared_values_fail_the_learned_range(tmp_path: Path) -> None:
    """Prepared splits holding inf (written before prepare rejected it): the learned ranges are
    finite, so the gate names the column instead of passing [-inf, inf]."""
    from pipelines.prepare import learn_ranges

    params = tabular_params(**{"data.value_range": "learn"})
    (tmp_path / "data").mkdir()
    table().to_csv(tmp_path / "data" / "raw.csv", index=False)
    prepared_dir = tmp_path / "prepared"
    prepare(params.data, params.prepare, tmp_path, prepared_dir)
    train = pd.read_parquet(prepared_dir / "train.parquet")
    train.loc[0, "a"] = np.inf
    train.to_parquet(prepared_dir / "train.parquet", index=False)
    assert all(np.isfinite(learn_ranges(train, ["a", "b"])["a"]))
    result = read_json(prepared_dir / "manifest.json")
    result["learned_ranges"] = learn_ranges(train, ["a", "b"])
    write_json(prepared_dir / "manifest.json", result)
    lines = failure(params, prepared_dir, tmp_path / "docs")
    assert any("expect_column_values_to_be_between on 'a': 1 of 40 rows" in x for x in lines)


def test_nan_from_a_parquet_source_is_a_null(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    frame = table()
    frame.loc[[3, 4], "b"] = np.nan
    frame.to_parquet(tmp_path / "data" / "raw.parquet")
    params = tabular_params(**{"data.source": "data/raw.parquet"})
    prepare(params.data, params.prepare, tmp_path, tmp_path / "prepared")
    lines = [x.strip() for x in failure(params, tmp_path / "prepared", tmp_path / "docs")]
    assert "expect_column_values_to_not_be_null on 'b': 2 of 40 rows unexpected (null)" in lines


def test_unknown_labels_are_quoted_once_each(tmp_path: Path) -> None:
    """The examples once repeated a value (`e.g. 'two', 'two', ...`): distinct values only."""
    frame = table().astype({"label": object})
    for row in (1, 3, 5, 9):
        frame.loc[row, "label"] = "two"
    frame.loc[7, "label"] = "three"
    lines = [x.strip() for x in failure(*prepared(tmp_path, frame), tmp_path / "docs")]
    in_set = next(x for x in lines if x.startswith("expect_column_values_to_be_in_set on 'label'"))
    assert "5 of 40 rows unexpected (not in data.labels; e.g. 'two', 'three')" in in_set, in_set
