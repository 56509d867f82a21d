"""`bentoml serve` (service.py) vs a hand-written FastAPI + ONNX Runtime server, under load.

    python benchmarks/serve_load.py [--seconds 5] [--out results.json]
    python benchmarks/serve_load.py --model large --compare-ref main --connections 1,4,16,64

`--model large`: a realistic model whose call costs milliseconds instead of the digits CNN's
~13 µs (benchmarks/model_speed.py's wider CNN, width 64 and depth 3, on 32x32 synthetic images,
trained one short epoch with the pipeline's own stages and exported to ONNX).
`--compare-ref REF`: adds `service@REF`, service.py as of the git revision REF (run from a
temporary `git worktree` of it), beside this checkout's, to measure a change of service.py
side by side (the flipped-batching variant is left out then).

Side by side in one run, on the same model (models/select/model.onnx when the pipeline has made
it, else a tiny CNN trained here), each server one process with the same ONNX Runtime threads:
- `service`: `bentoml serve service:Classifier` with params.yaml's `serve` settings;
- `service_batched` or `service_unbatched`: the same with adaptive batching switched the other
  way (`max_batch_size` 64 or 1, through MLOPS_SERVE_OVERRIDES), to measure what batching gains;
- `reference`: benchmarks/reference_server.py (FastAPI + uvicorn, no batching).

Load comes from separate processes: `wrk` (closed loop: N connections, one request in flight
each) posting a one-row JSON body (a real digits row) at several connection counts, whose best
rate is the saturation throughput; then benchmarks/serve_openloop.py (open loop, fixed rate) at
half of the reference's saturation for p50/p99 at equal rate, and at 50% and 80% of each server's
own saturation to count errors (503s from load shedding). The interleaving (every server at one
load level before the next level) keeps slow drifts in machine load fair to all of them.

With 2 cores, client and server share the machine: the servers are pinned to core 0 and the load
generators to core 1 (`taskset`), the same for every server. Also measured in this process: the
ONNX Runtime engine alone (batch 1 calls/s, batch 64 rows/s), the ceiling no server can pass.
Goals: service ÷ reference saturation ≥ 0.8 (stretch 1.0), p99 at half saturation ≤ 1.5x the
reference's, no errors up to 80% of saturation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from tests.helpers.processes import free_port, stop_group, wait_ready  # noqa: E402

CONNECTIONS = (1, 2, 4, 8, 16, 32, 64)
SERVER_CPUS, CLIENT_CPUS = "0", "1"
GOALS = {"saturation_ratio": 0.8, "p99_ratio": 1.5}
BATCHED_MAX = 64  # max_batch_size of the batched variant when params.yaml has batching off
WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("%(body)s", "rb"); wrk.body = f:read("*a"); f:close()
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) s503 = 0 end
function response(status, headers, body) if status == 503 then s503 = s503 + 1 end end
function done(summary, latency, requests)
  local n503 = 0
  for _, t in ipairs(threads) do n503 = n503 + t:get("s503") end
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "duration_us": %%d, "status_errors": %%d, '
    .. '"socket_errors": %%d, "timeouts": %%d, "s503": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write, e.timeout,
    n503, latency:percentile(50), latency:percentile(99)))
end
"""


def large_model(work: Path) -> tuple[Path, str]:
    """benchmarks/model_speed.py's wider CNN on 32x32 inputs, one short epoch on its synthetic
    images (the weights do not matter here, the cost of a call does), exported to ONNX."""
    from model_speed import LARGE, synthetic_images

    from pipelines.config import load_params
    from pipelines.export import export
    from pipelines.prepare import prepare
    from pipelines.runtime import read_metadata
    from pipelines.train import save_model, train

    root = work / "large"
    synthetic_images(root / "data" / "synthetic32.csv", rows=1000)
    params = load_params(REPO / "params.yaml", overrides={**LARGE, "train.epochs": 1})
    prepared, model_dir = root / "prepared", root / "model"
    prepare(params.data, params.prepare, root, prepared)
    save_model(root / "model.pt", train(params.train, prepared, root / "checkpoints"))
    model_dir.mkdir()
    export(params.export, root / "model.pt", prepared, model_dir / "model.onnx")
    metadata = read_metadata(model_dir / "model.onnx")
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    return model_dir, "large: CNN width 64, depth 3, 32x32 inputs (benchmarks/model_speed.py)"


def model_row(model_dir: Path) -> list[float]:
    """One request row for the model: a real digits row for 64 features, else mid-range."""
    spec = json.loads((model_dir / "metadata.json").read_text())["preprocessing"]
    if len(spec["feature_columns"]) == 64:
        return digits_row()
    low, high = spec["value_range"]
    return [(low + high) / 2] * len(spec["feature_columns"])


