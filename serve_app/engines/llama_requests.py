"""OpenAI requests as llama-cpp-python calls, and its output as OpenAI objects (for ``LlamaCppEngine``).

What llama.cpp cannot honour is refused with a 400 naming the parameter, never silently ignored.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from serve_app.errors import InvalidRequest, UnsupportedParameter
from serve_app.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest

Piece = tuple[str, str | None]  # (text, finish_reason)


@dataclass(frozen=True)
class Call:
    """One choice to generate: llama-cpp-python has no ``n``, so ``n`` choices are ``n`` calls."""

    index: int
    prompt_index: int  # usage counts each prompt once, as OpenAI does for n > 1
    messages: list[dict[str, str]] | None
    prompt: str | None
    options: dict[str, Any]
    echo: str = ""

    def start(self, llama: Any, *, stream: bool) -> Any:
        if self.messages is not None:
            return llama.create_chat_completion(messages=self.messages, stream=stream, **self.options)
        return llama.create_completion(prompt=self.prompt, stream=stream, **self.options)

    @property
    def preemptible(self) -> bool:
        # A grammar's parse state lives in the sampler and would not survive a replay, so a constrained
        # (json_object) generation runs to its end.
        return "response_format" not in self.options


# --- requests -------------------------------------------------------------------------------------------

# Fields whose effect llama-cpp-python cannot reproduce here; refusing beats silently ignoring them.
# (logprobs would need ``logits_all=True``, which slows every request; logit_bias goes through a custom
# sampler that llama-cpp-python itself marks as probably broken.)
_REFUSED = ("logit_bias", "tools", "functions", "audio", "prediction")
_REFUSED_UNLESS_NONE = ("logprobs", "top_logprobs")
_HARMLESS_CHOICES = (None, "none", "auto")


def plan(request: GenerateRequest) -> list[Call]:
    _check_supported(request)
    options = _sampling(request)
    if isinstance(request, ChatCompletionRequest):
        inputs: list[tuple[list[dict[str, str]] | None, str | None]] = [(_messages(request), None)]
        if _response_format(request) == "json_object":
            options["response_format"] = {"type": "json_object"}  # llama.cpp constrains it by grammar
    else:
        inputs = [(None, prompt) for prompt in request.prompts()]
    echo = isinstance(request, CompletionRequest) and request.echo
    return [
        Call(index=p * request.n + j, prompt_index=p, messages=messages, prompt=prompt,
              options={**options, "seed": _seed(request.seed, j)}, echo=prompt if echo and prompt else "")
        for p, (messages, prompt) in enumerate(inputs)
        for j in range(request.n)
    ]


def _check_supported(request: GenerateRequest) -> None:
    extra = request.model_extra or {}
    for param in _REFUSED:
        if extra.get(param):
            raise UnsupportedParameter(f"{param} is not supported by this model", param=param)
    for param in _REFUSED_UNLESS_NONE:
        value = extra.get(param)
        if value is not None and value is not False:  # logprobs=0 still asks for logprobs
            raise UnsupportedParameter(f"{param} is not supported by this model", param=param)
    for param in ("tool_choice", "function_call"):
        if extra.get(param) not in _HARMLESS_CHOICES:
            raise UnsupportedParameter(f"{param} is not supported by this model", param=param)
    if extra.get("modalities") not in (None, ["text"]):
        raise UnsupportedParameter("this model only produces text", param="modalities")
    if isinstance(request, ChatCompletionRequest) and _response_format(request) not in (None, "text",
                                                                                       "json_object"):
        raise UnsupportedParameter(
            "response_format may be 'text' or 'json_object' here", param="response_format")
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise UnsupportedParameter("suffix needs an infill model", param="suffix")
        if extra.get("best_of") not in (None, 1, request.n):
            raise UnsupportedParameter("best_of is not supported by this model", param="best_of")


def _response_format(request: ChatCompletionRequest) -> str | None:
    fmt = (request.model_extra or {}).get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidRequest("response_format must be an object with a 'type'", param="response_format")
    return fmt["type"]


def _sampling(request: GenerateRequest) -> dict[str, Any]:
    # OpenAI's defaults, not llama-cpp-python's (temperature 0.2/0.8, top_k 40, min_p 0.05), so a request
    # means the same here as upstream.
    return {
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "stop": request.stop_list(),
        "max_tokens": request.token_limit(),
    }


def _seed(seed: int | None, choice: int) -> int:
    # A fixed seed makes a request reproducible; offsetting it per choice keeps n > 1 choices distinct.
    return random.getrandbits(32) if seed is None else (seed + choice) & 0xFFFFFFFF


def _messages(request: ChatCompletionRequest) -> list[dict[str, str]]:
    out = []
    for m in request.messages:
        extra = m.model_extra or {}
        if m.role in ("tool", "function") or extra.get("tool_calls") or extra.get("function_call"):
            raise UnsupportedParameter("this model does not support tool calls", param="messages")
        if isinstance(m.content, list) and any(part.get("type") != "text" for part in m.content):
            raise UnsupportedParameter("this model accepts text content only", param="messages")
        # The model's chat template knows system, user and assistant; "developer" is OpenAI's new "system".
        out.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
    return out


# --- responses ------------------------------------------------------------------------------------------

def choice(call: Call, llama_choice: dict[str, Any], chat: bool) -> dict[str, Any]:
    finish_reason = llama_choice["finish_reason"]
    if chat:
        content = llama_choice["message"]["content"] or ""
        return {"index": call.index, "message": {"role": "assistant", "content": content},
                "logprobs": None, "finish_reason": finish_reason}
    return {"index": call.index, "text": call.echo + llama_choice["text"], "logprobs": None,
            "finish_reason": finish_reason}


def piece(chunk: dict[str, Any]) -> Piece:
    """(text, finish_reason) of a llama-cpp-python stream chunk, chat or text."""
    choice = chunk["choices"][0]
    text = choice["text"] if "text" in choice else choice.get("delta", {}).get("content")
    return text or "", choice.get("finish_reason")


def stream_chunk(*, chat: bool, id: str, created: int, model: str, index: int, text: str = "",
           finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    if chat:
        choice["delta"] = {"role": "assistant"} if role else {"content": text} if text else {}
    else:
        choice["text"] = text
    choice.update(logprobs=None, finish_reason=finish_reason)
    return {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}
