"""The real thing over HTTP: `package` builds a bento from the MLflow champion, `bentoml serve`
runs it in a subprocess, and clients (concurrent, fuzzing, the README's curl examples) call it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flows.package import BENTO_ARTIFACT, BENTO_TAG, GOLDEN, Packaged, package
from flows.register import register
from pipelines.export import export
from pipelines.prepare import read_split
from pipelines.preprocessing import to_model_input
from pipelines.runtime import logits, read_metadata, session, softmax
from pipelines.tracking import start_parent_run
from tests.helpers import REPO
from tests.helpers.modelzoo import trained_model
from tests.helpers.params import tiny_params
from tests.helpers.processes import mlflow_server
from tests.helpers.serving import live_service
from tests.test_register import select_dir

pytestmark = pytest.mark.slow
LEAN_FORBIDDEN = ("torch", "mlflow", "prefect", "dvc", "great-expectations", "great_expectations")


class Champion:
    def __init__(
        self, packaged: Packaged, onnx_path: Path, prepared: Path, mlflow_uri: str, root: Path
    ) -> None:
        self.packaged = packaged
        self.onnx_path = onnx_path
        self.prepared = prepared
        self.mlflow_uri = mlflow_uri
        self.root = root


@pytest.fixture(scope="module")
def champion(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Champion]:
    """A tiny model trained, exported, registered as champion in a fresh MLflow store behind a
    real `mlflow server` (artifacts over HTTP), then packaged by flows.package into a bento
    archive under a temp directory and into MLflow."""
    root = tmp_path_factory.mktemp("champion")
    with mlflow_server(root) as uri, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        params = tiny_params(
            **{"train.epochs": 8, "train.patience": 8, "package.export_to": str(root / "bentos")}
        )
        prepared, model = trained_model(root, params)
        export(params.export, model, prepared, root / "model.onnx")
        parent = start_parent_run(params, root)
        (root / "a").mkdir()
        decision = register(
            params, root, parent, select_dir(root / "a", root / "model.onnx", prepared), prepared
        )
        assert decision.alias == "champion"
        packaged = package(params, REPO)
        yield Champion(packaged, root / "model.onnx", prepared, uri, root)


def test_package_exports_a_lean_bento_of_the_champion(champion: Champion) -> None:
    import bentoml

    archive = Path(champion.packaged.archive)
    assert archive.is_file() and archive.parent.name == "bentos"
    bento = bentoml.get(champion.packaged.bento_tag)
    assert bento.info.labels["registry_version"] == champion.packaged.registry_version
    assert [str(m.tag) for m in bento.info.all_models] == [champion.packaged.model_tag]
    requirements = (Path(bento.path) / "env/python/requirements.txt").read_text().lower()
    assert "onnxruntime" in requirements and "numpy" in requirements and "pillow" in requirements
    assert not [name for name in LEAN_FORBIDDEN if re.search(rf"^{name}\b", requirements, re.M)]
    shipped = {
        p.relative_to(Path(bento.path) / "src").as_posix()
        for p in (Path(bento.path) / "src").rglob("*.py")
    }
    assert "service.py" in shipped and "pipelines/preprocessing.py" in shipped
    assert not {"pipelines/train.py", "flows/train.py"} & shipped


def test_package_puts_the_golden_set_in_the_bento_and_the_archive_in_mlflow(
    champion: Champion, tmp_path: Path
) -> None:
    """The golden set travels inside the archive; the archive is an artifact of the version's run,
    fetched over HTTP from `mlflow server`, and imports as the packaged bento."""
    import bentoml
    from mlflow import MlflowClient

    golden = champion.root / "a" / "select" / GOLDEN
    model = bentoml.models.get(champion.packaged.model_tag)
    assert (Path(model.path) / GOLDEN).read_bytes() == golden.read_bytes()
    client = MlflowClient(champion.mlflow_uri)
    version = client.get_model_version("digits-classifier", champion.packaged.registry_version)
    artifact = version.tags[BENTO_ARTIFACT]
    assert artifact == champion.packaged.artifact
    assert artifact == f"bento/{Path(champion.packaged.archive).name}"
    assert version.tags[BENTO_TAG] == champion.packaged.bento_tag
    assert client.get_run(version.run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    fetched = Path(client.download_artifacts(version.run_id, artifact, str(tmp_path)))
    assert fetched.read_bytes() == Path(champion.packaged.archive).read_bytes()
    with tarfile.open(fetched) as tar:  # the bento's own copy of the model holds the golden set
        names = [n for n in tar.getnames() if n.endswith(f"/{GOLDEN}")]
        assert len(names) == 1, tar.getnames()
        member = tar.extractfile(names[0])
        assert member is not None and member.read() == golden.read_bytes()
        for name in ("reference/reference.json", "reference/features.parquet"):  # the profile
            [packed] = [n for n in tar.getnames() if n.endswith(f"/{name}")]
            member = tar.extractfile(packed)
            expected = (golden.parent / name).read_bytes()
            assert member is not None and member.read() == expected, name


def test_packaging_again_reuses_the_model_and_logs_no_second_archive(champion: Champion) -> None:
    import bentoml
    from mlflow import MlflowClient

    before = [str(m.tag) for m in bentoml.models.list() if m.tag.name == "digits-classifier"]
    params = tiny_params(**{"package.export_to": str(Path(champion.packaged.archive).parent)})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", champion.mlflow_uri)
        again = package(params, REPO)
    assert again.model_tag == champion.packaged.model_tag
    after = [str(m.tag) for m in bentoml.models.list() if m.tag.name == "digits-classifier"]
    assert sorted(after) == sorted(before)
    client = MlflowClient(champion.mlflow_uri)
    version = client.get_model_version("digits-classifier", again.registry_version)
    logged = [f.path for f in client.list_artifacts(version.run_id, "bento")]
    assert logged == [champion.packaged.artifact] == [again.artifact]
    assert version.tags[BENTO_TAG] == champion.packaged.bento_tag


@pytest.fixture(scope="module")
def server(champion: Champion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`bentoml serve <bento tag>`: the bento's own copy of the code and model."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with live_service(champion.packaged.bento_tag, env={"MLOPS_API_KEY": ""}, log=log) as url:
        yield url
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]  # no request may have crashed the server


def test_served_predictions_equal_onnx_runtime_on_the_test_split(
    server: str, champion: Champion
) -> None:
    frame = read_split(champion.prepared, "test")
    rows = frame.drop(columns=["label"]).to_numpy()[:50]
    spec = read_metadata(champion.onnx_path)["preprocessing"]
    expected = softmax(logits(session(champion.onnx_path), to_model_input(rows, spec)))
    response = httpx.post(f"{server}/predict", json={"rows": rows.tolist()}, timeout=30)
    assert response.status_code == 200, response.text
    served = np.array([p["probabilities"] for p in response.json()])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    assert {p["model_version"] for p in response.json()} == {champion.packaged.registry_version}


def concurrent_calls(url: str, champion: Champion) -> None:
    """400 requests of 1-5 rows from 16 threads: zero errors, and each response holds exactly
    its own rows' predictions."""
    frame = read_split(champion.prepared, "test")
    rows = frame.drop(columns=["label"]).to_numpy()
    spec = read_metadata(champion.onnx_path)["preprocessing"]
    expected = softmax(logits(session(champion.onnx_path), to_model_input(rows, spec)))
    requests = [(i % len(rows), 1 + i % 5) for i in range(400)]

    def call(request: tuple[int, int]) -> tuple[int, int, Any]:
        start, n = request
        body = {"rows": rows[start : start + n].tolist()}
        response = client.post(f"{url}/predict", json=body)
        return start, n, (response.status_code, response.json())

    with httpx.Client(timeout=30) as client, ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, requests))
    for start, n, (status, body) in results:
        assert status == 200, body
        got = np.array([p["probabilities"] for p in body])
        assert len(got) == len(rows[start : start + n])
        np.testing.assert_allclose(got, expected[start : start + len(got)], atol=1e-5)


