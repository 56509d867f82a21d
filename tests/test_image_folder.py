"""A folder of images as the data set (issue 12, part 2): prepare's file list and
content-addressed split, validate's file checks, training batches from the files, and the one
decoding shared by training, evaluation and serving."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipelines.config import load_params
from pipelines.errors import CheckpointError, ParamsError
from pipelines.prepare import prepare, read_files, read_manifest, read_split
from tests.helpers import REPO
from tests.helpers.images import write_digit_folder
from tests.helpers.params import image_folder_params

SOURCE = "data/raw/digits"


# 20 images a class in most tests (validate's default floor is 20 over all splits).
folder_params = partial(image_folder_params, {"validate.min_rows_per_class": 5}, source=SOURCE)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project root with data/raw/digits: 10 classes x 20 images (PNG and JPEG) at 32x32."""
    base = tmp_path_factory.mktemp("images")
    write_digit_folder(base / SOURCE, per_class=20, size=32)
    return base


@pytest.fixture(scope="module")
def prepared(root: Path) -> Path:
    params = folder_params()
    out = root / "prepared"
    prepare(params.data, params.prepare, root, out)
    return out


def test_prepare_lists_every_file_and_splits_by_content(root: Path, prepared: Path) -> None:
    files = read_files(prepared)
    assert list(files.columns) == [
        "path", "label", "sha256", "width", "height", "mode", "error", "split"
    ]  # fmt: skip
    assert len(files) == 200 and files["error"].isna().all()
    assert set(files["mode"]) == {"L"} and set(files["width"]) == {32}
    assert {Path(p).suffix for p in files["path"]} == {".png", ".jpg"}
    # Stratified: per class round(20 * 0.15) = 3 test and 3 val files.
    counts = files.groupby(["label", "split"]).size().unstack()
    assert (counts["test"] == 3).all() and (counts["val"] == 3).all()
    manifest = read_manifest(prepared)
    assert manifest["preprocessing"]["input_shape"] == [1, 16, 16]
    assert manifest["image_folder"] == {"root": SOURCE, "files": 200, "broken": 0}
    test = read_split(prepared, "test")
    assert set(test["path"]) == set(files.loc[files["split"] == "test", "path"])

    # Content addressed: renamed files and another folder name give the same split per content.
    moved = root / "data/raw/renamed"
    shutil.copytree(root / SOURCE, moved)
    for path in sorted(moved.rglob("*.*")):
        path.rename(path.with_name(f"x-{path.name}"))
    params = folder_params(**{"data.source": "data/raw/renamed"})
    again = prepare(params.data, params.prepare, root, root / "prepared-renamed")
    by_content = read_files(root / "prepared-renamed").set_index("sha256")["split"]
    assert by_content.sort_index().equals(files.set_index("sha256")["split"].sort_index())
    assert again["content_hash"] != manifest["content_hash"]  # paths are part of the rows
    # ... and a rerun writes the same splits.
    prepare(params.data, params.prepare, root, root / "prepared-again")
    for name in ("train", "val", "test"):
        pd.testing.assert_frame_equal(
            read_split(root / "prepared-again", name), read_split(root / "prepared-renamed", name)
        )


def test_identical_files_land_in_the_same_split(tmp_path: Path) -> None:
    write_digit_folder(tmp_path / SOURCE, per_class=20, size=32, classes=2)
    for label in ("0", "1"):
        first = sorted((tmp_path / SOURCE / label).glob("*.png"))[0]
        for i in range(3):
            shutil.copy(first, first.with_name(f"copy-{i}.png"))
    params = folder_params(**{"data.labels": [0, 1]})
    prepare(params.data, params.prepare, tmp_path, tmp_path / "prepared")
    files = read_files(tmp_path / "prepared")
    assert (files.groupby("sha256")["split"].nunique() == 1).all()


def test_serving_decodes_a_file_as_training_evaluation_does(root: Path, prepared: Path) -> None:
    """service.predict_image's calls (image_to_rows, then to_model_input) against the rows
    training validates on (prepare's decoded rows through split_arrays) and the training batches
    without augmentation: the same tensor, for PNG and JPEG files."""
    from pipelines.preprocessing import image_to_rows, to_model_input
    from pipelines.training.data import load_data, split_arrays

    manifest = read_manifest(prepared)
    spec = manifest["preprocessing"]
    val = read_split(prepared, "val")
    x_val, _ = split_arrays(val, manifest, "val")
    for i, path in enumerate(val["path"]):
        served = to_model_input(image_to_rows((root / SOURCE / path).read_bytes(), spec), spec)
        np.testing.assert_array_equal(served[0], x_val[i], err_msg=path)
    assert {Path(p).suffix for p in val["path"]} == {".png", ".jpg"}

    data = load_data(prepared, manifest, root=root)
    assert data.train_images is not None
    x, y = data.train_images[torch.arange(len(data.y_train))]
    torch.testing.assert_close(x, data.x_train, rtol=0, atol=0)
    torch.testing.assert_close(y, data.y_train)


