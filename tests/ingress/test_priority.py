"""Key priority orders the queue in front of a full local model: the real SmolLM2 in-process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from serve_app.ingress.gateway import Gateway
from serve_app.routing.classifier import EmbeddingClassifier
from serve_app.settings import Settings
from tests.conftest import REDIS_URL, write_configs
from tests.ingress.conftest import serving
from tests.support.fake_upstream import FakeUpstream

MODEL = "local/smollm2-135m"


@contextlib.asynccontextmanager
async def serving_smollm2(tmp_path: Path, fake_upstream: FakeUpstream, classifier: EmbeddingClassifier,
                          max_ongoing_requests: int) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    configs = write_configs(tmp_path, fake_upstream.base_url)
    models = yaml.safe_load(configs["models_config"].read_text())
    models["models"] = [{**m, "max_ongoing_requests": max_ongoing_requests} if m["id"] == MODEL else m
                        for m in models["models"] if m["id"] != "local/minilm-l6-v2"]
    configs["models_config"].write_text(yaml.safe_dump(models))
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'keys.db'}", redis_url=REDIS_URL, **configs)
    async with serving(settings, classifier) as served:
        yield served


async def new_key(client: httpx.AsyncClient, priority: int) -> dict[str, str]:
    r = await client.post("/api/v1/apikeys", json={"description": "p", "priority": priority})
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


async def test_a_high_priority_key_overtakes_queued_low_priority_requests(
        tmp_path: Path, fake_upstream: FakeUpstream, prompt_classifier: EmbeddingClassifier,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No burst room (max_ongoing_requests 1): the order at the ingress's gate alone."""
    monkeypatch.setenv("IIR_TEST_UPSTREAM_KEY", str(fake_upstream.api_key))
    async with serving_smollm2(tmp_path, fake_upstream, prompt_classifier, 1) as (gateway, client):
        low, high = await new_key(client, 0), await new_key(client, 90)
        finished: list[str] = []

        async def ask(name: str, headers: dict[str, str], max_tokens: int) -> None:
            body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0.7,
                                    "messages": [{"role": "user", "content": f"Tell a story ({name})"}]}
            r = await client.post("/v1/chat/completions", headers=headers, json=body)
            assert r.status_code == 200, r.text
            finished.append(name)

        async def queued(n: int) -> None:  # each in line before the next comes (a busy box is slow)
            deadline = time.monotonic() + 10
            while gateway.admission.queued(MODEL) < n:
                assert time.monotonic() < deadline, f"{n} requests never queued"
                await asyncio.sleep(0.01)

        holder = asyncio.create_task(ask("holder", low, 64))
        await asyncio.sleep(0.3)  # the holder has the model's one slot
        waiting = [asyncio.create_task(ask("low-1", low, 4))]
        await queued(1)
        waiting.append(asyncio.create_task(ask("low-2", low, 4)))
        await queued(2)
        waiting.append(asyncio.create_task(ask("high", high, 4)))
        await queued(3)
        await asyncio.gather(holder, *waiting)
    assert finished == ["holder", "high", "low-1", "low-2"]


async def test_a_high_priority_request_pauses_a_running_low_priority_generation(
        tmp_path: Path, fake_upstream: FakeUpstream, prompt_classifier: EmbeddingClassifier,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path: the gate's burst room lets the high one through, the engine's run slot pauses
    the low one at its next token, and the low one resumes and ends whole."""
    monkeypatch.setenv("IIR_TEST_UPSTREAM_KEY", str(fake_upstream.api_key))
    async with serving_smollm2(tmp_path, fake_upstream, prompt_classifier, 8) as (_, client):
        low, high = await new_key(client, 1), await new_key(client, 100)
        body: dict[str, Any] = {"model": MODEL, "temperature": 0, "messages": [
            {"role": "user", "content": "Write a long story about a lighthouse keeper."}]}
        nocache = {"cache-control": "no-store"}
        finished: list[str] = []

        async def ask(name: str, headers: dict[str, str], max_tokens: int) -> dict[str, Any]:
            r = await client.post("/v1/chat/completions", headers={**headers, **nocache},
                                  json={**body, "max_tokens": max_tokens})
            assert r.status_code == 200, r.text
            finished.append(name)
            return dict(r.json())

        alone = await ask("alone", low, 160)  # the low request's answer when nothing interrupts it
        holder = asyncio.create_task(ask("low", low, 160))
        await asyncio.sleep(0.8)  # well into its generation
        started = time.perf_counter()
        await ask("high", high, 8)
        high_s = time.perf_counter() - started
        paused = await holder
    assert finished == ["alone", "high", "low"]
    assert high_s < 2.0, f"the high-priority request took {high_s:.2f} s: it waited for the low one"
    assert paused["usage"]["completion_tokens"] == alone["usage"]["completion_tokens"]
    assert paused["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"]
    text, reference = paused["choices"][0]["message"]["content"], alone["choices"][0]["message"]["content"]
    assert text[:40] == reference[:40]  # what it had before the pause, resumed, not restarted
