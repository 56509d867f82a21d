"""Deploy and roll back on the inference host (ARCHITECTURE.md: Rollout on the inference host).

A rollout: the candidate starts beside the running version on free loopback ports under
supervisord -> /readyz -> warm-up -> checks before any traffic (/metadata names the expected
registry version; the golden set's accuracy and agreement with the training host) -> canary
(proxy weights; 5xx share and p99 from both versions' /metrics) -> all traffic -> the old version
drains and stops -> watch window (a breach rolls back by itself). A failed check stops and removes
the candidate, leaves or puts back the running version's upstream, and raises CheckError naming
the check, the value and the limit. One deploy at a time per host (a lock on MLOPS_SERVING_HOME);
each start first reconciles what a killed deploy left (a group not in state.json is removed).
"""

from __future__ import annotations

import math
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from inference import metrics, proxy, store, supervisor
from inference.errors import CheckError, FetchError, HostError
from inference.settings import HostSettings, host_settings
from inference.state import Slot, State, read_state, record, write_state
from pipelines.config import DeployConfig, Params

Log = Callable[[str], None]
HTTP_TIMEOUT_S = 30.0


@dataclass
class Host:
    """One deploy's view of the host: its settings, the policy (params.deploy), and a logger."""

    settings: HostSettings
    params: Params
    log: Log
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds (benchmarks)

    @property
    def policy(self) -> DeployConfig:
        return self.params.deploy

    @property
    def home(self) -> Path:
        return self.settings.home

    def headers(self) -> dict[str, str]:
        key = self.settings.api_key
        return {"x-api-key": key} if key else {}


@dataclass(frozen=True)
class Outcome:
    """What a deploy or rollback did: the serving version, the one before, what happened."""

    version: str
    bento: str
    previous: str | None
    outcome: str  # deployed | unchanged | rolled back
    reason: str = ""
    golden: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # step -> seconds


# ---------------------------------------------------------------- host start and reconcile


def open_host(params: Params, log: Log, settings: HostSettings | None = None) -> Host:
    """The host, started if needed: nginx.conf and supervisord (with nginx) up, and leftovers of
    a killed deploy (a version group not in state.json) stopped and removed."""
    settings = settings or host_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    host = Host(settings, params, log)
    state = read_state(settings.home)
    backends = [(state.current.ports, 100)] if state.current else None
    conf = proxy.prepare(settings, params.serve.max_body_bytes, backends)
    supervisor.ensure_supervisord(settings, conf)
    proxy.verify(settings)  # the serving address is ours before anything is started behind it
    keep = {supervisor.group_name(v) for v in ([state.current.version] if state.current else [])}
    for group in supervisor.groups(settings):
        if group not in keep:
            log(f"reconcile: removing {group}, left by an interrupted deploy (not in state.json)")
            supervisor.stop_group(settings, group[1:])
    return host


def make_home(settings: HostSettings) -> None:
    """MLOPS_SERVING_HOME made (mode 0700: its supervisor configs hold the API key) if missing;
    HostError naming it when it cannot be."""
    try:
        settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise HostError(
            f"MLOPS_SERVING_HOME {settings.home}: cannot create it ({exc.strerror})"
        ) from None


def free_ports(settings: HostSettings, count: int, taken: set[int]) -> list[int]:
    """`count` ports of the host's range that no version holds and nothing listens on."""
    found: list[int] = []
    for port in range(settings.ports[0], settings.ports[1] + 1):
        if port in taken:
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise HostError(f"MLOPS_SERVING_PORTS {settings.ports}: fewer than {count} free ports")


# ---------------------------------------------------------------- fetch


