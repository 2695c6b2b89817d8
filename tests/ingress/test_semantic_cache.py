"""The semantic cache through the ingress app in-process: real Redis, real MiniLM index, real upstream."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from serve_app.ingress.gateway import Gateway
from tests.ingress.test_response_cache import post, settle, upstream_calls
from tests.support.fake_upstream import FakeUpstream

ON = {"x-iir-semantic-cache": "on"}


def ask(text: str, model: str = "fake/echo-faq", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


async def test_a_paraphrase_gets_the_stored_answer(gateway: Gateway, client: httpx.AsyncClient,
                                                   auth_headers: dict[str, str],
                                                   fake_upstream: FakeUpstream) -> None:
    marker = uuid.uuid4().hex[:8]  # in both texts: each test run has its own entries
    first = await post(client, auth_headers, ask(f"How do I reverse a list in Python? ({marker})"))
    assert first.headers["x-iir-cache"] == "miss"
    await settle(gateway)
    again = await post(client, auth_headers, ask(f"how do i reverse a list in python, please ({marker})"))
    assert again.headers["x-iir-cache"] == "hit"
    assert again.headers["x-iir-cache-match"] == "semantic"
    assert float(again.headers["x-iir-cache-similarity"]) >= gateway.settings.semantic_cache_threshold
    assert again.json() == first.json()
    assert upstream_calls(fake_upstream, marker) == 1
    exact = await post(client, auth_headers, ask(f"How do I reverse a list in Python? ({marker})"))
    assert exact.headers["x-iir-cache-match"] == "exact"
    assert gateway.cache is not None and gateway.cache.stats.semantic_hits >= 1


async def test_other_questions_numbers_and_tenants_miss(gateway: Gateway, client: httpx.AsyncClient,
                                                        auth_headers: dict[str, str]) -> None:
    marker = uuid.uuid4().hex[:8]
    await post(client, auth_headers, ask(f"Convert 5 km to miles ({marker})"))
    await settle(gateway)
    for text in (f"Convert 50 km to miles ({marker})", f"What is the capital of Peru? ({marker})"):
        assert (await post(client, auth_headers, ask(text))).headers["x-iir-cache"] == "miss", text
    other = (await client.post("/api/v1/apikeys", json={"description": "other tenant"})).json()["api_key"]
    theirs = await post(client, {"Authorization": f"Bearer {other}"},
                        ask(f"convert 5 km into miles ({marker})"))
    assert theirs.headers["x-iir-cache"] == "miss"  # IIR_CACHE_SCOPE=key: tenants never share answers
    mine = await post(client, auth_headers, ask(f"Please convert 5 km into miles ({marker})"))
    assert mine.headers["x-iir-cache-match"] == "semantic"


async def test_only_when_opted_in_and_never_with_tools(gateway: Gateway, client: httpx.AsyncClient,
                                                      auth_headers: dict[str, str],
                                                      fake_upstream: FakeUpstream) -> None:
    marker = uuid.uuid4().hex[:8]
    plain = "fake/echo-chat"  # no semantic_cache in models.yaml
    await post(client, auth_headers, ask(f"Tell me a fun fact about owls ({marker})", plain))
    await settle(gateway)
    paraphrase = ask(f"please tell me a fun fact about owls ({marker})", plain)
    assert (await post(client, auth_headers, paraphrase)).headers["x-iir-cache"] == "miss"
    await settle(gateway)
    # An answer joins the semantic index only when its own request opted in: the plain one did not.
    opted = ask(f"Tell me a fun fact about owls, please ({marker})", plain)
    assert (await post(client, auth_headers, opted, **ON)).headers["x-iir-cache"] == "miss"
    await settle(gateway)
    again = ask(f"tell me a fun fact about owls ({marker})!", plain)
    assert (await post(client, auth_headers, again, **ON)).headers["x-iir-cache-match"] == "semantic"
    tool = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
    for text in (f"Tell me a fun fact about owls ({marker})",
                 f"Please tell me a fun fact about owls ({marker})"):
        r = await post(client, auth_headers, ask(text, tools=[tool]), **ON)
        assert r.headers["x-iir-cache"] == "miss"  # the first is stored (exactly); the second is not matched
        await settle(gateway)
    off = ask(f"Tell me a fun fact about Owls ({marker})", plain)
    assert (await post(client, auth_headers, off, **{"x-iir-semantic-cache": "off"})).headers[
        "x-iir-cache"] == "miss"


async def test_a_streamed_paraphrase_is_replayed_as_a_stream(gateway: Gateway, client: httpx.AsyncClient,
                                                             auth_headers: dict[str, str],
                                                             fake_upstream: FakeUpstream) -> None:
    marker = uuid.uuid4().hex[:8]
    first = await post(client, auth_headers, ask(f"Explain what a mutex is ({marker})", stream=True))
    await settle(gateway)
    again = await post(client, auth_headers, ask(f"Can you explain what a mutex is? ({marker})", stream=True))
    assert again.headers["x-iir-cache-match"] == "semantic"
    assert again.headers["content-type"].startswith("text/event-stream")
    events = [e.removeprefix("data: ") for e in again.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]
                   if json.loads(e)["choices"])
    first_text = "".join(json.loads(e.removeprefix("data: "))["choices"][0]["delta"].get("content", "")
                         for e in first.text.split("\n\n") if e and e != "data: [DONE]"
                         and json.loads(e.removeprefix("data: "))["choices"])
    assert text == first_text and marker in text
    assert upstream_calls(fake_upstream, marker) == 1
