"""Monitoring: monitoring/prometheus.yml, monitoring/rules.yml and the Grafana dashboard.

Fast: the files' structure, `promtool check` on the config, the rules and every dashboard query,
and the rules' unit tests (monitoring/rules_test.yml). Slow: a real `bentoml serve` scraped by a
real Prometheus (Debian's `prometheus` package; .ci/run installs it): the target comes up, the
counters match the requests sent, every dashboard query returns data, every rule evaluates and
the down alert goes pending once the service stops. Every `bentoml_*` name the dashboard and the
rules use must be one the live service exports, so they cannot drift from BentoML.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from tests.helpers import REPO
from tests.helpers.processes import free_port, stop_group
from tests.helpers.serving import live_service, tiny_bento_model

MONITORING = REPO / "monitoring"
CONFIG = MONITORING / "prometheus.yml"
RULES = MONITORING / "rules.yml"
DASHBOARD = MONITORING / "grafana" / "dashboard.json"
PROVISIONING = MONITORING / "grafana" / "provisioning"
PROMETHEUS = Path("/usr/bin/prometheus")  # Debian's `prometheus` package (promtool too)
PROMTOOL = Path("/usr/bin/promtool")
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
FEATURES = 64
SCANNED = "/no-such-path"  # what a scanner probes: a 404 the scrape config drops
T = TypeVar("T")


def debian_tool(path: Path) -> Path:
    """The tool, or a skip naming the package; in CI (where .ci/run installs it) a failure."""
    if path.is_file():
        return path
    message = f"{path} is missing: apt-get install prometheus (.ci/run does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


# --- reading the dashboard and the rules --------------------------------------------------


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana variables) for every panel target."""
    return [(p["title"], t["expr"]) for p in dashboard()["panels"] for t in p["targets"]]


