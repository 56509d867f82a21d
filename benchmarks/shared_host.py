"""One host for both jobs (issue 14): does serving keep its latency while training runs?

    python benchmarks/shared_host.py [--seconds 30] [--rate R] [--out figures.json]

Side by side in one run, on this machine:
- the service: a real `bentoml serve service:Classifier` of a packaged model whose call costs
  milliseconds (benchmarks/model_speed.py's wider CNN, width 64, depth 3, on 32x32 inputs,
  exported to ONNX as benchmarks/serve_load.py does), params.yaml's `serve` settings;
- the load: benchmarks/serve_openloop.py (open loop, fixed rate, latency from the due time) at
  half the service's saturation (the best of a short `wrk` sweep, service alone) unless --rate;
- the training: the same CNN trained by the pipeline's own `train` (pipelines/train.py) on
  synthetic 32x32 images (batches of 128), in a subprocess of this script that logs each epoch's
  end; its samples/s counts the epochs that ended inside the measured window.

Scenarios: (a) service alone, (b) training alone, (c) both, no controls (training as it runs
today, `host.mode: dedicated`), (d) both, `host.mode: shared`: params.yaml's `host` section as
shipped, pointed at this service, with the SLO the goal implies: host.slo.p99_ms = --slo-factor
(1.2) x the p99 of round 1's (a) (--slo-ms gives one instead). Training runs on the cores
`host.service.cpus` leaves it, at its niceness and threads, with the controller reading the
service's /metrics. The service is confined to `host.service.cpus` in EVERY scenario and while
its saturation is measured (a shared host deploys it so: `taskset -c 0 bentoml serve ...`), so
"half the service's saturation" is half of what it serves on the cores it keeps, and (a) is the
same service at the same rate with nothing else running; --no-pin-service leaves it on every
core (then it saturates both cores, and half of that leaves training almost nothing). On request:
(e) (d) with `host.on_breach: throttle` (fewer threads and a duty cycle instead of a pause);
(f) (d) with `host.resume_via: throttle` (after a pause, the throttled share first);
(g) (d) with `host.training.borrow_idle` (training on every core, all of it at SCHED_IDLE: it
takes the cycles the service and the load generator leave; one torch thread a core);
(h) (g) with two torch threads a core (torch splits an op evenly between its threads, so one
thread preempted by the service stalls the op; smaller shares let the other core pick up the
waiting threads); (i) (g) with one torch thread (no op to stall: it runs on whichever core is
idle); (j) (d)'s quotas alone: no controller reads the service (host.poll_ms one hour, the SLO
600 s), so what remains is what training on the other core costs the service through the caches
and memory they share. After the steady window of (d) to (i), once training runs at full share
again, the load steps to --overload x saturation for a few seconds: the time from that step to
training paused is compared with one training step plus one poll.

The load generator runs pinned to the last core in every scenario, never on the service's
(with 2 cores it competes with training, as a client on another host would not); the scenarios
run in rounds (a, b, c, d, ...) so slow drifts of the machine's load hit all of them; the load
average is reported, and the generator's own CPU use (`client_cpu_share`). Goals (issue 14):
p99 in (d) <= 1.25x (a) (stretch 1.1x), training in (d) >= 50% of (b), breach to pause <= one
step + one poll.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import resource
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
sys.path.insert(0, str(BENCH))

from bench_args import fraction, positive_float, positive_int  # noqa: E402

from tests.helpers.processes import free_port, stop_group, wait_ready  # noqa: E402

CPUS = sorted(os.sched_getaffinity(0))
CLIENT_CPUS = str(CPUS[-1])  # the load generator, every scenario
TRAIN_ROWS = 3000  # synthetic 32x32 images: 2,100 training rows, 16 steps of 128 an epoch
WARM_STEPS = 3  # steps before a measured window (imports, data, allocator warm)
# The training workload: model_speed.LARGE trained "for ever" (the benchmark stops it).
TRAINING = {
    "train.epochs": 10_000,
    "train.patience": 10_000,
    "train.scheduler": "constant",
    "train.resume": False,
}
GOALS = {"p99_ratio": 1.25, "p99_ratio_stretch": 1.1, "training_share": 0.5}
EVENT = "SHARED_HOST_EVENT "  # prefix of the worker's machine-readable stderr lines


# ---- the training worker (a subprocess: `shared_host.py train-worker ...`) ----------------------


def train_worker(prepared: Path, checkpoints: Path, overrides: dict[str, Any]) -> None:
    """Train model_speed.LARGE + TRAINING + `overrides` on `prepared` until killed, under
    `host` as the train stage runs it (`pipelines.host.shared_host`: dedicated, or shared with
    its quotas and controller). On stderr: one EVENT line per optimizer step ({"t": unix s,
    "rows": rows in the step}) and the pipeline's log lines (the controller's decisions among
    them), each prefixed with its unix time."""
    from model_speed import LARGE

    from pipelines.config import load_params
    from pipelines.host import shared_host, stopped_cleanly
    from pipelines.train import train

    logging.basicConfig(
        level=logging.INFO, format="%(created).3f %(name)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per /metrics read
    params = load_params(REPO / "params.yaml", overrides={**LARGE, **TRAINING, **overrides})
    with stopped_cleanly(), shared_host(params.host) as gate:  # SIGTERM: one line, exit 143
        train(params.train, prepared, checkpoints, gate=StepEvents(gate, params.train.batch_size))


class StepEvents:
    """A training gate that first writes one EVENT line per optimizer step, then does what the
    run's own gate does (pause, throttle, stop)."""

    def __init__(self, gate: Any, batch_size: int) -> None:
        self.gate, self.batch_size = gate, batch_size

    def boundary(self) -> None:
        event = {"t": time.time(), "rows": self.batch_size}
        print(EVENT + json.dumps(event), file=sys.stderr, flush=True)
        self.gate.boundary()


