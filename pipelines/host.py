"""One host for training and serving: training's share, inference first, off-peak windows.

`params.yaml`'s `host` section (`HostConfig`). In `dedicated` mode training runs as if alone:
`shared_host` only turns SIGTERM into a clean stop (a checkpoint at the next optimizer step).
In `shared` mode it also

- applies training's share to this process (`apply_quota`: CPU affinity, nice, ionice via
  psutil, or with `borrow_idle` the service's cores too at Linux SCHED_IDLE; a cgroup v2 of
  its own with `cpu.weight` / `io.weight` where writable, else says so once; on CUDA the GPU
  memory fraction), and torch's thread count through the gate;
- starts a `Controller` thread that reads the local service's figures (`PrometheusSource`:
  p99 latency over the last poll and requests in flight, from BentoML's `/metrics`) every
  `host.poll_ms` and drives the `TrainingGate` with hysteresis: over the SLO training pauses (or
  is throttled, `host.on_breach`); it runs again once both figures stayed below `resume_below`
  x the SLO for `resume_after_s`. A source that cannot be read throttles training (fails safe)
  and logs one error line until it answers again. Outside `host.windows` training waits or is
  throttled (`host.outside_window`).

The train loop calls `TrainingGate.boundary()` after every optimizer step: it blocks while
paused (the process, its memory and its CUDA context stay), applies a thread change, sleeps for
a throttled duty cycle, and raises `StopRequested` once a stop was asked (SIGTERM), so the loop
saves a checkpoint and the stage exits. Every decision is logged with the figure that caused it
(logger `pipelines.host`: lines in the stage log, so in the Prefect run) and counted
(`HostStats`: pauses, paused seconds, the share over time; the train stage logs them to MLflow).

No Prefect here: the pause is a plain mechanism the loop honours.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from pipelines.config import HostConfig, ServiceReserve, TrainingShare
from pipelines.errors import ParamsError

log = logging.getLogger("pipelines.host")
STOP_SIGNALS = (signal.SIGTERM,)  # what `shared_host` turns into a clean stop
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_NAME = "mlops-training"  # training's own cgroup v2, under this process's
EXIT_STOPPED = 143  # a stage stopped by SIGTERM with its checkpoint saved: 128 + SIGTERM
# Held back this long with every read under the SLO (no breach) and still not released: the
# controller says once that the resume threshold may sit below what the service does alone
# (measured: an SLO of 1.2 x the service-alone p99 with resume_below 0.7 held training paused
# for whole 10 s windows, benchmarks/shared_host.py). A calm read that does not last
# resume_after_s does not restart the count; a breach or an unreadable service does.
STUCK_WARN_S = 60.0


class Mode(enum.IntEnum):
    """How much training may run; ordered, so `min` is the stricter of two."""

    PAUSED = 0
    THROTTLED = 1
    FULL = 2


WORDS = {Mode.PAUSED: "paused", Mode.THROTTLED: "throttled", Mode.FULL: "at full share"}


class StopRequested(BaseException):
    """Raised by `TrainingGate.boundary` once a stop was asked (SIGTERM): the loop saves a
    checkpoint at this step boundary and the stage exits; the next run resumes from it. A
    BaseException (like KeyboardInterrupt): handlers of errors (`except Exception`, Optuna's
    caught trial failures) let it through."""


class SourceError(Exception):
    """The service's figures cannot be read (endpoint gone, timeout, not Prometheus text)."""


@dataclass(frozen=True)
class Reading:
    """The service's figures over the last poll: p99 latency (ms; NaN when no request ended in
    the window) and requests in flight (BentoML's gauge, summed over endpoints). `timed_out`:
    the read itself took longer than its timeout (p99_ms is then that timeout, a lower bound)."""

    p99_ms: float
    in_flight: float
    timed_out: bool = False


# A /metrics answer must arrive whole within this many read timeouts: httpx's timeout bounds
# each step (connect, each chunk), and on a loaded host (a CI run beside the test) a 0.1 s budget
# for the sum timed out reads that each step's budget let through.
WHOLE_READ_FACTOR = 3


class MetricsSource(Protocol):
    """Anything with `read() -> Reading` (raises SourceError when it cannot)."""

    def read(self) -> Reading: ...


