"""The exact response cache in-process, against real Redis and a real upstream that counts its calls."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from serve_app.auth.keystore import KeyStore
from serve_app.auth.service import AuthService
from serve_app.cache.exact import HotEntries
from serve_app.ingress.app import create_app
from serve_app.ingress.gateway import Gateway, build_in_process_gateway
from serve_app.routing.classifier import EmbeddingClassifier
from serve_app.settings import Settings
from tests.conftest import REDIS_URL, write_configs
from tests.ingress.conftest import TRUSTED
from tests.support.fake_upstream import FakeUpstream


def ask(marker: str, **extra: Any) -> dict[str, Any]:
    question = {"role": "user", "content": f"Capital of France? {marker}"}
    return {"model": "fake/echo-chat", "messages": [question], **extra}


def upstream_calls(upstream: FakeUpstream, marker: str) -> int:
    return sum(1 for r in upstream.requests if marker in json.dumps(r.body))


async def post(client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any],
               **more: str) -> httpx.Response:
    r = await client.post("/v1/chat/completions", headers={**headers, **more}, json=body)
    assert r.status_code == 200, r.text
    return r


async def settle(gateway: Gateway) -> None:
    assert gateway.cache is not None
    await gateway.cache.flush()  # stores happen after the response, off its path


async def test_a_repeated_deterministic_request_is_a_hit(gateway: Gateway, client: httpx.AsyncClient,
                                                         auth_headers: dict[str, str],
                                                         fake_upstream: FakeUpstream) -> None:
    marker = uuid.uuid4().hex
    first = await post(client, auth_headers, ask(marker, temperature=0))
    assert first.headers["x-iir-cache"] == "miss"
    await settle(gateway)
    second = await post(client, auth_headers, ask(marker, temperature=0))
    assert second.headers["x-iir-cache"] == "hit"
    assert second.json() == first.json()  # usage included: what the answer cost when it was made
    assert upstream_calls(fake_upstream, marker) == 1
    seeded = await post(client, auth_headers, ask(marker, seed=7))  # a seed is deterministic too
    assert seeded.headers["x-iir-cache"] == "miss"


async def test_what_changes_the_answer_changes_the_key(gateway: Gateway, client: httpx.AsyncClient,
                                                       auth_headers: dict[str, str]) -> None:
    marker = uuid.uuid4().hex
    await post(client, auth_headers, ask(marker, temperature=0))
    await settle(gateway)
    other_model = {**ask(marker, temperature=0), "model": "fake/echo-code"}
    for variant in (ask(marker, temperature=0, max_tokens=3), ask(marker, temperature=0, stop=["."]),
                    ask(marker + "!", temperature=0), other_model,
                    ask(marker, temperature=0, response_format={"type": "json_object"})):
        r = await post(client, auth_headers, variant)
        assert r.headers["x-iir-cache"] == "miss", variant


async def test_sampled_requests_bypass_unless_the_caller_opts_in(
        gateway: Gateway, client: httpx.AsyncClient, auth_headers: dict[str, str],
        fake_upstream: FakeUpstream) -> None:
    marker = uuid.uuid4().hex
    for _ in range(2):
        assert (await post(client, auth_headers, ask(marker))).headers["x-iir-cache"] == "bypass"
    assert upstream_calls(fake_upstream, marker) == 2
    opted = ask(marker, temperature=0.9)
    assert (await post(client, auth_headers, opted, **{"x-iir-cache": "on"})).headers["x-iir-cache"] == "miss"
    await settle(gateway)
    assert (await post(client, auth_headers, opted, **{"x-iir-cache": "on"})).headers["x-iir-cache"] == "hit"


async def test_cache_control_is_honoured(gateway: Gateway, client: httpx.AsyncClient,
                                         auth_headers: dict[str, str], fake_upstream: FakeUpstream) -> None:
    marker = uuid.uuid4().hex
    body = ask(marker, temperature=0)
    r = await post(client, auth_headers, body, **{"cache-control": "no-store"})
    assert r.headers["x-iir-cache"] == "bypass"
    await settle(gateway)
    assert (await post(client, auth_headers, body)).headers["x-iir-cache"] == "miss"  # nothing was stored
    await settle(gateway)
    fresh = await post(client, auth_headers, body, **{"cache-control": "no-cache"})
    assert fresh.headers["x-iir-cache"] == "bypass"  # not read...
    assert upstream_calls(fake_upstream, marker) == 3
    await settle(gateway)
    assert (await post(client, auth_headers, body)).headers["x-iir-cache"] == "hit"  # ...but stored


async def test_each_api_key_has_its_own_entries(gateway: Gateway, client: httpx.AsyncClient,
                                                auth_headers: dict[str, str]) -> None:
    marker = uuid.uuid4().hex
    await post(client, auth_headers, ask(marker, temperature=0))
    await settle(gateway)
    other = (await client.post("/api/v1/apikeys", json={"description": "other tenant"})).json()["api_key"]
    r = await post(client, {"Authorization": f"Bearer {other}"}, ask(marker, temperature=0))
    assert r.headers["x-iir-cache"] == "miss"


async def test_a_stream_is_replayed_as_a_stream(gateway: Gateway, client: httpx.AsyncClient,
                                                auth_headers: dict[str, str],
                                                fake_upstream: FakeUpstream) -> None:
    marker = uuid.uuid4().hex
    body = ask(marker, temperature=0, stream=True)
    bodies = []
    for expected in ("miss", "hit"):
        async with client.stream("POST", "/v1/chat/completions", headers=auth_headers, json=body) as r:
            assert r.status_code == 200 and r.headers["x-iir-cache"] == expected
            assert r.headers["content-type"].startswith("text/event-stream")
            bodies.append((await r.aread()).decode())
        await settle(gateway)
    assert bodies[0] == bodies[1] and bodies[1].rstrip().endswith("data: [DONE]")
    assert upstream_calls(fake_upstream, marker) == 1
    # The JSON form of the same request is its own entry.
    assert (await post(client, auth_headers, ask(marker, temperature=0))).headers["x-iir-cache"] == "miss"


async def test_failures_and_cut_streams_are_never_stored(gateway: Gateway, client: httpx.AsyncClient,
                                                         auth_headers: dict[str, str],
                                                         fake_upstream: FakeUpstream) -> None:
    marker = uuid.uuid4().hex
    fake_upstream.fail_next(400, "boom")  # not retried (a 500 would be, and then answered)
    failed = await client.post("/v1/chat/completions", headers=auth_headers, json=ask(marker, temperature=0))
    assert failed.status_code == 400
    await settle(gateway)
    assert (await post(client, auth_headers, ask(marker, temperature=0))).headers["x-iir-cache"] == "miss"

    streamed = ask(marker, temperature=0, stream=True)
    fake_upstream.cut_next_stream(after_chunks=2)
    async with client.stream("POST", "/v1/chat/completions", headers=auth_headers, json=streamed) as r:
        text = (await r.aread()).decode()
    assert "[DONE]" not in text
    await settle(gateway)
    async with client.stream("POST", "/v1/chat/completions", headers=auth_headers, json=streamed) as r:
        assert r.headers["x-iir-cache"] == "miss"
        await r.aread()


@pytest.fixture
async def client_with(tmp_path: Path, fake_upstream: FakeUpstream, prompt_classifier: EmbeddingClassifier,
                      monkeypatch: pytest.MonkeyPatch) -> Any:
    """An app with its own cache settings (``IIR_CACHE_*``, Redis URL)."""
    monkeypatch.setenv("IIR_TEST_UPSTREAM_KEY", str(fake_upstream.api_key))
    opened: list[tuple[KeyStore, AuthService]] = []

    async def make(**overrides: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
        folder = tmp_path / uuid.uuid4().hex
        folder.mkdir()
        settings = Settings(database_url=f"sqlite:///{folder / 'keys.db'}",
                            **write_configs(folder, fake_upstream.base_url, local=False), **overrides)
        store = KeyStore(settings.database_url_plain())
        store.upgrade()
        auth = AuthService(store, redis_url=None, redis_timeout_s=0.1)
        opened.append((store, auth))
        gateway = build_in_process_gateway(settings, verifier=auth, key_admin=auth,
                                           classifier=prompt_classifier)
        app = create_app(gateway)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=TRUSTED)
            async with httpx.AsyncClient(transport=transport, base_url="http://iir.test") as c:
                key = (await c.post("/api/v1/apikeys", json={"description": "cache"})).json()["api_key"]
                c.headers["Authorization"] = f"Bearer {key}"
                yield c, gateway

    yield make
    for store, auth in opened:
        await auth.close()
        store.close()


async def test_without_redis_at_start_an_in_process_lru_serves(client_with: Any) -> None:
    async for client, gateway in client_with(redis_url="redis://127.0.0.1:1/0", cache_backend="auto"):
        assert gateway.cache is not None and gateway.cache.store.name == "memory"
        marker = uuid.uuid4().hex
        await post(client, {}, ask(marker, temperature=0))
        await settle(gateway)
        assert (await post(client, {}, ask(marker, temperature=0))).headers["x-iir-cache"] == "hit"
        assert (await client.get("/ready")).json()["response_cache"].startswith("memory")


async def test_redis_down_means_no_cache_quickly_never_an_error(client_with: Any) -> None:
    async for client, gateway in client_with(redis_url="redis://127.0.0.1:1/0", cache_backend="redis"):
        assert gateway.cache is not None and gateway.cache.store.name == "redis"
        marker = uuid.uuid4().hex
        started = time.perf_counter()
        for _ in range(20):
            r = await post(client, {}, ask(marker, temperature=0))
            assert r.headers["x-iir-cache"] == "bypass"
        assert time.perf_counter() - started < 5  # one timeout at most, then the breaker skips Redis
        assert gateway.cache.stats.errors == 1 and gateway.cache.stats.bypasses == 20
        ready = (await client.get("/ready")).json()
        assert ready["response_cache"].startswith("degraded")


async def test_redis_comes_back_by_itself(client_with: Any) -> None:
    async for client, gateway in client_with(redis_url=REDIS_URL, cache_backend="redis"):
        assert gateway.cache is not None
        marker = uuid.uuid4().hex
        gateway.cache.store._guard.failed(ConnectionError("simulated outage"))  # noqa: SLF001
        assert (await post(client, {}, ask(marker, temperature=0))).headers["x-iir-cache"] == "bypass"
        deadline = time.monotonic() + 10
        while not gateway.cache.store.available:
            assert time.monotonic() < deadline, "the cache did not come back"
            await asyncio.sleep(0.1)
        assert (await post(client, {}, ask(marker, temperature=0))).headers["x-iir-cache"] == "miss"


async def _only_in_redis_until(client: httpx.AsyncClient, gateway: Gateway, marker: str) -> None:
    """Store an entry, then delete it from Redis: what answers next can only be the ingress's copy."""
    assert (await post(client, {}, ask(marker, temperature=0))).headers["x-iir-cache"] == "miss"
    await settle(gateway)
    redis = Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in redis.scan_iter("iir:rc:*")]
        stored = [k for k in keys if marker.encode() in (await redis.get(k) or b"")]
        assert len(stored) == 1
        await redis.delete(*stored)
    finally:
        await redis.aclose()


