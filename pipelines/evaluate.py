"""`evaluate`: the trained model on the held-out test split, and the absolute accuracy floor.

Accuracy, macro-F1 and per-class precision/recall go to DVC metrics and MLflow; the confusion
matrix goes to a DVC plot (CSV of actual/predicted) and an image. A model whose test accuracy is
below `evaluate.min_accuracy` is rejected here (exit 2, before `export`): its figures go to
MLflow, the metrics file is not written.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.artifacts import atomic_path, read_json, write_json
from pipelines.cli import run_cli
from pipelines.config import EvaluateConfig, Params, section_dict
from pipelines.errors import PipelineError
from pipelines.prepare import read_split
from pipelines.preprocessing import to_model_input

log = logging.getLogger(__name__)


class AccuracyFloorError(PipelineError):
    """The model scores below `evaluate.min_accuracy`: it must not be exported or promoted."""


def check_floor(accuracy: float, min_accuracy: float) -> None:
    """Raise `AccuracyFloorError` when `accuracy` (a fraction, 0..1) is below the floor."""
    if not accuracy >= min_accuracy:  # a NaN accuracy is below every floor
        raise AccuracyFloorError(
            f"test accuracy {accuracy:.4f} is below evaluate.min_accuracy {min_accuracy:g}: "
            "the model is rejected (train it better, or set the floor for this data set)"
        )


def predict(model_path: Path, rows: Any, batch_size: int, data: str = "") -> np.ndarray:
    """Class indices predicted by the saved model for raw feature rows."""
    import torch

    from pipelines.models import load_model

    model, meta = load_model(model_path)
    where = f"model {model_path} on {data}" if data else f"model {model_path}"
    x = torch.from_numpy(to_model_input(rows, meta["preprocessing"], where))
    with torch.inference_mode():
        logits = [model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(logits).argmax(dim=1).numpy() if logits else np.empty(0, dtype=np.int64)


def classification_metrics(
    actual: np.ndarray, predicted: np.ndarray, labels: Sequence[Any]
) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    index = list(range(len(labels)))
    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=index, zero_division=0
    )
    per_class = {
        str(label): {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return {
        "accuracy": float(accuracy_score(actual, predicted)),
        "macro_f1": float(f1_score(actual, predicted, labels=index, average="macro")),
        "test_rows": len(actual),
        "per_class": per_class,
    }


def confusion_plot(
    actual: np.ndarray, predicted: np.ndarray, labels: Sequence[Any], image: Path
) -> None:
    """Save the confusion matrix as a PNG (counts in each cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    matrix = confusion_matrix(actual, predicted, labels=list(range(len(labels))))
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(matrix, cmap="Blues")
    ax.set(xlabel="predicted", ylabel="actual", title="Confusion matrix (test split)")
    ticks = range(len(labels))
    ax.set_xticks(ticks, [str(label) for label in labels])
    ax.set_yticks(ticks, [str(label) for label in labels])
    for (row, col), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        ax.text(col, row, str(count), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    with atomic_path(image) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def evaluate(
    cfg: EvaluateConfig, model_path: Path, prepared_dir: Path, plots_dir: Path
) -> dict[str, Any]:
    """Score `model_path` on the test split; write the confusion CSV and PNG under `plots_dir`."""
    manifest = read_json(prepared_dir / "manifest.json")
    test = read_split(prepared_dir, "test")
    labels = manifest["labels"]
    actual = test[manifest["label_column"]].map({v: i for i, v in enumerate(labels)}).to_numpy()
    rows = test[manifest["feature_columns"]]
    predicted = predict(model_path, rows, cfg.batch_size, f"prepared data {prepared_dir}")
    names = np.asarray([str(label) for label in labels])
    with atomic_path(plots_dir / "confusion.csv") as tmp:
        frame = pd.DataFrame({"actual": names[actual], "predicted": names[predicted]})
        frame.to_csv(tmp, index=False)
    confusion_plot(actual, predicted, labels, plots_dir / "confusion_matrix.png")
    return classification_metrics(actual, predicted, labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for the plots")
    args = parser.parse_args(argv)
    run_cli(lambda params: _run(params, args), args.params)


def _run(params: Params, args: argparse.Namespace) -> None:
    from pipelines.tracking import flatten, stage_run

    root = Path.cwd()
    data_hash = read_json(args.prepared / "manifest.json")["content_hash"]
    section = {"evaluate": section_dict(params.evaluate)}
    with stage_run("evaluate", params, section, root, data_hash=data_hash) as run:
        metrics = evaluate(params.evaluate, args.model, args.prepared, args.plots)
        numeric = {k: v for k, v in flatten(metrics).items() if k != "test_rows"}
        run.log_metrics({k.replace("per_class.", "class_"): v for k, v in numeric.items()})
        check_floor(metrics["accuracy"], params.evaluate.min_accuracy)
        write_json(args.metrics, metrics)
        run.log_artifact(args.plots / "confusion_matrix.png", "plots")
        run.log_artifact(args.plots / "confusion.csv", "plots")
        run.log_artifact(args.metrics)
        log.info("evaluate: accuracy %.4f, macro-F1 %.4f", metrics["accuracy"], metrics["macro_f1"])


if __name__ == "__main__":
    main()
