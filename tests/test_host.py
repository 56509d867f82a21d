"""pipelines/host.py: the controller against a scripted metrics source, the gate in the train
loop (paused and stopped mid-epoch), the Prometheus source, quotas, windows, and the flow's
SIGTERM-then-kill on a stage timeout."""

from __future__ import annotations

import contextlib
import http.server
import itertools
import logging
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.artifacts import read_json
from pipelines.config import HostConfig
from pipelines.errors import ParamsError
from pipelines.host import (
    STUCK_WARN_S,
    Controller,
    Mode,
    PrometheusSource,
    Reading,
    SourceError,
    StopRequested,
    TrainingGate,
    in_window,
    quota_cpus,
    shared_host,
    training_cpus,
)
from pipelines.train import TrainResult, train
from pipelines.training.checkpoints import latest_checkpoint, read_checkpoint
from tests.helpers import REPO
from tests.helpers.params import tiny_params

SLO_MS, IN_FLIGHT = 50.0, 10
LOOP = {"train.epochs": 3, "train.patience": 10, "train.num_workers": 0, "train.device": "cpu"}


def host(**overrides: Any) -> HostConfig:
    """params.yaml's host section in shared mode, SLO 50 ms / 10 in flight, resume after 5 s
    below 0.7 x, with `overrides` (keys of the host section, `__` for dots)."""
    base = {
        "host.mode": "shared",
        "host.slo.p99_ms": SLO_MS,
        "host.slo.max_in_flight": IN_FLIGHT,
        "host.resume_below": 0.7,
        "host.resume_after_s": 5,
        "host.poll_ms": 20,
        "host.windows": [],
        "host.on_breach": "pause",
    }
    base |= {f"host.{k.replace('__', '.')}": v for k, v in overrides.items()}
    return tiny_params(base).host


class Clock:
    """A clock the test moves by hand (seconds)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Script:
    """A metrics source that answers from a list: a Reading, or SourceError to raise. Records
    the gate's mode at each read (what the previous reads decided)."""

    def __init__(self, items: list[Reading | SourceError], gate: TrainingGate | None = None):
        self.items, self.gate = list(items), gate
        self.modes_at_read: list[Mode] = []

    def read(self) -> Reading:
        if self.gate is not None:
            self.modes_at_read.append(self.gate.mode)
        item = self.items.pop(0) if len(self.items) > 1 else self.items[0]
        if isinstance(item, SourceError):
            raise item
        return item


def ok(p99: float = 10.0, busy: float = 1) -> Reading:
    return Reading(p99, busy)


def controller(cfg: HostConfig, clock: Clock) -> Controller:
    return Controller(cfg, TrainingGate(clock=clock), Script([ok()]), clock=clock)


