import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipelines.artifacts import file_sha256, read_json, write_json
from pipelines.config import SelectConfig
from pipelines.errors import SelectionError
from pipelines.export import export
from pipelines.prepare import read_split
from pipelines.preprocessing import to_model_input
from pipelines.quantize import quantize, split_inputs
from pipelines.runtime import logits, read_metadata, session, softmax
from pipelines.select import (
    GOLDEN,
    Candidate,
    Family,
    choose,
    dropped_candidates,
    golden_indices,
    golden_set,
    markdown,
    select,
    winner_predictor,
)
from tests.helpers.modelzoo import trained_model
from tests.helpers.params import tiny_params


def cand(
    name: str, accuracy: float, throughput: float, p99: float, servable: bool = True
) -> Candidate:
    family, engine_precision = name.split("/")
    engine, precision = engine_precision.split("-")
    c = Candidate(name, family, engine, precision, servable, f"/x/{name}")
    c.accuracy, c.throughput, c.p99_ms = accuracy, throughput, p99
    return c


TABLE = [
    cand("teacher/pytorch-fp32", 0.980, 5_000, 0.40, servable=False),
    cand("teacher/onnxruntime-fp32", 0.980, 20_000, 0.10),
    cand("teacher/onnxruntime-int8_cpu", 0.978, 45_000, 0.12),
    cand("student/onnxruntime-fp32", 0.960, 90_000, 0.05),  # fast but too inaccurate
    cand("student/onnxruntime-int8_cpu", 0.976, 60_000, 0.08),
]


def policy(**changes: object) -> SelectConfig:
    return tiny_params().select.model_copy(update=changes)


def test_throughput_policy_picks_the_fastest_within_the_accuracy_drop() -> None:
    winner, why = choose(TABLE, policy(policy="throughput", max_accuracy_drop=0.005))
    assert winner.name == "student/onnxruntime-int8_cpu"
    assert "runner-up teacher/onnxruntime-int8_cpu" in why and "floor 0.9750" in why


def test_p99_policy_picks_the_lowest_tail_latency() -> None:
    winner, why = choose(TABLE, policy(policy="p99", max_accuracy_drop=0.005))
    assert winner.name == "student/onnxruntime-int8_cpu"
    winner, why = choose(TABLE, policy(policy="p99", max_accuracy_drop=0.001))
    assert winner.name == "teacher/onnxruntime-fp32" and "runner-up" not in why.split(";")[0]


def test_a_wider_drop_admits_the_student_and_baselines_never_win() -> None:
    assert choose(TABLE, policy(max_accuracy_drop=0.05))[0].name == "student/onnxruntime-fp32"
    fast_baseline = [
        cand("teacher/pytorch-fp32", 0.99, 1e9, 0.001, servable=False),
        cand("teacher/onnxruntime-fp32", 0.98, 10, 1.0),
    ]
    assert (
        choose(fast_baseline, policy(max_accuracy_drop=0.0))[0].name == "teacher/onnxruntime-fp32"
    )


def test_none_qualifies_is_a_clear_error() -> None:
    table = [TABLE[0], cand("teacher/onnxruntime-fp32", 0.98, 1, 1)]
    table[1].servable = False
    with pytest.raises(SelectionError, match=r"no servable candidate reaches accuracy 0\.9750"):
        choose(table, policy(max_accuracy_drop=0.005))


