"""Plain ASGI middleware: request ids, the access log and traffic metrics, and the request size limit
(before any body is parsed)."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import metrics
from serve_app.errors import PayloadTooLarge
from serve_app.logs import in_serve_replica, log_request

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestIdMiddleware:
    """Echo a sane incoming ``x-request-id`` or make one; it is in ``scope["state"]`` and the response.

    Behind Serve, Serve's own middleware has already put its request id in the request's headers (we
    adopt it, so logs agree) and adds the response header itself; adding ours too would send it twice.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        if in_serve_replica():
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", request_id.encode()))
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, by ``content-length`` or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _reject(send, self.max_bytes)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(_message(self.max_bytes))
            return message

        await self.app(scope, counting_receive, send)


def _message(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"


async def _reject(send: Send, limit: int) -> None:
    body = json.dumps(PayloadTooLarge(_message(limit)).to_body()).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def annotate(scope: Scope, **fields: Any) -> None:
    """What a handler learned about the request (key id, model, cache result, ...), for its log line."""
    scope.setdefault("state", {}).setdefault("iir", {}).update(fields)


def when_done(scope: Scope, callback: Callable[[], None]) -> None:
    """Run ``callback`` once the response's last byte is sent, or the request failed or was abandoned."""
    scope.setdefault("state", {}).setdefault("iir_when_done", []).append(callback)


class AccessLogMiddleware:
    """One JSON log line and the traffic metrics per request, after its last byte.

    Time to first token is the time to the first body bytes of an event stream: the first SSE event
    leaves only once the model produced its first chunk.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        streaming = False
        first_body: float | None = None

        async def timed_send(message: Message) -> None:
            nonlocal status, streaming, first_body
            if message["type"] == "http.response.start":
                status = message["status"]
                streaming = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in message.get("headers", []))
            elif message["type"] == "http.response.body" and first_body is None and message.get("body"):
                first_body = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            ended = time.perf_counter()
            ttft = first_body - started if streaming and first_body is not None else None
            _finish(scope, status, ended - started, ttft)


_in_flight: dict[str, int] = {}


def count_in_flight(scope: Scope, priority: int) -> None:
    """A model request begins; ``AccessLogMiddleware`` ends it."""
    label = str(priority)
    _in_flight[label] = _in_flight.get(label, 0) + 1
    metrics.IN_FLIGHT.set(_in_flight[label], priority=label)
    annotate(scope, in_flight=label)


def _finish(scope: Scope, status: int, latency_s: float, ttft_s: float | None) -> None:
    state = scope.get("state", {})
    for callback in state.pop("iir_when_done", []):
        callback()
    noted: dict[str, Any] = state.get("iir", {})
    route = getattr(scope.get("route"), "path", "unmatched")
    model = noted.get("model", "")
    if (label := noted.get("in_flight")) is not None:
        _in_flight[label] -= 1
        metrics.IN_FLIGHT.set(_in_flight[label], priority=label)
    metrics.REQUESTS.inc(route=route, model=model, status=status)
    metrics.REQUEST_LATENCY.observe(latency_s, route=route, model=model)
    if ttft_s is not None:
        metrics.TIME_TO_FIRST_TOKEN.observe(ttft_s, model=model)
    reason = noted.get("error")
    if status in (401, 403):
        metrics.AUTH_FAILURES.inc(reason=reason or str(status))
    elif status == 429:
        metrics.RATE_LIMITED.inc(limit=reason or "unknown")
    elif status >= 500 and model:
        metrics.UPSTREAM_ERRORS.inc(model=model, code=reason or str(status))
    line = {"request_id": state.get("request_id"), "method": scope.get("method"), "path": scope.get("path"),
            "status": status, "latency_ms": round(latency_s * 1e3, 2)}
    if ttft_s is not None:
        line["ttft_ms"] = round(ttft_s * 1e3, 2)
    line.update({k: v for k, v in noted.items() if k != "in_flight"})
    log_request(line)
