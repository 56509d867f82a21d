"""The cascade: the student answers the rows it is sure of, the teacher the rest.

A row's student confidence is its top softmax probability. With threshold `t`, the rows whose
confidence is >= `t` take the student's answer; the others go to the teacher, all of a batch's
unsure rows in ONE teacher call. `select` picks the lowest `t` that passes two checks: the
cascade stays within `max_accuracy_drop` of the teacher on the labelled validation split
(`choose_threshold`), and an upper confidence bound on the student's disagreement with the
teacher, counted on the training and validation rows, stays within it too (`bounded_threshold`;
one validation row is ~0.4% on digits, too coarse alone to hold on test). It writes the
cascade's files beside the teacher graph (model.onnx): the student graph
(STUDENT) and CASCADE, a small JSON file with the threshold and both files' SHA-256. `register`
logs them with the model, `package` packs them, `service.py` runs `Cascade`. numpy only: the
serving image imports this module (scipy only inside the functions select calls).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.artifacts import file_sha256, read_json
from pipelines.errors import PipelineError

CASCADE = "cascade.json"  # beside model.onnx (the teacher graph): threshold and both graphs' hashes
STUDENT = "student.onnx"  # ... the student graph
TEACHER = "model.onnx"  # ... the teacher graph (select's MODEL: what a single-model folder holds)
Engine = Callable[[np.ndarray], np.ndarray]  # model input (n, ...) -> logits (n, classes)
OnRoute = Callable[[int, int], None]  # (rows the student answered, rows the teacher answered)


def confidence(logits: np.ndarray) -> np.ndarray:
    """Top softmax probability of each row of `logits` (n, classes): shape (n,), in (0, 1]."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return np.asarray(1.0 / exp.sum(axis=1))  # the top class's exp(0) / sum


@dataclass(frozen=True)
class Threshold:
    """A threshold and what it gives on the split it was chosen on (fractions in [0, 1])."""

    threshold: float
    student_share: float
    accuracy: float
    teacher_accuracy: float


def choose_threshold(
    student_confidence: np.ndarray,
    student_correct: np.ndarray,
    teacher_correct: np.ndarray,
    max_accuracy_drop: float,
    at_least: float = 0.0,
) -> Threshold | None:
    """The threshold (>= `at_least`, e.g. `bounded_threshold`'s) that lets the student answer the
    most rows while the cascade's accuracy stays >= teacher accuracy - `max_accuracy_drop` (all on
    the same rows, e.g. the validation split); None when no such threshold lets the student
    answer any row (or there are no rows).

    Inputs, shape (n,): each row's student confidence (`confidence`), and whether the student /
    the teacher classifies it correctly. Only the rows' own confidences are candidate thresholds
    (the student answers exactly the rows at or above one); accuracy is not monotone in the
    threshold, so every candidate is checked and the lowest admissible one wins."""
    n = len(student_confidence)
    if n == 0:
        return None
    order = np.argsort(-student_confidence, kind="stable")
    conf = student_confidence[order]
    gain = student_correct[order].astype(np.int64) - teacher_correct[order].astype(np.int64)
    teacher_right = int(teacher_correct.sum())
    correct = teacher_right + np.cumsum(gain)  # cascade's correct rows when the first k+1 go
    last_of_value = np.r_[conf[1:] != conf[:-1], True]  # a threshold takes all rows of its value
    floor = teacher_right / n - max_accuracy_drop
    ok = last_of_value & (correct / n >= floor - 1e-12) & (conf >= at_least)
    if not ok.any():
        return None
    k = int(np.flatnonzero(ok)[-1])
    return Threshold(float(conf[k]), (k + 1) / n, float(correct[k] / n), teacher_right / n)


def disagreement_upper_bound(disagreements: int, rows: int, confidence_level: float) -> float:
    """One-sided Clopper-Pearson upper confidence bound on a rate seen as `disagreements` of
    `rows` (rows > 0): the rate p with P(Binomial(rows, p) <= disagreements) = 1 -
    `confidence_level`, i.e. the `confidence_level` quantile of Beta(k + 1, n - k); 1.0 when every
    row disagrees, 0.0 at confidence 0 (no bound). It equals the upper end of
    `scipy.stats.binomtest(k, n).proportion_ci(2 * confidence_level - 1, method="exact")`
    (Clopper & Pearson 1934, Biometrika 26(4), 404-413)."""
    from scipy.stats import beta

    if disagreements >= rows:
        return 1.0
    return float(beta.ppf(confidence_level, disagreements + 1, rows - disagreements))


@dataclass(frozen=True)
class Bound:
    """A threshold from `bounded_threshold` and its evidence: of `rows` unlabelled rows, the
    student answers `student_share` and disagrees with the teacher on `disagreements` of them;
    `upper_bound` (<= max_accuracy_drop) bounds the true disagreement rate at `confidence_level`;
    None at `confidence_level` 0 (the bound off: no bound)."""

    threshold: float
    rows: int
    disagreements: int
    student_share: float
    upper_bound: float | None
    confidence_level: float


