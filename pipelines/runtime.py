"""ONNX Runtime inference on numpy arrays: the engine part shared by `quantize`, `select` and the
serving side. numpy + onnxruntime only (no torch), so a serving image stays lean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

ONNX_METADATA_KEY = "mlops.metadata"


def session(path: Path | str, threads: int = 0) -> Any:
    """A CPU inference session; `threads` = intra-op threads (0: ONNX Runtime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(sess: Any, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Run `x` (already preprocessed, float32) through `sess` in batches."""
    name = sess.get_inputs()[0].name
    parts = [sess.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(parts).astype(np.float32) if parts else np.empty((0, 0), np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    shifted = np.exp(z - z.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def read_metadata(path: Path | str) -> dict[str, Any]:
    """The metadata the export stage embedded in the ONNX file."""
    import json

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if ONNX_METADATA_KEY not in props:
        raise KeyError(f"{path}: no {ONNX_METADATA_KEY} metadata; was it made by `export`?")
    return dict(json.loads(props[ONNX_METADATA_KEY]))


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """How far `candidate` logits are from `reference` logits on the same rows."""
    if reference.shape != candidate.shape:
        raise ValueError(f"logit shapes differ: {reference.shape} vs {candidate.shape}")
    agreement = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return {
        "max_abs_diff": float(np.max(np.abs(reference - candidate))),
        "argmax_agreement": agreement,
    }