def test_rgb_folders_decode_to_three_channels(tmp_path: Path) -> None:
    from PIL import Image

    from pipelines.preprocessing import decode_image, image_to_rows, make_spec, to_model_input

    columns = [f"px_{i}" for i in range(3 * 4 * 4)]
    spec = make_spec(columns, [(0, 1)] * len(columns), [4, 4], channels=3, image_folder=True)
    image = Image.new("RGB", (8, 8), (255, 0, 128))
    buffer = tmp_path / "red.png"
    image.save(buffer)
    pixels = decode_image(buffer.read_bytes(), spec)
    assert pixels.shape == (3, 4, 4)
    np.testing.assert_allclose(pixels[:, 0, 0], [1.0, 0.0, 128 / 255], atol=1e-6)
    served = to_model_input(image_to_rows(buffer.read_bytes(), spec), spec)
    np.testing.assert_array_equal(served[0], pixels)


def test_augmentations_crop_and_flip_training_images_only(root: Path, prepared: Path) -> None:
    from pipelines.training.data import load_data

    manifest = read_manifest(prepared)
    params = folder_params(
        **{"train.augment": {"random_resized_crop": {"scale": [0.5, 0.6]}, "hflip": True}}
    )
    data = load_data(prepared, manifest, params.train.augment, root=root)
    assert data.train_images is not None
    torch.manual_seed(0)
    x, _ = data.train_images[torch.arange(8)]
    assert x.shape == (8, 1, 16, 16) and x.dtype == torch.float32
    assert not torch.equal(x, data.x_train[:8])  # augmented
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    left, top, right, bottom = data.train_images.crop_box(32, 32)
    assert 0.45 * 1024 <= (right - left) * (bottom - top) <= 0.65 * 1024


def test_validate_names_broken_files_duplicates_and_leakage(tmp_path: Path) -> None:
    from pipelines.validate import failure_message, run_gate

    broken = write_digit_folder(tmp_path / SOURCE, per_class=20, size=32, broken=2)
    copies = sorted((tmp_path / SOURCE / "3").glob("*.png"))[:4]
    for i, path in enumerate(copies):
        shutil.copy(path, path.with_name(f"dup-{i}.png"))
    params = folder_params()
    out = tmp_path / "prepared"
    prepare(params.data, params.prepare, tmp_path, out)
    # A test row with the content of a train row: leakage (the split itself never makes one).
    train, test = read_split(out, "train"), read_split(out, "test")
    test.loc[0, "sha256"] = train.loc[0, "sha256"]
    test.to_parquet(out / "test.parquet", index=False)

    summary = run_gate(params.data, params.validate_, out, tmp_path / "docs")
    message = failure_message(summary)
    assert not summary["success"]
    for name in broken:
        assert f"{SOURCE}/{name}: does not decode: not a readable image" in message
    # 4 files and their 4 copies, and the two rows of the leak: 10 of 204 decoded files.
    assert "duplicate rows: 10 of 204 rows share their feature values" in message, message
    assert "train/test leakage: 1 test rows identical to train rows" in message
    assert len(summary["failures"]) == 4, message


def test_folder_settings_are_checked_when_params_load() -> None:
    params = folder_params(size=8, channels=3)
    assert params.data.channels == 3
    with pytest.raises(ParamsError, match="channels: 3 channels need a folder of images"):
        load_params(REPO / "params.yaml", overrides={"data.channels": 3})
    with pytest.raises(ParamsError, match="image_shape: a folder of images needs"):
        folder_params(**{"data.image_shape": None})
    with pytest.raises(ParamsError, match=r"image_shape: 3x8x8=192 does not match 64"):
        folder_params(size=8, channels=3, **{"data.features": {"prefix": "px_", "count": 64}})
    with pytest.raises(ParamsError, match=r"train\.augment: augmentations need a folder of images"):
        load_params(REPO / "params.yaml", overrides={"train.augment.hflip": True})
    with pytest.raises(ParamsError, match=r"scale: low 0\.9 is above high 0\.5"):
        folder_params(**{"train.augment.random_resized_crop": {"scale": [0.9, 0.5]}})


