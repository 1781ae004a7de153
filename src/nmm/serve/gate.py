"""An ASGI middleware in front of FastAPI's routing and exception handlers: it sees every request, routed or not.

It times and counts each request for /metrics (by route template, "other" when nothing matched),
refuses a /v1 request without the API key (401), and caps the body at `Limits.max_body_bytes` (413)
while reading it, so an oversized upload is never held in memory whole.
"""

from __future__ import annotations

import hmac
import time

from nmm.serve.errors import error_response
from nmm.serve.metrics import Metrics
from nmm.serve.schemas import ApiError


class Gate:
    """Outermost ASGI layer: times and counts every request, checks the API key on /v1, caps the body."""

    def __init__(self, app, metrics: Metrics, api_key: str | None, max_body_bytes: int):
        self.app, self.metrics, self.api_key, self.max_body = app, metrics, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500  # stays 500 if the app dies before answering

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")  # the route template, never the raw path
            self.metrics.observe(route, status, time.perf_counter() - start)

    async def _guarded(self, scope, receive, send):
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith("/v1"):
            if not hmac.compare_digest(headers.get(b"authorization", b""), f"Bearer {self.api_key}".encode()):
                error = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                 code="invalid_api_key")
                return await error_response(error)(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            too_big = ApiError(413, f"request body is larger than {self.max_body} bytes", code="body_too_large")
            declared = headers.get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_body:
                return await error_response(too_big)(scope, receive, send)
            chunks, size, more = [], 0, True
            while more:  # read (at most max_body bytes of) the body, then replay it to the app
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunks.append(message.get("body", b""))
                size, more = size + len(chunks[-1]), message.get("more_body", False)
                if size > self.max_body:
                    return await error_response(too_big)(scope, receive, send)
            body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

            async def replay():
                nonlocal body
                if body is None:
                    return await receive()
                message, body = body, None
                return message

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)
