"""What a chat answer must look like, whatever the engine: ``response_format`` and ``tools`` as the JSON
Schema the output is held to while sampling, and the held output back as OpenAI ``tool_calls``.

Each engine turns a schema into its own constraint (llama.cpp: a GBNF grammar, ``llama_requests.py``;
vLLM: its structured outputs, ``vllm_requests.py``) and refuses what it cannot enforce. Tool calls:

- The model answers a call as one JSON object ``{"name": ..., "arguments": {...}}``; ``ToolUse.schema``
  holds it to a declared function and that function's ``parameters``.
- ``required`` or a named tool: the answer is such a call, always.
- ``auto``: the answer is such a call *or* text that does not start with ``{``; the model's first
  character decides (``CallOrText`` does the same for a stream).
- ``none`` (or no tools): the tools are not described and the answer is text.
- One call per answer (``parallel_tool_calls`` is accepted and has no effect).
- ``ToolUse.system`` describes the tools for templates that cannot (``message_text`` likewise turns a
  conversation's tool turns into the system, user and assistant turns such templates know).

``requested_logprobs`` is the other shared rule: which log probabilities a request asks for.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from serve_app.errors import InvalidRequest, UnsupportedParameter
from serve_app.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, GenerateRequest

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ResponseSchema:
    schema: dict[str, Any]
    param: str  # where the schema came from, for the 400 that refuses it


@dataclass(frozen=True)
class ToolUse:
    mode: str  # "auto" or "required" (a named tool is "required" of a one-tool list)
    schema: dict[str, Any]  # a call: {"name": <one of the tools>, "arguments": <its parameters>}
    system: str  # the tools, described for the model
    tools: list[dict[str, Any]]  # the OpenAI tools the answer may call, for templates that render tools


def chat_constraints(request: ChatCompletionRequest) -> tuple[ResponseSchema | None, ToolUse | None]:
    """The request's ``response_format`` schema and tool use; at most one of them applies."""
    response, use = response_schema(request), tool_use(request)
    if response is not None and use is not None:
        raise UnsupportedParameter("response_format and tools cannot be combined on this model",
                                   param="response_format")
    return response, use


def response_schema(request: ChatCompletionRequest) -> ResponseSchema | None:
    """The schema ``response_format`` holds the answer to; ``None`` for text."""
    fmt = (request.model_extra or {}).get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidRequest("response_format must be an object with a 'type'", param="response_format")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseSchema(ANY_OBJECT, "response_format")
    if kind != "json_schema":
        raise UnsupportedParameter("response_format.type must be 'text', 'json_object' or 'json_schema'",
                                   param="response_format.type")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise InvalidRequest("response_format.json_schema must be an object with a 'name'",
                             param="response_format.json_schema")
    schema = spec.get("schema")
    if schema is None:
        return ResponseSchema(ANY_OBJECT, "response_format")  # a name and no schema: any JSON object
    if not isinstance(schema, dict):
        raise InvalidRequest("response_format.json_schema.schema must be a JSON Schema object",
                             param="response_format.json_schema.schema")
    return ResponseSchema(schema, "response_format.json_schema.schema")


# --- tools ----------------------------------------------------------------------------------------------

def tool_use(request: ChatCompletionRequest) -> ToolUse | None:
    extra = request.model_extra or {}
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    if not tools and choice not in (None, "none"):
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    if not tools or choice == "none":
        return None
    tools = _as_list(tools)
    functions = [_function(tool, i) for i, tool in enumerate(tools)]
    mode = "auto"
    if choice == "required":
        mode = "required"
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        tools = [tool for tool, f in zip(tools, functions, strict=True) if f["name"] == name]
        functions = [f for f in functions if f["name"] == name]
        if not functions:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
        mode = "required"
    elif choice not in (None, "auto"):
        raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or a named function",
                             param="tool_choice")
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]}}
             for f in functions]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return ToolUse(mode, schema, _describe(functions, mode), tools)


def _as_list(tools: Any) -> list[Any]:
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    return tools


def _function(tool: Any, index: int) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidRequest("each tool must be {'type': 'function', 'function': {'name', ...}}",
                             param=f"tools[{index}]")
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise InvalidRequest("function.parameters must be a JSON Schema object",
                             param=f"tools[{index}].function.parameters")
    return {"name": function["name"], "description": function.get("description", ""),
            "parameters": parameters}


def _describe(functions: list[dict[str, Any]], mode: str) -> str:
    lines = ["You can call these functions:"]
    for f in functions:
        lines.append(f"- {f['name']}: {f['description']} Parameters (JSON Schema): "
                     f"{json.dumps(f['parameters'])}")
    lines.append('To call one, answer with only a JSON object: {"name": <function name>, '
                 '"arguments": {<its parameters>}}.')
    if mode == "auto":
        lines.append("If no function fits, answer the user in plain text instead.")
    return "\n".join(lines)


def tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The answer as OpenAI ``tool_calls``, when it is a call."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        call = json.loads(stripped)
    except ValueError:
        return None  # cut by max_tokens: returned as text, finish_reason "length"
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}]


class CallOrText:
    """A streamed answer that may be a call: text is let through once its first character shows it is
    not one (``{``); a call is held until whole, then sent as one ``tool_calls`` delta (as the SDKs
    accept)."""

    def __init__(self) -> None:
        self._held: list[str] = []
        self.is_text = False

    def feed(self, text: str) -> str:
        """What of the answer so far can be sent as text now ("" while it may still be a call)."""
        if self.is_text:
            return text
        self._held.append(text)
        held = "".join(self._held)
        if held.lstrip() and not held.lstrip().startswith("{"):
            self.is_text, self._held = True, []
            return held
        return ""

    def end(self) -> tuple[str, list[dict[str, Any]] | None]:
        """At the end of the answer: (text still held, the call). A call cut short by ``max_tokens``
        comes back as text."""
        if self.is_text:
            return "", None
        whole, self._held = "".join(self._held), []
        calls = tool_calls(whole)
        return ("", calls) if calls is not None else (whole, None)


def message_text(message: Any) -> tuple[str, str]:
    """A conversation's tool turns as the roles every template knows: (role, content)."""
    extra = message.model_extra or {}
    if message.role == "tool":
        name = extra.get("name") or extra.get("tool_call_id") or "the tool"
        return "user", f"Result of {name}: {message.text()}"
    calls = extra.get("tool_calls") or []
    parts = [json.dumps({"name": c["function"]["name"], "arguments": arguments(c["function"])})
             for c in calls if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    return "assistant", "\n".join([message.text(), *parts]).strip()


def arguments(function: dict[str, Any]) -> Any:
    """A call's ``arguments`` (a JSON string on the wire) as the value it encodes."""
    try:
        return json.loads(function.get("arguments") or "{}")
    except ValueError:
        return function.get("arguments")


_MAX_TOP_LOGPROBS = 20
_MAX_LEGACY_LOGPROBS = 5


def requested_logprobs(request: GenerateRequest) -> int | None:
    """How many alternatives to report per token, or None when logprobs are not asked for (OpenAI's
    rules: chat's ``logprobs: true`` with ``top_logprobs`` 0–20; completions' ``logprobs`` 0–5)."""
    extra = request.model_extra or {}
    asked, top = extra.get("logprobs"), extra.get("top_logprobs")
    if isinstance(request, CompletionRequest):
        if top is not None:
            raise UnsupportedParameter("top_logprobs is a chat parameter; completions take logprobs: "
                                       f"0..{_MAX_LEGACY_LOGPROBS}", param="top_logprobs")
        if asked is None or asked is False:
            return None
        if not _count(asked, _MAX_LEGACY_LOGPROBS):
            raise InvalidRequest(f"logprobs must be an integer from 0 to {_MAX_LEGACY_LOGPROBS}",
                                 param="logprobs")
        return int(asked)
    if asked is not None and not isinstance(asked, bool):
        raise InvalidRequest("logprobs must be true or false", param="logprobs")
    if top is not None:
        if not _count(top, _MAX_TOP_LOGPROBS):
            raise InvalidRequest(f"top_logprobs must be an integer from 0 to {_MAX_TOP_LOGPROBS}",
                                 param="top_logprobs")
        if asked is not True:
            raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
    return int(top or 0) if asked else None


def _count(value: Any, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


def refuse_unsupported(request: GenerateRequest, refused: tuple[str, ...]) -> None:
    """Parameters a local engine cannot honour (``refused``, and those neither engine does) are a 400
    naming them, never silently ignored."""
    extra = request.model_extra or {}
    for param in refused:
        if extra.get(param):
            raise UnsupportedParameter(f"{param} is not supported by this model", param=param)
    if extra.get("function_call") not in (None, "none", "auto"):
        raise UnsupportedParameter("function_call is not supported by this model; use tools",
                                   param="function_call")
    if extra.get("modalities") not in (None, ["text"]):
        raise UnsupportedParameter("this model only produces text", param="modalities")
    if isinstance(request, CompletionRequest):
        if request.suffix:
            raise UnsupportedParameter("suffix needs an infill model", param="suffix")
        if extra.get("best_of") not in (None, 1, request.n):
            raise UnsupportedParameter("best_of is not supported by this model", param="best_of")


def refuse_unsupported_message(message: ChatMessage) -> None:
    """Messages of the legacy Functions API, and content parts other than text, are a 400."""
    if message.role == "function" or (message.model_extra or {}).get("function_call"):
        raise UnsupportedParameter("function messages are not supported by this model; use tools",
                                   param="messages")
    if isinstance(message.content, list) and any(part.get("type") != "text" for part in message.content):
        raise UnsupportedParameter("this model accepts text content only", param="messages")
