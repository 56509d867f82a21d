"""A user's own tabular data, with the README's "Your own data" edits only, against a first
scikit-learn baseline on the same split.

The data sets (they ship inside scikit-learn, nothing downloads), `--dataset`:
- `wine`: 178 rows, 13 numeric features on very different scales (hue ~1, magnesium ~100,
  proline ~1000), 3 classes; the test split is 27 rows (one row = 3.7 points).
- `breast_cancer`: 569 rows, 30 numeric features (from ~0.001 to ~4,000: smoothness, area),
  2 classes; the test split is 86 rows (one row = 1.2 points).
Written as a CSV under a temp copy of this project; params.yaml gets the README's `data` edits
(source, name, label column, features, labels, `value_range: learn`, `image_shape: null`) and
nothing else; then the stages `prepare → validate → tune (off) → train → evaluate` run with their
own commands from dvc.yaml, as `dvc repro evaluate` runs them.

Baselines, fitted on the same training split and scored on the same test split (prepare's
Parquet files): `LogisticRegression` behind a `StandardScaler`, and
`HistGradientBoostingClassifier`, both scikit-learn defaults (random_state 0). Goal: the
pipeline's test accuracy within 2 points of the better baseline. Each `prepare.seed` (a
different split) is reported; the mean over seeds says more than any one split.

Run: `python benchmarks/tabular_baselines.py [--dataset wine|breast_cancer] [--seeds 42 1 2]
[--out figures.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "validate", "tune", "train", "evaluate")  # `dvc repro evaluate`'s order
COPIED = ("params.yaml", "dvc.yaml", "pipelines", "service.py")


def dataset_csv(name: str, path: Path) -> dict[str, Any]:
    """scikit-learn's `name` set (wine, breast_cancer) as a CSV (`label` + the feature columns,
    names with `_` for spaces and slashes); the README's `data` edits for it."""
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    frame = bunch.frame.rename(columns={"target": "label"})
    frame.columns = [c.replace("/", "_").replace(" ", "_") for c in frame.columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    features = [c for c in frame.columns if c != "label"]
    return {
        "data": {
            "name": name.replace("_", "-"),
            "source": str(path.relative_to(path.parents[2])),
            "label_column": "label",
            "features": features,
            "labels": sorted(int(v) for v in frame["label"].unique()),
            "value_range": "learn",
            "image_shape": None,
        }
    }


def edit_params(root: Path, edits: dict[str, Any]) -> None:
    """params.yaml with `edits` deep-merged (what a user's edit of those keys amounts to)."""
    from pipelines.config import apply_overrides

    path = root / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump(apply_overrides(raw, edits), sort_keys=False))


def stage_commands(root: Path, names: tuple[str, ...] = STAGES) -> list[list[str]]:
    """The commands of the named dvc.yaml stages, as written there."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return [shlex.split(" ".join(str(stages[name]["cmd"]).split())) for name in names]


def run_stages(root: Path, names: tuple[str, ...] = STAGES) -> None:
    """Each stage's command in `root` (the venv's python), MLflow in a file store there."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(root),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns.db'}",
    }
    for command in stage_commands(root, names):
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)}: exit {done.returncode}\n{done.stderr[-3000:]}"
            )


def baselines(prepared: Path, features: list[str], label: str) -> dict[str, float]:
    """Test accuracy of scikit-learn's first baselines fitted on the training split."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = pd.read_parquet(prepared / "train.parquet")
    test = pd.read_parquet(prepared / "test.parquet")
    models = {
        "logistic_regression": make_pipeline(
            StandardScaler(), LogisticRegression(max_iter=5000, random_state=0)
        ),
        "hist_gradient_boosting": HistGradientBoostingClassifier(random_state=0),
    }
    return {
        name: float(model.fit(train[features], train[label]).score(test[features], test[label]))
        for name, model in models.items()
    }


def measure(seed: int, workdir: Path, dataset: str = "wine") -> dict[str, Any]:
    """One split (prepare.seed = `seed`): the pipeline's figures and the baselines'."""
    root = workdir / f"seed{seed}"
    root.mkdir(parents=True)
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    edits = dataset_csv(dataset, root / "data" / "raw" / f"{dataset}.csv")
    edit_params(root, edits)
    if seed != 42:  # the default seed; another split is a second look, not a recipe edit
        edit_params(root, {"prepare": {"seed": seed}})
    run_stages(root)
    evaluated = json.loads((root / "metrics" / "evaluate.json").read_text())
    trained = json.loads((root / "metrics" / "train.json").read_text())
    base = baselines(root / "data" / "prepared", edits["data"]["features"], "label")
    best = max(base.values())
    accuracy = float(evaluated["accuracy"])
    return {
        "dataset": dataset,
        "seed": seed,
        "test_rows": len(pd.read_parquet(root / "data" / "prepared" / "test.parquet")),
        "pipeline_accuracy": accuracy,
        **base,
        "gap_to_best_points": round(100 * (best - accuracy), 2),
        "within_2_points": accuracy >= best - 0.02,
        "epochs_run": trained["epochs_run"],
        "best_epoch": trained["best_epoch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", choices=["wine", "breast_cancer"], default="wine")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tabular-") as tmp:
        figures = [measure(seed, Path(tmp), args.dataset) for seed in args.seeds]
    for row in figures:
        print(json.dumps(row))
    keys = ("pipeline_accuracy", "logistic_regression", "hist_gradient_boosting")
    mean = {key: sum(float(row[key]) for row in figures) / len(figures) for key in keys}
    print(json.dumps({"dataset": args.dataset, "mean_over_seeds": mean}))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