@pytest.fixture(scope="module")
def selected(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """(prepared dir, select's output dir, its summary): one tournament for the module."""
    tmp_path = tmp_path_factory.mktemp("select")
    params = tiny_params()
    prepared, model = trained_model(tmp_path, params)
    export(params.export, model, prepared, tmp_path / "model.onnx")
    lenient = params.quantize.model_copy(update={"parity_min_agreement": 0.05})  # tiny model
    quantize(lenient, tmp_path / "model.onnx", prepared, tmp_path / "variants")
    cfg = params.select.model_copy(
        update={"latency_iters": 20, "throughput_iters": 5, "max_accuracy_drop": 1.0}
    )
    family = Family("teacher", model, tmp_path / "model.onnx", tmp_path / "variants")
    out = tmp_path / "out"
    summary = select([family], None, prepared, out, cfg, golden_rows=GOLDEN_ROWS, seed=7)
    return prepared, out, summary


GOLDEN_ROWS = 50


def test_tournament_measures_every_candidate_and_writes_the_winner(
    selected: tuple[Path, Path, dict[str, Any]],
) -> None:
    _, out, summary = selected
    names = {c["name"] for c in summary["candidates"]}
    assert names == {
        f"teacher/{e}"
        for e in (
            "pytorch-fp32",
            "onnxruntime-fp32",
            "onnxruntime-int8_cpu",
            "onnxruntime-int8_qdq",
            "onnxruntime-fp16",
        )
    }
    for c in summary["candidates"]:
        assert c["throughput"] > 0 and 0 < c["p50_ms"] <= c["p99_ms"] and c["size_bytes"] > 0
    assert summary["winner"]["servable"]
    assert (out / "model.onnx").read_bytes() == Path(summary["winner"]["path"]).read_bytes()
    assert summary["explanation"] in (out / "candidates.md").read_text()


def test_select_writes_the_reference_profile_with_the_winners_test_predictions(
    selected: tuple[Path, Path, dict[str, Any]],
) -> None:
    from pipelines.reference import REFERENCE, load_reference

    prepared, out, summary = selected
    ref = load_reference(out / REFERENCE)
    spec = read_metadata(out / "model.onnx")["preprocessing"]
    assert ref.features == spec["feature_columns"]
    assert ref.rows == min(len(read_split(prepared, "train")), tiny_params().monitor.reference_rows)
    test = read_split(prepared, "test")
    predict = winner_predictor(Candidate(**summary["winner"]), tiny_params().select)
    x = to_model_input(test[spec["feature_columns"]].to_numpy(np.float32), spec)
    predicted = predict(x).argmax(axis=1)
    labels = read_json(prepared / "manifest.json")["labels"]
    expected = {str(label): float(np.mean(predicted == i)) for i, label in enumerate(labels)}
    assert ref.predicted_label_distribution == pytest.approx(expected, abs=1e-6)


def test_golden_set_is_what_the_service_accepts_with_the_winners_onnxruntime_output(
    selected: tuple[Path, Path, dict[str, Any]],
) -> None:
    from pydantic import TypeAdapter

    import service

    prepared, out, summary = selected
    golden = read_json(out / GOLDEN)
    assert golden["onnx_sha256"] == file_sha256(out / "model.onnx")
    assert (golden["engine"], golden["precision"]) == (
        summary["winner"]["engine"],
        summary["winner"]["precision"],
    )
    spec = read_metadata(out / "model.onnx")["preprocessing"]
    contract = service.RowContract.from_spec(spec, service.SERVE.max_rows)
    body = json.dumps(golden["rows"])  # as POST /predict receives {"rows": rows}
    parsed = TypeAdapter(list[list[service.FiniteNumber]]).validate_json(body)
    assert service.check_rows(parsed, contract) == golden["rows"]
    assert len(golden["rows"]) == len(golden["labels"]) == GOLDEN_ROWS

    # the winner's ONNX Runtime output on the service's own input
    x = to_model_input(np.asarray(golden["rows"], dtype=np.float32), spec)
    probs = softmax(logits(session(out / "model.onnx"), x))
    assert golden["predictions"] == probs.argmax(axis=1).tolist()
    np.testing.assert_allclose(golden["probabilities"], probs, atol=1e-6)

    # the rows are test-split rows with their labels, stratified: every class in its share
    test = read_split(prepared, "test")
    features = test.drop(columns=["label"]).to_numpy(dtype=np.float64).tolist()
    labels = dict(zip(map(tuple, features), test["label"].tolist(), strict=False))
    assert [labels[tuple(row)] for row in golden["rows"]] == [
        golden["classes"][k] for k in golden["labels"]
    ]
    share = np.bincount(golden["labels"], minlength=10) / GOLDEN_ROWS
    expected = test["label"].value_counts(normalize=True).sort_index().to_numpy()
    assert np.abs(share - expected).max() <= 1 / GOLDEN_ROWS + 1e-9


def test_golden_set_is_byte_reproducible(selected: tuple[Path, Path, dict[str, Any]]) -> None:
    prepared, out, summary = selected
    winner = Candidate(**summary["winner"])
    predict = winner_predictor(winner, tiny_params().select)
    again = out.parent / "again.json"
    engine = (winner.engine, winner.precision)
    write_json(again, golden_set(predict, prepared, out / "model.onnx", GOLDEN_ROWS, 7, *engine))
    assert again.read_bytes() == (out / GOLDEN).read_bytes()
    other = golden_set(predict, prepared, out / "model.onnx", GOLDEN_ROWS, 8, *engine)
    assert other["rows"] != read_json(out / GOLDEN)["rows"]  # the seed decides


def test_golden_indices_take_every_row_or_fall_back_when_strata_are_too_small() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 2, 2])
    assert golden_indices(y, 99, 0).tolist() == list(range(8))
    picked = golden_indices(y, 4, 0)
    assert sorted(np.bincount(y[picked], minlength=3).tolist()) == [1, 1, 2]
    two = golden_indices(y, 2, 0)  # fewer rows than classes: a plain seeded sample
    assert len(two) == 2 and two.tolist() == golden_indices(y, 2, 0).tolist()