def test_concurrent_clients_get_their_own_answers_with_zero_errors(
    server: str, champion: Champion
) -> None:
    concurrent_calls(server, champion)


@pytest.fixture(scope="module")
def batched_server(champion: Champion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same bento with adaptive batching on: /predict goes through BentoML's own API
    dispatch and batching (with it off, service.DirectPredict answers /predict)."""
    log = tmp_path_factory.mktemp("serve-batched") / "serve.log"
    overrides = {"MLOPS_SERVE_OVERRIDES": json.dumps({"max_batch_size": 64}), "MLOPS_API_KEY": ""}
    with live_service(champion.packaged.bento_tag, env=overrides, log=log) as url:
        yield url
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def batch_counters(url: str) -> tuple[float, float]:
    """(model calls, rows) from BentoML's adaptive batch-size histogram for predict."""
    metrics = httpx.get(f"{url}/metrics").text
    values = []
    for kind in ("count", "sum"):  # absent before the first call
        pattern = rf'adaptive_batch_size_{kind}\{{[^}}]*method_name="predict"[^}}]*\}} (\S+)'
        found = re.search(pattern, metrics)
        values.append(float(found.group(1)) if found else 0.0)
    return values[0], values[1]


def test_adaptive_batching_merges_requests_and_splits_answers_back(
    batched_server: str, champion: Champion
) -> None:
    """With batching on, requests of different sizes share model calls; each still gets exactly
    its own predictions, and BentoML's batch-size histogram shows merged calls."""
    calls, rows = batch_counters(batched_server)
    concurrent_calls(batched_server, champion)
    calls_after, rows_after = batch_counters(batched_server)
    assert rows_after - rows == 400  # every request went through the dispatcher...
    assert calls_after - calls < 400  # ...and some were merged into one call


def test_predict_answers_alike_with_batching_off_and_on(
    server: str, batched_server: str, champion: Champion
) -> None:
    """service.DirectPredict (batching off) and BentoML's API dispatch (batching on) give the same
    status and body for the same request, good or bad, whatever its content type."""
    frame = read_split(champion.prepared, "test")
    good = frame.drop(columns=["label"]).to_numpy()[:3].tolist()
    json_type = {"content-type": "application/json"}
    requests: list[tuple[bytes, dict[str, str]]] = [
        (json.dumps({"rows": good[:1]}).encode(), json_type),
        (json.dumps({"rows": good}).encode(), {"content-type": "application/json; charset=utf-8"}),
        (json.dumps({"rows": good[:1]}).encode(), {"content-type": "text/plain"}),
        (json.dumps({"rows": good[:1]}).encode(), {}),
        (json.dumps({"rows": [[1.0, 2.0]]}).encode(), json_type),
        (json.dumps({"rows": [[0.0] * 63 + [17.0]]}).encode(), json_type),
        (json.dumps({"rows": []}).encode(), json_type),
        (json.dumps({"rows": [["1"] * 64]}).encode(), json_type),
        (json.dumps({"data": good}).encode(), json_type),
        (json.dumps({"rows": good[:1], "threshhold": 0.5}).encode(), json_type),  # unknown key
        (b'{"rows": [[NaN]]}', json_type),
        (b"\xff\xfe garbage", json_type),
        (b"", json_type),
        (b"rows=1", {"content-type": "application/x-www-form-urlencoded"}),
        (b"--x--", {"content-type": "multipart/form-data"}),  # no boundary: once a 500
        (b"--x--", {"content-type": "multipart/form-data; boundary=x"}),
        (json.dumps({"rows": good[:1]}).encode(), {"content-type": "application/json; charset=x"}),
    ]
    with httpx.Client(timeout=30) as client:
        for body, headers in requests:
            direct, dispatched = (
                client.post(f"{url}/predict", content=body, headers=headers)
                for url in (server, batched_server)
            )
            assert direct.status_code == dispatched.status_code, (
                body,
                direct.text,
                dispatched.text,
            )
            assert direct.headers["content-type"] == dispatched.headers["content-type"]
            assert direct.headers.get("server") == dispatched.headers.get("server"), body
            if direct.status_code != 200:
                assert direct.json() == dispatched.json(), body
                continue
            for ours, theirs in zip(direct.json(), dispatched.json(), strict=True):
                assert ours["label"] == theirs["label"]
                assert ours["model_version"] == theirs["model_version"]
                np.testing.assert_allclose(
                    ours["probabilities"], theirs["probabilities"], atol=1e-6
                )


def test_bad_requests_over_http_get_4xx_with_a_message(server: str) -> None:
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/predict", {"json": {"rows": [[1.0, 2.0]]}}, 400, "the model takes 64"),
        ("/predict", {"content": b'{"rows": [[NaN]]}'}, 400, "finite number"),
        ("/predict", {"json": {"rows": []}}, 400, "empty batch"),
        ("/predict", {"json": {"rows": [[0.0] * 64], "threshhold": 1}}, 400, "threshhold"),
        ("/predict", {"content": b" " * 2_000_000}, 413, "request body over"),
        ("/predict", {"content": b"\xff\xfe garbage"}, 400, "Invalid JSON"),
        ("/predict_image", {"files": {"image": ("x.png", b"GIF89a nope")}}, 400, "not a readable"),
        ("/no_such_endpoint", {"json": {}}, 404, ""),
    ]
    headers = {"content-type": "application/json"}
    for path, kwargs, status, message in cases:
        extra = {} if "files" in kwargs or "json" in kwargs else {"headers": headers}
        response = httpx.post(f"{server}{path}", timeout=30, **kwargs, **extra)
        assert response.status_code == status, (path, kwargs, response.text)
        assert message in response.text