def test_resnet18_is_the_small_input_form_and_loads_local_weights(tmp_path: Path) -> None:
    from pipelines.models import build_model, load_weights

    model = build_model(
        "resnet18", input_shape=(3, 32, 32), num_classes=10, width=64, depth=1, dropout=0.0
    )
    assert sum(p.numel() for p in model.parameters()) == 11_173_962  # torchvision's: 11,181,642
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    small = build_model(
        "resnet18", input_shape=(1, 16, 16), num_classes=4, width=4, depth=1, dropout=0.0
    )
    torch.save(small.state_dict(), tmp_path / "w.pt")
    fresh = build_model(
        "resnet18", input_shape=(1, 16, 16), num_classes=4, width=4, depth=1, dropout=0.0
    )
    load_weights(fresh, tmp_path / "w.pt")
    for key, value in small.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    other = build_model(
        "resnet18", input_shape=(1, 16, 16), num_classes=5, width=4, depth=1, dropout=0.0
    )
    with pytest.raises(CheckpointError, match=r"w\.pt: the weights do not fit the model: "):
        load_weights(other, tmp_path / "w.pt")
    (tmp_path / "junk.pt").write_bytes(b"no")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a readable weights file"):
        load_weights(fresh, tmp_path / "junk.pt")


@pytest.mark.slow
def test_prepare_validate_train_export_on_a_folder(project: Path) -> None:
    """The stages as DVC runs them, on a tiny folder: resnet18 trained through DataLoader
    workers with augmentations, exported to ONNX with the parity gate."""
    import yaml

    write_digit_folder(project / SOURCE, per_class=12, size=32)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["data"].update(
        source=SOURCE,
        image_shape=[16, 16],
        features={"prefix": "px_", "count": 256},
        value_range=[0.0, 1.0],
    )
    raw["validate"]["min_rows_per_class"] = 5
    raw["train"]["model"].update(arch="resnet18", width=4)
    raw["train"].update(
        epochs=2,
        num_workers=2,
        augment={"random_resized_crop": {"scale": [0.8, 1.0]}, "hflip": False},
    )
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    commands = [
        "pipelines.prepare --out data/prepared --metrics metrics/prepare.json",
        "pipelines.validate --prepared data/prepared --docs reports/validate "
        "--metrics metrics/validate.json",
        "pipelines.train --prepared data/prepared --model models/train/model.pt "
        "--metrics metrics/train.json --plots plots/train.csv --checkpoint-dir checkpoints/train",
        "pipelines.export --name teacher --model models/train/model.pt --prepared data/prepared "
        "--out models/export/teacher.onnx --metrics metrics/export/teacher.json",
    ]
    for command in commands:
        done = subprocess.run(
            [sys.executable, "-m", *command.split()],
            check=False,
            cwd=project,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    import json

    train = json.loads((project / "metrics/train.json").read_text())
    assert train["epochs_run"] == 2
    export = json.loads((project / "metrics/export/teacher.json").read_text())
    assert export["argmax_agreement"] == 1.0, export


@pytest.mark.slow
def test_the_service_predicts_an_image_file_as_its_prepared_row(tmp_path: Path) -> None:
    """/predict_image of a file of the folder answers what /predict answers for the row
    `prepare` decoded from that file: the service decodes as training did (resnet18 model)."""
    import json

    from starlette.testclient import TestClient

    from flows.package import save_bento_model
    from pipelines.export import export
    from pipelines.models import save_model
    from pipelines.runtime import read_metadata
    from pipelines.train import train

    write_digit_folder(tmp_path / SOURCE, per_class=10, size=32)
    params = folder_params(
        **{"train.model.arch": "resnet18", "train.model.width": 4, "train.epochs": 1}
    )
    prepared = tmp_path / "prepared"
    prepare(params.data, params.prepare, tmp_path, prepared)
    with pytest.MonkeyPatch.context() as env:
        env.chdir(tmp_path)  # the training images are read from the project root
        result = train(params.train, prepared, tmp_path / "checkpoints")
    save_model(tmp_path / "model.pt", result)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    export(params.export, tmp_path / "model.pt", prepared, model_dir / "model.onnx")
    (model_dir / "metadata.json").write_text(json.dumps(read_metadata(model_dir / "model.onnx")))
    tag = save_bento_model("image-folder-test", model_dir, "1")

    test = read_split(prepared, "test")
    sys.modules.pop("service", None)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLOPS_MODEL_TAG", tag)
        import service

        with TestClient(service.SERVICE.to_asgi(), raise_server_exceptions=False) as client:
            suffixes = test["path"].map(lambda p: Path(p).suffix)
            for i in (suffixes.eq(".png").idxmax(), suffixes.eq(".jpg").idxmax()):
                path = test["path"][i]
                content = (tmp_path / SOURCE / path).read_bytes()
                image = client.post("/predict_image", files={"image": (path, content)})
                assert image.status_code == 200, image.text
                row = test.loc[i, params.data.feature_columns].to_numpy(np.float64)
                rows = client.post("/predict", json={"rows": [row.tolist()]})
                assert rows.status_code == 200, rows.text
                assert image.json()[0]["probabilities"] == rows.json()[0]["probabilities"]
    sys.modules.pop("service", None)


def _tiff(image: object) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "TIFF")  # type: ignore[attr-defined]
    return buffer.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("mode", ["F", "I", "LAB", "HSV"])