def test_dropped_variants_are_listed_with_the_reason_and_never_win(tmp_path: Path) -> None:
    why = "agrees with FP32 on 0.5000 of 270 test rows, below quantize.parity_min_agreement 0.97"
    write_json(
        tmp_path / "variants" / "variants.json",
        {
            "int8_qdq": {
                "status": "dropped",
                "reason": why,
                "accuracy": 0.99,
                "argmax_agreement": 0.5,
            }
        },
    )
    write_json(
        tmp_path / "convert" / "plans.json",
        {
            "status": "built",
            "plans": [],
            "dropped": [{"family": "teacher", "precision": "int8", "reason": "no int8_qdq.onnx"}],
        },
    )
    family = Family("teacher", tmp_path / "m.pt", tmp_path / "m.onnx", tmp_path / "variants")
    dropped = dropped_candidates([family], tmp_path / "convert")
    assert [c.name for c in dropped] == ["teacher/onnxruntime-int8_qdq", "teacher/tensorrt-int8"]
    table = [*TABLE, *dropped]
    winner, _ = choose(table, policy(max_accuracy_drop=0.05))
    assert winner.name == "student/onnxruntime-fp32"  # the dropped one is more accurate: no matter
    text = markdown(table, winner, "why")
    rows = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert rows["| teacher/onnxruntime-int8_qdq (dropped)"].endswith(f"| dropped: {why} |")
    assert "0.9900" in rows["| teacher/onnxruntime-int8_qdq (dropped)"]  # quantize's figures
    assert rows["| teacher/tensorrt-int8 (dropped)"].endswith("| dropped: no int8_qdq.onnx |")


# --- the cascade ----------------------------------------------------------------------------------


def cascade_cand(accuracy: float, throughput: float, p99: float) -> Candidate:
    c = Candidate(
        "cascade/onnxruntime-int8_cpu+teacher-fp32", "cascade", "cascade", "int8+fp32", True, "/x"
    )
    c.accuracy, c.throughput, c.p99_ms = accuracy, throughput, p99
    c.extra.update(threshold=0.9, student_share=0.8)
    return c


def test_the_cascade_wins_like_any_candidate_when_fast_and_accurate_enough() -> None:
    table = [*TABLE, cascade_cand(0.978, 70_000, 0.07)]
    winner, why = choose(table, policy(max_accuracy_drop=0.005))
    assert winner.engine == "cascade" and "runner-up student/onnxruntime-int8_cpu" in why
    assert "threshold 0.9, student answers 80.0% (test)" in markdown(table, winner, why)


def test_the_cascade_is_refused_below_the_floor_or_when_slower() -> None:
    too_wrong = [*TABLE, cascade_cand(0.970, 1e6, 0.01)]
    assert choose(too_wrong, policy(max_accuracy_drop=0.005))[0].name == TABLE[-1].name
    slower = [*TABLE, cascade_cand(0.979, 50_000, 0.09)]
    assert choose(slower, policy(max_accuracy_drop=0.005))[0].name == TABLE[-1].name


@pytest.fixture(scope="module")
def two_families(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Family], Any]:
    """(prepared dir, [teacher, student] families, the select config): a tiny teacher, its
    distilled student, both exported; the student also quantized."""
    from pipelines.distill import distill
    from pipelines.models import save_model

    tmp_path = tmp_path_factory.mktemp("cascade")
    params = tiny_params()
    prepared, teacher = trained_model(tmp_path, params)
    student = tmp_path / "student.pt"
    save_model(student, distill(params.train, params.distill, teacher, prepared, tmp_path / "c"))
    families = []
    for name, model in (("teacher", teacher), ("student", student)):
        export(params.export, model, prepared, tmp_path / f"{name}.onnx")
        families.append(Family(name, model, tmp_path / f"{name}.onnx", tmp_path / f"v-{name}"))
    lenient = params.quantize.model_copy(update={"parity_min_agreement": 0.05})  # tiny model
    quantize(lenient, tmp_path / "student.onnx", prepared, tmp_path / "v-student")
    cfg = params.select.model_copy(update={"latency_iters": 20, "throughput_iters": 5})
    return prepared, families, cfg


