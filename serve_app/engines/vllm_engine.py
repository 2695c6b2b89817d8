"""vLLM on a GPU node. ``vllm`` is imported only here, and only when a vLLM model is deployed
(``pip install .[gpu]``), so the package imports and tests on machines without a GPU.

Uses vLLM's ``AsyncLLMEngine`` (continuous batching inside one replica): ``generate`` yields cumulative
``RequestOutput``s; we turn them into OpenAI objects and deltas.

Priority: requests beyond the engine's ``max_num_seqs`` wait in vLLM's own scheduler, so that is where a
request's ``Turn`` must count. vLLM orders its queue by ``priority`` only under
``scheduling_policy="priority"`` (the default here): lower values first, ties by arrival; and when the
KV cache runs short it preempts the running request of lowest priority, not the newest one
(``vllm/v1/core/sched/scheduler.py``). Fair share between the keys of one priority stays with the
ingress's queue.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

from serve_app.engines.base import EngineBase, new_id, now, usage
from serve_app.errors import ServiceUnavailable, UnsupportedParameter
from serve_app.fair_queue import NO_TURN, Turn
from serve_app.registry.catalog import ModelSpec, resolve_source
from serve_app.schemas import ChatCompletionRequest, GenerateRequest

_UNSUPPORTED = ("tools", "functions", "logprobs", "response_format")
# What vLLM runs at once when ``max_num_seqs`` is unset: ``SchedulerConfig.DEFAULT_MAX_NUM_SEQS`` (128
# in vLLM 0.11 to 0.13 and on main). ``AsyncLLMEngine.from_engine_args`` builds its config for
# ``UsageContext.ENGINE_CONTEXT``, which ``EngineArgs.get_batch_defaults`` has no entry for (its 256 and
# 1024 are for ``vllm serve`` and ``LLM``), so this is the value that applies to us.
VLLM_DEFAULT_MAX_NUM_SEQS = 128


def vllm_priority(turn: Turn) -> int:
    """vLLM serves lower values first; IIR serves higher key priorities first."""
    return -turn.priority


def engine_args_options(engine_options: dict[str, Any]) -> dict[str, Any]:
    """``AsyncEngineArgs`` keywords: models.yaml's ``engine_options`` over our defaults."""
    # Without the priority policy vLLM ignores (older releases: refuse) a request's priority.
    return {"scheduling_policy": "priority", **engine_options}


def concurrency(engine_options: dict[str, Any]) -> int:
    """How many requests the engine runs at once (the rest wait in its scheduler). vLLM counts sequences:
    a request for ``n`` choices takes ``n`` of them."""
    if engine_options.get("max_num_seqs"):
        return int(engine_options["max_num_seqs"])
    # vLLM lowers its own default to the token budget, when one is given.
    tokens = engine_options.get("max_num_batched_tokens")
    return min(VLLM_DEFAULT_MAX_NUM_SEQS, int(tokens)) if tokens else VLLM_DEFAULT_MAX_NUM_SEQS


class VLLMEngine(EngineBase):
    name = "vllm"

    def __init__(self, model_path: str, **engine_options: Any) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        options = engine_args_options(engine_options)
        self._engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=model_path, **options))
        self._tokenizer: Any = None
        # An operator who chose another policy gets it as is: no priorities it would reject.
        self._prioritised = options["scheduling_policy"] == "priority"

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

    async def _run(self, request: GenerateRequest, turn: Turn) -> AsyncIterator[Any]:
        request_id = uuid.uuid4().hex
        priority = vllm_priority(turn) if self._prioritised else 0
        try:
            async for output in self._engine.generate(await self._prompt(request), self._sampling(request),
                                                      request_id, priority=priority):
                yield output
        finally:
            # A client that went away must not keep a GPU slot busy.
            await self._engine.abort(request_id)

    async def generate(self, request: GenerateRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        final = None
        async for output in self._run(request, turn):
            final = output
        assert final is not None
        chat = isinstance(request, ChatCompletionRequest)
        choices = [_choice(chat, o.index, o.text, o.finish_reason) for o in final.outputs]
        generated = sum(len(o.token_ids) for o in final.outputs)
        return {"id": new_id("chatcmpl" if chat else "cmpl"), "object": _object(chat, False),
                "created": now(), "model": request.model, "choices": choices,
                "usage": usage(len(final.prompt_token_ids or []), generated)}

    async def stream(self, request: GenerateRequest, turn: Turn = NO_TURN) -> AsyncIterator[dict[str, Any]]:
        chat = isinstance(request, ChatCompletionRequest)
        meta = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": _object(chat, True),
                "created": now(), "model": request.model}
        sent: dict[int, int] = {}
        final = None
        async for output in self._run(request, turn):
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
