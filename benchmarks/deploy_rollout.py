"""Rollouts on a loopback inference host under steady load: failed requests, where the time goes,
and what the proxy costs; on the tiny digits graph and on a realistic one, side by side.

    python benchmarks/deploy_rollout.py [--rates 100,40] [--block-s 4] [--out results.json]

Two models, one run: `digits` (the tiny 8x8 CNN the tests use, ~0.1 ms a call) and `large`
(benchmarks/model_speed.py's wider CNN, width 64 depth 3, on 32x32 synthetic images: a call
costs milliseconds). Each is trained briefly, exported to ONNX and packed as test bentos with a
golden set (tests/helpers/inference_host.py), then logged and registered in a real `mlflow server
--serve-artifacts` (sqlite, loopback) the way flows.package does (tags bento_tag/bento_artifact):
every deploy names a registry version, so "fetch" is a real download over HTTP.

Per model, on its own host (real supervisord, nginx and `bentoml serve` under a temp
MLOPS_SERVING_HOME): a first deploy (no load); then, under a steady closed-loop stream of
one-to-two-row requests through the proxy, a rollout with a canary, a rejected candidate (its
golden set fails), and a manual rollback. Each reports its failed requests (goal 0), its steps'
seconds (fetch, import, start, warm-up, checks, switch) and "to all traffic": their sum, and the
wall time from the deploy's call to its "promote" log line less the canary wait (the registry
version already exists: the train flow's hand-off through Prefect is not counted). Proxy
overhead: an open-loop fixed rate (benchmarks/serve_openloop.py) of one-row requests through
nginx and straight to the replica's port, in alternating blocks of --block-s seconds; p50/p99 of
each side and their ratios (goal p50 <= 1.1x). Load averages are recorded (the box is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_args import positive_float, positive_int

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODELS = ("digits", "large")
STEP_PARTS = ("fetch", "import", "start", "warm-up", "checks", "switch")
# More, smaller steps than model_speed.py trains with: its accuracy (the golden check) in seconds.
LARGE_FAST = {"train.epochs": 1, "train.patience": 1, "train.batch_size": 16}


def policy() -> Any:
    from tests.helpers.params import tiny_params

    return tiny_params(
        **{
            "deploy.replicas": 1,
            "deploy.warmup_requests": 5,
            "deploy.canary_percent": 10,
            "deploy.canary_s": 3,
            "deploy.poll_s": 1,
            "deploy.watch_s": 2,
            "deploy.min_requests": 5,
            "deploy.golden_min_accuracy": 0.6,
            "deploy.max_p99_ratio": 100,
            "deploy.drain_timeout_s": 10,
        }
    )


def large_graph(root: Path) -> tuple[Path, Path]:
    """model_speed.py's `large` CNN, trained one epoch of small batches on 1000 synthetic 32x32
    images, exported to ONNX with its metadata: (model dir, prepared dir)."""
    from benchmarks.model_speed import LARGE, synthetic_images
    from pipelines.config import load_params
    from tests.helpers import REPO
    from tests.helpers.inference_host import trained_graph

    synthetic_images(root / "data" / "synthetic32.csv", rows=1000)
    params = load_params(REPO / "params.yaml", overrides={**LARGE, **LARGE_FAST})
    return trained_graph(root, params)


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values) * 1000, q))


def overhead(
    proxy_url: str, direct_url: str, body: bytes, rate: float, block_s: float, blocks: int
) -> dict[str, Any]:
    """Open-loop `rate`/s one-row /predict through nginx and straight to the replica,
    alternating blocks of `block_s` s (`blocks` each, after a short unrecorded warm-up per
    side); p50/p99 (ms) of each side over its blocks, their ratios, and any non-200."""
    from benchmarks.serve_openloop import Load as OpenLoop
    from benchmarks.serve_openloop import warm
    from tests.helpers.inference_host import API_KEY

    headers = {"x-api-key": API_KEY}
    sides = {
        "proxy": OpenLoop(f"{proxy_url}/predict", body, 256, headers),
        "direct": OpenLoop(f"{direct_url}/predict", body, 256, headers),
    }

    async def go() -> dict[str, Any]:
        for load in sides.values():
            await warm(load, 1.0)
        lags = dict.fromkeys(sides, 0.0)
        for _ in range(blocks):
            for name, load in sides.items():
                summary = await load.run(rate, block_s)
                lags[name] = max(lags[name], summary["send_lag_p99_ms"])
        out: dict[str, Any] = {"rate_per_s": rate, "block_s": block_s, "blocks": blocks}
        for name, load in sides.items():
            out[f"{name}_p50_ms"] = pct(load.latencies, 50)
            out[f"{name}_p99_ms"] = pct(load.latencies, 99)
            out[f"{name}_requests"] = len(load.latencies)
            out[f"{name}_non_200"] = sum(n for s, n in load.statuses.items() if s != "200")
            out[f"{name}_send_lag_p99_ms"] = lags[name]
        out["p50_ratio"] = out["proxy_p50_ms"] / out["direct_p50_ms"]
        out["p99_ratio"] = out["proxy_p99_ms"] / out["direct_p99_ms"]
        return out

    return asyncio.run(go())


class Clock:
    """A deploy's log: printed, and the moment of its "promote:" line kept."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.promoted: float | None = None

    def __call__(self, line: str) -> None:
        if line.startswith("promote:") and self.promoted is None:
            self.promoted = time.perf_counter()
        print(f"[{self.name}] {line}", flush=True)