@pytest.mark.parametrize(
    ("path", "framing", "expected"),
    [
        ("/predict", "Content-Length: 100", b"Content-Length 100 announced, 10 bytes arrived"),
        ("/predict", "Transfer-Encoding: chunked", b"10 bytes arrived within"),
        (
            "/score_file/submit",
            "Content-Length: 100",
            b"Content-Length 100 announced, 10 bytes arrived",
        ),
    ],
)
def test_a_body_that_stalls_gets_a_408_over_http(
    server: str, path: str, framing: str, expected: bytes
) -> None:
    """Over a real socket: 10 bytes of a body (100 announced, or one chunk of a chunked one),
    then silence. The answer is a 408 naming what arrived, before BentoML's own timer would have
    sent a 504; the service answers the next request as before."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(server)
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    part = b'{"rows": ['
    if "chunked" in framing:
        part = b"a\r\n" + part + b"\r\n"
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(head.encode() + part)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    assert b" 408 " in status_line, answer
    assert b"request body incomplete: " + expected in rest, answer
    good = httpx.post(f"{server}/predict", json={"rows": [[0.0] * 64]}, timeout=10)
    assert good.status_code == 200, good.text


def test_health_readiness_and_metrics(server: str) -> None:
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert httpx.get(f"{server}/readyz").status_code == 200
    metrics = httpx.get(f"{server}/metrics").text
    assert "bentoml_service_request_total" in metrics
    assert 'endpoint="/predict"' in metrics


JSON = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=80,
)
NEAR_VALID = st.lists(
    st.lists(
        st.floats(allow_nan=True, allow_infinity=True)
        | st.integers(-(2**70), 2**70)
        | st.just("1"),
        min_size=62,
        max_size=66,
    ),
    max_size=4,
).map(lambda rows: {"rows": rows})


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=JSON | NEAR_VALID)
def test_fuzzed_json_never_gets_a_5xx(server: str, payload: Any) -> None:
    body = json.dumps(payload, allow_nan=True).encode()
    response = httpx.post(
        f"{server}/predict", content=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code < 500, (payload, response.status_code, response.text)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    data=st.binary(max_size=2048),
    content_type=st.sampled_from(["image/png", "application/octet-stream", "text/plain"]),
)
def test_fuzzed_uploads_never_get_a_5xx(server: str, data: bytes, content_type: str) -> None:
    response = httpx.post(
        f"{server}/predict_image", files={"image": ("f", data, content_type)}, timeout=30
    )
    assert response.status_code < 500, (data[:40], response.status_code, response.text)


@pytest.fixture(scope="module")
def keyed_server(champion: Champion, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Its own BentoML task store: the other server may still be running fuzzed batch tasks, and
    # opening a store another process writes to can fail on SQLite's lock.
    store = tmp_path_factory.mktemp("keyed") / "task_result.db"
    env = {"MLOPS_API_KEY": "k3y", "BENTOML_RESULT_STORE": str(store)}
    with live_service(champion.packaged.bento_tag, env=env) as url:
        yield url


def test_api_key_over_http(keyed_server: str) -> None:
    url = keyed_server
    body = {"rows": [[0.0] * 64]}
    assert httpx.post(f"{url}/predict", json=body).status_code == 401
    assert httpx.get(f"{url}/metadata").status_code == 401
    ok = httpx.post(f"{url}/predict", json=body, headers={"Authorization": "Bearer k3y"})
    assert ok.status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_malformed_uploads_are_refused_and_no_url_is_fetched_by_either_path(
    server: str, batched_server: str
) -> None:
    """Over HTTP, with batching off and on: each malformed upload is a 400 naming the field, and
    the URL sent as text (to a loopback listener) is never fetched."""
    from tests.helpers.uploads import Listener, upload_cases

    listener = Listener()
    headers = {"content-type": "multipart/form-data; boundary=b0undary"}
    try:
        for url in (server, batched_server):
            for case, body, message in upload_cases(listener.url):
                response = httpx.post(f"{url}/predict_image", content=body, headers=headers)
                assert response.status_code == 400, (case, response.text)
                assert message in response.json()["error"], case
    finally:
        listener.close()
    assert listener.hits == []


def schemathesis_run(url: str, workdir: Path, *headers: str) -> subprocess.CompletedProcess[str]:
    """Schemathesis (all checks; examples, coverage and fuzzing phases, 50 examples an operation,
    fixed seed) against `url`/docs.json; valid image uploads:
    tests/helpers/schemathesis_hooks.py."""
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/docs.json"]
    command += ["--checks", "all", "--phases", "examples,coverage,fuzzing", "--max-examples", "50"]
    command += ["--seed", "1", "--workers", "1", "--request-timeout", "20", "--no-color"]
    command += ["--generation-database", "none", *(f"--header={h}" for h in headers)]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "SCHEMATHESIS_HOOKS": "tests.helpers.schemathesis_hooks",
    }
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=240, check=False
    )


def test_schemathesis_finds_nothing_without_an_api_key(server: str, tmp_path: Path) -> None:
    """The OpenAPI document states the service's real contract: every request it admits is
    answered 2xx, every one it refuses a documented 4xx with the documented error body."""
    doc = httpx.get(f"{server}/docs.json").json()
    rows = doc["components"]["schemas"]["predict__Input"]["properties"]["rows"]
    assert (rows["minItems"], rows["maxItems"]) == (1, 256)
    assert rows["items"]["minItems"] == rows["items"]["maxItems"] == 64
    assert (rows["items"]["items"]["minimum"], rows["items"]["items"]["maximum"]) == (0, 16)
    assert doc["components"]["schemas"]["Error"]["properties"]["detail"]["type"] == "array"
    assert "securitySchemes" not in doc["components"]
    run = schemathesis_run(server, tmp_path)
    assert run.returncode == 0, run.stdout[-6000:]
    assert "No issues found" in run.stdout


def test_schemathesis_finds_nothing_with_an_api_key(keyed_server: str, tmp_path: Path) -> None:
    """With MLOPS_API_KEY set the document declares the key (and 401); Schemathesis also checks
    that requests without it are refused."""
    doc = httpx.get(f"{keyed_server}/docs.json").json()
    assert set(doc["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert "401" in doc["paths"]["/predict"]["post"]["responses"]
    run = schemathesis_run(keyed_server, tmp_path, "Authorization: Bearer k3y")
    assert run.returncode == 0, run.stdout[-6000:]
    assert "No issues found" in run.stdout


def readme_examples() -> list[str]:
    """The curl commands of the README's serving section, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Serve the model") :]
    section = section[: section.index("\n## ", 5)]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = []
    for block in blocks:
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("curl"):
                commands.append(command.strip())
    return commands


