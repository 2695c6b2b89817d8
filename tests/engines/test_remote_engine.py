"""RemoteEngine against real HTTP servers: FakeUpstream (every failure mode) and llama-cpp-python's server."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from serve_app.engines.remote import RemoteEngine, UpstreamClient, make_http_client
from serve_app.errors import (
    InvalidRequest,
    ModelNotFound,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
)
from serve_app.registry.catalog import ModelSpec, ProviderSpec
from serve_app.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from tests.support.fake_upstream import FakeUpstream, embedding_for, expected_reply
from tests.support.llama_server import MODEL_ALIAS, LlamaServer

KEY = "sk-test-upstream-key"
PROMPT = "one two three four five six"


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key=KEY) as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(upstream: FakeUpstream) -> None:
    upstream.reset()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    async with make_http_client(timeout_s=5, connect_timeout_s=1) as c:
        yield c


@pytest.fixture
def engine(upstream: FakeUpstream, client: UpstreamClient) -> RemoteEngine:
    return RemoteEngine(base_url=upstream.base_url, api_key=KEY, client=client, upstream_model="echo-1",
                        provider="fake")


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "fake/echo-chat", "messages": [{"role": "user", "content": PROMPT}], **fields})


async def collect(engine: RemoteEngine, request: ChatCompletionRequest | CompletionRequest) -> list[dict]:
    return [chunk async for chunk in engine.stream(request)]


def chat_text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


# -- pass-through -----------------------------------------------------------------------------------


async def test_generate_forwards_what_the_caller_sent_with_the_upstream_model_name(
        engine: RemoteEngine, upstream: FakeUpstream) -> None:
    request = chat(max_tokens=3, temperature=None, logit_bias={"50256": -100}, x_vendor_flag={"a": 1})
    result = await engine.generate(request)

    assert result["choices"][0]["message"]["content"] == expected_reply(PROMPT, 3)
    assert result["model"] == "echo-1"
    body = upstream.requests[-1].body
    assert body["model"] == "echo-1"
    assert body["logit_bias"] == {"50256": -100} and body["x_vendor_flag"] == {"a": 1}
    assert body["max_tokens"] == 3 and body["stream"] is False
    # Defaults we filled in (n=1) and explicit nulls ("use the default") are not sent.
    assert "n" not in body and "temperature" not in body and "stream_options" not in body


async def test_api_key_goes_in_the_authorization_header(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    await engine.generate(chat())
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(engine)


async def test_completion_request_default_max_tokens_is_not_forwarded(
        engine: RemoteEngine, upstream: FakeUpstream) -> None:
    result = await engine.generate(CompletionRequest(model="fake/echo", prompt=PROMPT, echo=False))
    assert result["object"] == "text_completion" and result["choices"][0]["text"] == PROMPT
    assert upstream.requests[-1].path == "/v1/completions"
    assert upstream.requests[-1].body == {"model": "echo-1", "prompt": PROMPT, "echo": False, "stream": False}


async def test_from_spec_reads_the_key_from_the_named_environment_variable(
        upstream: FakeUpstream, client: UpstreamClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_UPSTREAM_KEY", KEY)
    spec = ModelSpec(id="fake/echo-chat", engine="openai", task="chat", source="echo-2")
    provider = ProviderSpec(name="fake", base_url=upstream.base_url, api_key_env="FAKE_UPSTREAM_KEY")
    engine = RemoteEngine.from_spec(spec, provider, client)

    await engine.generate(chat())
    assert upstream.requests[-1].body["model"] == "echo-2"
    assert upstream.requests[-1].headers["authorization"] == f"Bearer {KEY}"


# -- streaming --------------------------------------------------------------------------------------


async def test_stream_yields_each_chunk_as_it_arrives(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    release = upstream.hold_next_stream(after_chunks=2)
    chunks = engine.stream(chat())
    # The upstream is paused after two chunks: we can only see them if nothing buffers the response.
    first = [await asyncio.wait_for(anext(chunks), 2) for _ in range(2)]
    release.set()
    rest = [c async for c in chunks]

    assert first[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chat_text(first + rest) == expected_reply(PROMPT)
    assert rest[-1]["choices"][0]["finish_reason"] == "stop"


async def test_stream_forwards_include_usage_and_passes_the_usage_chunk(
        engine: RemoteEngine, upstream: FakeUpstream) -> None:
    chunks = await collect(engine, chat(stream=True, stream_options={"include_usage": True}, max_tokens=2))

    body = upstream.requests[-1].body
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert chat_text(chunks) == expected_reply(PROMPT, 2)


async def test_completion_stream(engine: RemoteEngine) -> None:
    chunks = await collect(engine, CompletionRequest(model="fake/echo", prompt=PROMPT, max_tokens=4))
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected_reply(PROMPT, 4)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("break_stream", "delivered", "reason"), [
    pytest.param(lambda u: u.cut_next_stream(after_chunks=3), 3, "stream was cut", id="connection-cut"),
    pytest.param(lambda u: u.next_stream_error_event(after_chunks=3, message="GPU fell over"), 3,
                 "GPU fell over", id="error-event"),
    # role chunk + one per word + the finish chunk, then the body ends without [DONE]
    pytest.param(lambda u: u.next_stream_without_done(), len(PROMPT.split()) + 2, "without [DONE]",
                 id="no-done"),
])
async def test_a_broken_stream_raises_instead_of_ending(
        engine: RemoteEngine, upstream: FakeUpstream, break_stream: Any, delivered: int, reason: str) -> None:
    break_stream(upstream)
    received = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in engine.stream(chat()):
            received.append(chunk)

    assert info.value.code == "upstream_stream_interrupted" and info.value.status_code == 502
    assert reason in info.value.message
    assert len(received) == delivered  # what arrived before the break was passed on


async def test_stream_lines_may_end_in_crlf_split_across_reads(client: UpstreamClient) -> None:
    """SSE allows CRLF, CR or LF; a CRLF whose halves arrive in separate reads is one line end (two
    would end the event early: its two data lines are one JSON object)."""
    events = [b'data: {"choices": [{"delta":\r', b'\ndata: {"content": "a"}}]}\r\n\r\n',
              b'data: {"choices": [{"delta": {"content": "b"}}]}\r\r', b"data: [DONE]\r\n\r\n"]

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        for piece in events:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)  # each piece its own read
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        engine = RemoteEngine(base_url=f"http://127.0.0.1:{port}/v1", api_key=None, client=client)
        chunks = await collect(engine, chat())
    assert chat_text(chunks) == "ab"


async def test_stream_error_status_raises_before_the_first_chunk(
        engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.fail_next(429, "slow down", headers={"Retry-After": "3"})
    with pytest.raises(RateLimited) as info:
        await anext(engine.stream(chat()))
    assert info.value.headers == {"Retry-After": "3"}


# -- errors -----------------------------------------------------------------------------------------


async def test_upstream_429_is_rate_limited_with_retry_after(
        engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.fail_next(429, "Rate limit reached for requests in organization org-abcdef123456",
                       headers={"Retry-After": "7"})
    with pytest.raises(RateLimited) as info:
        await engine.generate(chat())
    assert info.value.status_code == 429 and info.value.headers == {"Retry-After": "7"}
    assert "Rate limit reached" in info.value.message and "org-abcdef123456" not in info.value.message


async def test_upstream_quota_exhaustion_is_not_the_callers_rate_limit(
        engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.fail_next(429, "You exceeded your current quota", code="insufficient_quota")
    with pytest.raises(UpstreamError, match="quota"):
        await engine.generate(chat())


async def test_upstream_500_is_an_upstream_error(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.fail_next(500, "The server had an error\nTraceback: /srv/app.py line 3")
    with pytest.raises(UpstreamError) as info:
        await engine.generate(chat())
    assert info.value.status_code == 502 and info.value.code == "upstream_error"
    assert "The server had an error" in info.value.message and "/srv/app.py" not in info.value.message


async def test_upstream_400_passes_its_message_to_the_caller(
        engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.fail_next(400, "'tools' is not supported by this model", code="unsupported_value")
    with pytest.raises(InvalidRequest) as info:
        await engine.generate(chat())
    assert info.value.message == "'tools' is not supported by this model"
    assert info.value.status_code == 400 and info.value.code == "unsupported_value"


async def test_rejected_upstream_key_is_not_reported_as_the_callers_401(
        upstream: FakeUpstream, client: UpstreamClient) -> None:
    engine = RemoteEngine(base_url=upstream.base_url, api_key="sk-wrong-key-0000", client=client)
    with pytest.raises(UpstreamError) as info:
        await engine.generate(chat())
    assert info.value.status_code == 502 and info.value.code == "upstream_auth_failed"
    assert "credentials" in info.value.message and "sk-wrong" not in info.value.message


async def test_unknown_upstream_model_is_model_not_found(client: UpstreamClient) -> None:
    with FakeUpstream(models=["real-model"]) as server:
        engine = RemoteEngine(base_url=server.base_url, api_key=None, client=client, upstream_model="nope")
        with pytest.raises(ModelNotFound, match="nope"):
            await engine.generate(chat())


async def test_connection_refused_has_a_clear_message(client: UpstreamClient) -> None:
    with FakeUpstream() as server:
        dead_url = server.base_url  # the port is free again once the server stops
    engine = RemoteEngine(base_url=dead_url, api_key=KEY, client=client, provider="fake")
    with pytest.raises(UpstreamError) as info:
        await engine.generate(chat())
    assert info.value.code == "upstream_unreachable"
    assert "could not connect to upstream 'fake': connection refused" in info.value.message


class _FailFirstConnect(aiohttp.TCPConnector):
    """aiohttp's own connector, whose first connection attempt fails with ``error``."""

    def __init__(self, error: type[Exception]) -> None:
        super().__init__()
        self.attempts = 0
        self._error = error

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        self.attempts += 1
        if self.attempts == 1:
            if self._error is aiohttp.ClientConnectorError:
                raise aiohttp.ClientConnectorError(req.connection_key, ConnectionRefusedError(111, "refused"))
            raise self._error()
        return await super()._create_connection(req, traces, timeout)


