"""Test-only: the product's service, healthy until told otherwise. Once a file named `fault`
exists in the replica's own BENTOML_HOME (supervisord gives each replica its own), every
POST /predict answers 500: a candidate that passes its checks and the canary, then breaks after
promotion, which the watch window must catch and roll back. The test creates the file when the
deploy logs its promotion. Packed into a test bento by tests/helpers/inference_host.py."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from service import SERVICE

TRIGGER = Path(os.environ.get("BENTOML_HOME", ".")) / "fault"


class LateFault:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict" and TRIGGER.exists():
            body = b'{"error": "injected fault"}'
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 500, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


# Outermost: service.py's own middlewares answer /predict themselves (DirectPredict).
SERVICE.middlewares.insert(0, (LateFault, {}))