def test_folder_decoding_refuses_modes_it_cannot_map(channels: int, mode: str) -> None:
    """An F image full of 0.5 once decoded (channels 3) to the same pixels as a black one:
    Pillow clips F and I to 0..255. prepare's decoding, which the service's /predict_image of an
    image-folder model shares, refuses them naming the mode."""
    from PIL import Image

    from pipelines.preprocessing import ImageError, decode_image, image_to_rows, make_spec

    columns = [f"px_{i}" for i in range(channels * 4 * 4)]
    spec = make_spec(columns, [(0, 1)] * len(columns), [4, 4], channels=channels, image_folder=True)
    images = {
        "F": Image.fromarray(np.full((8, 8), 0.5, np.float32)),
        "I": Image.fromarray(np.full((8, 8), 70000, np.int32)),
        "LAB": Image.new("LAB", (8, 8), (50, 0, 0)),
    }
    if mode == "HSV":  # no file format stores HSV: decoding gets it through a patched open
        image = Image.new("HSV", (8, 8), (0, 0, 128))
        data = _tiff(Image.new("L", (8, 8)))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("pipelines.preprocessing.open_image", lambda *_, **__: image)
            with pytest.raises(ImageError, match=r"^image mode HSV is not supported: send "):
                decode_image(data, spec)
        return
    data = _tiff(images[mode])
    for decode in (decode_image, image_to_rows):
        with pytest.raises(ImageError, match=f"^image mode {mode} is not supported: send "):
            decode(data, spec)


def test_sixteen_bit_gray_keeps_its_range_in_color_folders() -> None:
    from PIL import Image

    from pipelines.preprocessing import decode_image, make_spec

    columns = [f"px_{i}" for i in range(3 * 4 * 4)]
    spec = make_spec(columns, [(0, 1)] * len(columns), [4, 4], channels=3, image_folder=True)
    wide = Image.fromarray(np.full((8, 8), 32768, np.uint16))  # I;16: mid gray, not white
    np.testing.assert_allclose(decode_image(_tiff(wide), spec), 32768 / 65535, atol=1e-5)


def test_files_in_unsupported_modes_are_in_no_split_and_named_by_validate(tmp_path: Path) -> None:
    """A .png that holds a float TIFF: prepare does not decode it into a split (it would clip),
    validate names the file and its mode."""
    from PIL import Image

    from pipelines.validate import failure_message, run_gate

    write_digit_folder(tmp_path / SOURCE, per_class=20, size=32)
    odd = tmp_path / SOURCE / "3" / "float.png"
    odd.write_bytes(_tiff(Image.fromarray(np.full((32, 32), 0.5, np.float32))))
    params = folder_params()
    out = tmp_path / "prepared"
    prepare(params.data, params.prepare, tmp_path, out)
    files = read_files(out).set_index("path")
    assert files.loc["3/float.png", "mode"] == "F"
    assert pd.isna(files.loc["3/float.png", "split"])
    summary = run_gate(params.data, params.validate_, out, tmp_path / "docs")
    message = failure_message(summary)
    assert f"{SOURCE}/3/float.png: image mode F is not supported" in message, message
    assert len(summary["failures"]) == 1, message