async def test_a_connection_the_upstream_dropped_is_redone_once(upstream: FakeUpstream) -> None:
    connector = _FailFirstConnect(aiohttp.ServerDisconnectedError)  # as a stale pooled connection
    async with UpstreamClient(5, 1, connector=lambda: connector) as flaky:
        engine = RemoteEngine(base_url=upstream.base_url, api_key=KEY, client=flaky)
        result = await engine.generate(chat())
    assert result["choices"][0]["message"]["content"] == expected_reply(PROMPT)
    assert connector.attempts == 2 and len(upstream.requests) == 1


async def test_a_refused_connect_fails_at_once_for_the_plan_to_retry(upstream: FakeUpstream) -> None:
    # Retrying a request (maybe on another model) is serve_app/routing/plan.py's business, not the engine's.
    connector = _FailFirstConnect(aiohttp.ClientConnectorError)
    async with UpstreamClient(5, 1, connector=lambda: connector) as flaky:
        engine = RemoteEngine(base_url=upstream.base_url, api_key=KEY, client=flaky)
        with pytest.raises(UpstreamError) as info:
            await engine.generate(chat())
    assert info.value.code == "upstream_unreachable" and "refused" in info.value.message
    assert connector.attempts == 1 and len(upstream.requests) == 0


async def test_a_read_timeout_is_not_retried(upstream: FakeUpstream) -> None:
    upstream.first_byte_delay_s = 0.5
    try:
        async with make_http_client(timeout_s=0.1, connect_timeout_s=1) as impatient:
            engine = RemoteEngine(base_url=upstream.base_url, api_key=KEY, client=impatient)
            with pytest.raises(UpstreamError) as info:
                await engine.generate(chat())
    finally:
        upstream.first_byte_delay_s = 0.0
    assert info.value.code == "upstream_timeout"
    assert len(upstream.requests) == 1


