"""The cascade against the teacher alone and the student alone, on the test split, for the digits
CNN and an image model.

Runs `select`'s own tournament (pipelines/select.py: the same measurement, the same threshold
choice) on a teacher and a student, and prints, side by side from one process: accuracy, the
share the student answers, throughput at `select.serving_batch` and p50/p99 at batch 1, for the
teacher (ONNX Runtime FP32), the student variant the cascade uses, the cascade as `select` now
chooses it (validation split AND the disagreement bound, `select.cascade_confidence`) and, for
comparison, the cascade on the validation split alone (`cascade_confidence` 0, the former rule);
plus the bound's evidence (rows, disagreements, upper bound), whether each cascade holds the
floor (teacher accuracy - `select.max_accuracy_drop`) on the test split, and the load average.

Cases:
- `digits`: the pipeline's outputs already built (`dvc repro quantize`): --models (models/train,
  models/distill, models/export, models/quantize under it) and --prepared.
- `image`: built here in a temp folder with the pipeline's own functions (prepare, train,
  distill, export, quantize): ResNet-18 (`--image-width` stem channels, as the own-data image
  recipe) as the teacher and a ResNet-18 of half that width as the student (the digits' small
  CNN reached 0.20 here: two convolutions see too little of a 32x32 image), on 32x32 images
  made at run time (nothing downloaded): scikit-learn's 1,797 8x8 digits upscaled 4x, shifted by
  up to 3 pixels and blurred with pixel noise, one image per source digit (so no near-copies
  cross the splits). The test split holds 270 rows: one row is ~0.37%.

Run (the image case trains ResNet-18 for --epochs and distills the CNN as long: most of the
time; several minutes on the quiet 2-core host):
    python benchmarks/cascade.py --out cascade.json [--work /tmp/cascade-image]
`--quick` shrinks epochs and timing loops (a smoke run, not figures).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_args import positive_float, positive_int

from pipelines.config import Params, SelectConfig, load_params
from pipelines.select import (
    Candidate,
    Family,
    cascade_candidate,
    score_cascade,
    tournament,
)

REPO = Path(__file__).resolve().parents[1]
IMAGE: dict[str, Any] = {  # 32x32 grayscale rows as CSV pixels, ResNet-18 teacher and student
    "data.source": "data/digits32.csv",
    "data.features": {"prefix": "px_", "count": 1024},
    "data.labels": list(range(10)),
    "data.value_range": [0.0, 1.0],
    "data.image_shape": [32, 32],
    "train.model": {"arch": "resnet18", "width": 16, "depth": 2, "dropout": 0.0},
    "train.batch_size": 64,
    "distill.model": {"arch": "resnet18", "width": 8, "depth": 2, "dropout": 0.0},
    "select.throughput_iters": 20,
    "select.latency_iters": 100,
}
QUICK = {"train.epochs": 1, "select.throughput_iters": 3, "select.latency_iters": 10}


def digits32(path: Path, seed: int = 0) -> None:
    """scikit-learn's 8x8 digits as 32x32 images in [0, 1] (CSV: px_0..px_1023, label): each
    upscaled 4x, shifted by -3..3 pixels each way and given Gaussian pixel noise (sd 0.2)."""
    import pandas as pd
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    big = np.kron(digits.images / 16.0, np.ones((4, 4)))  # (n, 32, 32)
    images = np.empty_like(big)
    for i, image in enumerate(big):
        dy, dx = rng.integers(-3, 4, size=2)
        images[i] = np.roll(image, (dy, dx), axis=(0, 1))
    images = np.clip(images + rng.normal(0, 0.2, images.shape), 0, 1).reshape(len(big), -1)
    frame = pd.DataFrame(images.astype(np.float32), columns=[f"px_{i}" for i in range(1024)])
    frame["label"] = digits.target
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.4f")


def build_image(params: Params, root: Path) -> tuple[list[Family], Path]:
    """prepare, train, distill, export and quantize on `params` under `root` (the pipeline's
    functions, as dvc.yaml chains them): the teacher and student families and the prepared
    folder."""
    from pipelines.distill import distill
    from pipelines.export import export
    from pipelines.models import save_model
    from pipelines.prepare import prepare
    from pipelines.quantize import quantize
    from pipelines.train import train

    prepared = root / "prepared"
    prepare(params.data, params.prepare, root, prepared)
    teacher = root / "train" / "model.pt"
    if not teacher.is_file():  # --work: a model built by an earlier run is reused
        save_model(teacher, train(params.train, prepared, root / "ckpt-train"))
    student = root / "distill" / "model.pt"
    if not student.is_file():
        trained = distill(params.train, params.distill, teacher, prepared, root / "ckpt-distill")
        save_model(student, trained)
    for name, model in (("teacher", teacher), ("student", student)):
        export(params.export, model, prepared, root / "export" / f"{name}.onnx")
        quantize(
            params.quantize, root / "export" / f"{name}.onnx", prepared, root / "quantize" / name
        )
    return families(root), prepared


def families(models: Path) -> list[Family]:
    """The teacher and student families as dvc.yaml's `select` stage names them."""
    return [
        Family(
            name,
            models / stage / "model.pt",
            models / "export" / f"{name}.onnx",
            models / "quantize" / name,
        )
        for name, stage in (("teacher", "train"), ("student", "distill"))
    ]


