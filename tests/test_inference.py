"""The inference host's pure logic: settings, /metrics window arithmetic, nginx upstream
weights, state and history, archive checks; and the deploy path's imports (lean)."""

from __future__ import annotations

import http.client
import http.server
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from inference import metrics, proxy
from inference.errors import FetchError, HostSettingsError
from inference.settings import host_settings
from inference.state import Slot, State, history, read_state, record, write_state
from inference.store import inspect
from tests.helpers import REPO
from tests.helpers.processes import free_port, stop_group

# /metrics as BentoML 1.4 serves it (trimmed): a /predict endpoint with 200s and 500s, a /readyz
# probe that must not count, and the duration histogram.
SAMPLE = (
    """\
# HELP @R_total Multiprocess metric
# TYPE @R_total counter
@R_total{endpoint="/predict",http_response_code="200",@} %(ok)s
@R_total{endpoint="/predict",http_response_code="500",@} %(bad)s
@R_total{endpoint="/readyz",http_response_code="200",@} 999.0
# HELP @R_in_progress Multiprocess metric
# TYPE @R_in_progress gauge
@R_in_progress{endpoint="/predict",@} %(busy)s
# HELP @R_duration_seconds Multiprocess metric
# TYPE @R_duration_seconds histogram
@D_bucket{endpoint="/predict",http_response_code="200",le="0.005",@} %(b1)s
@D_bucket{endpoint="/predict",http_response_code="200",le="0.01",@} %(b2)s
@D_bucket{endpoint="/predict",http_response_code="200",le="+Inf",@} %(b3)s
@D_count{endpoint="/predict",http_response_code="200",@} %(b3)s
@D_sum{endpoint="/predict",http_response_code="200",@} 1.0
""".replace("@D", "bentoml_service_request_duration_seconds")
    .replace("@R", "bentoml_service_request")
    .replace(",@}", ',service_name="digits-classifier",service_version="abc"}')
)


def scrape(ok: float, bad: float, b1: float, b2: float, busy: float = 0) -> metrics.Scrape:
    text = SAMPLE % {"ok": ok, "bad": bad, "busy": busy, "b1": b1, "b2": b2, "b3": ok + bad}
    return metrics.parse(text)


def test_a_scrape_counts_the_prediction_endpoints_only() -> None:
    s = scrape(90, 10, 50, 95, busy=3)
    assert (s.requests, s.errors, s.in_progress) == (100, 10, 3)
    assert s.buckets == {0.005: 50, 0.01: 95, math.inf: 100}


def test_the_window_is_the_delta_of_two_scrapes() -> None:
    before, after = scrape(90, 10, 50, 95), scrape(280, 20, 150, 295)
    w = metrics.window(before, after)
    assert (w.requests, w.errors) == (200, 10)
    assert w.error_share == pytest.approx(0.05)
    # delta buckets: 100 <= 5 ms, 200 <= 10 ms: rank 198 lies at 98/100 of (5 ms, 10 ms]
    assert w.p99_s == pytest.approx(0.005 + 0.005 * 0.98)


def test_a_restarted_replica_counts_from_zero() -> None:
    w = metrics.window(scrape(900, 0, 900, 900), scrape(10, 0, 10, 10))
    assert w.requests == 10


def test_quantile_edge_cases() -> None:
    assert math.isnan(metrics.quantile({}, 0.99))
    assert math.isnan(metrics.quantile({0.1: 0, math.inf: 0}, 0.99))
    assert metrics.quantile({0.1: 0, math.inf: 10}, 0.99) == 0.1  # all above the last bound