@contextlib.contextmanager
def checkout(ref: str, work: Path) -> Iterator[Path]:
    """A temporary `git worktree` of `ref` (detached), removed afterwards."""
    path = work / "checkout"
    subprocess.run(["git", "worktree", "add", "--detach", str(path), ref], cwd=REPO, check=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)


def model_source(work: Path) -> tuple[Path, str]:
    """A folder with model.onnx + metadata.json: the pipeline's selected model when it exists,
    else a tiny CNN trained and exported here (as the serving tests do)."""
    from pipelines.runtime import read_metadata

    selected = REPO / "models" / "select" / "model.onnx"
    model_dir = work / "model"
    if not selected.is_file():
        from tests.helpers.serving import tiny_bento_model

        tiny_bento_model(work / "tiny")
        return work / "tiny" / "model", "tiny CNN trained here (tests/helpers/serving.py)"
    model_dir.mkdir(parents=True)
    shutil.copy(selected, model_dir / "model.onnx")
    metadata = read_metadata(selected)
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    return model_dir, f"models/select/model.onnx ({metadata.get('arch')})"


def digits_row() -> list[float]:
    """A real row of the built-in digits data set (raw 0..16 pixel values)."""
    from sklearn.datasets import load_digits

    return [float(v) for v in load_digits().data[7]]