def bounded_threshold(
    student_confidence: np.ndarray,
    disagree: np.ndarray,
    max_accuracy_drop: float,
    confidence_level: float,
) -> Bound | None:
    """The lowest threshold (a row's own confidence) at which an upper confidence bound on the
    rate of rows the student answers AND answers differently from the teacher is <=
    `max_accuracy_drop`; None when none is (or there are no rows).

    Why it is safe: the cascade differs from the teacher only on such rows, so its accuracy drop
    against the teacher is at most that rate, on any data drawn like these rows. Agreement needs
    no labels, so `student_confidence` and `disagree` (shape (n,): the student's top probability,
    and whether the two models' classes differ) may come from every unlabelled row at hand. The
    count of such rows only grows as the threshold falls, so the bound is monotone in the
    threshold and the lowest admissible threshold is the one of the largest count whose
    Clopper-Pearson bound (`disagreement_upper_bound`) is <= `max_accuracy_drop`; scanning
    thresholds from the top and stopping at the first failure controls the risk at
    `confidence_level` without a multiple-testing correction (the "upper confidence bound"
    calibration of Bates, Angelopoulos, Lei, Malik & Jordan, "Distribution-free, risk-controlling
    prediction sets", J. ACM 68(6), 2021). `confidence_level` 0 turns the bound off (any
    threshold is admitted: the lowest confidence; `upper_bound` None)."""
    n = len(student_confidence)
    if n == 0:
        return None
    from scipy.stats import beta

    counts = np.arange(n + 1)
    bounds = np.where(
        counts >= n, 1.0, beta.ppf(confidence_level, counts + 1, np.maximum(n - counts, 1))
    )
    admissible = np.flatnonzero(bounds <= max_accuracy_drop)
    if not len(admissible):
        return None
    most = int(admissible[-1])  # the bound grows with the count: every count up to `most` passes
    order = np.argsort(-student_confidence, kind="stable")
    conf = student_confidence[order]
    seen = np.cumsum(disagree[order].astype(np.int64))
    last_of_value = np.r_[conf[1:] != conf[:-1], True]  # a threshold takes all rows of its value
    ok = last_of_value & (seen <= most)  # a prefix: the count only grows down the order
    if not ok.any():
        return None
    k = int(np.flatnonzero(ok)[-1])
    found = int(seen[k])
    upper = disagreement_upper_bound(found, n, confidence_level) if confidence_level else None
    return Bound(float(conf[k]), n, found, (k + 1) / n, upper, confidence_level)


def route(
    x: np.ndarray, student: Engine, teacher: Engine, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The cascade's logits for `x` (n, ...) and which rows the student answered (bool, (n,)):
    the student runs on every row, the teacher once on the unsure rows (not at all when none)."""
    out = np.array(student(x), dtype=np.float32)
    sure = confidence(out) >= threshold
    if not sure.all():
        out[~sure] = teacher(x[~sure])
    return out, sure


class Cascade:
    """An engine (model input -> logits) running `route`; `on_route` (if given) hears, per call,
    how many rows each model answered (the service's Prometheus counter, select's share)."""

    name = "cascade"

    def __init__(
        self, student: Engine, teacher: Engine, threshold: float, on_route: OnRoute | None = None
    ) -> None:
        self.student, self.teacher, self.threshold = student, teacher, threshold
        self.on_route = on_route

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out, sure = route(x, self.student, self.teacher, self.threshold)
        if self.on_route is not None:
            answered = int(sure.sum())
            self.on_route(answered, len(sure) - answered)
        return out


def describe(teacher: Path, student: Path, threshold: Threshold, **extra: Any) -> dict[str, Any]:
    """CASCADE's content: the threshold, both graphs' file names and SHA-256, the validation
    figures behind the threshold, and `extra` (e.g. which variants they are)."""
    return {
        "threshold": threshold.threshold,
        "teacher": {"file": teacher.name, "sha256": file_sha256(teacher)},
        "student": {"file": student.name, "sha256": file_sha256(student)},
        "validation": {
            "student_share": threshold.student_share,
            "accuracy": threshold.accuracy,
            "teacher_accuracy": threshold.teacher_accuracy,
        },
        **extra,
    }


class CascadeError(PipelineError):
    """A model folder's cascade files are missing or do not match CASCADE's hashes."""


def read_cascade(folder: Path) -> dict[str, Any] | None:
    """CASCADE in `folder`, checked: a JSON object whose `threshold` is a number in [0, 1] and
    whose `teacher` / `student` entries name TEACHER / STUDENT in `folder` (the files the service
    and the champion gate load: no other name, no path) with their SHA-256. None when there is
    no CASCADE (a single-model folder). Raises CascadeError, one line naming the file and what is
    wrong (not JSON, a field missing or of the wrong type, a threshold out of range, a graph
    missing or differing from its hash)."""
    path = folder / CASCADE
    if not path.is_file():
        return None
    try:
        spec = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CascadeError(f"{path}: not JSON ({exc})") from None
    if not isinstance(spec, dict):
        raise CascadeError(f"{path}: a JSON object expected, got {type(spec).__name__}")
    threshold = spec.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise CascadeError(f"{path}: threshold: a number in [0, 1] expected, got {threshold!r}")
    if not 0.0 <= threshold <= 1.0:  # NaN fails this too
        raise CascadeError(f"{path}: threshold: a number in [0, 1] expected, got {threshold!r}")
    for role, name in (("teacher", TEACHER), ("student", STUDENT)):
        entry = spec.get(role)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CascadeError(f"{path}: {role}: {{'file': {name!r}, 'sha256': ...}} expected")
        if entry.get("file") != name:
            raise CascadeError(f"{path}: {role}.file: {name!r} expected, got {entry.get('file')!r}")
        graph = folder / name
        if not graph.is_file():
            raise CascadeError(f"{path}: the {role} graph {name} is missing")
        if file_sha256(graph) != entry["sha256"]:
            raise CascadeError(f"{path}: the {role} graph {name} does not match its sha256")
    return spec
