"""The engine contract: checks every generation or embedding engine must pass, whatever its backend.

Each check takes an engine and a ``Requests`` factory (which knows the model name and sensible small
defaults), so the llama.cpp engine, the remote engine and the vLLM engine run the same assertions:

    from tests.engines import contract

    @pytest.mark.parametrize("check", contract.GENERATION_CHECKS)
    async def test_contract(engine, check):
        await check(engine, contract.Requests(model="local/smollm2-135m"))

``CORE_GENERATION_CHECKS`` hold for any OpenAI-compatible backend (a remote engine runs these);
``ENGINE_GENERATION_CHECKS`` add what our own engines promise (n > 1, refusing unsupported parameters).
Generation checks assume a deterministic backend at temperature 0 (true for llama.cpp on CPU and for
llama-cpp-python's server; vLLM is deterministic for one request at a time).
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from serve_app.engines.base import InferenceEngine
from serve_app.errors import IIRError, InvalidRequest, UnsupportedParameter
from serve_app.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

Check = Callable[[InferenceEngine, "Requests"], Awaitable[None]]


@dataclass(frozen=True)
class Requests:
    """Builds validated requests for one model; keyword overrides replace the defaults."""

    model: str
    messages: list[dict[str, Any]] = field(default_factory=lambda: [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours of the rainbow."},
    ])
    prompt: str = "The three primary colours are"
    max_tokens: int = 12

    def chat(self, **overrides: Any) -> ChatCompletionRequest:
        body = {"model": self.model, "messages": self.messages, "max_tokens": self.max_tokens,
                "temperature": 0, **overrides}
        return ChatCompletionRequest.model_validate(body)

    def completion(self, **overrides: Any) -> CompletionRequest:
        body = {"model": self.model, "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": 0, **overrides}
        return CompletionRequest.model_validate(body)

    def embedding(self, input: str | list[str], **overrides: Any) -> EmbeddingRequest:
        return EmbeddingRequest.model_validate({"model": self.model, "input": input, **overrides})


# --- helpers --------------------------------------------------------------------------------------------

def text_of(choice: dict[str, Any]) -> str:
    if "message" in choice:
        return choice["message"]["content"] or ""
    return choice["text"]


def assert_usage(usage: dict[str, Any]) -> None:
    assert usage["prompt_tokens"] > 0
    assert usage["completion_tokens"] >= 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def collect(chunks: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk async for chunk in chunks]


def streamed_text(chunks: list[dict[str, Any]], index: int = 0) -> str:
    parts = []
    for chunk in chunks:
        for choice in chunk["choices"]:
            if choice["index"] == index:
                parts.append((choice["delta"].get("content") or "") if "delta" in choice else choice["text"])
    return "".join(parts)


async def expect_error(call: Awaitable[Any], error: type[IIRError], param: str | None) -> IIRError:
    with pytest.raises(error) as info:
        await call
    assert info.value.param == param
    return info.value


async def first_chunk(chunks: AsyncIterator[dict[str, Any]]) -> dict[str, Any]:
    """Streams validate lazily: an async generator raises on its first step."""
    try:
        return await anext(aiter(chunks))
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


# --- generation checks ----------------------------------------------------------------------------------

async def check_chat_response(engine: InferenceEngine, requests: Requests) -> None:
    result = await engine.generate(requests.chat())
    assert result["object"] == "chat.completion"
    assert result["id"] and isinstance(result["created"], int) and result["model"]
    [choice] = result["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert text_of(choice).strip()
    assert choice["finish_reason"] in ("stop", "length")
    assert_usage(result["usage"])
    assert result["usage"]["completion_tokens"] > 0


async def check_completion_response(engine: InferenceEngine, requests: Requests) -> None:
    result = await engine.generate(requests.completion())
    assert result["object"] == "text_completion"
    assert result["id"] and result["model"]
    [choice] = result["choices"]
    assert choice["index"] == 0
    assert text_of(choice).strip()
    assert choice["finish_reason"] in ("stop", "length")
    assert_usage(result["usage"])


async def check_deterministic_at_zero_temperature(engine: InferenceEngine, requests: Requests) -> None:
    for request in (requests.chat(), requests.completion()):
        first = await engine.generate(request)
        second = await engine.generate(request)
        assert text_of(first["choices"][0]) == text_of(second["choices"][0])
        assert first["usage"] == second["usage"]


async def check_max_tokens(engine: InferenceEngine, requests: Requests) -> None:
    for request in (requests.chat(max_tokens=3), requests.chat(max_completion_tokens=3),
                    requests.completion(max_tokens=3)):
        result = await engine.generate(request)
        assert result["usage"]["completion_tokens"] <= 3
        assert result["choices"][0]["finish_reason"] == "length"


async def check_stop_sequence(engine: InferenceEngine, requests: Requests) -> None:
    """Stop on a word the model is known to produce: the text must end right before it."""
    for make in (requests.chat, requests.completion):
        full = text_of((await engine.generate(make(max_tokens=16)))["choices"][0])
        words = full.split()
        assert len(words) >= 3, f"need a few words to pick a stop sequence from: {full!r}"
        stop = " " + words[2]
        if stop not in full:  # the word started a line; stop on the bare word instead
            stop = words[2]
        result = await engine.generate(make(max_tokens=16, stop=[stop, "\u2603never\u2603"]))
        [choice] = result["choices"]
        assert choice["finish_reason"] == "stop"
        assert text_of(choice) == full[: full.index(stop)]
        assert stop not in text_of(choice)


async def check_chat_stream(engine: InferenceEngine, requests: Requests) -> None:
    whole = await engine.generate(requests.chat())
    chunks = await collect(engine.stream(requests.chat(stream=True, stream_options={"include_usage": True})))
    *content, last = chunks
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert content[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in content]
    assert finishes[-1] == whole["choices"][0]["finish_reason"]
    assert all(f is None for f in finishes[:-1])
    assert streamed_text(content) == text_of(whole["choices"][0])
    assert last["choices"] == []
    assert last["usage"] == whole["usage"]
    assert all("usage" not in c or c["usage"] is None for c in content)


async def check_completion_stream(engine: InferenceEngine, requests: Requests) -> None:
    whole = await engine.generate(requests.completion())
    chunks = await collect(engine.stream(requests.completion(stream=True)))
    assert all(c["object"] == "text_completion" for c in chunks)
    assert streamed_text(chunks) == text_of(whole["choices"][0])
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all("usage" not in c or c["usage"] is None for c in chunks), "usage only when asked for"

    with_usage = await collect(engine.stream(requests.completion(stream=True,
                                                                 stream_options={"include_usage": True})))
    assert with_usage[-1]["choices"] == []
    assert with_usage[-1]["usage"] == whole["usage"]


async def check_n_choices(engine: InferenceEngine, requests: Requests) -> None:
    single = await engine.generate(requests.chat(max_tokens=4))
    double = await engine.generate(requests.chat(max_tokens=4, n=2))
    assert [c["index"] for c in double["choices"]] == [0, 1]
    # At temperature 0 both choices are the single answer; the prompt is counted once, as OpenAI does.
    assert all(text_of(c) == text_of(single["choices"][0]) for c in double["choices"])
    assert double["usage"]["prompt_tokens"] == single["usage"]["prompt_tokens"]
    assert double["usage"]["completion_tokens"] == 2 * single["usage"]["completion_tokens"]


async def check_unsupported_parameters(engine: InferenceEngine, requests: Requests) -> None:
    """Parameters the engine cannot honour are refused by name, never silently ignored."""
    for overrides, param in ((dict(prediction={"type": "content", "content": "x"}), "prediction"),
                             (dict(logit_bias={"1": 5}), "logit_bias")):
        await expect_error(engine.generate(requests.chat(**overrides)), UnsupportedParameter, param)
    await expect_error(first_chunk(engine.stream(requests.chat(stream=True, n=2))), UnsupportedParameter, "n")


# What any OpenAI-compatible backend must do.
CORE_GENERATION_CHECKS = [
    pytest.param(check_chat_response, id="chat-response"),
    pytest.param(check_completion_response, id="completion-response"),
    pytest.param(check_deterministic_at_zero_temperature, id="deterministic"),
    pytest.param(check_max_tokens, id="max-tokens"),
    pytest.param(check_stop_sequence, id="stop"),
    pytest.param(check_chat_stream, id="chat-stream"),
    pytest.param(check_completion_stream, id="completion-stream"),
]
# What our own engines add: n > 1 with OpenAI's usage, and refusing what they cannot honour (a remote
# engine forwards such parameters and lets its upstream decide).
ENGINE_GENERATION_CHECKS = [
    pytest.param(check_n_choices, id="n"),
    pytest.param(check_unsupported_parameters, id="unsupported"),
]
GENERATION_CHECKS = CORE_GENERATION_CHECKS + ENGINE_GENERATION_CHECKS


# --- embedding checks -----------------------------------------------------------------------------------

PARAPHRASES = ("A man is playing a guitar.", "Someone strums a guitar.")
UNRELATED = "The stock market fell sharply on Tuesday."


def vectors(result: dict[str, Any]) -> np.ndarray:
    return np.array([item["embedding"] for item in result["data"]], dtype=np.float32)


async def check_embedding_response(engine: InferenceEngine, requests: Requests, dimension: int) -> None:
    result = await engine.embed(requests.embedding(list(PARAPHRASES)))
    assert result["object"] == "list" and result["model"]
    assert [(d["object"], d["index"]) for d in result["data"]] == [("embedding", 0), ("embedding", 1)]
    assert vectors(result).shape == (2, dimension)
    usage = result["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] > 0


async def check_embedding_unit_norm(engine: InferenceEngine, requests: Requests) -> None:
    result = await engine.embed(requests.embedding(list(PARAPHRASES)))
    assert np.allclose(np.linalg.norm(vectors(result), axis=1), 1.0, atol=1e-4)


async def check_embedding_similarity(engine: InferenceEngine, requests: Requests) -> None:
    a, b, c = vectors(await engine.embed(requests.embedding([*PARAPHRASES, UNRELATED])))
    assert float(a @ b) > float(a @ c) + 0.2
    assert float(a @ b) > float(b @ c) + 0.2


async def check_embedding_base64(engine: InferenceEngine, requests: Requests) -> None:
    floats = await engine.embed(requests.embedding(list(PARAPHRASES)))
    packed = await engine.embed(requests.embedding(list(PARAPHRASES), encoding_format="base64"))
    # Decoded the way the openai SDK does it.
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="float32")
                        for d in packed["data"]])
    assert np.array_equal(decoded, vectors(floats))
    assert packed["usage"] == floats["usage"]


async def check_embedding_usage_adds_up(engine: InferenceEngine, requests: Requests) -> None:
    singles = [(await engine.embed(requests.embedding(t)))["usage"]["prompt_tokens"] for t in PARAPHRASES]
    batch = (await engine.embed(requests.embedding(list(PARAPHRASES))))["usage"]["prompt_tokens"]
    assert batch == sum(singles)


async def check_embedding_bad_input(engine: InferenceEngine, requests: Requests) -> None:
    for bad in ("", ["fine", ""], []):
        await expect_error(engine.embed(requests.embedding(bad)), InvalidRequest, "input")


EMBEDDING_CHECKS = [
    pytest.param(check_embedding_unit_norm, id="unit-norm"),
    pytest.param(check_embedding_similarity, id="similarity"),
    pytest.param(check_embedding_base64, id="base64"),
    pytest.param(check_embedding_usage_adds_up, id="usage"),
    pytest.param(check_embedding_bad_input, id="bad-input"),
]