def fetch(host: Host, version: str | None, bento: str | None) -> store.Bento:
    """The bento to deploy, imported into the host's store and checked: `bento` (an archive path,
    or the tag of a bento already imported here) or else registry `version` (default the
    champion) downloaded through MLflow. FetchError, with the host unchanged, otherwise."""
    name = host.params.register_.model_name
    start = time.perf_counter()
    if bento and (Path(bento).suffix == ".bento" or Path(bento).is_file()):
        archive = Path(bento)
        if not archive.is_file():
            raise FetchError(f"archive {archive}: no such file")
        checked = store.inspect(archive, name, version)
        store.import_archive(host.settings, archive, checked)
        host.timings["import"] = time.perf_counter() - start
    elif bento:
        checked = store.local(host.settings, bento, name)
    else:
        resolved, run_id, tag, artifact = store.resolve(name, version)
        host.log(f"fetch: {name} version {resolved} is bento {tag} ({artifact})")
        if tag in store.imported(host.settings):
            checked = store.local(host.settings, tag, name)
        else:
            with tempfile.TemporaryDirectory(prefix="mlops-fetch-") as tmp:
                archive = store.download(run_id, artifact, Path(tmp))
                host.timings["fetch"] = time.perf_counter() - start
                checked = store.inspect(archive, name, resolved)
                start = time.perf_counter()
                store.import_archive(host.settings, archive, checked)
                host.timings["import"] = time.perf_counter() - start
        if checked.version != resolved:
            raise FetchError(f"bento {tag}: claims version {checked.version!r}, not {resolved}")
    host.log(f"fetch: bento {checked.tag} (registry version {checked.version}) imported")
    return checked


# ---------------------------------------------------------------- checks


def wait_ready(host: Host, ports: list[int]) -> None:
    """Each replica's /readyz answers 200 within deploy.ready_timeout_s; CheckError otherwise,
    at once when a replica reports that its model failed to load (/readyz 503 and GET /metadata
    503 "model failed to load: <file>: <what>", service.py): no wait for the timeout."""
    limit = host.policy.ready_timeout_s
    deadline = time.monotonic() + limit
    for port in ports:
        while True:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            failure = load_failure(host, port) if status == 503 else None
            if failure is not None:
                raise CheckError(f"readyz: replica on port {port}: {failure}")
            if time.monotonic() > deadline:
                raise CheckError(
                    f"readyz: replica on port {port} not ready after {limit:g} s "
                    f"(deploy.ready_timeout_s); see {host.home / 'logs'}"
                )
            time.sleep(0.5)


def load_failure(host: Host, port: int) -> str | None:
    """The replica's "model failed to load: ..." (GET /metadata's 503 error), or None."""
    try:
        response = httpx.get(
            f"http://127.0.0.1:{port}/metadata", headers=host.headers(), timeout=HTTP_TIMEOUT_S
        )
        error = response.json().get("error") if response.status_code == 503 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return error if isinstance(error, str) and error.startswith("model failed to load") else None


def predict(host: Host, port: int, rows: list[list[float]]) -> list[dict[str, Any]]:
    """POST /predict to one replica directly, in chunks of serve.max_rows; the predictions.
    CheckError on an answer other than 200."""
    out: list[dict[str, Any]] = []
    step = host.params.serve.max_rows
    with httpx.Client(timeout=HTTP_TIMEOUT_S, headers=host.headers()) as client:
        for i in range(0, len(rows), step):
            response = client.post(
                f"http://127.0.0.1:{port}/predict", json={"rows": rows[i : i + step]}
            )
            if response.status_code != 200:
                raise CheckError(
                    f"golden set: /predict on port {port} answered {response.status_code}: "
                    f"{response.text[:200]}"
                )
            out.extend(response.json())
    return out


def warm_up(host: Host, ports: list[int], bento: store.Bento) -> None:
    """deploy.warmup_requests one-row requests to each replica (answers not judged here)."""
    row = bento.golden["rows"][:1]
    with httpx.Client(timeout=HTTP_TIMEOUT_S, headers=host.headers()) as client:
        for port in ports:
            for _ in range(host.policy.warmup_requests):
                client.post(f"http://127.0.0.1:{port}/predict", json={"rows": row})


def check_metadata(host: Host, ports: list[int], bento: store.Bento) -> None:
    """Each replica's /metadata names the bento's registry version; CheckError otherwise."""
    for port in ports:
        response = httpx.get(
            f"http://127.0.0.1:{port}/metadata", headers=host.headers(), timeout=HTTP_TIMEOUT_S
        )
        claimed = response.json().get("model_version") if response.status_code == 200 else None
        if claimed != bento.version:
            raise CheckError(
                f"metadata: replica on port {port} claims version {claimed!r} "
                f"(HTTP {response.status_code}), expected {bento.version!r}"
            )


