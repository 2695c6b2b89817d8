"""Usage on the request path: what the pipeline's meter step records after the model call.

    meter = Meter(usage_recorder, limiter_or_None, key_id, model_id)
    meter.record(result.get("usage"))                         # a JSON answer
    meter.stream(engine.stream(with_stream_usage(body)),      # a stream: usage from its last chunk
                 strip_usage=not body.include_usage)

Both are in-memory adds (``UsageRecorder.record``, ``RateLimiter.add_tokens``); nothing here awaits
a database or Redis. A request is counted once the model answered: a JSON body, or at least one chunk
of a stream (a stream cut short counts the usage seen so far).

Streams: engines report usage only in a last chunk with ``choices: []`` and only when asked
(``stream_options.include_usage``), so the ingress always asks, and removes that chunk again when the
client did not ask for it. An upstream that ignores the option leaves us no usage; then completion
tokens are estimated as the number of chunks that carried text (one token each for vLLM, llama.cpp
and OpenAI) and prompt tokens count as 0.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from serve_app import metrics
from serve_app.ingress.rate_limit import RateLimiter
from serve_app.ingress.usage_recorder import UsageRecorder
from serve_app.schemas import RESPONSE_END_EVENTS, GenerateRequest, StreamOptions


class Meter:
    __slots__ = ("_key_id", "_limiter", "_model", "_usage")

    def __init__(self, usage: UsageRecorder, limiter: RateLimiter | None, key_id: str, model: str) -> None:
        self._key_id = key_id
        self._model = model
        self._usage = usage
        self._limiter = limiter  # None: the key has no tokens/minute limit, so no count in Redis

    def record(self, usage: Any) -> None:
        prompt, completion = token_counts(usage)
        self._usage.record(self._key_id, prompt_tokens=prompt, completion_tokens=completion)
        metrics.TOKENS.inc(prompt, model=self._model, direction="in")
        metrics.TOKENS.inc(completion, model=self._model, direction="out")
        if self._limiter is not None:
            self._limiter.add_tokens(self._key_id, prompt + completion)

    async def stream(self, chunks: AsyncIterator[dict[str, Any]], *,
                     strip_usage: bool) -> AsyncIterator[dict[str, Any]]:
        usage: Any = None
        pieces = 0
        answered = False
        try:
            async for chunk in chunks:
                answered = True
                if chunk.get("usage"):
                    usage = chunk["usage"]
                elif chunk.get("type") in RESPONSE_END_EVENTS:  # a provider's own Responses API events
                    usage = (chunk.get("response") or {}).get("usage")
                if strip_usage and "usage" in chunk:
                    if not chunk.get("choices"):
                        continue  # the usage chunk we asked for on the client's behalf
                    del chunk["usage"]  # servers that repeat "usage": null on every chunk
                pieces += _text_pieces(chunk)
                yield chunk
        finally:
            if answered:
                self.record(usage if usage else {"completion_tokens": pieces})
            # A client that leaves must release the upstream stream now, not when it is collected.
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()


def with_stream_usage(body: GenerateRequest) -> GenerateRequest:
    """The request with ``stream_options.include_usage`` set, keeping the client's other options."""
    if body.include_usage:
        return body
    options = (body.stream_options.model_copy(update={"include_usage": True})
               if body.stream_options is not None else StreamOptions(include_usage=True))
    return body.model_copy(update={"stream_options": options})


def token_counts(usage: Any) -> tuple[int, int]:
    """(prompt, completion) tokens from an OpenAI ``usage`` object; garbage counts as 0."""
    if not isinstance(usage, dict):
        return 0, 0
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if not prompt and not completion:  # the Responses API's names
        prompt, completion = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    if not prompt and not completion:
        prompt = _count(usage.get("total_tokens"))
    return prompt, completion


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _text_pieces(chunk: dict[str, Any]) -> int:
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return 0
    n = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        n += bool(text)
    return n
