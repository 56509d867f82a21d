"""The champion gate's figures: a candidate and the current champion scored on the same test
split with the same code, and the policy that compares them.

`flows/register.py` fetches the champion's graph from the MLflow registry, calls `judge` and moves
the aliases; the evaluation and the policy live here (pure ML, no registry calls).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pipelines.config import Params
from pipelines.quantize import split_inputs
from pipelines.runtime import logits, read_metadata, session

CHAMPION, CHALLENGER = "champion", "challenger"  # the registry aliases the gate decides between


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The gate's answer. Accuracies are fractions (0..1) on this run's test split."""

    accuracy: float  # the candidate's
    champion_accuracy: float | None  # the current champion's; None when there is none
    promote: bool  # the candidate may become champion
    reason: str


def accuracy_on(onnx_path: Path, prepared_dir: Path) -> float:
    """Accuracy (0..1) of an ONNX model made by `export` on the test split of `prepared_dir`,
    preprocessed as the model's embedded metadata says. A teacher graph with a cascade beside it
    (pipelines/cascade.py: `select`'s output, a registered `model/` folder) is scored as the
    cascade. Raises KeyError for a graph without that metadata, CascadeError for a cascade whose
    files do not match."""
    from pipelines import cascade

    x, y = split_inputs(prepared_dir, "test", read_metadata(onnx_path)["preprocessing"])
    spec = cascade.read_cascade(onnx_path.parent)
    if spec is None or spec["teacher"]["file"] != onnx_path.name:
        return float((logits(session(onnx_path), x).argmax(axis=1) == y).mean())
    student = session(onnx_path.parent / spec["student"]["file"])
    teacher = session(onnx_path)
    predict = cascade.Cascade(
        lambda rows: logits(student, rows), lambda rows: logits(teacher, rows), spec["threshold"]
    )
    return float((predict(x).argmax(axis=1) == y).mean())


def gate(new: float, champion: float | None, tolerance: float, floor: float) -> tuple[bool, str]:
    """Whether the new model may become champion, and why (pure: the policy alone). Accuracies
    are fractions (0..1); `floor` is `evaluate.min_accuracy`, applied with or without a champion;
    `tolerance` is `register.tolerance`."""
    if not new >= floor:
        return False, (
            f"accuracy {new:.4f} < evaluate.min_accuracy {floor:g} (the absolute floor): "
            f"kept as {CHALLENGER}"
        )
    if champion is None:
        return True, f"no champion yet; accuracy {new:.4f}"
    if new >= champion - tolerance:
        return True, f"accuracy {new:.4f} >= champion's {champion:.4f} - tolerance {tolerance:g}"
    return False, (
        f"accuracy {new:.4f} < champion's {champion:.4f} - tolerance {tolerance:g} "
        f"on the same test split: kept as {CHALLENGER}"
    )


def judge(candidate: Path, champion: Path | None, prepared_dir: Path, params: Params) -> Verdict:
    """Score the `candidate` ONNX graph and the current `champion`'s (None: no champion yet) on
    the test split of `prepared_dir`, and apply `gate` with `register.tolerance` and
    `evaluate.min_accuracy`."""
    new = accuracy_on(candidate, prepared_dir)
    old = accuracy_on(champion, prepared_dir) if champion is not None else None
    promote, reason = gate(new, old, params.register_.tolerance, params.evaluate.min_accuracy)
    return Verdict(new, old, promote, reason)
