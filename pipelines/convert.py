"""`convert`: TensorRT plans from the FP16 and INT8 (Q/DQ) graphs, parity-checked against FP32 ONNX.

Where there is no CUDA device or no TensorRT (every CPU host), the stage records "skipped" with the
reason in its metrics and in MLflow, and the pipeline goes on. A plan whose source variant
`quantize` dropped, or that misses its parity gate, is dropped the same way, with its reason.
All TensorRT calls live in `pipelines/tensorrt_engine.py`.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from pipelines import tensorrt_engine
from pipelines.artifacts import read_json, write_json
from pipelines.cli import run_cli
from pipelines.config import ConvertConfig, Params, section_dict
from pipelines.quantize import MANIFEST, split_inputs
from pipelines.runtime import logits, parity, read_metadata, session

SOURCES = {"fp16": "fp16.onnx", "int8": "int8_qdq.onnx"}
log = logging.getLogger(__name__)


def build(onnx_path: Path, plan_path: Path, cfg: ConvertConfig) -> None:
    """Build one plan in a subprocess, killed past `cfg.timeout_s`."""
    args = [
        str(onnx_path),
        str(plan_path),
        str(cfg.max_batch),
        str(cfg.opt_batch),
        str(cfg.workspace_mib),
    ]
    command = [sys.executable, "-m", "pipelines.tensorrt_engine", *args]
    try:
        subprocess.run(command, check=True, timeout=cfg.timeout_s, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"TensorRT build of {onnx_path} exceeded {cfg.timeout_s:g} s") from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"TensorRT build of {onnx_path} failed:\n{exc.stderr[-2000:]}") from None


def convert_one(
    family: str,
    fp32: Path,
    variants: Path,
    precision: str,
    out_dir: Path,
    prepared_dir: Path,
    cfg: ConvertConfig,
) -> dict[str, Any]:
    """One plan, parity-checked against FP32 ONNX: its record with `status` "built", or "dropped"
    with the reason (the source variant was dropped by `quantize`, or the plan misses the gate)."""
    source = variants / SOURCES[precision]
    record: dict[str, Any] = {"family": family, "precision": precision, "onnx": str(source)}
    if not source.is_file():
        reason = f"no {source.name} in {variants}: {source_dropped_reason(variants, source)}"
        return {**record, "status": "dropped", "reason": reason}
    plan = out_dir / f"{family}-{precision}.plan"
    build(source, plan, cfg)
    x, _ = split_inputs(prepared_dir, "test", read_metadata(fp32)["preprocessing"])
    figures = parity(logits(session(fp32), x), tensorrt_engine.predictor(plan)(x))
    if figures["argmax_agreement"] < cfg.parity_min_agreement:
        plan.unlink()
        plan.with_suffix(".json").unlink(missing_ok=True)
        reason = (
            f"{plan.name} agrees with FP32 ONNX on {figures['argmax_agreement']:.4f} of "
            f"the test rows, below convert.parity_min_agreement {cfg.parity_min_agreement:g}"
        )
        return {**record, "status": "dropped", "reason": reason, **figures}
    info = read_json(plan.with_suffix(".json"))
    return {**record, "status": "built", "plan": str(plan), **figures, **info}


def source_dropped_reason(variants: Path, source: Path) -> str:
    """Why `quantize` left `source` out, from its variants.json (or that it did not say)."""
    manifest = variants / MANIFEST
    entry = read_json(manifest).get(source.stem, {}) if manifest.is_file() else {}
    return f"quantize dropped it: {entry['reason']}" if "reason" in entry else "not written"


def convert(
    cfg: ConvertConfig, families: list[tuple[str, Path, Path]], prepared_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Plans for every family x precision, or a "skipped" record with the reason.

    A plan that cannot be built from a kept variant, or misses the parity gate, is left out and
    listed under "dropped" with the reason; the stage goes on with the others.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    reason = tensorrt_engine.unavailable_reason()
    result: dict[str, Any] = {"status": "skipped", "reason": reason, "plans": [], "dropped": []}
    if reason is not None:
        log.warning("convert: skipped: %s", reason)
    else:
        records = [
            convert_one(name, fp32, variants, precision, out_dir, prepared_dir, cfg)
            for name, fp32, variants in families
            for precision in cfg.precisions
        ]
        for r in records:
            if r["status"] == "dropped":
                log.warning("convert: %s-%s dropped: %s", r["family"], r["precision"], r["reason"])
        result["status"] = "built"
        result["plans"] = [r for r in records if r["status"] == "built"]
        result["dropped"] = [r for r in records if r["status"] == "dropped"]
    write_json(out_dir / "plans.json", result)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument(
        "--family",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "FP32_ONNX", "VARIANTS_DIR"),
    )
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    run_cli(lambda params: _run(params, args), args.params)


def _run(params: Params, args: argparse.Namespace) -> None:
    from pipelines.tracking import stage_run

    families = [(name, Path(fp32), Path(variants)) for name, fp32, variants in args.family]
    data_hash = read_json(args.prepared / "manifest.json")["content_hash"]
    with stage_run(
        "convert", params, {"convert": section_dict(params.convert)}, Path.cwd(), data_hash
    ) as run:
        result = convert(params.convert, families, args.prepared, args.out)
        dropped = {f"{d['family']}-{d['precision']}": d["reason"] for d in result["dropped"]}
        metrics = {
            "status": result["status"],
            "reason": result["reason"],
            "plans": len(result["plans"]),
            "dropped": dropped,
        }
        write_json(args.metrics, metrics)
        run.set_tags({"convert.status": result["status"], "convert.reason": result["reason"] or ""})
        run.set_tags({f"convert.dropped.{name}": why for name, why in dropped.items()})
        run.log_metrics({"plans_built": len(result["plans"]), "plans_dropped": len(dropped)})
        run.log_artifact(args.out / "plans.json")


if __name__ == "__main__":
    main()
