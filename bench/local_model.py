"""The local CPU model: tokens/s and time to first token, through the router and in-process.

Tokens/s is ``sum(completion_tokens) / sum(wall time)`` over requests sent one at a time. A stream's
first event from llama.cpp is the role-only chunk, sent before any token is computed, so time to first
*token* (the first chunk with content) is reported beside time to first event.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from statistics import mean
from typing import Any

import httpx

from bench.loadgen import percentile

MODEL = "local/smollm2-135m"
STORY = "Write a short story about a robot who learns to paint."
GENERATE_BODY = {"messages": [{"role": "user", "content": STORY}], "max_tokens": 64, "temperature": 0}
TTFT_BODY = {"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 8, "temperature": 0}


async def _measure(generate: Callable[[], Awaitable[int]], first_pieces: Callable[[], AsyncIterator[bool]],
                   requests: int) -> dict[str, Any]:
    await generate()  # warm-up: first-call costs (threads, caches) are not what we measure
    tokens, walls = 0, []
    for _ in range(requests):
        start = time.perf_counter()
        tokens += await generate()
        walls.append(time.perf_counter() - start)
    first_event, first_token = [], []
    for _ in range(requests):
        start = time.perf_counter()
        seen_event = seen_token = False
        # Read every stream to its end: one left open would hold the model for the next request.
        async for has_content in first_pieces():
            if not seen_event:
                first_event.append(1000 * (time.perf_counter() - start))
                seen_event = True
            if has_content and not seen_token:
                first_token.append(1000 * (time.perf_counter() - start))
                seen_token = True
    return {"requests": requests, "completion_tokens": tokens,
            "tokens_per_s": round(tokens / sum(walls), 1) if walls else None,
            "mean_request_ms": round(1000 * mean(walls), 1) if walls else None,
            "ttft_first_event_p50_ms": round(percentile(first_event, 0.5), 1),
            "ttft_first_token_p50_ms": round(percentile(first_token, 0.5), 1),
            "ttft_first_token_p99_ms": round(percentile(first_token, 0.99), 1)}


async def through_router(base_url: str, headers: dict[str, str], requests: int) -> dict[str, Any]:
    headers = {**headers, "cache-control": "no-store"}  # temperature 0 would be a cache hit
    url = f"{base_url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0)) as client:
        async def generate() -> int:
            r = await client.post(url, json={**GENERATE_BODY, "model": MODEL}, headers=headers)
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        async def first_pieces() -> AsyncIterator[bool]:
            body = {**TTFT_BODY, "model": MODEL, "stream": True}
            async with client.stream("POST", url, json=body, headers=headers) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if line.startswith("data:") and line[5:].strip() != "[DONE]":
                        yield _has_content(json.loads(line[5:]))

        return await _measure(generate, first_pieces, requests)


async def in_process(models_config: Any, providers_config: Any, requests: int) -> dict[str, Any]:
    """The same spec and request, on ``LlamaCppEngine`` in this process: no HTTP, no Ray."""
    from serve_app.engines.llama_cpp import LlamaCppEngine
    from serve_app.registry.catalog import load_catalog
    from serve_app.schemas import ChatCompletionRequest

    spec = load_catalog(models_config, providers_config).get(MODEL)
    assert spec is not None, f"{MODEL} is not in {models_config}"
    engine = LlamaCppEngine.from_spec(spec)
    request = ChatCompletionRequest.model_validate({**GENERATE_BODY, "model": MODEL})
    stream_request = ChatCompletionRequest.model_validate({**TTFT_BODY, "model": MODEL, "stream": True})

    async def generate() -> int:
        return int((await engine.generate(request))["usage"]["completion_tokens"])

    async def first_pieces() -> AsyncIterator[bool]:
        async for chunk in engine.stream(stream_request):
            yield _has_content(chunk)

    try:
        return await _measure(generate, first_pieces, requests)
    finally:
        await engine.aclose()


def _has_content(chunk: dict[str, Any]) -> bool:
    return any((c.get("delta") or {}).get("content") for c in chunk.get("choices", []))
