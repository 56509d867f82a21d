"""The pure logic of benchmarks/serve_load.py (the peer comparison): the engine ceiling at the
batch size batching formed, the peers' batch wait, the open-loop rate schedule and the summary
table. The servers themselves are measured by running the benchmark, not here."""

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.peer_model import BatchStats
from benchmarks.serve_load import (
    RESNET_MODEL,
    RESNETS,
    batch_wait_ms,
    best_of,
    ceiling_at,
    commands_for,
    file_batches,
    mean_batch,
    own_bentoml_home,
    rate_plan,
    summarize,
)

CEILING = {1: 100.0, 2: 180.0, 4: 300.0, 64: 900.0}


def test_ceiling_is_interpolated_in_log2_of_the_batch_and_clamped() -> None:
    assert ceiling_at(1, CEILING) == 100.0
    assert ceiling_at(4, CEILING) == 300.0
    assert ceiling_at(3, CEILING) == pytest.approx(180.0 + 120.0 * 0.5849625, rel=1e-6)
    assert ceiling_at(16, CEILING) == pytest.approx(600.0)  # halfway from 4 to 64 in log2
    assert ceiling_at(0.5, CEILING) == 100.0
    assert ceiling_at(500, CEILING) == 900.0


def test_the_ceiling_is_the_better_of_the_engine_runs_before_and_after_the_servers() -> None:
    before = {1: 100.0, 2: 150.0, 64: 900.0}
    after = {1: 120.0, 2: 140.0, 64: 800.0}
    assert best_of(before, after) == {1: 120.0, 2: 150.0, 64: 900.0}


def test_the_second_realistic_size_is_the_same_resnet_at_the_standard_width() -> None:
    assert RESNETS["resnet"] == RESNET_MODEL
    assert RESNETS["resnet64"] == {**RESNET_MODEL, "width": 64}


def test_the_peers_wait_one_batch1_call_within_half_to_ten_ms() -> None:
    assert batch_wait_ms(200.0) == 5.0  # a 5 ms model call
    assert batch_wait_ms(80_000.0) == 0.5  # a 12.5 us call: the floor
    assert batch_wait_ms(20.0) == 10.0  # a 50 ms call: the cap


def test_rate_plan_is_25_50_80_percent_of_each_servers_own_saturation() -> None:
    plan = rate_plan({"service": 400.0, "ray": 100.0})
    assert plan == {
        "own_25pct": {"service": 100.0, "ray": 25.0},
        "own_50pct": {"service": 200.0, "ray": 50.0},
        "own_80pct": {"service": 320.0, "ray": 80.0},
    }


def test_mean_batch_is_rows_per_call_between_readings_and_1_without_batching() -> None:
    assert mean_batch((10, 40), (20, 120)) == 8.0
    assert mean_batch((0, 0), (0, 0)) == 1.0


def test_batch_stats_written_by_a_peer_are_read_back(tmp_path: Path) -> None:
    path = tmp_path / "stats.json"
    assert file_batches(path) == (0.0, 0.0)
    stats = BatchStats(path, every_s=0.0)
    stats.record(4)
    stats.record(6)
    assert file_batches(path) == (2.0, 10.0)
    assert list(tmp_path.iterdir()) == [path]  # written through a temp file, replaced whole


def point(rps: float, connections: int, batch: float, errors: int = 0) -> dict[str, Any]:
    return {
        "rps": rps,
        "connections": connections,
        "mean_batch": batch,
        "errors": errors,
        "s503": errors,
        "p50_ms": 1.0,
        "p99_ms": 2.0,
    }


def open_point(rate: float, p99: float, errors: int = 0) -> dict[str, Any]:
    return {"target_rate": rate, "p50_ms": p99 / 2, "p99_ms": p99, "errors": errors}


def test_summary_compares_the_best_bentoml_variant_with_every_other_server() -> None:
    curves = {
        "service": [point(300, 1, 1.0), point(350, 16, 1.0)],
        "service_batched": [point(200, 1, 1.0), point(600, 64, 4.0, errors=3)],
        "ray": [point(150, 16, 2.0)],
    }
    sat = {"service": 350.0, "service_batched": 600.0, "ray": 150.0}
    fractions = {"own_25pct": 0.25, "own_50pct": 0.5, "own_80pct": 0.8}
    rates = {
        label: {name: open_point(rps * f, 10 * f) for name, rps in sat.items()}
        for label, f in fractions.items()
    }
    rates["own_50pct"]["ray"]["p99_ms"] = 20.0
    rates["own_80pct"]["ray"]["errors"] = 2
    summary = summarize(curves, rates, CEILING)
    assert summary["saturation_rps"] == sat
    assert summary["batch_at_saturation"] == {"service": 1.0, "service_batched": 4.0, "ray": 2.0}
    assert summary["served_over_ceiling"] == pytest.approx(
        {"service": 3.5, "service_batched": 2.0, "ray": 150 / 180}
    )
    assert summary["engine_best_batch"] == 64
    assert summary["best_service"] == "service_batched"
    assert summary["service_over_others"] == {"ray": {"saturation": 4.0, "p99_at_50pct": 0.25}}
    assert summary["batching_gain"] == pytest.approx(600 / 350)
    assert summary["errors_up_to_80pct"] == {"service": 0, "service_batched": 0, "ray": 2}
    assert summary["s503_in_sweep"] == {"service": 0, "service_batched": 3, "ray": 0}
    assert summary["rates"]["own_50pct"]["ray"] == 75.0
    json.dumps(summary)  # the --out file


def test_every_bentoml_server_side_by_side_gets_its_own_home_sharing_one_model_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server empties $BENTOML_HOME/prometheus_multiproc_dir when it starts: sharing one home,
    the second server wiped the first one's batching histogram."""
    store = tmp_path / "store"
    (store / "models" / "m").mkdir(parents=True)
    monkeypatch.setenv("BENTOML_HOME", str(store))
    work = tmp_path / "work"
    commands = commands_for(
        ("service", "service_batched", "service_unbatched"), tmp_path, work, 1, 1.0, "python"
    )
    homes = [Path(env["BENTOML_HOME"]) for _, env, _ in commands.values()]
    assert len(set(homes)) == 3
    for home in homes:
        assert home.parent == work
        assert (home / "models" / "m").is_dir()  # the one store, seen through a symlink
        assert (home / "models").resolve() == (store / "models").resolve()
    assert json.loads(commands["service_batched"][1]["MLOPS_SERVE_OVERRIDES"])["max_batch_size"] > 1
    again = own_bentoml_home(work, "service")  # idempotent: a second call keeps the link
    assert Path(again["BENTOML_HOME"]) == homes[0]


def test_a_round_figure_is_the_median_round_with_every_round_kept() -> None:
    from benchmarks.serve_load import median_point

    rounds = [
        {"rps": 77.0, "p99_ms": 9.0},
        {"rps": 52.0, "p99_ms": 30.0},
        {"rps": 60.0, "p99_ms": 12.0},
    ]
    assert median_point(rounds, "rps") == {
        "rps": 60.0,
        "p99_ms": 12.0,
        "rounds": [77.0, 52.0, 60.0],
    }
    assert median_point(rounds, "p99_ms")["p99_ms"] == 12.0
    assert median_point(rounds[:2], "rps")["rps"] == 52.0  # an even count: the lower of the two
    assert median_point(rounds[:1], "rps")["rps"] == 77.0
