"""The cascade's pure logic: threshold choice, batched routing, its files' check."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.artifacts import write_json
from pipelines.cascade import (
    CASCADE,
    STUDENT,
    Bound,
    Cascade,
    CascadeError,
    Threshold,
    bounded_threshold,
    choose_threshold,
    confidence,
    describe,
    disagreement_upper_bound,
    read_cascade,
    route,
)

# 8 validation rows, most confident first. The teacher is right on all but row 7; the student
# is wrong on rows 2 and 6.
CONF = np.array([0.99, 0.95, 0.90, 0.90, 0.80, 0.70, 0.60, 0.50])
STUDENT_OK = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
TEACHER_OK = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)


def test_no_drop_allowed_keeps_the_student_above_its_first_mistake() -> None:
    # t=0.95: rows 0-1 to the student, all correct: 7/8 = the teacher's 7/8.
    assert choose_threshold(CONF, STUDENT_OK, TEACHER_OK, 0.0) == Threshold(
        0.95, 0.25, 7 / 8, 7 / 8
    )


def test_a_drop_of_one_row_admits_down_to_the_next_mistake() -> None:
    # A teacher right on every row: t=0.70 sends rows 0-5 to the student, one mistake (row 2):
    # 7/8 >= 8/8 - 0.125; t=0.60 adds the student's second mistake (6/8).
    chosen = choose_threshold(CONF, STUDENT_OK, np.ones(8, bool), 0.125)
    assert chosen == Threshold(0.70, 0.75, 7 / 8, 1.0)


def test_accuracy_is_not_monotone_so_every_threshold_is_checked() -> None:
    # t=0.60 gives 5/8 (< 7/8 - 0.125), but t=0.50 (every row) 6/8 again: the student is right
    # on row 7, where the teacher is wrong. The lowest threshold qualifies.
    chosen = choose_threshold(CONF, STUDENT_OK, TEACHER_OK, 0.125)
    assert chosen == Threshold(0.50, 1.0, 6 / 8, 7 / 8)


def test_tied_confidences_go_together() -> None:
    # 0.90 is rows 2 and 3: no threshold takes row 3 without row 2 (the mistake).
    chosen = choose_threshold(CONF[:4], STUDENT_OK[:4], TEACHER_OK[:4], 0.0)
    assert chosen == Threshold(0.95, 0.5, 1.0, 1.0)


def test_no_threshold_when_the_most_confident_row_is_a_mistake() -> None:
    student_ok = np.array([0, 1, 1], bool)
    assert choose_threshold(np.array([0.9, 0.8, 0.7]), student_ok, np.ones(3, bool), 0.0) is None
    assert choose_threshold(np.array([]), np.array([], bool), np.array([], bool), 0.5) is None


def test_a_floor_from_the_bound_is_respected() -> None:
    # Without a floor t=0.50 wins (above); at_least=0.55 leaves 0.70 the lowest admissible
    # (0.60 gives 5/8 < 6/8).
    chosen = choose_threshold(CONF, STUDENT_OK, TEACHER_OK, 0.125, at_least=0.55)
    assert chosen == Threshold(0.70, 0.75, 6 / 8, 7 / 8)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (0, 1527), (3, 1000), (17, 250), (99, 100)])
@pytest.mark.parametrize("level", [0.9, 0.95, 0.99])
def test_the_bound_is_the_clopper_pearson_one_sided_upper_limit(
    k: int, n: int, level: float
) -> None:
    from scipy.stats import binomtest

    two_sided = binomtest(k, n).proportion_ci(2 * level - 1, method="exact").high
    assert disagreement_upper_bound(k, n, level) == pytest.approx(two_sided, rel=1e-9)
    if k == 0:  # closed form: (1 - p)^n = 1 - level
        assert disagreement_upper_bound(0, n, level) == pytest.approx(1 - (1 - level) ** (1 / n))


def test_the_bound_at_its_edges() -> None:
    assert disagreement_upper_bound(5, 5, 0.95) == 1.0
    assert disagreement_upper_bound(3, 100, 0.0) == 0.0  # confidence 0: no bound


# 1000 unlabelled rows, confidences distinct and falling; the student disagrees with the teacher
# on rows 100, 300 and 600. At 0.95 and n=1000 the bound is 0.0030 for 0 disagreements, 0.0047
# for 1, 0.0063 for 2: a drop of 0.005 admits one disagreement.
ROWS = np.linspace(1.0, 0.1, 1000)
DISAGREE = np.isin(np.arange(1000), [100, 300, 600])


def test_the_bound_admits_down_to_the_last_row_before_one_disagreement_too_many() -> None:
    assert [round(disagreement_upper_bound(k, 1000, 0.95), 4) for k in range(3)] == [
        0.003,
        0.0047,
        0.0063,
    ]
    found = bounded_threshold(ROWS, DISAGREE, 0.005, 0.95)
    assert found == Bound(
        float(ROWS[299]), 1000, 1, 0.3, disagreement_upper_bound(1, 1000, 0.95), 0.95
    )
    # order does not matter: the same rows shuffled give the same threshold
    order = np.random.default_rng(0).permutation(1000)
    assert bounded_threshold(ROWS[order], DISAGREE[order], 0.005, 0.95) == found


def test_the_bound_stops_before_a_tie_group_holding_one_disagreement_too_many() -> None:
    conf = ROWS.copy()
    conf[295:305] = conf[295]  # rows 295-304 tie, the group holds the 2nd disagreement (300)
    found = bounded_threshold(conf, DISAGREE, 0.005, 0.95)
    assert (
        found is not None and found.threshold == float(conf[294]) and found.student_share == 0.295
    )


def test_no_bounded_threshold_when_even_no_disagreement_is_too_uncertain() -> None:
    # 0.0030 > 0.001: 1000 rows cannot show a rate below 0.001 at 0.95
    assert bounded_threshold(ROWS, np.zeros(1000, bool), 0.001, 0.95) is None
    # the most confident row disagrees and a drop of 0.004 admits none (0.0047 > 0.004)
    assert bounded_threshold(ROWS, np.arange(1000) == 0, 0.004, 0.95) is None
    assert bounded_threshold(np.array([]), np.array([], bool), 0.5, 0.95) is None


def test_confidence_zero_turns_the_bound_off() -> None:
    found = bounded_threshold(ROWS, DISAGREE, 0.0, 0.0)
    assert found is not None and found.threshold == 0.1 and found.student_share == 1.0


def test_the_bound_holds_at_its_confidence_on_data_of_a_known_rate() -> None:
    """Coverage on synthetic draws: confidence ~ U(0, 1), disagreement with probability
    0.02 * (1 - c), so the true rate at threshold t is 0.01 * (1 - t)^2, <= 0.004 exactly when
    t >= 1 - sqrt(0.4). The chosen threshold falls below that in at most ~5% of 400 seeded draws
    (plus 3 standard errors)."""
    rng = np.random.default_rng(7)
    safe = 1 - np.sqrt(0.4)
    misses, shares = 0, []
    trials = 400
    for _ in range(trials):
        conf = rng.uniform(0, 1, 2000)
        disagree = rng.uniform(0, 1, 2000) < 0.02 * (1 - conf)
        found = bounded_threshold(conf, disagree, 0.004, 0.95)
        misses += found is not None and found.threshold < safe
        shares.append(0.0 if found is None else found.student_share)
    assert misses / trials <= 0.05 + 3 * np.sqrt(0.05 * 0.95 / trials)
    assert np.mean(shares) > 0.2  # and it is not vacuous: the student answers rows


def test_confidence_is_the_top_softmax_probability() -> None:
    z = np.array([[0.0, 0.0], [np.log(3.0), 0.0], [1000.0, 0.0]], np.float32)
    np.testing.assert_allclose(confidence(z), [0.5, 0.75, 1.0], rtol=1e-6)


class Recorder:
    """A fake engine: fixed logits per row (by the row's first value), and the calls it got."""

    def __init__(self, logits: dict[float, list[float]]) -> None:
        self.logits = logits
        self.calls: list[list[float]] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(x[:, 0].tolist())
        return np.array([self.logits[float(v)] for v in x[:, 0]], np.float32)


SURE, UNSURE = [5.0, 0.0], [0.1, 0.0]  # confidences 0.993 and 0.525


def test_route_sends_a_batchs_unsure_rows_to_the_teacher_in_one_call() -> None:
    student = Recorder({0.0: SURE, 1.0: UNSURE, 2.0: SURE, 3.0: UNSURE})
    teacher = Recorder({1.0: [0.0, 9.0], 3.0: [0.0, 7.0]})
    x = np.arange(4, dtype=np.float32).reshape(4, 1)
    out, sure = route(x, student, teacher, 0.9)
    assert sure.tolist() == [True, False, True, False]
    assert student.calls == [[0.0, 1.0, 2.0, 3.0]] and teacher.calls == [[1.0, 3.0]]
    np.testing.assert_array_equal(out, [SURE, [0.0, 9.0], SURE, [0.0, 7.0]])


def test_route_skips_the_teacher_when_the_student_is_sure_of_every_row() -> None:
    student, teacher = Recorder({0.0: SURE, 1.0: SURE}), Recorder({})
    _, sure = route(np.array([[0.0], [1.0]], np.float32), student, teacher, 0.9)
    assert sure.all() and teacher.calls == []


def test_cascade_engine_reports_who_answered() -> None:
    heard: list[tuple[int, int]] = []
    engine = Cascade(
        Recorder({0.0: SURE, 1.0: UNSURE}),
        Recorder({1.0: [0.0, 1.0]}),
        0.9,
        lambda s, t: heard.append((s, t)),
    )
    assert engine(np.array([[0.0], [1.0], [1.0]], np.float32)).argmax(axis=1).tolist() == [0, 1, 1]
    assert heard == [(1, 2)] and engine.name == "cascade"


def test_cascade_files_are_checked_against_their_hashes(tmp_path: Path) -> None:
    assert read_cascade(tmp_path) is None  # a single-model folder
    (tmp_path / "model.onnx").write_bytes(b"teacher")
    (tmp_path / STUDENT).write_bytes(b"student")
    spec = describe(tmp_path / "model.onnx", tmp_path / STUDENT, Threshold(0.8, 0.5, 0.9, 0.91))
    write_json(tmp_path / CASCADE, spec)
    assert read_cascade(tmp_path) == spec and spec["threshold"] == 0.8
    (tmp_path / STUDENT).write_bytes(b"other")
    with pytest.raises(CascadeError, match=r"student graph student\.onnx does not match"):
        read_cascade(tmp_path)
    (tmp_path / STUDENT).unlink()
    with pytest.raises(CascadeError, match=r"student graph student\.onnx is missing"):
        read_cascade(tmp_path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda path, spec: path.write_text("{not json"), r"cascade\.json: not JSON"),
        (lambda path, spec: write_json(path, [spec]), r"cascade\.json: a JSON object expected"),
        (lambda path, spec: write_json(path, spec | {"threshold": "high"}), r"threshold: a number"),
        (lambda path, spec: write_json(path, spec | {"threshold": 2.0}), r"threshold: .* got 2\.0"),
        (lambda path, spec: write_json(path, spec | {"threshold": -0.5}), r"threshold: .*-0\.5"),
        (lambda path, spec: write_json(path, spec | {"threshold": True}), r"threshold: .*True"),
        (
            lambda path, spec: path.write_text(json.dumps(spec | {"threshold": float("nan")})),
            r"threshold: .*nan",
        ),
        (
            lambda path, spec: write_json(path, {k: v for k, v in spec.items() if k != "student"}),
            r"student: \{'file': 'student\.onnx'",
        ),
        (
            lambda path, spec: write_json(path, spec | {"student": {"file": 5, "sha256": "x"}}),
            r"student\.file: 'student\.onnx' expected, got 5",
        ),
        # a hash that matches another file must not let the service load an unchecked one
        (
            lambda path, spec: write_json(path, spec | {"student": spec["teacher"]}),
            r"student\.file: 'student\.onnx' expected, got 'model\.onnx'",
        ),
        (
            lambda path, spec: write_json(
                path, spec | {"student": spec["student"] | {"file": "../x/student.onnx"}}
            ),
            r"student\.file: 'student\.onnx' expected, got '\.\./x/student\.onnx'",
        ),
    ],
)
def test_a_malformed_cascade_file_is_one_error_naming_it(
    tmp_path: Path, edit: Callable[[Path, dict[str, Any]], None], message: str
) -> None:
    """Every way cascade.json can be wrong is a CascadeError naming the file: never a
    KeyError/TypeError, never a threshold out of [0, 1], never a graph the hash did not check."""
    (tmp_path / "model.onnx").write_bytes(b"teacher")
    (tmp_path / STUDENT).write_bytes(b"student")
    spec = describe(tmp_path / "model.onnx", tmp_path / STUDENT, Threshold(0.8, 0.5, 0.9, 0.91))
    edit(tmp_path / CASCADE, spec)
    with pytest.raises(CascadeError, match=message) as caught:
        read_cascade(tmp_path)
    assert str(caught.value).startswith(f"{tmp_path / CASCADE}: ")
    assert "\n" not in str(caught.value)


def test_at_confidence_0_the_bound_is_off_and_recorded_as_none() -> None:
    """Confidence 0 admits every threshold (the lowest row's) and claims no bound: null, not a
    0.0 that reads as a bound below the disagreements seen."""
    found = bounded_threshold(ROWS, DISAGREE, 0.005, 0.0)
    assert found == Bound(float(ROWS[-1]), 1000, 3, 1.0, None, 0.0)
    # at 0.5 the bound is about the median rate, (k + 2/3) / n: 0.0027 for k=2, 0.0037 for k=3
    assert bounded_threshold(ROWS, DISAGREE, 0.003, 0.5) == Bound(
        float(ROWS[599]), 1000, 2, 0.6, disagreement_upper_bound(2, 1000, 0.5), 0.5
    )
