"""The README's "Your own data" recipes, run as written on a generated CSV and a generated folder
of images (slow tier)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipelines.config import apply_overrides
from tests.helpers import REPO
from tests.test_dvc import copy_project

pytestmark = pytest.mark.slow


def recipe(heading: str = "### Your own data") -> list[tuple[str, str]]:
    """The fenced blocks of the README's section under `heading`, up to the next heading, in
    order: (language, text)."""
    section = (REPO / "README.md").read_text().split(f"{heading}\n", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def user_env(root: Path, home: Path) -> dict[str, str]:
    """A user's shell in the copied project: its own HOME, this venv on PATH, MLflow in the
    project, git identity for `git add`/commits."""
    return {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'test.db'}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


def shell(script: str, root: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`script` under `bash -euo pipefail` in `root`; its result (not checked)."""
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def succeeds(script: str, root: Path, env: dict[str, str]) -> None:
    done = shell(script, root, env)
    assert done.returncode == 0, f"{script}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def merge_params(root: Path, *layers: dict[str, object]) -> None:
    """Each layer (nested, as in params.yaml) merged into root/params.yaml, in order."""
    params = root / "params.yaml"
    merged = yaml.safe_load(params.read_text())
    for layer in layers:
        merged = apply_overrides(merged, layer)
    params.write_text(yaml.safe_dump(merged, sort_keys=False))


def iris_like(path: Path, rows: int = 300, seed: int = 0) -> None:
    """The recipe's columns (four measurements, `species` as text) on different scales."""
    rng = np.random.default_rng(seed)
    species = np.array(["setosa", "versicolor", "virginica"])[np.arange(rows) % 3]
    centre = {"setosa": 0.0, "versicolor": 1.0, "virginica": 2.0}
    k = np.array([centre[s] for s in species])[:, None]
    scales = np.array([1.0, 0.1, 10.0, 1000.0])
    x = (5.0 + 1.5 * k + rng.normal(scale=0.5, size=(rows, 4))) * scales
    frame = pd.DataFrame(x, columns=["sepal_length", "sepal_width", "petal_length", "petal_width"])
    frame["species"] = species
    frame.to_csv(path, index=False)


# What the CSV test changes beyond the recipe, so that the whole graph runs in less time: fewer
# timed calls per candidate in `select`, one pruning ratio fine-tuned for one epoch (the stage
# still prunes, exports and quantizes it). Nothing else: the model is trained as params.yaml says.
CSV_TEST_LAYER: dict[str, object] = {
    "select": {"latency_iters": 10, "throughput_iters": 3},
    "prune": {"ratios": [0.3], "epochs": 1},
}


