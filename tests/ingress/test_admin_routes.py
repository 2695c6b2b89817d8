"""The API-key admin routes, in-process: creation fields, PATCH, usage, validation and who may call."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from serve_app.ingress.gateway import Gateway
from tests.ingress.conftest import UNTRUSTED, client_for


def bearer(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


async def create(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await client.post("/api/v1/apikeys", json=body)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


async def test_create_with_every_field(client: httpx.AsyncClient) -> None:
    before = datetime.now(UTC)
    body = await create(client, description="batch job", priority=40, expires_in=600,
                        scopes=["inference", "admin"],
                        rate_limit={"requests_per_minute": 60, "tokens_per_minute": 100_000})
    assert body["api_key"].startswith("iir-") and body["prefix"] == body["api_key"][:12]
    assert body["priority"] == 40 and body["scopes"] == ["admin", "inference"]
    assert body["rate_limit"] == {"requests_per_minute": 60, "tokens_per_minute": 100_000}
    assert 599 <= (datetime.fromisoformat(body["expires_at"]) - before).total_seconds() <= 601
    shown = (await client.get(f"/api/v1/apikeys/{body['id']}", headers=bearer(body["api_key"]))).json()
    assert "api_key" not in shown and shown["rate_limit"] == body["rate_limit"]


async def test_create_defaults(client: httpx.AsyncClient) -> None:
    body = await create(client)
    assert (body["priority"], body["scopes"], body["expires_at"]) == (0, ["inference"], None)
    assert body["rate_limit"] == {"requests_per_minute": None, "tokens_per_minute": None}


@pytest.mark.parametrize(("body", "param"), [
    pytest.param({"priority": 101}, "priority", id="priority-too-high"),
    pytest.param({"priority": -1}, "priority", id="priority-negative"),
    pytest.param({"expires_in": 0}, "expires_in", id="expires-in-zero"),
    pytest.param({"expires_in": 10**12}, "expires_in", id="expires-in-absurd"),
    pytest.param({"scopes": ["root"]}, "scopes.0", id="unknown-scope"),
    pytest.param({"scopes": []}, "scopes", id="no-scope"),
    pytest.param({"rate_limit": {"requests_per_minute": 0}}, "rate_limit.requests_per_minute", id="rpm-zero"),
    pytest.param({"rate_limit": {"tokens_per_minute": 2**31}}, "rate_limit.tokens_per_minute",
                 id="tpm-overflow"),
    pytest.param({"rate_limit": {"rpm": 5}}, "rate_limit.rpm", id="unknown-limit"),
    pytest.param({"owner": "x"}, "owner", id="unknown-field"),
])
async def test_create_validation_errors(client: httpx.AsyncClient, body: dict[str, Any], param: str) -> None:
    r = await client.post("/api/v1/apikeys", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", param)


async def test_patch_applies_on_the_very_next_request(client: httpx.AsyncClient, gateway: Gateway) -> None:
    key = await create(client, description="before", priority=5, rate_limit={"requests_per_minute": 10})
    headers = bearer(key["api_key"])
    assert (await client.get("/v1/models", headers=headers)).status_code == 200  # now in the key cache
    assert (await gateway.keys.authenticate(headers["Authorization"])).priority == 5
    patch = {"priority": 77, "description": "after", "rate_limit": {"tokens_per_minute": 900}}
    r = await client.patch(f"/api/v1/apikeys/{key['id']}", headers=headers, json=patch)
    assert r.status_code == 200, r.text
    assert (r.json()["priority"], r.json()["description"]) == (77, "after")
    assert r.json()["rate_limit"] == {"requests_per_minute": 10, "tokens_per_minute": 900}
    shown = (await client.get(f"/api/v1/apikeys/{key['id']}", headers=headers)).json()
    assert shown["priority"] == 77
    # What the ingress itself now believes about the key: the cached copy was dropped, not served stale.
    cached = await gateway.keys.authenticate(headers["Authorization"])
    assert (cached.priority, cached.rate_limit_rpm, cached.rate_limit_tpm) == (77, 10, 900)


async def test_patch_null_rate_limit_removes_both(client: httpx.AsyncClient) -> None:
    key = await create(client, rate_limit={"requests_per_minute": 10, "tokens_per_minute": 10})
    r = await client.patch(f"/api/v1/apikeys/{key['id']}", headers=bearer(key["api_key"]),
                           json={"rate_limit": None})
    assert r.json()["rate_limit"] == {"requests_per_minute": None, "tokens_per_minute": None}


async def test_patch_unknown_id_is_404(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    r = await client.patch("/api/v1/apikeys/no-such-id", headers=auth_headers, json={"priority": 1})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found" and r.json()["error"]["param"] == "key_id"


@pytest.mark.parametrize(("body", "param"), [
    pytest.param({"priority": 500}, "priority", id="priority-range"),
    pytest.param({"priority": None}, "priority", id="priority-null"),
    pytest.param({"description": None}, "description", id="description-null"),
    pytest.param({"description": "x" * 513}, "description", id="description-long"),
    pytest.param({"rate_limit": {"requests_per_minute": -3}}, "rate_limit.requests_per_minute", id="rpm"),
    pytest.param({"scopes": ["admin"]}, "scopes", id="scopes-not-patchable"),
])
async def test_patch_validation_errors(client: httpx.AsyncClient, auth_headers: dict[str, str],
                                       body: dict[str, Any], param: str) -> None:
    key = await create(client, priority=3)
    r = await client.patch(f"/api/v1/apikeys/{key['id']}", headers=auth_headers, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert (await client.get(f"/api/v1/apikeys/{key['id']}", headers=auth_headers)).json()["priority"] == 3


async def test_usage_route(client: httpx.AsyncClient, gateway: Gateway, auth_headers: dict[str, str]) -> None:
    key = await create(client)
    r = await client.get(f"/api/v1/apikeys/{key['id']}/usage", headers=auth_headers)
    assert r.status_code == 200
    assert r.json() == {"id": key["id"], "object": "api_key.usage", "requests": 0, "prompt_tokens": 0,
                        "completion_tokens": 0, "total_tokens": 0, "last_used_at": None}
    used_at = datetime(2030, 1, 1, tzinfo=UTC)
    # What the ingress's usage batcher does every few seconds, done here directly.
    await gateway.key_admin.record_usage([(key["id"], 3, 30, 12, used_at)])  # type: ignore[attr-defined]
    usage = (await client.get(f"/api/v1/apikeys/{key['id']}/usage", headers=auth_headers)).json()
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (3, 30, 12)
    assert usage["total_tokens"] == 42 and usage["last_used_at"] == used_at.isoformat()
    missing = await client.get("/api/v1/apikeys/no-such-id/usage", headers=auth_headers)
    assert missing.status_code == 404


async def test_admin_scope_key_works_from_an_untrusted_address(client: httpx.AsyncClient,
                                                                gateway: Gateway) -> None:
    admin = await create(client, scopes=["admin", "inference"])
    target = await create(client, priority=1)
    async with client_for(gateway, UNTRUSTED) as outsider:
        headers = bearer(admin["api_key"])
        listed = await outsider.get("/api/v1/apikeys", headers=headers)
        patched = await outsider.patch(f"/api/v1/apikeys/{target['id']}", headers=headers,
                                       json={"priority": 2})
        usage = await outsider.get(f"/api/v1/apikeys/{target['id']}/usage", headers=headers)
        # Creating keys stays a trusted-address affair, admin scope or not.
        created = await outsider.post("/api/v1/apikeys", headers=headers, json={"scopes": ["admin"]})
    assert listed.status_code == 200 and {k["id"] for k in listed.json()["data"]} >= {target["id"]}
    assert patched.status_code == 200 and patched.json()["priority"] == 2
    assert usage.status_code == 200
    assert created.status_code == 403


async def test_inference_key_is_refused_admin_routes_from_an_untrusted_address(
    client: httpx.AsyncClient, gateway: Gateway, api_key: str
) -> None:
    target = await create(client)
    async with client_for(gateway, UNTRUSTED) as outsider:
        headers = bearer(api_key)
        for method, path, body in [
            ("GET", "/api/v1/apikeys", None),
            ("GET", f"/api/v1/apikeys/{target['id']}", None),
            ("PATCH", f"/api/v1/apikeys/{target['id']}", {"priority": 99}),
            ("GET", f"/api/v1/apikeys/{target['id']}/usage", None),
            ("DELETE", f"/api/v1/apikeys/{target['id']}", None),
        ]:
            r = await outsider.request(method, path, headers=headers, json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["type"] == "permission_error"
    unchanged = await client.get(f"/api/v1/apikeys/{target['id']}", headers=bearer(api_key))
    assert unchanged.json()["priority"] == 0 and unchanged.json()["active"]


async def test_patch_needs_a_key(client: httpx.AsyncClient) -> None:
    key = await create(client)
    r = await client.patch(f"/api/v1/apikeys/{key['id']}", json={"priority": 9})
    assert r.status_code == 401
