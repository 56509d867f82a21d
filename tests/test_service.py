"""The BentoML service in-process: the ASGI app BentoML builds from service.py, driven by
Starlette's test client (lifespan included, so the model loads and warms up as under serve)."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from pipelines.prepare import read_split
from tests.helpers import graphs
from tests.helpers.images import digit_image, encoded, mode_variants, png
from tests.helpers.uploads import Listener, upload_cases

FEATURES = 64


@pytest.fixture(scope="module")
def model(bento_model: tuple[str, Path]) -> tuple[str, Path]:
    return bento_model


@pytest.fixture(scope="module")
def client(service_client: TestClient) -> TestClient:
    """The one in-process app of the test process (conftest's service_client)."""
    return service_client


def rows(prepared: Path, n: int) -> tuple[list[list[float]], np.ndarray]:
    frame = read_split(prepared, "test")
    features = frame.drop(columns=["label"]).to_numpy()[:n]
    return features.tolist(), frame["label"].to_numpy()[:n]


def test_predict_returns_one_prediction_per_row(
    client: TestClient, model: tuple[str, Path]
) -> None:
    body, labels = rows(model[1], 20)
    response = client.post("/predict", json={"rows": body})
    assert response.status_code == 200, response.text
    predictions = response.json()
    assert len(predictions) == 20
    for p in predictions:
        assert set(p) == {"label", "probabilities", "model_version"}
        assert p["model_version"] == "1"
        assert len(p["probabilities"]) == 10
        assert abs(sum(p["probabilities"]) - 1) < 1e-4
        assert p["label"] == int(np.argmax(p["probabilities"]))
    accuracy = np.mean([p["label"] for p in predictions] == labels)
    assert accuracy >= 0.7  # an 8-epoch tiny model; chance is 0.1


def test_predictions_match_the_onnx_graph(client: TestClient, model: tuple[str, Path]) -> None:
    """Same numbers as ONNX Runtime on the same graph with the shared preprocessing."""
    import bentoml

    from pipelines.preprocessing import to_model_input
    from pipelines.runtime import logits, session, softmax

    body, _ = rows(model[1], 8)
    stored = bentoml.models.get(model[0])
    spec = json.loads((Path(stored.path) / "metadata.json").read_text())["preprocessing"]
    expected = softmax(
        logits(session(Path(stored.path) / "model.onnx"), to_model_input(body, spec))
    )
    served = np.array(
        [p["probabilities"] for p in client.post("/predict", json={"rows": body}).json()]
    )
    np.testing.assert_allclose(served, expected, atol=1e-5)


BAD_BODIES: list[tuple[str, Any, str]] = [
    ("short row", {"rows": [[1.0] * 3]}, "row 0 has 3 values; the model takes 64"),
    ("wrong nesting", {"rows": [1.0] * FEATURES}, "valid array"),
    ("too deep", {"rows": [[[1.0]] * FEATURES]}, "valid number"),
    ("string", {"rows": [["1"] * FEATURES]}, "valid number"),
    ("bool", {"rows": [[True] * FEATURES]}, "valid number"),
    ("null", {"rows": [[None] * FEATURES]}, "valid number"),
    (
        "out of range",
        {"rows": [[0.0] * 63 + [17.0]]},
        "feature 63 ('px_63'): 17 is outside the trained range [0, 16]",
    ),
    ("negative", {"rows": [[-1.0] + [0.0] * 63]}, "feature 0 ('px_0'): -1 is outside"),
    ("empty batch", {"rows": []}, "empty batch"),
    ("over the row limit", {"rows": [[0.0] * FEATURES] * 257}, "over the limit of 256"),
    ("no rows key", {"data": [[0.0] * FEATURES]}, "Field required"),
    ("not an object", [[0.0] * FEATURES], "Input should be an object"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_rows_get_a_400_naming_the_problem(
    client: TestClient, case: str, body: Any, message: str
) -> None:
    response = client.post("/predict", json=body)
    assert response.status_code == 400, (case, response.text)
    assert message in response.text


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(client: TestClient, literal: str) -> None:
    row = ", ".join(["0"] * 63 + [literal])
    response = client.post(
        "/predict", content=f'{{"rows": [[{row}]]}}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "finite number" in response.text


def test_malformed_json_and_oversized_bodies(client: TestClient) -> None:
    broken = client.post(
        "/predict", content=b'{"rows": [[1, 2', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 400
    assert "Invalid JSON" in broken.text
    huge = client.post(
        "/predict", content=b" " * 2_000_000, headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413
    assert "over 1048576 bytes" in huge.text
    assert huge.headers["connection"] == "close"  # its unread bytes are not a next request

    def chunks() -> Iterator[bytes]:  # no content-length: counted while it streams
        for _ in range(40):
            yield b" " * 50_000

    streamed = client.post(
        "/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413


def test_predict_image_uses_the_training_preprocessing(
    client: TestClient, model: tuple[str, Path]
) -> None:
    from pipelines.preprocessing import image_to_rows

    data = png()
    response = client.post("/predict_image", files={"image": ("one.png", data, "image/png")})
    assert response.status_code == 200, response.text
    [prediction] = response.json()
    row = image_to_rows(
        data, {"image_shape": [8, 8], "input_shape": [1, 8, 8], "value_range": [0, 16]}
    )
    rows_response = client.post("/predict", json={"rows": row.tolist()})
    assert rows_response.json()[0]["probabilities"] == pytest.approx(prediction["probabilities"])


def test_image_preprocessing_inverts_a_light_background() -> None:
    from pipelines.preprocessing import image_to_rows

    spec = {"image_shape": [8, 8], "input_shape": [1, 8, 8], "value_range": [0, 16]}
    dark_on_light = image_to_rows(png(background=255), spec)
    light_on_dark = image_to_rows(png(background=0), spec)
    np.testing.assert_allclose(dark_on_light, light_on_dark, atol=1e-4)
    assert dark_on_light.shape == (1, 64)
    assert dark_on_light.max() > 8 and dark_on_light.min() == 0  # ink is high, like digits


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"not an image", "not a readable image"), (png()[:60], "not a readable image")],
    ids=["garbage", "truncated png"],
)
def test_corrupt_images_get_a_400(client: TestClient, content: bytes, message: str) -> None:
    response = client.post("/predict_image", files={"image": ("x.png", content, "image/png")})
    assert response.status_code == 400, response.text
    assert message in response.text


ACCEPTED = "not a readable image: PNG, JPEG, GIF, BMP, TIFF or WEBP expected"


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "garbage"])
def test_unaccepted_formats_get_a_400_naming_the_accepted_ones(
    client: TestClient, fmt: str
) -> None:
    """The message once said "PNG or JPEG expected" while TIFF, GIF, BMP and WebP were read too
    (and any other format Pillow knows): the accepted set is explicit and named."""
    content = b"not an image" if fmt == "garbage" else encoded(SAMPLE.convert("L"), fmt)
    response = client.post("/predict_image", files={"image": ("x", content, "image/png")})
    assert response.status_code == 400, response.text
    assert response.json() == {"error": f"image: {ACCEPTED}"}


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "WEBP"])
def test_every_accepted_format_gets_a_200(client: TestClient, fmt: str) -> None:
    content = encoded(SAMPLE, fmt)
    response = client.post("/predict_image", files={"image": ("x", content, "image/png")})
    assert response.status_code == 200, response.text


