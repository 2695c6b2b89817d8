"""The gateway in front of a real remote upstream: llama.cpp's own OpenAI-compatible server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from serve_app.auth.keystore import KeyStore
from serve_app.auth.service import AuthService
from serve_app.ingress.app import create_app
from serve_app.ingress.gateway import build_in_process_gateway
from serve_app.routing.classifier import EmbeddingClassifier
from serve_app.settings import Settings
from tests.conftest import write_configs
from tests.ingress.conftest import TRUSTED
from tests.support.fake_upstream import FakeUpstream
from tests.support.llama_server import LlamaServer

MODEL = "llamacpp/smollm2-135m"
ASK = {"model": MODEL, "max_tokens": 8, "temperature": 0,
       "messages": [{"role": "user", "content": "What is the capital of France?"}]}


@pytest.fixture
async def client(tmp_path: Path, fake_upstream: FakeUpstream, llama_server: LlamaServer,
                 prompt_classifier: EmbeddingClassifier,
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("IIR_TEST_UPSTREAM_KEY", str(fake_upstream.api_key))
    configs = write_configs(tmp_path, fake_upstream.base_url, llama_server.base_url, local=False)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'keys.db'}", **configs)
    store = KeyStore(settings.database_url_plain())
    store.create_schema()
    auth = AuthService(store, redis_url=None, redis_timeout_s=0.1)
    gateway = build_in_process_gateway(settings, verifier=auth, key_admin=auth,
                                     classifier=prompt_classifier)
    app = create_app(gateway)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=TRUSTED)
        async with httpx.AsyncClient(transport=transport, base_url="http://iir.test", timeout=120) as c:
            key = (await c.post("/api/v1/apikeys", json={"description": "llama"})).json()["api_key"]
            c.headers["Authorization"] = f"Bearer {key}"
            yield c
    store.close()


async def test_chat_through_llama_server(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json=ASK)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == MODEL and body["choices"][0]["message"]["content"].strip()
    assert 0 < body["usage"]["completion_tokens"] <= 8


async def test_stream_through_llama_server(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/chat/completions", json={**ASK, "stream": True})
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["model"] == MODEL for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]).strip()
