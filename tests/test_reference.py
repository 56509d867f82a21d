"""The reference profile (issue 16): what `select` writes beside the winner and `load_reference`
reads back, for tabular data and for a folder of images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.artifacts import write_json
from pipelines.config import load_params
from pipelines.errors import ReferenceProfileError
from pipelines.prepare import prepare, read_manifest, read_split
from pipelines.reference import (
    FEATURES,
    IMAGE_STATS,
    META,
    REFERENCE,
    build_reference,
    image_statistics,
    label_distribution,
    load_reference,
)
from tests.helpers import REPO
from tests.helpers.images import write_digit_folder


def first_class(x: np.ndarray) -> np.ndarray:
    """A stand-in engine: logits that always pick class 0 for rows whose first value is 0,
    else class 1."""
    out = np.zeros((len(x), 10), np.float32)
    picked = (x.reshape(len(x), -1)[:, 0] != 0).astype(int)
    out[np.arange(len(x)), picked] = 1.0
    return out


def test_tabular_profile_is_a_seeded_sample_of_train_rows_and_the_test_predictions(
    prepared: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(prepared)
    spec = manifest["preprocessing"]
    folder = build_reference(prepared, spec, first_class, tmp_path / "a", rows=100, seed=3)
    again = build_reference(prepared, spec, first_class, tmp_path / "b", rows=100, seed=3)
    assert folder == tmp_path / "a" / REFERENCE
    ref = load_reference(folder)
    assert ref.features == spec["feature_columns"] and ref.kind == "tabular"
    assert ref.rows == 100 and list(ref.frame.columns) == ref.features
    assert ref.labels == manifest["labels"]
    train = read_split(prepared, "train")[ref.features]
    merged = ref.frame.merge(train.drop_duplicates(), how="left", indicator=True)
    assert (merged["_merge"] == "both").all()  # every profile row is a training row
    pd.testing.assert_frame_equal(ref.frame, load_reference(again).frame)  # seeded
    test = read_split(prepared, "test")
    share_one = float((test[spec["feature_columns"][0]] != 0).mean())
    assert ref.predicted_label_distribution["1"] == pytest.approx(share_one, abs=1e-6)
    assert sum(ref.predicted_label_distribution.values()) == pytest.approx(1.0)
    everything = build_reference(prepared, spec, first_class, tmp_path / "c", 10**6, seed=3)
    assert load_reference(everything).rows == len(train)  # capped by the split's size


def test_image_profile_holds_the_four_image_statistics(tmp_path: Path) -> None:
    write_digit_folder(tmp_path / "data/raw/digits", per_class=6, size=24)
    overrides = {
        "data.source": "data/raw/digits",
        "data.image_shape": [8, 8],
        "data.channels": 1,
        "data.features": {"prefix": "px_", "count": 64},
        "data.value_range": [0.0, 1.0],
    }
    params = load_params(REPO / "params.yaml", overrides=overrides)
    prepared = tmp_path / "prepared"
    prepare(params.data, params.prepare, tmp_path, prepared)
    spec = read_manifest(prepared)["preprocessing"]
    ref = load_reference(build_reference(prepared, spec, first_class, tmp_path, 1000, 0))
    train = read_split(prepared, "train")
    assert ref.kind == "image" and ref.features == list(IMAGE_STATS) and ref.rows == len(train)
    assert set(ref.frame["width"]) == {24} and set(ref.frame["height"]) == {24}
    first = train.iloc[0][spec["feature_columns"]].to_numpy(np.float64)
    expected = image_statistics(first, spec["value_range"], 24, 24)
    assert ref.frame.iloc[0].to_dict() == pytest.approx(expected)
    assert ref.frame["mean"].min() > 0 and ref.frame["std"].max() < 1


def test_image_statistics_map_pixels_to_the_unit_range() -> None:
    pixels = np.array([[0.0, 16.0], [16.0, 0.0]])
    stats = image_statistics(pixels, [0, 16], 640, 480)
    assert stats == {"mean": 0.5, "std": 0.5, "width": 640, "height": 480}


def test_label_distribution_names_every_label() -> None:
    assert label_distribution(np.array([0, 0, 2, 0]), ["a", "b", "c"]) == {
        "a": 0.75,
        "b": 0.0,
        "c": 0.25,
    }


def test_a_missing_or_malformed_profile_names_its_file(tmp_path: Path) -> None:
    with pytest.raises(ReferenceProfileError, match=r"reference\.json: no such file"):
        load_reference(tmp_path)
    write_json(tmp_path / META, {"features": ["a"]})
    pd.DataFrame({"a": [1.0]}).to_parquet(tmp_path / FEATURES)
    with pytest.raises(ReferenceProfileError, match=r"reference\.json: not a reference profile"):
        load_reference(tmp_path)
    meta = {"features": ["a", "b"], "labels": [0], "predicted_label_distribution": {"0": 1.0}}
    write_json(tmp_path / META, meta)
    with pytest.raises(ReferenceProfileError, match=r"features\.parquet: no column\(s\) \['b'\]"):
        load_reference(tmp_path)
