"""`select`: the candidate tournament, measured on this host, and the policy that picks a winner.

Every candidate (PyTorch eager, ONNX Runtime FP32/INT8/FP16, TensorRT plans where built) of every
family (the teacher, the distilled student) is measured on the test split: accuracy, macro-F1,
p50/p99 latency at batch 1, throughput at the serving batch, size on disk, parity with its source.
The policy (params `select`): among servable candidates within `max_accuracy_drop` of the FP32
reference, the highest throughput (or the lowest p99). PyTorch eager is measured as the baseline
but is not servable: the serving image carries no torch. A variant that `quantize` or `convert`
dropped at its parity gate is listed in the table with the reason, and never wins.

The cascade (pipelines/cascade.py) is a candidate too, when a `student` family is given: the
student's best servable ONNX Runtime variant (by the policy) answers the rows it is sure of, the
teacher's FP32 graph the rest. Its threshold is chosen on the VALIDATION split (the lowest that
keeps the cascade within `max_accuracy_drop` of the teacher there), raised where needed until an
upper confidence bound on the student's disagreement with the teacher on the training and
validation rows (`select.cascade_confidence`; the cascade can lose accuracy only where the two
disagree) is within `max_accuracy_drop` too; it is then measured on the test
split like the others (its student share in `extra`). When no threshold qualifies it is listed as
dropped, with the reason. When it wins, the output folder holds the teacher graph as model.onnx,
the student graph and cascade.json (threshold, both graphs' SHA-256).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import cascade
from pipelines.artifacts import atomic_path, file_sha256, read_json, write_json
from pipelines.cli import run_cli
from pipelines.config import Params, SelectConfig, section_dict
from pipelines.errors import SelectionError
from pipelines.quantize import MANIFEST, VARIANTS, split_inputs
from pipelines.runtime import logits, parity, read_metadata, session

log = logging.getLogger(__name__)
Predict = Callable[[np.ndarray], np.ndarray]
MODEL = "model.onnx"  # in the output folder: the winner's ONNX graph (what `register` registers)
WINNER = "winner.json"  # ... the winner, why, the policy and every candidate's figures
CANDIDATES = "candidates.md"  # ... the candidates as a Markdown table
GOLDEN = "golden.json"  # beside the winner: the deploy checks' labelled rows and predictions
GOLDEN_DECIMALS = 6  # probabilities are rounded so the file is byte-reproducible


@dataclass
class Candidate:
    name: str
    family: str
    engine: str
    precision: str
    servable: bool
    path: str
    accuracy: float = 0.0
    macro_f1: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    throughput: float = 0.0
    size_bytes: int = 0
    agreement: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


# --- the policy -------------------------------------------------------------------------------


def choose(candidates: Sequence[Candidate], cfg: SelectConfig) -> tuple[Candidate, str]:
    """The winner by policy, and a one-line explanation naming the runner-up.

    A challenger replaces the FP32 reference (the teacher on ONNX Runtime, when it qualifies)
    only when it beats it by `cfg.min_gain` (throughput at least (1 + min_gain) x, or p99 at most
    1 / (1 + min_gain) x): timings on a shared host move by several percent between runs, so a
    smaller lead would let `dvc repro` on another (or busier) machine pick another model (seen:
    cascade 65k vs teacher 64k samples/s, then teacher 186k vs cascade 155k). Raises
    SelectionError when no servable candidate reaches the accuracy floor."""
    reference = _reference(candidates)
    floor = reference.accuracy - cfg.max_accuracy_drop
    eligible = [c for c in candidates if c.servable and c.accuracy >= floor]
    if not eligible:
        best = max((c for c in candidates if c.servable), key=lambda c: c.accuracy, default=None)
        detail = f"; best servable: {best.name} at {best.accuracy:.4f}" if best else ""
        raise SelectionError(
            f"select: no servable candidate reaches accuracy {floor:.4f} (reference "
            f"{reference.name} {reference.accuracy:.4f} - max_accuracy_drop "
            f"{cfg.max_accuracy_drop:g}){detail}"
        )
    ranked = sorted(eligible, key=_score(cfg.policy))
    winner = ranked[0]
    if winner is not reference and reference in eligible and not _beats(winner, reference, cfg):
        return reference, _explain_kept(reference, winner, cfg, floor)
    return winner, _explain(winner, ranked[1] if len(ranked) > 1 else None, cfg, floor)


def _beats(challenger: Candidate, reference: Candidate, cfg: SelectConfig) -> bool:
    """Whether `challenger` leads `reference` by at least `cfg.min_gain` on the policy's figure."""
    gain = 1.0 + cfg.min_gain
    if cfg.policy == "throughput":
        return challenger.throughput >= gain * reference.throughput
    return challenger.p99_ms * gain <= reference.p99_ms


