"""What each model endpoint asks of the pipeline: which model, what ``auto`` reads, and how to call it.

    endpoint               job            cacheable  streams  auto
    /v1/chat/completions   GenerateJob    yes        yes      yes
    /v1/completions        GenerateJob    yes        yes      yes
    /v1/embeddings         EmbedJob       no         no       no (400: vectors must come from one model)
    /infer                 InferJob       no         no       yes
    /v1/classify           ClassifyJob    no         no       it is auto, without the model call

The generic ``/infer`` maps ``{"model", "input"}`` → ``{"output"}`` by the model's task:
- chat:       ``prompt`` (str) or ``messages``, plus optional ``max_tokens`` (default 256),
              ``temperature``, ``top_p``, ``seed``, ``stop`` → ``{"text", "finish_reason"}``
- completion: ``prompt`` (str) and the same options → ``{"text", "finish_reason"}``
- embedding:  ``text`` (str, or a list of str) → ``{"embedding"}`` (or ``{"embeddings"}`` for a list)
- generic:    any JSON object, POSTed to the model's HTTP endpoint → that endpoint's JSON
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from pydantic import ValidationError

from serve_app.engines.base import new_id
from serve_app.errors import InvalidRequest, ServiceUnavailable
from serve_app.fair_queue import Turn
from serve_app.ingress.metering import with_stream_usage
from serve_app.routing.classifier import Conversation
from serve_app.routing.router import AUTO_MODELS, Decision, Route
from serve_app.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerateRequest,
    InferRequest,
)

# /infer callers rarely think about length; without a cap a small model rambles to its context limit.
DEFAULT_INFER_MAX_TOKENS = 256
_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop")


class Job:
    """The defaults: a named model, not cacheable, answered as JSON."""

    model: str | None  # None: no model is called (/v1/classify)
    streaming = False
    # The request's headers, where they say something about the answer (Cache-Control, x-iir-cache).
    headers: Mapping[str, str] = {}

    def conversation(self) -> Conversation:
        """What ``model: "auto"`` classifies, as (role, text) turns."""
        return []

    def cacheable(self) -> GenerateRequest | None:
        """The body the response cache keys on (its ``model`` aside), or None when this endpoint is not
        cached."""
        return None

    # ``turn``: the request's place in the model's queues (serve_app/fair_queue.py)
    async def call(self, route: Route, turn: Turn) -> dict[str, Any]:
        raise NotImplementedError

    def stream(self, route: Route, turn: Turn) -> AsyncIterator[dict[str, Any]]:
        raise NotImplementedError

    @property
    def client_wants_usage(self) -> bool:
        """A stream's usage chunk goes to the client only if it asked (stream_options.include_usage)."""
        return False

    def answer(self, decision: Decision) -> dict[str, Any]:
        raise NotImplementedError


class GenerateJob(Job):
    def __init__(self, body: ChatCompletionRequest | CompletionRequest, headers: Mapping[str, str]) -> None:
        self.body = body
        self.headers = headers
        self._routed: GenerateRequest | None = None
        self.model = body.model
        self.streaming = bool(body.stream)

    def conversation(self) -> Conversation:
        if isinstance(self.body, CompletionRequest):
            return [("user", "\n".join(self.body.prompts()))]
        return [(m.role, m.text()) for m in self.body.messages]

    def _for(self, route: Route) -> GenerateRequest:
        """The body as the routed model gets it (made once: the cache key and the call share it)."""
        if self._routed is None or self._routed.model != route.spec.id:
            self._routed = self.body.model_copy(update={"model": route.spec.id})
        return self._routed

    def cacheable(self) -> GenerateRequest | None:
        return self.body

    async def call(self, route: Route, turn: Turn) -> dict[str, Any]:
        result = await route.engine.generate(self._for(route), turn)
        result["model"] = route.spec.id
        return result

    def stream(self, route: Route, turn: Turn) -> AsyncIterator[dict[str, Any]]:
        # Always asked for usage, to meter it; the meter strips it again unless the client asked too.
        return route.engine.stream(with_stream_usage(self._for(route)), turn)

    @property
    def client_wants_usage(self) -> bool:
        return self.body.include_usage