@contextlib.contextmanager
def server(
    name: str, command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO
) -> Iterator[str]:
    """`command` (pinned to SERVER_CPUS, run in `cwd`) on a free port; yields the base URL once
    /readyz answers, then stops its whole process group."""
    port = free_port()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CPUS, *command, "--port", str(port)],
            cwd=cwd,
            env={**os.environ, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(url, process, 120, name)
            except (RuntimeError, TimeoutError):
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
                raise
            yield url
        finally:
            stop_group(process)


def wrk(url: str, connections: int, seconds: float, script: Path) -> dict[str, Any]:
    """One closed-loop `wrk` run (one thread, `connections` connections)."""
    out = subprocess.run(
        [
            *("taskset", "-c", CLIENT_CPUS, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s"),
            *("--timeout", "10s", "-s", str(script), f"{url}/predict"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    raw = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    seconds_run = raw["duration_us"] / 1e6
    errors = raw["status_errors"] + raw["socket_errors"] + raw["timeouts"]
    return {
        "connections": connections,
        "rps": (raw["requests"] - errors) / seconds_run,
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": errors,
        "s503": raw["s503"],
    }


def open_loop(url: str, rate: float, seconds: float, body: Path) -> dict[str, Any]:
    """benchmarks/serve_openloop.py at a fixed `rate`, pinned to CLIENT_CPUS."""
    command = [sys.executable, str(BENCH / "serve_openloop.py"), "--url", f"{url}/predict"]
    command += ["--body-file", str(body), "--rate", f"{rate:.1f}", "--duration", str(seconds)]
    out = subprocess.run(
        ["taskset", "-c", CLIENT_CPUS, *command], capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def engine_ceiling(model_dir: Path, threads: int, row: list[float]) -> dict[str, float]:
    """ONNX Runtime alone, in this process on SERVER_CPUS: batch-1 calls/s, batch-64 rows/s."""
    import numpy as np

    from pipelines.preprocessing import to_model_input
    from pipelines.runtime import session

    os.sched_setaffinity(0, {int(SERVER_CPUS)})
    spec = json.loads((model_dir / "metadata.json").read_text())["preprocessing"]
    sess = session(model_dir / "model.onnx", threads=threads)
    name = sess.get_inputs()[0].name
    result = {}
    for batch in (1, 64):
        x = to_model_input(np.asarray([row] * batch, dtype=np.float32), spec)
        for _ in range(50):
            sess.run(None, {name: x})
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            sess.run(None, {name: x})
            calls += 1
        result[f"batch{batch}_rows_per_s"] = calls * batch / (time.perf_counter() - start)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return result


def sweep(
    urls: dict[str, str], seconds: float, script: Path, levels: tuple[int, ...] = CONNECTIONS
) -> dict[str, list[dict[str, Any]]]:
    """wrk at each connection count, every server at one count before the next count."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in urls}
    for connections in levels:
        for name, url in urls.items():
            wrk(url, connections, 1, script)  # settle after the previous server's run
            point = wrk(url, connections, seconds, script)
            results[name].append(point)
            print(
                f"  wrk c={connections:<3} {name:<18} {point['rps']:8.0f} req/s  "
                f"p50 {point['p50_ms']:6.2f} ms  p99 {point['p99_ms']:7.2f} ms  "
                f"errors {point['errors']} (503: {point['s503']})",
                flush=True,
            )
    return results


def fixed_rate(
    urls: dict[str, str], saturation: dict[str, float], seconds: float, body: Path
) -> dict[str, dict[str, Any]]:
    """Open loop: all servers at half the reference's saturation (equal rate), then each at 50%
    and 80% of its own saturation (errors)."""
    plan = {"equal_rate": dict.fromkeys(urls, saturation["reference"] / 2)}
    for fraction in (0.5, 0.8):
        plan[f"own_{int(fraction * 100)}pct"] = {name: saturation[name] * fraction for name in urls}
    results: dict[str, dict[str, Any]] = {}
    for label, rates in plan.items():
        results[label] = {}
        for name, url in urls.items():
            point = open_loop(url, rates[name], seconds, body)
            results[label][name] = point
            print(
                f"  open loop {label:<11} {name:<18} {point['target_rate']:7.0f}/s -> "
                f"{point['achieved_rate']:7.0f}/s  p50 {point['p50_ms']:6.2f} ms  "
                f"p99 {point['p99_ms']:7.2f} ms  errors {point['errors']} {point['statuses']}",
                flush=True,
            )
    return results


def summarize(
    curves: dict[str, list[dict[str, Any]]],
    rates: dict[str, dict[str, Any]],
    ceiling: dict[str, float],
) -> dict[str, Any]:
    batched, unbatched = (
        ("service_batched", "service")
        if "service_batched" in curves
        else ("service", "service_unbatched")
    )
    compared = next((name for name in curves if name.startswith("service@")), None)
    best = {name: max(curve, key=lambda p: p["rps"]) for name, curve in curves.items()}
    sat = {name: point["rps"] for name, point in best.items()}
    equal = rates["equal_rate"]
    below_80 = {
        name: sum(rates[k][name]["errors"] for k in ("equal_rate", "own_50pct", "own_80pct"))
        for name in curves
    }
    return {
        "saturation_rps": sat,
        "saturation_connections": {name: p["connections"] for name, p in best.items()},
        "saturation_ratio": sat["service"] / sat["reference"],
        "half_saturation_rate": equal["reference"]["target_rate"],
        "p50_ms_at_half": {name: equal[name]["p50_ms"] for name in curves},
        "p99_ms_at_half": {name: equal[name]["p99_ms"] for name in curves},
        "p99_ratio": equal["service"]["p99_ms"] / equal["reference"]["p99_ms"],
        "p50_ms_at_own_half": {name: rates["own_50pct"][name]["p50_ms"] for name in curves},
        "p99_ms_at_own_half": {name: rates["own_50pct"][name]["p99_ms"] for name in curves},
        "errors_up_to_80pct": below_80,
        "errors_in_sweep": {n: sum(p["errors"] for p in c) for n, c in curves.items()},
        "engine_batch1_per_s": ceiling["batch1_rows_per_s"],
        "engine_batch64_rows_per_s": ceiling["batch64_rows_per_s"],
        "service_fraction_of_engine_batch1": sat["service"] / ceiling["batch1_rows_per_s"],
        "reference_fraction_of_engine_batch1": sat["reference"] / ceiling["batch1_rows_per_s"],
        "batching_gain": sat[batched] / sat[unbatched] if unbatched in sat else None,
        "compared": compared,
        "service_over_compared": sat["service"] / sat[compared] if compared else None,
    }


def report(summary: dict[str, Any]) -> None:
    sat, p50, p99 = summary["saturation_rps"], summary["p50_ms_at_half"], summary["p99_ms_at_half"]
    print(f"\n{'server':<18} {'saturation/s':>12} {'at conns':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name in sat:
        print(
            f"{name:<18} {sat[name]:>12,.0f} {summary['saturation_connections'][name]:>8} "
            f"{p50[name]:>8.2f} {p99[name]:>8.2f}"
        )
    print(f"(p50/p99 open loop at {summary['half_saturation_rate']:.0f}/s = half the reference)")
    own50, own99 = summary["p50_ms_at_own_half"], summary["p99_ms_at_own_half"]
    print(
        "each at half its own saturation, p50/p99 ms: "
        + ", ".join(f"{name} {own50[name]:.2f}/{own99[name]:.2f}" for name in own50)
    )
    ratio, p99_ratio = summary["saturation_ratio"], summary["p99_ratio"]
    print(f"service / reference saturation: {ratio:.2f} (goal >= {GOALS['saturation_ratio']})")
    print(f"service / reference p99 at half: {p99_ratio:.2f} (goal <= {GOALS['p99_ratio']})")
    print(f"errors up to 80% of saturation: {summary['errors_up_to_80pct']}")
    print(f"errors in the wrk sweep (any load): {summary['errors_in_sweep']}")
    print(
        f"engine alone: {summary['engine_batch1_per_s']:,.0f} batch-1 calls/s, "
        f"{summary['engine_batch64_rows_per_s']:,.0f} rows/s at batch 64; service = "
        f"{summary['service_fraction_of_engine_batch1']:.1%} of batch-1 calls/s"
    )
    if summary["batching_gain"] is not None:
        print(f"adaptive batching gain (saturation, on / off): {summary['batching_gain']:.2f}x")
    if summary["compared"]:
        print(f"service / {summary['compared']} saturation: {summary['service_over_compared']:.3f}")


def log_counts(log: Path) -> dict[str, int]:
    text = log.read_text(errors="replace")
    return {"tracebacks": text.count("Traceback"), "overloaded": text.count("overloaded")}


def run(
    work: Path,
    seconds: float,
    rate_seconds: float,
    model: str = "digits",
    compare_ref: str | None = None,
    levels: tuple[int, ...] = CONNECTIONS,
) -> dict[str, Any]:
    from flows.package import save_bento_model
    from pipelines.config import load_params

    serve = load_params(REPO / "params.yaml").serve
    load_start = os.getloadavg()
    model_dir, model_note = large_model(work) if model == "large" else model_source(work)
    tag = save_bento_model(load_params(REPO / "params.yaml").register_.model_name, model_dir, "1")
    row = model_row(model_dir)
    body = work / "body.json"
    body.write_text(json.dumps({"rows": [row]}))
    script = work / "post.lua"
    script.write_text(WRK_LUA % {"body": body})
    print(f"model: {model_note}, BentoML tag {tag}; serve settings: {serve.model_dump()}")
    ceiling = engine_ceiling(model_dir, serve.threads, row)
    bento = [sys.executable, "-m", "bentoml", "serve", "service:Classifier", "--host", "127.0.0.1"]
    reference = [sys.executable, str(BENCH / "reference_server.py"), "--model-dir", str(model_dir)]
    reference += ["--threads", str(serve.threads)]
    other, flipped = (
        ("service_unbatched", {"max_batch_size": 1})
        if serve.max_batch_size > 1
        else ("service_batched", {"max_batch_size": BATCHED_MAX})
    )
    commands: dict[str, tuple[list[str], dict[str, str], Path]] = {"service": (bento, {}, REPO)}
    with contextlib.ExitStack() as stack:
        if compare_ref is None:
            commands[other] = (bento, {"MLOPS_SERVE_OVERRIDES": json.dumps(flipped)}, REPO)
        else:
            old = stack.enter_context(checkout(compare_ref, work))
            commands[f"service@{compare_ref}"] = (bento, {"PYTHONPATH": str(old)}, old)
        commands["reference"] = (reference, {}, REPO)
        logs = {name: work / f"{name.replace('@', '-')}.log" for name in commands}
        urls = {
            name: stack.enter_context(server(name, command, env, logs[name], cwd))
            for name, (command, env, cwd) in commands.items()
        }
        curves = sweep(urls, seconds, script, levels)
        saturation = {name: max(p["rps"] for p in curve) for name, curve in curves.items()}
        rates = fixed_rate(urls, saturation, rate_seconds, body)
    summary = summarize(curves, rates, ceiling)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": model_note,
        "serve_settings": serve.model_dump(),
        "pinning": {"servers": SERVER_CPUS, "load_generators": CLIENT_CPUS},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "summary": summary,
        "wrk": curves,
        "open_loop": rates,
        "engine": ceiling,
        "server_logs": {name: log_counts(path) for name, path in logs.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per wrk run")
    parser.add_argument("--rate-seconds", type=float, default=10.0, help="per open-loop run")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--model", choices=("digits", "large"), default="digits")
    parser.add_argument("--compare-ref", default=None, help="also serve service.py as of REF")
    parser.add_argument(
        "--connections",
        default=",".join(map(str, CONNECTIONS)),
        help="comma-separated wrk connection counts",
    )
    args = parser.parse_args()
    levels = tuple(int(c) for c in args.connections.split(","))
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(
            {"BENTOML_HOME": str(Path(tmp) / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
        )
        os.environ["DO_NOT_TRACK"] = "true"
        results = run(
            Path(tmp), args.seconds, args.rate_seconds, args.model, args.compare_ref, levels
        )
    report(results["summary"])
    print(f"server logs: {results['server_logs']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
