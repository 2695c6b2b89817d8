"""Rate limits and usage accounting through the ingress app: real Redis, key store and upstream."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from serve_app.auth.keystore import KeyStore
from serve_app.auth.service import AuthService
from serve_app.ingress.app import create_app
from serve_app.ingress.gateway import Gateway, build_in_process_gateway
from serve_app.routing.classifier import EmbeddingClassifier
from serve_app.settings import Settings
from tests.conftest import REDIS_URL, write_configs
from tests.ingress.conftest import TRUSTED
from tests.support.fake_upstream import FakeUpstream
from tests.support.tcp_proxy import TcpProxy, unused_port

CHAT = {"model": "fake/echo-chat", "messages": [{"role": "user", "content": "hello there friend"}]}
CHAT_TOKENS = 6  # the fake upstream: 3 prompt words in, the same 3 words out
ROUTES = [
    pytest.param("/v1/chat/completions", CHAT, id="chat"),
    pytest.param("/v1/completions", {"model": "fake/echo-chat", "prompt": "a b"}, id="completions"),
    pytest.param("/v1/embeddings", {"model": "fake/echo-embed", "input": "a b"}, id="embeddings"),
    pytest.param("/infer", {"model": "fake/musicgen", "input": {"prompt": "lofi"}}, id="infer"),
    pytest.param("/v1/classify", {"input": "write a haiku about rain"}, id="classify"),
]


@dataclass
class Ingress:
    client: httpx.AsyncClient
    gateway: Gateway
    auth: AuthService

    async def new_key(self, **rate_limit: int) -> tuple[str, dict[str, str]]:
        body: dict[str, Any] = {"description": "limits test"}
        if rate_limit:
            body["rate_limit"] = rate_limit
        r = await self.client.post("/api/v1/apikeys", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"], {"Authorization": f"Bearer {r.json()['api_key']}"}

    async def usage(self, key_id: str, headers: dict[str, str]) -> dict[str, Any]:
        await self.gateway.usage.flush()
        r = await self.client.get(f"/api/v1/apikeys/{key_id}/usage", headers=headers)
        assert r.status_code == 200, r.text
        return dict(r.json())


Serve = Callable[..., AbstractAsyncContextManager[Ingress]]


@pytest.fixture
async def serve(tmp_path: Path, fake_upstream: FakeUpstream, prompt_classifier: EmbeddingClassifier,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Serve]:
    """Start an ingress app in-process; its rate-limit counters live under a prefix of this test's own."""
    monkeypatch.setenv("IIR_TEST_UPSTREAM_KEY", str(fake_upstream.api_key))
    prefix = f"iir-test:{uuid.uuid4().hex}:"

    @asynccontextmanager
    async def start(redis_url: str = REDIS_URL, **overrides: Any) -> AsyncIterator[Ingress]:
        folder = tmp_path / uuid.uuid4().hex
        folder.mkdir()
        settings = Settings(database_url=f"sqlite:///{folder / 'keys.db'}", redis_url=redis_url,
                            rate_limit_key_prefix=prefix, usage_flush_interval_s=0.05,
                            **write_configs(folder, fake_upstream.base_url, local=False), **overrides)
        store = KeyStore(settings.database_url_plain())
        store.create_schema()
        auth = AuthService(store, redis_url=settings.redis_url, redis_timeout_s=settings.redis_timeout_s)
        gateway = build_in_process_gateway(settings, verifier=auth, key_admin=auth,
                                     classifier=prompt_classifier)
        app = create_app(gateway)
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app, client=TRUSTED)
                async with httpx.AsyncClient(transport=transport, base_url="http://iir.test") as client:
                    yield Ingress(client, gateway, auth)
        finally:
            await auth.close()
            store.close()

    yield start
    async with Redis.from_url(REDIS_URL) as redis:
        stale = [k async for k in redis.scan_iter(match=prefix + "*")]
        if stale:
            await redis.delete(*stale)


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line]


@pytest.mark.parametrize(("path", "body"), ROUTES)
async def test_every_model_route_answers_429_past_the_limit(serve: Serve, fake_upstream: FakeUpstream,
                                                            path: str, body: dict[str, Any]) -> None:
    async with serve() as ingress:
        _, headers = await ingress.new_key(requests_per_minute=2)
        answers = [await ingress.client.post(path, headers=headers, json=body) for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 200], answers[-1].text
        assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["1", "0"]
        assert answers[0].headers["x-ratelimit-limit-requests"] == "2"
        seen = len(fake_upstream.requests)
        refused = await ingress.client.post(path, headers=headers, json=body)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-limit-requests"] == "2"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert 1 <= int(refused.headers["retry-after"]) <= 120
    assert len(fake_upstream.requests) == seen  # refused before the model was called


async def test_tokens_limit_is_reached_by_real_usage(serve: Serve) -> None:
    async with serve() as ingress:
        key_id, headers = await ingress.new_key(tokens_per_minute=3 * CHAT_TOKENS - 1)
        remaining = []
        for stream in (False, True, False):  # a stream's tokens count too, though the client didn't ask
            r = await ingress.client.post("/v1/chat/completions", headers=headers,
                                          json={**CHAT, "stream": stream})
            assert r.status_code == 200, r.text
            remaining.append(int(r.headers["x-ratelimit-remaining-tokens"]))
            await ingress.gateway.limiter.flush()
        refused = await ingress.client.post("/v1/chat/completions", headers=headers, json=CHAT)
    assert remaining == [17, 11, 5]
    assert refused.status_code == 429 and "TPM" in refused.json()["error"]["message"]
    assert refused.headers["x-ratelimit-limit-tokens"] == "17"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert "x-ratelimit-limit-requests" not in refused.headers and int(refused.headers["retry-after"]) >= 1


