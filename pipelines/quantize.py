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
import copy
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import numpy as np

from pipelines.artifacts import atomic_path, read_json, write_json
from pipelines.cli import run_cli
from pipelines.config import Params, QuantizeConfig, section_dict
from pipelines.errors import PipelineError
from pipelines.export import embed_metadata, source
from pipelines.prepare import read_split
from pipelines.preprocessing import to_model_input
from pipelines.runtime import logits, parity, read_metadata, session

VARIANTS = ("int8_cpu", "int8_qdq", "fp16")
CALIBRATION_METHODS: tuple[str, ...] = get_args(
    QuantizeConfig.model_fields["calibration_method"].annotation
)
MANIFEST = "variants.json"  # in the output folder: each variant kept or dropped, and why
log = logging.getLogger(__name__)


def split_inputs(
    prepared_dir: Path, name: str, spec: dict[str, Any], model: Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(model input, class index) of one split."""
    manifest = read_json(prepared_dir / "manifest.json")
    frame = read_split(prepared_dir, name)
    index = {label: i for i, label in enumerate(manifest["labels"])}
    y = frame[manifest["label_column"]].map(index).to_numpy()
    where = f"{source(model, prepared_dir)} ({name} split)"
    return to_model_input(frame[manifest["feature_columns"]], spec, where), y


def calibration_batches(x: np.ndarray, name: str, batch: int = 64) -> Any:
    """A calibration reader over `x` in equal-size batches of at most `batch` rows.

    ONNX Runtime's histogram calibrators (entropy, percentile) stack every batch's activations
    and fail on a shorter last batch, so the size is the largest divisor of len(x) up to `batch`
    (every row is used once; a prime row count gives batches of one row).
    """
    from onnxruntime.quantization import CalibrationDataReader

    size = max(d for d in range(1, min(batch, len(x)) + 1) if len(x) % d == 0)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches: Iterator[dict[str, np.ndarray]] = iter(
                {name: x[i : i + size]} for i in range(0, len(x), size)
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
    with tempfile.TemporaryDirectory(prefix="quantize.") as work:
        pre = Path(work) / "pre.onnx"  # an intermediate: never beside the outputs
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
    """FP16 weights and activations, except the input scaling (`scaling_nodes`): raw feature
    values (e.g. 1e5) lose digits or overflow in FP16 before they are scaled."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(src))
    blocked = scaling_nodes(model)
    half = convert_float_to_float16(
        copy.deepcopy(model), keep_io_types=True, node_block_list=blocked
    )
    keep_float_inputs(model, half, blocked)
    onnx.save(half, str(dst))


def keep_float_inputs(model: Any, half: Any, blocked: list[str]) -> None:
    """The converter leaves `blocked` nodes in FP32 but still casts the graph input, their FP32
    initializers and what one blocked node passes the next through FP16 in front of them (a raw
    value of 1e5 becomes inf). Wire those inputs back to the FP32 graph input, the initializers
    of `model` and the blocked node's FP32 output, and drop the casts no node reads any more (in
    place, on `half`)."""
    sources = {i.name for i in model.graph.input}
    originals = {t.name: t for t in model.graph.initializer}
    inputs = {n.name: list(n.input) for n in model.graph.node if n.name in blocked}
    outputs = {n.name: list(n.output) for n in model.graph.node if n.name in blocked}
    renamed = {  # a blocked node's output (FP32), by its name in `model`
        old: new
        for node in half.graph.node
        if node.name in outputs
        for old, new in zip(outputs[node.name], node.output, strict=True)
    }
    for node in half.graph.node:
        for k, name in enumerate(inputs.get(node.name, [])):
            if name in sources or name in originals:
                node.input[k] = name
            elif name in renamed:  # from another blocked node: no FP16 round trip between
                node.input[k] = renamed[name]
    for tensor in half.graph.initializer:
        if tensor.name in originals and any(tensor.name in i for i in inputs.values()):
            tensor.CopyFrom(originals[tensor.name])
    while True:
        read = {name for n in half.graph.node for name in n.input}
        read |= {o.name for o in half.graph.output}
        unused = [n for n in half.graph.node if n.op_type == "Cast" and not set(n.output) & read]
        if not unused:
            return
        for node in unused:
            half.graph.node.remove(node)


def scaling_nodes(model: Any) -> list[str]:
    """Names of the graph's nodes that apply the model's input scaling: those reading the
    `Scaler`'s buffers (initializers named `scaler.*`, see pipelines/scaling.py). INT8 keeps
    them float by itself: ONNX Runtime quantizes no Sub or Div."""
    from pipelines.scaling import SCALER_PREFIX

    return [
        node.name
        for node in model.graph.node
        if any(name.startswith(SCALER_PREFIX) for name in node.input)
    ]


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


def parity_miss(
    variant: str, agreement: float, test_rows: int, cfg: QuantizeConfig, calib_rows: int
) -> str | None:
    """Why `variant` misses the parity gate, with advice that can help; None if it passes."""
    if agreement >= cfg.parity_min_agreement:
        return None
    miss = (
        f"agrees with FP32 on {agreement:.4f} of {test_rows} test rows, below "
        f"quantize.parity_min_agreement {cfg.parity_min_agreement:g}"
    )
    if variant == "fp16":
        return f"{miss}; FP16 uses no calibration: the model's values do not fit FP16's precision"
    others = " or ".join(m for m in CALIBRATION_METHODS if m != cfg.calibration_method)
    advice = f"try quantize.calibration_method {others}"
    if calib_rows < cfg.calibration_samples:
        advice += (
            f"; calibrated on all {calib_rows} rows of the training split (calibration_samples "
            f"{cfg.calibration_samples} cannot add more: more training data can)"
        )
    else:
        advice += f", or more than {calib_rows} quantize.calibration_samples"
    return f"{miss}; {advice}"


def keep_or_drop(
    built: Path, dst: Path, figures: dict[str, Any], reason: str | None
) -> dict[str, Any]:
    """Move a passing variant to `dst`; drop a failing one (and any stale `dst`) with its reason."""
    if reason is None:
        with atomic_path(dst) as tmp:
            shutil.move(built, tmp)
        return {"status": "kept", **figures}
    dst.unlink(missing_ok=True)
    log.warning("quantize: %s dropped: %s", dst.stem, reason)
    return {"status": "dropped", "reason": reason, **figures}


def quantize(
    cfg: QuantizeConfig, onnx_path: Path, prepared_dir: Path, out_dir: Path
) -> dict[str, Any]:
    """Every variant of `onnx_path`, measured; the ones that pass the parity gate go to `out_dir`.

    A variant below `cfg.parity_min_agreement` is dropped (no file) with the reason; the result,
    also written to `out_dir/variants.json`, has per variant `status` ("kept" or "dropped"),
    `reason` when dropped, accuracy, parity figures and size.
    """
    spec = read_metadata(onnx_path)["preprocessing"]
    calib = split_inputs(prepared_dir, "train", spec, onnx_path)[0][: cfg.calibration_samples]
    if len(calib) == 0:
        raise PipelineError(
            f"quantize: the training split in {prepared_dir} has no rows to calibrate on; "
            "give prepare more data (data.source)"
        )
    x, y = split_inputs(prepared_dir, "test", spec, onnx_path)
    reference = logits(session(onnx_path), x)
    results: dict[str, Any] = {
        "fp32": {"accuracy": float(np.mean(reference.argmax(1) == y))},
        "calibration": {"method": cfg.calibration_method, "rows": len(calib)},
    }
    with tempfile.TemporaryDirectory(prefix="quantize.") as work:
        for variant in VARIANTS:
            built = Path(work) / f"{variant}.onnx"
            make_variant(onnx_path, built, variant, calib, cfg)
            figures = measure(built, x, y, reference)
            reason = parity_miss(variant, figures["argmax_agreement"], len(x), cfg, len(calib))
            results[variant] = keep_or_drop(built, out_dir / f"{variant}.onnx", figures, reason)
            log.info("quantize: %s %s", variant, results[variant])
    write_json(out_dir / MANIFEST, results)
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
        flat = flatten(metrics)
        numbers = {k: v for k, v in flat.items() if isinstance(v, int | float)}
        run.log_metrics(numbers)
        run.set_tags({f"quantize.{k}": v for k, v in flat.items() if k not in numbers})
        run.log_artifacts(args.out, "onnx")


if __name__ == "__main__":
    main()
