"""Rollouts on a loopback inference host under steady load: failed requests, where the time goes,
and what the proxy costs.

    python benchmarks/deploy_rollout.py [--requests N] [--out results.json]

A host under a temp MLOPS_SERVING_HOME (real supervisord, nginx and `bentoml serve`), the tiny
digits graph packed as test bentos (tests/inference_host.py). Under a bounded constant stream of
requests through the proxy: the first deploy is not loaded; then a rollout with a canary, a
rejected candidate (its golden set fails), and a manual rollback; each reports its failed
requests (goal 0) and its steps' seconds (fetch/import, start, warm-up, checks, canary, switch),
and "to all traffic" = their sum less the canary wait. Proxy overhead: `--requests` sequential
one-row requests through nginx and straight to the version, in alternating blocks; p50 and p99
of each and their ratio (goal p50 <= 1.1x).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import rollout, supervisor
from inference.errors import CheckError
from inference.state import read_state
from tests.inference_host import (
    API_KEY,
    Load,
    build_bento,
    golden_set,
    host_for,
    rows_of,
    tiny_graph,
)
from tests.modelzoo import tiny_params


def policy() -> Any:
    return tiny_params(
        **{
            "deploy.warmup_requests": 5,
            "deploy.canary_percent": 10,
            "deploy.canary_s": 5,
            "deploy.poll_s": 1,
            "deploy.watch_s": 3,
            "deploy.min_requests": 20,
            "deploy.golden_min_accuracy": 0.6,
            "deploy.max_p99_ratio": 100,
        }
    )


def timed(url: str, rows: list[list[float]], n: int) -> list[float]:
    """Seconds of `n` sequential one-row /predict calls to `url` on one keep-alive client."""
    out = []
    with httpx.Client(timeout=30, headers={"x-api-key": API_KEY}) as client:
        for i in range(n):
            t = time.perf_counter()
            r = client.post(
                f"{url}/predict", json={"rows": rows[i % len(rows) : i % len(rows) + 1]}
            )
            out.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
    return out


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def overhead(proxy_url: str, direct_url: str, rows: list[list[float]], n: int) -> dict[str, float]:
    """p50/p99 (ms) through nginx and straight to the version, alternating blocks of 100."""
    via: list[float] = []
    direct: list[float] = []
    for _ in range(max(n // 100, 1)):
        via += timed(proxy_url, rows, 100)
        direct += timed(direct_url, rows, 100)
    p = {"proxy_p50_ms": pct(via, 50), "proxy_p99_ms": pct(via, 99)}
    p |= {"direct_p50_ms": pct(direct, 50), "direct_p99_ms": pct(direct, 99)}
    p["p50_ratio"] = p["proxy_p50_ms"] / p["direct_p50_ms"]
    p["p99_ratio"] = p["proxy_p99_ms"] / p["direct_p99_ms"]
    return p


def step(name: str, action: Any, url: str, rows: list[list[float]]) -> dict[str, Any]:
    """`action()` under load; failed requests, outcome and the rollout's step seconds."""
    with Load(url, rows, max_requests=5000, max_s=300) as load:
        try:
            done = action()
            result: dict[str, Any] = {"outcome": done.outcome, "timings_s": done.timings}
            t = done.timings
            parts = ("fetch", "import", "start", "warm-up", "checks", "switch")
            result["to_all_traffic_s"] = sum(t.get(k, 0.0) for k in parts)
        except CheckError as exc:
            result = {"outcome": "rejected", "reason": str(exc)}
        time.sleep(1)
    result |= {"requests": load.statuses.total(), "failed": load.failed}
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="per side, proxy overhead")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="deploy-rollout-") as tmp:
        root = Path(tmp)
        model_dir, prepared = tiny_graph(root)
        good = golden_set(model_dir, prepared, 40)
        bad = golden_set(model_dir, prepared, 40, wrong_labels=True)
        archives = {
            v: build_bento(model_dir, g, v, root / "a")
            for v, g in [("1", good), ("2", good), ("3", bad)]
        }
        settings, params = host_for(root / "host"), policy()
        rows, results = rows_of(good), {}

        def deploy(version: str) -> Any:
            return lambda: rollout.deploy(
                params, bento=str(archives[version]), log=print, settings=settings
            )

        try:
            first = rollout.deploy(params, bento=str(archives["1"]), log=print, settings=settings)
            results["first_deploy"] = {"timings_s": first.timings}
            results["rollout"] = step("rollout", deploy("2"), settings.url, rows)
            results["rejection"] = step("rejection", deploy("3"), settings.url, rows)
            back = lambda: rollout.rollback(params, log=print, settings=settings)  # noqa: E731
            results["rollback"] = step("rollback", back, settings.url, rows)
            port = read_state(settings.home).current.ports[0]  # type: ignore[union-attr]
            results["proxy_overhead"] = overhead(
                settings.url, f"http://127.0.0.1:{port}", rows, args.requests
            )
            print(f"proxy overhead: {json.dumps(results['proxy_overhead'])}")
        finally:
            supervisor.shutdown(settings)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
