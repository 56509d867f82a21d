"""The README's "Your own data" recipe, run as written on a generated CSV (slow tier)."""

from __future__ import annotations

import json
import os
import re
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


def recipe() -> list[tuple[str, str]]:
    """The section's fenced blocks in order: (language, text)."""
    section = (REPO / "README.md").read_text().split("### Your own data", 1)[1]
    section = re.split(r"\n##+ ", section, maxsplit=1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


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


def test_the_readme_recipe_trains_and_evaluates_a_users_csv(tmp_path: Path) -> None:
    """Word for word: the bash block (`cp ~/mydata.csv ...`, `dvc add`, `git add`), the yaml block
    merged into params.yaml, then the last block's `dvc repro`: the whole graph (tune, train,
    distill, export, quantize, convert, select) on a user's tabular file."""
    blocks = recipe()
    assert [language for language, _ in blocks] == ["bash", "yaml", "bash"]
    (add, edits, run) = (text for _, text in blocks)
    assert run.strip() == "dvc repro"
    root = copy_project(tmp_path / "project", edits={})
    home = tmp_path / "home"
    home.mkdir()
    iris_like(home / "mydata.csv")
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'test.db'}",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }

    def shell(script: str) -> None:
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, f"{script}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    shell(add)
    params = root / "params.yaml"
    merged = apply_overrides(yaml.safe_load(params.read_text()), yaml.safe_load(edits))
    params.write_text(yaml.safe_dump(merged, sort_keys=False))
    shell(run.strip())

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
