"""An engine for any OpenAI-compatible upstream: OpenAI, a vLLM server, llama.cpp's server, Ollama.

Requests go out as the caller sent them (unknown fields included) with ``model`` renamed to the upstream's
name; responses and stream chunks come back untouched. Upstream failures become ``IIRError``s:

    upstream 400/422          → InvalidRequest (upstream message passed through)
    upstream 401/403          → UpstreamError  code=upstream_auth_failed (our key, never the caller's)
    upstream 404              → ModelNotFound when it is about the model, else UpstreamError
    upstream 413              → PayloadTooLarge
    upstream 429              → RateLimited carrying Retry-After (quota exhaustion → UpstreamError)
    upstream 5xx, other 4xx   → UpstreamError  code=upstream_error
    connect error             → UpstreamError  code=upstream_unreachable (a stale pooled connection is
                                redone once on a fresh one; retries of requests are the plan's)
    timeout                   → UpstreamError  code=upstream_timeout
    stream cut / error event  → UpstreamError  code=upstream_stream_interrupted, raised from the iterator
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from types import TracebackType
from typing import Any

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

from serve_app.engines.base import EngineBase
from serve_app.errors import (
    IIRError,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
)
from serve_app.fair_queue import NO_TURN, Turn
from serve_app.registry.catalog import ModelSpec, ProviderSpec
from serve_app.schemas import RESPONSE_END_EVENTS, ChatCompletionRequest, EmbeddingRequest, GenerateRequest

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 3.0
# Upstream messages can quote our key prefix or organisation id; neither belongs in a caller's response.
_SECRETS = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{4,}|org-[A-Za-z0-9]{6,})")
_LINE_END = re.compile(rb"\r\n|\r|\n")


class UpstreamClient:
    """One pooled HTTP client per provider, shared by all its models: an ``aiohttp.ClientSession``,
    made on first use because aiohttp binds it to the running event loop.

    The read timeout bounds the wait for each chunk (time to first token included), not the whole
    stream, so long generations are fine while a stalled upstream is not.

    aiohttp itself, not httpx: httpx's pool bookkeeping cost 7.3 ms of CPU per request at 64 concurrent
    (encode/httpx#3215), and even over aiohttp's pool (httpx-aiohttp) httpx's request, response and
    cookie handling cost ~1.0 ms of CPU per call against ~0.4 ms for aiohttp alone (16 concurrent,
    against the fake upstream; a third of the ingress's CPU in bench/ingress_cpu.py's profile).
    No cookie jar: an upstream's cookies must not carry from one caller's request into another's.
    """

    def __init__(self, timeout_s: float = 120.0, connect_timeout_s: float = 5.0, *,
                 connector: Callable[[], aiohttp.BaseConnector] | None = None) -> None:
        self.timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=connect_timeout_s,
                                             sock_read=timeout_s)
        self._connector = connector or (lambda: aiohttp.TCPConnector(limit=512, keepalive_timeout=30.0))
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=self._connector(), timeout=self.timeout,
                                                  cookie_jar=aiohttp.DummyCookieJar())
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def make_http_client(timeout_s: float = 120.0, connect_timeout_s: float = 5.0) -> UpstreamClient:
    return UpstreamClient(timeout_s, connect_timeout_s)


class RemoteEngine(EngineBase):
    name = "remote"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str | None,
        client: UpstreamClient,
        upstream_model: str | None = None,
        endpoint: str | None = None,
        provider: str = "upstream",
        api_key_env: str | None = None,
        connect_timeout_s: float | None = None,
        responses_api: bool = False,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._client = client
        # The provider's timeouts, with this model's own connect timeout where it has one.
        base = client.timeout
        self._timeout = base if connect_timeout_s is None else aiohttp.ClientTimeout(
            total=base.total, connect=base.connect, sock_connect=connect_timeout_s, sock_read=base.sock_read)
        self._urls: dict[str, URL] = {}  # parsed once: yarl's parsing is a real share of a call's CPU
        self._model = upstream_model
        self._endpoint = endpoint.strip("/") if endpoint else None
        self._provider = provider
        self._key_env = api_key_env
        self._has_key = bool(api_key)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self.speaks_responses = responses_api and not self._endpoint

    @classmethod
    def from_spec(cls, spec: ModelSpec, provider: ProviderSpec, client: UpstreamClient, *,
                  connect_timeout_s: float | None = None) -> RemoteEngine:
        key = os.environ.get(provider.api_key_env) if provider.api_key_env else None
        if provider.api_key_env and not key:
            # Start anyway: one provider without a key must not keep the gateway down; health says why.
            log.warning("provider %s: environment variable %s is not set",
                        provider.name, provider.api_key_env)
        return cls(
            base_url=provider.base_url,
            api_key=key or None,
            client=client,
            upstream_model=spec.upstream_name,
            endpoint=spec.endpoint if spec.engine == "http" else None,
            provider=provider.name,
            api_key_env=provider.api_key_env,
            connect_timeout_s=connect_timeout_s,
            responses_api=provider.responses_api,
        )

    def __repr__(self) -> str:  # shows up in logs and tracebacks: name the upstream, never the key
        return f"RemoteEngine(base_url={self._base!r}, model={self._model!r}, endpoint={self._endpoint!r})"

    # -- operations -------------------------------------------------------------------------------

    async def generate(self, request: GenerateRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        if self._endpoint:
            return await super().generate(request)
        body = self._body(request)
        body["stream"] = False
        body.pop("stream_options", None)  # OpenAI refuses stream_options without stream
        return await self._post_json(_path_for(request), body)

    async def stream(self, request: GenerateRequest, turn: Turn = NO_TURN) -> AsyncIterator[dict[str, Any]]:
        if self._endpoint:
            async for chunk in super().stream(request):
                yield chunk
            return
        body = self._body(request)
        body["stream"] = True
        async with (
            self._open(_path_for(request), body) as response,
            aclosing(self._chunks(response)) as chunks,
        ):
            async for chunk in chunks:
                yield chunk

    async def respond(self, body: dict[str, Any]) -> dict[str, Any]:
        """A Responses API request (a plain dict, as the caller sent it) to the upstream's own."""
        body = {**body, "model": self._model or body["model"], "stream": False}
        return await self._post_json("responses", body)

    async def respond_stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Its typed events. The Responses API sends no ``[DONE]``: its last event ends the stream."""
        body = {**body, "model": self._model or body["model"], "stream": True}
        async with (
            self._open("responses", body) as response,
            aclosing(self._chunks(response, last_events=RESPONSE_END_EVENTS)) as chunks,
        ):
            async for chunk in chunks:
                yield chunk

    async def embed(self, request: EmbeddingRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        if self._endpoint:
            return await super().embed(request)
        return await self._post_json("embeddings", self._body(request))

    async def infer(self, payload: dict[str, Any], turn: Turn = NO_TURN) -> dict[str, Any]:
        if not self._endpoint:
            return await super().infer(payload)
        return await self._post_json(self._endpoint, payload, openai=False)

    async def aclose(self) -> None:
        """Nothing to do: the HTTP client belongs to the provider and is shared by its models."""

    async def check_health(self) -> None:
        if self._key_env and not self._has_key:
            raise ServiceUnavailable(f"provider {self._provider!r}: {self._key_env} is not set")
        try:
            timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
            async with self._client.session.get(self._url("models"), headers=self._headers,
                                                timeout=timeout) as resp:
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ServiceUnavailable(f"provider {self._provider!r} unreachable: {_describe(exc)}") from exc
        # A generic http service need not list models; reaching it with valid credentials is enough.
        acceptable = status < 500 if self._endpoint else 200 <= status < 300
        if status in (401, 403) or not acceptable:
            raise ServiceUnavailable(f"provider {self._provider!r} health check: HTTP {status}")

    # -- request plumbing -------------------------------------------------------------------------

    def _url(self, path: str) -> URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(f"{self._base}/{path}")
        return url

    def _body(self, request: GenerateRequest | EmbeddingRequest) -> dict[str, Any]:
        # exclude_unset: forward what the caller sent (extra fields included), not defaults we filled in.
        # exclude_none: in OpenAI's API null means "use the default"; some upstreams (llama.cpp) reject it.
        body = request.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        body["model"] = self._model or request.model
        return body

    async def _post_json(self, path: str, body: dict[str, Any], *, openai: bool = True) -> dict[str, Any]:
        async with self._open(path, body) as response:
            raw = await self._read(response)
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise UpstreamError(f"{self._who()} returned a response that is not JSON") from exc
        # Some OpenAI-compatible servers report errors with a 200; a generic service's JSON is its own.
        if openai and isinstance(data, dict) and data.get("error"):
            raise _error_from_body(data, self._who(), code="upstream_error")
        if not isinstance(data, dict):
            raise UpstreamError(f"{self._who()} returned JSON that is not an object")
        return data

    @asynccontextmanager
    async def _open(self, path: str, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """Send, retrying a failed connect once, and map error statuses; the body is left to read."""
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        response = await self._send(self._url(path), data)
        try:
            if response.status >= 400:
                raw = b""  # a lost error body still has its status
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    raw = await response.read()
                raise self._status_error(response.status, response.headers, raw)
            yield response
        finally:
            response.release()

    async def _send(self, url: URL, data: bytes) -> aiohttp.ClientResponse:
        for attempt in (1, 2):
            try:
                return await self._client.session.post(url, data=data, headers=self._json_headers,
                                                       allow_redirects=False, timeout=self._timeout)
            except aiohttp.SocketTimeoutError as exc:
                raise UpstreamError(f"{self._who()} timed out: {_describe(exc)}",
                                    code="upstream_timeout") from exc
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # No connection at all: refused, unresolved, or no answer within the connect timeout.
                raise UpstreamError(f"could not connect to {self._who()}: {_describe(exc)}",
                                    code="upstream_unreachable") from exc
            except aiohttp.ClientConnectionError as exc:
                # A pooled connection the upstream had already closed: once more on a fresh one. This
                # is the transport's business; retrying a failed *request* is the plan's
                # (serve_app/routing/plan.py), which may pick another model.
                if attempt == 1:
                    continue
                raise UpstreamError(f"{self._who()} closed the connection: {_describe(exc)}",
                                    code="upstream_unreachable") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamError(f"{self._who()} request failed: {_describe(exc)}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        try:
            return await response.read()
        except TimeoutError as exc:
            raise UpstreamError(f"{self._who()} timed out: {_describe(exc)}",
                                code="upstream_timeout") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{self._who()} request failed: {_describe(exc)}") from exc

    async def _chunks(self, response: aiohttp.ClientResponse, last_events: frozenset[str] = frozenset()
                      ) -> AsyncGenerator[dict[str, Any]]:
        """Yield each SSE ``data`` payload as it arrives; anything but a clean end (``[DONE]``, or an
        event of a type in ``last_events``) raises."""
        ended = False
        try:
            async for event, data in _sse_events(response.content):
                if data == "[DONE]":
                    return
                chunk = _parse_chunk(event, data, self._who())
                ended = chunk.get("type") in last_events
                yield chunk
            if ended:
                return
        except TimeoutError as exc:
            raise UpstreamError(f"{self._who()} stalled mid-stream: {_describe(exc)}",
                                code="upstream_timeout") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{self._who()} stream was cut: {_describe(exc)}",
                                code="upstream_stream_interrupted") from exc
        raise UpstreamError(f"{self._who()} stream ended without [DONE]", code="upstream_stream_interrupted")

    def _who(self) -> str:
        return f"upstream {self._provider!r}"

    def _status_error(self, status: int, headers: CIMultiDictProxy[str], raw: bytes) -> IIRError:
        who = self._who()
        err = _openai_error(raw)
        message = _clean(err.get("message") or f"HTTP {status}", brief=status >= 500)
        code = err.get("code") if isinstance(err.get("code"), str) else None
        level = logging.INFO if status < 500 and status not in (401, 403) else logging.WARNING
        log.log(level, "%s answered HTTP %d (%s)", who, status, code or "no code")
        if status in (401, 403):
            hint = f"; set {self._key_env}" if self._key_env and not self._has_key else ""
            # Our caller's IIR key is fine: a 401 from us would tell them otherwise.
            return UpstreamError(f"{who} rejected the gateway's credentials (HTTP {status}){hint}",
                                 code="upstream_auth_failed")
        if status == 429:
            if code == "insufficient_quota":  # our account's billing, not something the caller can wait out
                return UpstreamError(f"{who} quota exhausted: {message}", code="upstream_quota_exhausted")
            return RateLimited(f"{who}: {message}", headers=_retry_after(headers))
        if status == 404:
            if code == "model_not_found" or "model" in message.lower():
                return ModelNotFound(f"{who}: {message}", param="model")
            return UpstreamError(f"{who} has no such endpoint (HTTP 404): {message}")
        if status == 413:
            return PayloadTooLarge(f"{who}: {message}")
        # The request passed our validation but not the upstream's: still the caller's to fix.
        if status in (400, 422):
            return InvalidRequest(message, param=_str_or_none(err.get("param")), code=code)
        return UpstreamError(f"{who} failed (HTTP {status}): {message}", headers=_retry_after(headers))


def _path_for(request: GenerateRequest) -> str:
    return "chat/completions" if isinstance(request, ChatCompletionRequest) else "completions"


async def _sse_events(content: aiohttp.StreamReader) -> AsyncIterator[tuple[str, str]]:
    """Minimal server-sent-events reader: (event type, data) per blank-line-terminated event."""
    event, data = "message", list[str]()
    async for line in _lines(content):
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line.startswith("event:"):
            event = line[6:].strip()
        # ":" comments (keep-alives), "id:" and "retry:" carry nothing we forward.
    if data:  # a last event without its blank line still counts (it may be [DONE])
        yield event, "\n".join(data)


async def _lines(content: aiohttp.StreamReader) -> AsyncIterator[str]:
    """Lines ending in CRLF, CR or LF, as the bytes arrive (no limit on a line's length)."""
    pending = b""
    async for received in content.iter_any():
        pending += received
        # A CR at the end may be the first half of a CRLF: keep it until the next bytes say.
        held = b"\r" if pending.endswith(b"\r") else b""
        *lines, rest = _LINE_END.split(pending[:len(pending) - len(held)])
        pending = rest + held
        for line in lines:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.removesuffix(b"\r").decode("utf-8", "replace")


def _parse_chunk(event: str, data: str, who: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise UpstreamError(f"{who} sent a stream event that is not JSON",
                            code="upstream_stream_interrupted") from exc
    if event == "error" or not isinstance(chunk, dict) or "error" in chunk or chunk.get("object") == "error":
        raise _error_from_body(chunk, who, code="upstream_stream_interrupted")
    return chunk


def _error_from_body(body: Any, who: str, *, code: str) -> UpstreamError:
    err = _error_dict(body)
    message = _clean(err.get("message") or "no message", brief=True)
    return UpstreamError(f"{who} reported an error: {message}", code=code)


def _openai_error(raw: bytes) -> dict[str, Any]:
    try:
        return _error_dict(json.loads(raw))
    except ValueError:
        return {}


def _error_dict(body: Any) -> dict[str, Any]:
    """The ``error`` object of OpenAI-shaped bodies, tolerating vLLM's and FastAPI's variants."""
    if not isinstance(body, dict):
        return {}
    err = body.get("error")
    if isinstance(err, dict):
        return err
    if isinstance(err, str):
        return {"message": err}
    if body.get("object") == "error" or "message" in body:  # vLLM's older flat shape
        return body
    if isinstance(body.get("detail"), str):  # FastAPI's HTTPException
        return {"message": body["detail"]}
    return {}


def _retry_after(headers: CIMultiDictProxy[str]) -> dict[str, str]:
    value = headers.get("retry-after")
    if value:
        return {"Retry-After": value}
    ms = headers.get("retry-after-ms")  # OpenAI sometimes sends only this one
    try:
        return {"Retry-After": str(max(1, math.ceil(float(ms) / 1000)))} if ms else {}
    except ValueError:
        return {}


def _clean(message: Any, *, brief: bool) -> str:
    """Upstream text fit for our caller: secrets masked; for server errors only the first line, since
    some servers (llama-cpp-python) append tracebacks with their file paths."""
    text = _SECRETS.sub("[redacted]", str(message))
    if brief:
        text = text.strip().split("\n", 1)[0][:300]
    return text[:2000]


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _describe(exc: BaseException) -> str:
    """aiohttp says "Cannot connect to host …"; the cause it wraps says why, which operators need."""
    cause: BaseException | None = exc
    for _ in range(6):
        if cause is None:
            break
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, socket.gaierror):
            return "host name not resolved"
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, aiohttp.SocketTimeoutError):
        return "no data within the read timeout"
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return "no connection within the connect timeout"
    return str(exc) or type(exc).__name__
