"""`bentoml serve` (service.py) side by side with the servers a user would pick instead, under load.

    python benchmarks/serve_load.py [--model digits|resnet|resnet64|large] [--seconds 5] [--out f]
    python benchmarks/serve_load.py --model resnet --servers service,service_unbatched,ray,litserve
    python benchmarks/serve_load.py --model large --compare-ref main --connections 1,4,16,64

Models: `digits` (models/select/model.onnx when the pipeline has made it, else a tiny CNN trained
here; a call costs ~13 us), `resnet` (the realistic one: pipelines/models.py's ResNet-18 at width
16 on 32x32 gray images, ~1-5 ms a batch-1 call on one core), `resnet64` (the same at width 64, the
standard CIFAR ResNet-18's width: a second realistic size, ~10x the call, so the table shows how
served / engine depends on the model's cost) and `large` (benchmarks/model_speed.py's wider CNN,
~1.6 ms); the image models are trained one short epoch on synthetic images with the
pipeline's own stages and exported to ONNX (the weights do not matter here, the cost of a call
does). Every server serves that same ONNX file through ONNX Runtime (serve.threads threads), with
the same JSON request ({"rows": [[...]]}, one row per request here) and response:
- `service`: `bentoml serve service:Classifier` with params.yaml's `serve` settings;
- `service_batched` / `service_unbatched`: the same with adaptive batching switched the other way
  (`max_batch_size` 64 or 1, through MLOPS_SERVE_OVERRIDES);
- `reference`: benchmarks/reference_server.py (FastAPI + uvicorn, no batching);
- `ray`: Ray Serve, one replica, `@serve.batch` (benchmarks/ray_server.py);
- `litserve`: LitServe, one worker, `max_batch_size` (benchmarks/litserve_server.py).
The peers batch at most 64 rows and wait up to one batch-1 model call (0.5-10 ms, `batch_wait_ms`)
for a batch to fill; they need the `bench` extra (`pip install -e ".[bench]"`) in the Python
`--peer-python` names, and are left out with a line saying so when it cannot import them.
`--compare-ref REF` adds `service@REF`, service.py as of the git revision REF (a temporary
`git worktree`), to measure a change of service.py side by side.

Load comes from separate processes: `wrk` (closed loop: N connections, one request in flight each)
at several connection counts, whose best rate is the saturation throughput; then
benchmarks/serve_openloop.py (open loop, fixed rate) at 25%, 50% and 80% of each server's own
saturation for p50/p99 and errors (503s: load shed). Every server runs one load level before the
next level, so slow drifts in machine load are fair to all, and the whole schedule runs `--rounds`
times (3 by default): each figure is the median round (the rate at a connection count, the p99 at a
fixed rate; errors are summed), since on this noisy 2-core machine a single round's best window
read 77 requests/s for a server that then got 46/s through at its "80%" (61/s). Each `bentoml
serve` gets its own BENTOML_HOME (sharing one model store), or the last one started empties the
others' metrics directory. The batch size batching actually
formed comes from the servers (BentoML's `adaptive_batch_size` histogram on /metrics; the peers'
call counts); served / ceiling compares saturation with the ONNX Runtime engine alone, measured
in this process at batch 1, 2, 4 ... 64 before and after the servers run (the better of the two
at each batch size, so a drift in machine load cannot flatter the ratio) and interpolated at
that batch size.

With 2 cores, client and server share the machine: the servers (and all their processes: Ray's
too) are pinned to core 0 and the load generators to core 1 (`taskset`), the same for every
server. Goals (issue 15): on the realistic model the service ahead of every peer in saturation
throughput and p99 at 50% load, served >= 0.7 of the engine at the formed batch, no errors below
80% of saturation.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from bench_args import positive_float, positive_int  # noqa: E402

from tests.helpers.processes import free_port, stop_group, wait_ready  # noqa: E402

CONNECTIONS = (1, 2, 4, 8, 16, 32, 64)
SERVER_CPUS, CLIENT_CPUS = "0", "1"
BATCHED_MAX = 64  # max_batch_size of the batched variant when params.yaml has batching off
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # the engine alone is measured at these batch sizes
RATE_FRACTIONS = (0.25, 0.5, 0.8)  # open-loop rates, as fractions of each server's saturation
GOALS = {"served_over_ceiling": 0.7}  # and: the service ahead of every peer; no errors below 80%
PEERS = {"ray": ("ray_server.py", "ray.serve"), "litserve": ("litserve_server.py", "litserve")}
BENTO = [sys.executable, "-m", "bentoml", "serve", "service:Classifier", "--host", "127.0.0.1"]
SERVERS = ("service", "flipped", "reference", "ray", "litserve")
KNOWN_SERVERS = ("service", "flipped", "service_batched", "service_unbatched", "reference", *PEERS)
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


RESNET_MODEL = {"arch": "resnet18", "width": 16, "depth": 1, "dropout": 0.0}
# --model name -> the ResNet-18 `train.model` section it serves
RESNETS = {"resnet": RESNET_MODEL, "resnet64": {**RESNET_MODEL, "width": 64}}


def large_model(work: Path, model: dict[str, Any] | None = None) -> tuple[Path, str]:
    """benchmarks/model_speed.py's wider CNN on 32x32 inputs (or `model`, a `train.model`
    section), one short epoch on its synthetic images (the weights do not matter here, the cost
    of a call does), exported to ONNX."""
    from model_speed import LARGE, synthetic_images

    from pipelines.config import load_params
    from pipelines.export import export
    from pipelines.prepare import prepare
    from pipelines.runtime import read_metadata
    from pipelines.train import save_model, train

    root = work / "large"
    synthetic_images(root / "data" / "synthetic32.csv", rows=1000 if model is None else 400)
    overrides = {**LARGE, "train.epochs": 1, **({"train.model": model} if model else {})}
    params = load_params(REPO / "params.yaml", overrides=overrides)
    prepared, model_dir = root / "prepared", root / "model"
    prepare(params.data, params.prepare, root, prepared)
    save_model(root / "model.pt", train(params.train, prepared, root / "checkpoints"))
    model_dir.mkdir()
    export(params.export, root / "model.pt", prepared, model_dir / "model.onnx")
    metadata = read_metadata(model_dir / "model.onnx")
    (model_dir / "metadata.json").write_text(json.dumps(metadata))
    if model is not None:
        return model_dir, f"resnet: ResNet-18 width {model['width']}, 32x32 gray inputs"
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


def own_bentoml_home(work: Path, name: str) -> dict[str, str]:
    """The environment that gives the `bentoml serve` named `name` its own BENTOML_HOME under
    `work`, sharing the model store of the BENTOML_HOME in effect (a symlink to its `models`).

    Two servers side by side must not share one: each empties
    `$BENTOML_HOME/prometheus_multiproc_dir` when it starts (README: "Several servers on one
    host"), and what a server had written there before is gone from its /metrics. In one run
    (2026-12-01) the batched server's batch size read 1.0, where the same server traced alone
    merged 2 to 54 requests a call."""
    store = Path(os.environ.get("BENTOML_HOME", Path.home() / "bentoml")) / "models"
    home = work / f"bentoml-{name.replace('@', '-')}"
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "models").exists():
        (home / "models").symlink_to(store.resolve(), target_is_directory=True)
    return {"BENTOML_HOME": str(home)}


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


def engine_ceiling(
    model_dir: Path, threads: int, row: list[float], sizes: tuple[int, ...] = BATCH_SIZES
) -> dict[int, float]:
    """ONNX Runtime alone, in this process on SERVER_CPUS: rows/s at each batch size (~1 s of
    warm calls each)."""
    import numpy as np

    from pipelines.preprocessing import to_model_input
    from pipelines.runtime import session

    os.sched_setaffinity(0, {int(SERVER_CPUS)})
    spec = json.loads((model_dir / "metadata.json").read_text())["preprocessing"]
    sess = session(model_dir / "model.onnx", threads=threads)
    name = sess.get_inputs()[0].name
    result = {}
    for batch in sizes:
        x = to_model_input(np.asarray([row] * batch, dtype=np.float32), spec)
        start = time.perf_counter()
        while time.perf_counter() - start < 0.3:  # warm-up
            sess.run(None, {name: x})
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < 1.0:
            sess.run(None, {name: x})
            calls += 1
        result[batch] = calls * batch / (time.perf_counter() - start)
    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return result


def ceiling_at(batch: float, table: dict[int, float]) -> float:
    """The engine's rows/s at `batch` rows a call: `table` ({batch size: rows/s}, from
    engine_ceiling) interpolated linearly in log2(batch), clamped to its smallest and largest
    batch size."""
    import numpy as np

    sizes = sorted(table)
    clamped = min(max(batch, sizes[0]), sizes[-1])
    rates = [table[k] for k in sizes]
    return float(np.interp(np.log2(clamped), np.log2(sizes), rates))


def best_of(before: dict[int, float], after: dict[int, float]) -> dict[int, float]:
    """The engine's rows/s at each batch size: the better of two engine_ceiling runs."""
    return {batch: max(before[batch], after[batch]) for batch in before}