def validation_only(
    fams: list[Family], measured: list[Candidate], prepared: Path, cfg: SelectConfig
) -> Candidate | None:
    """The cascade the former rule picks (validation split alone: `cascade_confidence` 0),
    measured on the test split like select's."""
    from pipelines.quantize import split_inputs
    from pipelines.runtime import logits, read_metadata, session

    singles = [c for c in measured if c.engine != "cascade"]
    found = cascade_candidate(
        fams, singles, prepared, cfg.model_copy(update={"cascade_confidence": 0.0})
    )
    if found is None or found.extra.get("dropped"):
        return found
    spec = read_metadata(fams[0].onnx)["preprocessing"]
    x, y = split_inputs(prepared, "test", spec, fams[0].onnx)
    reference = logits(session(fams[0].onnx), x)
    found.name += " (validation only)"
    return score_cascade(found, x, y, reference, cfg)


def rows(measured: list[Candidate], floor: float) -> list[dict[str, Any]]:
    """teacher FP32, the cascade's student variant and the cascades (when not dropped)."""
    by_name = {c.name: c for c in measured}
    cascades = [c for c in measured if c.engine == "cascade"]
    names = ["teacher/onnxruntime-fp32"]
    live = [c for c in cascades if not c.extra.get("dropped")]
    if live:
        names.append(live[0].extra["student_candidate"])
    out = []
    for c in [by_name[name] for name in names] + cascades:
        if c.extra.get("dropped"):
            out.append({"candidate": c.name, "dropped": c.extra["reason"]})
            continue
        share = c.extra.get("student_share", 1.0 if c.family == "student" else 0.0)
        row = {
            "candidate": c.name,
            "accuracy": round(c.accuracy, 4),
            "holds_floor": c.accuracy >= floor - 1e-12,
            "student_share": round(share, 4),
            "samples_per_s": round(c.throughput),
            "p50_ms": round(c.p50_ms, 3),
            "p99_ms": round(c.p99_ms, 3),
        }
        if c.engine == "cascade":
            row["threshold"] = round(c.extra["threshold"], 6)
            row["validation"] = {k: round(v, 4) for k, v in c.extra["validation"].items()}
            if "disagreement" in c.extra and c.extra["disagreement"]["confidence_level"] > 0:
                row["disagreement"] = c.extra["disagreement"]
        out.append(row)
    return out