class PrometheusSource:
    """The local service's `/metrics` (BentoML 1.4): p99 of
    `bentoml_service_request_duration_seconds` over the last `window_s` (the delta of the
    cumulative histograms between this read and the latest earlier read at least `window_s`
    old, or the oldest kept; 0: the previous read; the first read only sets the baseline: NaN)
    and `bentoml_service_request_in_progress`, of the prediction endpoints, parsed with
    prometheus_client's parser (`inference.metrics`). A read that times out is a reading of
    p99 = the timeout (a lower bound) and in-flight unknown (NaN); a refused or broken one, or
    a 200 without BentoML's request counter of those endpoints (another exporter, an empty
    page: it would read as calm for good), raises SourceError."""

    def __init__(
        self,
        url: str,
        timeout_s: float,
        window_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.timeout_s, self.window_s, self.clock = url, timeout_s, window_s, clock
        self._history: collections.deque[tuple[float, Any]] = collections.deque()

    def fetch(self) -> str | None:
        """The /metrics body, or None when the whole answer took over WHOLE_READ_FACTOR x
        timeout_s (httpx's own timeout bounds each step of the read, not their sum: an answer
        dripping a chunk every 0.3 s held the controller for a minute). Raises httpx.HTTPError
        for a refused or failed one."""
        import httpx

        deadline = time.monotonic() + WHOLE_READ_FACTOR * self.timeout_s
        chunks = []
        with httpx.stream("GET", self.url, timeout=self.timeout_s) as answer:
            answer.raise_for_status()
            for chunk in answer.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    return None
        return b"".join(chunks).decode("utf-8", errors="replace")

    def read(self) -> Reading:
        import httpx

        from inference import metrics

        try:
            text = self.fetch()
            scrape = None if text is None else metrics.parse(text)
        except httpx.TimeoutException:
            scrape = None
        except (httpx.HTTPError, ValueError) as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SourceError(f"{self.url}: {message}") from None
        if scrape is None:
            # The service is up but answers its own /metrics slower than the timeout: one event
            # loop serves both, so its requests wait at least as long. A breach (p99 >= the
            # timeout), not a lost source: measured under overload (benchmarks/shared_host.py),
            # reads timed out for 15 s on end while requests waited ~1 s.
            return Reading(self.timeout_s * 1000.0, math.nan, timed_out=True)
        if not scrape.found:
            # a 200 from something else (another exporter, an empty page) would read as calm
            # for good: BentoML lists the request counter of every API from its start
            raise SourceError(
                f"{self.url}: no {metrics.TOTAL} for {' or '.join(metrics.JUDGED)}: not this "
                "project's `bentoml serve` (host.slo.metrics_url)"
            )
        now = self.clock()
        history = self._history
        history.append((now, scrape))
        # history[0]: the latest earlier read at least window_s old (or the oldest one kept)
        while len(history) > 2 and now - history[1][0] >= self.window_s:
            history.popleft()
        before = history[0][1] if len(history) > 1 else None
        p99_s = math.nan if before is None else metrics.window(before, scrape).p99_s
        return Reading(p99_s * 1000.0, scrape.in_progress)


@dataclass
class HostStats:
    """What the gate did: pauses (times training entered a pause), seconds it spent blocked,
    seconds throttled, the share over time [(seconds since start, share 0..1)], and when the
    loop blocked (the gate's clock, time.monotonic by default: for breach-to-pause delays)."""

    pauses: int = 0
    paused_seconds: float = 0.0
    throttled_seconds: float = 0.0
    share: list[tuple[float, float]] = field(default_factory=list)
    blocked_at: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, float]:
        """Summary figures for MLflow: host.pauses, host.paused_seconds, host.throttled_seconds."""
        return {
            "host.pauses": float(self.pauses),
            "host.paused_seconds": self.paused_seconds,
            "host.throttled_seconds": self.throttled_seconds,
        }


