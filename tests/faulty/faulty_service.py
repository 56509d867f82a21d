"""Test-only: the product's service with a fault injected in front of it. After FAULT_AFTER
POST /predict requests (its warm-up and checks pass), every /predict answers 500: the canary must
see it and roll the candidate back. Packed into a test bento by tests/helpers/inference_host.py; the
product's service.py knows nothing of it."""

from __future__ import annotations

from typing import Any

from service import SERVICE

FAULT_AFTER = 12


class Fault:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict":
            self.calls += 1
            if self.calls > FAULT_AFTER:
                body = b'{"error": "injected fault"}'
                headers = [(b"content-type", b"application/json")]
                await send({"type": "http.response.start", "status": 500, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


# Outermost: service.py's own middlewares answer /predict themselves (DirectPredict).
SERVICE.middlewares.insert(0, (Fault, {}))
