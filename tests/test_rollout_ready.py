"""inference/rollout.py's readiness wait against stub replicas (a tiny HTTP server): a replica
whose model failed to load is a CheckError at once, naming its reason; one still loading waits
for deploy.ready_timeout_s as before."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from inference import rollout
from inference.errors import CheckError

FAILED = "model failed to load: /store/model.onnx: Protobuf parsing failed. (Fail)"


@contextmanager
def replica(readyz: int, metadata: dict[str, Any]) -> Iterator[int]:
    """A stub replica on a free loopback port: /readyz answers `readyz`, /metadata 503 with
    `metadata` as its body (200 when readyz is)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, body = readyz, b""
            if self.path == "/metadata":
                status, body = (200 if readyz == 200 else 503), json.dumps(metadata).encode()
            self.send_response(status)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def host(timeout_s: float, home: Path) -> Any:
    return SimpleNamespace(
        policy=SimpleNamespace(ready_timeout_s=timeout_s), home=home, headers=lambda: {}
    )


def test_a_replica_whose_model_failed_to_load_is_refused_at_once(tmp_path: Path) -> None:
    with replica(503, {"error": FAILED}) as port:
        start = time.monotonic()
        with pytest.raises(CheckError) as caught:
            rollout.wait_ready(host(60, tmp_path), [port])
    assert str(caught.value) == f"readyz: replica on port {port}: {FAILED}"
    assert time.monotonic() - start < 30  # not deploy.ready_timeout_s


def test_a_replica_still_loading_waits_for_the_timeout(tmp_path: Path) -> None:
    waited = pytest.raises(CheckError, match=r"not ready after 1\.5 s \(deploy\.ready_timeout_s\)")
    with replica(503, {"error": "model not loaded yet"}) as port, waited:
        rollout.wait_ready(host(1.5, tmp_path), [port])


def test_a_ready_replica_passes(tmp_path: Path) -> None:
    with replica(200, {"model_version": "1"}) as port:
        rollout.wait_ready(host(5, tmp_path), [port])
