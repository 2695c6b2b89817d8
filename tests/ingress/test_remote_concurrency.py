"""``max_concurrency`` on a provider, a remote model or a group: requests beyond it wait in line by key
priority, and low-priority ones past their class's budget are refused at once (503 + Retry-After). Real
HTTP to a slow upstream."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
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

DELAY_S = 0.3


@pytest.fixture(scope="module")
def slow_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key="sk-slow", first_byte_delay_s=DELAY_S) as upstream:
        yield upstream


@dataclass
class Gated:
    gateway: Gateway
    client: httpx.AsyncClient
    target: str  # the model or group the requests name
    gate: str  # the admission gate the limit makes


def limit_provider(models: dict[str, Any], providers: dict[str, Any]) -> tuple[str, str]:
    providers["providers"][0]["max_concurrency"] = 1
    return "fake/echo-chat", "provider:fake"


def limit_model(models: dict[str, Any], providers: dict[str, Any]) -> tuple[str, str]:
    next(m for m in models["models"] if m["id"] == "fake/echo-chat")["max_concurrency"] = 1
    return "fake/echo-chat", "fake/echo-chat"


def limit_group(models: dict[str, Any], providers: dict[str, Any]) -> tuple[str, str]:
    models["groups"] = [{"id": "pool", "members": ["fake/echo-chat", "fake/echo-code"], "max_concurrency": 1}]
    return "pool", "group:pool"


@pytest.fixture(params=[pytest.param(limit_provider, id="provider"), pytest.param(limit_model, id="model"),
                        pytest.param(limit_group, id="group")])
async def gated(request: pytest.FixtureRequest, tmp_path: Path, slow_upstream: FakeUpstream,
                prompt_classifier: EmbeddingClassifier, monkeypatch: pytest.MonkeyPatch
                ) -> AsyncIterator[Gated]:
    monkeypatch.setenv("IIR_TEST_UPSTREAM_KEY", str(slow_upstream.api_key))
    configs = write_configs(tmp_path, slow_upstream.base_url, local=False)
    providers = yaml.safe_load(configs["providers_config"].read_text())
    models = yaml.safe_load(configs["models_config"].read_text())
    target, gate = request.param(models, providers)
    # low: shed past ~2 requests' wait; high: never shed
    models["scheduling"] = {"classes": [{"name": "low", "min_priority": 0, "max_wait_s": 2.5 * DELAY_S},
                                        {"name": "high", "min_priority": 50}]}
    configs["models_config"].write_text(yaml.safe_dump(models))
    configs["providers_config"].write_text(yaml.safe_dump(providers))
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'keys.db'}", redis_url=REDIS_URL,
                        cache_backend="off", **configs)
    async with serving(settings, prompt_classifier) as (gateway, client):
        yield Gated(gateway, client, target, gate)


async def new_key(client: httpx.AsyncClient, priority: int) -> dict[str, str]:
    r = await client.post("/api/v1/apikeys", json={"description": "p", "priority": priority})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


async def chat(gated: Gated, headers: dict[str, str], text: str) -> tuple[httpx.Response, float]:
    body: dict[str, Any] = {"model": gated.target, "messages": [{"role": "user", "content": text}]}
    started = time.perf_counter()
    r = await gated.client.post("/v1/chat/completions", headers=headers, json=body)
    return r, time.perf_counter() - started


async def queued(gated: Gated, n: int) -> None:
    deadline = time.monotonic() + 10
    while gated.gateway.admission.queued(gated.gate) < n:
        assert time.monotonic() < deadline, f"{n} requests never queued"
        await asyncio.sleep(0.01)


async def test_requests_beyond_the_limit_wait_and_a_high_priority_one_goes_first(gated: Gated) -> None:
    low, high = await new_key(gated.client, 1), await new_key(gated.client, 90)
    finished: list[str] = []

    async def ask(name: str, headers: dict[str, str]) -> None:
        r, _ = await chat(gated, headers, name)
        assert r.status_code == 200, r.text
        finished.append(name)

    tasks = [asyncio.create_task(ask("low-0", low))]
    await asyncio.sleep(0.05)  # low-0 holds the provider's one slot
    tasks.append(asyncio.create_task(ask("low-1", low)))
    await queued(gated, 1)
    tasks.append(asyncio.create_task(ask("high", high)))
    await queued(gated, 2)
    await asyncio.gather(*tasks)
    assert finished == ["low-0", "high", "low-1"]


async def test_low_priority_requests_past_their_budget_are_refused_at_once(gated: Gated) -> None:
    low = await new_key(gated.client, 1)
    for i in range(2):  # the gate learns how long a request holds the provider
        r, _ = await chat(gated, low, f"warm {i}")
        assert r.status_code == 200
    results = await asyncio.gather(*(chat(gated, low, f"burst {i}") for i in range(8)))
    served = [t for r, t in results if r.status_code == 200]
    refused = [(r, t) for r, t in results if r.status_code != 200]
    assert 2 <= len(served) <= 5 and refused, [r.status_code for r, _ in results]
    for r, took in refused:
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
        assert took < DELAY_S  # at once, not after waiting
    assert max(served) < 2.5 * DELAY_S + 3 * DELAY_S  # those let in waited within the budget (slack)
