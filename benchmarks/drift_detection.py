"""How fast the monitor notices drift, and how often it cries wolf (issue 16's measurements).

Data: the 8x8 digits (scikit-learn ships them): the reference profile is the training split
(60 %, the format `select` writes), served traffic is drawn from the held-out 40 %, one row per
request, with a nearest-centroid model's predictions (tests/helpers/drift.py). The judgement is
pipelines.drift.judge with params.yaml's `monitor` settings, as the `monitor` flow runs it.

- False alarms: `--windows` windows of `monitor.window_rows` unshifted rows (resampled, seeded):
  alarms, and per-feature alerts against the `drift_alpha` x features expected by chance.
- Delay: a full window of unshifted rows, then shifted rows arrive (a block of features moved by
  `--shifts` x their standard deviation); the monitor judges the newest window every `--step`
  logged rows. Delay = shifted logged rows when it first alarms; in requests at
  `serve.log_fraction` (one row per request): rows / log_fraction.

Run: `python benchmarks/drift_detection.py [--windows 20] [--seeds 3] [--out figures.json]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from bench_args import positive_float, positive_int

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def frame(data: Any, rows: np.ndarray, start: int = 0) -> pd.DataFrame:
    """read_window's frame for `rows` (request ids from `start`)."""
    from tests.helpers.drift import log_lines

    lines = log_lines(data, rows, start=start)
    meta = pd.DataFrame(
        {
            "request_id": [x["request_id"] for x in lines],
            "row": 0,
            "timestamp": [x["timestamp"] for x in lines],
            "prediction": [str(x["prediction"]) for x in lines],
            "confidence": 0.9,
        }
    )
    return pd.concat([meta, pd.DataFrame(rows, columns=data.features)], axis=1)


def false_alarms(data: Any, reference: Any, cfg: Any, windows: int) -> dict[str, Any]:
    from pipelines.drift import judge

    rng = np.random.default_rng(0)
    alarms, alerts = 0, []
    for _ in range(windows):
        rows = data.served[rng.integers(0, len(data.served), cfg.window_rows)]
        result, _ = judge(reference, frame(data, rows), cfg)
        alarms += result.alarm
        alerts.append(sum(f.drifted for f in result.features.values()))
    return {
        "windows": windows,
        "alarms": alarms,
        "feature_alerts_mean": statistics.mean(alerts),
        "feature_alerts_max": max(alerts),
        "feature_alerts_expected": cfg.drift_alpha * len(data.features),
    }


def delay(
    data: Any, reference: Any, cfg: Any, by: float, columns: list[int], seed: int, step: int
) -> int | None:
    """Shifted logged rows until the first alarm (None: none within two windows)."""
    from pipelines.drift import judge
    from tests.helpers.drift import shifted

    rng = np.random.default_rng(seed)
    calm = data.served[rng.integers(0, len(data.served), cfg.window_rows)]
    moved = shifted(
        data.served[rng.integers(0, len(data.served), 2 * cfg.window_rows)], columns, by
    )
    stream = np.concatenate([calm, moved])
    for arrived in range(step, len(moved) + 1, step):
        window = stream[len(calm) + arrived - cfg.window_rows : len(calm) + arrived]
        result, _ = judge(reference, frame(data, window), cfg)
        if result.alarm:
            return arrived
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=positive_int, default=20)
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument(
        "--step", type=positive_int, default=25, help="logged rows between two judgements"
    )
    parser.add_argument("--shifts", type=positive_float, nargs="+", default=[0.5, 1.0])
    parser.add_argument(
        "--features", type=positive_int, default=16, help="shifted features (from 16)"
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from pipelines.config import load_params
    from pipelines.reference import load_reference
    from tests.helpers.drift import digits, write_profile

    params = load_params(REPO / "params.yaml")
    cfg = params.monitor
    data = digits()
    with tempfile.TemporaryDirectory() as tmp:
        reference = load_reference(write_profile(Path(tmp), data))
    columns = list(range(16, 16 + args.features))
    t0 = time.perf_counter()
    figures: dict[str, Any] = {"false_alarms": false_alarms(data, reference, cfg, args.windows)}
    for by in args.shifts:
        found = [delay(data, reference, cfg, by, columns, s, args.step) for s in range(args.seeds)]
        rows = [d for d in found if d is not None]
        figures[f"shift_{by:g}_std"] = {
            "delays_rows": found,
            "median_rows": statistics.median(rows) if rows else None,
            "median_requests": statistics.median(rows) / params.serve.log_fraction
            if rows
            else None,
        }
    figures["settings"] = {
        **cfg.model_dump(),
        "log_fraction": params.serve.log_fraction,
        "reference_profile_rows": reference.rows,
        "shifted_features": len(columns),
        "features": len(data.features),
        "step_rows": args.step,
    }
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    figures["load_average"] = os.getloadavg()
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