def test_hsv_is_refused_naming_the_mode() -> None:
    """HSV has no file format; an image decoded to it is refused like I, F and LAB."""
    from pipelines.preprocessing import ImageError, luminance

    with pytest.raises(ImageError, match=r"^image mode HSV is not supported"):
        luminance(Image.new("HSV", (8, 8)))


def test_metadata_describes_the_model(client: TestClient, model: tuple[str, Path]) -> None:
    response = client.get("/metadata")
    assert response.status_code == 200
    described = response.json()
    assert described["model_tag"] == model[0]
    assert described["model_version"] == "1"
    assert described["engine"] == "onnxruntime"
    assert described["precision"] == "fp32"
    assert described["labels"] == list(range(10))
    assert len(described["input_schema"]["features"]) == FEATURES
    assert described["input_schema"]["image_shape"] == [8, 8]


def test_health_endpoints(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200


def guarded(monkeypatch: pytest.MonkeyPatch, key: str | None) -> TestClient:
    """service.Guard around a stand-in app that answers 200 everywhere."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import service

    if key is None:
        monkeypatch.delenv(service.API_KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(service.API_KEY_ENV, key)

    async def ok(request: Any) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    methods = ["GET", "POST"]
    paths = ["/predict", "/predict_image", "/metadata", "/readyz", "/metrics"]
    inner = Starlette(routes=[Route(path, ok, methods=methods) for path in paths])
    return TestClient(service.Guard(inner, max_body=1024))


def test_api_key_guards_every_prediction_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    client = guarded(monkeypatch, "s3cret")
    for path in ("/predict", "/predict_image"):
        assert client.post(path, content=b"{}").status_code == 401
        assert client.post(path, headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post(path, headers={"Authorization": "Bearer s3cre"}).status_code == 401
        assert client.post(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post(path, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/metadata").status_code == 401
    assert "MLOPS_API_KEY" in client.get("/metadata").json()["error"]
    assert client.get("/readyz").status_code == 200  # probes and metrics stay open
    assert client.get("/metrics").status_code == 200


def test_without_a_key_everything_is_open(monkeypatch: pytest.MonkeyPatch) -> None:
    client = guarded(monkeypatch, None)
    assert client.post("/predict", content=b"{}").status_code == 200
    assert client.post("/predict", content=b"x" * 1025).status_code == 413


def guarded_post(
    path: str, length: bytes | None, receive: Any, body_timeout_s: float
) -> tuple[list[str], list[dict[str, Any]], Any]:
    """One JSON POST to `path` (with a Content-Length of `length`, or chunked) through a Guard
    whose body arrives by `receive`: the paths the app behind it saw, the messages sent back,
    and the Guard."""
    import service

    reached: list[str] = []
    messages: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", length))
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    guard = service.Guard(app, max_body=1024, body_timeout_s=body_timeout_s)
    asyncio.run(asyncio.wait_for(guard(scope, receive, send), timeout=5))
    return reached, messages, guard


@pytest.mark.parametrize(
    ("path", "length"),
    [
        ("/predict", b"100"),
        ("/predict_image", b"100"),
        ("/feedback", b"100"),
        ("/score_file/submit", b"100"),  # a batch file's upload
        ("/predict", None),  # chunked: no Content-Length
        ("/score_file/submit", None),
        ("/anything/else", None),  # a chunked body is read (for its limit) on every path
    ],
)
def test_a_body_that_stalls_gets_a_408_not_a_timeout(path: str, length: bytes | None) -> None:
    """A client that announces more bytes than it sends, or stalls mid-body, would wait for
    BentoML's request timeout and get its 504, a server error: Guard gives up first, with a 408
    saying how much arrived, and the app never sees the request."""

    async def stalls() -> dict[str, Any]:  # 10 bytes, then nothing more
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": b'{"rows": [', "more_body": True}
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    sent: list[bool] = []
    reached, messages, guard = guarded_post(path, length, stalls, body_timeout_s=0.2)
    assert messages[0]["status"] == 408 and not reached
    assert (b"connection", b"close") in messages[0]["headers"]
    error = json.loads(messages[1]["body"])["error"]
    assert not guard.deadlines and not guard.expired  # nothing left behind
    announced = "Content-Length 100 announced, " if length else ""
    assert error == f"request body incomplete: {announced}10 bytes arrived within 0.2 s"


@pytest.mark.parametrize(
    ("path", "length"),
    [("/feedback", b"200"), ("/predict", b"200"), ("/score_file/submit", None)],
)
def test_a_body_cut_short_by_a_disconnect_never_reaches_the_app(
    path: str, length: bytes | None
) -> None:
    """The client sent part of its body and went away: the part is not run as if whole (a
    /feedback body 100 bytes short of its Content-Length was once written to the feedback log,
    a batch upload submitted), and nothing is answered."""
    parts = [
        {"type": "http.request", "body": b'{"request_id": "a", "labels": [1]}', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return parts.pop(0)

    reached, sent, guard = guarded_post(path, length, receive, body_timeout_s=0.5)
    assert reached == [] and sent == []
    assert not guard.deadlines and not guard.expired


def test_a_stalled_body_is_cut_off_and_the_requests_beside_it_are_not() -> None:
    """Concurrent reads on one Guard: the stalled one gets its 408 at the deadline; one whose
    body arrived (and whose app runs past the deadline) and one whose body arrives late but in
    time get their answers."""
    import service

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = (await receive())["body"]
        await asyncio.sleep(0.4)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    def receiver(parts: list[tuple[float, bytes]]) -> Any:
        async def receive() -> dict[str, Any]:
            delay, chunk = parts.pop(0)
            await asyncio.sleep(delay)
            return {"type": "http.request", "body": chunk, "more_body": bool(parts)}

        return receive

    async def call(guard: Any, parts: list[tuple[float, bytes]]) -> list[dict[str, Any]]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
        scope["headers"] = [(b"content-length", b"%d" % sum(len(c) for _, c in parts))]
        await guard(scope, receiver(parts), send)
        return sent

    async def main() -> list[list[dict[str, Any]]]:
        guard = service.Guard(app, max_body=1024, body_timeout_s=0.2)
        return await asyncio.gather(
            call(guard, [(0.0, b"ab"), (3600.0, b"cd")]),  # stalls
            call(guard, [(0.0, b"whole")]),  # arrives at once
            call(guard, [(0.0, b"la"), (0.1, b"te")]),  # the rest after 0.1 s
        )

    stalled, whole, late = asyncio.run(asyncio.wait_for(main(), timeout=5))
    assert stalled[0]["status"] == 408 and b"2 bytes arrived" in stalled[1]["body"]
    assert (whole[0]["status"], whole[1]["body"]) == (200, b"whole")
    assert (late[0]["status"], late[1]["body"]) == (200, b"late")


def test_a_whole_body_passes_the_arrival_check_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    """The body Guard read within body_timeout_s reaches the app byte for byte, and a request
    whose body arrived is never cut short later: the app may take longer than body_timeout_s."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    import service

    monkeypatch.delenv(service.API_KEY_ENV, raising=False)

    async def echo(request: Any) -> PlainTextResponse:
        body = (await request.body()).decode()
        await asyncio.sleep(0.5)  # a slow model call: 5 x body_timeout_s, 40 sweeps
        return PlainTextResponse(body)

    inner = Starlette(routes=[Route("/predict", echo, methods=["POST"])])
    client = TestClient(service.Guard(inner, max_body=1024, body_timeout_s=0.1))
    for _ in range(2):  # the second read restarts the sweeper the first one's end stopped
        answer = client.post("/predict", content=b'{"rows": [[1, 2]]}')
        assert answer.status_code == 200 and answer.text == '{"rows": [[1, 2]]}'


def test_an_image_over_the_pixel_limit_gets_a_400_before_it_is_decoded(client: TestClient) -> None:
    import service

    side = (
        int(service.SERVE.max_image_pixels**0.5) + 1
    )  # a blank PNG: small to send, huge to decode
    buffer = io.BytesIO()
    Image.new("L", (side, side), 255).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < service.SERVE.max_body_bytes
    response = client.post(
        "/predict_image", files={"image": ("big.png", buffer.getvalue(), "image/png")}
    )
    assert response.status_code == 400, response.text
    assert "over the limit of" in response.text


def test_predict_answers_with_bentoml_s_bodies_and_headers(
    client: TestClient, model: tuple[str, Path]
) -> None:
    """/predict (service.DirectPredict with batching off: tests/test_serve_live.py compares it
    with BentoML's dispatch request by request) answers with BentoML's server header and
    validation error body; HttpContract in front refuses other media types."""
    import service

    assert not service.BATCHING  # params.yaml's default
    body, _ = rows(model[1], 2)
    for headers in ({}, {"content-type": "application/json; charset=utf-8"}):
        answered = client.post("/predict", content=json.dumps({"rows": body}), headers=headers)
        assert answered.status_code == 200, answered.text
        assert answered.headers["server"] == "BentoML Service/digits-classifier"
    bad = client.post("/predict", json={"rows": []})
    assert bad.status_code == 400 and "empty batch" in bad.text
    assert bad.json()["error"] == "1 validation error for Input"
    form = {"content-type": "application/x-www-form-urlencoded"}
    refused = client.post("/predict", content=b"rows=1", headers=form)  # by HttpContract
    assert refused.status_code == 415 and "takes application/json" in refused.text
    assert client.get("/predict").status_code == 405  # BentoML's router


def test_predict_refuses_keys_other_than_rows_naming_them(
    client: TestClient, model: tuple[str, Path]
) -> None:
    """A misspelt or unknown key beside `rows` is a 400 naming it, not silently ignored; the
    documented schema says so (additionalProperties false)."""
    body, _ = rows(model[1], 1)
    for extra in ({"threshhold": 0.5}, {"rows_": body}, {"request_id": "a"}):
        refused = client.post("/predict", json={"rows": body, **extra})
        assert refused.status_code == 400, refused.text
        (key,) = extra
        assert [e["loc"] for e in refused.json()["detail"]] == [[key]]
        assert refused.json()["detail"][0]["type"] == "extra_forbidden"
    assert client.post("/predict", json={"rows": body}).status_code == 200
    schema = client.get("/docs.json").json()["components"]["schemas"]["predict__Input"]
    assert schema["additionalProperties"] is False


SPEC = {"image_shape": [8, 8], "input_shape": [1, 8, 8], "value_range": [0, 16]}


REFUSED_MODES = {
    "I": Image.fromarray(np.zeros((64, 64), np.int32)),
    "F": Image.fromarray(np.zeros((64, 64), np.float32)),
    "LAB": Image.new("LAB", (64, 64)),
}
SAMPLE = digit_image(np.array([0, 0, 5, 13, 9, 1, 0, 0] * 8, np.float64))
VARIANTS = mode_variants(SAMPLE)


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_every_image_mode_gives_the_row_of_the_8_bit_original(variant: str) -> None:
    """A 16-bit PNG once became an all-zero row: each mode is read at its own range, alpha is
    background, palettes are expanded, colour becomes luma."""
    from pipelines.preprocessing import image_to_rows

    data, tolerance = VARIANTS[variant]
    original = image_to_rows(VARIANTS["L png"][0], SPEC)
    assert original.max() > 8  # the ink is there
    np.testing.assert_allclose(image_to_rows(data, SPEC), original, atol=tolerance + 1e-4)


@pytest.mark.parametrize("mode", list(REFUSED_MODES))
def test_modes_without_a_fixed_range_get_a_400_naming_the_mode(
    client: TestClient, mode: str
) -> None:
    data = encoded(REFUSED_MODES[mode], "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    response = client.post("/predict_image", files={"image": ("x.tiff", data, "image/tiff")})
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": f"image: image mode {mode} is not supported: send 8- or "
        "16-bit grayscale, RGB, RGBA, palette, CMYK or YCbCr"
    }


def test_a_digit_in_every_mode_gets_the_label_of_the_8_bit_original(
    client: TestClient, model: tuple[str, Path]
) -> None:
    body, _ = rows(model[1], 30)
    served = client.post("/predict", json={"rows": body}).json()
    sure = max(range(len(body)), key=lambda i: max(served[i]["probabilities"]))
    variants = mode_variants(digit_image(np.array(body[sure])))
    labels = {}
    for name, (data, _) in variants.items():
        response = client.post("/predict_image", files={"image": ("digit", data, "image/png")})
        assert response.status_code == 200, (name, response.text)
        labels[name] = response.json()[0]["label"]
    assert labels["L png"] == served[sure]["label"]
    assert set(labels.values()) == {labels["L png"]}, labels


@pytest.mark.parametrize("case", [c[0] for c in upload_cases("http://x")])
def test_malformed_uploads_get_a_400_naming_the_field_and_no_url_is_fetched(
    client: TestClient, case: str
) -> None:
    listener = Listener()
    try:
        [(_, body, message)] = [c for c in upload_cases(listener.url) if c[0] == case]
        headers = {"content-type": "multipart/form-data; boundary=b0undary"}
        response = client.post("/predict_image", content=body, headers=headers)
    finally:
        listener.close()
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]
    assert listener.hits == []  # BentoML alone would have fetched the URL on the server


