"""Plain ASGI middleware: the request's context (id, access log, traffic metrics) and the request size
limit (before any body is parsed)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app import metrics
from serve_app.errors import PayloadTooLarge, error_response
from serve_app.ingress.context import RequestContext
from serve_app.logs import in_serve_replica, log_request

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# The access log's and metrics' status for a request cancelled before it was answered (nginx's "client
# closed request"), rather than a 500 that would count the client's leaving as a server error.
CLIENT_CLOSED = 499
CONTEXT = "iir"  # scope["state"][CONTEXT]: the RequestContext, for the dependencies below


def context_of(scope: Scope) -> RequestContext:
    ctx: RequestContext = scope["state"][CONTEXT]
    return ctx


class RequestContextMiddleware:
    """Makes each request's ``RequestContext``; after its last byte, one JSON log line and the metrics.

    The request id: a sane incoming ``x-request-id`` or a new one, echoed in the response. Behind Serve,
    Serve's own middleware has already put its request id in the request's headers (we adopt it, so
    logs agree) and adds the response header itself; adding ours too would send it twice.

    Time to first token is the time to the first body bytes of an event stream: the first SSE event
    leaves only once the model produced its first chunk.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _SAFE_ID.match(incoming) else uuid.uuid4().hex
        ctx = RequestContext(request_id)
        scope.setdefault("state", {})[CONTEXT] = ctx
        status = 500
        started = streaming = False
        first_body: float | None = None
        echo = None if in_serve_replica() else (b"x-request-id", request_id.encode())

        async def timed_send(message: Message) -> None:
            nonlocal status, started, streaming, first_body
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = message.setdefault("headers", [])
                streaming = any(k == b"content-type" and v.startswith(b"text/event-stream")
                                for k, v in headers)
                if echo is not None:
                    headers.append(echo)
            elif first_body is None and message["type"] == "http.response.body" and message.get("body"):
                first_body = time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        except asyncio.CancelledError:
            if not started:
                status = CLIENT_CLOSED  # cancelled before any answer (the client left): not a server error
            raise
        finally:
            ctx.finish()
            ended = time.perf_counter()
            ttft = first_body - ctx.started if streaming and first_body is not None else None
            _record(scope, ctx, status, ended - ctx.started, ttft)


class BodySizeLimitMiddleware:
    """413 for bodies over the limit, by ``content-length`` or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > self.max_bytes:
                error = self._too_large()
                context_of(scope).error = error.reason
                await error_response(error)(scope, receive, send)
                return
            # The server hands the app exactly content-length bytes (more would be the next request):
            # nothing to count, and no wrapper on every message of the response.
            await self.app(scope, receive, send)
            return
        seen = 0
        too_large: PayloadTooLarge | None = None

        async def counting_receive() -> Message:
            nonlocal seen, too_large
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    too_large = self._too_large()
                    raise too_large
            return message

        async def send_or_413(message: Message) -> None:
            # FastAPI turns any failure while reading a body into its own 400 ("error parsing the
            # body"): once the limit was crossed, whatever the app answers becomes our 413.
            if too_large is None:
                await send(message)
            elif message["type"] == "http.response.start":
                context_of(scope).error = too_large.reason
                await error_response(too_large)(scope, receive, send)

        await self.app(scope, counting_receive, send_or_413)

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _record(scope: Scope, ctx: RequestContext, status: int, latency_s: float, ttft_s: float | None) -> None:
    route = getattr(scope.get("route"), "path", "unmatched")
    model = ctx.model
    metrics.REQUESTS.inc(route=route, model=model, status=status)
    metrics.REQUEST_LATENCY.observe(latency_s, route=route, model=model)
    if ttft_s is not None:
        metrics.TIME_TO_FIRST_TOKEN.observe(ttft_s, model=model)
    reason = ctx.error
    if status in (401, 403):
        metrics.AUTH_FAILURES.inc(reason=reason or str(status))
    elif status == 429:
        metrics.RATE_LIMITED.inc(limit=reason or "unknown")
    elif status >= 500 and model:
        metrics.UPSTREAM_ERRORS.inc(model=model, code=reason or str(status))
    line: dict[str, Any] = {"request_id": ctx.request_id, "method": scope.get("method"),
                            "path": scope.get("path"), "status": status,
                            "latency_ms": round(latency_s * 1e3, 2)}
    if ttft_s is not None:
        line["ttft_ms"] = round(ttft_s * 1e3, 2)
    line.update(ctx.log_fields())
    log_request(line)
