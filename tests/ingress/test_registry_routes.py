"""``POST /v1/registry/refresh`` and ``GET /v1/registry`` in-process: discovery of a real upstream's
models, changes to models.yaml applied without a restart, and who may call."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from serve_app.ingress.gateway import Gateway
from tests.ingress.conftest import UNTRUSTED, client_for
from tests.support.fake_upstream import DEFAULT_MODELS


def edit_yaml(path: Path, change: Callable[[dict[str, Any]], object]) -> None:
    doc = yaml.safe_load(path.read_text())
    change(doc)
    path.write_text(yaml.safe_dump(doc))


async def model_ids(client: httpx.AsyncClient, headers: dict[str, str]) -> set[str]:
    r = await client.get("/v1/models", headers=headers)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


async def test_refresh_discovers_the_providers_models_and_serves_them_at_once(
        gateway: Gateway, client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    before = await model_ids(client, auth_headers)
    assert "fake/fake-chat" not in before
    edit_yaml(gateway.settings.providers_config, lambda d: d["providers"][0].update(discover=True))

    r = await client.post("/v1/registry/refresh", headers=auth_headers)
    assert r.status_code == 200, r.text
    diff = r.json()
    assert diff["added"] == sorted(f"fake/{m}" for m in DEFAULT_MODELS) and diff["errors"] == {}
    assert await model_ids(client, auth_headers) == before | set(diff["added"])
    hello = {"model": "fake/fake-chat", "messages": [{"role": "user", "content": "hi"}]}
    chat = await client.post("/v1/chat/completions", headers=auth_headers, json=hello)
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "fake/fake-chat"


async def test_a_model_removed_from_models_yaml_is_gone_after_refresh(
        gateway: Gateway, client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    edit_yaml(gateway.settings.models_config,
              lambda d: d.update(models=[m for m in d["models"] if m["id"] != "fake/echo-embed"]))
    diff = (await client.post("/v1/registry/refresh", headers=auth_headers)).json()
    assert diff["removed"] == ["fake/echo-embed"]
    r = await client.post("/v1/embeddings", headers=auth_headers,
                          json={"model": "fake/echo-embed", "input": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


async def test_unservable_model_is_listed_with_its_reason_and_answers_503(
        gateway: Gateway, client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    missing = {"id": "local/missing", "engine": "llama_cpp", "task": "chat", "source": "/nowhere/x.gguf"}
    edit_yaml(gateway.settings.models_config, lambda d: d["models"].append(missing))
    diff = (await client.post("/v1/registry/refresh", headers=auth_headers)).json()
    assert diff["added"] == ["local/missing"]
    [unavailable] = diff["unavailable"]
    assert unavailable["id"] == "local/missing" and "not found" in unavailable["reason"]
    assert "local/missing" not in await model_ids(client, auth_headers)
    r = await client.post("/v1/chat/completions", headers=auth_headers,
                          json={"model": "local/missing", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_unavailable" and "not found" in r.json()["error"]["message"]


async def test_registry_shows_status_cost_and_nodes(client: httpx.AsyncClient,
                                                    auth_headers: dict[str, str]) -> None:
    r = await client.get("/v1/registry", headers=auth_headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] >= 1 and body["default_model"] == "fake/echo-chat"
    assert [n["node_id"] for n in body["nodes"]] == ["local"]
    entries = {e["spec"]["id"]: e for e in body["entries"]}
    assert entries["fake/echo-chat"]["status"] == "available"
    assert entries["fake/echo-chat"]["origin"] == "config"
    assert entries["fake/echo-chat"]["spec"]["owner"] == "fake"
    # The provider's price where models.yaml gives one; unknown (null), not 0, where it doesn't.
    assert entries["fake/echo-code"]["cost_per_1k_tokens"] == 0.002
    assert entries["fake/echo-chat"]["cost_per_1k_tokens"] is None


async def test_a_broken_models_yaml_is_refused_with_422_and_the_served_list_stays(
        gateway: Gateway, client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    before = await model_ids(client, auth_headers)
    version = (await client.get("/v1/registry", headers=auth_headers)).json()["version"]
    gateway.settings.models_config.write_text("models: [\n")
    r = await client.post("/v1/registry/refresh", headers=auth_headers)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_config", None)
    assert str(gateway.settings.models_config) in error["message"] and "not valid YAML" in error["message"]
    assert await model_ids(client, auth_headers) == before
    assert (await client.get("/v1/registry", headers=auth_headers)).json()["version"] == version
    hello = {"model": "fake/echo-chat", "messages": [{"role": "user", "content": "hi"}]}
    assert (await client.post("/v1/chat/completions", headers=auth_headers, json=hello)).status_code == 200


async def test_registry_routes_need_an_admin(gateway: Gateway, client: httpx.AsyncClient,
                                             api_key: str) -> None:
    async with client_for(gateway, UNTRUSTED) as outsider:
        for method, path in [("GET", "/v1/registry"), ("POST", "/v1/registry/refresh")]:
            r = await outsider.request(method, path, headers={"Authorization": f"Bearer {api_key}"})
            assert r.status_code == 403, (path, r.text)
            assert r.json()["error"]["type"] == "permission_error"