def _explain_kept(
    reference: Candidate, challenger: Candidate, cfg: SelectConfig, floor: float
) -> str:
    unit = "samples/s" if cfg.policy == "throughput" else "ms p99"
    value = (lambda c: c.throughput) if cfg.policy == "throughput" else (lambda c: c.p99_ms)
    return (
        f"{reference.name} wins as the FP32 reference: {value(reference):.4g} {unit}, accuracy "
        f"{reference.accuracy:.4f} (floor {floor:.4f}); runner-up {challenger.name}: "
        f"{value(challenger):.4g} {unit}, accuracy {challenger.accuracy:.4f}, leads by less than "
        f"select.min_gain {cfg.min_gain:g}"
    )


def _reference(candidates: Sequence[Candidate]) -> Candidate:
    for name in ("teacher/onnxruntime-fp32", "teacher/pytorch-fp32"):
        found = next((c for c in candidates if c.name == name), None)
        if found:
            return found
    raise SelectionError("select: no FP32 teacher candidate to compare against")


def _score(policy: str) -> Callable[[Candidate], tuple[float, float]]:
    if policy == "throughput":
        return lambda c: (-c.throughput, c.p99_ms)
    return lambda c: (c.p99_ms, -c.throughput)


def _explain(winner: Candidate, runner: Candidate | None, cfg: SelectConfig, floor: float) -> str:
    unit = "samples/s" if cfg.policy == "throughput" else "ms p99"
    value = (lambda c: c.throughput) if cfg.policy == "throughput" else (lambda c: c.p99_ms)
    line = (
        f"{winner.name} wins on {cfg.policy}: {value(winner):.4g} {unit}, accuracy "
        f"{winner.accuracy:.4f} (floor {floor:.4f})"
    )
    if runner is None:
        return line + "; no other candidate qualified"
    return (
        line
        + f"; runner-up {runner.name}: {value(runner):.4g} {unit}, accuracy {runner.accuracy:.4f}"
    )


# --- measuring ----------------------------------------------------------------------------------


def timings(predict: Predict, x: np.ndarray, cfg: SelectConfig) -> dict[str, float]:
    """p50/p99 latency of single rows and throughput at the serving batch, warm."""
    singles = [x[i % len(x) : i % len(x) + 1] for i in range(cfg.latency_iters)]
    batch = np.resize(x, (cfg.serving_batch, *x.shape[1:]))
    for _ in range(5):
        predict(singles[0])
        predict(batch)
    latencies = []
    for row in singles:
        start = time.perf_counter()
        predict(row)
        latencies.append((time.perf_counter() - start) * 1e3)
    start = time.perf_counter()
    for _ in range(cfg.throughput_iters):
        predict(batch)
    elapsed = time.perf_counter() - start
    return {
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "throughput": cfg.throughput_iters * cfg.serving_batch / elapsed,
    }


def score(
    candidate: Candidate,
    predict: Predict,
    x: np.ndarray,
    y: np.ndarray,
    reference: np.ndarray,
    cfg: SelectConfig,
) -> Candidate:
    """Fill in a candidate's accuracy, macro-F1, parity and timings."""
    from sklearn.metrics import f1_score

    out = np.concatenate([predict(x[i : i + 256]) for i in range(0, len(x), 256)])
    predicted = out.argmax(axis=1)
    candidate.accuracy = float(np.mean(predicted == y))
    candidate.macro_f1 = float(f1_score(y, predicted, average="macro"))
    candidate.agreement = parity(reference, out)["argmax_agreement"]
    candidate.size_bytes = Path(candidate.path).stat().st_size
    for key, value in timings(predict, x, cfg).items():
        setattr(candidate, key, value)
    return candidate


