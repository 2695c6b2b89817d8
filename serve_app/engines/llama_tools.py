"""Tool calls on llama.cpp models (issue 16, part 2): OpenAI ``tools`` / ``tool_choice`` in, ``tool_calls``
out, for models without a tool-calling chat template of their own (SmolLM2).

- The tools are described in a system message: each function's name, description and parameters, and
  how to call one: answer with one JSON object ``{"name": ..., "arguments": {...}}``.
- ``required`` or a named tool: a grammar (``llama_requests._grammar``) holds the answer to exactly that
  object, the arguments to the function's own ``parameters`` schema. The answer is always a valid call.
- ``auto``: the grammar lets the answer be such a call *or* text that does not start with ``{``; the
  model's first character decides. A 135M model calls a tool under ``auto`` only when the request makes
  it obvious; ``required`` or a named tool is the reliable way (docs/API.md, "Tool calls").
- ``none`` (or no tools): the tools are not described and the answer is text.
- One call per answer (``parallel_tool_calls`` is accepted and has no effect).
- Conversations carry calls back: an assistant message's ``tool_calls`` become its JSON call, a ``tool``
  message becomes a user turn ``Result of <name>: <content>`` (the template knows system, user, assistant).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from serve_app.errors import InvalidRequest
from serve_app.schemas import ChatCompletionRequest


@dataclass(frozen=True)
class ToolUse:
    mode: str  # "auto" or "required" (a named tool is "required" of a one-tool list)
    schema: dict[str, Any]  # a call: {"name": <one of the tools>, "arguments": <its parameters>}
    system: str  # the tools, described for the model


def tool_use(request: ChatCompletionRequest) -> ToolUse | None:
    extra = request.model_extra or {}
    tools, choice = extra.get("tools"), extra.get("tool_choice")
    if not tools and choice not in (None, "none"):
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    if not tools or choice == "none":
        return None
    functions = [_function(tool, i) for i, tool in enumerate(_as_list(tools))]
    mode = "auto"
    if choice == "required":
        mode = "required"
    elif isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
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
    return ToolUse(mode, schema, _describe(functions, mode))


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


def gbnf_for(use: ToolUse, call_gbnf: str) -> str:
    """``auto``: the call's grammar, or text whose first character is not ``{``."""
    if use.mode != "auto":
        return call_gbnf
    renamed = call_gbnf.replace("root ::=", "call ::=", 1)
    return renamed + '\nroot ::= call | text\ntext ::= [^{ \\t\\n] [^\\x00]*\n'


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


def message_text(message: Any) -> tuple[str, str]:
    """A conversation's tool turns as the template's roles: (role, content)."""
    extra = message.model_extra or {}
    if message.role == "tool":
        name = extra.get("name") or extra.get("tool_call_id") or "the tool"
        return "user", f"Result of {name}: {message.text()}"
    calls = extra.get("tool_calls") or []
    parts = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"])})
             for c in calls if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    return "assistant", "\n".join([message.text(), *parts]).strip()


def _arguments(function: dict[str, Any]) -> Any:
    try:
        return json.loads(function.get("arguments") or "{}")
    except ValueError:
        return function.get("arguments")