class TrainingGate:
    """The pause mechanism the train loop honours at every optimizer-step boundary.

    `threads` = (full, throttled) torch thread counts, or None to leave torch's alone (dedicated
    mode); `duty` = the share of wall time a throttled run steps (1: no sleeping). The
    controller calls `set_mode`; a signal handler calls `request_stop`; the loop calls
    `boundary`. Thread-safe."""

    def __init__(
        self,
        threads: tuple[int, int] | None = None,
        duty: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.threads, self.duty, self.clock = threads, duty, clock
        self.stats = HostStats()
        self._cond = threading.Condition()
        self._mode = Mode.FULL
        self._stop: str | None = None
        self._applied: int | None = None  # torch threads set by the loop's thread
        self._start = clock()
        self._since = self._start  # when the current mode began
        self._last_step = self._start
        self.stats.share.append((0.0, self.share(Mode.FULL)))

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def stop_reason(self) -> str | None:
        """Why a stop was asked (e.g. "SIGTERM"), or None."""
        return self._stop

    def share(self, mode: Mode) -> float:
        """Training's share of its full speed in `mode`: 1, 0, or throttled threads / full
        threads x duty."""
        if mode == Mode.PAUSED:
            return 0.0
        if mode == Mode.FULL:
            return 1.0
        full, throttled = self.threads or (1, 1)
        return throttled / full * self.duty

    def set_mode(self, mode: Mode) -> None:
        """Set by the controller; a pause takes effect at the loop's next `boundary`."""
        with self._cond:
            if mode == self._mode:
                return
            now = self.clock()
            if self._mode == Mode.THROTTLED:
                self.stats.throttled_seconds += now - self._since
            if mode == Mode.PAUSED:
                self.stats.pauses += 1
            self._mode, self._since = mode, now
            self.stats.share.append((now - self._start, self.share(mode)))
            self._cond.notify_all()

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop at its next boundary (wakes a paused loop); safe in a signal
        handler."""
        self._stop = reason
        with contextlib.suppress(RuntimeError):  # a handler that interrupted a holder of _cond
            if self._cond.acquire(blocking=False):
                try:
                    self._cond.notify_all()
                finally:
                    self._cond.release()

    def boundary(self) -> None:
        """Called by the loop after every optimizer step: raises StopRequested when a stop was
        asked; blocks while paused (polled every 0.1 s, so a stop still gets through); applies
        the mode's torch thread count; throttled, sleeps so that the time since the previous
        boundary (the step) is `duty` of the wall time."""
        worked = self.clock() - self._last_step
        with self._cond:
            if self._mode == Mode.PAUSED and self._stop is None:
                blocked = self.clock()
                self.stats.blocked_at.append(blocked)
                while self._mode == Mode.PAUSED and self._stop is None:
                    self._cond.wait(timeout=0.1)
                self.stats.paused_seconds += self.clock() - blocked
            mode = self._mode
        if self._stop is not None:
            raise StopRequested(self._stop)
        self._apply_threads(mode)
        if mode == Mode.THROTTLED and self.duty < 1.0:
            time.sleep(worked * (1.0 - self.duty) / self.duty)
        self._last_step = self.clock()

    def _apply_threads(self, mode: Mode) -> None:
        if self.threads is None:
            return
        wanted = self.threads[1] if mode == Mode.THROTTLED else self.threads[0]
        if wanted != self._applied:
            import torch

            torch.set_num_threads(wanted)
            self._applied = wanted

    def close(self) -> None:
        """Count the time of the current mode (throttled seconds) up to now."""
        with self._cond:
            if self._mode == Mode.THROTTLED:
                self.stats.throttled_seconds += self.clock() - self._since
                self._since = self.clock()


def in_window(windows: list[str], timezone: str, now: datetime | None = None) -> bool:
    """Whether `now` (default: the current time) lies in one of `windows` ("HH:MM-HH:MM" in
    `timezone`; a window whose end is before its start wraps midnight). No windows: always."""
    from zoneinfo import ZoneInfo

    if not windows:
        return True
    local = (now or datetime.now(ZoneInfo(timezone))).astimezone(ZoneInfo(timezone))
    minute = local.hour * 60 + local.minute
    for window in windows:
        start = int(window[0:2]) * 60 + int(window[3:5])
        end = int(window[6:8]) * 60 + int(window[9:11])
        inside = start <= minute < end if start < end else minute >= start or minute < end
        if inside:
            return True
    return False


class Controller:
    """Reads `source` every `cfg.poll_ms` in a thread of its own and drives `gate`.

    `step(reading | error, now)` is one decision (pure but for the gate and the log; tests call
    it directly with a scripted source): the stricter of the window's mode and the SLO's hold.
    Over the SLO the hold becomes `on_breach` at once; it is released only after both figures
    stayed below `resume_below` x the SLO for `resume_after_s` (`resume_via: throttle`: a pause
    is released to the throttled share first, and to full share after another such period). A
    read that fails holds at throttled (at least) and logs one error line until a read
    succeeds."""

    def __init__(
        self,
        cfg: HostConfig,
        gate: TrainingGate,
        source: MetricsSource,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        self.cfg, self.gate, self.source, self.clock = cfg, gate, source, clock
        self.now = now
        self.hold = Mode.FULL  # the SLO's limit
        self.calm_since: float | None = None  # when the figures went below resume_below
        self.unbreached_since: float | None = None  # held, every read since under the SLO
        self.warned_stuck = False  # the STUCK_WARN_S line, once a hold
        self.source_failed = False
        self.window = Mode.FULL  # the window's mode at the previous step
        self.reason = "start"
        # Each change: (the controller's clock, the new mode, its cause), as logged.
        self.decisions: list[tuple[float, Mode, str]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def window_mode(self) -> Mode:
        """FULL inside the windows; outside, PAUSED (`wait`) or THROTTLED (`throttle`)."""
        now = self.now() if self.now else None
        if in_window(self.cfg.windows, self.cfg.timezone, now):
            return Mode.FULL
        return Mode.PAUSED if self.cfg.outside_window == "wait" else Mode.THROTTLED

    def step(self, reading: Reading | None, error: str | None = None) -> Mode:
        """One decision from one read (`reading`, or `error` when the read failed): sets the
        gate's mode, logs a change with its cause, returns the mode."""
        if reading is None:
            self._failed(error or "no reading")
        else:
            self._judge(reading)
        window = self.window_mode()
        mode = min(window, self.hold)
        if mode != self.gate.mode:
            cause = self.reason
            if window != self.window:  # the window opened or closed
                cause = "inside host.windows" if window == Mode.FULL else "outside host.windows"
            log.info("host: training %s (%s)", WORDS[mode], cause)
            self.decisions.append((self.clock(), mode, cause))
        self.gate.set_mode(mode)
        self.window = window
        return mode

    def _failed(self, error: str) -> None:
        if not self.source_failed:
            log.error(
                "host: cannot read the service's metrics (%s); training throttled until they "
                "answer",
                error,
            )
        self.source_failed, self.calm_since, self.unbreached_since = True, None, None
        self.hold = min(self.hold, Mode.THROTTLED)
        self.reason = "metrics source unreadable"

    def _judge(self, reading: Reading) -> None:
        if self.source_failed:
            log.info("host: the service's metrics answer again")
            self.source_failed = False
        slo = self.cfg.slo
        figures = f"p99 {reading.p99_ms:.1f} ms, in flight {reading.in_flight:g}"
        slow, busy = reading.p99_ms > slo.p99_ms, reading.in_flight > slo.max_in_flight
        if slow or busy:
            breach = Mode.PAUSED if self.cfg.on_breach == "pause" else Mode.THROTTLED
            self.hold = min(self.hold, breach)
            self.calm_since = self.unbreached_since = None
            # the figure that breached first, then the other against its own limit
            p99 = f"p99 {reading.p99_ms:.1f} ms"
            if reading.timed_out:
                p99 = f"/metrics did not answer within {reading.p99_ms:.0f} ms"
            in_flight = f"in flight {reading.in_flight:g}"
            if slow:
                self.reason = (
                    f"{p99} over the SLO's {slo.p99_ms:g} ms ({in_flight} of {slo.max_in_flight})"
                )
            else:
                self.reason = (
                    f"{in_flight} over the SLO's {slo.max_in_flight} ({p99} of {slo.p99_ms:g} ms)"
                )
            return
        if self.hold == Mode.FULL:
            return
        factor = self.cfg.resume_below
        calm = not reading.p99_ms > factor * slo.p99_ms and reading.in_flight <= (
            factor * slo.max_in_flight
        )
        now = self.clock()
        self._unbreached(now, reading)
        if not calm:
            self.calm_since = None
            return
        self.calm_since = now if self.calm_since is None else self.calm_since
        if now - self.calm_since >= self.cfg.resume_after_s:
            # resume_via throttle: a pause steps up through the throttled share, whose own calm
            # period starts now
            step_up = self.hold == Mode.PAUSED and self.cfg.resume_via == "throttle"
            self.hold = Mode.THROTTLED if step_up else Mode.FULL
            self.warned_stuck = self.warned_stuck and step_up
            self.unbreached_since = now if step_up else None
            self.calm_since = now if step_up else None
            self.reason = f"{figures} below {factor:g} x the SLO for {self.cfg.resume_after_s:g} s"

    def _unbreached(self, now: float, reading: Reading) -> None:
        """Held, and every read since `unbreached_since` under the SLO: after STUCK_WARN_S of
        that, one warning (a hold) that the resume threshold may be under what the service does
        alone."""
        self.unbreached_since = now if self.unbreached_since is None else self.unbreached_since
        if self.warned_stuck or now - self.unbreached_since < STUCK_WARN_S:
            return
        self.warned_stuck = True
        slo, factor = self.cfg.slo, self.cfg.resume_below
        log.warning(
            "host: training held back for %.0f s with the service under its SLO but not for "
            "%g s on end under host.resume_below x it (last read: p99 %.1f ms, in flight %g; "
            "resumes below p99 %.1f ms and %g in flight): if the service alone runs near that, "
            "training never resumes; raise host.resume_below or host.slo",
            now - self.unbreached_since,
            self.cfg.resume_after_s,
            reading.p99_ms,
            reading.in_flight,
            factor * slo.p99_ms,
            factor * slo.max_in_flight,
        )

    def poll_once(self) -> Mode:
        """Read the source once and decide."""
        try:
            reading = self.source.read()
        except SourceError as exc:
            return self.step(None, str(exc))
        return self.step(reading)

    def start(self) -> None:
        """Decide once now (a run outside its window waits from its first step), then every
        poll in a daemon thread until `stop`."""
        self.poll_once()
        self._thread = threading.Thread(target=self._run, name="host-controller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.cfg.poll_ms / 1000.0
        while not self._stop.wait(interval):
            try:
                self.poll_once()
            except Exception:  # a controller bug must not kill training: throttle, say so
                log.exception("host: controller error; training throttled")
                self.gate.set_mode(min(self.gate.mode, Mode.THROTTLED))

    def alive(self) -> bool:
        """Whether the polling thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def thread_ids(self) -> list[int]:
        """The Linux thread id of the polling thread while it runs (for `apply_quota`'s
        `spare`); empty before `start`."""
        thread = self._thread
        return [thread.native_id] if thread is not None and thread.native_id is not None else []

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


def training_cpus(share: TrainingShare, service: ServiceReserve) -> list[int]:
    """The cores training may use: `share.cpus`, or every core this process may use that is
    not reserved for the service. Raises ParamsError naming the key when none is left or a core
    is not on this host."""
    available = sorted(os.sched_getaffinity(0))
    cores = os.cpu_count() or len(available)
    absent = [c for c in service.cpus if c >= cores]
    if absent:  # the service may run outside this process's affinity, never off the host
        raise ParamsError(
            f"host.service.cpus: cores {', '.join(map(str, absent))} are not on this host "
            f"(it has cores 0-{cores - 1})"
        )
    if share.cpus is not None:
        missing = [c for c in share.cpus if c not in available]
        if missing:
            raise ParamsError(
                f"host.training.cpus: cores {', '.join(map(str, missing))} are not available "
                f"here (this process may use {', '.join(map(str, available))})"
            )
        return sorted(share.cpus)
    cpus = [c for c in available if c not in service.cpus]
    if not cpus:
        raise ParamsError(
            f"host.service.cpus: reserves every core this process may use "
            f"({', '.join(map(str, available))}); leave training at least one"
        )
    return cpus


def quota_cpus(share: TrainingShare, service: ServiceReserve) -> list[int]:
    """The cores training's affinity holds: `training_cpus`, plus `service.cpus` (those this
    process may use) when `share.borrow_idle` (training then runs at SCHED_IDLE)."""
    cpus = set(training_cpus(share, service))
    if share.borrow_idle:
        cpus |= set(service.cpus) & os.sched_getaffinity(0)
    return sorted(cpus)


def default_threads(cpus: list[int]) -> int:
    """Torch threads at full share when `host.training.threads` is null: one per core training
    may use, but no more than this process already has (tune's workers split the host's threads
    between them before their trials start)."""
    import torch

    return max(1, min(len(cpus), torch.get_num_threads()))


def apply_quota(cfg: HostConfig, spare: Collection[int] = ()) -> list[str]:
    """Put this process (training) on its share: affinity (of every thread), nice (or, with
    `borrow_idle`, SCHED_IDLE on its cores and the service's), ionice, a cgroup v2 of its own
    where writable, the CUDA memory fraction; warn when less memory is free than the service's
    reserve. Returns the lines it logged (one per control). Call it once, in the training
    process, before the data loader starts its workers (they inherit it)."""
    import psutil

    process = psutil.Process()
    share = cfg.training
    cpus = quota_cpus(share, cfg.service)
    for thread in _threads():  # threads started later (torch's pool, loaders) inherit
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(thread, cpus)
    lines = [f"host: training on cores {', '.join(map(str, cpus))}"]
    if share.borrow_idle:
        lines.append(_sched_idle(cfg.service.cpus, spare))
    elif share.nice:
        process.nice(min(19, process.nice() + share.nice))
        lines.append(f"host: training niceness {process.nice()}")
    if share.ionice != "none":
        lines.append(_ionice(process, share.ionice))
    lines.append(join_cgroup(share))
    lines += _memory_lines(cfg.service, psutil.virtual_memory().available)
    lines += _gpu_lines(share)
    for line in lines:
        log.info("%s", line)
    return lines


def _threads() -> list[int]:
    """The ids of this process's threads (Linux: /proc/self/task; elsewhere this one)."""
    try:
        return [int(task.name) for task in Path("/proc/self/task").iterdir()]
    except OSError:
        return [0]


def _sched_idle(service_cpus: list[int], spare: Collection[int] = ()) -> str:
    """Every thread of this process but those in `spare` (Linux thread ids) at SCHED_IDLE
    (threads started later inherit it): it runs only on a core nothing else wants and any
    normal task preempts it (sched(7), Linux; no privilege needed to lower one's own policy).
    The controller's thread is spared: at SCHED_IDLE an overload that keeps every core busy
    starved it, so it never read the breach and never paused training (a new user's finding in
    `benchmarks/shared_host.py` scenario (g)); it sleeps between polls, so it costs the service
    nothing."""
    for thread in _threads():
        if thread in spare:
            continue
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    cores = ", ".join(map(str, service_cpus))
    return f"host: training at SCHED_IDLE (borrows the service's cores {cores} when idle)"


def _ionice(process: Any, kind: str) -> str:
    import psutil

    try:
        if kind == "idle":
            process.ionice(psutil.IOPRIO_CLASS_IDLE)
        else:
            process.ionice(psutil.IOPRIO_CLASS_BE, value=7)
    except (psutil.Error, OSError) as exc:  # e.g. a container without the capability
        return f"host: cannot set the I/O priority here ({exc}): host.training.ionice ignored"
    return f"host: training I/O priority {kind}"


def own_cgroup(membership: Path = Path("/proc/self/cgroup")) -> str | None:
    """This process's cgroup v2 path (`/user.slice/...`) from its cgroup list `membership`: the
    `0::<path>` line (cgroups(7); on a hybrid host it follows the v1 lines); None without one.
    Raises OSError when `membership` cannot be read."""
    lines = membership.read_text().splitlines()
    return next((line[3:] for line in lines if line.startswith("0::")), None)


def join_cgroup(
    share: TrainingShare, root: Path = CGROUP_ROOT, membership: Path = Path("/proc/self/cgroup")
) -> str:
    """Move this process into a cgroup v2 of its own (`mlops-training` under its current one)
    with `cpu.weight` and `io.weight`; where cgroup v2 is absent or not writable, say so (the
    per-process controls still apply). Returns the line to log.

    `root`: the cgroup v2 mount (a v2 host has `cgroup.controllers` there); `membership`: the
    process's cgroup list (own_cgroup)."""
    if not (root / "cgroup.controllers").exists():
        return "host: no cgroup v2 here (cgroup v1 or none): per-process controls only"
    try:
        own = own_cgroup(membership)
        if own is None:
            return f"host: no cgroup v2 entry (0::) in {membership}: per-process controls only"
        group = root / own.lstrip("/") / CGROUP_NAME
        group.mkdir(exist_ok=True)
        for name, value in (("cpu.weight", share.cpu_weight), ("io.weight", share.io_weight)):
            if (group / name).exists():
                (group / name).write_text(f"{value}\n")
        (group / "cgroup.procs").write_text(f"{os.getpid()}\n")
    except OSError as exc:
        return f"host: cgroup v2 not writable here ({exc}): per-process controls only"
    return f"host: training in cgroup {group} (cpu.weight {share.cpu_weight})"


def _memory_lines(service: ServiceReserve, available: int) -> list[str]:
    if available < service.memory_mib * 2**20:
        return [
            f"host: only {available / 2**20:.0f} MiB free, less than host.service.memory_mib "
            f"{service.memory_mib} kept for the service"
        ]
    return []


def _gpu_lines(share: TrainingShare) -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    torch.cuda.set_per_process_memory_fraction(share.gpu_memory_fraction)
    return [f"host: training may use {share.gpu_memory_fraction:g} of the GPU's memory"]


@contextlib.contextmanager
def stop_on_signal(gate: TrainingGate, also: Callable[[], object] | None = None) -> Iterator[None]:
    """While inside, SIGTERM asks `gate` to stop (a checkpoint at the next step boundary)
    instead of killing the process, and calls `also` (e.g. passes it on to worker processes).
    Outside the main thread (no handler can be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        gate.request_stop(signal.Signals(signum).name)
        if also is not None:
            also()

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@contextlib.contextmanager
def shared_host(
    cfg: HostConfig, source: MetricsSource | None = None, quota: bool = True
) -> Iterator[TrainingGate]:
    """The gate a training run honours, for the run's duration.

    dedicated: a plain gate (never paused) that turns SIGTERM into a clean stop. shared: the
    same, plus training's share (`apply_quota`, when `quota`) and a `Controller` reading
    `source` (default: `PrometheusSource(cfg.slo.metrics_url)`) every poll; at the end its
    figures are logged (`HostStats` in `gate.stats`)."""
    if cfg.mode == "dedicated":
        gate = TrainingGate()
        with stop_on_signal(gate):
            yield gate
        return
    share = cfg.training
    threads = share.threads or default_threads(quota_cpus(share, cfg.service))
    throttled = min(share.throttled_threads, threads)
    gate = TrainingGate((threads, throttled), share.throttled_duty)
    timeout_s = min(2.0, max(0.1, cfg.poll_ms / 1000.0))
    source = source or PrometheusSource(cfg.slo.metrics_url, timeout_s, cfg.slo.window_s)
    controller = Controller(cfg, gate, source)
    controller.start()  # before the quota: with borrow_idle it keeps the normal policy
    if quota:
        apply_quota(cfg, spare=controller.thread_ids())
    try:
        with stop_on_signal(gate):
            yield gate
    finally:
        controller.stop()
        gate.close()
        stats = gate.stats
        log.info(
            "host: in all %d pause(s), %.1f s paused, %.1f s throttled",
            stats.pauses,
            stats.paused_seconds,
            stats.throttled_seconds,
        )


@contextlib.contextmanager
def stopped_cleanly() -> Iterator[None]:
    """A `StopRequested` (SIGTERM honoured at a step boundary, checkpoint saved) becomes exit
    status EXIT_STOPPED (128 + SIGTERM, as for a process the signal killed), one log line and
    no traceback."""
    try:
        yield
    except StopRequested as stop:
        log.warning("host: stopped by %s; the next run resumes from the checkpoint", stop)
        raise SystemExit(EXIT_STOPPED) from None
