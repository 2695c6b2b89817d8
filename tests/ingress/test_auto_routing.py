"""``model: "auto"`` and ``POST /v1/classify`` in-process, with the real classifier and a real upstream."""

from __future__ import annotations

import httpx
import pytest
import yaml

from serve_app.ingress.gateway import Gateway

CODE = "Write a Python function that merges two sorted lists"
SMALL_TALK = "hi there! how was your weekend?"


def chat(model: str, text: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


@pytest.mark.parametrize("auto", ["auto", "iir/auto"])
async def test_auto_routes_by_category_and_says_so(client: httpx.AsyncClient, auth_headers: dict[str, str],
                                                   auto: str) -> None:
    code = await client.post("/v1/chat/completions", headers=auth_headers, json=chat(auto, CODE))
    assert code.status_code == 200, code.text
    assert code.headers["x-iir-category"] == "code" and code.headers["x-iir-model"] == "fake/echo-code"
    assert code.json()["model"] == "fake/echo-code"  # the real model, not "auto"
    assert 0 < float(code.headers["x-iir-confidence"]) <= 1
    talk = await client.post("/v1/chat/completions", headers=auth_headers, json=chat(auto, SMALL_TALK))
    assert talk.headers["x-iir-category"] == "chat" and talk.json()["model"] == "fake/echo-chat"


async def test_auto_streams_too(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    async with client.stream("POST", "/v1/chat/completions", headers=auth_headers,
                             json={**chat("auto", CODE), "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["x-iir-model"] == "fake/echo-code" and r.headers["x-iir-category"] == "code"
        body = (await r.aread()).decode()
    assert '"model":"fake/echo-code"' in body and body.rstrip().endswith("data: [DONE]")


async def test_classify_shows_the_decision(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    r = await client.post("/v1/classify", headers=auth_headers, json={"messages": [
        {"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": CODE}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["category"] == "code" and body["model"] == "fake/echo-code"
    assert set(body["scores"]) == {"code", "math", "reasoning", "creative", "summarize", "translate", "chat"}
    assert 0 <= body["complexity"] <= 1 and body["confidence"] == max(body["scores"].values())
    assert body["reason"]
    french = {"input": "Traduis « bonjour » en anglais"}
    text = await client.post("/v1/classify", headers=auth_headers, json=french)
    assert text.json()["category"] == "translate"


async def test_an_unavailable_preference_falls_through(gateway: Gateway, client: httpx.AsyncClient,
                                                       auth_headers: dict[str, str]) -> None:
    models = yaml.safe_load(gateway.settings.models_config.read_text())
    models["models"] = [m for m in models["models"] if m["id"] != "fake/echo-code"]
    gateway.settings.models_config.write_text(yaml.safe_dump(models))
    assert (await client.post("/v1/registry/refresh", headers=auth_headers)).status_code == 200
    r = await client.post("/v1/chat/completions", headers=auth_headers, json=chat("auto", CODE))
    assert r.status_code == 200 and r.headers["x-iir-category"] == "code"
    assert r.json()["model"] == "fake/echo-chat"


@pytest.mark.parametrize("body", [{}, {"input": "x", "messages": [{"role": "user", "content": "x"}]},
                                  {"input": ""}, {"messages": []}])
async def test_classify_rejects_bad_input_with_400(client: httpx.AsyncClient, auth_headers: dict[str, str],
                                                   body: dict[str, object]) -> None:
    r = await client.post("/v1/classify", headers=auth_headers, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_classify_needs_a_key(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/classify", json={"input": "hi"})).status_code == 401


async def test_a_classifier_past_its_timeout_takes_the_default_route_then_is_skipped(
        gateway: Gateway, client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    gateway.router._classifier_timeout_s = 1e-6  # no real classification finishes in a microsecond
    r = await client.post("/v1/chat/completions", headers=auth_headers, json=chat("auto", CODE))
    assert r.status_code == 200, r.text
    assert r.headers["x-iir-category"] == "unclassified" and "x-iir-confidence" not in r.headers
    assert r.json()["model"] == gateway.router._policy.default  # routing.yaml's default, not code's model
    gateway.router._classifier_timeout_s = 60.0
    # Within the back-off the classifier is not even asked: the default route at once.
    skipped = await client.post("/v1/chat/completions", headers=auth_headers, json=chat("auto", CODE))
    assert skipped.headers["x-iir-category"] == "unclassified"
    down = await client.post("/v1/classify", headers=auth_headers, json={"input": CODE})
    assert down.status_code == 503 and down.json()["error"]["code"] == "classifier_unavailable"
    assert down.headers["retry-after"] == "5"
    gateway.router._classifier_guard.backoff.paused_until = 0.0  # the back-off is over
    back = await client.post("/v1/chat/completions", headers=auth_headers, json=chat("auto", CODE))
    assert back.headers["x-iir-category"] == "code" and back.json()["model"] == "fake/echo-code"


async def test_auto_is_refused_for_embeddings(client: httpx.AsyncClient,
                                              auth_headers: dict[str, str]) -> None:
    r = await client.post("/v1/embeddings", headers=auth_headers, json={"model": "auto", "input": "hello"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "model" and r.json()["error"]["code"] == "model_not_supported"
