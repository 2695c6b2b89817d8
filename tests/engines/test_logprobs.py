"""Log probabilities on the real SmolLM2 (llama.cpp, CPU): chat's ``logprobs``/``top_logprobs`` and the
completions API's ``logprobs: <0..5>``, whole and streamed, read from the logits each token was sampled
from (serve_app/engines/llama_logprobs.py)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from serve_app.engines.llama_cpp import LlamaCppEngine
from serve_app.engines.llama_logprobs import Cover, TokenLogprob
from serve_app.errors import InvalidRequest, UnsupportedParameter
from serve_app.fair_queue import Turn
from tests.engines.contract import Requests, collect, expect_error, first_chunk, streamed_text, text_of
from tests.engines.local_models import SMOLLM2, needs_llama

CHAT = Requests(model=SMOLLM2.id, max_tokens=24)
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"], "additionalProperties": False}}}]


def content_of(choice: dict[str, Any]) -> list[dict[str, Any]]:
    return list(choice["logprobs"]["content"])


def streamed_logprobs(chunks: list[dict[str, Any]], key: str) -> list[Any]:
    """A stream's chunks' logprobs, joined: ``content`` (chat) or one of the legacy lists."""
    return [item for chunk in chunks for choice in chunk["choices"] if choice["logprobs"]
            for item in choice["logprobs"][key]]


# --- chat -------------------------------------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("k", [pytest.param(0, id="top-0"), pytest.param(5, id="top-5"),
                               pytest.param(20, id="top-20")])
async def test_chat_logprobs_describe_the_answer(llama: LlamaCppEngine, k: int) -> None:
    result = await llama.generate(CHAT.chat(logprobs=True, top_logprobs=k))
    [choice] = result["choices"]
    tokens = content_of(choice)
    assert choice["logprobs"]["refusal"] is None
    assert len(tokens) == result["usage"]["completion_tokens"]
    assert "".join(t["token"] for t in tokens) == text_of(choice)
    assert b"".join(bytes(t["bytes"]) for t in tokens).decode() == text_of(choice)
    for token in tokens:
        assert token["logprob"] <= 0
        top = token["top_logprobs"]
        assert len(top) == k
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-9
        if k:  # greedy at temperature 0: the chosen token is the most likely one
            assert (top[0]["token"], top[0]["logprob"]) == (token["token"], token["logprob"])


@needs_llama
async def test_chat_stream_carries_the_same_logprobs(llama: LlamaCppEngine) -> None:
    whole = await llama.generate(CHAT.chat(logprobs=True, top_logprobs=3))
    chunks = await collect(llama.stream(CHAT.chat(logprobs=True, top_logprobs=3, stream=True)))
    assert streamed_logprobs(chunks, "content") == content_of(whole["choices"][0])
    for chunk in chunks:  # each chunk's logprobs spell its own text
        [choice] = chunk["choices"]
        text = choice["delta"].get("content") or ""
        assert "".join(t["token"] for t in (choice["logprobs"] or {}).get("content", [])) == text


@needs_llama
async def test_a_stop_string_inside_a_token_cuts_that_token(llama: LlamaCppEngine) -> None:
    full = content_of((await llama.generate(CHAT.chat(logprobs=True)))["choices"][0])
    texts = [t["token"] for t in full]
    # A token of 4+ characters, its tail the stop string, which must not occur earlier in the answer.
    index = next(i for i, text in enumerate(texts) if i and len(text) >= 4
                 and text[2:] not in "".join(texts[:i]) + text[:2])
    stop = texts[index][2:]
    request = CHAT.chat(logprobs=True, stop=[stop])
    [choice] = (await llama.generate(request))["choices"]
    assert text_of(choice) == "".join(texts[:index]) + texts[index][:2]
    cut = content_of(choice)
    assert [t["token"] for t in cut] == [*texts[:index], texts[index][:2]]
    assert cut[-1]["logprob"] == full[index]["logprob"]  # the whole token's
    chunks = await collect(llama.stream(request.model_copy(update={"stream": True})))
    assert streamed_text(chunks) == text_of(choice)
    assert streamed_logprobs(chunks, "content") == cut


@needs_llama
async def test_each_of_n_choices_has_its_logprobs(llama: LlamaCppEngine) -> None:
    result = await llama.generate(CHAT.chat(logprobs=True, n=2, max_tokens=6))
    first, second = (content_of(c) for c in result["choices"])
    assert first == second and len(first) + len(second) == result["usage"]["completion_tokens"]


@needs_llama
async def test_tool_calls_carry_no_logprobs_but_text_answers_do(llama: LlamaCppEngine) -> None:
    ask = [{"role": "user", "content": "Add 40 and 2."}]
    called = await llama.generate(CHAT.chat(logprobs=True, messages=ask, tools=TOOLS, tool_choice="required",
                                            max_tokens=40))
    assert called["choices"][0]["finish_reason"] == "tool_calls"
    assert called["choices"][0]["logprobs"] is None
    chunks = await collect(llama.stream(CHAT.chat(logprobs=True, messages=ask, tools=TOOLS,
                                                  tool_choice="required", max_tokens=40, stream=True)))
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)
    # Under "auto" SmolLM2 answers a greeting in text (deterministically, at temperature 0).
    greeting = CHAT.chat(logprobs=True, messages=[{"role": "user", "content": "Hello there!"}], tools=TOOLS,
                         max_tokens=8)
    [choice] = (await llama.generate(greeting))["choices"]
    assert choice["finish_reason"] != "tool_calls"
    assert "".join(t["token"] for t in content_of(choice)) == text_of(choice)
    chunks = await collect(llama.stream(greeting.model_copy(update={"stream": True})))
    assert streamed_logprobs(chunks, "content") == content_of(choice)


# --- completions ------------------------------------------------------------------------------------------


@needs_llama
@pytest.mark.parametrize("k", [pytest.param(0, id="chosen-only"), pytest.param(5, id="top-5")])
async def test_completion_logprobs_in_the_legacy_shape(llama: LlamaCppEngine, k: int) -> None:
    result = await llama.generate(CHAT.completion(logprobs=k))
    [choice] = result["choices"]
    logprobs = choice["logprobs"]
    tokens, offsets = logprobs["tokens"], logprobs["text_offset"]
    assert len(tokens) == len(offsets) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
    assert len(tokens) == result["usage"]["completion_tokens"]
    assert "".join(tokens) == choice["text"]
    # Counted from the start of the prompt, as OpenAI does.
    assert offsets == [len(CHAT.prompt) + len("".join(tokens[:i])) for i in range(len(tokens))]
    assert offsets == sorted(set(offsets))
    for token, logprob, top in zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True):
        assert logprob <= 0
        assert top[token] == logprob  # the chosen token is always there
        assert len(top) <= k + 1 and (k == 0) == (len(top) == 1)
        assert max(top.values()) == logprob  # greedy


@needs_llama
async def test_completion_stream_carries_the_same_logprobs(llama: LlamaCppEngine) -> None:
    whole = (await llama.generate(CHAT.completion(logprobs=2)))["choices"][0]["logprobs"]
    chunks = await collect(llama.stream(CHAT.completion(logprobs=2, stream=True)))
    assert {key: streamed_logprobs(chunks, key) for key in whole} == whole


# --- asking -----------------------------------------------------------------------------------------------


@needs_llama
async def test_without_logprobs_there_are_none(llama: LlamaCppEngine) -> None:
    for request in (CHAT.chat(max_tokens=3), CHAT.chat(max_tokens=3, logprobs=False),
                    CHAT.completion(max_tokens=3)):
        assert (await llama.generate(request))["choices"][0]["logprobs"] is None
        chunks = await collect(llama.stream(request.model_copy(update={"stream": True})))
        assert all(choice["logprobs"] is None for c in chunks for choice in c["choices"])


@needs_llama
@pytest.mark.parametrize(("chat", "overrides", "error", "param"), [
    pytest.param(True, {"logprobs": True, "top_logprobs": 21}, InvalidRequest, "top_logprobs", id="top-21"),
    pytest.param(True, {"logprobs": True, "top_logprobs": -1}, InvalidRequest, "top_logprobs", id="top-neg"),
    pytest.param(True, {"top_logprobs": 2}, InvalidRequest, "top_logprobs", id="top-without-logprobs"),
    pytest.param(True, {"logprobs": False, "top_logprobs": 2}, InvalidRequest, "top_logprobs",
                 id="top-with-logprobs-false"),
    pytest.param(True, {"logprobs": 3}, InvalidRequest, "logprobs", id="chat-logprobs-int"),
    pytest.param(False, {"logprobs": 6}, InvalidRequest, "logprobs", id="completion-logprobs-6"),
    pytest.param(False, {"logprobs": True}, InvalidRequest, "logprobs", id="completion-logprobs-true"),
    pytest.param(False, {"logprobs": 1, "top_logprobs": 1}, UnsupportedParameter, "top_logprobs",
                 id="completion-top-logprobs"),
    pytest.param(False, {"logprobs": 1, "echo": True}, UnsupportedParameter, "echo", id="echo"),
])
async def test_out_of_bounds_is_a_400(llama: LlamaCppEngine, chat: bool, overrides: dict[str, Any],
                                      error: type[InvalidRequest], param: str) -> None:
    request = CHAT.chat(**overrides) if chat else CHAT.completion(**overrides)
    await expect_error(llama.generate(request), error, param)
    await expect_error(first_chunk(llama.stream(request.model_copy(update={"stream": True}))), error, param)


# --- preemption -------------------------------------------------------------------------------------------


@needs_llama
async def test_a_preempted_request_keeps_its_tokens_logprobs(llama: LlamaCppEngine) -> None:
    """Replayed tokens keep the logprobs they were sampled with; the resumed run adds the rest."""
    low = Turn(priority=0, tenant="low", rank=0, label="low")
    high = Turn(priority=10, tenant="high", rank=1, label="high")
    counting = CHAT.completion(prompt="1, 2, 3, 4, 5,", max_tokens=120, logprobs=1)
    started = asyncio.get_running_loop().time()
    reference = (await llama.generate(counting, low))["choices"][0]
    seconds = asyncio.get_running_loop().time() - started

    order: list[str] = []

    async def run(name: str, request: Any, turn: Turn) -> dict[str, Any]:
        result = await llama.generate(request, turn)
        order.append(name)
        return dict(result)

    preempted = asyncio.ensure_future(run("low", counting, low))
    await asyncio.sleep(seconds / 3)
    await asyncio.wait_for(run("high", CHAT.chat(max_tokens=2), high), 120)
    result = (await asyncio.wait_for(preempted, 300))["choices"][0]
    assert order == ["high", "low"]
    assert result["text"] == reference["text"]
    assert result["logprobs"]["tokens"] == reference["logprobs"]["tokens"]
    got, want = result["logprobs"]["token_logprobs"], reference["logprobs"]["token_logprobs"]
    # The tokens before the preemption are kept as sampled: exactly the uninterrupted run's values.
    seam = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(got))
    assert seam > 0, "the high request came before the low one had sampled anything"
    # After it, prompt + tokens were read again in one batch, which moves the logits a little (seen up
    # to 0.07 here), never much: the same greedy tokens came out.
    assert got[seam:] == pytest.approx(want[seam:], abs=0.25)


# --- covering the text ------------------------------------------------------------------------------------


def token(piece: bytes, logprob: float = -0.5) -> TokenLogprob:
    return TokenLogprob(piece, logprob, ())


def test_a_character_split_across_tokens_is_covered_once_whole() -> None:
    tokens = [token(b"caf"), token("é".encode()[:1]), token("é".encode()[1:] + b"!")]
    cover = Cover(tokens, offset=10)
    assert [(o, t.piece) for o, t in cover.take("caf")] == [(10, b"caf")]
    # Both halves of "é" arrive with the piece that holds it; offsets count characters.
    assert [(o, t.piece) for o, t in cover.take("é!")] == [(13, b"\xc3"), (13, b"\xa9!")]
    assert cover.take("") == []


def test_text_cut_inside_a_token_cuts_the_token_and_drops_the_rest() -> None:
    tokens = [token(b"Hello"), token(b" wor", -1.0), token(b"ld")]
    taken = Cover(tokens).take("Hello w")
    assert [(o, t.piece, t.logprob) for o, t in taken] == [(0, b"Hello", -0.5), (5, b" w", -1.0)]


def test_a_piece_waits_for_tokens_not_yet_begun() -> None:
    tokens: list[TokenLogprob] = [token(b"a")]
    cover = Cover(tokens)
    assert [t.piece for _, t in cover.take("a")] == [b"a"]
    tokens.append(token(b"b"))  # sampled after the piece was handed out
    assert cover.take("") == []
    assert [t.piece for _, t in cover.take("b")] == [b"b"]