def run_case(name: str, fams: list[Family], prepared: Path, cfg: SelectConfig) -> dict[str, Any]:
    """The tournament plus the validation-only cascade, with the floor on the test split."""
    load_before = os.getloadavg()
    start = time.perf_counter()
    measured = tournament(fams, None, prepared, cfg)
    old = validation_only(fams, measured, prepared, cfg)
    measured += [old] if old is not None else []
    teacher = next(c for c in measured if c.name == "teacher/onnxruntime-fp32")
    floor = teacher.accuracy - cfg.max_accuracy_drop
    table = rows(measured, floor)
    return {
        "case": name,
        "rows": table,
        "test_rows": _test_rows(prepared),
        "test_floor": round(floor, 4),
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "cascade_confidence": cfg.cascade_confidence,
        "serving_batch": cfg.serving_batch,
        "threads": cfg.threads,
        "seconds": round(time.perf_counter() - start, 1),
        "load_average": [round(v, 2) for v in (*load_before, *os.getloadavg())],
    }


def _test_rows(prepared: Path) -> int:
    import pandas as pd

    return len(pd.read_parquet(prepared / "test.parquet"))


def report(result: dict[str, Any]) -> None:
    print(
        f"\n== {result['case']}: {result['test_rows']} test rows, floor {result['test_floor']} =="
    )
    print(f"{'candidate':<58} {'accuracy':>8} {'floor':>5} {'student':>7} {'samples/s':>10}")
    for r in result["rows"]:
        if "dropped" in r:
            print(f"{r['candidate']:<58} dropped: {r['dropped']}")
            continue
        print(
            f"{r['candidate']:<58} {r['accuracy']:>8.4f} {'yes' if r['holds_floor'] else 'NO':>5} "
            f"{r['student_share']:>7.1%} {r['samples_per_s']:>10,}"
        )
        if "threshold" in r:
            print(f"    threshold {r['threshold']:.4g}, validation {r['validation']}")
        if "disagreement" in r:
            print(f"    bound {r['disagreement']}")
    print(f"load average {result['load_average']}, {result['seconds']} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument(
        "--cases", nargs="+", choices=["digits", "image"], default=["digits", "image"]
    )
    parser.add_argument(
        "--image-width", type=positive_int, default=16, help="ResNet-18 stem channels"
    )
    parser.add_argument(
        "--iters", type=positive_float, default=1.0, help="x select's timing iterations"
    )
    parser.add_argument("--epochs", type=positive_int, default=8, help="image case: train.epochs")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="image case: build here and keep it (a rerun reuses the trained models there: "
        "delete train/ or distill/ after changing a model setting); default a temp folder",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny loops")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    quick = QUICK if args.quick else {}
    results = []
    if "digits" in args.cases:
        params = load_params(
            args.params, overrides={k: v for k, v in quick.items() if "select" in k}
        )
        cfg = _scaled(params.select, args.iters)
        results.append(run_case("digits", families(args.models), args.prepared, cfg))
        report(results[-1])
    if "image" in args.cases:
        with tempfile.TemporaryDirectory() as tmp:
            root = args.work or Path(tmp)
            digits32(root / "data" / "digits32.csv")
            model = {**IMAGE["train.model"], "width": args.image_width}
            student = {**IMAGE["distill.model"], "width": max(args.image_width // 2, 1)}
            image = IMAGE | {
                "train.model": model,
                "distill.model": student,
                "train.epochs": args.epochs,
            }
            params = load_params(args.params, overrides=image | quick)
            start = time.perf_counter()
            fams, prepared = build_image(params, root)
            built = round(time.perf_counter() - start, 1)
            results.append(run_case("image", fams, prepared, _scaled(params.select, args.iters)))
            results[-1]["build_seconds"] = built
            report(results[-1])
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


def _scaled(cfg: SelectConfig, iters: float) -> SelectConfig:
    return cfg.model_copy(
        update={
            "latency_iters": max(int(cfg.latency_iters * iters), 10),
            "throughput_iters": max(int(cfg.throughput_iters * iters), 3),
        }
    )


if __name__ == "__main__":
    main()