def test_the_readme_recipe_trains_and_evaluates_a_users_csv(tmp_path: Path) -> None:
    """Word for word: the bash block (`cp ~/mydata.csv ...`, `dvc add`, `git add`), the yaml block
    merged into params.yaml (plus CSV_TEST_LAYER), then the last block's `dvc repro`: the whole
    graph (tune, train, distill, prune, export, quantize, convert, select) on a user's tabular
    file."""
    blocks = recipe()
    assert [language for language, _ in blocks] == ["bash", "yaml", "bash"]
    (add, edits, run) = (text for _, text in blocks)
    assert run.strip() == "dvc repro"
    root = copy_project(tmp_path / "project", edits={})
    home = tmp_path / "home"
    home.mkdir()
    iris_like(home / "mydata.csv")
    env = user_env(root, home)
    succeeds(add, root, env)
    merge_params(root, yaml.safe_load(edits), CSV_TEST_LAYER)
    succeeds(run.strip(), root, env)

    from pipelines.runtime import read_metadata

    served = read_metadata(root / "models" / "select" / "model.onnx")  # what the bento serves
    assert served["labels"] == ["setosa", "versicolor", "virginica"], served
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert evaluated["accuracy"] >= 0.9, evaluated  # 3 separable classes; chance is 1/3
    manifest = json.loads((root / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["labels"] == ["setosa", "versicolor", "virginica"]
    assert manifest["preprocessing"]["model_scaling"] == "standard"
    assert set(manifest["learned_ranges"]) == {
        "sepal_length",
        "sepal_width",
        "petal_length",
        "petal_width",
    }


# What the image test changes beyond the recipe, so that the whole graph runs in minutes on two
# CPU cores: the recipe's ResNet-18 a quarter as wide (width 64 trained at ~1 image/s on this
# loaded host) for fewer epochs, fewer workers, fewer timed calls per candidate in `select`, and
# one pruning ratio fine-tuned for one epoch (the residual network is still pruned, exported and
# quantized). Nothing else.
IMAGE_TEST_LAYER: dict[str, object] = {
    "train": {"epochs": 4, "patience": 4, "num_workers": 2, "model": {"width": 16}},
    "select": {"latency_iters": 10, "throughput_iters": 3},
    "prune": {"ratios": [0.3], "epochs": 1},
}


def test_the_readme_image_recipe_trains_and_serves_a_folder(tmp_path: Path) -> None:
    """Word for word, "A folder of images": 30 each of the digits 0 and 1 drawn at 48x48 as PNG
    and JPEG in data/raw/pets/{cat,dog}/ plus one truncated PNG; the `dvc add` block, the yaml
    block (plus IMAGE_TEST_LAYER), `dvc repro`. validate stops naming the broken file; with it
    deleted and the `dvc add` line run again, the whole graph runs; the selected model, served
    by `bentoml serve`, answers `/predict_image` with the class names."""
    import httpx

    from flows.package import save_bento_model
    from pipelines.runtime import read_metadata
    from tests.helpers.images import write_digit_folder
    from tests.helpers.serving import live_service

    blocks = recipe("#### A folder of images")
    assert [language for language, _ in blocks] == ["bash", "yaml", "bash"]
    (add, edits, run) = (text for _, text in blocks)
    assert run.strip() == "dvc repro"
    root = copy_project(tmp_path / "project", edits={})
    home = tmp_path / "home"
    home.mkdir()
    folder = root / "data" / "raw" / "pets"
    (broken,) = write_digit_folder(folder, per_class=30, size=48, broken=1, names=["cat", "dog"])
    env = user_env(root, home)
    succeeds(add, root, env)
    merge_params(root, yaml.safe_load(edits), IMAGE_TEST_LAYER)

    failed = shell(run.strip(), root, env)
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert f"data/raw/pets/{broken}: does not decode" in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert not (root / "models" / "train" / "model.pt").exists()  # nothing past the gate ran

    (folder / broken).unlink()
    succeeds(add, root, env)
    succeeds(run.strip(), root, env)

    manifest = json.loads((root / "data" / "prepared" / "manifest.json").read_text())
    assert manifest["labels"] == ["cat", "dog"]
    assert manifest["image_folder"] == {"root": "data/raw/pets", "files": 60, "broken": 0}
    assert manifest["preprocessing"]["input_shape"] == [3, 32, 32]
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    assert evaluated["accuracy"] >= 0.8, evaluated  # a 0 from a 1; the floor of params.yaml
    selected = root / "models" / "select"
    assert read_metadata(selected / "model.onnx")["labels"] == ["cat", "dog"]

    packed = tmp_path / "packed"  # what `package` takes from the registered version
    shutil.copytree(selected, packed)
    (packed / "metadata.json").write_text(json.dumps(read_metadata(selected / "model.onnx")))
    tag = save_bento_model("pets-classifier", packed, "1")
    log = tmp_path / "serve.log"
    with live_service(env={"MLOPS_MODEL_TAG": tag}, cwd=root, log=log) as url:
        answers = {}
        for name in ("cat/0000.png", "cat/0001.jpg", "dog/0000.png", "dog/0001.jpg"):
            with (folder / name).open("rb") as file:
                response = httpx.post(f"{url}/predict_image", files={"image": file}, timeout=30)
            assert response.status_code == 200, response.text
            answers[name] = response.json()[0]["label"]
    assert set(answers.values()) <= {"cat", "dog"}, answers
    assert list(answers.values()) == ["cat", "cat", "dog", "dog"], answers
    assert "Traceback" not in log.read_text(errors="replace")
