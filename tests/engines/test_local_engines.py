"""The CPU engines on real models: SmolLM2-135M through llama.cpp, all-MiniLM-L6-v2 through
sentence-transformers. Each model loads once per module; generations stay a few tokens long."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
import pytest

from serve_app.engines.embeddings import SentenceTransformerEngine
from serve_app.engines.llama_cpp import LlamaCppEngine
from serve_app.errors import InvalidRequest, ServiceUnavailable, UnsupportedParameter
from tests.engines import contract
from tests.engines.contract import Requests, collect, expect_error, text_of, vectors
from tests.engines.local_models import MINILM, SMOLLM2, needs_llama, needs_st

CHAT = Requests(model=SMOLLM2.id)
EMBED = Requests(model=MINILM.id)
# A base-model continuation that runs on for hundreds of tokens instead of ending at EOS.
COUNTING = CHAT.completion(prompt="1, 2, 3, 4, 5,", max_tokens=600)


@pytest.fixture(scope="module")
async def minilm() -> AsyncIterator[SentenceTransformerEngine]:
    engine = SentenceTransformerEngine.from_spec(MINILM)
    yield engine
    await engine.aclose()


# --- llama.cpp --------------------------------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("check", contract.GENERATION_CHECKS)
async def test_llama_contract(llama: LlamaCppEngine, check: contract.Check) -> None:
    await check(llama, CHAT)


@needs_llama
@pytest.mark.parametrize("overrides, param", [
    pytest.param({"response_format": {"type": "xml"}}, "response_format.type", id="response-format-type"),
    pytest.param({"modalities": ["text", "audio"]}, "modalities", id="audio"),
    pytest.param({"functions": [{"name": "f", "parameters": {}}]}, "functions", id="functions"),
    pytest.param({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}]}]}, "messages",
                 id="image-part"),
])
async def test_llama_refuses_chat_parameters(llama: LlamaCppEngine, overrides: dict, param: str) -> None:
    await expect_error(llama.generate(CHAT.chat(**overrides)), UnsupportedParameter, param)


@needs_llama
@pytest.mark.parametrize("overrides, param", [
    pytest.param({"suffix": "end"}, "suffix", id="suffix"),
    pytest.param({"best_of": 3}, "best_of", id="best_of"),
])
async def test_llama_refuses_completion_parameters(llama: LlamaCppEngine, overrides: dict,
                                                   param: str) -> None:
    await expect_error(llama.generate(CHAT.completion(**overrides)), UnsupportedParameter, param)


@needs_llama
async def test_llama_malformed_response_format(llama: LlamaCppEngine) -> None:
    await expect_error(llama.generate(CHAT.chat(response_format="json")), InvalidRequest, "response_format")


@needs_llama
async def test_llama_ignores_harmless_defaults(llama: LlamaCppEngine) -> None:
    request = CHAT.chat(max_tokens=2, logprobs=False, tool_choice="none", response_format={"type": "text"},
                        parallel_tool_calls=True, user="u1")
    assert (await llama.generate(request))["choices"][0]["message"]["content"]


@needs_llama
async def test_llama_completion_prompt_list_and_n(llama: LlamaCppEngine) -> None:
    result = await llama.generate(CHAT.completion(prompt=["Once upon a time", "The sky is"], n=2,
                                                  max_tokens=3))
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    singles = [await llama.generate(CHAT.completion(prompt=p, max_tokens=3))
               for p in ("Once upon a time", "The sky is")]
    each_twice = [text_of(s["choices"][0]) for s in singles for _ in range(2)]
    assert [text_of(c) for c in result["choices"]] == each_twice
    assert result["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert result["usage"]["completion_tokens"] == 2 * sum(s["usage"]["completion_tokens"] for s in singles)


@needs_llama
async def test_llama_seeded_sampling_is_reproducible(llama: LlamaCppEngine) -> None:
    request = CHAT.chat(temperature=1.0, seed=1234, n=2, max_tokens=8)
    first, second = await llama.generate(request), await llama.generate(request)
    assert [text_of(c) for c in first["choices"]] == [text_of(c) for c in second["choices"]]


@needs_llama
async def test_llama_echo(llama: LlamaCppEngine) -> None:
    plain = await llama.generate(CHAT.completion(max_tokens=3))
    echoed = await llama.generate(CHAT.completion(max_tokens=3, echo=True))
    assert text_of(echoed["choices"][0]) == CHAT.prompt + text_of(plain["choices"][0])
    streamed = await collect(llama.stream(CHAT.completion(max_tokens=3, echo=True, stream=True)))
    assert contract.streamed_text(streamed) == text_of(echoed["choices"][0])


@needs_llama
async def test_llama_context_overflow_is_a_client_error(llama: LlamaCppEngine) -> None:
    error = await expect_error(llama.generate(CHAT.completion(prompt="hello " * 3000)), InvalidRequest, None)
    assert error.code == "context_length_exceeded"


@needs_llama
async def test_llama_abandoned_stream_stops_generating(llama: LlamaCppEngine) -> None:
    """A client that disconnects mid-stream must not keep the model busy for the rest of its tokens."""
    expected = await llama.generate(CHAT.chat(max_tokens=4))
    chunks = llama.stream(COUNTING.model_copy(update={"stream": True}))
    async for chunk in chunks:
        if chunk["choices"][0]["text"]:
            break
    started = time.monotonic()
    await chunks.aclose()  # what the server does when the client goes away
    # aclose waits for the worker thread; 600 tokens would take many seconds, one token a few ms.
    assert time.monotonic() - started < 2
    after = await llama.generate(CHAT.chat(max_tokens=4))
    assert text_of(after["choices"][0]) == text_of(expected["choices"][0])


@needs_llama
async def test_llama_cancelled_request_stops_generating(llama: LlamaCppEngine) -> None:
    task = asyncio.ensure_future(llama.generate(COUNTING))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2
    assert (await llama.generate(CHAT.chat(max_tokens=2)))["choices"][0]["message"]["content"]


@needs_llama
async def test_llama_json_object_response_format(llama: LlamaCppEngine) -> None:
    result = await llama.generate(CHAT.chat(max_tokens=6, response_format={"type": "json_object"}))
    assert text_of(result["choices"][0]).lstrip()[:1] in ("{", "[")


@needs_llama
async def test_llama_concurrent_requests_are_serialised(llama: LlamaCppEngine) -> None:
    requests = [CHAT.chat(max_tokens=4), CHAT.completion(max_tokens=4), CHAT.chat(max_tokens=4)]
    alone = [await llama.generate(r) for r in requests]
    together = await asyncio.gather(*(llama.generate(r) for r in requests))
    assert [text_of(r["choices"][0]) for r in together] == [text_of(r["choices"][0]) for r in alone]


@needs_llama
async def test_llama_cannot_embed(llama: LlamaCppEngine) -> None:
    await expect_error(llama.embed(EMBED.embedding("hi")), InvalidRequest, "model")


@needs_llama
async def test_llama_close() -> None:
    engine = LlamaCppEngine.from_spec(SMOLLM2)
    await engine.check_health()
    await engine.aclose()
    with pytest.raises(ServiceUnavailable):
        await engine.check_health()
    with pytest.raises(ServiceUnavailable):
        await engine.generate(CHAT.chat(max_tokens=2))


# --- sentence-transformers --------------------------------------------------------------------------------


@needs_st
async def test_embedding_response(minilm: SentenceTransformerEngine) -> None:
    await contract.check_embedding_response(minilm, EMBED, dimension=384)


@needs_st
@pytest.mark.parametrize("check", contract.EMBEDDING_CHECKS)
async def test_embedding_contract(minilm: SentenceTransformerEngine, check: contract.Check) -> None:
    await check(minilm, EMBED)


@needs_st
async def test_embedding_usage_is_exact(minilm: SentenceTransformerEngine) -> None:
    # [CLS] hello world [SEP]
    assert (await minilm.embed(EMBED.embedding("hello world")))["usage"] == {"prompt_tokens": 4,
                                                                               "total_tokens": 4}


@needs_st
async def test_embedding_batch_matches_single(minilm: SentenceTransformerEngine) -> None:
    texts = ["short", "a noticeably longer sentence that needs padding in a batch"]
    batch = vectors(await minilm.embed(EMBED.embedding(texts)))
    singles = np.vstack([vectors(await minilm.embed(EMBED.embedding(t))) for t in texts])
    assert np.allclose(batch, singles, atol=1e-5)


@needs_st
async def test_embedding_dimensions(minilm: SentenceTransformerEngine) -> None:
    full = vectors(await minilm.embed(EMBED.embedding("hello world")))[0]
    short = vectors(await minilm.embed(EMBED.embedding("hello world", dimensions=64)))[0]
    assert short.shape == (64,)
    assert np.isclose(np.linalg.norm(short), 1.0, atol=1e-5)
    assert np.allclose(short, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)
    await expect_error(minilm.embed(EMBED.embedding("x", dimensions=385)), UnsupportedParameter, "dimensions")


@needs_st
@pytest.mark.parametrize("tokens", [pytest.param([1, 2, 3], id="flat"), pytest.param([[1, 2]], id="nested")])
async def test_embedding_refuses_token_ids(minilm: SentenceTransformerEngine, tokens: list) -> None:
    await expect_error(minilm.embed(EMBED.embedding(tokens)), InvalidRequest, "input")


@needs_st
async def test_embedding_refuses_overlong_input(minilm: SentenceTransformerEngine) -> None:
    error = await expect_error(minilm.embed(EMBED.embedding("word " * 300)), InvalidRequest, "input")
    assert error.code == "context_length_exceeded"


@needs_st
async def test_embedding_engine_cannot_generate(minilm: SentenceTransformerEngine) -> None:
    await expect_error(minilm.generate(CHAT.chat()), InvalidRequest, "model")
    await minilm.check_health()