def golden_figures(golden: dict[str, Any], served: list[dict[str, Any]]) -> dict[str, float]:
    """accuracy (argmax vs labels), agreement (argmax vs the training host's predictions) and
    max |delta probability| (vs the training host's probabilities) over the golden rows."""
    agree = correct = 0
    delta = 0.0
    for i, answer in enumerate(served):
        probs = answer["probabilities"]
        k = max(range(len(probs)), key=probs.__getitem__)
        correct += int(k == int(golden["labels"][i]))
        agree += int(k == int(golden["predictions"][i]))
        delta = max(
            delta, *(abs(a - b) for a, b in zip(probs, golden["probabilities"][i], strict=True))
        )
    n = len(served)
    return {"accuracy": correct / n, "agreement": agree / n, "max_abs_dprob": delta}


def check_golden(host: Host, port: int, bento: store.Bento) -> dict[str, float]:
    """The golden set on one replica: accuracy >= deploy.golden_min_accuracy and agreement >=
    deploy.golden_min_agreement; the figures, or CheckError naming the one that failed."""
    figures = golden_figures(bento.golden, predict(host, port, bento.golden["rows"]))
    host.log(
        f"golden set ({len(bento.golden['rows'])} rows): accuracy {figures['accuracy']:.4f}, "
        f"agreement {figures['agreement']:.4f}, max |dp| {figures['max_abs_dprob']:.2e}"
    )
    for name, limit in (
        ("accuracy", host.policy.golden_min_accuracy),
        ("agreement", host.policy.golden_min_agreement),
    ):
        if figures[name] < limit:
            raise CheckError(
                f"golden set: {name} {figures[name]:.4f} < deploy.golden_min_{name} {limit}"
            )
    return figures


# ---------------------------------------------------------------- canary and watch


def scrape(ports: list[int]) -> metrics.Scrape:
    """One version's /metrics summed over its replicas (a replica that does not answer counts
    nothing: its restart shows as a counter reset)."""
    total = metrics.Scrape()
    for port in ports:
        try:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        except httpx.HTTPError:
            continue
        total = total.add(metrics.parse(text))
    return total


def judge(host: Host, step: str, candidate: metrics.Window, stable: metrics.Window) -> None:
    p = host.policy
    why = metrics.breach(candidate, stable, p.max_5xx_ratio, p.max_p99_ratio, p.min_requests)
    if why:
        raise CheckError(f"{step}: {why}")


def canary(host: Host, cand: list[int], stable: list[int]) -> metrics.Window:
    """deploy.canary_percent of requests to the candidate for deploy.canary_s, judged every
    deploy.poll_s; the stable version's window (the watch's baseline). CheckError on a breach."""
    share = host.policy.canary_percent
    proxy.switch(host.settings, [(stable, 100 - share), (cand, share)])
    host.log(f"canary: {share}% of requests to the candidate for {host.policy.canary_s:g} s")
    c0, s0 = scrape(cand), scrape(stable)
    end = time.monotonic() + host.policy.canary_s
    while True:
        time.sleep(min(host.policy.poll_s, max(end - time.monotonic(), 0)))
        cw, sw = metrics.window(c0, scrape(cand)), metrics.window(s0, scrape(stable))
        host.log(f"canary: candidate {cw}, stable {sw}")
        judge(host, "canary", cw, sw)
        if time.monotonic() >= end:
            host.log(
                f"canary: candidate {cw.requests:.0f} requests, 5xx {cw.error_share:.3f}, p99 "
                f"{cw.p99_s * 1000:.1f} ms; stable {sw.requests:.0f}, 5xx {sw.error_share:.3f}, "
                f"p99 {sw.p99_s * 1000:.1f} ms"
            )
            return sw


def drain(host: Host, ports: list[int]) -> None:
    """Wait until the old version has no request in flight (bentoml_service_request_in_progress
    0 on two scrapes a poll apart, after nginx's old workers had a moment to finish), bounded by
    deploy.drain_timeout_s; then it may stop."""
    deadline = time.monotonic() + host.policy.drain_timeout_s
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        time.sleep(min(0.5, host.policy.poll_s))
        quiet = quiet + 1 if scrape(ports).in_progress == 0 else 0
    if quiet < 2:
        host.log(f"drain: requests still in flight after {host.policy.drain_timeout_s:g} s")


