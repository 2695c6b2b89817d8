"""Server-sent events in OpenAI's framing: ``data: {json}\\n\\n`` … ``data: [DONE]\\n\\n`` for chat and
completions; for the Responses API's typed events, ``event: {type}\\ndata: {json}\\n\\n``, no
``[DONE]``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from serve_app.errors import IIRError, UpstreamError

logger = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"


def encode(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def close(chunks: AsyncIterator[Any]) -> None:
    """Close an async generator now (its ``finally`` blocks run), not when it is garbage-collected."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


async def chained(first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]], *,
                  on_end: Callable[[], None] | None = None) -> AsyncIterator[dict[str, Any]]:
    """The stream from its first chunk (already pulled); when it ends, however it ends, ``on_end`` runs
    and ``rest`` is closed now (a client that left gives the model back at once)."""
    try:
        if first is not None:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        if on_end is not None:
            on_end()
        await close(rest)


async def first_and_rest(chunks: AsyncIterator[dict[str, Any]]) -> tuple[dict[str, Any] | None,
                                                                          AsyncIterator[dict[str, Any]]]:
    """Pull the first chunk before answering, so errors before any output get a real HTTP status."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        return None, chunks
    return first, chunks


async def event_stream(first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]], *,
                       model_id: str, request_id: str) -> AsyncIterator[bytes]:
    """Frame chunks as SSE. A failure after the first byte ends with an error event, never ``[DONE]``."""
    try:
        if first is not None:
            first["model"] = model_id
            yield encode(first)
        async for chunk in rest:
            chunk["model"] = model_id
            yield encode(chunk)
    except IIRError as exc:
        logger.warning("stream %s ended by %s: %s", request_id, type(exc).__name__, exc.message)
        yield encode(exc.to_body())
        return
    except Exception:
        logger.exception("stream %s failed", request_id)
        yield encode(UpstreamError(f"the stream failed (request id {request_id})").to_body())
        return
    yield DONE


def encode_typed(event: dict[str, Any]) -> bytes:
    return (b"event: " + str(event.get("type", "message")).encode() + b"\ndata: "
            + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")


async def typed_event_stream(first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]], *,
                             request_id: str) -> AsyncIterator[bytes]:
    """Frame typed events. Their producer ends a failed stream with its own ``error`` event; this is
    the backstop for anything it let through."""
    try:
        if first is not None:
            yield encode_typed(first)
        async for event in rest:
            yield encode_typed(event)
    except Exception as exc:
        logger.exception("stream %s failed", request_id)
        error = exc if isinstance(exc, IIRError) else UpstreamError(
            f"the stream failed (request id {request_id})")
        body = error.to_body()
        yield encode_typed({"type": "error", **body["error"], **body})
    finally:
        await close(rest)