def test_breach_judges_5xx_share_additively_and_p99_only_with_enough_requests() -> None:
    stable = metrics.Window(100, 1, 0.010)
    assert metrics.breach(metrics.Window(100, 1, 0.015), stable, 0.01, 2.0, 50) is None
    why = metrics.breach(metrics.Window(100, 5, 0.015), stable, 0.01, 2.0, 50)
    assert why and why.startswith("5xx share 0.050 (5 of 100) > limit 0.020")
    why = metrics.breach(metrics.Window(100, 0, 0.030), stable, 0.01, 2.0, 50)
    assert why and "p99 30.0 ms > limit 20.0 ms" in why
    assert metrics.breach(metrics.Window(10, 0, 0.030), stable, 0.01, 2.0, 50) is None


def test_upstream_weights_split_requests_by_version_whatever_the_replicas() -> None:
    assert proxy.server_weights([([1, 2], 90), ([3], 10)]) == [(1, 9), (2, 9), (3, 2)]
    assert proxy.server_weights([([1], 100), ([2], 0)]) == [(1, 1)]
    text = proxy.render_upstream([([20001], 90), ([20002], 10)])
    assert "server 127.0.0.1:20001 weight=9;" in text and "server 127.0.0.1:20002 weight=1;" in text
    with pytest.raises(ValueError, match="no version"):
        proxy.server_weights([([1], 0)])