def test_readme_curl_examples_work_against_a_live_server(server: str, tmp_path: Path) -> None:
    from tests.helpers.images import png

    (tmp_path / "digit.png").write_bytes(png())
    columns = ",".join(f"px_{i}" for i in range(64))
    (tmp_path / "rows.csv").write_text(f"{columns}\n" + ",".join(["0"] * 64) + "\n")
    commands = readme_examples()
    assert len(commands) >= 4
    seen = set()
    for command in commands:
        assert "http://127.0.0.1:3000" in command, command
        run = command.replace("http://127.0.0.1:3000", server)
        out = subprocess.run(
            ["bash", "-c", run],
            check=False,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, (command, out.stderr)
        path = re.search(r"127\.0\.0\.1:3000(/\w+)", command)
        assert path is not None, command
        seen.add(path.group(1))
        if path.group(1) == "/metrics":
            assert "bentoml_service_request_total" in out.stdout
        elif path.group(1) != "/readyz":
            body = json.loads(out.stdout)
            answers = {"/feedback": "request_id", "/score_file": "task_id", "/metadata": "engine"}
            shown = "error" if "error" in out.stdout else answers.get(path.group(1), "label")
            assert shown in json.dumps(body), (command, body)
    assert {"/predict", "/predict_image", "/metadata", "/readyz", "/metrics"} <= seen