@pytest.mark.parametrize(
    ("path", "content_type", "status", "message"),
    [
        ("/predict", "multipart/form-data", 415, "/predict takes application/json"),
        ("/predict", "multipart/form-data; boundary=x", 415, "/predict takes application/json"),
        ("/predict", "application/x-www-form-urlencoded", 415, "takes application/json"),
        ("/predict", "application/vnd.bentoml+pickle", 415, "takes application/json"),
        ("/predict", "application/json; charset=utf-16", 415, "charset utf-16"),
        ("/predict", "application/json; charset=bogus", 415, "charset bogus"),
        ("/predict_image", "multipart/form-data", 400, "needs a boundary parameter"),
        ("/predict_image", "multipart/form-data; boundary=", 400, "needs a boundary parameter"),
        ("/predict_image", f"multipart/form-data; boundary={'x' * 71}", 400, "1 to 70 characters"),
        ("/predict_image", "multipart/form-data; charset=bogus", 400, "needs a boundary"),
        ("/predict_image", "application/json", 415, "takes multipart/form-data"),
        ("/predict_image", "image/png", 415, "takes multipart/form-data"),
        ("/predict_image", "application/x-www-form-urlencoded", 415, "field 'image'"),
    ],
)
def test_malformed_content_types_get_a_4xx_naming_the_problem(
    client: TestClient, path: str, content_type: str, status: int, message: str
) -> None:
    for body in (b"", b"abc", json.dumps({"rows": [[0.0] * FEATURES]}).encode()):
        response = client.post(path, content=body, headers={"content-type": content_type})
        assert response.status_code == status, (body, response.text)
        assert message in response.json()["error"]


