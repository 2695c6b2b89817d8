"""OpenAI requests as llama-cpp-python calls, and its output as OpenAI objects (for ``LlamaCppEngine``).

What llama.cpp cannot honour is refused with a 400 naming the parameter, never silently ignored.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from serve_app.engines.llama_logprobs import Cover, TokenLogprob, render
from serve_app.engines.llama_tools import gbnf_for
from serve_app.engines.structured import (
    message_text,
    refuse_unsupported,
    refuse_unsupported_message,
    requested_logprobs,
    response_schema,
    tool_calls,
    tool_use,
)
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
    tools: bool = False  # the answer may be a tool call (llama_tools.py)
    logprobs: int | None = None  # alternatives per token when logprobs are asked for (llama_logprobs.py)

    def start(self, llama: Any, *, stream: bool) -> Any:
        if self.messages is not None:
            return llama.create_chat_completion(messages=self.messages, stream=stream, **self.options)
        return llama.create_completion(prompt=self.prompt, stream=stream, **self.options)

    @property
    def preemptible(self) -> bool:
        # A grammar's parse state lives in the sampler and would not survive a replay, so a constrained
        # (json_object, json_schema) generation runs to its end.
        return "grammar" not in self.options


# --- requests -------------------------------------------------------------------------------------------

# Fields whose effect llama-cpp-python cannot reproduce here; refusing beats silently ignoring them.
# (logit_bias goes through a custom sampler that llama-cpp-python itself marks as probably broken.)
_REFUSED = ("logit_bias", "functions", "audio", "prediction")


def plan(request: GenerateRequest) -> list[Call]:
    refuse_unsupported(request, _REFUSED)
    logprobs = requested_logprobs(request)
    options = _sampling(request)
    use = None
    if isinstance(request, ChatCompletionRequest):
        messages = _messages(request)
        options.update(_constraint(request))
        if (use := tool_use(request)) is not None:
            if "grammar" in options:
                raise UnsupportedParameter("response_format and tools cannot be combined on this model",
                                           param="response_format")
            call_schema = json.dumps(_holdable(use.schema, "tools"), sort_keys=True)
            options["grammar"] = _compile(gbnf_for(use, _schema_gbnf(call_schema, "tools")))
            messages = _with_system(messages, use.system)
        inputs: list[tuple[list[dict[str, str]] | None, str | None]] = [(messages, None)]
    else:
        inputs = [(None, prompt) for prompt in request.prompts()]
    echo = isinstance(request, CompletionRequest) and request.echo
    if echo and logprobs is not None:
        raise UnsupportedParameter("echo with logprobs needs the prompt's log probabilities, which this "
                                   "model does not compute", param="echo")
    return [
        Call(index=p * request.n + j, prompt_index=p, messages=messages, prompt=prompt,
              options={**options, "seed": _seed(request.seed, j)}, echo=prompt if echo and prompt else "",
              tools=use is not None, logprobs=logprobs)
        for p, (messages, prompt) in enumerate(inputs)
        for j in range(request.n)
    ]


def _constraint(request: ChatCompletionRequest) -> dict[str, Any]:
    """The llama-cpp-python options that hold the output to ``response_format``, enforced while
    sampling (a grammar), so every answer parses, streamed too; only ``max_tokens`` can cut it short
    (``finish_reason: "length"``, as OpenAI)."""
    found = response_schema(request)
    if found is None:
        return {}
    schema = json.dumps(_holdable(found.schema, found.param), sort_keys=True)
    return {"grammar": _compile(_schema_gbnf(schema, found.param))}


# JSON Schema keywords llama-cpp-python's grammar converter does not enforce: output "following" such a
# schema could still fail it, so a schema using them is refused (a 400 naming them), as OpenAI's strict
# mode refuses what it cannot enforce. Integer ranges are the exception: small ones become an enum.
_NOT_ENFORCED = frozenset({
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "not",
    "if", "then", "else", "dependentRequired", "dependentSchemas", "minProperties", "maxProperties",
    "patternProperties", "propertyNames", "contains", "minContains", "maxContains",
    "unevaluatedProperties", "unevaluatedItems"})
_SCHEMA_MAPS = ("properties", "$defs", "definitions")  # name → schema
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMAS = ("items", "additionalProperties")
_LARGEST_INTEGER_ENUM = 1000


def _holdable(schema: Any, param: str) -> Any:
    """``schema`` as the grammar can hold it (small integer ranges as enums), or a 400 naming what it
    cannot (``param``: where the schema came from)."""
    refused: set[str] = set()
    rewritten = _rewrite(schema, refused)
    if refused:
        raise InvalidRequest(
            f"{param}: this model's grammar cannot enforce {sorted(refused)}; "
            f"remove them (integer ranges up to {_LARGEST_INTEGER_ENUM} values are fine)",
            param=param, code="unsupported_schema_keyword")
    return rewritten


def _rewrite(node: Any, refused: set[str]) -> Any:
    if not isinstance(node, dict):
        return node
    out = dict(node)
    for key in _SCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out[key] = {name: _rewrite(sub, refused) for name, sub in node[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out[key] = [_rewrite(sub, refused) for sub in node[key]]
    for key in _SCHEMAS:
        if isinstance(node.get(key), dict):
            out[key] = _rewrite(node[key], refused)
    if node.get("type") == "integer" and node.keys() & {"minimum", "maximum"}:
        low, high = node.get("minimum"), node.get("maximum")
        if (isinstance(low, int) and isinstance(high, int) and 0 <= high - low < _LARGEST_INTEGER_ENUM
                and not node.keys() & {"exclusiveMinimum", "exclusiveMaximum", "multipleOf"}):
            return {k: v for k, v in out.items() if k not in ("type", "minimum", "maximum")} | {
                "enum": list(range(low, high + 1))}
    if "pattern" in node and node.keys() & {"minLength", "maxLength"}:
        refused.add("minLength/maxLength with pattern")  # the converter keeps the pattern only
    refused.update(node.keys() & _NOT_ENFORCED)
    return out


@functools.lru_cache(maxsize=64)
def _schema_gbnf(schema: str, param: str) -> str:
    """A schema's GBNF grammar (built once: a few ms). llama-cpp-python, handed the schema itself, falls
    back to "any JSON" when it cannot convert it; a caller who asked for a schema gets a 400 instead."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(schema)
    except Exception as exc:
        raise InvalidRequest(f"{param}: llama.cpp cannot hold output to this schema ({type(exc).__name__}: "
                             f"{exc})", param=param, code="invalid_json_schema") from exc
    # llama-cpp-python 0.3's string characters admit raw control characters (a newline inside a string
    # is not JSON); llama.cpp's own converter excludes them, as JSON does.
    return gbnf.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')