# ---- setup -------------------------------------------------------------------------------------


def training_data(work: Path) -> Path:
    """model_speed's synthetic 32x32 images, prepared by the pipeline's `prepare`."""
    from model_speed import LARGE, synthetic_images

    from pipelines.config import load_params
    from pipelines.prepare import prepare

    root = work / "training"
    synthetic_images(root / "data" / "synthetic32.csv", rows=TRAIN_ROWS, seed=1)
    params = load_params(REPO / "params.yaml", overrides=LARGE)
    prepare(params.data, params.prepare, root, root / "prepared")
    return root / "prepared"


@contextlib.contextmanager
def service(log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`bentoml serve service:Classifier` (unpinned) on a free port: (base URL, process)."""
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", "service:Classifier"]
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_ready(url, process, 120)
            except (RuntimeError, TimeoutError):
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
                raise
            yield url, process
        finally:
            stop_group(process)


def pin_tree(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of process `pid` and all its descendants (threads included)."""
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            for thread in proc.threads():
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(thread.id, cpus)


# ---- load ----------------------------------------------------------------------------------------


def scrape(url: str) -> Any:
    """The service's /metrics now, parsed (inference.metrics.Scrape of the prediction endpoints)."""
    import httpx

    from inference import metrics

    answer = httpx.get(f"{url}/metrics", timeout=10)
    answer.raise_for_status()
    return metrics.parse(answer.text)


def server_side(before: Any, after: Any) -> dict[str, float]:
    """p50/p99 (ms) the service itself measured between two scrapes
    (bentoml_service_request_duration_seconds, service.py's buckets 25% apart: a quantile is
    interpolated inside its bucket, so read it to about +-11%)."""
    from inference import metrics

    buckets = metrics.since(before, after).buckets
    return {
        "server_p50_ms": metrics.quantile(buckets, 0.5) * 1000,
        "server_p99_ms": metrics.quantile(buckets, 0.99) * 1000,
    }


def scrape_cost(url: str, count: int = 30) -> dict[str, float]:
    """Wall time (ms) of `count` /metrics reads of the idle service, one after another: what each
    of the controller's polls costs the service's event loop (at most; the client's parse and
    HTTP included)."""
    import httpx

    times = []
    with httpx.Client(timeout=10) as client:
        for _ in range(count):
            start = time.perf_counter()
            client.get(f"{url}/metrics").raise_for_status()
            times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"median_ms": times[len(times) // 2], "max_ms": times[-1]}


def client_prefix(priority: str) -> list[str]:
    """The command prefix the load generator runs under: pinned to CLIENT_CPUS and, with
    `priority` "fifo", at real-time priority (SCHED_FIFO 10, chrt(1)): it stands in for clients
    on other hosts, so training on the core it shares must not delay its sends and its reads of
    the answers (at "normal", a training step holds the core for up to a scheduler slice, and
    that wait is counted as the service's latency). SystemExit when chrt is refused (not root)."""
    prefix = ["taskset", "-c", CLIENT_CPUS]
    if priority == "fifo":
        prefix = ["chrt", "-f", "10", *prefix]
        refused = subprocess.run([*prefix, "true"], check=False, capture_output=True, text=True)
        if refused.returncode:
            sys.exit(
                "--client-priority fifo: chrt -f refused (needs root or CAP_SYS_NICE): "
                f"{refused.stderr.strip()}; run as root or pass --client-priority normal"
            )
    return prefix


CLIENT_PREFIX: list[str] = ["taskset", "-c", CLIENT_CPUS]  # main() sets it from --client-priority


def open_loop(url: str, rate: float, seconds: float, body: Path) -> dict[str, Any]:
    """benchmarks/serve_openloop.py at a fixed `rate`, under CLIENT_PREFIX; the latency it
    measured (from each request's due time) and the one the service measured itself."""
    command = [sys.executable, str(BENCH / "serve_openloop.py"), "--url", f"{url}/predict"]
    command += ["--body-file", str(body), "--rate", f"{rate:.1f}", "--duration", str(seconds)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    first = scrape(url)
    out = subprocess.run([*CLIENT_PREFIX, *command], capture_output=True, text=True, check=True)
    last = scrape(url)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    result |= server_side(first, last)
    result["ended_at"] = time.time()
    # the generator's own CPU (user + system, its start-up and imports included) per second of
    # the window: what it took from the core it shares with training
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    result["client_cpu_share"] = used / seconds
    return result


def saturation(url: str, body: Path, work: Path) -> dict[str, Any]:
    """Service alone: the best rate of a short closed-loop `wrk` sweep (serve_load's)."""
    from serve_load import WRK_LUA, wrk

    script = work / "post.lua"
    script.write_text(WRK_LUA % {"body": body})
    points = []
    for connections in (1, 2, 4, 8, 16):
        wrk(url, connections, 1, script)  # settle
        points.append(wrk(url, connections, 3, script))
    best = max(points, key=lambda p: p["rps"])
    return {"rps": best["rps"], "connections": best["connections"], "sweep": points}


# ---- training runs -------------------------------------------------------------------------------


class Training:
    """A running train-worker subprocess: its epoch events and its log lines."""

    def __init__(self, prepared: Path, work: Path, name: str, overrides: dict[str, Any]) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.log = work / f"train-{name}.log"
        checkpoints = work / f"checkpoints-{name}"
        shutil.rmtree(checkpoints, ignore_errors=True)
        command = [sys.executable, str(Path(__file__).resolve()), "train-worker"]
        command += ["--prepared", str(prepared), "--checkpoints", str(checkpoints)]
        command += ["--overrides", json.dumps(overrides)]
        self.sink = self.log.open("wb")
        self.process = subprocess.Popen(
            command, cwd=REPO, stdout=self.sink, stderr=subprocess.STDOUT, start_new_session=True
        )

    def events(self) -> list[dict[str, Any]]:
        lines = self.log.read_text(errors="replace").splitlines()
        return [json.loads(line[len(EVENT) :]) for line in lines if line.startswith(EVENT)]

    def wait_steps(self, count: int, timeout_s: float = 300) -> None:
        """Until `count` optimizer steps have ended (the warm-up: imports, data, first steps)."""
        deadline = time.monotonic() + timeout_s
        while len(self.events()) < count:
            if self.process.poll() is not None:
                raise RuntimeError(f"training exited early: {self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"training: no {count} steps in {timeout_s} s")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_group(self.process, grace_s=30)
        self.sink.close()

    def rate(self, start: float, end: float) -> dict[str, Any]:
        """Training samples/s over [start, end]: the rows of the optimizer steps that ended
        inside it over its length (paused time counts: it is the speed training kept)."""
        steps = [e for e in self.events() if start <= e["t"] <= end]
        ends = [e["t"] for e in steps]
        gaps = sorted(b - a for a, b in itertools.pairwise(ends))
        return {
            "samples_per_s": sum(e["rows"] for e in steps) / (end - start),
            "steps": len(steps),
            "seconds": end - start,
            "median_step_s": gaps[len(gaps) // 2] if gaps else None,
        }

    def held(self) -> bool:
        """Whether the controller's last decision line (any time) is a pause or throttle not
        yet followed by "training at full share"."""
        modes = ("training paused", "training throttled", "training at full share")
        last = [text for _, text in self.log_lines("host: ") if any(m in text for m in modes)]
        return bool(last) and "training at full share" not in last[-1]

    def log_lines(self, contains: str, after: float = 0.0) -> list[tuple[float, str]]:
        """(unix time, text) of the log lines containing `contains`, at or after `after`."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            stamp, _, text = line.partition(" ")
            with contextlib.suppress(ValueError):
                when = float(stamp)
                if when >= after and contains in text:
                    found.append((when, text))
        return found


def training_alone(prepared: Path, work: Path, seconds: float) -> dict[str, Any]:
    """(b): the worker alone for `seconds` after its warm-up epochs."""
    training = Training(prepared, work, "b", {})
    try:
        training.wait_steps(WARM_STEPS)
        start = time.time()
        time.sleep(seconds)
        return training.rate(start, time.time())
    finally:
        training.stop()


def both(
    prepared: Path,
    work: Path,
    name: str,
    overrides: dict[str, Any],
    load: dict[str, Any],
    overload_rate: float = 0.0,
) -> dict[str, Any]:
    """(c) or (d): the worker (with `overrides`) under the steady open-loop load."""
    training = Training(prepared, work, name, overrides)
    try:
        training.wait_steps(WARM_STEPS)
        served = open_loop(**load)
        result = {"load": served, "training": training.rate(served["started_at"], time.time())}
        # the controller's decisions inside the steady window (how often the SLO held it back)
        window = training.log_lines("host: training ", after=served["started_at"])
        result["decisions"] = [text for when, text in window if when <= served["ended_at"]]
        if overload_rate:
            step = load | {"rate": overload_rate, "seconds": 6.0}
            result["breach"] = breach(training, step)
        return result
    finally:
        training.stop()


def breach(training: Training, step: dict[str, Any]) -> dict[str, Any]:
    """After the steady window, once training runs at full share again (the controller's
    "training at full share" line, or no decision at all) and has stepped twice: the load
    steps to the overload rate for a few seconds (over saturation the queue, so p99, climbs
    within a fraction of a second). From the step: the controller's first decision that holds
    training back (paused, or throttled: a /metrics read that times out throttles), the end of
    the step at whose boundary it took effect (the first step ending after it), and the first
    pause decision. The goal is one training step + one poll."""
    from pipelines.config import load_params

    poll_ms = load_params(REPO / "params.yaml").host.poll_ms
    deadline = time.time() + 60
    while time.time() < deadline and training.held():
        time.sleep(0.2)
    resumed_at, full = time.time(), not training.held()
    training.wait_steps(len(training.events()) + 2)
    before = training.rate(resumed_at - 30, time.time())
    served = open_loop(**step)
    t0 = served["started_at"]
    decided = [
        (when, text)
        for when, text in training.log_lines("host: training ", after=t0)
        if "training paused" in text or "training throttled" in text
    ]
    result: dict[str, Any] = {"load": served, "decision": decided[0][1] if decided else None}
    result["full_share_before"] = full
    if decided:
        # the step at whose boundary the decision took effect: the first one ending after it
        blocked = [e["t"] for e in training.events() if e["t"] >= decided[0][0]]
        result["decision_s"] = decided[0][0] - t0
        result["applied_s"] = (blocked[0] if blocked else decided[0][0]) - t0
        result["paused_s"] = next((w - t0 for w, x in decided if "training paused" in x), None)
    result["step_s"] = before["median_step_s"]
    result["goal_s"] = (before["median_step_s"] or 0.0) + poll_ms / 1000
    result["poll_ms"] = poll_ms
    return result


# ---- the whole run ---------------------------------------------------------------------------


def shared_overrides(
    url: str, slo_ms: float | None, resume_below: float | None = None
) -> dict[str, Any]:
    """The `host` keys of scenario (d): params.yaml's `host` section as shipped, in shared mode,
    pointed at this service (and with `slo_ms` as host.slo.p99_ms, `resume_below` as
    host.resume_below when given)."""
    overrides: dict[str, Any] = {"host.mode": "shared", "host.slo.metrics_url": f"{url}/metrics"}
    if slo_ms:
        overrides["host.slo.p99_ms"] = slo_ms
    if resume_below:
        overrides["host.resume_below"] = resume_below
    return overrides


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The model packaged, the training data prepared, the service started and its saturation
    measured; then the scenarios in rounds. The figures."""
    from serve_load import large_model, model_row

    from flows.package import save_bento_model
    from pipelines.config import load_params

    load_start = os.getloadavg()
    model_dir, note = large_model(work)
    tag = save_bento_model(load_params(REPO / "params.yaml").register_.model_name, model_dir, "1")
    prepared = training_data(work)
    body = work / "body.json"
    body.write_text(json.dumps({"rows": [model_row(model_dir)]}))
    print(f"model: {note}, BentoML tag {tag}", flush=True)
    with service(work / "service.log") as (url, process):
        if args.pin_service:  # as the service's launcher on a shared host would
            pin_tree(process.pid, set(load_params(REPO / "params.yaml").host.service.cpus))
        sat = saturation(url, body, work)
        cost = scrape_cost(url)
        load = {"url": url, "rate": args.rate or sat["rps"] / 2, "seconds": args.seconds}
        load["body"] = body
        print(f"saturation {sat['rps']:.0f}/s; load {load['rate']:.0f}/s", flush=True)
        results = rounds(args, prepared, work, load, sat["rps"] * args.overload)
    host = load_params(REPO / "params.yaml").host
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "model": note,
        "cpus": len(CPUS),
        "saturation": sat,
        "metrics_read_ms": cost,
        "client_priority": args.client_priority,
        "rate": load["rate"],
        "overload_rate": sat["rps"] * args.overload,
        "slo_p99_ms": args.slo_ms or host.slo.p99_ms,
        "slo_factor": None if args.slo_ms_given else args.slo_factor,
        "resume_below": args.resume_below or host.resume_below,
        "pin_service": args.pin_service,
        "load_average": {"start": load_start, "end": os.getloadavg()},
        "results": results,
    }


def rounds(
    args: argparse.Namespace,
    prepared: Path,
    work: Path,
    load: dict[str, Any],
    overload_rate: float,
) -> dict[str, list[Any]]:
    """Each round: the scenarios asked for, in the order a, b, c, d."""
    from pipelines.config import load_params

    host = load_params(REPO / "params.yaml").host
    results: dict[str, list[Any]] = {key: [] for key in args.scenarios}
    variants: dict[str, dict[str, Any]] = {
        "d": {},
        "e": {"host.on_breach": "throttle"},
        "f": {"host.resume_via": "throttle"},
        "g": {"host.training.borrow_idle": True},
        "h": {"host.training.borrow_idle": True, "host.training.threads": 2 * len(CPUS)},
        "i": {"host.training.borrow_idle": True, "host.training.threads": 1},
        "j": {"host.poll_ms": 3_600_000, "host.slo.p99_ms": 600_000},
    }
    for number in range(args.rounds):
        if "a" in args.scenarios:
            results["a"].append(open_loop(**load))
        if "b" in args.scenarios:
            results["b"].append(training_alone(prepared, work / f"round{number + 1}", args.seconds))
        if "c" in args.scenarios:
            results["c"].append(both(prepared, work / f"round{number + 1}", "c", {}, load))
        if args.slo_ms is None:  # the SLO the goal implies: --slo-factor x the service alone
            alone = results["a"][0]["p99_ms"] if results.get("a") else host.slo.p99_ms
            args.slo_ms = round(args.slo_factor * alone, 2)
        # An SLO near the service-alone p99 needs a resume threshold above that p99, or training
        # never resumes (params.yaml's 0.7 x 1.2 x (a) = 0.84 x (a)): 0.9 x 1.2 = 1.08 x (a)
        resume = args.resume_below = args.resume_below or (None if args.slo_ms_given else 0.9)
        overrides = shared_overrides(load["url"], args.slo_ms, resume)
        for key, extra in variants.items():
            if key not in args.scenarios:
                continue
            results[key].append(
                both(
                    prepared,
                    work / f"round{number + 1}",
                    key,
                    overrides | extra,
                    load,
                    0.0 if key == "j" else overload_rate,  # (j) has no controller to hold it back
                )
            )
        for key in args.scenarios:
            print(f"round {number + 1}: ({key}) {brief(results[key][-1])}", flush=True)
    return results


def brief(result: dict[str, Any]) -> str:
    """One line of a scenario's result."""
    if "training" in result or "samples_per_s" in result:
        speed = result.get("training", result)["samples_per_s"]
        text = f"training {speed or 0:.0f} samples/s"
        if "load" not in result:
            return text
        if result.get("decisions"):
            paused = sum("training paused" in line for line in result["decisions"])
            text += f" ({len(result['decisions'])} decisions, {paused} pauses in the window)"
        return f"{text}; {brief(result['load'])}"
    load = result
    return (
        f"{load['achieved_rate']:.0f}/s p50 {load['p50_ms']:.2f} ms p99 {load['p99_ms']:.2f} ms "
        f"errors {load['errors']}"
    )


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def median(values: list[float]) -> float:
    import statistics

    return float(statistics.median(values))


def table(figures: dict[str, Any]) -> str:
    """The issue's table (medians over the rounds) and the goals."""
    res = figures["results"]
    loads = {k: [r.get("load", r) for r in res[k]] for k in "acdefghij" if res.get(k)}
    runs = {k: [r.get("training", r) for r in res[k]] for k in "bcdefghij" if res.get(k)}
    p50 = {k: median([x["p50_ms"] for x in v]) for k, v in loads.items()}
    p99 = {k: median([x["p99_ms"] for x in v]) for k, v in loads.items()}
    server = {
        k: (median([x["server_p50_ms"] for x in v]), median([x["server_p99_ms"] for x in v]))
        for k, v in loads.items()
        if all("server_p99_ms" in x for x in v)
    }
    speed = {k: median([r["samples_per_s"] or 0.0 for r in v]) for k, v in runs.items()}
    alone = speed.get("b")

    def cell(key: str) -> tuple[str, str, str]:
        latency = f"{p50[key]:.1f} / {p99[key]:.1f} ms" if key in p50 else "—"
        inside = f"{server[key][0]:.1f} / {server[key][1]:.1f} ms" if key in server else "—"
        if key not in speed:
            return latency, inside, "—"
        share = f" ({speed[key] / alone:.0%} of b)" if alone and key != "b" else ""
        return latency, inside, f"{speed[key]:.0f}{share}"

    names = {
        "a": "(a) service alone",
        "b": "(b) training alone",
        "c": "(c) both, no controls",
        "d": "(d) both, shared mode",
        "e": "(e) as (d), on_breach: throttle",
        "f": "(f) as (d), resume_via: throttle",
        "g": "(g) as (d), training.borrow_idle",
        "h": "(h) as (g), 2 torch threads a core",
        "i": "(i) as (g), 1 torch thread",
        "j": "(j) as (d), quotas alone (no controller)",
    }
    lines = [
        "| scenario | p50 / p99 (client) | p50 / p99 (service's own) | training samples/s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {names[k]} | {' | '.join(cell(k))} |" for k in names if k in res]
    sat, load = figures["saturation"]["rps"], figures["load_average"]
    lines += [
        "",
        f"request rate {figures['rate']:.0f}/s (saturation {sat:.0f}/s); overload step "
        f"{figures['overload_rate']:.0f}/s; SLO p99 {figures['slo_p99_ms']:.1f} ms"
        + (f" ({figures['slo_factor']:g} x (a))" if figures.get("slo_factor") else "")
        + (f", resume below {figures['resume_below']:g} x it" if "resume_below" in figures else "")
        + f"; service pinned: {figures['pin_service']}; load generator at "
        f"{figures.get('client_priority', 'normal')} priority; "
        f"{figures['cpus']} CPUs; load average {load['start']} -> {load['end']}",
    ]
    if "metrics_read_ms" in figures:
        cost = figures["metrics_read_ms"]
        lines.append(
            f"a /metrics read of the idle service: median {cost['median_ms']:.2f} ms, "
            f"max {cost['max_ms']:.2f} ms"
        )
    client = [x.get("client_cpu_share") for v in loads.values() for x in v]
    if client and None not in client:
        lines.append(
            f"load generator CPU: {min(client):.1%}-{max(client):.1%} of a core (start-up included)"
        )
    for key in "cdefghij":
        if "a" in p99 and key in p99:
            each = [x["p99_ms"] / y["p99_ms"] for x, y in zip(loads[key], loads["a"], strict=True)]
            lines.append(
                f"p99 ({key}) / (a): {p99[key] / p99['a']:.2f}x (round by round: "
                + ", ".join(f"{r:.2f}" for r in each)
                + ")"
                + (
                    f"; the service's own: {server[key][1] / server['a'][1]:.2f}x"
                    if key in server and "a" in server
                    else ""
                )
            )
        if "b" in speed and key in speed:
            pairs = zip(runs[key], runs["b"], strict=True)
            each = [x["samples_per_s"] / y["samples_per_s"] for x, y in pairs]
            lines.append(
                f"training ({key}) / (b) round by round: " + ", ".join(f"{r:.2f}" for r in each)
            )
    steps = [(key, n, r) for key in "defghi" for n, r in enumerate(res.get(key, []))]
    for key, number, d in steps:
        breach = d.get("breach") or {}
        lines.append(
            f"({key}) round {number + 1}: overload step -> held back"
            f" {fmt(breach.get('decision_s'))} s,"
            f" in effect {fmt(breach.get('applied_s'))} s, first pause"
            f" {fmt(breach.get('paused_s'))} s (goal: one step + one poll ="
            f" {fmt(breach.get('goal_s'))} s): {breach.get('decision')}"
        )
    return "\n".join(lines)


SCENARIOS = "abcdefghij"


def scenario_letters(text: str) -> str:
    """`--scenarios`: letters of SCENARIOS (e.g. "abd"), checked before the long setup starts;
    argparse.ArgumentTypeError (usage, one error line, exit 2) otherwise."""
    unknown = sorted(set(text) - set(SCENARIOS))
    if not text or unknown:
        shown = f"unknown {', '.join(map(repr, unknown))}" if unknown else "none given"
        raise argparse.ArgumentTypeError(f"{shown}; give letters of {SCENARIOS} (e.g. abcd)")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser("train-worker", help="internal: the training workload")
    worker.add_argument("--prepared", type=Path, required=True)
    worker.add_argument("--checkpoints", type=Path, required=True)
    worker.add_argument("--overrides", type=json.loads, default={})
    parser.add_argument("--seconds", type=positive_float, default=30.0, help="per measured window")
    parser.add_argument(
        "--rate", type=positive_float, default=None, help="requests/s (default: half sat.)"
    )
    parser.add_argument(
        "--overload", type=positive_float, default=1.5, help="x saturation, breach step"
    )
    parser.add_argument("--rounds", type=positive_int, default=1)
    parser.add_argument(
        "--scenarios", type=scenario_letters, default="abcd", help="which of a to j to run"
    )
    parser.add_argument(
        "--slo-ms",
        type=positive_float,
        default=None,
        help="(d): host.slo.p99_ms (default: see below)",
    )
    parser.add_argument(
        "--slo-factor",
        type=positive_float,
        default=1.2,
        help="no --slo-ms: this x round 1's (a) p99",
    )
    parser.add_argument(
        "--resume-below",
        type=fraction,
        default=None,
        help="(d)-(i): host.resume_below (default: 0.9 with the SLO from --slo-factor, so training "
        "resumes below 1.08 x (a); with --slo-ms, params.yaml's)",
    )
    parser.add_argument(
        "--no-pin-service",
        dest="pin_service",
        action="store_false",
        help="leave the service on every core (default: on host.service.cpus only, throughout)",
    )
    parser.add_argument(
        "--client-priority",
        choices=("fifo", "normal"),
        default="fifo",
        help="the load generator at real-time priority (default; root) or at normal priority",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="work in (and keep) this folder")
    args = parser.parse_args()
    args.slo_ms_given = args.slo_ms is not None
    controlled = sorted(set(args.scenarios) & set("defghi"))
    if controlled and "a" not in args.scenarios and not args.slo_ms_given:
        parser.error(
            f"scenarios {', '.join(controlled)} take their SLO from (a) (--slo-factor x its p99): "
            "add a to --scenarios or give --slo-ms"
        )
    if args.command == "train-worker":
        train_worker(args.prepared, args.checkpoints, args.overrides)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install wrk")
    CLIENT_PREFIX[:] = client_prefix(args.client_priority)
    with contextlib.ExitStack() as stack:
        tmp = (
            args.keep.resolve()
            if args.keep
            else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        )
        tmp.mkdir(parents=True, exist_ok=True)
        os.environ.update({"BENTOML_HOME": str(tmp / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"})
        figures = run(Path(tmp), args)
        if args.out:
            args.out.write_text(json.dumps(figures, indent=2))
    print(table(figures))


if __name__ == "__main__":
    main()