def test_a_json_image_field_is_not_fetched(client: TestClient) -> None:
    listener = Listener()
    try:
        response = client.post("/predict_image", json={"image": listener.url})
        raw = client.post("/predict_image", content=listener.url.encode())
    finally:
        listener.close()
    assert response.status_code == raw.status_code == 415
    assert listener.hits == []


def test_the_openapi_document_states_the_real_contract(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/docs.json once admitted `{"rows": []}` and rows of any length and value, and declared
    `detail` as a string. tests/test_serve_live.py fuzzes a live server from it (Schemathesis)."""
    doc = client.get("/docs.json").json()
    schemas = doc["components"]["schemas"]
    rows = schemas["predict__Input"]["properties"]["rows"]
    assert (rows["minItems"], rows["maxItems"]) == (1, 256)
    assert rows["items"]["minItems"] == rows["items"]["maxItems"] == FEATURES
    assert (rows["items"]["items"]["minimum"], rows["items"]["items"]["maximum"]) == (0, 16)
    assert schemas["predict_image__Input"]["additionalProperties"] is False
    assert schemas["Error"]["properties"]["detail"]["type"] == "array"
    for path in ("/predict", "/predict_image"):
        responses = doc["paths"][path]["post"]["responses"]
        assert set(responses) == {"200", "400", "408", "413", "415", "500"}, path
    assert "securitySchemes" not in doc["components"]
    monkeypatch.setenv("MLOPS_API_KEY", "k3y")  # read per request, as by Guard at start
    keyed = client.get("/docs.json").json()
    assert set(keyed["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path in ("/predict", "/predict_image", "/metadata"):
        for operation in keyed["paths"][path].values():
            assert operation["security"] == [{"bearer": []}, {"apiKey": []}]
            assert "401" in operation["responses"]
    bad = client.post("/predict", json={"rows": []}).json()  # the error body as documented
    assert isinstance(bad["error"], str) and isinstance(bad["detail"], list)


@pytest.mark.parametrize(
    ("largest", "expected"),
    [
        (1, [1]),
        (10, list(range(1, 11))),
        (256, [*range(1, 17), 32, 64, 128, 256]),
        (100, [*range(1, 17), 32, 64, 100]),
    ],
)
def test_warm_up_covers_small_sizes_powers_of_two_and_the_largest_call(
    client: TestClient, largest: int, expected: list[int]
) -> None:
    assert sys.modules["service"].warm_up_sizes(largest) == expected


def test_rows_are_checked_against_each_features_own_range(client: TestClient) -> None:
    """A spec with `feature_ranges` (data.value_range per feature, or learned): each value
    against its own feature's [low, high]; a spec without them: one range for all."""
    service = sys.modules["service"]
    spec = {
        "feature_columns": ["a", "b"],
        "value_range": [-1.0, 2000.0],
        "feature_ranges": [[-1.0, 1.0], [100.0, 2000.0]],
    }
    contract = service.RowContract.from_spec(spec, max_rows=4)
    assert (contract.low, contract.high) == ((-1.0, 100.0), (1.0, 2000.0))
    assert service.check_rows([[0.5, 1500.0]], contract) == [[0.5, 1500.0]]
    with pytest.raises(ValueError, match=r"row 0, feature 0 \('a'\): 5 is outside .*\[-1, 1\]"):
        service.check_rows([[5.0, 1500.0]], contract)  # inside the envelope, not its own range
    with pytest.raises(
        ValueError, match=r"row 1, feature 1 \('b'\): 50 is outside .*\[100, 2000\]"
    ):
        service.check_rows([[0.0, 150.0], [0.0, 50.0]], contract)
    uniform = service.RowContract.from_spec({**spec, "feature_ranges": None}, max_rows=4)
    assert (uniform.low, uniform.high) == ((-1.0, -1.0), (2000.0, 2000.0))
    unnamed = service.RowContract.from_spec({**spec, "feature_columns": []}, max_rows=4)
    with pytest.raises(ValueError, match=r"^row 0, feature 1: 3000 is outside"):
        service.check_rows([[0.0, 3000.0]], unnamed)  # no names in the metadata: the index


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ('{"max_rows": "256"}', "serve.max_rows"),
        ('{"max_rows": 100000}', "serve.max_rows"),
        ('{"nope": 1}', "serve.nope"),
        ("not json", "Invalid JSON"),
        ('["max_rows"]', "valid dictionary"),
    ],
)
def test_a_bad_serve_override_names_the_variable_and_the_key(
    client: TestClient, overrides: str, named: str
) -> None:
    import service
    from pipelines.errors import EnvironmentVariableError

    with pytest.raises(EnvironmentVariableError) as caught:
        service.import_settings({"MLOPS_SERVE_OVERRIDES": overrides})
    message = str(caught.value)
    assert message.startswith("MLOPS_SERVE_OVERRIDES: "), message
    assert named in message and "params.yaml" not in message and "\n" not in message


