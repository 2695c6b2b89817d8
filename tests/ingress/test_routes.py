"""Routes, errors and auth of the ingress app, in-process against a real upstream over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from serve_app.ingress.app import create_app
from serve_app.ingress.gateway import Gateway
from tests.ingress.conftest import TRUSTED, UNTRUSTED, client_for
from tests.support.fake_upstream import FakeUpstream, expected_reply

CHAT = {"model": "fake/echo-chat", "messages": [{"role": "user", "content": "hello there friend"}]}


async def test_created_key_is_usable_at_once(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/v1/apikeys", json={"description": "dev", "priority": 10})
    body = r.json()
    assert body["priority"] == 10 and body["api_key"].startswith("iir-")
    assert body["api_key"] not in json.dumps((await client.get(
        "/api/v1/apikeys", headers={"Authorization": f"Bearer {body['api_key']}"})).json())
    ok = await client.get("/v1/models", headers={"Authorization": f"Bearer {body['api_key']}"})
    assert ok.status_code == 200


async def test_key_creation_refused_from_untrusted_address(gateway: Gateway) -> None:
    async with client_for(gateway, UNTRUSTED) as outsider:
        r = await outsider.post("/api/v1/apikeys", json={"description": "x"},
                                headers={"X-Forwarded-For": "127.0.0.1"})
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"


async def test_chat_is_passed_through_and_renamed(client: httpx.AsyncClient, auth_headers: dict[str, str],
                                                  fake_upstream: FakeUpstream) -> None:
    r = await client.post("/v1/chat/completions", headers=auth_headers, json={**CHAT, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "fake/echo-chat" and r.headers["x-iir-model"] == "fake/echo-chat"
    assert r.json()["choices"][0]["message"]["content"] == expected_reply("hello there friend", 2)
    assert fake_upstream.requests[-1].body["model"] == "echo-1"


async def test_stream_is_framed_and_ends_with_done(client: httpx.AsyncClient,
                                                   auth_headers: dict[str, str]) -> None:
    r = await client.post("/v1/chat/completions", headers=auth_headers, json={**CHAT, "stream": True})
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert text == expected_reply("hello there friend")


async def test_mid_stream_failure_ends_with_error_not_done(client: httpx.AsyncClient,
                                                           auth_headers: dict[str, str],
                                                           fake_upstream: FakeUpstream) -> None:
    fake_upstream.cut_next_stream(after_chunks=2)
    r = await client.post("/v1/chat/completions", headers=auth_headers, json={**CHAT, "stream": True})
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert "[DONE]" not in events
    assert "error" in json.loads(events[-1])


@pytest.mark.parametrize(("body", "status", "param"), [
    pytest.param({**CHAT, "temperature": 7}, 400, "temperature", id="temperature-range"),
    pytest.param({"model": "fake/echo-chat", "messages": []}, 400, "messages", id="empty-messages"),
    pytest.param({"messages": CHAT["messages"]}, 400, "model", id="missing-model"),
    pytest.param({**CHAT, "model": "nobody/none"}, 404, "model", id="unknown-model"),
])
async def test_bad_requests_get_openai_errors(client: httpx.AsyncClient, auth_headers: dict[str, str],
                                              body: dict[str, object], status: int, param: str) -> None:
    r = await client.post("/v1/chat/completions", headers=auth_headers, json=body)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


async def test_invalid_json_is_400(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    headers = {**auth_headers, "content-type": "application/json"}
    r = await client.post("/v1/chat/completions", headers=headers, content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("chunked", [pytest.param(False, id="content-length"),
                                     pytest.param(True, id="chunked")])
async def test_oversized_body_is_413(client: httpx.AsyncClient, auth_headers: dict[str, str],
                                     chunked: bool) -> None:
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 100_000}]}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i:i + 8192]

    headers = {**auth_headers, "content-type": "application/json"}
    r = await client.post("/v1/chat/completions", headers=headers, content=pieces() if chunked else big)
    assert r.status_code == 413, r.text
    assert r.json() == {"error": {"message": "request body exceeds the limit of 65536 bytes",
                                  "type": "invalid_request_error", "param": None,
                                  "code": "request_too_large"}}


async def test_an_unexpected_failure_is_a_500_in_the_error_shape_without_details(
        gateway: Gateway, client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    def broken() -> Any:
        raise RuntimeError("secret detail")

    gateway.registry_snapshot = broken  # a collaborator that fails in a way no handler expects
    # Starlette re-raises after answering (so the server logs it too); read the answer, as a client would.
    transport = httpx.ASGITransport(app=create_app(gateway), client=TRUSTED, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://iir.test") as raw:
        r = await raw.get("/v1/registry", headers={**auth_headers, "x-request-id": "req-500"})
    assert r.status_code == 500
    assert r.json() == {"error": {"message": "internal error (request id req-500)", "type": "server_error",
                                  "param": None, "code": "internal_error"}}
    assert "secret" not in r.text


@pytest.mark.parametrize("headers", [
    pytest.param({}, id="missing"),
    pytest.param({"Authorization": "Basic abc"}, id="not-bearer"),
    pytest.param({"Authorization": "Bearer iir-nope"}, id="unknown"),
])
async def test_every_model_route_needs_a_key(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/embeddings"),
                         ("POST", "/infer"), ("POST", "/v1/registry/refresh"), ("GET", "/api/v1/apikeys")]:
        r = await client.request(method, path, headers=headers, json=CHAT)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["type"] == "authentication_error"


async def test_revoked_key_is_refused(client: httpx.AsyncClient) -> None:
    created = (await client.post("/api/v1/apikeys", json={"description": "temp"})).json()
    headers = {"Authorization": f"Bearer {created['api_key']}"}
    assert (await client.get("/v1/models", headers=headers)).status_code == 200
    assert (await client.delete(f"/api/v1/apikeys/{created['id']}", headers=headers)).status_code == 200
    assert (await client.get("/v1/models", headers=headers)).status_code == 401


async def test_admin_routes_need_trust_or_admin_scope(gateway: Gateway, api_key: str) -> None:
    async with client_for(gateway, UNTRUSTED) as outsider:
        r = await outsider.get("/api/v1/apikeys", headers={"Authorization": f"Bearer {api_key}"})
    assert r.status_code == 403


async def test_generic_infer_forwards_input(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    r = await client.post("/infer", headers=auth_headers,
                          json={"model": "fake/musicgen", "input": {"prompt": "lofi", "seconds": 2}})
    assert r.status_code == 200, r.text
    assert r.json()["output"] == {"echo": {"prompt": "lofi", "seconds": 2}}


@pytest.mark.parametrize(("path", "body", "param"), [
    pytest.param("/infer", {"model": "fake/echo-chat", "input": {"x": 1}}, "input.prompt",
                 id="infer-task-input"),
    pytest.param("/infer", {"model": "fake/echo-chat", "input": {"prompt": "hi", "max_tokens": -1}},
                 "input.max_tokens", id="infer-sampling"),
    pytest.param("/infer", {"model": "fake/echo-chat"}, "input", id="infer-missing-input"),
    pytest.param("/v1/chat/completions", {"model": "fake/echo-chat", "messages": "hi"}, "messages",
                 id="chat-wrong-type"),
    pytest.param("/v1/embeddings", {"model": "fake/echo-chat"}, "input", id="embeddings-missing-input"),
])
async def test_a_malformed_body_is_a_400_naming_the_parameter_on_every_route(
        client: httpx.AsyncClient, auth_headers: dict[str, str], path: str, body: dict[str, object],
        param: str) -> None:
    # One decision for body errors (docs/API.md, "Errors"): 400, never 422; /infer once answered 422.
    r = await client.post(path, headers=auth_headers, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param), error


async def test_unknown_route_and_method(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    assert (await client.get("/nope", headers=auth_headers)).status_code == 404
    assert (await client.get("/v1/chat/completions", headers=auth_headers)).status_code == 405


async def test_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    r = await client.get("/health", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


async def test_admin_only_key_cannot_call_models(client: httpx.AsyncClient) -> None:
    created = (await client.post("/api/v1/apikeys", json={"description": "ops", "scopes": ["admin"]})).json()
    headers = {"Authorization": f"Bearer {created['api_key']}"}
    assert (await client.get("/api/v1/apikeys", headers=headers)).status_code == 200
    r = await client.post("/v1/chat/completions", headers=headers, json=CHAT)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
