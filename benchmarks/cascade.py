"""The cascade against the teacher alone and the student alone, on the test split.

Runs `select`'s own tournament (pipelines/select.py: the same measurement, the same threshold
choice on the validation split) on a teacher and a student already built by the pipeline, and
prints, side by side from one process: accuracy, the share the student answers, throughput at
`select.serving_batch` and p50/p99 at batch 1, for the teacher (ONNX Runtime FP32), the student
variant the cascade uses, and the cascade; plus cascade ÷ teacher throughput and the load average.

Run (after `dvc repro quantize`; digits, ~1 minute on a quiet host):
    python benchmarks/cascade.py --out cascade.json
For another model, point --models at its pipeline outputs (models/train, models/distill,
models/export, models/quantize under it) and --prepared at its prepared data.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from pipelines.config import load_params
from pipelines.select import Candidate, Family, tournament

REPO = Path(__file__).resolve().parents[1]


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


def rows(measured: list[Candidate]) -> list[dict[str, Any]]:
    """teacher FP32, the cascade's student variant and the cascade (when it was not dropped)."""
    by_name = {c.name: c for c in measured}
    cascade = next((c for c in measured if c.engine == "cascade"), None)
    names = ["teacher/onnxruntime-fp32"]
    if cascade is not None and not cascade.extra.get("dropped"):
        names += [cascade.extra["student_candidate"], cascade.name]
    out = []
    for name in names:
        c = by_name[name]
        share = c.extra.get("student_share", 1.0 if c.family == "student" else 0.0)
        out.append(
            {
                "candidate": name,
                "accuracy": round(c.accuracy, 4),
                "student_share": round(share, 4),
                "samples_per_s": round(c.throughput),
                "p50_ms": round(c.p50_ms, 3),
                "p99_ms": round(c.p99_ms, 3),
                "threshold": c.extra.get("threshold"),
            }
        )
    if cascade is not None and cascade.extra.get("dropped"):
        out.append({"candidate": cascade.name, "dropped": cascade.extra["reason"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--prepared", type=Path, default=REPO / "data" / "prepared")
    parser.add_argument("--iters", type=float, default=1.0, help="x select's timing iterations")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    cfg = load_params(args.params).select
    cfg = cfg.model_copy(
        update={
            "latency_iters": max(int(cfg.latency_iters * args.iters), 10),
            "throughput_iters": max(int(cfg.throughput_iters * args.iters), 3),
        }
    )
    load_before = os.getloadavg()
    measured = tournament(families(args.models), None, args.prepared, cfg)
    table = rows(measured)
    result: dict[str, Any] = {
        "rows": table,
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "serving_batch": cfg.serving_batch,
        "threads": cfg.threads,
        "load_average": [round(v, 2) for v in (*load_before, *os.getloadavg())],
    }
    if len(table) == 3:
        result["cascade_over_teacher_throughput"] = round(
            table[2]["samples_per_s"] / table[0]["samples_per_s"], 3
        )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
