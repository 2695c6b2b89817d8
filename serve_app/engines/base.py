"""The engine protocol every model backend implements.

Engines speak OpenAI's wire format in plain dicts:
- ``generate``: a ``chat.completion`` dict for a ``ChatCompletionRequest``, a ``text_completion`` dict
  for a ``CompletionRequest``, each with ``usage``.
- ``stream``: ``chat.completion.chunk`` / ``text_completion`` chunk dicts; when the request asks for
  ``stream_options.include_usage`` the last chunk has ``choices: []`` and ``usage``. A failure after
  the first chunk is raised from the iterator (never swallowed) so the caller can end the stream
  with an error event instead of ``[DONE]``.
- ``embed``: a ``list`` object of ``embedding`` items with ``usage``.
- ``infer``: the generic task: a JSON input in, a JSON output out.
Each takes the request's ``Turn`` (key priority, key, priority class: serve_app/fair_queue.py); engines
that queue (llama.cpp's run slots, vLLM's scheduler) order by it, the others ignore it.
The ``model`` field engines put in responses is rewritten by the ingress to the IIR model id.
Operations a backend lacks raise ``InvalidRequest``; other failures raise ``IIRError`` subclasses.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from serve_app.errors import InvalidRequest
from serve_app.fair_queue import NO_TURN, Turn
from serve_app.schemas import EmbeddingRequest, GenerateRequest


@runtime_checkable
class InferenceEngine(Protocol):
    async def generate(self, request: GenerateRequest, turn: Turn = NO_TURN) -> dict[str, Any]: ...

    def stream(self, request: GenerateRequest, turn: Turn = NO_TURN) -> AsyncIterator[dict[str, Any]]: ...

    async def embed(self, request: EmbeddingRequest, turn: Turn = NO_TURN) -> dict[str, Any]: ...

    async def infer(self, payload: dict[str, Any], turn: Turn = NO_TURN) -> dict[str, Any]: ...

    async def check_health(self) -> None:
        """Raise ``ServiceUnavailable`` when the engine cannot serve."""

    async def aclose(self) -> None: ...


class EngineBase:
    """Defaults for the operations a backend does not offer."""

    name = "engine"
    # Whether /v1/responses requests go to the backend as they came (``respond``/``respond_stream``):
    # only a remote provider with ``responses_api: true``. The others are sent the request as chat.
    speaks_responses = False

    async def generate(self, request: GenerateRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        raise InvalidRequest(f"model {request.model!r} does not support text generation", param="model")

    async def stream(self, request: GenerateRequest, turn: Turn = NO_TURN) -> AsyncIterator[dict[str, Any]]:
        raise InvalidRequest(f"model {request.model!r} does not support streaming", param="model")
        yield {}  # pragma: no cover - makes this an async generator

    async def embed(self, request: EmbeddingRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        raise InvalidRequest(f"model {request.model!r} does not support embeddings", param="model")

    async def infer(self, payload: dict[str, Any], turn: Turn = NO_TURN) -> dict[str, Any]:
        raise InvalidRequest("this model has no generic inference endpoint", param="model")

    async def check_health(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