@pytest.fixture(autouse=True)
def torch_threads() -> Iterator[None]:
    """The gate sets torch's thread count in shared mode: put it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# --- the controller ---------------------------------------------------------------------------


@pytest.mark.parametrize("over", [Reading(SLO_MS * 1.01, 1), Reading(5.0, IN_FLIGHT + 1)])
def test_the_first_reading_over_the_slo_pauses(over: Reading) -> None:
    clock = Clock()
    c = controller(host(), clock)
    assert c.step(ok()) == Mode.FULL
    assert c.step(over) == Mode.PAUSED
    assert c.gate.mode == Mode.PAUSED and c.gate.stats.pauses == 1
    ((_, mode, cause),) = c.decisions
    assert mode == Mode.PAUSED and "over the SLO" in cause


def test_a_timed_out_read_pauses_and_says_it_timed_out() -> None:
    """A /metrics read past its timeout is a breach; the decision's cause says the read timed
    out rather than quoting the timeout as a measured p99 (a new user's finding)."""
    c = controller(host(), Clock())
    assert c.step(Reading(500.0, math.nan, timed_out=True)) == Mode.PAUSED
    ((_, _, cause),) = c.decisions
    assert "/metrics did not answer within 500 ms" in cause and "over the SLO" in cause


def test_the_controller_thread_pauses_at_the_poll_after_the_breach() -> None:
    """Read k over the SLO: at read k + 1 the gate is already paused (one poll)."""
    cfg = host(poll_ms=10)
    gate = TrainingGate()
    source = Script([ok(), ok(), ok(SLO_MS * 3), ok(SLO_MS * 3)], gate)
    c = Controller(cfg, gate, source)
    c.start()
    try:
        deadline = time.monotonic() + 30
        while len(source.modes_at_read) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        c.stop()
    assert source.modes_at_read[:4] == [Mode.FULL, Mode.FULL, Mode.FULL, Mode.PAUSED]


def test_it_resumes_only_after_resume_after_s_below_resume_below() -> None:
    clock = Clock()
    c = controller(host(), clock)
    c.step(ok(SLO_MS * 2))
    calm, lukewarm = ok(SLO_MS * 0.6), ok(SLO_MS * 0.8)  # below 0.7 x SLO / below SLO only
    for _ in range(10):  # under the SLO but not under 0.7 x: stays paused however long
        clock.t += 1
        assert c.step(lukewarm) == Mode.PAUSED
    assert c.step(calm) == Mode.PAUSED  # calm from now (t = 10)
    clock.t += 4.9
    assert c.step(calm) == Mode.PAUSED
    clock.t += 0.1
    assert c.step(calm) == Mode.FULL  # 5 s calm
    assert c.gate.stats.pauses == 1


def test_resume_via_throttle_steps_up_through_the_throttled_share() -> None:
    clock = Clock()
    c = controller(host(resume_via="throttle"), clock)
    assert c.step(ok(SLO_MS * 2)) == Mode.PAUSED
    calm = ok(SLO_MS * 0.6)
    assert c.step(calm) == Mode.PAUSED  # calm from t = 0
    clock.t += 5
    assert c.step(calm) == Mode.THROTTLED  # 5 s calm: a step up, not full share
    clock.t += 4.9
    assert c.step(calm) == Mode.THROTTLED  # its own calm period started at the step up
    clock.t += 0.1
    assert c.step(calm) == Mode.FULL
    assert c.step(ok(SLO_MS * 2)) == Mode.PAUSED  # a breach while stepping up: paused again
    assert c.gate.stats.pauses == 2
    assert [mode for _, mode, _ in c.decisions] == [
        Mode.PAUSED,
        Mode.THROTTLED,
        Mode.FULL,
        Mode.PAUSED,
    ]


def test_one_lukewarm_reading_restarts_the_calm_period() -> None:
    clock = Clock()
    c = controller(host(), clock)
    c.step(ok(SLO_MS * 2))
    for reading in (ok(1), ok(1), ok(SLO_MS * 0.9), ok(1), ok(1), ok(1), ok(1), ok(1)):
        clock.t += 1
        mode = c.step(reading)
    assert mode == Mode.PAUSED  # 4 s calm since the lukewarm one
    clock.t += 1
    assert c.step(ok(1)) == Mode.FULL


def test_a_noisy_signal_never_flaps() -> None:
    """Noise around resume_below x SLO (a busy service, under its SLO) and rare spikes over it:
    one pause per spike at most, never a resume while the noise stays above resume_below."""
    rng = random.Random(0)
    clock = Clock()
    c = controller(host(), clock)
    changes, last = 0, Mode.FULL
    for i in range(600):  # 60 s at 10 reads a second
        clock.t += 0.1
        p99 = SLO_MS * (1.2 if i in (100, 400) else rng.uniform(0.66, 0.98))
        mode = c.step(ok(p99, rng.randint(0, IN_FLIGHT)))
        changes += mode != last
        last = mode
    assert c.gate.stats.pauses == 1  # the first spike; the noise then never let it resume
    assert changes == 1 and last == Mode.PAUSED


def test_a_hold_stuck_between_resume_below_and_the_slo_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A service whose p99 sits under the SLO but above resume_below x it (as an SLO of 1.2 x
    the service-alone p99 with resume_below 0.7 does) holds training for ever: after
    STUCK_WARN_S the controller warns once with the figures and the setting to change, not at
    every read; a release and a new hold may warn again."""
    clock = Clock()
    c = controller(host(), clock)
    between = ok(SLO_MS * 0.8)
    with caplog.at_level(logging.WARNING, logger="pipelines.host"):
        c.step(ok(SLO_MS * 2))
        for _ in range(int(STUCK_WARN_S) * 2 + 1):  # two STUCK_WARN_S at one read a second
            clock.t += 1
            assert c.step(between) == Mode.PAUSED
        stuck = [r.getMessage() for r in caplog.records if "never resumes" in r.getMessage()]
        assert len(stuck) == 1, stuck
        assert f"p99 {SLO_MS * 0.8:.1f} ms" in stuck[0] and "host.resume_below" in stuck[0]
        for _ in range(10):  # calm: released; then a new breach and a new stuck hold
            clock.t += 1
            c.step(ok(SLO_MS * 0.1))
        assert c.gate.mode == Mode.FULL
        c.step(ok(SLO_MS * 2))
        for _ in range(int(STUCK_WARN_S) + 1):
            clock.t += 1
            c.step(between)
    assert sum("never resumes" in r.getMessage() for r in caplog.records) == 2


def test_a_noisy_stuck_hold_warns_too_and_an_unreadable_service_restarts_the_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A breaker's findings: p99 noise around resume_below x the SLO (calm reads that never last
    resume_after_s) still holds training for ever, so it warns too; time the service could not
    be read is not time "under its SLO"."""
    rng = random.Random(2)
    clock = Clock()
    c = controller(host(), clock)
    with caplog.at_level(logging.WARNING, logger="pipelines.host"):
        c.step(ok(SLO_MS * 2))
        for i in range(int(STUCK_WARN_S) * 4):  # 4 x STUCK_WARN_S at 2 reads a second
            clock.t += 0.5
            p99 = SLO_MS * (0.5 if i % 20 == 0 else rng.uniform(0.66, 0.98))
            assert c.step(ok(p99)) == Mode.PAUSED
        stuck = [r.getMessage() for r in caplog.records if "never resumes" in r.getMessage()]
        assert len(stuck) == 1, stuck
        caplog.clear()
        c = controller(host(), clock)
        c.step(ok(SLO_MS * 2))
        c.step(ok(SLO_MS * 0.8))
        for _ in range(int(STUCK_WARN_S) + 10):  # unreadable longer than STUCK_WARN_S
            clock.t += 1
            c.step(None, "connection refused")
        clock.t += 1
        c.step(ok(SLO_MS * 0.8))
    assert not [r for r in caplog.records if "never resumes" in r.getMessage()]


def test_noise_below_the_slo_never_pauses() -> None:
    rng = random.Random(1)
    clock = Clock()
    c = controller(host(), clock)
    for _ in range(600):
        clock.t += 0.1
        assert c.step(ok(SLO_MS * rng.uniform(0.0, 1.0), rng.randint(0, IN_FLIGHT))) == Mode.FULL


def test_an_idle_service_reads_nan_p99_and_counts_as_calm() -> None:
    clock = Clock()
    c = controller(host(resume_after_s=0), clock)
    c.step(ok(SLO_MS * 2))
    assert c.step(Reading(math.nan, 0)) == Mode.FULL


def test_a_source_that_disappears_throttles_with_one_error_line_and_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    c = controller(host(), clock)
    with caplog.at_level(logging.INFO, logger="pipelines.host"):
        for _ in range(20):
            clock.t += 1
            assert c.step(None, "http://127.0.0.1:1/metrics: connection refused") == (
                Mode.THROTTLED
            )
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and "connection refused" in errors[0].getMessage()
        assert "throttled" in errors[0].getMessage()
        assert c.step(ok(1)) == Mode.THROTTLED  # answers again: hysteresis as after a breach
        clock.t += 5
        assert c.step(ok(1)) == Mode.FULL
    assert "answer again" in caplog.text


def test_the_controller_thread_survives_a_vanished_source() -> None:
    gate = TrainingGate()
    source = Script([ok(), SourceError("gone")], gate)
    c = Controller(host(poll_ms=10), gate, source)
    c.start()
    try:
        deadline = time.monotonic() + 30
        while len(source.modes_at_read) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.alive()
    finally:
        c.stop()
    assert source.modes_at_read[2:10] == [Mode.THROTTLED] * 8


def test_on_breach_throttle_lowers_the_share_instead_of_pausing() -> None:
    clock = Clock()
    c = controller(host(on_breach="throttle"), clock)
    assert c.step(ok(SLO_MS * 2)) == Mode.THROTTLED
    assert c.gate.stats.pauses == 0


@pytest.mark.parametrize(("outside", "mode"), [("wait", Mode.PAUSED), ("throttle", Mode.THROTTLED)])
def test_outside_its_window_training_waits_or_is_throttled(outside: str, mode: Mode) -> None:
    cfg = host(windows=["22:00-06:00"], outside_window=outside, timezone="Europe/Berlin")
    clock = Clock()
    at = {"now": datetime(2026, 6, 1, 12, 0, tzinfo=UTC)}  # 14:00 in Berlin: outside
    c = Controller(cfg, TrainingGate(clock=clock), Script([ok()]), clock, lambda: at["now"])
    assert c.step(ok()) == mode
    at["now"] = datetime(2026, 6, 1, 21, 30, tzinfo=UTC)  # 23:30 in Berlin: inside
    assert c.step(ok()) == Mode.FULL
    assert c.step(ok(SLO_MS * 2)) == Mode.PAUSED  # inside its window the SLO still rules
    causes = [cause for _, _, cause in c.decisions]
    assert causes[:2] == ["outside host.windows", "inside host.windows"]
    assert "over the SLO" in causes[2]


def test_windows_wrap_midnight_and_are_read_in_their_time_zone() -> None:
    def at(hour: int, minute: int = 0) -> datetime:
        return datetime(2026, 1, 15, hour, minute, tzinfo=UTC)

    night = ["22:00-06:00"]
    assert in_window(night, "UTC", at(23)) and in_window(night, "UTC", at(5, 59))
    assert not in_window(night, "UTC", at(6)) and not in_window(night, "UTC", at(12))
    assert in_window(["01:00-02:00", "12:00-13:00"], "UTC", at(12, 30))
    assert in_window(night, "Asia/Tokyo", at(14))  # 23:00 in Tokyo
    assert in_window([], "UTC", at(12))


# --- the gate ---------------------------------------------------------------------------------


def test_the_gate_blocks_while_paused_and_a_stop_gets_through() -> None:
    gate = TrainingGate()
    gate.set_mode(Mode.PAUSED)
    passed = threading.Event()

    def loop() -> None:
        gate.boundary()
        passed.set()

    worker = threading.Thread(target=loop)
    worker.start()
    assert not passed.wait(0.3)
    gate.set_mode(Mode.FULL)
    assert passed.wait(10)
    worker.join()
    assert gate.stats.pauses == 1 and gate.stats.paused_seconds > 0
    assert len(gate.stats.blocked_at) == 1

    gate.set_mode(Mode.PAUSED)
    stopped: list[BaseException] = []

    def stopping() -> None:
        try:
            gate.boundary()
        except StopRequested as exc:
            stopped.append(exc)

    worker = threading.Thread(target=stopping)
    worker.start()
    gate.request_stop("SIGTERM")
    worker.join(timeout=10)
    assert [str(e) for e in stopped] == ["SIGTERM"]


def test_the_gate_applies_the_thread_count_of_its_mode() -> None:
    gate = TrainingGate(threads=(2, 1))
    gate.boundary()
    assert torch.get_num_threads() == 2
    gate.set_mode(Mode.THROTTLED)
    gate.boundary()
    assert torch.get_num_threads() == 1
    assert gate.share(Mode.THROTTLED) == 0.5
    assert [s for _, s in gate.stats.share] == [1.0, 0.5]


# --- the gate in the train loop ---------------------------------------------------------------


class PauseAt(TrainingGate):
    """Pauses at optimizer step `at` and resumes `for_s` seconds later (another thread)."""

    def __init__(self, at: int, for_s: float) -> None:
        super().__init__()
        self.at, self.for_s, self.steps = at, for_s, 0

    def boundary(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            self.set_mode(Mode.PAUSED)
            threading.Timer(self.for_s, self.set_mode, (Mode.FULL,)).start()
        super().boundary()


class StopAt(TrainingGate):
    """Asks for a stop at optimizer step `at` (as SIGTERM would)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.steps = at, 0

    def boundary(self) -> None:
        self.steps += 1
        if self.steps == self.at:
            self.request_stop("SIGTERM")
        super().boundary()


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return model.state_dict()


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def whole(prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """The uninterrupted run the interrupted ones are compared with."""
    return train(tiny_params(LOOP).train, prepared, tmp_path_factory.mktemp("whole"))


def test_paused_and_resumed_mid_epoch_gives_the_same_weights(
    prepared: Path, tmp_path: Path, whole: TrainResult
) -> None:
    cfg = tiny_params(LOOP).train
    gate = PauseAt(at=30, for_s=0.5)  # 20 steps an epoch (1257 rows, batches of 64): epoch 2
    paused = train(cfg, prepared, tmp_path / "paused", gate=gate)
    assert gate.stats.pauses == 1 and gate.stats.paused_seconds >= 0.4
    assert_same(paused.model, whole.model)


def test_a_stop_mid_epoch_saves_a_checkpoint_and_the_next_run_ends_the_same(
    prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, whole: TrainResult
) -> None:
    cfg = tiny_params(LOOP).train
    with (
        caplog.at_level(logging.INFO, logger="pipelines.train"),
        pytest.raises(StopRequested),
    ):
        train(cfg, prepared, tmp_path / "ckpt", gate=StopAt(30))
    assert "stopped (SIGTERM) in epoch 2 after 10 optimizer steps" in caplog.text
    saved = read_checkpoint(latest_checkpoint(tmp_path / "ckpt") or Path("none"))
    assert saved["epoch"] == 1 and saved["progress"]["steps"] == 10 and not saved["finished"]
    with caplog.at_level(logging.INFO, logger="pipelines.train"):
        resumed = train(cfg, prepared, tmp_path / "ckpt")
    assert "resuming from epoch 1, step 10 of epoch 2" in caplog.text
    assert_same(resumed.model, whole.model)
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in resumed.history] == [
        {k: v for k, v in r.items() if k not in drop} for r in whole.history
    ]


def test_shared_mode_pauses_training_while_the_service_is_over_its_slo(
    prepared: Path, tmp_path: Path, whole: TrainResult
) -> None:
    """shared_host with a scripted source (no quotas on the test process): over the SLO for a
    few reads, then calm; training finishes with the uninterrupted run's weights."""
    cfg = tiny_params(LOOP).train
    source = Script([ok(), *[ok(SLO_MS * 2)] * 5, ok(1)])
    threads = torch.get_num_threads()  # the same as the uninterrupted run: the same sums
    cfg_host = host(resume_after_s=0.05, training__threads=threads, training__throttled_threads=1)
    with shared_host(cfg_host, source, quota=False) as gate:
        source.gate = gate
        shared = train(cfg, prepared, tmp_path / "shared", gate=gate)
    assert gate.stats.pauses == 1
    assert Mode.PAUSED in source.modes_at_read
    assert_same(shared.model, whole.model)
    assert gate.stats.metrics()["host.pauses"] == 1.0


# --- the Prometheus source --------------------------------------------------------------------

METRICS = """\
# HELP bentoml_service_request_total Multiprocess metric
# TYPE bentoml_service_request_total counter
bentoml_service_request_total{endpoint="/predict",http_response_code="200"} %(total)s
# HELP bentoml_service_request_in_progress Multiprocess metric
# TYPE bentoml_service_request_in_progress gauge
bentoml_service_request_in_progress{endpoint="/predict",service_name="s"} %(busy)s
# HELP bentoml_service_request_duration_seconds Multiprocess metric
# TYPE bentoml_service_request_duration_seconds histogram
bentoml_service_request_duration_seconds_bucket{endpoint="/predict",le="0.01"} %(fast)s
bentoml_service_request_duration_seconds_bucket{endpoint="/predict",le="0.1"} %(total)s
bentoml_service_request_duration_seconds_bucket{endpoint="/predict",le="+Inf"} %(total)s
bentoml_service_request_duration_seconds_count{endpoint="/predict"} %(total)s
bentoml_service_request_duration_seconds_sum{endpoint="/predict"} 1.0
@408,le="0.01"} 0
@408,le="0.1"} 0
@408,le="+Inf"} %(stalled)s
""".replace(
    "@408",
    'bentoml_service_request_duration_seconds_bucket{endpoint="/predict",http_response_code="408"',
)


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, dict[str, float], http.server.HTTPServer]]:
    """A local /metrics answering METRICS with the figures in the dict it yields."""
    figures: dict[str, float] = {"busy": 0, "fast": 0, "total": 0, "stalled": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            answer = (METRICS % figures).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics", figures, server
    finally:
        server.shutdown()
        server.server_close()


def test_the_prometheus_source_reads_p99_over_the_window_and_in_flight(
    metrics_server: tuple[str, dict[str, float], http.server.HTTPServer],
) -> None:
    url, figures, server = metrics_server
    source = PrometheusSource(url, timeout_s=5)
    figures.update(busy=3, fast=1000, total=1000)
    first = source.read()
    assert math.isnan(first.p99_ms) and first.in_flight == 3  # the baseline: no window yet
    figures.update(busy=0, fast=1000, total=1100)  # the window: 100 requests, all slow
    second = source.read()
    assert 10 < second.p99_ms <= 100 and second.in_flight == 0
    figures.update(fast=1100, total=1200)  # 100 fast ones: the earlier slow ones are gone
    assert source.read().p99_ms <= 10
    server.shutdown()
    server.server_close()
    with pytest.raises(SourceError, match=url.replace(".", r"\.")):
        source.read()


def test_the_prometheus_source_reads_p99_over_window_s(
    metrics_server: tuple[str, dict[str, float], http.server.HTTPServer],
) -> None:
    """window_s 2, reads every 0.5 s: each p99 covers the requests since the latest read at
    least 2 s old, so one slow poll among calm ones is 100 slow requests in 400, then none."""
    url, figures, _ = metrics_server
    clock = Clock()
    source = PrometheusSource(url, timeout_s=5, window_s=2.0, clock=clock)
    figures.update(busy=0, fast=1000, total=1000)
    assert math.isnan(source.read().p99_ms)
    p99 = []
    for poll in range(1, 9):  # poll 3: 100 slow requests; every other poll 100 fast ones
        clock.t += 0.5
        slow = poll == 3
        figures["total"] += 100
        figures["fast"] += 0 if slow else 100
        p99.append(source.read().p99_ms)
    assert all(value <= 10 for value in p99[:2])  # before the slow poll
    assert all(value > 10 for value in p99[2:6])  # the slow poll inside the last 2 s
    assert all(value <= 10 for value in p99[6:])  # 2 s later it has left the window


def test_a_clients_4xx_answers_do_not_move_the_p99(
    metrics_server: tuple[str, dict[str, float], http.server.HTTPServer],
) -> None:
    """A stalled body is a 408 after 0.6 x serve.timeout_s: the client's time, not the
    service's. 100 of them beside 1,000 fast answers leave the p99 where the fast ones put it
    (one stall every 1.5 s once held training paused at a 50 ms SLO)."""
    url, figures, _ = metrics_server
    source = PrometheusSource(url, timeout_s=5)
    figures.update(fast=1000, total=1000)
    source.read()
    figures.update(fast=2000, total=2000, stalled=100)
    assert source.read().p99_ms <= 10


@contextlib.contextmanager
def answering(chunks: list[bytes], pause_s: float = 0.0) -> Iterator[str]:
    """A local /metrics that answers 200 with `chunks`, `pause_s` apart."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(sum(map(len, chunks))))
            self.end_headers()
            for chunk in chunks:
                try:
                    self.wfile.write(chunk)
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return  # the reader gave up (the dripping test's point)
                time.sleep(pause_s)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/metrics"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not this project's `bentoml serve`"),
        (b"# another exporter\nprocess_cpu_seconds_total 12.5\n", "not this project's"),
        (b"<html>hello</html>", "invalid metric name"),
    ],
)
def test_a_200_that_is_not_the_service_is_an_unreadable_source(body: bytes, message: str) -> None:
    """Another exporter's metrics, or an empty page, hold none of BentoML's request counters:
    read as calm, they would let training run at full share for good."""
    with answering([body]) as url, pytest.raises(SourceError, match=message) as caught:
        PrometheusSource(url, timeout_s=5).read()
    assert "\n" not in str(caught.value)


def test_a_dripping_answer_times_out_as_a_whole() -> None:
    """One chunk every 0.3 s (6 s in all): each read is within httpx's timeout, their sum is
    not: the read ends after WHOLE_READ_FACTOR x its timeout (1.5 s)."""
    with answering([b"# x\n"] * 20, pause_s=0.3) as url:
        started = time.monotonic()
        reading = PrometheusSource(url, timeout_s=0.5).read()
        took = time.monotonic() - started
    assert reading.timed_out and reading.p99_ms == 500.0
    assert took < 3.0


def test_an_error_status_is_one_line_naming_the_url() -> None:
    with answering([b"x"]) as url:
        missing = url.replace("/metrics", "/nothing-here")
    with pytest.raises(SourceError) as caught:  # the server is gone: refused
        PrometheusSource(missing, timeout_s=2).read()
    assert str(caught.value).startswith(missing) and "\n" not in str(caught.value)


# --- quotas and settings ----------------------------------------------------------------------


def test_threads_null_gives_training_one_torch_thread_per_core_it_may_use() -> None:
    available = sorted(os.sched_getaffinity(0))
    service = available[:1] if len(available) > 1 else []
    cfg = host(training__threads=None, training__throttled_threads=1, service__cpus=service)
    with shared_host(cfg, Script([ok()]), quota=False) as gate:
        cores = len(available) - len(service)
        assert gate.threads == (min(cores, torch.get_num_threads()), 1)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as a tune worker's --threads: not raised to the core count
    try:
        with shared_host(cfg, Script([ok()]), quota=False) as gate:
            assert gate.threads == (1, 1)
    finally:
        torch.set_num_threads(before)
    with shared_host(host(training__threads=3, service__cpus=service), Script([ok()]), False) as g:
        assert g.threads is not None and g.threads[0] == 3  # a number is taken as it is


def test_training_cores_leave_the_service_its_own() -> None:
    available = sorted(os.sched_getaffinity(0))
    share = host().training
    service = host(service__cpus=available[:1]).service
    assert training_cpus(share, service) == available[1:] or len(available) == 1
    with pytest.raises(ParamsError, match=r"host\.service\.cpus: reserves every core"):
        training_cpus(share, host(service__cpus=available).service)
    outside = max(available) + 1000
    with pytest.raises(ParamsError, match=f"host.training.cpus: cores {outside} are not"):
        training_cpus(host(training__cpus=[outside], service__cpus=available[:1]).training, service)
    cores = os.cpu_count() or len(available)  # a service core off the host: never silently ignored
    with pytest.raises(ParamsError, match=f"host.service.cpus: cores {cores + 98} are not on"):
        training_cpus(share, host(service__cpus=[cores + 98]).service)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_apply_quota_puts_the_training_process_on_its_share(tmp_path: Path) -> None:
    """In a process of its own (affinity and niceness cannot be undone)."""
    first = sorted(os.sched_getaffinity(0))[0]
    script = (
        "import os, psutil; from tests.helpers.params import tiny_params\n"
        "from pipelines.host import apply_quota\n"
        f"cfg = tiny_params({{'host.mode': 'shared', 'host.service.cpus': [{first}]}}).host\n"
        "before = os.nice(0)\n"
        "for line in apply_quota(cfg): print(line)\n"
        "print('affinity', sorted(os.sched_getaffinity(0)))\n"
        "print('nice', os.nice(0) - before)\n"
        "print('ionice', psutil.Process().ionice().ioclass == psutil.IOPRIO_CLASS_IDLE)\n"
    )
    lines = _run_in_own_process(script)
    rest = [c for c in sorted(os.sched_getaffinity(0)) if c != first]
    assert f"affinity {rest}" in lines
    assert "nice 10" in lines and "ionice True" in lines
    assert any(line.startswith("host: training on cores") for line in lines)
    assert any("cgroup" in line for line in lines)  # in a cgroup, or why not: said once


def _run_in_own_process(script: str) -> list[str]:
    """Run `script` in a fresh Python (a quota cannot be undone in this one); its stdout lines."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.splitlines()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_borrow_idle_runs_training_on_every_core_at_sched_idle(tmp_path: Path) -> None:
    """In a process of its own (a policy and affinity this test process must not keep): every
    thread, those running before and one started after, on all cores at SCHED_IDLE; no nice."""
    first = sorted(os.sched_getaffinity(0))[0]
    script = (
        "import os, threading, time; from tests.helpers.params import tiny_params\n"
        "from pipelines.host import apply_quota\n"
        f"cfg = tiny_params({{'host.mode': 'shared', 'host.service.cpus': [{first}],\n"
        "                    'host.training.borrow_idle': True}).host\n"
        "stop = threading.Event()\n"
        "before = threading.Thread(target=stop.wait); before.start()\n"
        "spared = threading.Thread(target=stop.wait); spared.start()\n"
        "nice = os.nice(0)\n"
        "for line in apply_quota(cfg, spare=[spared.native_id]): print(line)\n"
        "after = threading.Thread(target=stop.wait); after.start(); time.sleep(0.1)\n"
        "for tid in sorted(int(t) for t in os.listdir('/proc/self/task')):\n"
        "    idle = os.sched_getscheduler(tid) == os.SCHED_IDLE\n"
        "    kind = 'spared' if tid == spared.native_id else 'thread'\n"
        "    print(kind, idle, sorted(os.sched_getaffinity(tid)))\n"
        "print('nice', os.nice(0) - nice)\n"
        "stop.set()\n"
    )
    lines = _run_in_own_process(script)
    every = sorted(os.sched_getaffinity(0))
    threads = [line for line in lines if line.startswith("thread ")]
    assert len(threads) >= 3  # main, one started before, one after
    assert set(threads) == {f"thread True {every}"}
    assert f"spared False {every}" in lines  # the controller's thread keeps the normal policy
    assert f"host: training on cores {', '.join(map(str, every))}" in lines
    assert f"host: training at SCHED_IDLE (borrows the service's cores {first} when idle)" in lines
    assert "nice 0" in lines  # niceness means nothing at SCHED_IDLE: left alone


def test_borrow_idle_counts_the_service_cores_for_torch_threads() -> None:
    available = sorted(os.sched_getaffinity(0))
    service = available[:1] if len(available) > 1 else []
    cfg = host(training__borrow_idle=True, training__threads=None, service__cpus=service)
    assert quota_cpus(cfg.training, cfg.service) == available
    assert quota_cpus(host(service__cpus=service).training, cfg.service) == [
        c for c in available if c not in service
    ]
    with shared_host(cfg, Script([ok()]), quota=False) as gate:
        assert gate.threads == (min(len(available), torch.get_num_threads()), 1)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("host.windows", ["22:00-6:00"], "is not a window; expected HH:MM-HH:MM"),
        ("host.windows", ["22:00-22:00"], "is not a window"),
        ("host.timezone", "Mars/Olympus", "unknown time zone"),
        ("host.training.cpus", [0], "cores 0 are reserved for the service"),
        ("host.slo.metrics_url", "127.0.0.1:3000/metrics", "expected http"),
        ("host.slo.metrics_url", "http://", "no host"),
        ("host.slo.metrics_url", "http://:3000/metrics", "no host"),
        ("host.slo.metrics_url", "http://[::1]:3911x/metrics", "not a URL"),
        ("tracking.ui_url", "http://[::1]:50x", "not a URL"),
        ("tracking.uri", "http://", "no host"),
        ("host.mode", "both", "dedicated"),
    ],
)
def test_bad_host_settings_and_urls_are_refused_naming_the_key(
    key: str, value: Any, message: str
) -> None:
    with pytest.raises(ParamsError, match=message) as caught:
        tiny_params({key: value})
    assert key.rsplit(".", 1)[-1] in str(caught.value)


