"""Priority under overload on the real llama.cpp engine (SmolLM2-135M on CPU): queued requests run in IIR's
order (serve_app/fair_queue.py), and a higher priority class preempts the running generation, which then
resumes where it was (serve_app/engines/slots.py, serve_app/engines/llama_cpp.py).

Waits are derived from measured generation times, so the tests hold on slow, shared cores."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from serve_app.engines.llama_cpp import LlamaCppEngine
from serve_app.fair_queue import Turn
from serve_app.schemas import CompletionRequest
from tests.engines.contract import Requests, streamed_text, text_of
from tests.engines.local_models import SMOLLM2, needs_llama

pytestmark = needs_llama

CHAT = Requests(model=SMOLLM2.id)
LOW = Turn(priority=0, tenant="low-key", rank=0, label="low")
HIGH = Turn(priority=10, tenant="high-key", rank=1, label="high")
SHORT = CHAT.chat(max_tokens=2)


def counting(max_tokens: int = 150, **overrides: Any) -> CompletionRequest:
    """A continuation whose every next token is near-certain ("6, 7, 8, ...").

    Re-evaluating prompt + tokens in one batch after a preemption gives slightly different logits than
    generating them one by one: enough to flip a near-tie later in free text (seen with chat answers and
    stories), not the next number here (no flip at any preemption point tried). So a resumed run must
    equal an unpreempted one, and a token duplicated or lost at the seam shows."""
    return CHAT.completion(prompt="1, 2, 3, 4, 5,", max_tokens=max_tokens, **overrides)


COUNTING = counting()
ENDLESS = counting(600)


@dataclass(frozen=True)
class Reference:
    result: dict[str, Any]  # COUNTING, unpreempted
    seconds: float

    @property
    def text(self) -> str:
        return text_of(self.result["choices"][0])


@pytest.fixture(scope="module")
async def fifo() -> AsyncIterator[LlamaCppEngine]:
    """Priority order without preemption, set as models.yaml would."""
    engine = LlamaCppEngine.from_spec(SMOLLM2.model_copy(
        update={"engine_options": {**SMOLLM2.engine_options, "preempt": False}}))
    yield engine
    await engine.aclose()


@pytest.fixture(scope="module")
async def reference(llama: LlamaCppEngine) -> Reference:
    started = time.monotonic()
    result = await llama.generate(COUNTING, LOW)
    assert result["usage"]["completion_tokens"] == COUNTING.max_tokens
    return Reference(result, time.monotonic() - started)


async def finish(order: list[str], name: str, call: Awaitable[Any]) -> Any:
    result = await call
    order.append(name)
    return result


async def until(done: Callable[[], object], timeout: float = 120) -> None:
    async with asyncio.timeout(timeout):
        while not done():
            await asyncio.sleep(0.01)


def finish_reasons(chunks: list[dict[str, Any]]) -> list[str]:
    return [choice["finish_reason"] for c in chunks for choice in c["choices"] if choice["finish_reason"]]


# --- order ----------------------------------------------------------------------------------------------


async def test_queued_requests_run_by_priority_then_arrival(fifo: LlamaCppEngine) -> None:
    order: list[str] = []
    blocker = asyncio.ensure_future(finish(order, "blocker", fifo.generate(counting(40), LOW)))
    await asyncio.sleep(0.1)  # it holds the only slot
    queued = [("low1", LOW), ("low2", LOW), ("high", HIGH), ("low3", LOW)]
    tasks = [asyncio.ensure_future(finish(order, name, fifo.generate(SHORT, turn))) for name, turn in queued]
    await asyncio.wait_for(asyncio.gather(blocker, *tasks), 300)
    # Not preempted (preempt: false), and ahead of the low ones that came before it.
    assert order == ["blocker", "high", "low1", "low2", "low3"]


async def test_keys_take_turns_within_a_priority(fifo: LlamaCppEngine) -> None:
    order: list[str] = []
    blocker = asyncio.ensure_future(finish(order, "blocker", fifo.generate(counting(40), LOW)))
    await asyncio.sleep(0.1)
    busy, other = Turn(tenant="fair-busy"), Turn(tenant="fair-other")
    queued = [(f"busy{i}", busy) for i in range(1, 5)] + [("other", other)]
    tasks = [asyncio.ensure_future(finish(order, name, fifo.generate(SHORT, turn))) for name, turn in queued]
    await asyncio.wait_for(asyncio.gather(blocker, *tasks), 300)
    assert order == ["blocker", "busy1", "other", "busy2", "busy3", "busy4"]


# --- preemption -----------------------------------------------------------------------------------------


async def test_high_class_preempts_and_low_resumes(llama: LlamaCppEngine, reference: Reference) -> None:
    order: list[str] = []
    low = asyncio.ensure_future(finish(order, "low", llama.generate(COUNTING, LOW)))
    await asyncio.sleep(reference.seconds / 3)  # a good part of its tokens are out
    await asyncio.wait_for(finish(order, "high", llama.generate(SHORT, HIGH)), 120)
    result = await asyncio.wait_for(low, 300)
    assert order == ["high", "low"]
    assert result["usage"] == reference.result["usage"]  # replayed tokens counted once
    assert result["choices"][0]["finish_reason"] == "length"
    assert text_of(result["choices"][0]) == reference.text


async def test_preempted_request_resumes_ahead_of_its_peers(llama: LlamaCppEngine,
                                                             reference: Reference) -> None:
    order: list[str] = []
    low = asyncio.ensure_future(finish(order, "preempted", llama.generate(COUNTING, LOW)))
    await asyncio.sleep(reference.seconds / 3)
    peer = asyncio.ensure_future(finish(order, "peer", llama.generate(SHORT, Turn(tenant="peer-key"))))
    await asyncio.sleep(0.1)
    await asyncio.wait_for(finish(order, "high", llama.generate(SHORT, HIGH)), 120)
    await asyncio.wait_for(asyncio.gather(low, peer), 300)
    assert order == ["high", "preempted", "peer"]


async def test_preempted_stream_is_one_continuous_stream(llama: LlamaCppEngine, reference: Reference) -> None:
    chunks: list[dict[str, Any]] = []

    async def consume() -> None:
        request = counting(stream=True, stream_options={"include_usage": True})
        async for chunk in llama.stream(request, LOW):
            chunks.append(chunk)

    low = asyncio.ensure_future(consume())
    await until(lambda: len(streamed_text(chunks)) >= 30 or low.done())
    before = streamed_text(chunks)
    await asyncio.wait_for(llama.generate(SHORT, HIGH), 120)
    at_high = len(streamed_text(chunks))
    assert not low.done(), "the high request waited for the whole stream: no preemption"
    await asyncio.wait_for(low, 300)

    *content, last = chunks
    text = streamed_text(content)
    assert before and len(text) > at_high  # preempted mid-way, then resumed
    assert text == reference.text  # nothing re-sent, nothing lost at the seam
    assert finish_reasons(content) == ["length"]
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in content)
    assert last["choices"] == [] and last["usage"] == reference.result["usage"]


async def test_json_object_requests_are_not_preempted(llama: LlamaCppEngine) -> None:
    """Their grammar state would not survive a replay: they run to the end."""
    order: list[str] = []
    question = "List the planets of the solar system as JSON with their order and size."
    request = CHAT.chat(max_tokens=80, stream=True, response_format={"type": "json_object"},
                        messages=[{"role": "user", "content": question}])
    chunks: list[dict[str, Any]] = []

    async def consume() -> None:
        async for chunk in llama.stream(request, LOW):
            chunks.append(chunk)
        order.append("json")

    low = asyncio.ensure_future(consume())
    await until(lambda: streamed_text(chunks) or low.done())
    await asyncio.wait_for(finish(order, "high", llama.generate(SHORT, HIGH)), 300)
    await low
    assert order == ["json", "high"]
    assert streamed_text(chunks).lstrip().startswith("{")
    assert len(finish_reasons(chunks)) == 1


# --- callers that leave -----------------------------------------------------------------------------------


async def test_cancelled_waiter_gives_up_its_place(fifo: LlamaCppEngine) -> None:
    order: list[str] = []
    blocker = asyncio.ensure_future(finish(order, "blocker", fifo.generate(counting(40), LOW)))
    await asyncio.sleep(0.1)
    gone = asyncio.ensure_future(fifo.generate(ENDLESS, LOW))
    waiter = asyncio.ensure_future(finish(order, "waiter", fifo.generate(SHORT, LOW)))
    await asyncio.sleep(0.1)
    gone.cancel()
    await asyncio.wait_for(blocker, 120)
    freed = time.monotonic()
    await asyncio.wait_for(waiter, 120)
    # 600 tokens would take many seconds; two tokens well under one.
    assert time.monotonic() - freed < 5
    assert order == ["blocker", "waiter"]
    assert gone.cancelled()


async def test_cancelled_running_call_stops_and_next_waiter_runs(llama: LlamaCppEngine) -> None:
    running = asyncio.ensure_future(llama.generate(ENDLESS, LOW))
    await asyncio.sleep(0.3)
    waiter = asyncio.ensure_future(llama.generate(SHORT, LOW))  # same class: it waits, no preemption
    await asyncio.sleep(0.3)
    assert not waiter.done()
    cancelled = time.monotonic()
    running.cancel()
    result = await asyncio.wait_for(waiter, 120)
    assert time.monotonic() - cancelled < 5
    assert text_of(result["choices"][0])
    assert running.cancelled()


async def test_a_long_prompt_is_preempted_while_it_is_being_read(llama: LlamaCppEngine) -> None:
    """Reading a prompt costs ~6 ms a token here: a high-priority request must not wait for a
    low-priority prompt of hundreds of tokens to be read, only for one step of it."""
    story = "The history of the lighthouse, told year by year. " * 40
    long_prompt = CHAT.completion(prompt=story, max_tokens=1)
    started = time.monotonic()
    await llama.generate(long_prompt, LOW)
    reading_s = time.monotonic() - started  # the prompt alone
    started = time.monotonic()
    await llama.generate(SHORT, HIGH)
    high_alone_s = time.monotonic() - started

    low = asyncio.ensure_future(llama.generate(long_prompt, LOW))
    await asyncio.sleep(reading_s / 4)  # well into reading it
    started = time.monotonic()
    await asyncio.wait_for(llama.generate(SHORT, HIGH), 120)
    high_s = time.monotonic() - started
    result = await asyncio.wait_for(low, 300)
    assert result["usage"]["completion_tokens"] == 1  # the low one read its prompt again and finished
    # Waiting for the rest of the prompt would take ~3/4 of reading_s; one step is a few hundredths.
    assert high_s < high_alone_s + reading_s / 3, (high_s, high_alone_s, reading_s)
