"""What the service keeps of what it serves (issue 16): the sampled prediction log, request ids,
POST /feedback and batch scoring, in-process (BentoML's ASGI app, Starlette's test client), and
the log writer itself (pipelines/prediction_log.py)."""

from __future__ import annotations

import errno
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from pipelines.prediction_log import PredictionLog, read_lines, read_predictions
from pipelines.prepare import read_split
from tests.helpers.images import digit_image, encoded

LOG = {"X-Log-Request": "1"}


def lines(folder: Path, kind: str = "predictions") -> list[dict[str, Any]]:
    """Every JSON line of `kind`'s files in `folder`, oldest file first, as written."""
    return read_lines(folder, f"{kind}*.jsonl*")


def written(log: PredictionLog, folder: Path, columns: list[str]) -> list[dict[str, Any]]:
    """The prediction log's rows, read back as the monitor reads them (one record per row)."""
    log.close()  # writes out the queue
    return read_predictions(folder, columns)


def bodies(rows: list[list[float]], labels: list[int], top: list[float]) -> tuple[bytes, bytes]:
    """A /predict request body and its response body (two classes), as the service sends."""
    answers = [
        {"label": k, "probabilities": [p, 1 - p], "model_version": "7"}
        for k, p in zip(labels, top, strict=True)
    ]
    return json.dumps({"rows": rows}).encode(), json.dumps(answers).encode()


# --- the writer ---------------------------------------------------------------------------------


def test_logging_off_writes_nothing_not_even_a_folder(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path / "logs", 0.0, 4096, 2)
    assert not any(log.sampled() for _ in range(1000))
    log.close()
    assert not (tmp_path / "logs").exists()


def test_sampling_follows_the_fraction(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, 0.1, 4096, 2, seed=0)
    share = np.mean([log.sampled() for _ in range(20_000)])
    assert 0.09 < share < 0.11


def test_the_log_never_grows_past_its_cap(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, 1.0, 4096, 2)
    columns = [f"x{i}" for i in range(8)]
    row = [float(i) for i in range(8)]
    request, response = bodies([row, row], [1, 0], [0.9, 0.4])
    for i in range(500):
        log.served(f"r{i}", "7", response, request=request)
    kept = written(log, tmp_path, columns)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["predictions-w1.jsonl", "predictions-w1.jsonl.1", "predictions-w1.jsonl.2"]
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    assert kept[-1] == {
        "request_id": "r499",
        "row": 1,
        "timestamp": kept[-1]["timestamp"],
        "model_version": "7",
        "features": dict(zip(columns, row, strict=True)),
        "prediction": 0,
        "confidence": 0.6,
    }
    assert kept[-1]["timestamp"].endswith("+00:00")
    ids = [int(line["request_id"][1:]) for line in kept]
    assert ids == sorted(ids) and len(kept) < 1000  # the newest rows, oldest rotated away
    assert len(lines(tmp_path)) * 2 == len(kept)  # one line per request, one record per row


def test_a_request_is_one_line_spliced_from_its_bodies_as_sent(tmp_path: Path) -> None:
    """The bodies go into the line unparsed; a pretty-printed body (line breaks as JSON
    whitespace) still makes one line; features given instead of a body are kept per row."""
    log = PredictionLog(tmp_path, 1.0, 1 << 20, 2)
    request = b'{\n  "rows": [[1.5, 2],\r\n [3, 4]]\n}'
    response = bodies([[0, 0], [0, 0]], [1, 0], [0.8, 0.3])[1]
    log.served("a", "7", response, request=request)
    log.served("b", "7", response, features=[{"m": 0.5}, {"m": 0.25}])
    kept = written(log, tmp_path, ["p", "q"])
    assert len((tmp_path / "predictions-w1.jsonl").read_text().splitlines()) == 2
    assert [(r["request_id"], r["row"], r["features"], r["prediction"]) for r in kept] == [
        ("a", 0, {"p": 1.5, "q": 2}, 1),
        ("a", 1, {"p": 3, "q": 4}, 0),
        ("b", 0, {"m": 0.5}, 1),
        ("b", 1, {"m": 0.25}, 0),
    ]
    assert [r["confidence"] for r in kept] == [0.8, 0.7, 0.8, 0.7]
    assert lines(tmp_path)[0]["response"] == json.loads(response)
    with pytest.raises(ValueError, match="one of the two"):
        log.served("c", "7", response)


