"""What the prediction log costs the service (issue 16): `bentoml serve` with `serve.log_fraction`
at params.yaml's default (0.1) beside the same service with logging off (0), side by side.

    python benchmarks/serve_logging.py [--seconds 5] [--rounds 3] [--model large] [--out F]
    python benchmarks/serve_logging.py --in-process [--rounds 5]
    python benchmarks/serve_logging.py --record [--rounds 3]

Both servers run at once on the same model (the tiny digits CNN, where a model call is ~10 us and
the log's share is largest; `--model large`: benchmarks/model_speed.py's CNN, ~1.6 ms a call),
pinned to core 0, the load generators to core 1 (benchmarks/serve_load.py's harness). Closed
loop: `wrk` at 1, 8 and 32 connections, the two servers alternating, `--rounds` times (drift in
the machine's load falls on both); saturation = the best rate of each. Open loop
(benchmarks/serve_openloop.py): both at half the logging-off saturation, alternating, for p50 and
p99 at equal rate. Reports the ratios logging ÷ off for throughput, and off ÷ logging for p99
(both >= 0.95 is the issue's goal), the load average, and what the log wrote (lines: one per
logged request; bytes).

`--in-process`: the CPU time per one-row /predict of the service in this process (BentoML's ASGI
app under Starlette's test client, the writer thread included) with log_fraction 0, 0.1 and 1,
interleaved `--rounds` times, 2,000 requests each: less sensitive to a busy machine than
throughput, it shows what logging a request costs.

`--record`: the log's own path alone, CPU microseconds per logged one-row request (the request
thread's `PredictionLog.served` plus the writer thread's line and write), for a digits-wide (64
features) and a CNN-wide (3,072) body: what a sampled request adds, whatever the server.

Where the cost was (issue 16's profile): the logging-off server runs the same per-request work
(request id, RequestLog, the sampling draw), so the ratio measures only the sampled requests.
The old record parsed both bodies in the request path and wrote one JSON object per row with
every feature by name: ~250 us per logged digits request, ~6,200 us at 3,072 features (as much as
serving one, or more), and a writer thread holding the GIL for milliseconds (the p99). The record
now splices the two bodies as they were sent into one line per request, in the writer thread.
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

from bench_args import positive_float, positive_int  # noqa: E402

from benchmarks.serve_load import (  # noqa: E402
    WRK_LUA,
    large_model,
    model_row,
    model_source,
    open_loop,
    own_bentoml_home,
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
                **own_bentoml_home(work, name),
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


def in_process(work: Path, rounds: int, requests: int = 2000) -> dict[str, Any]:
    """CPU microseconds per /predict request (process time, all threads) by log fraction."""
    from starlette.testclient import TestClient

    from pipelines.prediction_log import PredictionLog
    from tests.helpers.serving import tiny_bento_model

    tag, _ = tiny_bento_model(work / "tiny")
    os.environ["MLOPS_MODEL_TAG"] = tag
    import service

    body = json.dumps({"rows": [model_row(work / "tiny" / "model")]})
    cpu: dict[float, list[float]] = {0.0: [], 0.1: [], 1.0: []}
    with TestClient(service.SERVICE.to_asgi()) as client:
        running = service.running_service()
        for _ in range(rounds):
            for fraction, figures in cpu.items():
                running.prediction_log = PredictionLog(
                    work / f"log{fraction}", fraction, 10 << 20, 5
                )
                for _ in range(200):  # warm
                    client.post("/predict", content=body)
                start = time.process_time()
                for _ in range(requests):
                    client.post("/predict", content=body)
                running.prediction_log.close()
                figures.append((time.process_time() - start) / requests * 1e6)
    best = {fraction: min(figures) for fraction, figures in cpu.items()}
    return {
        "cpu_us_per_request": cpu,
        "best_us": best,
        "added_us_at": {f: best[f] - best[0.0] for f in (0.1, 1.0)},
        "load_average": os.getloadavg(),
    }


def record_cost(work: Path, rounds: int, requests: int = 2000) -> dict[str, Any]:
    """CPU microseconds per logged one-row request through PredictionLog alone (process time:
    the request thread and the writer thread), best of `rounds`, by feature count."""
    import numpy as np

    from pipelines.prediction_log import PredictionLog

    answer = [{"label": 3, "probabilities": [0.1] * 10, "model_version": "1"}]
    response = json.dumps(answer).encode()
    figures: dict[str, Any] = {}
    for width in (64, 3072):
        row = np.random.default_rng(0).random(width).round(4).tolist()
        request = json.dumps({"rows": [row]}).encode()
        runs = []
        for round_ in range(rounds):
            log = PredictionLog(work / f"record-{width}-{round_}", 1.0, 1 << 30, 2)
            start = time.process_time()
            for i in range(requests):
                log.served(f"r{i}", "1", response, request=request)
            log.close()  # the writer thread has written every line
            runs.append((time.process_time() - start) / requests * 1e6)
        figures[f"{width} features"] = {
            "us": runs,
            "best_us": min(runs),
            "line_bytes": len(request),
        }
    return {**figures, "load_average": os.getloadavg()}


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
    parser.add_argument("--seconds", type=positive_float, default=5.0, help="per wrk run")
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument(
        "--rate-seconds", type=positive_float, default=10.0, help="per open-loop run"
    )
    parser.add_argument("--model", choices=("digits", "large"), default="digits")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--in-process", action="store_true", help="CPU per request, in-process")
    parser.add_argument("--record", action="store_true", help="CPU per logged request, log only")
    args = parser.parse_args()
    if args.record:
        with tempfile.TemporaryDirectory() as tmp:
            figures = record_cost(Path(tmp), args.rounds)
        print(json.dumps(figures, indent=2))
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2))
        return
    if args.in_process:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ.update({"BENTOML_HOME": str(Path(tmp) / "bentoml"), "DO_NOT_TRACK": "true"})
            figures = in_process(Path(tmp), args.rounds)
        for fraction, runs in figures["cpu_us_per_request"].items():
            print(f"log_fraction {fraction:g}: CPU us/request {[round(r) for r in runs]}")
        print(f"added CPU per request (best of rounds): {figures['added_us_at']}")
        print(f"load average: {figures['load_average']}")
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2))
        return
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
