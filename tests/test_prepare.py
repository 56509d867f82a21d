from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.artifacts import read_json
from pipelines.config import Params, load_params
from pipelines.errors import DataSourceError
from pipelines.prepare import non_numeric_cells, prepare, read_split
from tests.helpers import REPO

TABLE = {
    "data.features": ["a", "b", "c"],
    "data.labels": ["cat", "dog"],
    "data.value_range": [0, 10],
    "data.image_shape": None,
    "train.model.arch": "mlp",
    "distill.model.arch": "mlp",
}


def table_params(source: str) -> Params:
    return load_params(REPO / "params.yaml", overrides={"data.source": source, **TABLE})


def user_table(rows: int = 200, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.uniform(0, 10, size=(rows, 3)), columns=["a", "b", "c"])
    frame["label"] = np.where(frame["a"] > 5, "cat", "dog")
    frame["row_id"] = range(rows)  # an extra column, not a feature
    return frame


def test_digits_default_splits_stratified_with_manifest(params: Params, tmp_path: Path) -> None:
    manifest = prepare(params.data, params.prepare, tmp_path, tmp_path / "out")
    sizes = {name: split["rows"] for name, split in manifest["splits"].items()}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    for name in ("val", "test"):  # stratified: every class in every held-out split, evenly
        counts = manifest["splits"][name]["class_counts"]
        assert len(counts) == 10 and max(counts.values()) - min(counts.values()) <= 2
    assert manifest["preprocessing"]["input_shape"] == [1, 8, 8]
    assert manifest["schema"]["label"] == "int64"
    assert read_json(tmp_path / "out" / "manifest.json") == manifest
    train = read_split(tmp_path / "out", "train")
    assert list(train.columns) == [*params.data.feature_columns, "label"]


def test_same_seed_same_split_other_seed_other_split(params: Params, tmp_path: Path) -> None:
    first = prepare(params.data, params.prepare, tmp_path, tmp_path / "a")
    again = prepare(params.data, params.prepare, tmp_path, tmp_path / "b")
    other = params.prepare.model_copy(update={"seed": 7})
    moved = prepare(params.data, other, tmp_path, tmp_path / "c")
    assert first["content_hash"] == again["content_hash"] != moved["content_hash"]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_user_table_is_a_params_change_only(tmp_path: Path, suffix: str) -> None:
    source = tmp_path / "data" / f"mine.{suffix}"
    source.parent.mkdir()
    frame = user_table()
    frame.to_csv(source, index=False) if suffix == "csv" else frame.to_parquet(source)
    params = table_params(f"data/mine.{suffix}")
    manifest = prepare(params.data, params.prepare, tmp_path, tmp_path / "out")
    assert sum(s["rows"] for s in manifest["splits"].values()) == 200
    assert manifest["source_sha256"] and manifest["preprocessing"]["input_shape"] == [3]
    assert "row_id" not in read_split(tmp_path / "out", "test").columns