def test_a_body_in_utf_8_is_kept_whatever_the_locale(tmp_path: Path) -> None:
    """BentoML's own dispatch sends UTF-8 (not ASCII escapes): a label like "café" survives."""
    log = PredictionLog(tmp_path, 1.0, 1 << 20, 2)
    answer = [{"label": "café", "probabilities": [0.9, 0.1], "model_version": "7"}]
    log.served("u", "7", json.dumps(answer, ensure_ascii=False).encode(), features=[{"m": 1.0}])
    [row] = written(log, tmp_path, ["m"])
    assert row["prediction"] == "café" and log.dropped.count == 0


def test_a_log_of_another_model_is_named_not_misread(tmp_path: Path) -> None:
    from pipelines.prediction_log import LogError

    log = PredictionLog(tmp_path, 1.0, 1 << 20, 2)
    request, response = bodies([[1.0, 2.0, 3.0]], [1], [0.9])
    log.served("wide", "7", response, request=request)
    log.close()
    with pytest.raises(LogError, match=r"request wide: a logged row of 3 values.*2 columns"):
        read_predictions(tmp_path, ["p", "q"])


def test_a_full_disk_drops_records_and_never_raises(tmp_path: Path) -> None:
    log = PredictionLog(tmp_path, 1.0, 1 << 20, 2)
    request, response = bodies([[1.0]], [1], [0.9])
    log.served("first", "1", response, request=request)
    log.close()

    class Full:
        def write(self, text: str) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            pass

        def tell(self) -> int:
            return 0

        def seek(self, *args: Any) -> int:
            return 0

        def close(self) -> None:
            pass

    writer = log.writers["predictions"]
    writer.stream = Full()  # type: ignore[assignment]
    for i in range(50):
        log.served(f"r{i}", "1", response, request=request)
    log.listener.stop()
    log.started = False
    assert log.dropped.count == 50
    assert [line["request_id"] for line in lines(tmp_path)] == ["first"]


# --- the service ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(bento_model: tuple[str, Path]) -> tuple[str, Path]:
    return bento_model


@pytest.fixture(scope="module")
def client(service_client: TestClient) -> TestClient:
    """The service in-process: the one app of the test process (conftest's service_client)."""
    return service_client


@pytest.fixture
def log_dir(client: TestClient, tmp_path: Path) -> Iterator[Path]:
    """The running service's prediction log, for one test: every request logged, in tmp_path."""
    import service

    running = service.running_service()
    saved = running.prediction_log
    running.prediction_log = PredictionLog(tmp_path, 1.0, 1 << 20, 2)
    yield tmp_path
    running.prediction_log.close()
    running.prediction_log = saved


def test_every_response_carries_a_request_id(client: TestClient, model: tuple[str, Path]) -> None:
    rows = read_split(model[1], "test").drop(columns=["label"]).to_numpy()[:2].tolist()
    first = client.post("/predict", json={"rows": rows})
    second = client.post("/predict", json={"rows": rows})
    assert first.status_code == 200
    assert len(first.headers["x-request-id"]) == 32
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    mine = client.post("/predict", json={"rows": rows}, headers={"X-Request-ID": "order-17:a"})
    assert mine.headers["x-request-id"] == "order-17:a"
    bad = client.post("/predict", json={"rows": rows}, headers={"X-Request-ID": "a b"})
    assert bad.status_code == 400 and "X-Request-ID" in bad.json()["error"]
    refused = client.post("/predict", json={"rows": []})
    assert refused.status_code == 400 and "x-request-id" in refused.headers


