"""The model half of benchmarks/serve_load.py's peer servers (Ray Serve, LitServe): the same
ONNX file through ONNX Runtime, the same JSON request and response as service.py's /predict.

A request is {"rows": [[n finite numbers], ...]} (1 to serve.max_rows rows, each value in the
trained range); the answer is one {label, probabilities, model_version} per row. A bad body is
a ValueError with one line naming what was wrong (the servers answer 400 with it). Batching
servers hand `predict` several requests' rows at once: one ONNX Runtime call for them all.

`BatchStats` counts model calls and rows in the serving process and writes them to a small JSON
file about twice a second, so the benchmark reads the batch size batching actually formed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.config import load_params
from pipelines.preprocessing import to_model_input
from pipelines.runtime import session, softmax

REPO = Path(__file__).resolve().parents[1]


def server_arguments(description: str | None, batch_wait_flag: str) -> argparse.Namespace:
    """A peer server's command line: the model, its port, ONNX Runtime threads, its batching
    (`--max-batch-size` and `batch_wait_flag`, in ms, the peer's own name for the wait) and the
    batch-size stats file serve_load reads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(batch_wait_flag, type=float, default=5.0)
    parser.add_argument("--stats-file", type=Path, default=None)
    return parser.parse_args()


class BatchStats:
    """Model calls and rows so far, flushed to `path` (atomically) at most every `every_s`."""

    def __init__(self, path: Path | None, every_s: float = 0.5) -> None:
        self.path, self.every_s = path, every_s
        self.calls = self.rows = 0
        self.flushed = 0.0

    def record(self, rows: int) -> None:
        """Count one model call of `rows` rows."""
        self.calls += 1
        self.rows += rows
        now = time.monotonic()
        if self.path is not None and now - self.flushed >= self.every_s:
            self.flushed = now
            partial = self.path.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps({"calls": self.calls, "rows": self.rows}))
            partial.replace(self.path)


class PeerModel:
    """One ONNX Runtime session with the model folder's metadata (model.onnx, metadata.json)."""

    def __init__(self, model_dir: Path, threads: int, stats_file: Path | None = None) -> None:
        metadata = json.loads((model_dir / "metadata.json").read_text())
        self.spec, self.labels = metadata["preprocessing"], list(metadata["labels"])
        self.features = len(self.spec["feature_columns"])
        self.low, self.high = self.spec["value_range"]
        self.max_rows = load_params(REPO / "params.yaml").serve.max_rows
        self.session = session(model_dir / "model.onnx", threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        self.stats = BatchStats(stats_file)

    def parse(self, body: bytes | dict[str, Any]) -> np.ndarray:
        """The request's rows, float32 (rows, features); ValueError naming what was wrong."""
        try:
            data = json.loads(body) if isinstance(body, bytes) else body
        except ValueError as exc:
            raise ValueError(f"body: not JSON ({exc})") from None
        rows = data.get("rows") if isinstance(data, dict) else None
        if not isinstance(rows, list) or not 1 <= len(rows) <= self.max_rows:
            raise ValueError(f"rows: send a list of 1 to {self.max_rows} rows")
        if any(not isinstance(r, list) or len(r) != self.features for r in rows):
            raise ValueError(f"rows: every row needs {self.features} numbers")
        if any(type(v) not in (int, float) for r in rows for v in r):
            raise ValueError("rows: numbers only")
        x = np.asarray(rows, dtype=np.float64)
        if not np.isfinite(x).all() or ((x < self.low) | (x > self.high)).any():
            raise ValueError(f"rows: values must be finite, in [{self.low:g}, {self.high:g}]")
        return x.astype(np.float32)

    def predict(self, requests: list[np.ndarray]) -> list[list[dict[str, Any]]]:
        """One model call for all `requests` (each (rows, features)); one answer per request."""
        x = np.concatenate(requests) if len(requests) > 1 else requests[0]
        model_input = to_model_input(x, self.spec)
        logits = self.session.run(None, {self.input_name: model_input})[0]
        probs = softmax(np.asarray(logits, dtype=np.float32))
        self.stats.record(len(x))
        answers = [
            {"label": self.labels[k], "probabilities": p.tolist(), "model_version": "1"}
            for k, p in zip(probs.argmax(axis=1).tolist(), probs, strict=True)
        ]
        bounds = np.cumsum([0, *(len(r) for r in requests)])
        return [answers[a:b] for a, b in itertools.pairwise(bounds)]
