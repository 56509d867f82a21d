"""A cascade's files for tests: a tiny teacher and a weaker student, exported, and cascade.json
with a threshold at which both models answer part of the test split."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from pipelines.artifacts import write_json
from pipelines.cascade import CASCADE, STUDENT, Threshold, confidence, describe
from pipelines.export import export
from pipelines.quantize import split_inputs
from pipelines.runtime import logits, read_metadata, session
from tests.helpers.modelzoo import trained_model, write_golden
from tests.helpers.params import tiny_params


def cascade_folder(root: Path, golden: bool = False) -> tuple[Path, Path]:
    """(folder, prepared dir): `root`/cascade holding model.onnx (a teacher trained 8 epochs),
    STUDENT (the same network trained 1 epoch), metadata.json, CASCADE whose threshold is the
    student's median confidence on the test split (each model answers about half of it) and,
    with `golden`, a golden set (50 rows, by the teacher alone: enough for packaging)."""
    params = tiny_params(**{"train.epochs": 8, "train.patience": 8})
    prepared, teacher = trained_model(root / "teacher", params)
    weak = tiny_params(**{"train.epochs": 1})
    _, student = trained_model(root / "student", weak)
    folder = root / "cascade"
    folder.mkdir(parents=True)
    export(params.export, teacher, prepared, folder / "model.onnx")
    export(weak.export, student, prepared, root / "student.onnx")
    shutil.copy(root / "student.onnx", folder / STUDENT)
    spec = read_metadata(folder / "model.onnx")
    (folder / "metadata.json").write_text(json.dumps(spec))
    x, _ = split_inputs(prepared, "test", spec["preprocessing"])
    ranked = np.sort(confidence(logits(session(folder / STUDENT), x)))
    middle = len(ranked) // 2  # halfway between two rows: no row sits on the threshold
    threshold = float((ranked[middle - 1] + ranked[middle]) / 2)
    figures = Threshold(threshold, 0.5, 0.0, 0.0)  # the validation figures are not used here
    write_json(folder / CASCADE, describe(folder / "model.onnx", folder / STUDENT, figures))
    if golden:
        write_golden(folder / "model.onnx", prepared, folder / "golden.json")
    return folder, prepared