def step(name: str, action: Callable[[Clock], Any], url: str, rows: list[list[float]]) -> dict:
    """`action(log)` under a steady closed-loop load through the proxy; failed requests, the
    outcome and the rollout's step seconds."""
    from inference.errors import CheckError
    from tests.helpers.inference_host import Load

    clock = Clock(name)
    with Load(url, rows, max_requests=20000, max_s=300) as load:
        time.sleep(1)
        began = time.perf_counter()
        try:
            done = action(clock)
            t = done.timings
            result: dict[str, Any] = {"outcome": done.outcome, "timings_s": t}
            result["to_all_traffic_parts_s"] = sum(t.get(k, 0.0) for k in STEP_PARTS)
            if clock.promoted is not None:
                wall = clock.promoted - began - t.get("canary", 0.0)
                result["to_all_traffic_wall_s"] = wall
        except CheckError as exc:
            result = {"outcome": "rejected", "reason": str(exc)}
        time.sleep(1)
        seconds = time.perf_counter() - began + 1
    result |= {"requests": load.statuses.total(), "failed": load.failed, "retried": load.retried}
    result["load_rate_per_s"] = load.statuses.total() / seconds
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def run_model(
    name: str, versions: dict[str, str], rows: list[list[float]], rate: float, args: Any, root: Path
) -> dict[str, Any]:
    """One model's host: first deploy, rollout, rejection, rollback, proxy overhead."""
    from inference import rollout, supervisor
    from inference.state import read_state
    from tests.helpers.inference_host import host_for

    settings, params = host_for(root / "host"), policy()
    results: dict[str, Any] = {}

    def deploy(version: str) -> Callable[[Clock], Any]:
        return lambda log: rollout.deploy(params, version=version, log=log, settings=settings)

    try:
        first = rollout.deploy(
            params, version=versions["first"], log=Clock(name), settings=settings
        )
        results["first_deploy"] = {"timings_s": first.timings}
        results["rollout"] = step(f"{name} rollout", deploy(versions["good"]), settings.url, rows)
        results["rejection"] = step(
            f"{name} rejection", deploy(versions["bad"]), settings.url, rows
        )
        results["rollback"] = step(
            f"{name} rollback",
            lambda log: rollout.rollback(params, log=log, settings=settings),
            settings.url,
            rows,
        )
        port = read_state(settings.home).current.ports[0]  # type: ignore[union-attr]
        body = json.dumps({"rows": rows[:1]}).encode()
        results["proxy_overhead"] = overhead(
            settings.url, f"http://127.0.0.1:{port}", body, rate, args.block_s, args.blocks
        )
        print(f"{name} proxy overhead: {json.dumps(results['proxy_overhead'])}", flush=True)
    finally:
        supervisor.shutdown(settings)
    return results