def watch(host: Host, cand: list[int], baseline: metrics.Window) -> None:
    """deploy.watch_s after promotion: the candidate, alone, judged against the old version's
    canary figures every deploy.poll_s. CheckError on a breach."""
    host.log(f"watch: {host.policy.watch_s:g} s against the old version's canary figures")
    c0 = scrape(cand)
    end = time.monotonic() + host.policy.watch_s
    while time.monotonic() < end:
        time.sleep(min(host.policy.poll_s, max(end - time.monotonic(), 0)))
        judge(host, "watch", metrics.window(c0, scrape(cand)), baseline)


# ---------------------------------------------------------------- the rollout


def start_checked(
    host: Host, bento: store.Bento, taken: set[int]
) -> tuple[list[int], dict[str, float]]:
    """Start `bento` beside what runs, wait ready, warm it up and run the pre-traffic checks;
    its ports and golden figures. CheckError (the candidate removed again) on a failed check."""
    ports = free_ports(host.settings, host.policy.replicas, taken)
    t = time.perf_counter()
    supervisor.start_group(host.settings, bento.version, bento.tag, ports, bento.model_tag)
    host.log(f"start: {bento.tag} as {supervisor.group_name(bento.version)} on ports {ports}")
    try:
        wait_ready(host, ports)
        host.timings["start"] = time.perf_counter() - t
        t = time.perf_counter()
        warm_up(host, ports, bento)
        host.timings["warm-up"] = time.perf_counter() - t
        t = time.perf_counter()
        check_metadata(host, ports, bento)
        figures = check_golden(host, ports[0], bento)
        host.timings["checks"] = time.perf_counter() - t
    except (CheckError, HostError, httpx.HTTPError) as exc:
        supervisor.stop_group(host.settings, bento.version)
        raise CheckError(str(exc)) if isinstance(exc, httpx.HTTPError) else exc from None
    return ports, figures


def roll_out(
    host: Host, bento: store.Bento, outcome: str = "deployed", watch_s: bool = True
) -> Outcome:
    """Take `bento` from stopped to all traffic through the checks and the canary, then watch
    (see the module doc). Raises CheckError with the running version untouched."""
    state = read_state(host.home)
    old = state.current
    if old and old.version == bento.version:
        host.log(f"version {bento.version} already serves here: nothing to do")
        return Outcome(
            old.version, old.bento, state.previous.version if state.previous else None, "unchanged"
        )
    taken = {p for s in (state.current, state.previous) if s for p in s.ports}
    ports, figures = start_checked(host, bento, taken)
    baseline = metrics.Window(0, 0, math.nan)
    try:
        if old and host.policy.canary_percent > 0 and host.policy.canary_s > 0:
            t = time.perf_counter()
            baseline = canary(host, ports, old.ports)
            host.timings["canary"] = time.perf_counter() - t
        t = time.perf_counter()
        proxy.switch(host.settings, [(ports, 100)])
        host.timings["switch"] = time.perf_counter() - t
    except (CheckError, HostError) as exc:
        if old:
            proxy.switch(host.settings, [(old.ports, 100)])
        supervisor.stop_group(host.settings, bento.version)
        raise exc from None
    new = Slot(bento.version, bento.tag, ports)
    host.log(f"promote: all traffic to version {bento.version}")
    if old:
        drain(host, old.ports)
        supervisor.stop_group(host.settings, old.version)
        host.log(f"stopped version {old.version}")
    write_state(host.home, State(new, old))
    if old and watch_s and host.policy.watch_s > 0:
        try:
            watch(host, ports, baseline)
        except CheckError as exc:
            host.log(f"watch: {exc}; rolling back to version {old.version}")
            back = store.local(host.settings, old.bento, host.params.register_.model_name)
            roll_back_to(host, back, new, str(exc))
            raise
    previous = old.version if old else None
    return Outcome(bento.version, bento.tag, previous, outcome, "", figures, dict(host.timings))


def roll_back_to(host: Host, target: store.Bento, bad: Slot, reason: str) -> None:
    """After a failed watch: `target` started and checked (no canary: it served until a moment
    ago), all traffic to it, `bad` drained and stopped, state and history written."""
    ports, _ = start_checked(host, target, set(bad.ports))
    proxy.switch(host.settings, [(ports, 100)])
    drain(host, bad.ports)
    supervisor.stop_group(host.settings, bad.version)
    write_state(host.home, State(Slot(target.version, target.tag, ports), None))
    record(host.home, bad.version, bad.bento, "rolled back", reason)
    tag_version(host, bad.version, {"rolled_back_at": _now(), "rollback_reason": reason[:500]})