def variable_queries() -> list[str]:
    """The template variables' `label_values(...)` definitions."""
    return [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def all_expressions() -> list[str]:
    return [e for _, e in dashboard_queries()] + variable_queries() + [r["expr"] for r in rules()]


def metric_names(expr: str) -> set[str]:
    """BentoML's series names an expression selects (not recording rules that contain them)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"(?<![\w:])bentoml_\w+(?![\w:(])", bare))


def recorded_names(expr: str) -> set[str]:
    """Recording-rule series an expression selects (`level:metric:operations`)."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    return set(re.findall(r"(?<![\w:])[a-zA-Z_]\w*:[\w:]+", bare))


def as_promql(expr: str, rate_interval: str = "1m") -> str:
    """A dashboard query with Grafana's variables filled in: every template variable matches
    all values, `$__rate_interval` is `rate_interval`."""
    expr = re.sub(r"\$(?:__rate_interval|__interval)\b", rate_interval, expr)
    expr = expr.replace("$__range", "1h")
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_metric_name_parsing() -> None:
    expr = (
        'sum(rate(bentoml_service_request_total{endpoint="bentoml_x"}[1m])) / '
        "service:bentoml_service_request_shed:ratio_rate5m + time()"
    )
    assert metric_names(expr) == {"bentoml_service_request_total"}
    assert recorded_names(expr) == {"service:bentoml_service_request_shed:ratio_rate5m"}


# --- fast: structure and promtool ---------------------------------------------------------


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs), panel["title"]
        for item in (panel, *panel["targets"]):
            assert item["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    for expr in all_expressions():
        used = set(re.findall(r"\$\{?(\w+)\}?", expr)) - GRAFANA_BUILTINS
        assert used <= set(variables), f"undefined variables {used - set(variables)} in {expr}"


def test_dashboard_shows_what_the_service_is_watched_for() -> None:
    names = set().union(*(metric_names(e) for _, e in dashboard_queries()))
    assert names >= {
        "bentoml_service_request_total",
        "bentoml_service_request_duration_seconds_bucket",
        "bentoml_service_request_in_progress",
        "bentoml_service_adaptive_batch_size_bucket",
        "bentoml_service_adaptive_batch_size_sum",
        "bentoml_service_adaptive_batch_size_count",
    }
    exprs = "\n".join(e for _, e in dashboard_queries())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (endpoint, le)" in exprs


def test_recorded_series_are_defined_in_the_rules() -> None:
    defined = {r["record"] for r in rules() if "record" in r}
    used = set().union(*(recorded_names(e) for e in all_expressions()))
    assert used <= defined, f"not recorded by {RULES.name}: {used - defined}"
    assert {r["alert"] for r in rules() if "alert" in r} == {
        "BentoMLServiceDown",
        "BentoMLServerErrors",
        "BentoMLLoadShedding",
    }


def test_scrape_config_and_grafana_provisioning_agree() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    (job,) = (j for j in config["scrape_configs"] if j["job_name"] == "bentoml")
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:3000"]}]
    assert [MONITORING / f for f in config["rule_files"]] == [RULES]
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090"
    assert source["jsonData"]["timeInterval"] == job["scrape_interval"]
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "mlops.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "${MLOPS_GRAFANA_DASHBOARDS}"


def promtool(*args: str | Path) -> str:
    result = subprocess.run(
        [str(debian_tool(PROMTOOL)), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_promtool_checks_the_config_and_the_rules() -> None:
    assert "SUCCESS" in promtool("check", "config", CONFIG)  # checks rules.yml too
    assert "SUCCESS" in promtool("test", "rules", MONITORING / "rules_test.yml")


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query (variables filled in) as a recording rule's expression."""
    queries = [as_promql(e) for _, e in dashboard_queries()]
    queries += [
        re.sub(r"^label_values\((.*), \w+\)$", r"\1", as_promql(q)) for q in variable_queries()
    ]
    group = {
        "name": "dashboard",
        "rules": [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(queries)],
    }
    (tmp_path / "dashboard_rules.yml").write_text(yaml.safe_dump({"groups": [group]}))
    assert f"SUCCESS: {len(queries)} rules found" in promtool(
        "check", "rules", tmp_path / "dashboard_rules.yml"
    )


# --- slow: a real Prometheus scrapes a real `bentoml serve` ---------------------------------


def wait_for(check: Callable[[], T | None], what: str, timeout_s: float = 30.0) -> T:
    """Poll `check` until it returns something other than None (or falsy); fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(httpx.HTTPError):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout_s} s: {what}")
        time.sleep(0.25)


def send_traffic(url: str, good: int, bad: int) -> Counter[tuple[str, int]]:
    """`good` valid and `bad` invalid /predict requests (8 at a time, so batching happens),
    one /metadata and one unknown path; the count of each (path, status) the client saw."""
    row = [float(i % 17) for i in range(FEATURES)]
    calls = [("/predict", {"rows": [row]})] * good + [("/predict", {"rows": [[1.0]]})] * bad

    def post(call: tuple[str, dict[str, Any]]) -> tuple[str, int]:
        return call[0], httpx.post(url + call[0], json=call[1], timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        seen = Counter(pool.map(post, calls))
    for path in ("/metadata", SCANNED):
        seen[path, httpx.get(url + path, timeout=10).status_code] += 1
    assert seen == Counter(
        {
            ("/predict", 200): good,
            ("/predict", 400): bad,
            ("/metadata", 200): 1,
            (SCANNED, 404): 1,
        }
    )
    return seen


def exposed_series(url: str) -> dict[str, set[str]]:
    """The service's own /metrics: sample name -> the endpoints it has series for."""
    from prometheus_client.parser import text_string_to_metric_families

    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            series.setdefault(sample.name, set()).add(sample.labels.get("endpoint", ""))
    return series


def scrape_config(tmp_path: Path, service_url: str) -> Path:
    """A copy of monitoring/prometheus.yml aimed at the live service, every interval 1 s."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(RULES)]
    # The service's job only: the `monitor` job scrapes a Pushgateway this test does not run.
    (job,) = (job for job in config["scrape_configs"] if job["job_name"] == "bentoml")
    config["scrape_configs"] = [job]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [service_url.removeprefix("http://")]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def running_prometheus(config: Path, data: Path) -> Iterator[str]:
    """The real Prometheus on a free loopback port; yields its URL once ready, then stops it."""
    port = free_port()
    log = (data.parent / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            str(debian_tool(PROMETHEUS)),
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if process.poll() is not None:
            tail = (data.parent / "prometheus.log").read_text()[-2000:]
            raise RuntimeError(f"prometheus exited with {process.returncode}:\n{tail}")
        return httpx.get(f"{url}/-/ready").is_success

    try:
        wait_for(ready, "Prometheus ready")
        yield url
    finally:
        stop_group(process)
        log.close()


def api(prometheus: str, path: str, **params: str) -> Any:
    reply = httpx.get(f"{prometheus}/api/v1/{path}", params=params, timeout=10).json()
    assert reply["status"] == "success", reply
    return reply["data"]


def query(prometheus: str, promql: str) -> list[dict[str, Any]]:
    return list(api(prometheus, "query", query=promql)["result"])


def request_counts(prometheus: str) -> dict[tuple[str, int], float]:
    return {
        (r["metric"]["endpoint"], int(r["metric"]["http_response_code"])): float(r["value"][1])
        for r in query(prometheus, "bentoml_service_request_total")
    }


def evaluated_rules(prometheus: str) -> list[dict[str, Any]] | None:
    """The rule groups once every rule has been evaluated without an error."""
    groups: list[dict[str, Any]] = api(prometheus, "rules")["groups"]
    return groups if all(r["health"] == "ok" for g in groups for r in g["rules"]) else None


def target_up(prometheus: str) -> bool:
    targets = api(prometheus, "targets")["activeTargets"]
    return [(t["labels"]["job"], t["health"]) for t in targets] == [("bentoml", "up")]


def check_counters(prometheus: str, sent: Counter[tuple[str, int]], exposed: set[str]) -> None:
    """Prometheus has every request the client saw, under the service's own endpoints; the
    scanned path is dropped at scrape time and no endpoint of the service is."""
    sent = Counter({key: n for key, n in sent.items() if key[0] != SCANNED})

    def scraped() -> dict[tuple[str, int], float] | None:
        counts = request_counts(prometheus)
        return counts if all(counts.get(key, 0) >= n for key, n in sent.items()) else None

    counts = wait_for(scraped, f"Prometheus has the request counters {dict(sent)}")
    assert {key: counts[key] for key in sent} == sent
    series = query(prometheus, 'group by (endpoint) ({__name__=~"bentoml_.+"})')
    assert {r["metric"].get("endpoint", "") for r in series} == exposed - {SCANNED}


def check_dashboard_and_rules(prometheus: str) -> None:
    """Every dashboard query returns data (traffic ones above 0) and every rule evaluates."""
    for title, expr in dashboard_queries():
        result = wait_for(
            lambda e=expr: query(prometheus, as_promql(e)), f"data for {title!r}: {expr}"
        )
        if title in {"Predictions / s", "Client errors (4xx)"}:
            assert float(result[0]["value"][1]) > 0, (title, result)
    groups = wait_for(lambda: evaluated_rules(prometheus), "every rule evaluated")
    assert sum(len(g["rules"]) for g in groups) == len(rules())
    for record in (r["record"] for r in rules() if "record" in r):
        wait_for(lambda r=record: query(prometheus, r), f"{record} is recorded")
    (recorded,) = query(prometheus, "service:bentoml_service_adaptive_batch_size:mean_rate5m")
    assert float(recorded["value"][1]) > 0, recorded
    # The recorded mean is a ratio of two rate()s, each extrapolated on its own over a window
    # that holds only this test's few scrapes, so it can dip below 1 here; the counters cannot.
    (batch,) = query(
        prometheus,
        "sum(bentoml_service_adaptive_batch_size_sum)"
        " / sum(bentoml_service_adaptive_batch_size_count)",
    )
    assert 1 <= float(batch["value"][1]) <= 64, batch


def down_alerts(prometheus: str) -> list[dict[str, Any]]:
    alerts: list[dict[str, Any]] = api(prometheus, "alerts")["alerts"]
    return [a for a in alerts if a["labels"]["alertname"] == "BentoMLServiceDown"]


@pytest.mark.slow
def test_prometheus_scrapes_the_live_service(tmp_path: Path) -> None:
    debian_tool(PROMETHEUS)
    tag, _ = tiny_bento_model(tmp_path / "model")
    with contextlib.ExitStack() as prometheus_running:
        # batching on (off by default): the dashboard's adaptive-batching panels need its series
        batching = json.dumps({"max_batch_size": 64})
        env = {"MLOPS_MODEL_TAG": tag, "MLOPS_SERVE_OVERRIDES": batching}
        with live_service(env=env, log=tmp_path / "serve.log") as url:
            sent = send_traffic(url, good=24, bad=6)
            exposed = exposed_series(url)
            used = set().union(*(metric_names(e) for e in all_expressions()))
            assert used <= set(exposed), f"not exported by the service: {used - set(exposed)}"

            prometheus = prometheus_running.enter_context(
                running_prometheus(scrape_config(tmp_path, url), tmp_path / "tsdb")
            )
            wait_for(lambda: target_up(prometheus), "the bentoml target is up")
            endpoints = set().union(*exposed.values())
            check_counters(prometheus, sent, endpoints)
            # A second round, scraped: rates over the window are now above 0.
            check_counters(prometheus, sent + send_traffic(url, good=16, bad=4), endpoints)
            check_dashboard_and_rules(prometheus)

        # The service has stopped: the next scrape fails and the down alert goes pending.
        (alert,) = wait_for(lambda: down_alerts(prometheus), "BentoMLServiceDown is pending")
        assert alert["state"] == "pending" and alert["labels"]["severity"] == "critical"
