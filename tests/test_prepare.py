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
