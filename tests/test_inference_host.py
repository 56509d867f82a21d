"""The inference host on one machine (loopback): real supervisord, real nginx, real `bentoml
serve` processes, bentos fetched through an MLflow registry. One host for the module; each test
goes on from the state the one before left (first deploy -> rollout -> rejections -> rollback)."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from inference import proxy, rollout, store, supervisor
from inference.errors import CheckError, FetchError, HostError
from inference.settings import HostSettings, host_settings
from inference.state import history, read_state, state_path
from pipelines.config import Params
from tests.helpers.inference_host import (
    API_KEY,
    MODEL_NAME,
    Load,
    build_bento,
    golden_set,
    host_for,
    register_archive,
    rows_of,
    tiny_graph,
)
from tests.helpers.params import tiny_params

pytestmark = pytest.mark.slow
FAULTY = Path(__file__).parent / "faulty" / "faulty_service.py"
LATE_FAULT = Path(__file__).parent / "faulty" / "late_fault_service.py"
# nginx reloads in one rollout (canary, promote, a rollback's switch back): each closes the load's
# idle keep-alive connection, so at most one unanswered request to send again per reload
RELOADS = 3


@dataclass
class World:
    settings: HostSettings
    params: Params
    archives: dict[str, Path]
    rows: list[list[float]]
    logs: list[str]
    model_dir: Path
    golden: dict

    def log(self, line: str) -> None:
        self.logs.append(line)
        (self.settings.home / "logs").mkdir(parents=True, exist_ok=True)
        with (self.settings.home / "logs" / "test-deploys.log").open("a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    def deploy(self, **kwargs: str) -> rollout.Outcome:
        return rollout.deploy(self.params, log=self.log, settings=self.settings, **kwargs)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("inference-host")
    model_dir, prepared = tiny_graph(root)
    good = golden_set(model_dir, prepared, 40)
    out = root / "archives"
    archives = {
        "1": build_bento(model_dir, good, "1", out),
        "2": build_bento(model_dir, good, "2", out),
        "3": build_bento(
            model_dir, golden_set(model_dir, prepared, 40, wrong_labels=True), "3", out
        ),
        "4": build_bento(model_dir, good, "4", out, service_file=FAULTY),
    }
    for version in ("1", "2"):
        register_archive(archives[version], version, champion=version == "1")
    params = tiny_params(
        **{
            "deploy.replicas": 1,
            "deploy.warmup_requests": 2,
            "deploy.canary_percent": 50,
            "deploy.canary_s": 4,
            "deploy.poll_s": 0.5,
            "deploy.watch_s": 2,
            "deploy.min_requests": 5,
            "deploy.max_p99_ratio": 100,  # a loaded CI box: latency is not what is tested here
            "deploy.max_5xx_ratio": 0.05,
            "deploy.drain_timeout_s": 10,
            "deploy.keep_versions": 3,
            "deploy.golden_min_accuracy": 0.6,  # the tiny graph scores ~0.75 on 40 rows
        }
    )
    settings = host_for(root / "host")
    try:
        yield World(settings, params, archives, rows_of(good), [], model_dir, good)
    finally:
        supervisor.shutdown(settings)
        pidfile = settings.home / "supervisord.pid"
        if pidfile.exists():  # shutdown did not finish: end it (and its children) by its PID
            os.kill(int(pidfile.read_text()), signal.SIGKILL)


def proxied(world: World, path: str = "/predict", key: str | None = API_KEY) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    return httpx.post(
        f"{world.settings.url}{path}", json={"rows": world.rows[:3]}, headers=headers, timeout=30
    )


def test_first_deploy_serves_through_the_proxy(world: World) -> None:
    done = world.deploy()  # the champion: version 1, downloaded through MLflow
    assert (done.version, done.outcome, done.previous) == ("1", "deployed", None)
    assert done.golden["accuracy"] >= world.params.deploy.golden_min_accuracy
    response = proxied(world, key=None)
    assert response.status_code == 401  # the service's key holds through the proxy
    response = proxied(world)
    assert response.status_code == 200, response.text
    assert {p["model_version"] for p in response.json()} == {"1"}
    rid = response.headers["x-request-id"]
    assert len(rid) == 32
    mine = httpx.get(
        f"{world.settings.url}/metadata",
        headers={"x-api-key": API_KEY, "x-request-id": "abc-123"},
        timeout=30,
    )
    assert mine.headers["x-request-id"] == "abc-123"
    access = (world.settings.home / "logs" / "access.log").read_text()
    assert f"rid={rid}" in access and "rid=abc-123" in access and "upstream=127.0.0.1:" in access
    too_big = httpx.post(
        f"{world.settings.url}/predict",
        content=b"x" * (world.params.serve.max_body_bytes + 1),
        headers={"x-api-key": API_KEY},
        timeout=30,
    )
    assert too_big.status_code == 413
    assert "max_body_bytes" in too_big.json()["error"]  # nginx's own errors are JSON too
    state = read_state(world.settings.home)
    assert state.current and state.current.version == "1"
    assert supervisor.groups(world.settings) == ["v1"]


def raw_get(world: World, path: str) -> tuple[int, str, str | None]:
    """GET `path` through the proxy exactly as written (httpx would normalize dot segments), with
    the API key: status, body, X-Request-ID."""
    connection = http.client.HTTPConnection("127.0.0.1", world.settings.port, timeout=30)
    try:
        connection.request("GET", path, headers={"X-API-Key": API_KEY})
        answer = connection.getresponse()
        return answer.status, answer.read().decode(), answer.getheader("X-Request-ID")
    finally:
        connection.close()


def test_an_unknown_path_is_nginxs_404_and_adds_no_series_to_metrics(world: World) -> None:
    """BentoML labels its request metrics by the raw path, 404s included: only proxy.ROUTES may
    reach a version, and each as itself, or every new path would grow /metrics for good."""
    unknown = ["/x1", "/predictx", "/score_file/anything-else", "/predict/../x", "/docs"]
    for path in unknown:
        status, body, rid = raw_get(world, path)
        assert (status, json.loads(body)) == (404, {"error": proxy.NGINX_ERRORS[404]}), path
        assert rid and len(rid) == 32
    for path in ("/x2/../metadata", "//metadata", "/metad%61ta"):  # nginx's /metadata
        status, body, _ = raw_get(world, path)
        assert status == 200 and json.loads(body)["model_version"] == "1", (path, body)
    scraped = httpx.get(f"{world.settings.url}/metrics", timeout=30).text
    endpoints = set(re.findall(r'endpoint="([^"]*)"', scraped))
    assert "/metadata" in endpoints and endpoints <= set(proxy.ROUTES), endpoints


def test_rollout_under_load_drops_no_request(world: World) -> None:
    with Load(world.settings.url, world.rows) as load:
        done = world.deploy(version="2")
        time.sleep(1)
    assert (done.version, done.previous) == ("2", "1")
    assert load.failed == 0, load.failures[:5]
    assert load.retried <= RELOADS, load.retried
    assert load.versions["1"] > 0 and load.versions["2"] > 0
    assert supervisor.groups(world.settings) == ["v2"]  # the old version drained and stopped
    assert "canary: 50% of requests" in "\n".join(world.logs)


def unchanged(world: World) -> tuple[bytes, list[str], list[str]]:
    return (
        state_path(world.settings.home).read_bytes(),
        store.imported(world.settings),
        supervisor.groups(world.settings),
    )


def test_a_failing_golden_set_is_rejected_and_the_old_version_keeps_serving(world: World) -> None:
    before = unchanged(world)
    rejected = pytest.raises(CheckError, match=r"golden set: accuracy 0\.\d+ < deploy\.golden_min")
    with Load(world.settings.url, world.rows) as load, rejected:
        world.deploy(bento=str(world.archives["3"]))
    assert load.failed == 0, load.failures[:5]
    assert load.retried <= RELOADS, load.retried
    assert set(load.versions) == {"2"}
    assert unchanged(world)[0] == before[0] and unchanged(world)[2] == ["v2"]
    assert history(world.settings.home)[-1]["outcome"] == "rejected"


def test_a_candidate_answering_5xx_in_the_canary_is_rolled_back(world: World) -> None:
    with Load(world.settings.url, world.rows) as load:
        with pytest.raises(CheckError, match=r"canary: 5xx share 0\.\d+ .*> limit"):
            world.deploy(bento=str(world.archives["4"]))
        after = load.statuses.total()
        time.sleep(2)
    assert load.statuses[500] > 0  # the fault was real, and the canary saw it
    assert load.versions["2"] > 0 and load.statuses.total() > after
    assert proxied(world).json()[0]["model_version"] == "2"
    assert supervisor.groups(world.settings) == ["v2"]
    assert read_state(world.settings.home).current.version == "2"  # type: ignore[union-attr]


def test_manual_rollback_returns_to_the_previous_version(world: World) -> None:
    with Load(world.settings.url, world.rows) as load:
        done = rollout.rollback(world.params, log=world.log, settings=world.settings)
        time.sleep(1)
    assert (done.version, done.outcome) == ("1", "rolled back")
    assert load.failed == 0, load.failures[:5]
    assert load.retried <= RELOADS, load.retried
    assert proxied(world).json()[0]["model_version"] == "1"
    assert history(world.settings.home)[-1]["outcome"] == "rolled back"


def test_a_killed_serving_process_is_restarted_by_the_supervisor(world: World) -> None:
    program = "v1:v1-r0"
    old = supervisor.pid(world.settings, program)
    assert old > 0
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = supervisor.pid(world.settings, program)
        if new and new != old:
            try:
                if proxied(world).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
        time.sleep(1)
    restarted = supervisor.pid(world.settings, program)
    assert restarted not in (0, old)
    time.sleep(5)  # it stays up: the killed arbiter's orphaned workers no longer hold the port
    assert supervisor.pid(world.settings, program) == restarted
    assert proxied(world).json()[0]["model_version"] == "1"


def alive(pid: int) -> bool:
    """Running: listed and not a zombie (an orphan killed here waits for init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def test_a_killed_supervisord_leaves_no_orphan_holding_the_address(world: World) -> None:
    """SIGKILL of supervisord re-parents its nginx and replicas, still bound to their addresses.
    The next deploy's new supervisord would crash-loop its nginx behind an orphan serving stale
    weights: it kills the orphans first, and the proxy is this host's again."""
    serving = read_state(world.settings.home).current
    assert serving is not None
    old_nginx = supervisor.pid(world.settings, "proxy")
    os.kill(int((world.settings.home / "supervisord.pid").read_text()), signal.SIGKILL)
    time.sleep(1)
    assert alive(old_nginx)  # the orphan: still up, still bound
    rollout.open_host(world.params, world.log, world.settings)
    assert not alive(old_nginx)
    assert supervisor.pid(world.settings, "proxy") not in (0, old_nginx)
    deadline = time.monotonic() + 120  # the version's programs start again under the new one
    while time.monotonic() < deadline and proxied(world).status_code != 200:
        time.sleep(1)
    assert proxied(world).json()[0]["model_version"] == serving.version


def test_a_serving_address_held_by_another_process_is_refused_and_nothing_changes(
    world: World, tmp_path: Path
) -> None:
    """A second host home told to listen where the first one's nginx does: the deploy fails
    naming the address, instead of reporting success behind a proxy that never bound."""
    other = host_settings(
        {
            "MLOPS_SERVING_HOME": str(tmp_path / "other"),
            "MLOPS_SERVING_ADDRESS": world.settings.address,
            "MLOPS_SERVING_PORTS": f"{world.settings.ports[0] + 50}-{world.settings.ports[1]}",
            "MLOPS_API_KEY": API_KEY,
        }
    )
    try:
        with pytest.raises(HostError, match=rf"MLOPS_SERVING_ADDRESS {world.settings.address} "):
            rollout.deploy(world.params, bento=str(world.archives["1"]), settings=other)
        assert store.imported(other) == []  # not even the import stays
        assert not (other.home / "state.json").exists()
        assert proxied(world).status_code == 200  # the first host serves on
    finally:
        supervisor.shutdown(other)


def test_a_home_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    settings = host_for(tmp_path / "file" / "home")
    with pytest.raises(HostError, match=r"MLOPS_SERVING_HOME .*/file/home: cannot create it"):
        rollout.deploy(tiny_params(), bento="x.bento", settings=settings)


def test_bad_inputs_name_the_defect_and_change_nothing(world: World, tmp_path: Path) -> None:
    before = unchanged(world)
    corrupt = tmp_path / "corrupt.bento"
    corrupt.write_bytes(world.archives["1"].read_bytes()[:5000])
    other = tmp_path / "other.bento"
    import tarfile

    (tmp_path / "bento.yaml").write_text("name: another-model\nversion: abc\nlabels: {}\n")
    with tarfile.open(other, "w:gz") as tar:
        tar.add(tmp_path / "bento.yaml", "bento.yaml")
    cases = [
        ({"version": "99"}, rf"{MODEL_NAME} version 99: not in the MLflow registry"),
        ({"bento": str(tmp_path / "missing.bento")}, r"missing\.bento: no such file"),
        ({"bento": str(corrupt)}, r"corrupt\.bento: not a readable bento archive"),
        ({"bento": str(other)}, r"a bento of 'another-model', not 'digits-classifier'"),
        ({"bento": "digits-classifier:nosuch"}, r"digits-classifier:nosuch: not imported"),
    ]
    for kwargs, message in cases:
        with pytest.raises(FetchError, match=message):
            world.deploy(**kwargs)
    with pytest.raises(FetchError, match=r"version 7 is not kept on this host"):
        rollout.rollback(world.params, "7", log=world.log, settings=world.settings)
    assert unchanged(world) == before


def test_a_killed_deploys_leftover_candidate_is_removed_at_the_next_start(world: World) -> None:
    """A deploy killed after starting its candidate leaves a group that state.json does not
    know; the next deploy or rollback removes it first, and the serving version stays."""
    serving = read_state(world.settings.home).current
    assert serving is not None
    leftover = next(t for t in store.imported(world.settings) if t != serving.bento)
    supervisor.start_group(world.settings, "9", leftover, [world.settings.ports[1]])
    assert "v9" in supervisor.groups(world.settings)
    pid = supervisor.pid(world.settings, "v1:v1-r0")
    with Load(world.settings.url, world.rows, max_requests=200, max_s=20) as load:
        rollout.open_host(world.params, world.log, world.settings)
        time.sleep(1)
    assert supervisor.groups(world.settings) == ["v1"]
    assert "v9:v9-r0" not in supervisor.status(world.settings)
    assert supervisor.pid(world.settings, "v1:v1-r0") == pid and load.failed == 0
    assert load.retried <= RELOADS, load.retried


def test_registry_versions_carry_the_hosts_tags(world: World) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    assert "deployed_at" in client.get_model_version(MODEL_NAME, "1").tags
    two = client.get_model_version(MODEL_NAME, "2").tags
    assert "deployed_at" in two and "rolled_back_at" in two
    assert two["rollback_reason"] == "manual rollback to version 1"


def test_a_version_breaking_after_promotion_is_rolled_back_by_the_watch(
    world: World, tmp_path: Path
) -> None:
    """A candidate (next registry version, fetched through MLflow) passes its checks and the
    canary, is promoted, then answers 5xx: the watch window rolls back to the version that served
    before, by itself, and says why in the error, the history, state.json and the registry."""
    from mlflow import MlflowClient

    client = MlflowClient()
    version = str(len(client.search_model_versions(f"name='{MODEL_NAME}'")) + 1)
    archive = build_bento(world.model_dir, world.golden, version, tmp_path, service_file=LATE_FAULT)
    register_archive(archive, version)
    if read_state(world.settings.home).current is None:  # run alone: version 1 serves first
        world.deploy(version="1")
    before = read_state(world.settings.home).current
    assert before is not None and before.version == "1"
    params = world.params.model_copy(
        update={"deploy": world.params.deploy.model_copy(update={"watch_s": 20})}
    )
    promoted: list[float] = []

    def log(line: str) -> None:  # the candidate breaks the moment it takes all traffic
        world.log(line)
        if line.startswith(f"promote: all traffic to version {version}"):
            promoted.append(time.monotonic())
            group = supervisor.group_name(version)
            for i in range(params.deploy.replicas):
                (supervisor.run_home(world.settings, f"{group}-r{i}") / "fault").touch()

    with Load(world.settings.url, world.rows) as load:
        with pytest.raises(CheckError, match=r"watch: 5xx share [01]\.\d+ .*> limit"):
            rollout.deploy(params, version=version, log=log, settings=world.settings)
        back = time.monotonic()
        seen = load.statuses.total()
        time.sleep(2)
    assert promoted and back - promoted[0] < params.deploy.watch_s + 60
    assert load.versions[version] > 0  # it served (canary and after promotion) before it broke
    assert load.statuses[500] > 0  # the fault was real
    assert load.statuses.total() > seen and load.versions["1"] > 0
    assert "watch: " in "\n".join(world.logs) and "rolling back to version 1" in "\n".join(
        world.logs
    )
    event = history(world.settings.home)[-1]
    assert (event["version"], event["outcome"]) == (version, "rolled back")
    assert event["reason"].startswith("watch: 5xx share")
    state = read_state(world.settings.home)
    assert state.current is not None and state.current.version == "1"
    assert supervisor.groups(world.settings) == ["v1"]
    with Load(world.settings.url, world.rows, max_requests=50, max_s=30) as after:
        time.sleep(1)
    assert after.failed == 0 and set(after.versions) == {"1"}, after.failures[:5]
    tags = client.get_model_version(MODEL_NAME, version).tags
    assert "rolled_back_at" in tags and tags["rollback_reason"].startswith("watch: 5xx share")


def test_the_cli_rejects_bad_input_with_one_line_and_exit_2(tmp_path: Path) -> None:
    """`python -m flows.deploy` (a real flow run on a temporary Prefect server): exit 2, the
    defect in the last line, and an empty host stays empty (no supervisord started)."""
    import subprocess
    import sys

    from tests.helpers import REPO

    home = tmp_path / "host"
    env = {**os.environ, "MLOPS_SERVING_HOME": str(home), "MLOPS_API_KEY": API_KEY}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"  # a loaded CI box
    missing = tmp_path / "missing.bento"
    done = subprocess.run(
        [sys.executable, "-m", "flows.deploy", "--bento", str(missing)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()  # Prefect may log its temporary server's stop last
    assert f"error: archive {missing}: no such file" in lines[-2:]
    assert "Traceback" not in done.stderr
    assert not (home / "supervisord.conf").exists()