async def test_recent_entries_answer_from_the_ingress_without_redis(client_with: Any,
                                                                    fake_upstream: FakeUpstream) -> None:
    async for client, gateway in client_with(redis_url=REDIS_URL, cache_backend="redis"):
        marker = uuid.uuid4().hex
        await _only_in_redis_until(client, gateway, marker)
        hit = await post(client, {}, ask(marker, temperature=0))
        assert hit.headers["x-iir-cache"] == "hit" and upstream_calls(fake_upstream, marker) == 1
    async for client, gateway in client_with(redis_url=REDIS_URL, cache_backend="redis",
                                             cache_local_max_bytes=0):
        marker = uuid.uuid4().hex
        await _only_in_redis_until(client, gateway, marker)
        assert (await post(client, {}, ask(marker, temperature=0))).headers["x-iir-cache"] == "miss"


async def test_the_ingress_copy_lives_no_longer_than_its_ttl_or_the_entry(client_with: Any) -> None:
    async for client, gateway in client_with(redis_url=REDIS_URL, cache_backend="redis",
                                             cache_local_ttl_s=0.5):
        marker = uuid.uuid4().hex
        await _only_in_redis_until(client, gateway, marker)
        await asyncio.sleep(0.6)
        assert (await post(client, {}, ask(marker, temperature=0))).headers["x-iir-cache"] == "miss"
    async for client, gateway in client_with(redis_url=REDIS_URL, cache_backend="redis", cache_ttl_s=1):
        marker = uuid.uuid4().hex
        await post(client, {}, ask(marker, temperature=0))
        await settle(gateway)
        assert (await post(client, {}, ask(marker, temperature=0))).headers["x-iir-cache"] == "hit"
        await asyncio.sleep(1.1)  # the entry's own TTL, shorter than the copy's 10 s
        assert (await post(client, {}, ask(marker, temperature=0))).headers["x-iir-cache"] == "miss"


def test_the_ingress_copy_is_bounded_in_bytes_and_keeps_the_most_recent() -> None:
    hot = HotEntries(max_bytes=250, ttl_s=10)
    later = time.time() + 60
    for name in ("a", "b"):
        hot.put(name, {"kind": "json", "body": name, "expires_at": later}, 100)
    assert hot.get("a") is not None  # now the most recent
    hot.put("c", {"kind": "json", "body": "c", "expires_at": later}, 100)  # 300 > 250: "b" goes
    assert hot.get("b") is None and hot.get("a") is not None and hot.get("c") is not None
    hot.put("huge", {"kind": "json", "body": "x", "expires_at": later}, 251)  # never fits
    assert hot.get("huge") is None and hot.get("a") is not None
    hot.put("old", {"kind": "json", "body": "x"}, 10)  # no expiry recorded: not kept
    assert hot.get("old") is None
