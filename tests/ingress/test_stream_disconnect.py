"""A client that leaves mid-stream, over real HTTP (uvicorn): the stream stops at once, the request is
no longer in flight, and the ingress keeps serving. ``render.EventStreamResponse`` promises this."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import uvicorn

from serve_app.ingress.app import create_app
from serve_app.ingress.gateway import Gateway
from tests.support.fake_upstream import FakeUpstream


@pytest.fixture
async def served(gateway: Gateway, fake_upstream: FakeUpstream) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(gateway), log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    await task


def in_flight(gateway: Gateway) -> int:
    """The ingress's requests in flight, and the model's (what least-busy groups count)."""
    model = gateway.router.health["fake/echo-chat"].in_flight
    return sum(gateway.in_flight._counts.values()) + model  # noqa: SLF001


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
async def test_a_client_that_leaves_mid_stream_ends_it(gateway: Gateway, served: str,
                                                        fake_upstream: FakeUpstream, path: str) -> None:
    fake_upstream.chunk_delay_s = 0.2  # 40 words: 8 s, were it read to the end
    async with aiohttp.ClientSession() as http:
        r = await http.post(f"{served}/api/v1/apikeys", json={"description": "stream"})
        headers = {"Authorization": f"Bearer {(await r.json())['api_key']}"}
        words = " ".join(["word"] * 40)
        body = ({"model": "fake/echo-chat", "stream": True, "max_tokens": 40,
                 "messages": [{"role": "user", "content": words}]} if path == "/v1/chat/completions" else
                {"model": "fake/echo-chat", "stream": True, "max_output_tokens": 40, "input": words})
        response = await http.post(f"{served}{path}", json=body, headers=headers)
        assert response.status == 200
        assert (await response.content.readline()).startswith(b"data: " if "chat" in path else b"event: ")
        assert in_flight(gateway) == 2
        response.close()  # the client leaves
        left = time.monotonic()
        while in_flight(gateway):
            assert time.monotonic() - left < 2, "the stream went on without its client"
            await asyncio.sleep(0.02)
        # Served as before, streams and all.
        body["max_tokens" if "chat" in path else "max_output_tokens"] = 3
        fake_upstream.chunk_delay_s = 0.0
        async with http.post(f"{served}{path}", json=body, headers=headers) as again:
            text = await again.text()
        ending = "data: [DONE]" if "chat" in path else '"type":"response.incomplete"'
        assert again.status == 200 and ending in text.rstrip().rsplit("\n", 1)[-1]
