"""One JSON access-log line per request: request id, key id (never the key), model, cache, latency."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Any

import httpx
import pytest

from serve_app.ingress.gateway import Gateway
from tests.support.fake_upstream import FakeUpstream


def log_lines(err: str) -> list[dict[str, Any]]:
    lines = []
    for raw in err.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and line.get("logger") == "iir.access":
            lines.append(line)
    return lines


async def test_each_request_logs_one_json_line(gateway: Gateway, client: httpx.AsyncClient, api_key: str,
                                               auth_headers: dict[str, str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    request_id = f"trace-{uuid.uuid4().hex}"
    body = {"model": "fake/echo-chat", "temperature": 0,
            "messages": [{"role": "user", "content": f"hello {uuid.uuid4().hex}"}]}
    capsys.readouterr()
    r = await client.post("/v1/chat/completions", headers={**auth_headers, "x-request-id": request_id},
                          json=body)
    assert r.status_code == 200 and r.headers["x-request-id"] == request_id
    refused = await client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 401
    err = capsys.readouterr().err
    assert api_key not in err
    lines = log_lines(err)
    [ok] = [line for line in lines if line["request_id"] == request_id]
    assert ok["status"] == 200 and ok["path"] == "/v1/chat/completions" and ok["method"] == "POST"
    assert ok["model"] == "fake/echo-chat" and ok["cache"] == "miss" and ok["key_id"]
    assert ok["latency_ms"] > 0 and ok["ts"].endswith("Z")
    [denied] = [line for line in lines if line["request_id"] == refused.headers["x-request-id"]]
    assert denied["status"] == 401 and denied["error"] == "missing_key" and "key_id" not in denied


async def test_streams_log_time_to_first_token(gateway: Gateway, client: httpx.AsyncClient,
                                               auth_headers: dict[str, str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    body = {"model": "auto", "stream": True,
            "messages": [{"role": "user", "content": "write a short poem about the sea"}]}
    capsys.readouterr()
    r = await client.post("/v1/chat/completions", headers=auth_headers, json=body)
    assert r.status_code == 200
    [line] = [x for x in log_lines(capsys.readouterr().err) if x["request_id"] == r.headers["x-request-id"]]
    assert 0 < line["ttft_ms"] <= line["latency_ms"]
    assert line["category"] == "creative" and line["cache"] == "bypass"


async def test_a_request_cancelled_before_its_answer_is_logged_as_499(
        client: httpx.AsyncClient, auth_headers: dict[str, str], fake_upstream: FakeUpstream,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The client left (Serve's proxy cancels the request): not a server error in logs and metrics."""
    fake_upstream.first_byte_delay_s = 2.0
    try:
        capsys.readouterr()
        body = {"model": "fake/echo-chat", "messages": [{"role": "user", "content": "slow"}]}
        request = asyncio.create_task(client.post("/v1/chat/completions", headers=auth_headers, json=body))
        await asyncio.sleep(0.3)
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
    finally:
        fake_upstream.first_byte_delay_s = 0.0
    lines = [line for line in log_lines(capsys.readouterr().err) if line["path"] == "/v1/chat/completions"]
    assert [line["status"] for line in lines] == [499]
