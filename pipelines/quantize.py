"""`quantize`: INT8 and FP16 variants of an exported ONNX model, each measured and parity-gated.

One INT8 graph does not fit both engines (measured on this project's CPUs):
- `int8_cpu`: uint8 activations, int8 per-channel weights, Q/DQ form — ONNX Runtime on the CPU
  fuses it into QLinear kernels (about 2x FP32 on a compute-bound CNN);
- `int8_qdq`: symmetric int8 activations and weights, Q/DQ on weights, no bias quantization — the
  explicit-precision graph TensorRT 10+/11 builds from (slower than FP32 on a CPU, as expected);
- `fp16`: an FP16 graph with FP32 inputs/outputs, for GPU engines.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.artifacts import atomic_path, read_json, write_json
from pipelines.cli import run_cli
from pipelines.config import Params, QuantizeConfig, section_dict
from pipelines.errors import ParityError
from pipelines.export import embed_metadata
from pipelines.prepare import read_split
from pipelines.preprocessing import to_model_input
from pipelines.runtime import logits, parity, read_metadata, session

VARIANTS = ("int8_cpu", "int8_qdq", "fp16")
log = logging.getLogger(__name__)


def split_inputs(
    prepared_dir: Path, name: str, spec: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    """(model input, class index) of one split."""
    manifest = read_json(prepared_dir / "manifest.json")
    frame = read_split(prepared_dir, name)
    index = {label: i for i, label in enumerate(manifest["labels"])}
    y = frame[manifest["label_column"]].map(index).to_numpy()
    return to_model_input(frame[manifest["feature_columns"]].to_numpy(), spec), y


def calibration_batches(x: np.ndarray, name: str, batch: int = 64) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = iter(
                {name: x[i : i + batch]} for i in range(0, len(x), batch)
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    return Reader()


def int8_options(variant: str) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType

    if variant == "int8_cpu":
        return {
            "activation_type": QuantType.QUInt8,
            "weight_type": QuantType.QInt8,
            "extra_options": {},
        }
    symmetric = {
        "ActivationSymmetric": True,
        "WeightSymmetric": True,
        "AddQDQPairToWeight": True,
        "DedicatedQDQPair": True,
        "QuantizeBias": False,
    }
    return {
        "activation_type": QuantType.QInt8,
        "weight_type": QuantType.QInt8,
        "extra_options": symmetric,
    }


def quantize_int8(
    src: Path, dst: Path, variant: str, calib: np.ndarray, cfg: QuantizeConfig
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    with atomic_path(dst.with_suffix(".pre.onnx")) as pre:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        name = session(pre).get_inputs()[0].name
        quantize_static(
            str(pre),
            str(dst),
            calibration_batches(calib, name),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            calibrate_method=methods[cfg.calibration_method],
            **int8_options(variant),
        )


def to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


def make_variant(
    src: Path, dst: Path, variant: str, calib: np.ndarray, cfg: QuantizeConfig
) -> None:
    """Write one variant atomically, with the source's metadata updated for it."""
    import onnx

    with atomic_path(dst) as tmp:
        if variant == "fp16":
            to_fp16(src, tmp)
        else:
            quantize_int8(src, tmp, variant, calib, cfg)
        proto = onnx.load(str(tmp))
        meta = read_metadata(src)
        meta.update(
            precision=variant.split("_", maxsplit=1)[0],
            variant=variant,
            quantization=section_dict(cfg),
        )
        embed_metadata(proto, meta)
        onnx.save(proto, str(tmp))


def measure(path: Path, x: np.ndarray, y: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """Accuracy on the test split, and parity with the FP32 graph's logits."""
    out = logits(session(path), x)
    figures = parity(reference, out)
    return {
        "accuracy": float(np.mean(out.argmax(axis=1) == y)),
        **figures,
        "size_bytes": path.stat().st_size,
    }


def quantize(
    cfg: QuantizeConfig, onnx_path: Path, prepared_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Every variant of `onnx_path` into `out_dir`, measured; a variant missing the gate raises."""
    spec = read_metadata(onnx_path)["preprocessing"]
    calib = split_inputs(prepared_dir, "train", spec)[0][: cfg.calibration_samples]
    x, y = split_inputs(prepared_dir, "test", spec)
    reference = logits(session(onnx_path), x)
    results: dict[str, Any] = {"fp32": {"accuracy": float(np.mean(reference.argmax(1) == y))}}
    for variant in VARIANTS:
        dst = out_dir / f"{variant}.onnx"
        make_variant(onnx_path, dst, variant, calib, cfg)
        results[variant] = measure(dst, x, y, reference)
        agreement = results[variant]["argmax_agreement"]
        if agreement < cfg.parity_min_agreement:
            dst.unlink()
            raise ParityError(
                f"quantize: {variant} agrees with FP32 on {agreement:.4f} "
                f"of {len(x)} test rows, below quantize.parity_min_agreement "
                f"{cfg.parity_min_agreement:g}; try calibration_method or more calibration_samples"
            )
        log.info("quantize: %s %s", variant, results[variant])
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--onnx", type=Path, required=True, help="FP32 ONNX from export")
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the variants")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--name", default="teacher", help="candidate family name")
    args = parser.parse_args(argv)
    run_cli(lambda params: _run(params, args), args.params)


def _run(params: Params, args: argparse.Namespace) -> None:
    from pipelines.tracking import flatten, stage_run

    data_hash = read_json(args.prepared / "manifest.json")["content_hash"]
    section = {"quantize": section_dict(params.quantize), "family": args.name}
    with stage_run(f"quantize@{args.name}", params, section, Path.cwd(), data_hash) as run:
        metrics = quantize(params.quantize, args.onnx, args.prepared, args.out)
        write_json(args.metrics, metrics)
        run.log_metrics(flatten(metrics))
        run.log_artifacts(args.out, "onnx")


if __name__ == "__main__":
    main()