def test_nginx_conf_holds_the_body_limit_request_id_and_listen_address(tmp_path: Path) -> None:
    settings = host_settings(
        {"MLOPS_SERVING_HOME": str(tmp_path), "MLOPS_SERVING_ADDRESS": "0.0.0.0:8080"}
    )
    conf = proxy.render_nginx(settings, 123456)
    for line in ("listen 0.0.0.0:8080;", "client_max_body_size 123456;", "daemon off;"):
        assert line in conf
    assert "proxy_set_header X-Request-ID $rid;" in conf and "add_header X-Request-ID $rid" in conf


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (.ci/run installs it)")
def test_nginx_accepts_the_rendered_conf_with_json_errors_and_the_host_id(tmp_path: Path) -> None:
    settings = host_settings({"MLOPS_SERVING_HOME": str(tmp_path)})
    conf = proxy.prepare(settings, 4096, None)
    text = conf.read_text()
    for code in proxy.NGINX_ERRORS:
        assert f"error_page {code} @e{code};" in text
    assert f'return 200 "{proxy.host_id(settings)}"' in text
    assert proxy.host_id(settings) == proxy.host_id(settings)  # made once
    checked = subprocess.run(
        ["nginx", "-t", "-q", "-c", str(conf), "-e", str(tmp_path / "logs" / "e.log")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


def test_nginx_forwards_only_the_services_routes_and_answers_the_rest_404(tmp_path: Path) -> None:
    conf = proxy.render_nginx(host_settings({"MLOPS_SERVING_HOME": str(tmp_path)}), 4096)
    forwarded = re.findall(r"location = (\S+) \{ proxy_pass http://versions(\S+); \}", conf)
    assert forwarded == [(path, path) for path in proxy.ROUTES]  # each sends its own path
    assert conf.count("proxy_pass ") == len(proxy.ROUTES)
    assert "location / { return 404; }" in conf and "error_page 404 @e404;" in conf


def served_paths(app: Any) -> set[str]:
    """Every path a Starlette app answers: its routes, those of apps mounted at "/", and each file
    of a mounted StaticFiles directory."""
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    paths: set[str] = set()
    for route in app.routes:
        if isinstance(route, Route):
            paths.add(route.path)
        elif isinstance(route, Mount) and isinstance(route.app, StaticFiles):
            folder = Path(str(route.app.directory))
            paths |= {f"{route.path}/{f.name}" for f in folder.iterdir() if f.is_file()}
        elif hasattr(route, "app") and hasattr(route.app, "routes"):  # BentoML's PassiveMount
            assert route.path in ("", "/"), route.path
            paths |= served_paths(route.app)
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return paths


def test_the_proxys_routes_are_the_ones_the_service_answers(service_client: Any) -> None:
    """proxy.ROUTES is the app BentoML builds from service.py, route for route: a new endpoint
    (or a BentoML upgrade that moves one) fails here, not as a 404 behind nginx."""
    assert sorted(proxy.ROUTES) == sorted(served_paths(service_client.app))
    assert len(set(proxy.ROUTES)) == len(proxy.ROUTES)
    documented = service_client.get("/docs.json").json()["paths"]
    assert set(documented) <= set(proxy.ROUTES)


class Recorder(http.server.BaseHTTPRequestHandler):
    """An upstream that answers 200 to anything and keeps the request line's path it got."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def raw_get(port: int, path: str) -> tuple[int, str, str | None]:
    """GET `path` exactly as written (no client normalizes it): status, body, X-Request-ID."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        answer = connection.getresponse()
        return answer.status, answer.read().decode(), answer.getheader("X-Request-ID")
    finally:
        connection.close()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (.ci/run installs it)")
def test_nginx_sends_a_route_upstream_as_itself_and_nothing_else(tmp_path: Path) -> None:
    """A real nginx from the rendered conf in front of a recording upstream: a route reaches it
    as the route whatever the client wrote (dot segments, doubled slashes, escapes), with its
    query; any other path is nginx's JSON 404 with a request id, and reaches nothing."""
    upstream = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    settings = host_settings(
        {"MLOPS_SERVING_HOME": str(tmp_path), "MLOPS_SERVING_ADDRESS": f"127.0.0.1:{free_port()}"}
    )
    conf = proxy.prepare(settings, 4096, [([upstream.server_address[1]], 100)])
    command = ["nginx", "-c", str(conf), "-e", str(tmp_path / "logs" / "nginx-error.log")]
    nginx = subprocess.Popen(command, start_new_session=True)
    try:
        proxy.verify(settings)
        Recorder.seen.clear()
        for path in ("/predict", "/x1/../predict?a=1", "//metadata", "/pred%69ct", "/"):
            assert raw_get(settings.port, path)[0] == 200, path
        assert Recorder.seen == ["/predict", "/predict?a=1", "/metadata", "/predict", "/"]
        unknown = ["/x1", "/predictx", "/predict/", "/predict/../x", "/score_file/anything-else"]
        unknown += ["/predict%0A", "/static_content/x.js", "/docs", "/metadata/x"]
        for path in unknown:
            status, body, rid = raw_get(settings.port, path)
            assert (status, json.loads(body)) == (404, {"error": proxy.NGINX_ERRORS[404]}), path
            assert rid and len(rid) == 32
        assert len(Recorder.seen) == 5  # none of them reached the upstream
    finally:
        stop_group(nginx, grace_s=5)
        upstream.shutdown()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "MLOPS_SERVING_HOME is not set"),
        ({"MLOPS_SERVING_HOME": "rel/dir"}, "MLOPS_SERVING_HOME='rel/dir': must be an absolute"),
        ({"MLOPS_SERVING_ADDRESS": "3000"}, "MLOPS_SERVING_ADDRESS='3000': expected host:port"),
        ({"MLOPS_SERVING_ADDRESS": "h:99999"}, "'99999' is no port"),
        ({"MLOPS_SERVING_PORTS": "30000"}, "MLOPS_SERVING_PORTS='30000': expected a range"),
        ({"MLOPS_SERVING_PORTS": "3-2"}, "the range is empty"),
        ({"MLOPS_NGINX": "/no/nginx"}, "MLOPS_NGINX: /no/nginx is not an executable"),
    ],
)
def test_bad_host_settings_name_the_variable(env: dict[str, str], message: str) -> None:
    full = {"MLOPS_SERVING_HOME": "/srv/mlops", **env} if "MLOPS_SERVING_HOME" not in env else env
    if not env:
        full = {}
    with pytest.raises(HostSettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        host_settings(full)


def test_state_and_history_round_trip(tmp_path: Path) -> None:
    assert read_state(tmp_path) == State()
    state = State(Slot("2", "m:b", [20001]), Slot("1", "m:a", [20000]))
    write_state(tmp_path, state)
    assert read_state(tmp_path) == state and state.versions() == {"1", "2"}
    record(tmp_path, "2", "m:b", "deployed")
    record(tmp_path, "3", "m:c", "rejected", "golden set: accuracy 0.1 < 0.9")
    events = history(tmp_path)
    assert [e["outcome"] for e in events] == ["deployed", "rejected"]
    assert events[1]["reason"].startswith("golden set") and events[1]["time"].endswith("+00:00")


def archive(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:xz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


GOLDEN = json.dumps({"rows": [[0.0]], "labels": [1], "probabilities": [[0, 1]], "predictions": [1]})
YAML = (
    "name: digits-classifier\nversion: abc\n"
    "labels: {registry_version: '4', model: 'digits-classifier:m1'}\n"
)


def test_an_archive_is_checked_before_import(tmp_path: Path) -> None:
    good = archive(
        tmp_path / "a.bento",
        {"bento.yaml": YAML, "models/digits-classifier/m1/golden.json": GOLDEN},
    )
    bento = inspect(good, "digits-classifier", "4")
    assert (bento.tag, bento.version, bento.model_tag) == (
        "digits-classifier:abc",
        "4",
        "digits-classifier:m1",
    )
    cases = [
        (archive(tmp_path / "b.bento", {"bento.yaml": YAML}), "holds no golden.json"),
        (archive(tmp_path / "c.bento", {"x": "y"}), "no bento.yaml"),
        (
            archive(
                tmp_path / "d.bento",
                {"bento.yaml": YAML, "models/digits-classifier/m1/golden.json": "{"},
            ),
            "golden.json is not JSON",
        ),
    ]
    for path, message in cases:
        with pytest.raises(FetchError, match=message):
            inspect(path, "digits-classifier")
    with pytest.raises(FetchError, match="holds registry version '4', not '5'"):
        inspect(good, "digits-classifier", "5")
    with pytest.raises(FetchError, match="a bento of 'digits-classifier', not 'other'"):
        inspect(good, "other")
    (tmp_path / "junk.bento").write_bytes(b"\x00" * 100)
    with pytest.raises(FetchError, match=r"junk\.bento: not a readable bento archive"):
        inspect(tmp_path / "junk.bento", "digits-classifier")


def test_the_deploy_path_imports_nothing_of_the_training_stack() -> None:
    """flows.deploy, flows.rollback and inference.rollout loaded in a fresh interpreter: no
    torch, DVC or Great Expectations module, and pickle's loaders never called."""
    code = (
        "import pickle, sys\n"
        "def refuse(*a, **k): raise SystemExit('unpickled')\n"
        "pickle.load = pickle.loads = refuse\n"
        "import flows.deploy, flows.rollback, inference.rollout\n"
        "heavy = {'torch', 'dvc', 'great_expectations'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_version_is_one_supervisor_group_of_replicas_on_loopback(tmp_path: Path) -> None:
    from inference import supervisor

    settings = host_settings({"MLOPS_SERVING_HOME": str(tmp_path), "MLOPS_API_KEY": "k"})
    text = supervisor.render_group(settings, "1.2", "digits-classifier:abc", [20001, 20002], "m:1")
    assert "[group:v1_2]\nprograms=v1_2-r0,v1_2-r1" in text
    assert "inference/serve.py digits-classifier:abc --host 127.0.0.1 --port 20002" in text
    assert f'BENTOML_HOME="{tmp_path}/run/v1_2-r1"' in text and 'MLOPS_API_KEY="k"' in text
    assert text.count("autorestart=true") == 2 and text.count('MLOPS_MODEL_TAG="m:1"') == 2
    assert f'MLOPS_LOG_DIR="{tmp_path}/predictions/v1_2/v1_2-r1"' in text  # its own log