class EmbedJob(Job):
    def __init__(self, body: EmbeddingRequest) -> None:
        if body.model in AUTO_MODELS:
            # Vectors from different models can't be compared: picking one per request would corrupt
            # indexes.
            raise InvalidRequest('model "auto" routes chat and completions; embeddings need a named model '
                                 "(GET /v1/models lists them by task)", param="model",
                                 code="model_not_supported")
        self.body = body
        self.model = body.model

    async def call(self, route: Route, turn: Turn) -> dict[str, Any]:
        result = await route.engine.embed(self.body.model_copy(update={"model": route.spec.id}), turn)
        result["model"] = route.spec.id
        return result


class ClassifyJob(Job):
    """What ``model: "auto"`` would do with this conversation, without calling a model."""

    def __init__(self, body: ClassifyRequest) -> None:
        self.model = None
        self._conversation: Conversation = ([("user", body.input)] if body.input is not None else
                                            [(m.role, m.text()) for m in body.messages or []])

    def conversation(self) -> Conversation:
        return self._conversation

    def answer(self, decision: Decision) -> dict[str, Any]:
        result = decision.classification
        if result is None:
            raise ServiceUnavailable(f"the classifier is unavailable; model \"auto\" takes {decision.model} "
                                     "meanwhile", code="classifier_unavailable", headers={"Retry-After": "5"})
        return {"category": result.category, "confidence": result.confidence,
                "complexity": result.complexity, "model": decision.model, "reason": decision.reason,
                "scores": result.scores}


class InferJob(Job):
    def __init__(self, body: InferRequest) -> None:
        self.model = body.model
        self.payload = body.input

    def conversation(self) -> Conversation:
        prompt = self.payload.get("prompt") or self.payload.get("text") or ""
        return [("user", str(prompt))]

    async def call(self, route: Route, turn: Turn) -> dict[str, Any]:
        spec = route.spec
        if spec.task == "generic":
            output, usage = await route.engine.infer(self.payload, turn), None
        elif spec.task == "embedding":
            output, usage = await self._embed(route, turn)
        else:
            output, usage = await self._generate(route, turn)
        body: dict[str, Any] = {"id": new_id("infer"), "object": "inference", "model": spec.id,
                                "task": spec.task, "output": output}
        if usage is not None:
            body["usage"] = usage
        return body

    async def _generate(self, route: Route, turn: Turn) -> tuple[dict[str, Any], dict[str, Any]]:
        payload, prompt = self.payload, self.payload.get("prompt")
        sampling = {"max_tokens": DEFAULT_INFER_MAX_TOKENS,
                    **{k: payload[k] for k in _SAMPLING_KEYS if k in payload}}
        if route.spec.task == "chat":
            messages = payload.get("messages") or (
                [{"role": "user", "content": prompt}] if isinstance(prompt, str) else None)
            if messages is None:
                raise InvalidRequest("chat models take input.prompt (a string) or input.messages",
                                     param="input.prompt", code="invalid_value")
            request = _build(ChatCompletionRequest, {"model": route.spec.id, "messages": messages,
                                                     **sampling})
            result = await route.engine.generate(request, turn)
            choice = result["choices"][0]
            return {"text": choice["message"].get("content") or "",
                    "finish_reason": choice.get("finish_reason")}, result.get("usage", {})
        if not isinstance(prompt, str):
            raise InvalidRequest("completion models take input.prompt (a string)", param="input.prompt",
                                 code="invalid_value")
        request = _build(CompletionRequest, {"model": route.spec.id, "prompt": prompt, **sampling})
        result = await route.engine.generate(request, turn)
        choice = result["choices"][0]
        return {"text": choice.get("text", ""), "finish_reason": choice.get("finish_reason")}, \
            result.get("usage", {})

    async def _embed(self, route: Route, turn: Turn) -> tuple[dict[str, Any], dict[str, Any]]:
        text = self.payload.get("text")
        if not isinstance(text, str | list):
            raise InvalidRequest("embedding models take input.text (a string or a list of strings)",
                                 param="input.text", code="invalid_value")
        result = await route.engine.embed(_build(EmbeddingRequest, {"model": route.spec.id, "input": text}),
                                          turn)
        vectors = [item["embedding"] for item in result["data"]]
        output = {"embedding": vectors[0]} if isinstance(text, str) else {"embeddings": vectors}
        return output, result.get("usage", {})


def _build(cls: type[Any], fields: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = "input." + ".".join(str(p) for p in first["loc"]) if first["loc"] else "input"
        raise InvalidRequest(f"{param}: {first['msg']}", param=param, code="invalid_value") from exc