def test_a_logged_request_reads_back_as_one_record_per_row_with_what_was_served(
    client: TestClient, model: tuple[str, Path], log_dir: Path
) -> None:
    import service

    rows = read_split(model[1], "test").drop(columns=["label"]).to_numpy()[:3].tolist()
    answer = client.post("/predict", json={"rows": rows}, headers={"X-Request-ID": "q1"})
    client.post("/predict", json={"rows": []})  # refused: never logged
    served = answer.json()
    columns = service.running_service().log_columns
    kept = written(service.running_service().prediction_log, log_dir, columns)
    assert [(line["request_id"], line["row"]) for line in kept] == [("q1", 0), ("q1", 1), ("q1", 2)]
    assert len(lines(log_dir)) == 1  # one line per request
    for line, row, prediction in zip(kept, rows, served, strict=True):
        assert line["features"] == dict(zip(columns, row, strict=True))
        assert line["prediction"] == prediction["label"]
        assert line["confidence"] == pytest.approx(max(prediction["probabilities"]))
        assert line["model_version"] == prediction["model_version"]


def test_an_image_request_logs_the_row_the_model_saw(client: TestClient, log_dir: Path) -> None:
    import service
    from pipelines.preprocessing import image_to_rows

    image = encoded(digit_image(np.array([0, 0, 5, 13, 9, 1, 0, 0] * 8, np.float64)), "PNG")
    answer = client.post("/predict_image", files={"image": ("d.png", image, "image/png")})
    assert answer.status_code == 200, answer.text
    running = service.running_service()
    [line] = written(running.prediction_log, log_dir, running.log_columns)
    row = image_to_rows(image, running.spec)[0]
    assert line["request_id"] == answer.headers["x-request-id"]
    assert list(line["features"].values()) == pytest.approx(row.tolist())
    assert line["prediction"] == answer.json()[0]["label"]


def test_with_the_fraction_at_zero_even_a_forced_request_is_not_logged(
    client: TestClient, model: tuple[str, Path], tmp_path: Path
) -> None:
    import service

    running = service.running_service()
    saved = running.prediction_log
    running.prediction_log = PredictionLog(tmp_path / "off", 0.0, 4096, 2)
    try:
        rows = read_split(model[1], "test").drop(columns=["label"]).to_numpy()[:2].tolist()
        for _ in range(20):
            assert client.post("/predict", json={"rows": rows}, headers=LOG).status_code == 200
        running.prediction_log.close()
    finally:
        running.prediction_log = saved
    assert not (tmp_path / "off").exists()


def test_feedback_joins_the_log_and_wrong_labels_lower_accuracy_as_expected(
    client: TestClient, model: tuple[str, Path], log_dir: Path
) -> None:
    """20 logged requests of 5 rows; feedback gives the true labels, except that for 6 requests
    every label is replaced by a wrong one: accuracy from joining the two logs is the served
    accuracy on the 14 honest requests, and counts the 6 as all wrong."""
    import service

    frame = read_split(model[1], "test")
    x, y = frame.drop(columns=["label"]).to_numpy(), frame["label"].to_numpy()
    labels = service.running_service().labels
    correct = []
    for i in range(20):
        batch = slice(5 * i, 5 * i + 5)
        answer = client.post("/predict", json={"rows": x[batch].tolist()}, headers=LOG)
        truth = [int(v) for v in y[batch]]
        served = [p["label"] for p in answer.json()]
        wrong = i < 6
        if wrong:  # a label that is neither the truth nor what was served
            truth = [
                next(k for k in labels if k not in (t, s))
                for t, s in zip(truth, served, strict=True)
            ]
        correct += [int(t == s) for t, s in zip(truth, served, strict=True)]
        body = {"request_id": answer.headers["x-request-id"], "labels": truth}
        response = client.post("/feedback", json=body)
        assert response.status_code == 200 and response.json()["rows"] == 5
    running = service.running_service()
    predictions = written(running.prediction_log, log_dir, running.log_columns)
    feedback = lines(log_dir, "feedback")
    by_row = {(p["request_id"], p["row"]): p["prediction"] for p in predictions}
    joined = [by_row[(f["request_id"], f["row"])] == f["label"] for f in feedback]
    assert len(joined) == 100 and correct[:30] == [0] * 30
    assert np.mean(joined) == pytest.approx(np.mean(correct))
    assert np.mean(joined) <= 0.7  # 30 of 100 rows are labelled wrong


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"request_id": "r1", "labels": [99]}, "labels[0]: unknown label 99"),
        ({"request_id": "r1", "labels": [1, "1"]}, "labels[1]: unknown label '1'"),
        ({"request_id": "r1", "labels": [True]}, "labels.0"),
        ({"request_id": "r 1", "labels": [1]}, "request_id"),
        ({"request_id": "r1", "labels": []}, "labels"),
        ({"labels": [1]}, "request_id: Field required"),
        ({"request_id": "r1", "labels": [1], "x": 1}, "x: Extra inputs"),
    ],
)
def test_bad_feedback_gets_a_400_naming_the_problem(
    client: TestClient, body: dict[str, Any], message: str
) -> None:
    response = client.post("/feedback", json=body)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]