def test_a_good_serve_override_is_applied(client: TestClient) -> None:
    import service

    found, params = service.import_settings({"MLOPS_SERVE_OVERRIDES": '{"max_rows": 17}'})
    assert found.serve_overrides == {"max_rows": 17}
    assert params.serve.max_rows == 17
    assert params.model_copy(update={"serve": service.PARAMS.serve}) == service.PARAMS


def metadata_cases() -> list[tuple[str, Any, str]]:
    good = {
        "labels": [0, 1],
        "preprocessing": {"feature_columns": ["a", "b"], "value_range": [0, 1], "input_shape": [2]},
    }
    spec = good["preprocessing"]
    return [
        ("no labels", {"preprocessing": spec}, "labels: missing"),
        ("a string", "labels", "a JSON object expected, got str"),
        ("labels not a list", {**good, "labels": "ab"}, "labels: Input should be a valid list"),
        ("no labels at all", {**good, "labels": []}, "labels: List should have at least 1 item"),
        ("a float label", {**good, "labels": [0, 1.5]}, "labels[1]: Input should be a valid"),
        ("a repeated label", {**good, "labels": [1, 1]}, "labels: repeated: 1"),
        ("no preprocessing", {"labels": [0, 1]}, "preprocessing: missing"),
        ("no ranges", {**good, "preprocessing": {**spec, "value_range": None}}, "no legal range"),
        (
            "an input_shape of other size",
            {**good, "preprocessing": {**spec, "input_shape": [3]}},
            "input_shape [3] holds 3 values, not the 2 of feature_columns",
        ),
        (
            "ranges of other length",
            {**good, "preprocessing": {**spec, "feature_ranges": [[0, 1]]}},
            "1 feature_ranges for 2 feature_columns",
        ),
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [(c, m) for _, c, m in metadata_cases()],
    ids=[name for name, _, _ in metadata_cases()],
)
def test_a_bad_metadata_json_is_one_line_naming_the_file_and_the_key(
    client: TestClient, tmp_path: Path, content: Any, message: str
) -> None:
    import service

    (tmp_path / "metadata.json").write_text(json.dumps(content))
    with pytest.raises(service.ModelFileError) as caught:
        service.read_model_metadata(tmp_path)
    text = str(caught.value)
    assert text.startswith(f"{tmp_path / 'metadata.json'}: "), text
    assert message in text and "\n" not in text, text


