"""What each model endpoint asks of the pipeline: which model, what ``auto`` reads, and how to call it.

    endpoint               job            cacheable  streams  auto
    /v1/chat/completions   GenerateJob    yes        yes      yes
    /v1/completions        GenerateJob    yes        yes      yes
    /v1/responses          ResponsesJob   yes        yes      yes (as chat, translated: responses_api.py)
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from serve_app.engines.base import new_id, now
from serve_app.errors import InvalidRequest, ServiceUnavailable, UnsupportedParameter
from serve_app.fair_queue import Turn
from serve_app.ingress import responses_api
from serve_app.ingress.metering import with_stream_usage
from serve_app.ingress.sse import chained
from serve_app.routing.classifier import Conversation
from serve_app.routing.router import AUTO_MODELS, Decision, Route
from serve_app.schemas import (
    ChatCompletionRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbeddingRequest,
    GenerateRequest,
    InferRequest,
    ResponsesRequest,
)

if TYPE_CHECKING:
    from serve_app.ingress.context import RequestContext
    from serve_app.ingress.gateway import Gateway
    from serve_app.ingress.stored_responses import StoredResponses

# /infer callers rarely think about length; without a cap a small model rambles to its context limit.
DEFAULT_INFER_MAX_TOKENS = 256
_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop")


@dataclass(slots=True)
class Answer:
    """A JSON body, or a stream whose first chunk already arrived (so a failure before it is a status)."""

    body: dict[str, Any] | None = None
    first: dict[str, Any] | None = None
    rest: AsyncIterator[dict[str, Any]] | None = None
    # The stream's chunks are the Responses API's typed events (framed with ``event:`` lines, no
    # ``[DONE]``), not chat or completion chunks.
    typed_events: bool = False

    @property
    def streaming(self) -> bool:
        return self.rest is not None


class Job:
    """The defaults: a named model, not cacheable, answered as JSON."""

    model: str | None  # None: no model is called (/v1/classify)
    streaming = False
    # The request's headers, where they say something about the answer (Cache-Control, x-iir-cache).
    headers: Mapping[str, str] = {}

    async def prepare(self, gateway: Gateway, ctx: RequestContext) -> None:
        """Before routing: what the job must read first (a stored conversation to continue)."""

    async def present(self, ctx: RequestContext, answer: Answer) -> Answer:
        """The pipeline's answer as this endpoint gives it."""
        return answer

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


class ResponsesJob(Job):
    """``/v1/responses``: run as a chat request (translated in ``prepare``) and given back as a response
    or its typed events (in ``present``); a provider that speaks the Responses API gets the request as
    it came instead."""

    def __init__(self, body: ResponsesRequest, headers: Mapping[str, str]) -> None:
        self.body = body
        self.headers = headers
        self.model = body.model
        self.streaming = body.stream
        self._history: list[responses_api.Item] = []
        # The conversation this response answers: the stored one it continues, then its own input.
        self._conversation: list[responses_api.Item] = []
        self._translation = responses_api.Translation(None)
        self._routed: responses_api.ResponsesAsChat | None = None
        self._stored: StoredResponses | None = None
        self._key_id = ""

    async def prepare(self, gateway: Gateway, ctx: RequestContext) -> None:
        assert ctx.key is not None
        self._stored, self._key_id = gateway.responses, ctx.key.id
        if self.body.previous_response_id:
            if self._stored is None:
                raise UnsupportedParameter(
                    "previous_response_id needs stored responses, which are off here "
                    "(IIR_RESPONSES_BACKEND=off); send the whole conversation as input",
                    param="previous_response_id")
            self._history = await self._stored.conversation(self._key_id, self.body.previous_response_id)
        self._conversation = [*self._history, *responses_api.input_items(self.body)]
        self._translation = responses_api.to_chat(self.body, self._history)

    def conversation(self) -> Conversation:
        chat = self._translation.chat
        if chat is None:
            return [("user", self.body.input)] if isinstance(self.body.input, str) else []
        return [(m.role, m.text()) for m in chat.messages]

    def cacheable(self) -> GenerateRequest | None:
        return self._translation.chat

    def _chat_for(self, route: Route) -> responses_api.ResponsesAsChat:
        chat = self._translation.chat
        if chat is None:
            assert self._translation.refusal is not None
            raise self._translation.refusal
        if self._routed is None or self._routed.model != route.spec.id:
            self._routed = chat.model_copy(update={"model": route.spec.id})
        return self._routed

    def _as_sent(self, route: Route) -> dict[str, Any]:
        """The request for a provider that speaks the Responses API: as it came, with the stored
        conversation written out (IIR keeps conversations, so the provider is asked not to)."""
        body = self.body.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=True)
        body.update(model=route.spec.id, input=self._conversation, store=False)
        body.pop("previous_response_id", None)
        return body

    async def call(self, route: Route, turn: Turn) -> dict[str, Any]:
        if _speaks_responses(route):
            respond = route.engine.respond  # type: ignore[attr-defined]
            return await respond(self._as_sent(route))  # type: ignore[no-any-return]
        result = await route.engine.generate(self._chat_for(route), turn)
        result["model"] = route.spec.id
        return result

    def stream(self, route: Route, turn: Turn) -> AsyncIterator[dict[str, Any]]:
        if _speaks_responses(route):
            respond_stream = route.engine.respond_stream  # type: ignore[attr-defined]
            return respond_stream(self._as_sent(route))  # type: ignore[no-any-return]
        return route.engine.stream(with_stream_usage(self._chat_for(route)), turn)

    @property
    def client_wants_usage(self) -> bool:
        return True  # the usage chunk becomes the response's usage (present drops it)

    async def present(self, ctx: RequestContext, answer: Answer) -> Answer:
        echo = responses_api.Echo(responses_api.new_item_id("resp"), now(), self.body,
                                  model=ctx.model)
        if not answer.streaming:
            assert answer.body is not None
            body = answer.body
            response = (responses_api.passed_through(echo, body) if body.get("object") == "response"
                        else responses_api.response_object(echo, body))
            response["store"] = await self._keep(response)
            return Answer(response)
        assert answer.rest is not None
        chunks = chained(answer.first, answer.rest)
        if answer.first is not None and "type" in answer.first:  # a provider's own events
            events = responses_api.passed_through_events(echo, self._keep, chunks)
            first = await anext(events, None)
            return Answer(None, first, events, typed_events=True)
        translator = responses_api.ResponseEvents(echo, self._keep)
        created, in_progress = translator.opening()
        return Answer(None, created, chained(in_progress, translator.translate(chunks)), typed_events=True)

    async def _keep(self, response: dict[str, Any]) -> bool:
        if not self.body.store or self._stored is None:
            return False
        return await self._stored.keep(self._key_id, response, self._conversation)


def _speaks_responses(route: Route) -> bool:
    # EngineBase.speaks_responses; a local model behind a Serve handle (ReplicaEngine) never does.
    return bool(getattr(route.engine, "speaks_responses", False))


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