# -- embeddings, generic, health --------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [pytest.param("float", id="float"), pytest.param("base64", id="base64")])
async def test_embeddings(engine: RemoteEngine, upstream: FakeUpstream, encoding: str) -> None:
    request = EmbeddingRequest(model="fake/embed", input=["hello world", "bye"], encoding_format=encoding)
    result = await engine.embed(request)

    vectors = [item["embedding"] for item in result["data"]]
    if encoding == "base64":
        vectors = [list(struct.unpack("<16f", base64.b64decode(v))) for v in vectors]
    assert vectors == [embedding_for("hello world"), embedding_for("bye")]
    assert upstream.requests[-1].path == "/v1/embeddings"
    assert upstream.requests[-1].body["model"] == "echo-1"


async def test_embedding_default_encoding_is_not_forwarded(
        engine: RemoteEngine, upstream: FakeUpstream) -> None:
    await engine.embed(EmbeddingRequest(model="fake/embed", input="hi", dimensions=4))
    assert upstream.requests[-1].body == {"model": "echo-1", "input": "hi", "dimensions": 4}


async def test_infer_posts_the_payload_to_the_endpoint(
        upstream: FakeUpstream, client: UpstreamClient) -> None:
    engine = RemoteEngine(base_url=upstream.root_url, api_key=KEY, client=client, endpoint="/generic/echo")
    payload = {"prompt": "a cat", "duration_s": 3, "nested": {"x": [1, 2]}}

    assert await engine.infer(payload) == {"echo": payload}
    assert upstream.requests[-1].path == "/generic/echo"
    with pytest.raises(InvalidRequest):
        await engine.generate(chat())