def test_the_cascade_is_measured_with_a_validation_threshold_and_its_files_check(
    two_families: tuple[Path, list[Family], Any], tmp_path: Path
) -> None:
    from pipelines.cascade import CASCADE, STUDENT, read_cascade
    from pipelines.select import cascade_predictor, tournament, write_served

    prepared, families, cfg = two_families
    # any threshold qualifies, so the lowest wins; the student's fastest variant is its best
    cfg = cfg.model_copy(update={"max_accuracy_drop": 1.0, "policy": "throughput"})
    measured = tournament(families, None, prepared, cfg)
    found = [c for c in measured if c.engine == "cascade"]
    assert len(found) == 1 and found[0].servable
    cas = found[0]
    students = [c for c in measured if c.family == "student" and c.engine == "onnxruntime"]
    assert cas.extra["student_candidate"] == max(students, key=lambda c: c.throughput).name
    assert cas.extra["validation"]["student_share"] == 1.0  # a drop of 1 admits every row
    spec = read_metadata(families[0].onnx)["preprocessing"]
    unlabelled = sum(len(split_inputs(prepared, s, spec)[0]) for s in ("train", "val"))
    bound = cas.extra["disagreement"]  # the bound's evidence: counted on train + validation rows
    assert bound["rows"] == unlabelled and bound["student_share"] == 1.0
    assert bound["upper_bound"] <= 1.0 and bound["confidence_level"] == cfg.cascade_confidence
    assert cas.extra["threshold"] == bound["threshold"]  # lower than any validation row's: kept
    assert cas.extra["student_share"] == 1.0 and cas.throughput > 0 and cas.p99_ms > 0
    student = next(c for c in students if c.name == cas.extra["student_candidate"])
    assert cas.accuracy == student.accuracy  # every test row answered by the student
    assert cas.size_bytes == student.size_bytes + Path(cas.extra["teacher"]).stat().st_size

    write_served(cas, tmp_path)
    spec = read_cascade(tmp_path)
    assert spec is not None and spec["threshold"] == cas.extra["threshold"]
    assert (tmp_path / "model.onnx").read_bytes() == families[0].onnx.read_bytes()
    assert (tmp_path / STUDENT).read_bytes() == Path(cas.extra["student"]).read_bytes()
    x, _ = split_inputs(prepared, "test", read_metadata(families[0].onnx)["preprocessing"])
    x = x[:5]
    np.testing.assert_array_equal(
        cascade_predictor(cas, 1)(x), logits(session(cas.extra["student"]), x)
    )

    single = next(c for c in measured if c.name == "teacher/onnxruntime-fp32")
    write_served(single, tmp_path)  # a single-model winner leaves no cascade files behind
    assert read_cascade(tmp_path) is None and not (tmp_path / STUDENT).exists()
    assert not (tmp_path / CASCADE).exists()