def test_more_throttled_threads_than_threads_is_refused_naming_the_key() -> None:
    with pytest.raises(ParamsError, match=r"host: training\.throttled_threads: more than"):
        tiny_params({"host.training.threads": 2, "host.training.throttled_threads": 4})


# --- the flow's stage timeout: SIGTERM, then kill ---------------------------------------------

STAGE = """\
import signal, sys, time
from pathlib import Path
def stop(signum, frame):
    Path("checkpoint").write_text("saved")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
print("started", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("grace_s", [30.0, 0.0])
def test_a_stage_past_its_timeout_gets_sigterm_before_the_kill(
    tmp_path: Path, grace_s: float
) -> None:
    """The command runs under a shell, as DVC runs stage commands: the shell is spared (a stage
    dies with its parent), the stage gets SIGTERM and saves; with no grace it is killed."""
    from flows.dvc_runner import run_logged

    (tmp_path / "stage.py").write_text(STAGE)
    command = ["/bin/sh", "-c", f"{sys.executable} stage.py; echo shell-saw $?"]
    lines: list[str] = []
    with pytest.raises(TimeoutError) as caught:
        run_logged(command, tmp_path, 6, lines.append, grace_s=grace_s)
    if grace_s:
        assert (tmp_path / "checkpoint").read_text() == "saved"
        assert "after SIGTERM let the stage stop" in str(caught.value) and "shell-saw 143" in lines
    else:
        assert not (tmp_path / "checkpoint").exists()
        assert "process group was killed" in str(caught.value)


@pytest.mark.slow
def test_sigterm_to_the_train_stage_saves_mid_epoch_and_the_rerun_ends_the_same(
    prepared: Path, tmp_path: Path
) -> None:
    """A real `python -m pipelines.train` gets SIGTERM after its first epoch: it exits 143 with
    a mid-epoch checkpoint; started again it resumes from that step, to the same weights as an
    uninterrupted run."""
    import json
    import signal

    from pipelines.config import load_params
    from pipelines.models import load_model
    from tests.helpers.train_stage import train_stage

    epochs = 8
    stage = train_stage(tmp_path, prepared, epochs)
    command, env, checkpoints = stage.command, stage.env, stage.checkpoints

    first = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while latest_checkpoint(checkpoints) is None:
        assert first.poll() is None, first.communicate()[1].decode()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143, err.decode()[-2000:]
    assert "stopped (SIGTERM) in epoch" in err.decode() and "Traceback" not in err.decode()
    saved = read_checkpoint(latest_checkpoint(checkpoints) or Path("none"))
    assert saved["progress"] is not None and saved["epoch"] < epochs
    stopped_at = f"resuming from epoch {saved['epoch']}, step {saved['progress']['steps']} "

    second = subprocess.run(
        command, check=False, cwd=tmp_path, env=env, capture_output=True, timeout=300
    )
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    assert stopped_at in second.stderr.decode()
    metrics = json.loads((tmp_path / "metrics" / "train.json").read_text())
    whole = train(load_params(tmp_path / "params.yaml").train, prepared, tmp_path / "whole")
    resumed, _ = load_model(tmp_path / "models" / "train" / "model.pt")
    assert_same(resumed, whole.model)
    assert metrics["best_val_loss"] == whole.metrics["best_val_loss"]


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_the_train_stage_in_shared_mode_pauses_and_logs_it_to_mlflow(
    prepared: Path,
    tmp_path: Path,
    metrics_server: tuple[str, dict[str, float], http.server.HTTPServer],
) -> None:
    """`python -m pipelines.train` in shared mode: once its first epoch is saved the service's
    /metrics goes over the SLO (in flight), and calm again when the stage logs the pause. The
    stage log names the pause, its cause and the resume; the MLflow run holds host.pauses,
    host.paused_seconds and host.share."""
    import mlflow

    from tests.helpers.params import write_params_file

    url, figures, _ = metrics_server
    first = sorted(os.sched_getaffinity(0))[0]
    shared = {
        "host.mode": "shared",
        "host.slo.metrics_url": url,
        "host.slo.max_in_flight": IN_FLIGHT,
        "host.service.cpus": [first],
        "host.poll_ms": 50,
        "host.resume_after_s": 1.0,  # many optimizer steps: the loop is blocked meanwhile
        "train.epochs": 20,
        "train.patience": 20,
    }
    write_params_file(tiny_params(LOOP, shared), tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO)}
    env.pop("MLOPS_PARENT_RUN_ID", None)
    command = [sys.executable, "-m", "pipelines.train", "--prepared", str(prepared)]
    command += ["--model", "model.pt", "--metrics", "train.json", "--plots", "train.csv"]
    command += ["--checkpoint-dir", "checkpoints"]
    stage = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(stage.stderr or []), daemon=True)
    reader.start()
    try:
        wait_for(lambda: latest_checkpoint(tmp_path / "checkpoints") is not None, stage, log)
        figures["busy"] = IN_FLIGHT + 5
        wait_for(lambda: any("host: training paused" in line for line in log), stage, log)
        figures["busy"] = 0
        assert stage.wait(timeout=300) == 0, "".join(log)[-3000:]
    finally:
        stage.kill()
        stage.wait()
    reader.join(timeout=10)
    text = "".join(log)
    assert f"in flight {IN_FLIGHT + 5:g} over the SLO" in text
    assert "host: training at full share (" in text and "below 0.7 x the SLO" in text
    assert "host: training on cores" in text

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "tags.`mlops.stage` = 'train'"
    )
    assert run.data.metrics["host.pauses"] == 1
    assert run.data.metrics["host.paused_seconds"] >= 0.5
    shares = [m.value for m in client.get_metric_history(run.info.run_id, "host.share")]
    assert shares == [1.0, 0.0, 1.0]


def wait_for(
    done: Any, stage: subprocess.Popen[str], log: list[str], timeout_s: float = 120
) -> None:
    """Until `done()`; fails naming the stage's log when it ends first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert stage.poll() is None, "".join(log)[-3000:]
        assert time.monotonic() < deadline, "".join(log)[-3000:]
        time.sleep(0.02)


