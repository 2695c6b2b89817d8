"""The ingress app in-process (no Ray): real key store, real fake-upstream HTTP, real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from serve_app.auth.keystore import KeyStore
from serve_app.auth.service import AuthService
from serve_app.cache.semantic import SemanticIndex
from serve_app.ingress.app import create_app
from serve_app.ingress.gateway import Gateway, build_in_process_gateway
from serve_app.routing.classifier import EmbeddingClassifier
from serve_app.settings import Settings
from tests.conftest import REDIS_URL, write_configs
from tests.support.fake_upstream import FakeUpstream

UNTRUSTED = ("203.0.113.9", 4321)
TRUSTED = ("127.0.0.1", 4321)


@pytest.fixture
async def gateway(tmp_path: Path, fake_upstream: FakeUpstream, prompt_classifier: EmbeddingClassifier,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("IIR_TEST_UPSTREAM_KEY", str(fake_upstream.api_key))
    configs = write_configs(tmp_path, fake_upstream.base_url, local=False)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'keys.db'}", redis_url=REDIS_URL,
                        max_request_bytes=64 * 1024, **configs)
    store = KeyStore(settings.database_url_plain())
    store.create_schema()
    auth = AuthService(store, redis_url=settings.redis_url, redis_timeout_s=settings.redis_timeout_s)
    # The semantic cache's index shares the classifier's MiniLM, loaded once per session.
    semantic = SemanticIndex(prompt_classifier.embedder, threshold=settings.semantic_cache_threshold)
    gw = build_in_process_gateway(settings, verifier=auth, key_admin=auth,
                                  classifier=prompt_classifier, semantic=semantic)
    yield gw
    await auth.close()
    store.close()


@contextlib.asynccontextmanager
async def serving(settings: Settings, classifier: EmbeddingClassifier, *, ready_within_s: float = 120
                  ) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    """A whole in-process gateway on ``settings`` (its own key store), started, ready, and a trusted
    client for it."""
    store = KeyStore(settings.database_url_plain())
    store.create_schema()
    auth = AuthService(store, redis_url=settings.redis_url, redis_timeout_s=settings.redis_timeout_s)
    gateway = build_in_process_gateway(settings, verifier=auth, key_admin=auth, classifier=classifier)
    app = create_app(gateway)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, client=TRUSTED), base_url="http://iir.test",
                timeout=120) as client:
            deadline = time.monotonic() + ready_within_s
            while (await client.get("/ready")).status_code != 200:
                assert time.monotonic() < deadline, "the gateway never became ready"
                await asyncio.sleep(0.2)
            yield gateway, client
    finally:
        await auth.close()
        store.close()


def client_for(gateway: Gateway, peer: tuple[str, int] = TRUSTED) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(gateway), client=peer)
    return httpx.AsyncClient(transport=transport, base_url="http://iir.test")


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(gateway)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=TRUSTED)
        async with httpx.AsyncClient(transport=transport, base_url="http://iir.test") as c:
            yield c


@pytest.fixture
async def api_key(client: httpx.AsyncClient) -> str:
    r = await client.post("/api/v1/apikeys", json={"description": "test", "priority": 10})
    assert r.status_code == 201, r.text
    return str(r.json()["api_key"])


@pytest.fixture
def auth_headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}
