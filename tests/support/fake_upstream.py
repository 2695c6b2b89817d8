"""A small, real OpenAI-compatible HTTP server for tests and benchmarks.

``FakeUpstream`` serves a raw ASGI app with uvicorn in a background thread on 127.0.0.1 (free port):

    GET  /v1/models             the configured model names
    POST /v1/chat/completions   echo-style: the reply is the last user message's words, at most
                                ``max_tokens`` of them (one word = one token); stream or not; n; usage
    POST /v1/completions        the same for each prompt (OpenAI's default max_tokens of 16)
    POST /v1/embeddings         deterministic unit vectors from a hash of each text; float or base64
    POST /generic/echo          {"echo": <body>} (also as /v1/generic/echo)
    POST /v1/responses          the Responses API, echo-style on the last user message's text, stream
                                (typed events, no [DONE]) or not; each response says "served_by":
                                "responses-api", so a test can tell a pass-through from a translation

Replies are pure functions of the request, so tests can predict them. Knobs: ``api_key`` (require
``Authorization: Bearer <key>``), ``models`` (others get 404 model_not_found), ``first_byte_delay_s``,
``chunk_delay_s``, and one-shot faults queued for the next request(s), whatever their path:
``fail_next``, ``cut_next_stream``, ``next_stream_without_done``, ``next_stream_error_event``,
``hold_next_stream`` (stream faults do nothing to a non-stream request, which still uses them up).

It is a raw ASGI app (no framework) and keeps a bounded request log, so a benchmark can drive it hard.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from itertools import count
from types import TracebackType
from typing import Any

import uvicorn

Scope = MutableMapping[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

DEFAULT_MODELS = ("fake-chat", "fake-completion", "fake-embed")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON, or None


@dataclass
class Fault:
    """What the next request gets instead of a normal answer (each field optional)."""

    status: int | None = None
    message: str = "injected failure"
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    cut_after: int | None = None  # stream: drop the connection after this many chunks
    omit_done: bool = False  # stream: end the body cleanly but without [DONE]
    error_event_after: int | None = None  # stream: an OpenAI error event after this many chunks
    hold_after: int | None = None  # stream: pause after this many chunks until ``release`` is set
    release: threading.Event = field(default_factory=threading.Event)


class _StreamCut(Exception):
    """Raised inside the app to make uvicorn drop the connection mid-body."""


class _QuietStreamCut(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _StreamCut)


class FakeUpstream:
    def __init__(
        self,
        *,
        api_key: str | None = None,
        models: Iterable[str] | None = None,
        first_byte_delay_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        embedding_dim: int = 16,
        max_recorded: int = 1000,
        port: int = 0,
    ) -> None:
        self._wanted_port = port  # 0: any; a fixed one lets a stopped upstream come back where it was
        self.api_key = api_key
        self.models = tuple(models) if models is not None else None
        self.first_byte_delay_s = first_byte_delay_s
        self.chunk_delay_s = chunk_delay_s
        self.embedding_dim = embedding_dim
        self._recorded: deque[RecordedRequest] = deque(maxlen=max_recorded)  # bounded for benchmarks
        self._faults: deque[Fault] = deque()
        self._ids = count(1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        logging.getLogger("uvicorn.error").addFilter(_QUIET)
        # Binding here (not in uvicorn) gives us the port before the thread starts: no race.
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self._wanted_port))
        self._wanted_port = self._sock.getsockname()[1]  # started again, it comes back on this port
        config = uvicorn.Config(self._app, interface="asgi3", log_level="warning", access_log=False,
                                lifespan="off", timeout_keep_alive=60, backlog=2048)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name="fake-upstream", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("FakeUpstream did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._server is not None:
            for fault in self._faults:
                fault.release.set()
            self._server.should_exit = True
            self._server.force_exit = True  # don't wait for held streams
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self._server = self._thread = self._sock = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._sock is None:
            raise RuntimeError("FakeUpstream is not running")
        return int(self._sock.getsockname()[1])

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root_url}/v1"

    # -- inspection and knobs ---------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        return list(self._recorded)

    def reset(self) -> None:
        """Forget recorded requests and pending faults (knob attributes stay as they are)."""
        for fault in self._faults:
            fault.release.set()
        self._faults.clear()
        self._recorded.clear()

    def inject(self, fault: Fault) -> Fault:
        self._faults.append(fault)
        return fault

    def fail_next(self, status: int, message: str = "injected failure", *, code: str | None = None,
                  headers: dict[str, str] | None = None, times: int = 1) -> None:
        for _ in range(times):
            self.inject(Fault(status=status, message=message, code=code, headers=dict(headers or {})))

    def cut_next_stream(self, after_chunks: int) -> None:
        self.inject(Fault(cut_after=after_chunks))

    def next_stream_without_done(self) -> None:
        self.inject(Fault(omit_done=True))

    def next_stream_error_event(self, after_chunks: int, message: str = "upstream broke") -> None:
        self.inject(Fault(error_event_after=after_chunks, message=message))

    def hold_next_stream(self, after_chunks: int) -> threading.Event:
        """The next stream pauses after ``after_chunks`` chunks until the returned event is set."""
        return self.inject(Fault(hold_after=after_chunks)).release

    # -- ASGI -------------------------------------------------------------------------------------

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        raw = await _read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = _BAD_JSON
        self._recorded.append(RecordedRequest(scope["method"], scope["path"], headers,
                                              None if body is _BAD_JSON else body))
        if self.first_byte_delay_s:
            await asyncio.sleep(self.first_byte_delay_s)
        fault = self._faults.popleft() if self._faults else Fault()
        status, payload, extra = self._answer(scope["method"], scope["path"], headers, body, fault)
        if isinstance(payload, Iterator):
            await self._send_stream(send, payload, fault)
        else:
            await _send_json(send, status, payload, extra)

    def _answer(self, method: str, path: str, headers: dict[str, str], body: Any,
                fault: Fault) -> tuple[int, Any, dict[str, str]]:
        if fault.status is not None:
            return fault.status, _error(fault.message, _kind(fault.status), code=fault.code), fault.headers
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            shown = headers.get("authorization", "").removeprefix("Bearer ")[:6]
            return 401, _error(f"Incorrect API key provided: {shown}***", "invalid_request_error",
                               code="invalid_api_key"), {}
        route = _ROUTES.get((method, path))
        if route is None:
            return 404, {"detail": "Not Found"}, {}  # what FastAPI-based servers (vLLM) answer
        if body is _BAD_JSON or (method == "POST" and not isinstance(body, dict)):
            return 400, _error("request body must be a JSON object", "invalid_request_error"), {}
        if (method == "POST" and path in _MODEL_ROUTES and self.models is not None
                and body.get("model") not in self.models):
            return 404, _error(f"The model `{body.get('model')}` does not exist", "invalid_request_error",
                               param="model", code="model_not_found"), {}
        return route(self, body or {})

    async def _send_stream(self, send: Send, chunks: Iterator[dict[str, Any]], fault: Fault) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]})
        typed = False  # the Responses API's typed events end without [DONE]
        for sent, chunk in enumerate(chunks):
            typed = "type" in chunk
            if sent == fault.cut_after:
                raise _StreamCut
            if sent == fault.error_event_after:
                await _send_event(send, _error(fault.message, "server_error"))
                break
            if sent == fault.hold_after:
                while not fault.release.is_set():  # polling keeps the server's loop free
                    await asyncio.sleep(0.005)
            if self.chunk_delay_s and sent:
                await asyncio.sleep(self.chunk_delay_s)
            await _send_event(send, chunk)
        else:
            if fault.cut_after is not None:  # asked to cut after more chunks than there were
                raise _StreamCut
            if not fault.omit_done and not typed:
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    # -- routes -----------------------------------------------------------------------------------

    def _models(self, _body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        names = self.models if self.models is not None else DEFAULT_MODELS
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in names]
        return 200, {"object": "list", "data": data}, {}

    def _chat(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, _error("'messages' is required", "invalid_request_error", param="messages"), {}
        texts = [_text(m.get("content")) for m in messages if isinstance(m, dict)]
        last_user = next((_text(m.get("content")) for m in reversed(messages)
                          if isinstance(m, dict) and m.get("role") == "user"), "")
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        words, finish = _reply_words(last_user, limit)
        prompt_tokens = sum(len(t.split()) for t in texts)
        meta = self._meta(body, "chat.completion")
        if body.get("stream"):
            return 200, _chat_chunks(meta, words, finish, body, prompt_tokens), {}
        message = {"role": "assistant", "content": " ".join(words)}
        choices = [{"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                   for i in range(int(body.get("n") or 1))]
        usage = _usage(prompt_tokens, len(words) * len(choices))
        return 200, {**meta, "system_fingerprint": "fake", "choices": choices, "usage": usage}, {}

    def _completions(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            return 400, _error("'prompt' must be a string or a list of strings", "invalid_request_error",
                               param="prompt"), {}
        limit = body.get("max_tokens", 16)  # OpenAI's default for this endpoint
        replies = [_reply_words(p, limit) for p in prompts]
        prompt_tokens = sum(len(p.split()) for p in prompts)
        meta = self._meta(body, "text_completion")
        if body.get("stream"):
            return 200, _completion_chunks(meta, replies, body, prompt_tokens), {}
        choices = [{"index": i, "text": " ".join(w), "logprobs": None, "finish_reason": f}
                   for i, (w, f) in enumerate(replies)]
        usage = _usage(prompt_tokens, sum(len(w) for w, _ in replies))
        return 200, {**meta, "choices": choices, "usage": usage}, {}

    def _embeddings(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        texts = _embedding_texts(body.get("input"))
        if texts is None:
            return 400, _error("'input' is required", "invalid_request_error", param="input"), {}
        dim = int(body.get("dimensions") or self.embedding_dim)
        as_b64 = body.get("encoding_format") == "base64"
        data = []
        for i, text in enumerate(texts):
            vector = embedding_for(text, dim)
            value: Any = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode() if as_b64 else vector
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(t.split()) for t in texts)
        return 200, {"object": "list", "data": data, "model": body.get("model"),
                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, {}

    def _echo(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return 200, {"echo": body}, {}

    def _responses(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        items = body.get("input")
        items = [{"role": "user", "content": items}] if isinstance(items, str) else items
        if not isinstance(items, list) or not items:
            return 400, _error("'input' is required", "invalid_request_error", param="input"), {}
        last_user = next((_text(i.get("content")) for i in reversed(items)
                          if isinstance(i, dict) and i.get("role") == "user"), "")
        words, finish = _reply_words(last_user, body.get("max_output_tokens"))
        prompt_tokens = sum(len(_text(i.get("content")).split()) for i in items if isinstance(i, dict))
        n = next(self._ids)
        text = " ".join(words)
        status = "completed" if finish == "stop" else "incomplete"
        message = {"id": f"msg_fake{n}", "type": "message", "status": status, "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": []}]}
        response = {"id": f"resp_fake{n}", "object": "response", "created_at": int(time.time()),
                    "status": status, "model": body.get("model"), "output": [message],
                    "incomplete_details": None if finish == "stop" else {"reason": "max_output_tokens"},
                    "served_by": "responses-api",
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": len(words),
                              "total_tokens": prompt_tokens + len(words)}}
        if body.get("stream"):
            return 200, _response_events(response, words), {}
        return 200, response, {}

    def _meta(self, body: dict[str, Any], obj: str) -> dict[str, Any]:
        prefix = "chatcmpl" if obj.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-fake{next(self._ids)}", "object": obj, "created": int(time.time()),
                "model": body.get("model")}


_ROUTES: dict[tuple[str, str], Callable[[FakeUpstream, dict[str, Any]], tuple[int, Any, dict[str, str]]]] = {
    ("GET", "/v1/models"): FakeUpstream._models,
    ("POST", "/v1/chat/completions"): FakeUpstream._chat,
    ("POST", "/v1/completions"): FakeUpstream._completions,
    ("POST", "/v1/embeddings"): FakeUpstream._embeddings,
    ("POST", "/generic/echo"): FakeUpstream._echo,
    ("POST", "/v1/generic/echo"): FakeUpstream._echo,  # for providers whose base_url ends in /v1
    ("POST", "/v1/responses"): FakeUpstream._responses,
}
_MODEL_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"})
_BAD_JSON = object()
_QUIET = _QuietStreamCut()


# -- deterministic content ----------------------------------------------------------------------


def embedding_for(text: str, dim: int = 16) -> list[float]:
    """The unit vector FakeUpstream returns for ``text`` (float32 values, so base64 round-trips exactly)."""
    raw = b"".join(hashlib.sha256(f"{i}:{text}".encode()).digest() for i in range(dim // 8 + 1))
    ints = struct.unpack(f"<{dim}I", raw[: 4 * dim])
    values = [n / 2**31 - 1.0 for n in ints]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return list(struct.unpack(f"<{dim}f", struct.pack(f"<{dim}f", *(v / norm for v in values))))


def expected_reply(text: str, max_tokens: int | None = None) -> str:
    """The reply FakeUpstream gives to a last user message (or prompt) ``text``."""
    return " ".join(_reply_words(text, max_tokens)[0])


def _reply_words(text: str, limit: Any) -> tuple[list[str], str]:
    words = text.split() or ["ok"]
    if isinstance(limit, int) and 0 < limit < len(words):
        return words[:limit], "length"
    return words, "stop"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _embedding_texts(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):  # one token array
            return [" ".join(map(str, value))]
        return [v if isinstance(v, str) else " ".join(map(str, v)) for v in value]
    return None


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _chat_chunks(meta: dict[str, Any], words: list[str], finish: str, body: dict[str, Any],
                 prompt_tokens: int) -> Iterator[dict[str, Any]]:
    base = {**meta, "object": "chat.completion.chunk", "system_fingerprint": "fake"}
    n = int(body.get("n") or 1)

    def chunk(i: int, delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    for i in range(n):
        yield chunk(i, {"role": "assistant", "content": ""})
    for pos, word in enumerate(words):
        for i in range(n):
            yield chunk(i, {"content": word if pos == 0 else f" {word}"})
    for i in range(n):
        yield chunk(i, {}, finish)
    if _include_usage(body):
        yield {**base, "choices": [], "usage": _usage(prompt_tokens, len(words) * n)}


def _response_events(response: dict[str, Any], words: list[str]) -> Iterator[dict[str, Any]]:
    sequence = count()
    message = response["output"][0]
    opening = {**response, "status": "in_progress", "output": [], "usage": None}
    yield {"type": "response.created", "response": opening, "sequence_number": next(sequence)}
    yield {"type": "response.output_item.added", "output_index": 0, "sequence_number": next(sequence),
           "item": {**message, "status": "in_progress", "content": []}}
    yield {"type": "response.content_part.added", "item_id": message["id"], "output_index": 0,
           "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []},
           "sequence_number": next(sequence)}
    for pos, word in enumerate(words):
        yield {"type": "response.output_text.delta", "item_id": message["id"], "output_index": 0,
               "content_index": 0, "delta": word if pos == 0 else f" {word}",
               "sequence_number": next(sequence)}
    yield {"type": "response.output_text.done", "item_id": message["id"], "output_index": 0,
           "content_index": 0, "text": message["content"][0]["text"], "sequence_number": next(sequence)}
    yield {"type": "response.content_part.done", "item_id": message["id"], "output_index": 0,
           "content_index": 0, "part": message["content"][0], "sequence_number": next(sequence)}
    yield {"type": "response.output_item.done", "output_index": 0, "item": message,
           "sequence_number": next(sequence)}
    yield {"type": f"response.{response['status']}", "response": response, "sequence_number": next(sequence)}


def _completion_chunks(meta: dict[str, Any], replies: list[tuple[list[str], str]], body: dict[str, Any],
                       prompt_tokens: int) -> Iterator[dict[str, Any]]:
    def chunk(i: int, text: str, reason: str | None = None) -> dict[str, Any]:
        return {**meta, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}]}

    for i, (words, finish) in enumerate(replies):
        for pos, word in enumerate(words):
            yield chunk(i, word if pos == 0 else f" {word}")
        yield chunk(i, "", finish)
    if _include_usage(body):
        yield {**meta, "choices": [], "usage": _usage(prompt_tokens, sum(len(w) for w, _ in replies))}


# -- ASGI helpers -------------------------------------------------------------------------------


def _error(message: str, kind: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _kind(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


async def _read_body(receive: Receive) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def _send_json(send: Send, status: int, payload: Any, headers: dict[str, str]) -> None:
    data = json.dumps(payload, separators=(",", ":")).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": data})


async def _send_event(send: Send, payload: dict[str, Any]) -> None:
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    if "type" in payload:  # the Responses API names each event
        data = b"event: " + str(payload["type"]).encode() + b"\n" + data
    await send({"type": "http.response.body", "body": data, "more_body": True})