def onnx_predictor(path: Path, threads: int) -> Predict:
    sess = session(path, threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def torch_predictor(model_path: Path, threads: int) -> Predict:
    import torch

    from pipelines.models import load_model

    if threads:
        torch.set_num_threads(threads)
    model, _ = load_model(model_path)

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return predict


# --- the candidates ---------------------------------------------------------------------------


@dataclass
class Family:
    """One model's files: the PyTorch model, its FP32 ONNX, its quantized variants."""

    name: str
    model: Path
    onnx: Path
    variants: Path


def family_candidates(family: Family, cfg: SelectConfig) -> list[tuple[Candidate, Predict]]:
    f = family.name
    found = [
        (
            Candidate(f"{f}/pytorch-fp32", f, "pytorch", "fp32", False, str(family.model)),
            torch_predictor(family.model, cfg.threads),
        ),
        (
            Candidate(f"{f}/onnxruntime-fp32", f, "onnxruntime", "fp32", True, str(family.onnx)),
            onnx_predictor(family.onnx, cfg.threads),
        ),
    ]
    for variant in VARIANTS:
        path = family.variants / f"{variant}.onnx"
        if path.is_file():
            precision = variant.split("_", maxsplit=1)[0]
            candidate = Candidate(
                f"{f}/onnxruntime-{variant}", f, "onnxruntime", precision, True, str(path)
            )
            candidate.extra["variant"] = variant
            found.append((candidate, onnx_predictor(path, cfg.threads)))
    return found


def tensorrt_candidates(convert_dir: Path | None) -> list[tuple[Candidate, Predict]]:
    """Plans the convert stage built on this host (none where TensorRT is skipped)."""
    if convert_dir is None or not (convert_dir / "plans.json").is_file():
        return []
    from pipelines import tensorrt_engine

    found: list[tuple[Candidate, Predict]] = []
    for entry in read_json(convert_dir / "plans.json").get("plans", []):
        candidate = Candidate(
            f"{entry['family']}/tensorrt-{entry['precision']}",
            entry["family"],
            "tensorrt",
            entry["precision"],
            True,
            entry["plan"],
            extra={"onnx": entry["onnx"]},
        )
        found.append((candidate, tensorrt_engine.predictor(Path(entry["plan"]))))
    return found


def dropped_candidates(families: Sequence[Family], convert_dir: Path | None) -> list[Candidate]:
    """Variants that `quantize` or `convert` dropped at their parity gate, each with the reason
    and the figures measured there: listed in the table, never eligible."""
    found = []
    for fam in families:
        manifest = fam.variants / MANIFEST
        entries = read_json(manifest) if manifest.is_file() else {}
        for variant in VARIANTS:
            entry = entries.get(variant, {})
            if entry.get("status") == "dropped":
                name = f"{fam.name}/onnxruntime-{variant}"
                precision = variant.split("_", maxsplit=1)[0]
                found.append(_dropped(name, "onnxruntime", precision, entry))
    plans = convert_dir / "plans.json" if convert_dir is not None else None
    for entry in read_json(plans).get("dropped", []) if plans and plans.is_file() else []:
        name = f"{entry['family']}/tensorrt-{entry['precision']}"
        found.append(_dropped(name, "tensorrt", entry["precision"], entry))
    return found


def _dropped(name: str, engine: str, precision: str, entry: dict[str, Any]) -> Candidate:
    family = name.split("/", maxsplit=1)[0]
    extra = {"dropped": True, "reason": entry["reason"]}
    candidate = Candidate(name, family, engine, precision, False, "", extra=extra)
    candidate.accuracy = float(entry.get("accuracy", 0.0))
    candidate.agreement = float(entry.get("argmax_agreement", 0.0))
    return candidate


def tournament(
    families: Sequence[Family], convert_dir: Path | None, prepared_dir: Path, cfg: SelectConfig
) -> list[Candidate]:
    """Measure every candidate side by side, in one process; the dropped ones are listed as is."""
    spec = read_metadata(families[0].onnx)["preprocessing"]
    x, y = split_inputs(prepared_dir, "test", spec, families[0].onnx)
    reference = logits(session(families[0].onnx), x)
    pairs = [pair for fam in families for pair in family_candidates(fam, cfg)]
    pairs += tensorrt_candidates(convert_dir)
    measured = [score(c, predict, x, y, reference, cfg) for c, predict in pairs]
    found = cascade_candidate(families, measured, prepared_dir, cfg)
    if found is not None and found.extra.get("dropped"):
        measured.append(found)
    elif found is not None:
        measured.append(score_cascade(found, x, y, reference, cfg))
    return measured + dropped_candidates(families, convert_dir)


# --- the cascade --------------------------------------------------------------------------------


def cascade_candidate(
    families: Sequence[Family], measured: Sequence[Candidate], prepared_dir: Path, cfg: SelectConfig
) -> Candidate | None:
    """The cascade of the student's best servable ONNX Runtime variant (by `cfg.policy`, among
    `measured`) and the teacher's FP32 graph: not yet measured on the test split. Its threshold
    is the lowest that passes both `cascade.bounded_threshold` (`cfg.cascade_confidence`) on the
    disagreements of the training and validation rows and `cascade.choose_threshold` on the
    labelled validation split, both against `cfg.max_accuracy_drop`; extra `validation` holds the
    validation figures at that threshold, `disagreement` the bound's evidence. Training rows are
    in-sample for both models, so they may agree there more than on new data: the validation
    check stays. Where no validation row lies between the bound's threshold and the validation
    check's, the bound's (lower) one is kept: it answers the same validation rows. A dropped
    candidate (extra `reason`) when either admits no threshold or the validation split is empty;
    None without a `teacher` and a `student` family."""
    names = {fam.name for fam in families}
    teacher = next((c for c in measured if c.name == "teacher/onnxruntime-fp32"), None)
    students = [
        c for c in measured if c.family == "student" and c.servable and c.engine == "onnxruntime"
    ]
    if not {"teacher", "student"} <= names or teacher is None or not students:
        return None
    student = sorted(students, key=_score(cfg.policy))[0]
    name = f"cascade/{student.name.split('/', maxsplit=1)[1]}+teacher-fp32"
    precision = f"{student.precision}+{teacher.precision}"
    extra = {"student": student.path, "student_candidate": student.name, "teacher": teacher.path}
    found = Candidate(name, "cascade", "cascade", precision, True, teacher.path, extra=extra)
    spec = read_metadata(Path(teacher.path))["preprocessing"]
    if read_metadata(Path(student.path))["preprocessing"] != spec:
        return _refused(found, "the student's preprocessing differs from the teacher's")
    x, y = split_inputs(prepared_dir, "val", spec, Path(teacher.path))
    if not len(x):
        return _refused(found, "cascade: the validation split is empty (no rows to choose on)")
    student_engine = session(Path(student.path), cfg.threads)
    teacher_engine = session(Path(teacher.path), cfg.threads)
    student_out, teacher_out = logits(student_engine, x), logits(teacher_engine, x)
    train_x = split_inputs(prepared_dir, "train", spec, Path(teacher.path))[0]
    train_student = logits(student_engine, train_x)
    disagree = np.concatenate(
        [
            train_student.argmax(axis=1) != logits(teacher_engine, train_x).argmax(axis=1),
            student_out.argmax(axis=1) != teacher_out.argmax(axis=1),
        ]
    )
    conf = np.concatenate([cascade.confidence(train_student), cascade.confidence(student_out)])
    level, drop = cfg.cascade_confidence, cfg.max_accuracy_drop
    bound = cascade.bounded_threshold(conf, disagree, drop, level)
    if bound is None:
        return _refused(
            found,
            f"cascade: no threshold keeps the {level:g} upper confidence bound on the student's "
            f"disagreement with the teacher (train + validation rows) within max_accuracy_drop "
            f"{drop:g}",
        )
    chosen = cascade.choose_threshold(
        conf[len(train_x) :],
        student_out.argmax(axis=1) == y,
        teacher_out.argmax(axis=1) == y,
        drop,
        at_least=bound.threshold,
    )
    if chosen is None:
        return _refused(
            found,
            "cascade: no threshold lets the student answer any row within max_accuracy_drop "
            f"{drop:g} of the teacher (validation split; at least {bound.threshold:.4g}, the "
            "disagreement bound's)",
        )
    val_conf = conf[len(train_x) :]
    if not ((val_conf >= bound.threshold) & (val_conf < chosen.threshold)).any():
        # the bound's threshold answers the same validation rows, and more of the rest
        chosen = replace(chosen, threshold=bound.threshold)
    found.extra.update(
        threshold=chosen.threshold, validation=asdict(chosen), disagreement=asdict(bound)
    )
    return found


def _refused(candidate: Candidate, reason: str) -> Candidate:
    candidate.servable = False
    candidate.extra.update(dropped=True, reason=reason)
    return candidate


def cascade_predictor(candidate: Candidate, threads: int) -> cascade.Cascade:
    """The cascade candidate's engine (ONNX Runtime for both graphs, `threads` threads each)."""
    return cascade.Cascade(
        onnx_predictor(Path(candidate.extra["student"]), threads),
        onnx_predictor(Path(candidate.extra["teacher"]), threads),
        float(candidate.extra["threshold"]),
    )


def score_cascade(
    candidate: Candidate, x: np.ndarray, y: np.ndarray, reference: np.ndarray, cfg: SelectConfig
) -> Candidate:
    """`score` for the cascade, plus extra `student_share` (the test rows the student answered)
    and its size: both graphs. Timings are batched: a batch's unsure rows go to the teacher in
    one call."""
    predict = cascade_predictor(candidate, cfg.threads)
    answered = [0, 0]

    def count(student: int, teacher: int) -> None:
        answered[0] += student
        answered[1] += teacher

    predict.on_route = count
    for i in range(0, len(x), 256):  # the same calls as `score`'s accuracy pass
        predict(x[i : i + 256])
    predict.on_route = None
    score(candidate, predict, x, y, reference, cfg)
    candidate.extra["student_share"] = answered[0] / max(sum(answered), 1)
    candidate.size_bytes += Path(candidate.extra["student"]).stat().st_size
    return candidate


def markdown(candidates: Sequence[Candidate], winner: Candidate, explanation: str) -> str:
    """The candidate table, fastest first; dropped candidates last, with the reason."""
    columns = "candidate engine precision accuracy macro-F1 p50-ms p99-ms samples/s KiB agreement"
    columns += " note"
    rows = ["| " + " | ".join(columns.split()) + " |", "|" + "---|" * 11]
    for c in sorted(candidates, key=lambda c: (c.extra.get("dropped", False), -c.throughput)):
        rows.append(_table_row(c, winner))
    return "\n".join(rows) + f"\n\n{explanation}\n"


def _table_row(c: Candidate, winner: Candidate) -> str:
    if c.extra.get("dropped"):
        return (  # the reason says why (a parity gate, or a cascade no threshold admits)
            f"| {c.name} (dropped) | {c.engine} | {c.precision} | {c.accuracy:.4f} "
            f"| - | - | - | - | - | {c.agreement:.4f} | dropped: {c.extra['reason']} |"
        )
    mark = " **(winner)**" if c is winner else ("" if c.servable else " (baseline)")
    note = "" if c.servable else "not servable: the serving image has no torch"
    if c.engine == "cascade":
        note = (
            f"threshold {c.extra['threshold']:.4g}, student answers "
            f"{c.extra['student_share']:.1%} (test)"
        )
    return (
        f"| {c.name}{mark} | {c.engine} | {c.precision} | {c.accuracy:.4f} | {c.macro_f1:.4f} "
        f"| {c.p50_ms:.3f} | {c.p99_ms:.3f} | {c.throughput:,.0f} | {c.size_bytes / 1024:.1f} "
        f"| {c.agreement:.4f} | {note} |"
    )


# --- the golden set -----------------------------------------------------------------------------


def golden_indices(y: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Positions of `count` rows of `y` (class indices), stratified by class and seeded: every
    class keeps its share (scikit-learn's stratified split). All rows when `count` >= len(y); a
    plain seeded sample when stratifying is impossible (fewer rows than classes, or a class of one
    row). Sorted, so the set keeps the split's order."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(y))
    if count >= len(y):
        return positions
    classes, per_class = np.unique(y, return_counts=True)
    stratify = y if min(count, len(y) - count) >= len(classes) and per_class.min() >= 2 else None
    chosen, _ = train_test_split(
        positions, train_size=count, random_state=seed, shuffle=True, stratify=stratify
    )
    return np.sort(chosen)


def golden_set(
    predict: Predict,
    prepared_dir: Path,
    onnx_path: Path,
    count: int,
    seed: int,
    engine: str = "onnxruntime",
    precision: str = "fp32",
) -> dict[str, Any]:
    """The golden set: `count` test-split rows (stratified, seeded), raw, as `POST /predict` takes
    them (`{"rows": rows}`: each row the model's feature columns in data.value_range), with their
    class indices and the winner's softmax probabilities and predicted class indices, measured by
    `predict` (the winner's engine, on this host) on the same float32 input the service builds.

    Keys: rows, labels and predictions (class indices: positions in each probabilities list),
    probabilities (rounded to GOLDEN_DECIMALS), classes (the label of each class index), engine and
    precision (what measured them), onnx_sha256 (of `onnx_path`, the graph that ships)."""
    from pipelines.prepare import read_split
    from pipelines.preprocessing import to_model_input
    from pipelines.runtime import softmax

    manifest = read_json(prepared_dir / "manifest.json")
    frame = read_split(prepared_dir, "test")
    index = {label: i for i, label in enumerate(manifest["labels"])}
    y = frame[manifest["label_column"]].map(index).to_numpy()
    spec = read_metadata(onnx_path)["preprocessing"]
    features = frame[spec["feature_columns"]].to_numpy(dtype=np.float64)
    chosen = golden_indices(y, count, seed)
    rows = [[float(v) for v in row] for row in features[chosen]]
    x = to_model_input(np.asarray(rows, dtype=np.float32), spec)  # what service.infer does
    out = np.concatenate([predict(x[i : i + 256]) for i in range(0, len(x), 256)])
    probabilities = softmax(out).astype(np.float64).round(GOLDEN_DECIMALS)  # as service.infer
    return {
        "rows": rows,
        "labels": [int(v) for v in y[chosen]],
        "probabilities": probabilities.tolist(),
        "predictions": [int(v) for v in out.argmax(axis=1)],
        "classes": list(manifest["labels"]),
        "engine": engine,
        "precision": precision,
        "onnx_sha256": file_sha256(onnx_path),
    }


def winner_predictor(winner: Candidate, cfg: SelectConfig) -> Predict:
    """The winner's own engine on this host (the one the tournament measured it with)."""
    if winner.engine == "cascade":
        return cascade_predictor(winner, cfg.threads)
    if winner.engine == "tensorrt":
        from pipelines import tensorrt_engine

        return tensorrt_engine.predictor(Path(winner.path))
    return onnx_predictor(Path(winner.path), cfg.threads)


def write_served(winner: Candidate, out_dir: Path) -> None:
    """What serving needs into `out_dir`: the winner's ONNX graph as MODEL; for a cascade, that is
    the teacher graph, plus cascade.STUDENT and cascade.CASCADE (threshold, both SHA-256). A
    single-model winner leaves no cascade files behind (from an earlier run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / MODEL) as tmp:
        shutil.copyfile(Path(winner.extra.get("onnx", winner.path)), tmp)
    if winner.engine != "cascade":
        for stale in (cascade.CASCADE, cascade.STUDENT):
            (out_dir / stale).unlink(missing_ok=True)
        return
    with atomic_path(out_dir / cascade.STUDENT) as tmp:
        shutil.copyfile(winner.extra["student"], tmp)
    threshold = cascade.Threshold(threshold=winner.extra["threshold"], **_validation(winner))
    spec = cascade.describe(
        out_dir / MODEL,
        out_dir / cascade.STUDENT,
        threshold,
        student_candidate=winner.extra["student_candidate"],
        test_student_share=winner.extra["student_share"],
    )
    write_json(out_dir / cascade.CASCADE, spec)


def _validation(winner: Candidate) -> dict[str, float]:
    figures = dict(winner.extra["validation"])
    figures.pop("threshold", None)
    return figures


def select(
    families: Sequence[Family],
    convert_dir: Path | None,
    prepared_dir: Path,
    out_dir: Path,
    cfg: SelectConfig,
    golden_rows: int = 200,
    seed: int = 0,
    reference_rows: int = 2000,
) -> dict[str, Any]:
    """Measure, choose, and write out_dir/{model.onnx, winner.json, candidates.md, golden.json,
    reference/}. `golden_rows` (params deploy.golden_rows) and `seed` (params prepare.seed) pick
    the golden set (see `golden_set`); `reference_rows` (monitor.reference_rows) and `seed` the
    reference profile's sample (pipelines/reference.py; its predicted-label distribution is the
    winner's, on the test split, with the winner's engine)."""
    from pipelines.reference import build_reference

    candidates = tournament(families, convert_dir, prepared_dir, cfg)
    winner, explanation = choose(candidates, cfg)
    log.info("select: %s", explanation)
    write_served(winner, out_dir)
    predict = winner_predictor(winner, cfg)
    model = out_dir / MODEL
    golden = golden_set(
        predict, prepared_dir, model, golden_rows, seed, winner.engine, winner.precision
    )
    write_json(out_dir / GOLDEN, golden)
    spec = read_metadata(model)["preprocessing"]
    build_reference(prepared_dir, spec, predict, out_dir, reference_rows, seed)
    summary = {
        "winner": asdict(winner),
        "explanation": explanation,
        "policy": section_dict(cfg),
        "candidates": [asdict(c) for c in candidates],
        "dropped": {c.name: c.extra["reason"] for c in candidates if c.extra.get("dropped")},
    }
    write_json(out_dir / WINNER, summary)
    with atomic_path(out_dir / CANDIDATES) as tmp:
        tmp.write_text(markdown(candidates, winner, explanation))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--family",
        nargs=4,
        action="append",
        required=True,
        metavar=("NAME", "MODEL", "ONNX", "VARIANTS_DIR"),
    )
    parser.add_argument(
        "--families", type=Path, default=None, help="more families: a prune stage's families.json"
    )
    parser.add_argument("--convert", type=Path, default=None, help="convert stage's output folder")
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    run_cli(lambda params: _run(params, args), args.params)


def _run(params: Params, args: argparse.Namespace) -> None:
    from pipelines.tracking import stage_run

    listed = list(args.family)
    if args.families is not None:
        from pipelines.prune import read_families

        listed += read_families(args.families)
    families = [Family(n, Path(m), Path(o), Path(v)) for n, m, o, v in listed]
    data_hash = read_json(args.prepared / "manifest.json")["content_hash"]
    section = {
        "select": section_dict(params.select),
        "deploy": {"golden_rows": params.deploy.golden_rows},
        "prepare": {"seed": params.prepare.seed},
        "monitor": {"reference_rows": params.monitor.reference_rows},
    }
    with stage_run("select", params, section, Path.cwd(), data_hash) as run:
        summary = select(
            families,
            args.convert,
            args.prepared,
            args.out,
            params.select,
            golden_rows=params.deploy.golden_rows,
            seed=params.prepare.seed,
            reference_rows=params.monitor.reference_rows,
        )
        winner = summary["winner"]
        metrics = {k: winner[k] for k in ("accuracy", "macro_f1", "p50_ms", "p99_ms", "throughput")}
        if winner["engine"] == "cascade":
            metrics["student_share"] = winner["extra"]["student_share"]
            metrics["cascade_threshold"] = winner["extra"]["threshold"]
        dropped = summary["dropped"]
        write_json(
            args.metrics,
            {
                "winner": winner["name"],
                **metrics,
                "explanation": summary["explanation"],
                "dropped": dropped,
            },
        )
        run.log_metrics(metrics)
        run.set_tags(
            {
                "select.winner": winner["name"],
                "select.explanation": summary["explanation"],
                "select.dropped": "; ".join(f"{k}: {v}" for k, v in dropped.items()) or "none",
            }
        )
        run.log_artifact(args.out / CANDIDATES)
        run.log_artifact(args.out / WINNER)


if __name__ == "__main__":
    main()
