"""The generic ``/infer`` endpoint: ``{"model", "input"}`` → ``{"output"}``, by the model's task.

- chat:       ``prompt`` (str) or ``messages``, plus optional ``max_tokens`` (default 256),
              ``temperature``, ``top_p``, ``seed``, ``stop`` → ``{"text", "finish_reason"}``
- completion: ``prompt`` (str) and the same options → ``{"text", "finish_reason"}``
- embedding:  ``text`` (str, or a list of str) → ``{"embedding"}`` (or ``{"embeddings"}`` for a list)
- generic:    any JSON object, POSTed to the model's HTTP endpoint → that endpoint's JSON
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from serve_app.engines.base import new_id
from serve_app.errors import ValidationFailed
from serve_app.router import Route
from serve_app.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "stop")
# /infer callers rarely think about length; without a cap a small model rambles to its context limit.
DEFAULT_INFER_MAX_TOKENS = 256


async def run_infer(route: Route, payload: dict[str, Any]) -> dict[str, Any]:
    spec = route.spec
    if spec.task == "generic":
        output, usage = await route.engine.infer(payload), None
    elif spec.task == "embedding":
        output, usage = await _embed(route, payload)
    else:
        output, usage = await _generate(route, payload)
    body: dict[str, Any] = {"id": new_id("infer"), "object": "inference", "model": spec.id,
                            "task": spec.task, "output": output}
    if usage is not None:
        body["usage"] = usage
    return body


def _build(cls: type[Any], fields: dict[str, Any]) -> Any:
    try:
        return cls.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = "input." + ".".join(str(p) for p in first["loc"]) if first["loc"] else "input"
        raise ValidationFailed(f"{param}: {first['msg']}", param=param) from exc


def _sampling(payload: dict[str, Any]) -> dict[str, Any]:
    return {"max_tokens": DEFAULT_INFER_MAX_TOKENS, **{k: payload[k] for k in _SAMPLING_KEYS if k in payload}}


async def _generate(route: Route, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    prompt = payload.get("prompt")
    if route.spec.task == "chat":
        messages = payload.get("messages") or (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else None)
        if messages is None:
            raise ValidationFailed("chat models take input.prompt (a string) or input.messages",
                                   param="input.prompt")
        request = _build(ChatCompletionRequest, {"model": route.spec.id, "messages": messages,
                                                 **_sampling(payload)})
        result = await route.engine.generate(request)
        choice = result["choices"][0]
        return {"text": choice["message"].get("content") or "",
                "finish_reason": choice.get("finish_reason")}, result.get("usage", {})
    if not isinstance(prompt, str):
        raise ValidationFailed("completion models take input.prompt (a string)", param="input.prompt")
    request = _build(CompletionRequest, {"model": route.spec.id, "prompt": prompt, **_sampling(payload)})
    result = await route.engine.generate(request)
    choice = result["choices"][0]
    output = {"text": choice.get("text", ""), "finish_reason": choice.get("finish_reason")}
    return output, result.get("usage", {})


async def _embed(route: Route, payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    text = payload.get("text")
    if not isinstance(text, str | list):
        raise ValidationFailed("embedding models take input.text (a string or a list of strings)",
                               param="input.text")
    request = _build(EmbeddingRequest, {"model": route.spec.id, "input": text})
    result = await route.engine.embed(request)
    vectors = [item["embedding"] for item in result["data"]]
    output = {"embedding": vectors[0]} if isinstance(text, str) else {"embeddings": vectors}
    return output, result.get("usage", {})
