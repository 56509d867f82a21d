"""Model speed on this CPU: PyTorch eager FP32 vs ONNX Runtime FP32 vs ONNX Runtime INT8.

Two models, each built with the pipeline's own stages (prepare → train → export → quantize →
select) in a temp folder:
- `default`: params.yaml as it is, on the built-in digits (8x8);
- `large`: a wider CNN (width 64, depth 3) on 32x32 inputs, trained briefly on synthetic data
  (10 noisy class templates), where compute dominates the per-call overheads.

For each, side by side in one process: throughput (samples/s) at batch 1 and batch 64, and
accuracy on the test split, for the three engines; the INT8 ÷ FP32 ratio on ONNX Runtime; and
whether the `select` tournament picked the candidate this benchmark measures as fastest among
those within the accuracy floor. Run: `python benchmarks/model_speed.py [--out figures.json]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.config import Params, load_params
from pipelines.export import export
from pipelines.models import save_model
from pipelines.prepare import prepare
from pipelines.quantize import quantize, split_inputs
from pipelines.runtime import read_metadata
from pipelines.select import Family, onnx_predictor, select, torch_predictor
from pipelines.train import train

REPO = Path(__file__).resolve().parents[1]
THREADS = 2
LARGE = {
    "data.source": "data/synthetic32.csv",
    "data.features": {"prefix": "px_", "count": 1024},
    "data.labels": list(range(10)),
    "data.value_range": [0.0, 1.0],
    "data.image_shape": [32, 32],
    "train.model": {"arch": "cnn", "width": 64, "depth": 3, "dropout": 0.0},
    "train.epochs": 2,
    "train.batch_size": 128,
}


def synthetic_images(path: Path, rows: int = 4000, seed: int = 0) -> None:
    """10 classes: a random 32x32 template each, plus strong pixel noise, clipped to [0, 1]."""
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 1, size=(10, 1024))
    labels = rng.integers(0, 10, size=rows)
    images = np.clip(templates[labels] * 0.6 + rng.uniform(0, 0.4, size=(rows, 1024)), 0, 1)
    frame = pd.DataFrame(images.astype(np.float32), columns=[f"px_{i}" for i in range(1024)])
    frame["label"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, float_format="%.4f")


def teacher(params: Params, root: Path) -> tuple[Path, Family]:
    """prepare, train, export and quantize on `params` under `root`: (the prepared folder, the
    teacher's family of files for select)."""
    prepared = root / "prepared"
    prepare(params.data, params.prepare, root, prepared)
    model = root / "model.pt"
    save_model(model, train(params.train, prepared, root / "checkpoints"))
    export(params.export, model, prepared, root / "model.onnx")
    quantize(params.quantize, root / "model.onnx", prepared, root / "variants")
    return prepared, Family("teacher", model, root / "model.onnx", root / "variants")


def build(params: Params, root: Path) -> dict[str, Any]:
    """The pipeline's stages on `params`; returns the select summary and the file paths."""
    prepared, family = teacher(params, root)
    model = family.model
    summary = select([family], None, prepared, root / "select", params.select)
    return {"summary": summary, "prepared": prepared, "model": model, "family": family}


def throughput(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> float:
    """Samples/s over ~1.5 s of warm calls at a fixed batch size."""
    data = np.resize(x, (max(batch, 256), *x.shape[1:]))
    batches = [data[i : i + batch] for i in range(0, len(data) - batch + 1, batch)]
    for b in batches[:3]:
        predict(b)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < 1.5:
        predict(batches[calls % len(batches)])
        calls += 1
    return calls * batch / (time.perf_counter() - start)


def accuracy(predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    out = np.concatenate([predict(x[i : i + 256]) for i in range(0, len(x), 256)])
    return float(np.mean(out.argmax(axis=1) == y))


def measure(built: dict[str, Any]) -> dict[str, Any]:
    family: Family = built["family"]
    spec = read_metadata(family.onnx)["preprocessing"]
    x, y = split_inputs(built["prepared"], "test", spec)
    engines = {
        "pytorch_fp32": torch_predictor(family.model, THREADS),
        "onnxruntime_fp32": onnx_predictor(family.onnx, THREADS),
        "onnxruntime_int8": onnx_predictor(family.variants / "int8_cpu.onnx", THREADS),
    }
    rows = {}
    for name, predict in engines.items():
        rows[name] = {
            "accuracy": accuracy(predict, x, y),
            "batch1_per_s": throughput(predict, x, 1),
            "batch64_per_s": throughput(predict, x, 64),
        }
    return rows


def verdict(built: dict[str, Any], params: Params) -> dict[str, Any]:
    """Did the tournament pick the fastest candidate within the floor, as measured here?"""
    summary = built["summary"]
    candidates = summary["candidates"]
    reference = next(c for c in candidates if c["name"] == "teacher/onnxruntime-fp32")
    floor = reference["accuracy"] - params.select.max_accuracy_drop
    eligible = [c for c in candidates if c["servable"] and c["accuracy"] >= floor]
    fastest = max(eligible, key=lambda c: c["throughput"])
    return {
        "winner": summary["winner"]["name"],
        "fastest_eligible": fastest["name"],
        "picked_measured_winner": summary["winner"]["name"] == fastest["name"],
        "explanation": summary["explanation"],
    }


def run_case(name: str, params: Params, root: Path) -> dict[str, Any]:
    print(f"[{name}] building with the pipeline's stages ...", flush=True)
    built = build(params, root)
    rows = measure(built)
    fp32, int8 = rows["onnxruntime_fp32"], rows["onnxruntime_int8"]
    return {
        "engines": rows,
        "int8_over_fp32_batch64": int8["batch64_per_s"] / fp32["batch64_per_s"],
        "int8_over_fp32_batch1": int8["batch1_per_s"] / fp32["batch1_per_s"],
        "accuracy_drop_points": 100 * (fp32["accuracy"] - int8["accuracy"]),
        "tournament": verdict(built, params),
    }


def report(results: dict[str, Any]) -> None:
    for case, result in results.items():
        print(f"\n== {case} ==")
        print(f"{'engine':<18} {'accuracy':>9} {'batch 1 /s':>12} {'batch 64 /s':>12}")
        for engine, row in result["engines"].items():
            print(
                f"{engine:<18} {row['accuracy']:>9.4f} {row['batch1_per_s']:>12,.0f} "
                f"{row['batch64_per_s']:>12,.0f}"
            )
        print(
            f"INT8/FP32 (ONNX Runtime): batch 64 {result['int8_over_fp32_batch64']:.2f}x, "
            f"batch 1 {result['int8_over_fp32_batch1']:.2f}x; "
            f"accuracy drop {result['accuracy_drop_points']:.2f} points"
        )
        print(f"tournament: {result['tournament']['explanation']}")
        print(f"picked the measured winner: {result['tournament']['picked_measured_winner']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        default = load_params(REPO / "params.yaml")
        synthetic_images(root / "large" / "data" / "synthetic32.csv")
        large = load_params(REPO / "params.yaml", overrides=LARGE)
        results = {
            "default": run_case("default", default, root / "default"),
            "large": run_case("large", large, root / "large"),
        }
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
