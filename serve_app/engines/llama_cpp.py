"""Chat and text completions on CPU with llama-cpp-python (default model: SmolLM2-135M-Instruct GGUF).

llama.cpp is blocking and not thread-safe, and a Ray Serve replica runs our coroutines on its event loop.
So every model call runs in a worker thread (``asyncio.to_thread``), one at a time: a run slot
(serve_app/engines/slots.py) queues requests on the loop in IIR's priority order, and a ``threading.Lock``
guards the model itself, because a cancelled caller stops waiting for its thread before that thread has
let go of the model.

Preemption ("recompute", as vLLM does it): when a higher priority class waits, the running generation
stops at its next token and queues again ahead of its peers. Its ``_Tracker`` keeps the completion tokens
so far; when it runs again, ``TrackedLlama.generate`` hands llama-cpp-python those tokens as if just
sampled (so detokenization, stop strings and ``max_tokens`` stay exact), then samples on after evaluating
prompt + those tokens in one batch. A stream skips the text its client already has. Log probabilities
are kept on the tracker too, as each token is sampled (serve_app/engines/llama_logprobs.py).

``llama_cpp`` is imported when an engine is built, never at module import.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from serve_app.engines.base import EngineBase, new_id, now, usage
from serve_app.engines.llama_logprobs import LogprobReader, TokenLogprob, annotator
from serve_app.engines.llama_requests import Call, Piece, choice, piece, plan, stream_chunk, text_offset
from serve_app.engines.slots import RunSlots
from serve_app.engines.structured import CallOrText
from serve_app.errors import InvalidRequest, ServiceUnavailable, UnsupportedParameter
from serve_app.fair_queue import NO_TURN, Turn
from serve_app.registry.catalog import ModelSpec, resolve_source
from serve_app.schemas import ChatCompletionRequest, GenerateRequest

T = TypeVar("T")
# Ahead of every waiter, but in the lowest class: closing waits for the running call instead of preempting
# it (a preempted call would resume on a closed model and fail).
_CLOSING = Turn(priority=10**9, label="close")
# Tokens read per step of a preemptible prompt: a waiting higher class stops it within one step. Prompt
# reading costs ~6 ms a token on this CPU (a whole prompt, 0.2–0.5 s); 16-token steps cost ~6 % more than
# one batch, 8-token steps ~20 %.
_EVAL_STEP = 16


class _Yielded(Exception):
    """Raised out of ``eval`` between prompt steps: a higher class is waiting."""


@dataclass
class _Tracker:
    """One generation's window into llama.cpp's sampling loop (see ``_tracked_llama_class``), across the
    segments a preempted generation runs in."""

    limit: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)  # the completion so far, replayed when resuming
    yield_now: threading.Event | None = None  # the current segment's slot asks it to stop
    preempted: bool = False  # the current segment stopped for ``yield_now``: its output is not the answer
    waited_s: float = 0.0  # in the engine's queue, over all segments (the class's budget applies to it)
    top_logprobs: int | None = None  # alternatives per token; None: no logprobs, and no work for them
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token of ``tokens``

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def begin(self, yield_now: threading.Event | None) -> None:
        self.yield_now, self.preempted = yield_now, False

    def must_yield(self) -> bool:
        return self.yield_now is not None and self.yield_now.is_set()


@functools.cache
def _tracked_llama_class() -> type[Any]:
    import llama_cpp
    import numpy as np

    class TrackedLlama(llama_cpp.Llama):  # type: ignore[misc]
        """A ``Llama`` whose token loop reports to the current ``_Tracker``.

        llama-cpp-python's streams carry no usage, and its loop only ends at EOS, a stop string or
        ``max_tokens``. Every completion path goes through ``generate``, so wrapping it gives exact token
        counts for streams, lets a request whose caller went away (or that is preempted) stop at the next
        token, replays a preempted request's tokens when it resumes, and enforces ``max_tokens`` even
        where llama-cpp-python overshoots it to finish a multi-byte character.
        """

        tracker: _Tracker | None = None
        reuse_prefix = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._logprobs = LogprobReader(
                self._n_vocab, lambda token, special: self._model.detokenize([token], special=special))

        def generate(  # type: ignore[override]
            self, tokens: Sequence[int], *args: Any, **kwargs: Any
        ) -> Iterator[int]:
            tracker = self.tracker or _Tracker()
            tracker.prompt_tokens = len(tokens)
            replay = list(tracker.tokens)  # empty unless resuming after a preemption
            if not self.reuse_prefix:
                # Forget the previous request's KV cache: re-evaluating only the unmatched tail of a
                # prompt gives slightly different logits than evaluating it whole, enough to flip greedy
                # choices, so the same request at temperature 0 (or with a seed) could answer differently.
                self.reset()
            # Earlier segments' tokens, unsampled: the caller's loop counts and detokenizes them again.
            yield from replay
            try:
                for token in super().generate([*tokens, *replay], *args, **kwargs):
                    if tracker.cancel.is_set() or tracker.completion_tokens == tracker.limit:
                        return
                    # An end-of-generation token ends the loop without being part of the completion.
                    if llama_cpp.llama_vocab_is_eog(self._model.vocab, token):
                        yield token
                        return
                    if tracker.must_yield():
                        tracker.preempted = True  # this token is dropped: the resumed run samples it again
                        return
                    tracker.tokens.append(token)
                    if tracker.top_logprobs is not None:
                        tracker.logprobs.append(self._logprob(token, tracker.top_logprobs))
                    yield token
            except _Yielded:
                tracker.preempted = True  # stopped while reading the prompt

        def _logprob(self, token: int, k: int) -> TokenLogprob:
            # Until the next eval, the context's last row of logits is the one ``token`` was sampled from.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1),
                                           shape=(self._n_vocab,))
            return self._logprobs.read(logits, token, k)

        def eval(self, tokens: Sequence[int]) -> None:
            tracker = self.tracker
            if tracker is None or tracker.yield_now is None or len(tokens) <= _EVAL_STEP:
                return super().eval(tokens)  # type: ignore[no-any-return]
            for start in range(0, len(tokens), _EVAL_STEP):
                if tracker.must_yield():
                    raise _Yielded
                super().eval(tokens[start:start + _EVAL_STEP])
            return None

        def _init_sampler(self, *args: Any, **kwargs: Any) -> Any:
            # Repetition penalties must remember a resumed generation's earlier tokens, as they would
            # have without the preemption. (Sampling at temperature > 0 restarts its random stream from
            # the seed, so a preempted seeded request is not bit-reproducible; that is accepted.)
            sampler = super()._init_sampler(*args, **kwargs)
            for token in self.tracker.tokens if self.tracker is not None else ():
                sampler.accept(token)
            return sampler

    return TrackedLlama


class LlamaCppEngine(EngineBase):
    name = "llama_cpp"

    def __init__(self, model_path: Path, *, n_ctx: int = 2048, n_threads: int | None = None,
                 reuse_prefix: bool = False, preempt: bool = True, model_name: str | None = None,
                 **llama_kwargs: Any) -> None:
        """``reuse_prefix`` trades reproducible output for skipping the evaluation of a prompt prefix
        shared with the previous request (long multi-turn chats); ``preempt`` lets a higher priority
        class pause the running generation; ``llama_kwargs`` go to ``Llama``."""
        llama_kwargs.setdefault("verbose", False)
        # ggml's threads spin at barriers, so more threads than free cores is ruinous: with one of two cores
        # busy, 200 tokens took 31 s on 2 threads and 2.9 s on 1. Default to half the cores (as
        # llama-cpp-python does) and use the same count for prompt evaluation, which it would run on
        # every core; configs should set n_threads to the replica's num_cpus.
        threads = n_threads or max(1, len(os.sched_getaffinity(0)) // 2)
        llama_kwargs.setdefault("n_threads_batch", threads)
        self._llama: Any = _tracked_llama_class()(
            model_path=str(model_path), n_ctx=n_ctx, n_threads=threads, **llama_kwargs)
        self._llama.reuse_prefix = reuse_prefix
        self.model_name = model_name or Path(model_path).name
        self._slots = RunSlots(1, preempt=preempt, model=self.model_name)  # one Llama: one generation
        self._model_lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> LlamaCppEngine:
        if not spec.source:
            raise ValueError(f"{spec.id}: a local model needs 'source'")
        return cls(resolve_source(spec.source), model_name=spec.id, **spec.engine_options)

    async def generate(self, request: GenerateRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        calls = plan(request)
        chat = isinstance(request, ChatCompletionRequest)
        results = [await self._generate_one(call, turn) for call in calls]
        pairs = list(zip(calls, results, strict=True))
        prompt_tokens = {c.prompt_index: r["usage"]["prompt_tokens"] for c, (r, _) in pairs}
        completion_tokens = sum(r["usage"]["completion_tokens"] for r, _ in results)
        return {
            "id": new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": now(),
            "model": self.model_name,
            "choices": [choice(c, r["choices"][0], chat, t.logprobs) for c, (r, t) in pairs],
            "usage": usage(sum(prompt_tokens.values()), completion_tokens),
        }

    async def _generate_one(self, call: Call, turn: Turn) -> tuple[dict[str, Any], _Tracker]:
        tracker = _Tracker(limit=call.options["max_tokens"], top_logprobs=call.logprobs)
        work = functools.partial(self._with_model, tracker, functools.partial(call.start, stream=False))
        resuming = False
        while True:
            async with self._slot(call, turn, tracker, resuming=resuming):
                task = asyncio.ensure_future(asyncio.to_thread(work))
                try:
                    result = await asyncio.shield(task)
                finally:
                    await _stop(task, tracker)
            # A preempted segment's result is cut short: the resumed run produces the whole completion.
            if not tracker.preempted:
                return result, tracker
            resuming = True

    @contextlib.asynccontextmanager
    async def _slot(self, call: Call, turn: Turn, tracker: _Tracker, *,
                    resuming: bool) -> AsyncIterator[None]:
        """This call's turn with the model, for one segment; the body must wait for its thread."""
        started = time.perf_counter()
        slot = await self._slots.acquire(turn, resuming=resuming, preemptible=call.preemptible,
                                         waited_s=tracker.waited_s)
        tracker.waited_s += time.perf_counter() - started
        try:
            tracker.begin(slot.yield_now if slot.preemptible else None)
            yield
        finally:
            self._slots.release(slot)

    async def stream(self, request: GenerateRequest, turn: Turn = NO_TURN) -> AsyncIterator[dict[str, Any]]:
        calls = plan(request)
        if request.n > 1:
            raise UnsupportedParameter("n > 1 is not supported when streaming from this model", param="n")
        chat = isinstance(request, ChatCompletionRequest)
        stream_id = new_id("chatcmpl" if chat else "cmpl")
        frame = functools.partial(stream_chunk, chat=chat, id=stream_id, created=now(), model=self.model_name)
        if chat:
            yield frame(index=0, role=True)
        prompt_tokens = completion_tokens = 0
        for call in calls:
            tracker = _Tracker(limit=call.options["max_tokens"], top_logprobs=call.logprobs)
            annotate = _no_logprobs if call.logprobs is None else annotator(
                tracker.logprobs, chat=chat, offset=text_offset(call))
            if call.echo:
                yield frame(index=call.index, text=call.echo)
            # aclosing: when our consumer leaves, the inner generator must stop the model now, not whenever
            # it is garbage-collected.
            async with contextlib.aclosing(self._stream_one(call, turn, tracker)) as pieces:
                if call.tools:
                    async for chunk in _calls_or_text(pieces, functools.partial(frame, index=call.index),
                                                      annotate):
                        yield chunk
                else:
                    async for text, finish_reason in pieces:
                        yield frame(index=call.index, text=text, finish_reason=finish_reason,
                                    logprobs=annotate(text))
            prompt_tokens += tracker.prompt_tokens
            completion_tokens += tracker.completion_tokens
        if request.include_usage:
            yield {**frame(index=0), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    async def _stream_one(self, call: Call, turn: Turn, tracker: _Tracker) -> AsyncGenerator[Piece, None]:
        """Pieces of one choice, as one stream however often it is preempted."""
        sent = 0  # characters our consumer has
        resuming = False
        while True:
            # A resumed segment re-emits the replayed tokens' text exactly as before (same tokens, same
            # detokenization): skip what was sent, then go on.
            skip = sent
            async with contextlib.aclosing(self._stream_segment(call, turn, tracker, resuming)) as pieces:
                async for text, finish_reason in pieces:
                    dropped = min(skip, len(text))
                    skip -= dropped
                    if text[dropped:] or finish_reason:
                        sent += len(text) - dropped
                        yield text[dropped:], finish_reason
            if not tracker.preempted:
                return
            resuming = True

    async def _stream_segment(self, call: Call, turn: Turn, tracker: _Tracker,
                              resuming: bool) -> AsyncGenerator[Piece, None]:
        """Pieces of one segment, from llama-cpp-python's blocking iterator in a worker thread."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

        def post(kind: str, item: Any) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, item))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                tracker.cancel.set()

        def produce(llama: Any) -> None:
            chunks = call.start(llama, stream=True)
            try:
                for chunk in chunks:
                    # Once preempted, llama-cpp-python flushes held-back text and a finish_reason: the
                    # resumed run emits those, so they are dropped here.
                    if tracker.cancel.is_set() or tracker.preempted:
                        break
                    post("piece", piece(chunk))
            finally:
                chunks.close()

        def work() -> None:
            try:
                self._with_model(tracker, produce)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                post("error", exc)
            else:
                post("done", None)

        async with self._slot(call, turn, tracker, resuming=resuming):
            task = asyncio.ensure_future(asyncio.to_thread(work))
            try:
                while True:
                    kind, item = await queue.get()
                    if kind == "error":
                        raise item
                    if kind == "done":
                        # Let the thread end on its own: ``_stop`` would set ``cancel``, which outlives
                        # this segment and would stop the next one.
                        await asyncio.wait([task])
                        return
                    if item[0] or item[1]:
                        yield item
            finally:
                await _stop(task, tracker)

    def _with_model(self, tracker: _Tracker, work: Callable[[Any], T]) -> T:
        """Runs in a worker thread, alone with the model."""
        with self._model_lock:
            if self._llama is None:
                raise ServiceUnavailable("the model is closed")
            self._llama.tracker = tracker
            try:
                return work(self._llama)
            except ValueError as exc:
                if "context window" in str(exc):
                    raise InvalidRequest(str(exc), code="context_length_exceeded") from exc
                raise
            finally:
                self._llama.tracker = None

    async def check_health(self) -> None:
        if self._llama is None:
            raise ServiceUnavailable("the model is closed")

    async def aclose(self) -> None:
        slot = await self._slots.acquire(_CLOSING)
        try:
            await asyncio.to_thread(self._close)
        finally:
            self._slots.release(slot)

    def _close(self) -> None:
        with self._model_lock:
            if self._llama is not None:
                self._llama.close()
                self._llama = None


def _no_logprobs(text: str) -> None:
    return None


async def _calls_or_text(pieces: AsyncIterator[Piece], frame: Callable[..., dict[str, Any]],
                         annotate: Callable[[str], dict[str, Any] | None]) -> AsyncIterator[dict[str, Any]]:
    """A stream that may be a tool call: text streams as it comes once its first character says it is
    not a call (``{``); a call is held until whole and sent as one ``tool_calls`` delta, as the SDKs
    accept, then ``finish_reason: "tool_calls"``. Only text carries logprobs (``annotate``)."""
    answer = CallOrText()
    finish: str | None = None
    async for text, finish_reason in pieces:
        finish = finish_reason or finish
        sendable = answer.feed(text)
        if answer.is_text:
            yield frame(text=sendable, finish_reason=finish_reason, logprobs=annotate(sendable))
    if answer.is_text:
        return
    whole, calls = answer.end()
    if calls is None:  # cut short by max_tokens: what there is, as text
        yield frame(text=whole, finish_reason=finish, logprobs=annotate(whole))
        return
    first = frame()
    first["choices"][0]["delta"] = {"tool_calls": [{"index": 0, **call} for call in calls]}
    yield first
    yield frame(finish_reason="tool_calls")


async def _stop(task: asyncio.Future[Any], tracker: _Tracker) -> None:
    """Keep the request's turn until its thread has let go of the model, stopping it at the next token."""
    if not task.done():
        tracker.cancel.set()
        await asyncio.wait([task])