@functools.lru_cache(maxsize=64)
def _compile(gbnf: str) -> Any:
    from llama_cpp.llama_grammar import LlamaGrammar

    return LlamaGrammar.from_string(gbnf, verbose=False)


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
        refuse_unsupported_message(m)
        if m.role == "tool" or extra.get("tool_calls"):
            role, content = message_text(m)
            out.append({"role": role, "content": content})
            continue
        # The model's chat template knows system, user and assistant; "developer" is OpenAI's new "system".
        out.append({"role": "system" if m.role == "developer" else m.role, "content": m.text()})
    return out


# --- responses ------------------------------------------------------------------------------------------

def _with_system(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def choice(call: Call, llama_choice: dict[str, Any], chat: bool,
           tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """``tokens``: the completion's tokens with their log probabilities (when asked for)."""
    finish_reason = llama_choice["finish_reason"]
    if chat:
        content = llama_choice["message"]["content"] or ""
        if call.tools and (calls := tool_calls(content)) is not None:
            # The call's JSON is rewritten (arguments re-serialized, an id added): no tokens spell it.
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            return {"index": call.index, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
        return {"index": call.index, "message": {"role": "assistant", "content": content},
                "logprobs": choice_logprobs(call, tokens, content, chat=True), "finish_reason": finish_reason}
    text = llama_choice["text"]
    return {"index": call.index, "text": call.echo + text,
            "logprobs": choice_logprobs(call, tokens, text, chat=False), "finish_reason": finish_reason}


def choice_logprobs(call: Call, tokens: Sequence[TokenLogprob], text: str, *,
                    chat: bool) -> dict[str, Any] | None:
    if call.logprobs is None:
        return None
    return render(Cover(tokens, text_offset(call)).take(text), chat=chat)


def text_offset(call: Call) -> int:
    # The completions API counts text_offset from the start of the prompt, echoed or not.
    return len(call.prompt or "")


def piece(chunk: dict[str, Any]) -> Piece:
    """(text, finish_reason) of a llama-cpp-python stream chunk, chat or text."""
    choice = chunk["choices"][0]
    text = choice["text"] if "text" in choice else choice.get("delta", {}).get("content")
    return text or "", choice.get("finish_reason")


def stream_chunk(*, chat: bool, id: str, created: int, model: str, index: int, text: str = "",
           finish_reason: str | None = None, role: bool = False,
           logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index}
    if chat:
        choice["delta"] = {"role": "assistant"} if role else {"content": text} if text else {}
    else:
        choice["text"] = text
    choice.update(logprobs=logprobs, finish_reason=finish_reason)
    return {"id": id, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}