def batch_wait_ms(batch1_rows_per_s: float) -> float:
    """How long the peers wait for a batch to fill: one batch-1 model call (from the engine's
    batch-1 rate), at least 0.5 ms and at most 10 ms. Requests arriving while a call runs queue
    anyway; a longer wait only adds latency at low load."""
    return min(10.0, max(0.5, 1000.0 / batch1_rows_per_s))


def rate_plan(
    saturation: dict[str, float], fractions: tuple[float, ...] = RATE_FRACTIONS
) -> dict[str, dict[str, float]]:
    """The open-loop rates: {"own_25pct": {server: 0.25 x its saturation, ...}, ...}."""
    return {
        f"own_{round(f * 100)}pct": {name: rps * f for name, rps in saturation.items()}
        for f in fractions
    }


def bento_batches(url: str) -> tuple[float, float]:
    """(batches, requests) BentoML's adaptive batching has formed so far, from /metrics
    (`bentoml_service_adaptive_batch_size` count and sum); (0, 0) when it never batched."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    calls = rows = 0.0
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "bentoml_service_adaptive_batch_size":
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    calls += sample.value
                elif sample.name.endswith("_sum"):
                    rows += sample.value
    return calls, rows


def file_batches(path: Path) -> tuple[float, float]:
    """(model calls, rows) a peer has written (peer_model.BatchStats); (0, 0) before any."""
    if not path.is_file():
        return 0.0, 0.0
    data = json.loads(path.read_text())
    return float(data["calls"]), float(data["rows"])


def mean_batch(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Rows per model call between two (calls, rows) readings; 1 when no batch was counted
    (servers without batching: one one-row request, one call)."""
    calls, rows = after[0] - before[0], after[1] - before[1]
    return rows / calls if calls > 0 else 1.0