async def test_infer_is_refused_without_an_endpoint(engine: RemoteEngine) -> None:
    with pytest.raises(InvalidRequest):
        await engine.infer({"x": 1})


async def test_health(engine: RemoteEngine, upstream: FakeUpstream, client: UpstreamClient) -> None:
    await engine.check_health()
    assert upstream.requests[-1].path == "/v1/models"

    upstream.fail_next(503)
    with pytest.raises(ServiceUnavailable, match="HTTP 503"):
        await engine.check_health()

    wrong_key = RemoteEngine(base_url=upstream.base_url, api_key="sk-nope", client=client)
    with pytest.raises(ServiceUnavailable, match="HTTP 401"):
        await wrong_key.check_health()


async def test_health_without_the_configured_key(
        upstream: FakeUpstream, client: UpstreamClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FAKE_UPSTREAM_KEY", raising=False)
    spec = ModelSpec(id="fake/echo-chat", engine="openai", task="chat")
    provider = ProviderSpec(name="fake", base_url=upstream.base_url, api_key_env="FAKE_UPSTREAM_KEY")
    engine = RemoteEngine.from_spec(spec, provider, client)
    with pytest.raises(ServiceUnavailable, match="FAKE_UPSTREAM_KEY is not set"):
        await engine.check_health()


# -- a real upstream: llama-cpp-python's OpenAI server ----------------------------------------------


@pytest.fixture
async def llama_engine(llama_server: LlamaServer) -> AsyncIterator[RemoteEngine]:
    # CPU inference on a busy CI machine can take seconds: a roomier timeout than the fake's.
    async with make_http_client(timeout_s=60, connect_timeout_s=2) as client:
        yield RemoteEngine(base_url=llama_server.base_url, api_key=None, client=client,
                           upstream_model=MODEL_ALIAS, provider="llama")


async def test_llama_server_chat(llama_engine: RemoteEngine) -> None:
    result = await llama_engine.generate(chat(max_tokens=6, temperature=0))
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"]["content"].strip()
    assert 0 < result["usage"]["completion_tokens"] <= 6
    await llama_engine.check_health()


async def test_llama_server_stream(llama_engine: RemoteEngine) -> None:
    chunks = await collect(llama_engine, chat(max_tokens=6, temperature=0, stream=True))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chat_text(chunks).strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
