from pathlib import Path

import pytest

from pipelines.config import apply_overrides, load_params
from pipelines.errors import ParamsError
from tests.conftest import REPO


def test_params_yaml_loads_into_frozen_models() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.train.model.arch in {"cnn", "mlp"}
    assert len(params.data.feature_columns) == 64
    with pytest.raises(ValueError, match="frozen"):
        params.train.epochs = 1  # type: ignore[misc]


def test_unknown_key_names_the_key_and_the_allowed_keys() -> None:
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", overrides={"train.epoch": 3})
    message = str(info.value)
    assert "train.epoch: unknown key" in message
    assert "epochs" in message and "batch_size" in message


def test_bad_value_names_the_key_and_the_allowed_values() -> None:
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", overrides={"train.scheduler": "step"})
    assert "train.scheduler" in str(info.value)
    assert "'cosine' or 'constant'" in str(info.value)
    assert "got 'step'" in str(info.value)


def test_unregistered_architecture_lists_registered_ones() -> None:
    with pytest.raises(
        ParamsError, match=r"train\.model\.arch: .*'resnet' is not registered; allowed: mlp, cnn"
    ):
        load_params(REPO / "params.yaml", overrides={"train.model.arch": "resnet"})


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(ParamsError) as info:
        load_params(REPO / "params.yaml", overrides={"train.lr": -1, "prepare.val_fraction": 2})
    assert "train.lr" in str(info.value) and "prepare.val_fraction" in str(info.value)


def test_image_shape_must_match_feature_count() -> None:
    with pytest.raises(ParamsError, match="image_shape: 4x4=16 does not match 64"):
        load_params(REPO / "params.yaml", overrides={"data.image_shape": [4, 4]})


def test_missing_key_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        (REPO / "params.yaml").read_text().replace("  epochs: ", "  #")
    )
    with pytest.raises(ParamsError, match=r"train\.epochs: required key is missing"):
        load_params(tmp_path / "p.yaml")
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "absent.yaml")


def test_source_must_be_builtin_or_a_table() -> None:
    with pytest.raises(ParamsError, match="neither a built-in source"):
        load_params(REPO / "params.yaml", overrides={"data.source": "data/raw/x.xlsx"})


def test_overrides_merge_nested_and_dotted_keys() -> None:
    raw = {"train": {"model": {"arch": "cnn", "width": 32}, "epochs": 3}}
    merged = apply_overrides(raw, {"train": {"model": {"width": 8}}, "train.epochs": 5})
    assert merged == {"train": {"model": {"arch": "cnn", "width": 8}, "epochs": 5}}
    assert raw["train"]["epochs"] == 3