Counter = Callable[[], tuple[float, float]]


def median_point(points: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The point whose `key` is the median of `points` (the lower one of an even count), with
    every round's `key` under `rounds`: one number that a single stalled round cannot move, and
    the spread beside it."""
    ordered = sorted(points, key=lambda point: point[key])
    return {**ordered[(len(ordered) - 1) // 2], "rounds": [point[key] for point in points]}


def sweep(
    urls: dict[str, str],
    seconds: float,
    script: Path,
    levels: tuple[int, ...] = CONNECTIONS,
    counters: dict[str, Counter] | None = None,
    rounds: int = 1,
) -> dict[str, list[dict[str, Any]]]:
    """wrk at each connection count, every server at one count before the next count, the whole
    sweep `rounds` times; each server's point at a count is the median-rate round (median_point).
    With `counters`, each point also gets the mean batch size the server formed during it."""
    points: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for _ in range(rounds):
        for connections in levels:
            for name, url in urls.items():
                wrk(url, connections, 1, script)  # settle after the previous server's run
                count = (counters or {}).get(name, lambda: (0.0, 0.0))
                before = count()
                point = wrk(url, connections, seconds, script)
                point["mean_batch"] = mean_batch(before, count())
                points.setdefault((name, connections), []).append(point)
                print(
                    f"  wrk c={connections:<3} {name:<18} {point['rps']:8.0f} req/s  "
                    f"p50 {point['p50_ms']:6.2f} ms  p99 {point['p99_ms']:7.2f} ms  "
                    f"batch {point['mean_batch']:5.1f}  errors {point['errors']} "
                    f"(503: {point['s503']})",
                    flush=True,
                )
    return {
        name: [median_point(points[name, connections], "rps") for connections in levels]
        for name in urls
    }


def fixed_rate(
    urls: dict[str, str],
    saturation: dict[str, float],
    seconds: float,
    body: Path,
    rounds: int = 1,
) -> dict[str, dict[str, Any]]:
    """Open loop: each server at 25%, 50% and 80% of its own saturation (rate_plan), every
    server at one rate before the next, `rounds` times; each point is the median-p99 round
    (median_point), its errors the sum over the rounds."""
    points: dict[tuple[str, str], list[dict[str, Any]]] = {}
    plan = rate_plan(saturation)
    for _ in range(rounds):
        for label, rates in plan.items():
            for name, url in urls.items():
                point = open_loop(url, rates[name], seconds, body)
                points.setdefault((label, name), []).append(point)
                print(
                    f"  open loop {label:<11} {name:<18} {point['target_rate']:7.0f}/s -> "
                    f"{point['achieved_rate']:7.0f}/s  p50 {point['p50_ms']:6.2f} ms  "
                    f"p99 {point['p99_ms']:7.2f} ms  errors {point['errors']} "
                    f"{point['statuses']}",
                    flush=True,
                )
    results: dict[str, dict[str, Any]] = {}
    for (label, name), runs in points.items():
        results.setdefault(label, {})[name] = {
            **median_point(runs, "p99_ms"),
            "errors": sum(run["errors"] for run in runs),
        }
    return results


def summarize(
    curves: dict[str, list[dict[str, Any]]],
    rates: dict[str, dict[str, Any]],
    ceiling: dict[int, float],
) -> dict[str, Any]:
    """The comparison from the wrk curves, the open-loop points (fixed_rate) and the engine's
    rows/s by batch size. `best_service`: the BentoML variant with the highest saturation (the
    service at its best batching setting), compared with every other server."""
    best = {name: max(curve, key=lambda p: p["rps"]) for name, curve in curves.items()}
    sat = {name: point["rps"] for name, point in best.items()}
    batch = {name: point["mean_batch"] for name, point in best.items()}
    services = [name for name in curves if name.startswith("service") and "@" not in name]
    top = max(services, key=lambda name: sat[name]) if services else None
    p99_half = {name: rates["own_50pct"][name]["p99_ms"] for name in curves}
    below_80 = {name: sum(point[name]["errors"] for point in rates.values()) for name in curves}
    others = [name for name in curves if name not in services]
    compared = next((name for name in curves if name.startswith("service@")), None)
    return {
        "saturation_rps": sat,
        "saturation_connections": {name: p["connections"] for name, p in best.items()},
        "batch_at_saturation": batch,
        "engine_rows_per_s": {str(k): v for k, v in ceiling.items()},
        "engine_best_batch": max(ceiling, key=lambda k: ceiling[k]),
        "served_over_ceiling": {n: sat[n] / ceiling_at(batch[n], ceiling) for n in curves},
        "served_over_batch1": {name: sat[name] / ceiling[min(ceiling)] for name in curves},
        "p50_ms": {label: {n: p["p50_ms"] for n, p in pts.items()} for label, pts in rates.items()},
        "p99_ms": {label: {n: p["p99_ms"] for n, p in pts.items()} for label, pts in rates.items()},
        "rates": {
            label: {n: p["target_rate"] for n, p in pts.items()} for label, pts in rates.items()
        },
        "errors_up_to_80pct": below_80,
        "errors_in_sweep": {n: sum(p["errors"] for p in c) for n, c in curves.items()},
        "s503_in_sweep": {n: sum(p["s503"] for p in c) for n, c in curves.items()},
        "best_service": top,
        "service_over_others": {
            other: {
                "saturation": sat[top] / sat[other],
                "p99_at_50pct": p99_half[top] / p99_half[other],
            }
            for other in others
        }
        if top
        else {},
        "batching_gain": sat["service_batched"] / sat["service"]
        if "service_batched" in sat
        else (sat["service"] / sat["service_unbatched"] if "service_unbatched" in sat else None),
        "compared": compared,
        "service_over_compared": sat["service"] / sat[compared] if compared else None,
    }


def report(summary: dict[str, Any]) -> None:
    """The comparison table and the goals, on stdout."""
    sat, batch = summary["saturation_rps"], summary["batch_at_saturation"]
    p50, p99, errors = summary["p50_ms"], summary["p99_ms"], summary["errors_up_to_80pct"]
    labels = list(p50)
    head = "".join(f" {label[4:]:>15}" for label in labels)
    print(
        f"\n{'server':<18} {'sat/s':>8} {'conns':>5} {'batch':>5} {'/ceil':>6}{head} {'err<80%':>7}"
    )
    for name in sat:
        cells = "".join(f" {p50[label][name]:>6.2f}/{p99[label][name]:<8.2f}" for label in labels)
        print(
            f"{name:<18} {sat[name]:>8,.0f} {summary['saturation_connections'][name]:>5} "
            f"{batch[name]:>5.1f} {summary['served_over_ceiling'][name]:>6.2f}{cells} "
            f"{errors[name]:>7}"
        )
    print("(open loop at 25/50/80% of each server's own saturation: p50/p99 ms; batch: rows per")
    print(" model call at saturation; /ceil: saturation / engine alone at that batch size)")
    engine = ", ".join(f"b{k} {v:,.0f}" for k, v in summary["engine_rows_per_s"].items())
    print(f"engine alone, rows/s: {engine} (best at batch {summary['engine_best_batch']})")
    print(f"503s in the wrk sweep (any load): {summary['s503_in_sweep']}")
    if summary["best_service"]:
        print(f"best BentoML variant: {summary['best_service']}; its ratios to the others:")
        for other, ratio in summary["service_over_others"].items():
            print(
                f"  vs {other:<12} saturation {ratio['saturation']:.2f}x (goal > 1), "
                f"p99 at 50% {ratio['p99_at_50pct']:.2f}x (goal < 1)"
            )
    if summary["batching_gain"] is not None:
        print(f"adaptive batching gain (saturation, on / off): {summary['batching_gain']:.2f}x")
    if summary["compared"]:
        print(f"service / {summary['compared']} saturation: {summary['service_over_compared']:.3f}")


def log_counts(log: Path) -> dict[str, int]:
    text = log.read_text(errors="replace")
    return {"tracebacks": text.count("Traceback"), "overloaded": text.count("overloaded")}


def peer_available(python: str, module: str) -> bool:
    """Whether `python` imports `module` (the `bench` extra is installed there)."""
    probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, check=False)
    return probe.returncode == 0


def commands_for(
    servers: tuple[str, ...],
    model_dir: Path,
    work: Path,
    threads: int,
    wait_ms: float,
    peer_python: str,
    batched_latency_ms: float | None = None,
) -> dict[str, tuple[list[str], dict[str, str], Path]]:
    """The server commands by name (`flipped`: the service with batching the other way round;
    `batched_latency_ms`: the batched variant's `max_latency_ms`, else params.yaml's), leaving
    out peers `peer_python` cannot import (with a line saying so)."""
    from pipelines.config import load_params

    serve = load_params(REPO / "params.yaml").serve
    bento = BENTO
    commands: dict[str, tuple[list[str], dict[str, str], Path]] = {}
    for name in servers:
        if name == "service":
            commands[name] = (bento, own_bentoml_home(work, name), REPO)
        elif name in ("flipped", "service_batched", "service_unbatched"):
            batched = serve.max_batch_size == 1 if name == "flipped" else name == "service_batched"
            flip: dict[str, Any] = {"max_batch_size": BATCHED_MAX if batched else 1}
            if batched and batched_latency_ms is not None:
                flip["max_latency_ms"] = batched_latency_ms
            variant = "service_batched" if batched else "service_unbatched"
            overrides = {"MLOPS_SERVE_OVERRIDES": json.dumps(flip)}
            commands[variant] = (bento, {**overrides, **own_bentoml_home(work, variant)}, REPO)
        elif name == "reference":
            command = [sys.executable, str(BENCH / "reference_server.py")]
            commands[name] = (
                [*command, "--model-dir", str(model_dir), "--threads", str(threads)],
                {},
                REPO,
            )
        elif name in PEERS:
            script, module = PEERS[name]
            if not peer_available(peer_python, module):
                print(f"{name}: left out, {peer_python} cannot import {module} (the bench extra)")
                continue
            command = [peer_python, str(BENCH / script), "--model-dir", str(model_dir)]
            command += ["--threads", str(threads), "--max-batch-size", str(BATCHED_MAX)]
            command += [
                "--batch-wait-ms" if name == "ray" else "--batch-timeout-ms",
                f"{wait_ms:.2f}",
            ]
            command += ["--stats-file", str(work / f"{name}-batches.json")]
            commands[name] = (command, {"PYTHONPATH": f"{REPO}:{BENCH}"}, REPO)
        else:
            raise SystemExit(f"--servers: unknown server {name!r}; known: {', '.join(SERVERS)}")
    return commands


def counter_for(name: str, url: str, work: Path) -> Counter:
    """How to read `name`'s (calls, rows) so far."""
    if name in PEERS:
        return lambda: file_batches(work / f"{name}-batches.json")
    if name.startswith("service"):
        return lambda: bento_batches(url)
    return lambda: (0.0, 0.0)


def build_model(work: Path, model: str) -> tuple[Path, str]:
    """The model folder (model.onnx + metadata.json) and a line describing it."""
    if model in RESNETS:
        return large_model(work, RESNETS[model])
    return large_model(work) if model == "large" else model_source(work)


def run(
    work: Path,
    seconds: float,
    rate_seconds: float,
    model: str = "digits",
    compare_ref: str | None = None,
    levels: tuple[int, ...] = CONNECTIONS,
    servers: tuple[str, ...] = SERVERS,
    peer_python: str = sys.executable,
    batched_latency_ms: float | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    from flows.package import save_bento_model
    from pipelines.config import load_params

    serve = load_params(REPO / "params.yaml").serve
    load_start = os.getloadavg()
    model_dir, model_note = build_model(work, model)
    tag = save_bento_model(load_params(REPO / "params.yaml").register_.model_name, model_dir, "1")
    row = model_row(model_dir)
    body = work / "body.json"
    body.write_text(json.dumps({"rows": [row]}))
    script = work / "post.lua"
    script.write_text(WRK_LUA % {"body": body})
    print(f"model: {model_note}, BentoML tag {tag}; serve settings: {serve.model_dump()}")
    ceiling = engine_ceiling(model_dir, serve.threads, row)
    wait_ms = batch_wait_ms(ceiling[1])
    print(f"engine alone, rows/s by batch: {ceiling}; peers wait up to {wait_ms:.2f} ms")
    commands = commands_for(
        servers, model_dir, work, serve.threads, wait_ms, peer_python, batched_latency_ms
    )
    with contextlib.ExitStack() as stack:
        if compare_ref is not None:
            old = stack.enter_context(checkout(compare_ref, work))
            name = f"service@{compare_ref}"
            env = {"PYTHONPATH": str(old), **own_bentoml_home(work, name)}
            commands[name] = (BENTO, env, old)
        logs = {name: work / f"{name.replace('@', '-')}.log" for name in commands}
        urls = {
            name: stack.enter_context(server(name, command, env, logs[name], cwd))
            for name, (command, env, cwd) in commands.items()
        }
        counters = {name: counter_for(name, url, work) for name, url in urls.items()}
        curves = sweep(urls, seconds, script, levels, counters, rounds)
        saturation = {name: max(p["rps"] for p in curve) for name, curve in curves.items()}
        rates = fixed_rate(urls, saturation, rate_seconds, body, rounds)
    after = engine_ceiling(model_dir, serve.threads, row)
    print(f"engine alone after the servers, rows/s by batch: {after}")
    summary = summarize(curves, rates, best_of(ceiling, after))
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": model_note,
        "serve_settings": serve.model_dump(mode="json"),
        "engine_rows_per_s": {"before": ceiling, "after": after},
        "peer_batching": {"max_batch_size": BATCHED_MAX, "wait_ms": wait_ms},
        "batched_max_latency_ms": batched_latency_ms,
        "rounds": rounds,
        "pinning": {"servers": SERVER_CPUS, "load_generators": CLIENT_CPUS},
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "summary": summary,
        "wrk": curves,
        "open_loop": rates,
        "server_logs": {name: log_counts(path) for name, path in logs.items()},
    }


def connection_counts(text: str) -> tuple[int, ...]:
    """`--connections`: comma-separated positive counts ("1,8,64"); argparse.ArgumentTypeError
    (usage, one error line, exit 2) otherwise."""
    try:
        levels = tuple(int(c) for c in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: not comma-separated counts (e.g. 1,8,64)"
        ) from None
    if min(levels) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every count must be at least 1")
    return levels


def server_names(text: str) -> tuple[str, ...]:
    """`--servers`: comma-separated names of KNOWN_SERVERS, checked before any setup;
    argparse.ArgumentTypeError (usage, one error line, exit 2) otherwise."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in KNOWN_SERVERS]
    if unknown or not names:
        shown = f"unknown {', '.join(map(repr, unknown))}" if unknown else "none given"
        raise argparse.ArgumentTypeError(f"{shown}; known: {', '.join(KNOWN_SERVERS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=positive_float, default=5.0, help="per wrk run")
    parser.add_argument(
        "--rate-seconds", type=positive_float, default=10.0, help="per open-loop run"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--model", choices=("digits", *RESNETS, "large"), default="digits")
    parser.add_argument("--compare-ref", default=None, help="also serve service.py as of REF")
    parser.add_argument(
        "--connections",
        type=connection_counts,
        default=CONNECTIONS,
        help="comma-separated wrk connection counts",
    )
    parser.add_argument(
        "--servers",
        type=server_names,
        default=SERVERS,
        help="comma-separated: service, flipped (batching the other way), service_batched, "
        "service_unbatched, reference, ray, litserve",
    )
    parser.add_argument(
        "--peer-python", default=sys.executable, help="the Python with the bench extra"
    )
    parser.add_argument(
        "--batched-max-latency-ms",
        type=float,
        default=None,
        help="max_latency_ms of the service's batched variant (default: params.yaml's)",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="repeat the wrk sweep and the open-loop rates; each figure is the median round",
    )
    args = parser.parse_args()
    levels, servers = args.connections, args.servers
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.update(
            {"BENTOML_HOME": str(Path(tmp) / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
        )
        os.environ.update({"DO_NOT_TRACK": "true", "RAY_USAGE_STATS_ENABLED": "0"})
        results = run(
            Path(tmp),
            args.seconds,
            args.rate_seconds,
            args.model,
            args.compare_ref,
            levels,
            servers,
            args.peer_python,
            args.batched_max_latency_ms,
            args.rounds,
        )
    report(results["summary"])
    print(f"server logs: {results['server_logs']}")
    print(f"load average: {results['load_average']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