def test_unreadable_sources_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.csv").write_text("")
    user_table().drop(columns="label").to_csv(tmp_path / "data" / "nolabel.csv", index=False)
    cases = {
        "data/absent.csv": "no such file",
        "data/empty.csv": "the file is empty",
        "data/nolabel.csv": "label column 'label' not found; columns are: a, b, c, row_id",
    }
    for source, message in cases.items():
        params = table_params(source)
        with pytest.raises(DataSourceError, match=message):
            prepare(params.data, params.prepare, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_tiny_class_falls_back_to_a_random_split(tmp_path: Path) -> None:
    frame = user_table()
    frame.loc[0, "label"] = "bird"  # one row: cannot be stratified; validate reports it
    (tmp_path / "data").mkdir()
    frame.to_csv(tmp_path / "data" / "t.csv", index=False)
    params = table_params("data/t.csv")
    manifest = prepare(params.data, params.prepare, tmp_path, tmp_path / "out")
    assert sum(s["rows"] for s in manifest["splits"].values()) == 200


# pandas' default NA tokens (read_csv's `na_values` documentation), and other text
NA_TOKENS = [
    *["#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN"],
    *["<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null", "-", "x"],
]


@pytest.mark.parametrize("token", NA_TOKENS)
def test_a_na_token_in_a_numeric_column_stays_text_with_its_source_row(
    tmp_path: Path, token: str
) -> None:
    (tmp_path / "data").mkdir()
    lines = ["a,b,c,label", "1,2,3,cat", f"4,{token},6,dog", "7,8,,cat"]
    (tmp_path / "data" / "t.csv").write_text("\n".join(lines) + "\n")
    params = table_params("data/t.csv")
    manifest = prepare(params.data, params.prepare, tmp_path, tmp_path / "out")
    assert manifest["non_numeric"] == {"b": {"count": 1, "examples": [token], "rows": [2]}}
    rows = pd.concat(read_split(tmp_path / "out", name) for name in ("train", "val", "test"))
    assert token in set(rows["b"]) and rows["c"].isna().sum() == 1  # only the empty cell


def test_numbers_in_text_columns_are_not_reported() -> None:
    frame = pd.DataFrame({"a": ["1", "2.5", None, "n/a"], "label": ["3", "4", "x", "5"]})
    found = non_numeric_cells(frame, ["a", "label", "absent"])
    assert found == {
        "a": {"count": 1, "examples": ["n/a"], "rows": [4]},
        "label": {"count": 1, "examples": ["x"], "rows": [3]},
    }


def test_numbers_stored_as_text_become_numbers(tmp_path: Path) -> None:
    """A Parquet file whose numeric columns are text: numbers downstream, nothing reported."""
    (tmp_path / "data").mkdir()
    frame = user_table().astype({"a": str})
    frame.to_parquet(tmp_path / "data" / "t.parquet")
    params = table_params("data/t.parquet")
    manifest = prepare(params.data, params.prepare, tmp_path, tmp_path / "out")
    assert manifest["non_numeric"] == {} and manifest["schema"]["a"] == "float64"


def test_learned_value_ranges_come_from_the_training_split_with_a_margin(tmp_path: Path) -> None:
    from pipelines.prepare import LEARN_MARGIN
    from tests.helpers.modelzoo import TABULAR_FEATURES, tabular_params

    params = tabular_params(tmp_path)
    result = prepare(params.data, params.prepare, tmp_path, tmp_path / "prepared")
    train = read_split(tmp_path / "prepared", "train")
    learned = result["learned_ranges"]
    for column in TABULAR_FEATURES:
        low, high = train[column].min(), train[column].max()
        margin = LEARN_MARGIN * (high - low)
        assert learned[column] == pytest.approx([low - margin, high + margin])
    spec = result["preprocessing"]
    assert spec["feature_ranges"] == [learned[c] for c in TABULAR_FEATURES]
    assert spec["value_range"] == [
        min(r[0] for r in spec["feature_ranges"]),
        max(r[1] for r in spec["feature_ranges"]),
    ]
    # tabular rows reach the model raw; the model scales them (standard: data.scaling auto)
    assert (spec["scaling"], spec["model_scaling"]) == ("none", "standard")
    assert read_json(tmp_path / "prepared" / "manifest.json") == result


def test_learning_ranges_of_a_feature_the_data_lacks_is_one_line_naming_it(
    tmp_path: Path,
) -> None:
    """`learn` with a configured feature that is not a column: DataSourceError naming it and the
    columns there are, no manifest (was a KeyError traceback)."""
    from tests.helpers.modelzoo import TABULAR_FEATURES, tabular_params

    params = tabular_params(tmp_path, **{"data.features": [*TABULAR_FEATURES[:-1], "extra_pct"]})
    with pytest.raises(DataSourceError, match=r"data.features: extra_pct: not a column") as info:
        prepare(params.data, params.prepare, tmp_path, tmp_path / "prepared")
    assert "\n" not in str(info.value) and "tiny" in str(info.value)
    assert not (tmp_path / "prepared").exists() or not any((tmp_path / "prepared").iterdir())


def test_the_digits_spec_keeps_its_pixel_scaling(tmp_path: Path) -> None:
    params = load_params(REPO / "params.yaml")
    spec = prepare(params.data, params.prepare, REPO, tmp_path)["preprocessing"]
    assert spec["scaling"] == "min-max to [0, 1] over value_range"
    assert (spec["model_scaling"], spec["feature_ranges"], spec["value_range"]) == (
        "none",
        None,
        [0.0, 16.0],
    )


INFINITE_CELLS = ["inf", "-inf", "Infinity", "1e999", "-Infinity"]


@pytest.mark.parametrize("learn", [False, True], ids=["fixed range", "learn"])
def test_infinite_csv_cells_are_rejected_by_prepare_naming_column_and_rows(
    tmp_path: Path, learn: bool
) -> None:
    """An `inf` cell once passed prepare and validate (learn: the range became [-inf, inf]) and
    training failed blaming the learning rate."""
    source = tmp_path / "data" / "mine.csv"
    source.parent.mkdir()
    frame = user_table().astype({"b": object, "c": object})
    for i, cell in enumerate(INFINITE_CELLS):
        frame.loc[10 * i + 3, "b"] = cell
    frame.loc[7, "c"] = "n/a"  # text in the same table: still validate's to report
    frame.loc[8, "c"] = "1e999"
    frame.to_csv(source, index=False)
    params = table_params("data/mine.csv")
    if learn:
        params = load_params(
            REPO / "params.yaml",
            overrides={"data.source": "data/mine.csv", **TABLE, "data.value_range": "learn"},
        )
    with pytest.raises(DataSourceError) as caught:
        prepare(params.data, params.prepare, tmp_path, tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message
    assert "column 'b' has 5 infinite value(s) (inf, -inf) at source row(s) 4, 14, 24, 34, 44" in (
        message
    )
    assert "column 'c' has 1 infinite value(s) (inf) at source row(s) 9" in message
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_infinite_parquet_floats_are_rejected_and_nan_is_a_null(tmp_path: Path) -> None:
    source = tmp_path / "data" / "mine.parquet"
    source.parent.mkdir()
    frame = user_table()
    frame.loc[[5, 6, 7, 8, 9, 10], "a"] = np.inf
    frame.loc[11, "a"] = -np.inf
    frame.to_parquet(source)
    params = table_params("data/mine.parquet")
    with pytest.raises(
        DataSourceError,
        match=r"column 'a' has 7 infinite value\(s\) \(inf, -inf\) "
        r"at source row\(s\) 6, 7, 8, 9, 10, \.\.\.; numbers must be finite",
    ):
        prepare(params.data, params.prepare, tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    frame.loc[[5, 6, 7, 8, 9, 10, 11], "a"] = np.nan  # NaN: a null, which validate reports
    frame.to_parquet(source)
    manifest = prepare(params.data, params.prepare, tmp_path, tmp_path / "out")
    assert manifest["non_numeric"] == {}


def test_learned_ranges_are_finite() -> None:
    from pipelines.prepare import learn_ranges

    train = pd.DataFrame({"a": [1.0, 2.0, np.inf, -np.inf, np.nan], "b": [np.inf] * 5})
    assert learn_ranges(train, ["a", "b"]) == {"a": [-1.0, 4.0], "b": [0.0, 0.0]}


def test_prepare_cli_exits_2_with_one_line_on_an_infinite_cell(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    (tmp_path / "data").mkdir()
    frame = user_table().astype({"a": object})
    frame.loc[0, "a"] = "Infinity"
    frame.to_csv(tmp_path / "data" / "mine.csv", index=False)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"].update(
        source="data/mine.csv",
        features=["a", "b", "c"],
        labels=["cat", "dog"],
        value_range=[0, 10],
        image_shape=None,
    )
    raw["train"]["model"]["arch"] = raw["distill"]["model"]["arch"] = "mlp"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.prepare",
            "--params",
            "params.yaml",
            "--out",
            "out",
            "--metrics",
            "m.json",
        ],
        cwd=tmp_path,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **__import__("os").environ,
            "PYTHONPATH": str(REPO),
            "MLFLOW_TRACKING_URI": (f"sqlite:///{tmp_path / 'mlflow.db'}"),
        },
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "column 'a' has 1 infinite value(s) (inf) at source row(s) 1" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()