def test_a_missing_or_unparsable_metadata_json_is_named(client: TestClient, tmp_path: Path) -> None:
    import service

    with pytest.raises(
        service.ModelFileError, match=r"metadata\.json: missing from the model folder"
    ):
        service.read_model_metadata(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(
        service.ModelFileError, match=r"metadata\.json: not readable JSON \(Expecting"
    ):
        service.read_model_metadata(tmp_path)


@pytest.mark.parametrize("breakage", graphs.MISMATCHES, ids=lambda f: f.__name__)
def test_files_that_disagree_fail_the_load_naming_the_file(
    client: TestClient,
    model: tuple[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    breakage: Callable[[Path], str],
) -> None:
    """Labels cut or extended against the graph's outputs, a cascade's student of another width,
    a graph of another input: the load fails (load_error: one line naming the file, /readyz and
    /metadata 503 through `__is_ready__` and `load_failure`), instead of a 500 or wrong labels
    at the first request."""
    import bentoml

    import service

    named = graphs.broken_copy(Path(bentoml.models.get(model[0]).path), tmp_path / "m", breakage)
    monkeypatch.setattr(service, "MODEL_TAG", graphs.save_folder("broken", tmp_path / "m"))
    instance = service.Classifier.inner()
    assert instance.load_error is not None and not instance.__is_ready__()
    assert instance.load_error.startswith(f"{Path(instance.model_dir) / named}: ")
    assert "\n" not in instance.load_error
    if breakage is graphs.graph_of_other_input:
        assert (
            "fails on one row of metadata.json's input [1, 1, 8, 8] (64 features)"
            in instance.load_error
        )
    else:
        assert "but metadata.json has" in instance.load_error


def test_a_graph_check_passes_on_the_files_that_agree(client: TestClient) -> None:
    """The served model itself: its graph's outputs match its labels (the check ran at load)."""
    import service

    running = service.running_service()
    assert running is not None
    for name, engine in running.engines.items():
        service.check_graph(
            running.model_dir / name, engine, running.contract, running.spec, len(running.labels)
        )
