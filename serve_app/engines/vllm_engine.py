"""vLLM on a GPU node. ``vllm`` is imported only here, and only when a vLLM model is deployed
(``pip install .[gpu]``), so the package imports and tests on machines without a GPU.

Uses vLLM's ``AsyncLLMEngine`` (continuous batching inside one replica): ``generate`` yields cumulative
``RequestOutput``s; we turn them into OpenAI objects and deltas.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from serve_app.engines.base import EngineBase, new_id, now, usage
from serve_app.errors import ServiceUnavailable, UnsupportedParameter
from serve_app.registry.catalog import ModelSpec, resolve_source
from serve_app.schemas import ChatCompletionRequest, GenerateRequest

_UNSUPPORTED = ("tools", "functions", "logprobs", "response_format")


class VLLMEngine(EngineBase):
    name = "vllm"

    def __init__(self, model_path: str, **engine_options: Any) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        self._engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model_path, **engine_options))
        self._tokenizer: Any = None

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> VLLMEngine:
        # A folder on the node (or a hub id where the cluster can reach one).
        source = spec.source or ""
        path = str(resolve_source(source)) if source.startswith(("package:", "/", "~", ".")) else source
        return cls(path, **spec.engine_options)

    async def _prompt(self, request: GenerateRequest) -> str:
        if not isinstance(request, ChatCompletionRequest):
            return "\n".join(request.prompts())
        if self._tokenizer is None:
            self._tokenizer = await self._engine.get_tokenizer()
        messages = [{"role": m.role, "content": m.text()} for m in request.messages]
        prompt: str = self._tokenizer.apply_chat_template(messages, tokenize=False,
                                                          add_generation_prompt=True)
        return prompt

    def _sampling(self, request: GenerateRequest) -> Any:
        from vllm import SamplingParams

        for name in _UNSUPPORTED:
            if (request.model_extra or {}).get(name):
                raise UnsupportedParameter(f"'{name}' is not supported by the vLLM engine yet", param=name)
        return SamplingParams(
            n=request.n, temperature=1.0 if request.temperature is None else request.temperature,
            top_p=request.top_p or 1.0, max_tokens=request.token_limit(), stop=request.stop_list() or None,
            seed=request.seed, presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
        )

    async def _run(self, request: GenerateRequest) -> AsyncIterator[Any]:
        request_id = uuid.uuid4().hex
        try:
            async for output in self._engine.generate(await self._prompt(request), self._sampling(request),
                                                      request_id):
                yield output
        finally:
            # A client that went away must not keep a GPU slot busy.
            await self._engine.abort(request_id)

    async def generate(self, request: GenerateRequest) -> dict[str, Any]:
        final = None
        async for output in self._run(request):
            final = output
        assert final is not None
        chat = isinstance(request, ChatCompletionRequest)
        choices = [_choice(chat, o.index, o.text, o.finish_reason) for o in final.outputs]
        generated = sum(len(o.token_ids) for o in final.outputs)
        return {"id": new_id("chatcmpl" if chat else "cmpl"), "object": _object(chat, False),
                "created": now(), "model": request.model, "choices": choices,
                "usage": usage(len(final.prompt_token_ids or []), generated)}

    async def stream(self, request: GenerateRequest) -> AsyncIterator[dict[str, Any]]:
        chat = isinstance(request, ChatCompletionRequest)
        meta = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": _object(chat, True),
                "created": now(), "model": request.model}
        sent: dict[int, int] = {}
        final = None
        async for output in self._run(request):
            final = output
            for o in output.outputs:
                delta_text = o.text[sent.get(o.index, 0):]
                first = o.index not in sent
                sent[o.index] = len(o.text)
                if delta_text or o.finish_reason or first:
                    yield {**meta, "choices": [_delta(chat, o.index, delta_text, o.finish_reason, first)]}
        if request.include_usage and final is not None:
            generated = sum(len(o.token_ids) for o in final.outputs)
            yield {**meta, "choices": [], "usage": usage(len(final.prompt_token_ids or []), generated)}

    async def check_health(self) -> None:
        try:
            await self._engine.check_health()
        except Exception as exc:
            raise ServiceUnavailable(f"vLLM engine unhealthy: {exc}") from exc

    async def aclose(self) -> None:
        self._engine.shutdown()


def _object(chat: bool, chunk: bool) -> str:
    if chat:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"


def _choice(chat: bool, index: int, text: str, finish: str | None) -> dict[str, Any]:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}


def _delta(chat: bool, index: int, text: str, finish: str | None, first: bool) -> dict[str, Any]:
    if chat:
        delta: dict[str, Any] = {"content": text}
        if first:
            delta["role"] = "assistant"
        return {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