async def test_stream_usage_is_counted_but_shown_only_when_asked(serve: Serve,
                                                                 fake_upstream: FakeUpstream) -> None:
    async with serve() as ingress:
        key_id, headers = await ingress.new_key()
        plain = await ingress.client.post("/v1/chat/completions", headers=headers,
                                          json={**CHAT, "stream": True})
        forwarded = fake_upstream.requests[-1].body
        asked = await ingress.client.post("/v1/chat/completions", headers=headers, json={
            **CHAT, "stream": True, "stream_options": {"include_usage": True}})
        usage = await ingress.usage(key_id, headers)
    assert forwarded["stream_options"] == {"include_usage": True}  # asked upstream on the client's behalf
    events = sse_events(plain.text)
    assert events[-1] == "[DONE]" and all("usage" not in json.loads(e) for e in events[:-1])
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == "hello there friend"
    with_usage = [json.loads(e) for e in sse_events(asked.text)[:-1] if "usage" in json.loads(e)]
    assert [(u["choices"], u["usage"]["total_tokens"]) for u in with_usage] == [([], CHAT_TOKENS)]
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (2, 6, 6)


async def test_usage_of_every_route_reaches_the_key_store(serve: Serve) -> None:
    async with serve() as ingress:
        key_id, headers = await ingress.new_key()
        for path, body in [(p.values[0], p.values[1]) for p in ROUTES]:
            r = await ingress.client.post(str(path), headers=headers, json=body)
            assert r.status_code == 200, r.text
        # The background flush (every 50 ms here) delivers it, no explicit flush; a busy box may take longer.
        deadline = time.monotonic() + 5
        while True:
            await asyncio.sleep(0.1)
            usage = (await ingress.client.get(f"/api/v1/apikeys/{key_id}/usage", headers=headers)).json()
            if usage["requests"] >= 4 or time.monotonic() > deadline:
                break
    # chat 3+3, completions 2+2 (echo), embeddings 2 prompt tokens, generic infer: a request, no tokens
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (4, 7, 5)
    assert usage["last_used_at"] is not None


async def test_unlimited_key_sends_nothing_to_redis(serve: Serve) -> None:
    proxy = TcpProxy("127.0.0.1", 6379)  # everything the ingress says to Redis goes through here
    await proxy.start()
    try:
        async with serve(proxy.url) as ingress:
            _, free = await ingress.new_key()
            for _ in range(20):
                assert (await ingress.client.post("/v1/chat/completions", headers=free, json=CHAT)).is_success
            await asyncio.sleep(0.1)
            unlimited_traffic = bytes(proxy.sent).upper()
            _, limited = await ingress.new_key(requests_per_minute=100, tokens_per_minute=10_000)
            r = await ingress.client.post("/v1/chat/completions", headers=limited, json=CHAT)
            await ingress.gateway.limiter.flush()
            limited_traffic = bytes(proxy.sent).upper()
    finally:
        await proxy.stop()
    assert r.headers["x-ratelimit-remaining-requests"] == "99"
    for command in (b"EVALSHA", b"EVAL", b"HSET", b"HMGET", b"INCR"):
        assert command not in unlimited_traffic
    assert limited_traffic.count(b"EVALSHA") >= 2  # the check, and the tokens after the response


async def timed(call: Callable[[], Awaitable[httpx.Response]], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        r = await call()
        out.append(time.perf_counter() - started)
        assert r.status_code == 200 and "x-ratelimit-limit-requests" not in r.headers, r.text
    return out


@pytest.mark.parametrize("outage", [pytest.param("refused", id="redis-down"),
                                    pytest.param("hung", id="redis-hung")])
async def test_without_redis_limited_keys_pass_unchecked_and_quickly(serve: Serve, outage: str) -> None:
    hung = TcpProxy("127.0.0.1", 9)
    hung.silent = True
    await hung.start()
    url = hung.url if outage == "hung" else f"redis://127.0.0.1:{unused_port()}/0"
    try:
        async with serve(url, redis_timeout_s=0.5) as ingress:
            _, free = await ingress.new_key()
            _, limited = await ingress.new_key(requests_per_minute=1)
            def chat(headers: dict[str, str]) -> Callable[[], Awaitable[httpx.Response]]:
                return lambda: ingress.client.post("/v1/chat/completions", headers=headers, json=CHAT)

            await timed(chat(limited), 1)  # warms the key cache, and finds Redis away
            await timed(chat(free), 5)
            baseline = await timed(chat(free), 30)
            unchecked = await timed(chat(limited), 30)
            limiter = ingress.gateway.limiter
    finally:
        await hung.stop()
    added_p50 = statistics.median(unchecked) - statistics.median(baseline)
    print(f"\nRedis {outage}: baseline p50 {statistics.median(baseline) * 1e3:.2f} ms, "
          f"limited key p50 {statistics.median(unchecked) * 1e3:.2f} ms, max {max(unchecked) * 1e3:.2f} ms")
    assert limiter.fail_open_total == 31 and limiter.outages == 1  # 1 request over the limit, all through
    assert added_p50 < 0.005  # once Redis is known to be away, a check costs nothing measurable
    assert max(unchecked) < 0.25  # and none waits on the 0.5 s timeout again
