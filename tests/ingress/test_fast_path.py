"""The model routes' fast path (serve_app/ingress/fast_path.py) answers exactly as the FastAPI routes do.

The same requests go to the app as shipped and to the same app built without the fast path (every
request to FastAPI), on one gateway: same status, same body. The order of checks is FastAPI's (not JSON
→ 400 before the key; then the key; then the schema).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from serve_app.ingress.app import create_app
from serve_app.ingress.gateway import Gateway
from tests.ingress.conftest import TRUSTED

CHAT = {"model": "fake/echo-chat", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


async def _post(client: httpx.AsyncClient, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return await client.post(path, content=body, headers=headers)


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8",
                                          "application/merge-patch+json"])
async def test_json_bodies_are_served(client: httpx.AsyncClient, auth_headers: dict[str, str],
                                      content_type: str | None) -> None:
    headers = {**auth_headers, **({"Content-Type": content_type} if content_type else {})}
    r = await _post(client, "/v1/chat/completions", json.dumps(CHAT).encode(), headers)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]


CASES: list[tuple[str, bytes, bool, int, str | None]] = [
    # (path, body, with a key, status, param)
    ("/v1/chat/completions", b"{not json", False, 400, None),  # not JSON: 400 before the key
    ("/v1/chat/completions", json.dumps(CHAT).encode(), False, 401, None),
    ("/v1/chat/completions", json.dumps({**CHAT, "max_tokens": "many"}).encode(), True, 400, "max_tokens"),
    ("/v1/chat/completions", json.dumps({"model": "fake/echo-chat"}).encode(), True, 400, "messages"),
    ("/v1/chat/completions", b"[]", True, 400, None),
    ("/v1/chat/completions", b"", True, 400, None),
    ("/v1/embeddings", json.dumps({"model": "fake/echo-embed"}).encode(), True, 400, "input"),
    ("/infer", json.dumps({"model": "fake/musicgen"}).encode(), True, 400, "input"),
    ("/v1/chat/completions", json.dumps({**CHAT, "model": "no/such"}).encode(), True, 404, "model"),
]


@pytest.mark.parametrize(("path", "body", "keyed", "status", "param"), CASES)
async def test_fast_path_and_fastapi_answer_alike(client: httpx.AsyncClient, gateway: Gateway,
                                                  auth_headers: dict[str, str], path: str, body: bytes,
                                                  keyed: bool, status: int, param: str | None) -> None:
    headers = {**(auth_headers if keyed else {}), "Content-Type": "application/json"}
    fast = await _post(client, path, body, headers)
    assert fast.status_code == status, fast.text
    error: dict[str, Any] = fast.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param is not None:
        assert error["param"] == param
    transport = httpx.ASGITransport(app=create_app(gateway, fast_path=False), client=TRUSTED)
    async with httpx.AsyncClient(transport=transport, base_url="http://iir.test") as fastapi_only:
        slow = await _post(fastapi_only, path, body, headers)
    assert (slow.status_code, slow.json()) == (fast.status_code, fast.json())
