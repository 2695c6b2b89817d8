"""vLLM on a GPU node. ``vllm`` is imported only here, and only when a vLLM model is deployed
(``pip install .[gpu]``), so the package imports and tests on machines without a GPU.

Uses vLLM's ``AsyncLLMEngine`` (continuous batching inside one replica): ``generate`` yields cumulative
``RequestOutput``s; we turn them into OpenAI objects and deltas. What a request asks of vLLM, and its
output back, are plain data in ``vllm_requests.py``: ``response_format`` and tool calls held by vLLM's
structured outputs (serve_app/engines/structured.py decides the schema, as for llama.cpp), logprobs from
``SamplingParams(logprobs=k)``. This module builds vLLM's own objects from them, checked against vLLM
0.34 (``StructuredOutputsParams``) and, by feature detection, the releases before (``GuidedDecodingParams``).

Priority: requests beyond the engine's ``max_num_seqs`` wait in vLLM's own scheduler, so that is where a
request's ``Turn`` must count. vLLM orders its queue by ``priority`` only under
``scheduling_policy="priority"`` (the default here): lower values first, ties by arrival; and when the
KV cache runs short it preempts the running request of lowest priority, not the newest one
(``vllm/v1/core/sched/scheduler.py``). Fair share between the keys of one priority stays with the
ingress's queue.
"""

from __future__ import annotations

import inspect
import uuid
from collections.abc import AsyncIterator
from typing import Any

from serve_app.engines.base import EngineBase, new_id, now, usage
from serve_app.engines.vllm_requests import ChoiceStream, Plan, choice, plan, refusal
from serve_app.errors import InvalidRequest, ServiceUnavailable
from serve_app.fair_queue import NO_TURN, Turn
from serve_app.registry.catalog import ModelSpec, resolve_source
from serve_app.schemas import ChatCompletionRequest, GenerateRequest

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

    async def _get_tokenizer(self) -> Any:
        if self._tokenizer is None:
            tokenizer = self._engine.get_tokenizer()
            # A coroutine in older vLLM releases, the tokenizer itself in current ones (0.34).
            self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer
        return self._tokenizer

    async def _plan(self, request: GenerateRequest) -> tuple[Plan, str]:
        """The request for vLLM, and its prompt."""
        if not isinstance(request, ChatCompletionRequest):
            planned = plan(request)
            return planned, "\n".join(planned.prompts)
        from jinja2 import TemplateError

        tokenizer = await self._get_tokenizer()
        planned = plan(request, template_tools=renders_tools(tokenizer))
        try:
            prompt: str = tokenizer.apply_chat_template(planned.messages, tools=planned.tools, tokenize=False,
                                                        add_generation_prompt=True)
        except TemplateError as exc:  # the template's own checks: roles that must alternate, and the like
            raise InvalidRequest(f"this model's chat template refuses the conversation: {exc}",
                                 param="messages") from exc
        return planned, prompt

    async def _run(self, planned: Plan, prompt: str, turn: Turn) -> AsyncIterator[Any]:
        request_id = uuid.uuid4().hex
        priority = vllm_priority(turn) if self._prioritised else 0
        started = False
        try:
            params = sampling_params(planned.sampling)
            async for output in self._engine.generate(prompt, params, request_id, priority=priority):
                started = True
                yield output
        except Exception as exc:
            # vLLM validates a request (its schema too) as it takes it, before any output.
            if started or not isinstance(exc, _request_errors()):
                raise
            raise refusal(str(exc), getattr(exc, "parameter", None), planned) from exc
        finally:
            # A client that went away must not keep a GPU slot busy.
            await self._engine.abort(request_id)

    async def generate(self, request: GenerateRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        planned, prompt = await self._plan(request)
        final = None
        async for output in self._run(planned, prompt, turn):
            final = output
        assert final is not None
        chat = isinstance(request, ChatCompletionRequest)
        offset = 0 if chat else len(prompt)
        choices = [choice(planned, chat=chat, index=o.index, text=o.text, finish_reason=o.finish_reason,
                          token_ids=o.token_ids, positions=o.logprobs, text_offset=offset)
                   for o in final.outputs]
        generated = sum(len(o.token_ids) for o in final.outputs)
        return {"id": new_id("chatcmpl" if chat else "cmpl"), "object": _object(chat, False),
                "created": now(), "model": request.model, "choices": choices,
                "usage": usage(len(final.prompt_token_ids or []), generated)}

    async def stream(self, request: GenerateRequest, turn: Turn = NO_TURN) -> AsyncIterator[dict[str, Any]]:
        planned, prompt = await self._plan(request)
        chat = isinstance(request, ChatCompletionRequest)
        meta = {"id": new_id("chatcmpl" if chat else "cmpl"), "object": _object(chat, True),
                "created": now(), "model": request.model}
        streams: dict[int, ChoiceStream] = {}
        final = None
        async for output in self._run(planned, prompt, turn):
            final = output
            for o in output.outputs:
                if o.index not in streams:
                    streams[o.index] = ChoiceStream(planned, o.index, chat=chat,
                                                    text_offset=0 if chat else len(prompt))
                for piece in streams[o.index].step(o.text, o.token_ids, o.logprobs, o.finish_reason):
                    yield {**meta, "choices": [piece]}
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


def renders_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders ``tools`` (and ``tool`` turns) itself."""
    template = getattr(tokenizer, "chat_template", None)
    # One template, or several by name (the tool-use one among them).
    return "tools" in (str(template) if template else "")


def sampling_params(sampling: dict[str, Any]) -> Any:
    """vLLM's ``SamplingParams`` for ``vllm_requests.Plan.sampling``."""
    from vllm import SamplingParams
    from vllm import sampling_params as module

    sampling = dict(sampling)
    if (spec := sampling.pop("structured_outputs", None)) is not None:
        if hasattr(module, "StructuredOutputsParams"):  # current vLLM (0.34); GuidedDecodingParams before
            sampling["structured_outputs"] = module.StructuredOutputsParams(**spec)
        else:
            sampling["guided_decoding"] = module.GuidedDecodingParams(**spec)
    return SamplingParams(**sampling)


def _request_errors() -> tuple[type[Exception], ...]:
    try:
        from vllm.exceptions import VLLMClientError  # current releases; older ones raise ValueError
    except ImportError:
        return (ValueError,)
    return (VLLMClientError, ValueError)


def _object(chat: bool, chunk: bool) -> str:
    if chat:
        return "chat.completion.chunk" if chunk else "chat.completion"
    return "text_completion"
