"""Structured pruning: accuracy and speed of each `prune.ratios` family against the unpruned
teacher, measured by the `select` tournament itself (test split, same process, side by side).

Two models, each built with the pipeline's own functions (prepare → train → export → quantize for
the teacher; `pipelines.prune.prune` for the pruned families; then `select`) in a temp folder:
- `digits`: params.yaml as it is (the digits CNN, 8x8);
- `image`: ResNet-18 (`--image-width` stem channels) on 32x32 inputs, trained briefly on
  synthetic data (benchmarks/model_speed.py's 10 noisy class templates), where compute dominates
  the per-call overheads.

For each family and engine (ONNX Runtime FP32 and INT8 `int8_cpu`), select's figures: test
accuracy, throughput at select.serving_batch, p99 at batch 1, parameters; and the ratios
throughput ÷ the teacher's on the same engine. Plus the tournament's winner. Run:
  python benchmarks/prune_speed.py [--ratios 0.3 0.5] [--image-width 16] [--out figures.json]
`--quick` shrinks epochs and timing loops (a smoke run, not figures).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks.` from a plain run

from bench_args import fraction, positive_int

from benchmarks.model_speed import LARGE, synthetic_images, teacher
from pipelines.config import Params, load_params
from pipelines.prune import FAMILIES, prune, read_families
from pipelines.select import Family, select

REPO = Path(__file__).resolve().parents[1]
IMAGE = LARGE | {  # model_speed's 32x32 data, with the ResNet-18 the own-data recipe uses
    "train.model": {"arch": "resnet18", "width": 16, "depth": 2, "dropout": 0.0},
    "train.epochs": 3,
    "select.throughput_iters": 20,
    "select.latency_iters": 100,
}
QUICK = {  # a smoke run: the mechanics, not figures
    "train.epochs": 1,
    "prune.epochs": 1,
    "select.throughput_iters": 3,
    "select.latency_iters": 20,
}
ENGINES = ("onnxruntime-fp32", "onnxruntime-int8_cpu")


def build(params: Params, root: Path) -> dict[str, Any]:
    """Teacher, pruned families and the tournament on `params`; select's summary."""
    prepared, family = teacher(params, root)
    families = [family]
    pruning = prune(params, family.model, prepared, root / "prune")
    families += [Family(*entry) for entry in read_families(root / "prune" / FAMILIES)]
    summary = select(families, None, prepared, root / "select", params.select)
    return {"summary": summary, "pruning": pruning}


def table(built: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per family x engine, with throughput ÷ the teacher's on the same engine."""
    found = {c["name"]: c for c in built["summary"]["candidates"]}
    rows = []
    for family in ["teacher", *built["pruning"]]:
        params = built["pruning"].get(family, {})
        for engine in ENGINES:
            c = found.get(f"{family}/{engine}")
            if c is None or c["extra"].get("dropped"):
                reason = c["extra"].get("reason", "") if c else "not built"
                rows.append({"family": family, "engine": engine, "dropped": reason})
                continue
            teacher = found[f"teacher/{engine}"]
            measured = not teacher["extra"].get("dropped")  # else no teacher figure to divide by
            rows.append(
                {
                    "family": family,
                    "engine": engine,
                    "params": params.get("params_after", params.get("params_before")),
                    "accuracy": c["accuracy"],
                    "throughput": c["throughput"],
                    "p99_ms": c["p99_ms"],
                    "speedup": c["throughput"] / teacher["throughput"] if measured else None,
                }
            )
    return rows


def report(results: dict[str, Any]) -> None:
    for case, result in results.items():
        load = result["load_average"]
        print(f"\n== {case} ({result['seconds']:.0f} s; load average at the end {load}) ==")
        print(f"{'family':<10} {'engine':<22} {'accuracy':>9} {'samples/s':>10} {'x teacher':>9}")
        for r in result["rows"]:
            if "dropped" in r:
                print(f"{r['family']:<10} {r['engine']:<22} dropped: {r['dropped']}")
                continue
            speedup = "-" if r["speedup"] is None else f"{r['speedup']:.2f}"
            print(
                f"{r['family']:<10} {r['engine']:<22} {r['accuracy']:>9.4f} "
                f"{r['throughput']:>10,.0f} {speedup:>9}"
            )
        for name, fig in result["pruning"].items():
            print(
                f"{name}: params {fig['params_before']:,} -> {fig['params_after']:,}, MACs "
                f"{fig['macs_before']:,} -> {fig['macs_after']:,}; val accuracy pruned "
                f"{fig['val_accuracy_pruned']:.4f}, fine-tuned {fig['val_accuracy']:.4f}"
            )
        print(f"tournament: {result['explanation']}")


def run_case(name: str, params: Params, root: Path) -> dict[str, Any]:
    print(f"[{name}] building with the pipeline's functions ...", flush=True)
    start = time.perf_counter()
    built = build(params, root)
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "rows": table(built),
        "pruning": built["pruning"],
        "winner": built["summary"]["winner"]["name"],
        "explanation": built["summary"]["explanation"],
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", type=fraction, nargs="+", default=None, help="prune.ratios")
    parser.add_argument(
        "--image-width", type=positive_int, default=16, help="ResNet-18 stem channels"
    )
    parser.add_argument(
        "--cases", nargs="+", choices=["digits", "image"], default=["digits", "image"]
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny loops")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    common: dict[str, Any] = {"prune.ratios": args.ratios} if args.ratios else {}
    common |= QUICK if args.quick else {}
    image = IMAGE | {"train.model": {**IMAGE["train.model"], "width": args.image_width}}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if "digits" in args.cases:
            digits = load_params(REPO / "params.yaml", overrides=common)
            results["digits"] = run_case("digits", digits, root / "digits")
        if "image" in args.cases:
            synthetic_images(root / "image" / "data" / "synthetic32.csv")
            params = load_params(REPO / "params.yaml", overrides=image | common)
            results["image"] = run_case("image", params, root / "image")
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