def test_feedback_and_batch_scoring_need_the_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import service

    monkeypatch.setenv(service.API_KEY_ENV, "k3y")

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    paths = ["/feedback", "/score_file/submit", "/score_file/get", "/healthz"]
    inner = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in paths])
    guarded = TestClient(service.Guard(inner, max_body=1024, max_batch_body=4096))
    for path in paths[:3]:
        assert guarded.post(path, content=b"{}").status_code == 401
        assert guarded.post(path, headers={"X-API-Key": "k3y"}).status_code == 200
    assert guarded.get("/healthz").status_code == 200
    key = {"X-API-Key": "k3y"}
    assert guarded.post("/feedback", content=b"x" * 2000, headers=key).status_code == 413
    assert guarded.post("/score_file/submit", content=b"x" * 2000, headers=key).status_code == 200
    assert guarded.post("/score_file/submit", content=b"x" * 5000, headers=key).status_code == 413


def csv_file(columns: list[str], rows: list[list[float]], extra: bool = True) -> bytes:
    header = ["id", *columns] if extra else columns
    body = [
        [str(i), *map(str, row)] if extra else list(map(str, row)) for i, row in enumerate(rows)
    ]
    return "\n".join(",".join(r) for r in [header, *body]).encode()


@pytest.fixture(scope="module")
def server(model: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`bentoml serve` of service.py with the module's model (BentoML's task store is made by
    `bentoml serve`, not by the in-process app); its log directory is `<url>/../logs`."""
    from tests.helpers.serving import live_service

    base = tmp_path_factory.mktemp("live")
    env = {"MLOPS_MODEL_TAG": model[0], "MLOPS_LOG_DIR": str(base / "logs"), "MLOPS_API_KEY": ""}
    with live_service(env=env, log=base / "serve.log") as url:
        yield url
    text = (base / "serve.log").read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


def run_task(url: str, content: bytes) -> tuple[str, httpx.Response]:
    """Submit a file to /score_file/submit, wait for the task; (its status, the result)."""
    files = {"file": ("rows.csv", content, "text/csv")}
    submitted = httpx.post(f"{url}/score_file/submit", files=files, timeout=30)
    assert submitted.status_code == 200, submitted.text
    task = {"task_id": submitted.json()["task_id"]}
    deadline = time.monotonic() + 60
    while (status := httpx.get(f"{url}/score_file/status", params=task).json())["status"] in {
        "pending",
        "in_progress",
    }:
        assert time.monotonic() < deadline, "the task did not finish"
        time.sleep(0.1)
    return status["status"], httpx.get(f"{url}/score_file/get", params=task, timeout=30)


@pytest.mark.slow
def test_a_batch_jobs_results_equal_predicts(server: str, model: tuple[str, Path]) -> None:
    frame = read_split(model[1], "test")
    columns = [c for c in frame.columns if c != "label"]
    rows = frame[columns].to_numpy()[:300].tolist()
    status, result = run_task(server, csv_file(columns, rows))
    assert status == "completed", result.text[:500]
    expected = []
    for start in range(0, 300, 100):
        batch = {"rows": rows[start : start + 100]}
        expected += httpx.post(f"{server}/predict", json=batch, timeout=30).json()
    assert result.json() == expected


def edited(columns: list[str], line: int, cell: int | None, value: str) -> bytes:
    """A valid 2-row CSV with one cell (or, with `cell` None, a whole line) replaced."""
    text = csv_file(columns, [[0.0] * len(columns)] * 2, extra=False).decode().splitlines()
    if cell is None:
        text[line - 1] = value
    else:
        cells = text[line - 1].split(",")
        cells[cell] = value
        text[line - 1] = ",".join(cells)
    return "\n".join(text).encode()


@pytest.mark.slow
def test_a_bad_file_fails_the_job_with_a_reason(server: str, model: tuple[str, Path]) -> None:
    columns = [c for c in read_split(model[1], "test").columns if c != "label"]
    cases = [
        (b"\xff\xfe", "not UTF-8"),
        (b"a,b\n1,2\n", f"the header has no column(s) ['{columns[0]}'"),
        (b"", "the header has no column(s)"),
        (edited(columns, 3, 5, "x"), f"line 3, column '{columns[5]}': 'x' is not a number"),
        (edited(columns, 2, None, "1,2,3"), "line 2: 3 fields"),
        (edited(columns, 2, 0, "99"), f"line 2, column '{columns[0]}': 99 is not a finite"),
        (edited(columns, 3, 1, "nan"), f"line 3, column '{columns[1]}': nan is not a finite"),
    ]
    for content, message in cases:
        status, result = run_task(server, content or b"\n")
        assert status == "failed", (message, result.text[:500])
        assert result.status_code == 400 and message in result.json()["error"], result.text


@pytest.mark.slow
def test_a_served_request_is_logged_by_the_real_server(
    server: str, model: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    features = read_split(model[1], "test").drop(columns=["label"])
    rows = features.to_numpy()[:2].tolist()
    answer = httpx.post(f"{server}/predict", json={"rows": rows}, headers=LOG, timeout=30)
    request_id = answer.headers["x-request-id"]
    folder = next(tmp_path_factory.getbasetemp().glob("live*/logs"))
    deadline = time.monotonic() + 30
    while not [x for x in lines(folder) if x["request_id"] == request_id]:
        assert time.monotonic() < deadline, "the request never reached the log"
        time.sleep(0.2)
    columns = [str(c) for c in features.columns]
    kept = [x for x in read_predictions(folder, columns) if x["request_id"] == request_id]
    assert [x["prediction"] for x in kept] == [p["label"] for p in answer.json()]
    assert {p.name for p in folder.iterdir()} >= {"predictions-w1.jsonl"}


def test_the_openapi_document_describes_feedback_and_batch_scoring(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = client.get("/docs.json").json()
    schemas = doc["components"]["schemas"]
    assert set(schemas["feedback__Input"]["required"]) == {"request_id", "labels"}
    assert schemas["score_file__Input"]["required"] == ["file"]
    for path in ("/feedback", "/score_file", "/score_file/submit"):
        [operation] = doc["paths"][path].values()
        assert {"200", "400", "413"} <= set(operation["responses"]), path
    refs = json.dumps(doc)
    assert "#/components/schemas/NotFound" not in refs  # no dangling reference
    monkeypatch.setenv("MLOPS_API_KEY", "k3y")
    keyed = client.get("/docs.json").json()
    for path in ("/feedback", "/score_file/submit", "/score_file/get"):
        for operation in keyed["paths"][path].values():
            assert operation["security"] == [{"bearer": []}, {"apiKey": []}], path


def test_lines_of_neither_form_are_skipped_and_the_rest_read(tmp_path: Path) -> None:
    """A request line, an older per-row line, and lines of neither form (no response and no
    features; a null request; rows and answers of different lengths): the first two read back,
    the others are skipped, whatever the monitor is then given."""
    from pipelines.prediction_log import read_predictions

    answer = {"label": 1, "probabilities": [0.2, 0.8]}
    good = {"request_id": "a", "timestamp": "t", "model_version": "1"}
    lines = [
        good | {"request": {"rows": [[1.0, 2.0]]}, "response": [answer]},
        {"request_id": "b", "row": 0, "features": {"x": 3.0, "y": 4.0}, "prediction": 0},
        {"request_id": "c", "timestamp": "t"},
        good | {"request_id": "d", "request": None, "response": []},
        good | {"request_id": "e", "request": {"rows": [[1.0, 2.0]]}, "response": []},
        good | {"request_id": "f", "features": "not an object"},
    ]
    (tmp_path / "predictions-w1.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = read_predictions(tmp_path, ["x", "y"])
    assert [(r["request_id"], r["features"]) for r in records] == [
        ("a", {"x": 1.0, "y": 2.0}),
        ("b", {"x": 3.0, "y": 4.0}),
    ]