def test_a_throttled_gate_sleeps_for_its_duty_cycle(monkeypatch: pytest.MonkeyPatch) -> None:
    """duty 0.5: after a step of 0.2 s (the time since the previous boundary) it sleeps 0.2 s."""
    clock = Clock()
    gate = TrainingGate(duty=0.5, clock=clock)
    gate.set_mode(Mode.THROTTLED)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock.t += 0.2
    gate.boundary()
    assert slept == [pytest.approx(0.2)]
    assert gate.share(Mode.THROTTLED) == 0.5


def test_a_stopped_tune_trial_is_no_failure_and_the_rerun_replaces_it(
    tmp_path: Path, prepared: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """StopRequested passes through Optuna's caught trial errors (a BaseException): the stage
    stops; the next run marks the stopped trial failed (stale heartbeat) and runs the budget."""
    import optuna
    from optuna.trial import TrialState

    import pipelines.train
    from pipelines.config import section_dict, validate_params
    from pipelines.tune import study_name, tune

    raw = section_dict(tiny_params(train__epochs=2, train__patience=10, train__num_workers=0))
    raw["tune"].update(
        enabled=True,
        trials=2,
        workers=1,
        heartbeat_s=1,
        storage=f"sqlite:///{tmp_path / 'study.db'}",
        space={"train.lr": {"type": "float", "low": 1.0e-3, "high": 1.0e-2, "log": True}},
    )
    params = validate_params(raw)
    real_train = pipelines.train.train

    def stopped(*args: Any, **kwargs: Any) -> Any:
        raise StopRequested("SIGTERM")

    monkeypatch.setattr(pipelines.train, "train", stopped)
    with pytest.raises(StopRequested):
        tune(params, prepared, tmp_path)
    name = study_name(params, read_json(prepared / "manifest.json")["content_hash"])
    study = optuna.load_study(study_name=name, storage=params.tune.storage)
    assert [t.state for t in study.trials] == [TrialState.RUNNING]

    monkeypatch.setattr(pipelines.train, "train", real_train)
    time.sleep(2.5)  # the stopped trial's heartbeat (1 s) is stale after 2 s
    _, metrics = tune(params, prepared, tmp_path)
    assert (metrics["trials_complete"], metrics["trials_failed"]) == (2, 1)


def test_the_services_latency_histogram_resolves_a_tight_slo() -> None:
    """The p99 the controller reads (BentoML's duration histogram) tells a 7 ms p99 from a 9 ms
    one: service.py gives BentoML bounds at most 25% apart from 0.5 ms to 1.9 s (its defaults jump
    from 5 to 10 to 25 ms), and few of them (each bound costs every /metrics read: the
    controller's reads slowed the service). The in-process app has no /metrics histogram: the live
    test (test_shared_host_live.py) reads the real one."""
    import service

    duration = service.SERVICE.config["metrics"]["duration"]
    bounds = [le for le in duration["buckets"] if le <= 2.0]
    assert bounds[0] == pytest.approx(0.0005) and bounds[-1] >= 1.9
    assert all(b / a <= 1.251 for a, b in itertools.pairwise(bounds))
    assert max(duration["buckets"]) >= 120.0
    assert len(duration["buckets"]) <= 50


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_with_borrow_idle_the_controller_keeps_the_normal_policy_and_pauses() -> None:
    """At SCHED_IDLE the controller starved under an overload and never paused training (a new
    user's finding): in `shared_host` it is spared, so it reads the breach and pauses."""
    first = sorted(os.sched_getaffinity(0))[0]
    script = (
        "import os, threading, time; from tests.helpers.params import tiny_params\n"
        "from pipelines.host import Mode, Reading, shared_host\n"
        f"cfg = tiny_params({{'host.mode': 'shared', 'host.service.cpus': [{first}],\n"
        "                    'host.training.borrow_idle': True, 'host.poll_ms': 50}).host\n"
        "class Over:\n"
        "    def read(self): return Reading(p99_ms=10 * cfg.slo.p99_ms, in_flight=0)\n"
        "with shared_host(cfg, Over()) as gate:\n"
        "    deadline = time.monotonic() + 30\n"
        "    while gate.mode != Mode.PAUSED and time.monotonic() < deadline: time.sleep(0.05)\n"
        "    print('mode', gate.mode.name)\n"
        "    for t in threading.enumerate():\n"
        "        idle = os.sched_getscheduler(t.native_id) == os.SCHED_IDLE\n"
        "        print('thread', t.name, idle)\n"
    )
    lines = _run_in_own_process(script)
    assert "mode PAUSED" in lines
    assert "thread host-controller False" in lines
    assert "thread MainThread True" in lines


V2_MEMBERSHIP = "0::/user.slice/session-1.scope\n"
HYBRID_MEMBERSHIP = "12:pids:/\n1:cpu:/\n0::/user.slice/session-1.scope\n"  # v2 line last


def cgroup_tree(root: Path) -> Path:
    """A cgroup v2 mount as the kernel shows it, with this process's own group in it."""
    own = root / "user.slice" / "session-1.scope"
    own.mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    return own


@pytest.mark.parametrize("membership", [V2_MEMBERSHIP, HYBRID_MEMBERSHIP], ids=["v2", "hybrid"])
def test_training_joins_its_own_cgroup_v2_with_its_weights(tmp_path: Path, membership: str) -> None:
    """Under its current group (the `0::` line wherever it is), `mlops-training` gets the
    weights and this process; the kernel would make the interface files, the fake makes them."""
    from pipelines.host import CGROUP_NAME, join_cgroup

    share = host().training
    group = cgroup_tree(tmp_path / "cg") / CGROUP_NAME
    group.mkdir()
    for name in ("cpu.weight", "io.weight", "cgroup.procs"):
        (group / name).write_text("")
    (tmp_path / "cgroup").write_text(membership)
    line = join_cgroup(share, tmp_path / "cg", tmp_path / "cgroup")
    assert line == f"host: training in cgroup {group} (cpu.weight {share.cpu_weight})"
    assert (group / "cpu.weight").read_text() == f"{share.cpu_weight}\n"
    assert (group / "io.weight").read_text() == f"{share.io_weight}\n"
    assert (group / "cgroup.procs").read_text() == f"{os.getpid()}\n"


def test_without_cgroup_v2_or_its_entry_or_write_access_training_says_why(tmp_path: Path) -> None:
    from pipelines.host import CGROUP_NAME, join_cgroup

    share = host().training
    (tmp_path / "cgroup").write_text(V2_MEMBERSHIP)
    assert "no cgroup v2 here" in join_cgroup(share, tmp_path / "none", tmp_path / "cgroup")
    own = cgroup_tree(tmp_path / "cg")
    (tmp_path / "v1").write_text("12:pids:/\n1:cpu:/\n")
    line = join_cgroup(share, tmp_path / "cg", tmp_path / "v1")
    assert line == f"host: no cgroup v2 entry (0::) in {tmp_path / 'v1'}: per-process controls only"
    (own / CGROUP_NAME / "cgroup.procs").mkdir(parents=True)  # not a file: the write fails
    line = join_cgroup(share, tmp_path / "cg", tmp_path / "cgroup")
    assert line.startswith("host: cgroup v2 not writable here (") and "cgroup.procs" in line


def live_cgroup_v2() -> Path | None:
    """This machine's cgroup v2 mount: the whole tree (a v2 host) or a hybrid host's `unified`."""
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (root / "cgroup.controllers").exists():
            return root
    return None


JOIN_AND_LEAVE = """
import os, sys
from pathlib import Path
from pipelines.config import load_params
from pipelines.host import CGROUP_NAME, join_cgroup, own_cgroup
root = Path(sys.argv[1])
before = own_cgroup().lstrip("/")
print(join_cgroup(load_params(Path("params.yaml")).host.training, root))
after = own_cgroup()
print(f"0::{after}")
if after.lstrip("/") != before:  # leave the group again and remove it
    (root / before / "cgroup.procs").write_text(f"{os.getpid()}\\n")
    os.rmdir(root / before / CGROUP_NAME)
"""


@pytest.mark.skipif(live_cgroup_v2() is None, reason="no cgroup v2 mount on this machine")
def test_training_joins_a_real_cgroup_v2(tmp_path: Path) -> None:
    """On the kernel's own cgroup v2 files (a child process, which leaves the group after): the
    process is in `<its group>/mlops-training` once join_cgroup returns."""
    root = live_cgroup_v2()
    done = subprocess.run(
        [sys.executable, "-c", JOIN_AND_LEAVE, str(root)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    line, membership = done.stdout.splitlines()[-2:]
    if "not writable" in line:
        pytest.skip(line)
    assert line.startswith("host: training in cgroup ") and line.endswith(")")
    assert membership.startswith("0::") and membership.endswith("/mlops-training")