def table(results: dict[str, Any]) -> str:
    """The figures as a Markdown table, models side by side."""
    lines = ["| figure | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]

    def row(label: str, get: Callable[[dict[str, Any]], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(get(results[m]) for m in MODELS) + " |")

    for kind in ("rollout", "rejection", "rollback"):
        row(
            f"{kind}: failed / requests (steady load, req/s)",
            lambda r, k=kind: (
                f"{r[k]['failed']} / {r[k]['requests']} ({r[k]['load_rate_per_s']:.0f}/s)"
            ),
        )
    row(
        "rollout: registered -> all traffic, wall (parts) s",
        lambda r: (
            f"{r['rollout'].get('to_all_traffic_wall_s', float('nan')):.1f} "
            f"({r['rollout']['to_all_traffic_parts_s']:.1f})"
        ),
    )
    for part in STEP_PARTS:
        row(f"  {part} s", lambda r, p=part: f"{r['rollout']['timings_s'].get(p, 0.0):.2f}")
    row("proxy load (open loop) req/s", lambda r: f"{r['proxy_overhead']['rate_per_s']:g}")
    for q in ("p50", "p99"):
        row(
            f"{q} proxy / direct ms (ratio)",
            lambda r, q=q: (
                f"{r['proxy_overhead'][f'proxy_{q}_ms']:.2f} / "
                f"{r['proxy_overhead'][f'direct_{q}_ms']:.2f} "
                f"({r['proxy_overhead'][f'{q}_ratio']:.2f}x)"
            ),
        )
    return "\n".join(lines)


def model_rates(text: str) -> dict[str, float]:
    """`--rates`: one positive open-loop rate (requests/s) per model of MODELS, comma-separated
    ("100,40"); argparse.ArgumentTypeError (usage, one error line, exit 2) otherwise."""
    try:
        rates = [float(r) for r in text.split(",")]
    except ValueError:
        rates = []
    if len(rates) != len(MODELS) or not all(0 < r < float("inf") for r in rates):
        raise argparse.ArgumentTypeError(
            f"{text!r}: give {len(MODELS)} positive req/s, for {','.join(MODELS)} (e.g. 100,40)"
        )
    return dict(zip(MODELS, rates, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--rates", type=model_rates, default="100,40", help="open-loop req/s: digits,large"
    )
    parser.add_argument("--block-s", type=positive_float, default=4.0, help="proxy-overhead block")
    parser.add_argument("--blocks", type=positive_int, default=3, help="blocks per side")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rates = args.rates
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deploy-rollout-") as tmp:
        root = Path(tmp)
        os.environ["BENTOML_HOME"] = str(root / "bentoml")  # the builds' store, not ~/bentoml
        from tests.helpers.inference_host import (
            build_bento,
            golden_set,
            register_archive,
            rows_of,
            tiny_graph,
        )
        from tests.helpers.processes import mlflow_server

        results: dict[str, Any] = {"load_average_start": os.getloadavg()}
        graphs = {"digits": tiny_graph, "large": large_graph}
        with mlflow_server(root) as uri:
            os.environ["MLFLOW_TRACKING_URI"] = uri
            plans: dict[str, tuple[dict[str, str], list[list[float]]]] = {}
            next_version = 1
            for name in MODELS:
                (root / name).mkdir()
                model_dir, prepared = graphs[name](root / name)
                good = golden_set(model_dir, prepared, 40)
                bad = golden_set(model_dir, prepared, 40, wrong_labels=True)
                versions = {}
                for kind, golden in (("first", good), ("good", good), ("bad", bad)):
                    version = str(next_version)
                    next_version += 1
                    archive = build_bento(model_dir, golden, version, root / name / "a")
                    register_archive(archive, version)
                    versions[kind] = version
                plans[name] = (versions, rows_of(good))
            results["setup_s"] = time.perf_counter() - started
            for name in MODELS:
                versions, rows = plans[name]
                results[name] = run_model(name, versions, rows, rates[name], args, root / name)
        results["load_average_end"] = os.getloadavg()
        results["wall_s"] = time.perf_counter() - started
    print(table(results))
    print(
        f"load average (1, 5, 15 min): start {results['load_average_start']}, "
        f"end {results['load_average_end']}; wall {results['wall_s']:.0f} s"
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