def test_a_cascade_no_threshold_admits_is_listed_as_dropped(
    two_families: tuple[Path, list[Family], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipelines import cascade
    from pipelines.select import cascade_candidate, family_candidates

    prepared, families, cfg = two_families
    measured = [c for fam in families for c, _ in family_candidates(fam, cfg)]
    for c in measured:
        c.throughput = 1.0
    monkeypatch.setattr(cascade, "choose_threshold", lambda *args, **kwargs: None)
    refused = cascade_candidate(families, measured, prepared, cfg)
    assert refused is not None and not refused.servable and refused.extra["dropped"]
    assert "no threshold lets the student answer any row" in refused.extra["reason"]
    # a drop of 0 with the bound on: even no disagreement bounds the rate above 0
    strict = cfg.model_copy(update={"max_accuracy_drop": 0.0, "cascade_confidence": 0.95})
    monkeypatch.undo()
    refused = cascade_candidate(families, measured, prepared, strict)
    assert refused is not None and refused.extra["dropped"]
    assert "0.95 upper confidence bound on the student's disagreement" in refused.extra["reason"]
    assert cascade_candidate(families[:1], measured, prepared, cfg) is None  # no student


def test_a_cascade_without_the_bound_records_no_upper_bound(
    two_families: tuple[Path, list[Family], Any],
) -> None:
    """select.cascade_confidence 0 turns the bound off: the candidate's evidence says so
    (upper_bound null), not 0.0 next to the disagreements it saw."""
    from pipelines.select import cascade_candidate, family_candidates

    prepared, families, cfg = two_families
    measured = [c for fam in families for c, _ in family_candidates(fam, cfg)]
    off = cfg.model_copy(update={"cascade_confidence": 0.0, "max_accuracy_drop": 1.0})
    found = cascade_candidate(families, measured, prepared, off)
    assert found is not None and found.servable
    bound = found.extra["disagreement"]
    assert bound["upper_bound"] is None and bound["confidence_level"] == 0.0
    assert bound["student_share"] == 1.0  # no bound: every row may go to the student


def test_a_cascade_winner_ships_both_graphs_and_its_golden_set_is_the_cascades(
    two_families: tuple[Path, list[Family], Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the cascade wins (forced here: which candidate is fastest is the host's business),
    select writes the teacher graph, the student graph and cascade.json, and the golden set and
    reference profile hold the cascade's predictions."""
    import pipelines.select as select_module
    from pipelines.cascade import read_cascade, route
    from pipelines.reference import REFERENCE, load_reference

    prepared, families, cfg = two_families
    cfg = cfg.model_copy(update={"max_accuracy_drop": 0.05})

    def cascade_wins(candidates: list[Candidate], _: SelectConfig) -> tuple[Candidate, str]:
        return next(c for c in candidates if c.engine == "cascade"), "forced"

    monkeypatch.setattr(select_module, "choose", cascade_wins)
    summary = select(families, None, prepared, tmp_path, cfg, golden_rows=GOLDEN_ROWS, seed=7)
    winner = summary["winner"]
    spec = read_cascade(tmp_path)
    assert winner["engine"] == "cascade" and spec is not None
    assert spec["threshold"] == winner["extra"]["threshold"]
    assert spec["validation"]["accuracy"] >= spec["validation"]["teacher_accuracy"] - 0.05
    golden = read_json(tmp_path / GOLDEN)
    assert golden["engine"] == "cascade" and golden["precision"] == winner["precision"]
    spec_in = read_metadata(families[0].onnx)["preprocessing"]
    teacher, student = session(tmp_path / "model.onnx"), session(tmp_path / "student.onnx")

    def cascade_of(rows: np.ndarray) -> np.ndarray:
        x = to_model_input(rows.astype(np.float32), spec_in)
        out, _ = route(x, lambda r: logits(student, r), lambda r: logits(teacher, r), threshold)
        return out.argmax(axis=1)

    threshold = spec["threshold"]
    assert golden["predictions"] == cascade_of(np.asarray(golden["rows"])).tolist()
    ref = load_reference(tmp_path / REFERENCE)
    predicted = cascade_of(read_split(prepared, "test")[spec_in["feature_columns"]].to_numpy())
    labels = read_json(prepared / "manifest.json")["labels"]
    expected = {str(label): float(np.mean(predicted == i)) for i, label in enumerate(labels)}
    assert ref.predicted_label_distribution == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", ["throughput", "p99"])
def test_a_challenger_must_lead_the_reference_by_min_gain(kind: str) -> None:
    """Within select.min_gain of the FP32 reference the reference stays (a run-to-run timing
    difference must not swap the served model); past it the challenger wins."""
    reference = cand("teacher/onnxruntime-fp32", 0.980, 100_000, 0.100)
    close = cand("student/onnxruntime-int8_cpu", 0.979, 109_000, 0.092)  # 9% better on both
    far = cand("student/onnxruntime-int8_cpu", 0.979, 111_000, 0.090)  # 11% and 11.1%
    cfg = policy(policy=kind, max_accuracy_drop=0.005, min_gain=0.1)
    winner, why = choose([TABLE[0], reference, close], cfg)
    assert winner is reference
    assert "runner-up student/onnxruntime-int8_cpu" in why and "select.min_gain 0.1" in why
    assert choose([TABLE[0], reference, far], cfg)[0] is far
    assert choose([TABLE[0], reference, close], policy(policy=kind, min_gain=0.0))[0] is close