def _now() -> str:
    from inference.state import now

    return now()


def tag_version(host: Host, version: str, tags: dict[str, str]) -> None:
    """Registry version tags, best effort: an unreachable MLflow is logged, never raised."""
    try:
        from mlflow import MlflowClient

        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(host.params.register_.model_name, version, key, value)
    except Exception as exc:  # MLflow down must not fail a deploy or rollback
        host.log(f"registry tags {sorted(tags)} on version {version} not written: {exc}")


def finish(host: Host, bento: store.Bento, run: Callable[[], Outcome]) -> Outcome:
    """Run a rollout, record it in history and the registry tags, prune old bentos."""
    try:
        done = run()
    except CheckError as exc:
        if "watch:" not in str(exc):  # a watch breach was recorded as a rollback
            record(host.home, bento.version, bento.tag, "rejected", str(exc))
        raise
    if done.outcome != "unchanged":
        record(host.home, done.version, done.bento, done.outcome, done.reason)
        tag_version(host, done.version, {"deployed_at": _now()})
        state = read_state(host.home)
        protected = {s.bento for s in (state.current, state.previous) if s}
        for tag in store.prune(host.settings, host.policy.keep_versions, protected):
            host.log(
                f"prune: removed bento {tag} (deploy.keep_versions {host.policy.keep_versions})"
            )
    return done


def deploy(
    params: Params,
    version: str | None = None,
    bento: str | None = None,
    log: Log = print,
    settings: HostSettings | None = None,
) -> Outcome:
    """Deploy registry `version` (default: the champion) or `bento` (an archive path or an
    imported tag) on this host. Raises FetchError (bad input, host unchanged), CheckError (a
    failed check; the running version serves) or InUseError (another deploy holds the host)."""
    from pipelines.lifecycle import exclusive

    settings = settings or host_settings()
    make_home(settings)
    with exclusive(settings.home):
        fetching = Host(settings, params, log)
        before = set(store.imported(settings))
        checked = fetch(fetching, version, bento)  # bad input: nothing started, nothing changed
        try:
            host = open_host(params, log, settings)
        except HostError:
            if checked.tag not in before:
                store.remove(settings, checked.tag)  # nothing changed: not even an import
            raise
        host.timings.update(fetching.timings)
        try:
            return finish(host, checked, lambda: roll_out(host, checked))
        except CheckError:
            if checked.tag not in before and checked.tag not in serving(settings):
                store.remove(settings, checked.tag)  # a rejected candidate leaves no bento
                log(f"removed the rejected bento {checked.tag}")
            raise


def serving(settings: HostSettings) -> set[str]:
    """Bento tags of the current and previous versions (state.json)."""
    state = read_state(settings.home)
    return {s.bento for s in (state.current, state.previous) if s}


def rollback(
    params: Params, to: str | None = None, log: Log = print, settings: HostSettings | None = None
) -> Outcome:
    """Return to the previous version (or registry version `to`, one of the bentos kept here)
    through the same checks and canary. FetchError when there is none to return to."""
    from pipelines.lifecycle import exclusive

    settings = settings or host_settings()
    make_home(settings)
    with exclusive(settings.home):
        state = read_state(settings.home)
        target = to or (state.previous.version if state.previous else None)
        if target is None:
            raise FetchError("rollback: no previous version on this host; name one with --to")
        bento = kept(Host(settings, params, log), target)
        host = open_host(params, log, settings)
        current = state.current
        done = finish(host, bento, lambda: roll_out(host, bento, "rolled back", watch_s=False))
        if current and done.outcome != "unchanged":
            reason = f"manual rollback to version {bento.version}"
            tag_version(
                host, current.version, {"rolled_back_at": _now(), "rollback_reason": reason}
            )
        return done


def kept(host: Host, version: str) -> store.Bento:
    """The imported bento of registry `version`; FetchError naming the kept ones otherwise."""
    versions = {
        t: str((store.labels_of(host.settings, t).get("labels") or {}).get("registry_version"))
        for t in store.imported(host.settings)
    }
    match = [t for t, v in versions.items() if v == version]
    if not match:
        have = sorted(set(versions.values()))
        raise FetchError(f"rollback: version {version} is not kept on this host (kept: {have})")
    return store.local(host.settings, match[-1], host.params.register_.model_name)
