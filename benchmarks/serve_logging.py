"""What the prediction log costs the service (issue 16): `bentoml serve` with `serve.log_fraction`
at params.yaml's default (0.1) beside the same service with logging off (0), side by side.

    python benchmarks/serve_logging.py [--seconds 5] [--rounds 3] [--model large] [--out F]

Both servers run at once on the same model (the tiny digits CNN, where a model call is ~10 us and
the log's share is largest; `--model large`: benchmarks/model_speed.py's CNN, ~1.6 ms a call),
pinned to core 0, the load generators to core 1 (benchmarks/serve_load.py's harness). Closed
loop: `wrk` at 1, 8 and 32 connections, the two servers alternating, `--rounds` times (drift in
the machine's load falls on both); saturation = the best rate of each. Open loop
(benchmarks/serve_openloop.py): both at half the logging-off saturation, alternating, for p50 and
p99 at equal rate. Reports the ratios logging ÷ off for throughput, and off ÷ logging for p99
(both >= 0.95 is the issue's goal), the load average, and what the log wrote (lines, bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serve_load import (  # noqa: E402
    WRK_LUA,
    large_model,
    model_row,
    model_source,
    open_loop,
    server,
    wrk,
)

LEVELS = (1, 8, 32)
GOAL = 0.95


def log_written(folder: Path) -> dict[str, int]:
    files = list(folder.glob("predictions*.jsonl*")) if folder.is_dir() else []
    lines = sum(len(f.read_bytes().splitlines()) for f in files)
    return {"files": len(files), "lines": lines, "bytes": sum(f.stat().st_size for f in files)}


def measure(
    urls: dict[str, str], seconds: float, rounds: int, rate_seconds: float, work: Path
) -> dict[str, Any]:
    body = work / "body.json"
    script = work / "post.lua"
    curves: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for round_ in range(rounds):
        for connections in LEVELS:
            order = list(urls) if round_ % 2 == 0 else list(reversed(urls))
            for name in order:
                wrk(urls[name], connections, 1, script)  # settle
                point = wrk(urls[name], connections, seconds, script)
                curves[name].append(point)
                print(
                    f"  round {round_} c={connections:<3} {name:<8} {point['rps']:8.0f} req/s "
                    f"p99 {point['p99_ms']:7.2f} ms errors {point['errors']}",
                    flush=True,
                )
    best = {name: max(p["rps"] for p in curve) for name, curve in curves.items()}
    rate = best["off"] / 2
    fixed: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for round_ in range(rounds):
        for name in list(urls) if round_ % 2 == 0 else list(reversed(urls)):
            fixed[name].append(open_loop(urls[name], rate, rate_seconds, body))
    p99 = {name: sorted(r["p99_ms"] for r in runs)[len(runs) // 2] for name, runs in fixed.items()}
    p50 = {name: sorted(r["p50_ms"] for r in runs)[len(runs) // 2] for name, runs in fixed.items()}
    per_level = {
        name: {c: max(p["rps"] for p in curve if p["connections"] == c) for c in LEVELS}
        for name, curve in curves.items()
    }
    return {
        "saturation_rps": best,
        "rps_by_connections": per_level,
        "throughput_ratio": best["logging"] / best["off"],
        "throughput_ratio_by_connections": {
            c: per_level["logging"][c] / per_level["off"][c] for c in LEVELS
        },
        "open_loop_rate": rate,
        "p50_ms": p50,
        "p99_ms": p99,
        "p99_ratio_off_over_logging": p99["off"] / p99["logging"],
        "errors": {n: sum(p["errors"] for p in c) for n, c in curves.items()},
        "wrk": curves,
        "open_loop": fixed,
    }


def run(work: Path, seconds: float, rounds: int, rate_seconds: float, model: str) -> dict[str, Any]:
    from flows.package import save_bento_model
    from pipelines.config import load_params

    params = load_params(REPO / "params.yaml")
    load_start = os.getloadavg()
    model_dir, note = large_model(work) if model == "large" else model_source(work)
    tag = save_bento_model(params.register_.model_name, model_dir, "1")
    (work / "body.json").write_text(json.dumps({"rows": [model_row(model_dir)]}))
    (work / "post.lua").write_text(WRK_LUA % {"body": work / "body.json"})
    bento = [sys.executable, "-m", "bentoml", "serve", "service:Classifier", "--host", "127.0.0.1"]
    fractions = {"logging": params.serve.log_fraction, "off": 0.0}
    with contextlib.ExitStack() as stack:
        urls = {}
        for name, fraction in fractions.items():
            env = {
                "MLOPS_MODEL_TAG": tag,
                "MLOPS_LOG_DIR": str(work / name),
                "MLOPS_SERVE_OVERRIDES": json.dumps({"log_fraction": fraction}),
            }
            urls[name] = stack.enter_context(server(name, bento, env, work / f"{name}.log"))
        figures = measure(urls, seconds, rounds, rate_seconds, work)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": note,
        "log_fraction": fractions,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "written": {name: log_written(work / name) for name in fractions},
        **figures,
    }


def report(results: dict[str, Any]) -> None:
    sat, p50, p99 = results["saturation_rps"], results["p50_ms"], results["p99_ms"]
    fraction = results["log_fraction"]["logging"]
    print(f"\nmodel: {results['model']}; load average {results['load_average']}")
    for name in sat:
        print(
            f"{name:<8} (log_fraction {results['log_fraction'][name]:g}): saturation "
            f"{sat[name]:,.0f} req/s; at {results['open_loop_rate']:.0f}/s p50 {p50[name]:.2f} "
            f"ms, p99 {p99[name]:.2f} ms; written {results['written'][name]}"
        )
    ratio, p99_ratio = results["throughput_ratio"], results["p99_ratio_off_over_logging"]
    print(f"throughput, logging {fraction:g} / off: {ratio:.3f} (goal >= {GOAL})")
    by = results["throughput_ratio_by_connections"]
    print("  by connections: " + ", ".join(f"c={c}: {r:.3f}" for c, r in by.items()))
    print(f"p99, off / logging {fraction:g}: {p99_ratio:.3f} (goal >= {GOAL})")
    print(f"errors: {results['errors']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="per open-loop run")
    parser.add_argument("--model", choices=("digits", "large"), default="digits")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update({"BENTOML_HOME": str(Path(tmp) / "bentoml"), "DO_NOT_TRACK": "true"})
        results = run(Path(tmp), args.seconds, args.rounds, args.rate_seconds, args.model)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
