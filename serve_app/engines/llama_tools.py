"""Tool calls on llama.cpp models (issue 16, part 2): OpenAI ``tools`` / ``tool_choice`` in, ``tool_calls``
out, for models without a tool-calling chat template of their own (SmolLM2).

What a call looks like and when the answer may be one is the same for every engine
(serve_app/engines/structured.py). Here:

- The tools are described in a system message (``ToolUse.system``): each function's name, description
  and parameters, and how to call one.
- ``required`` or a named tool: a grammar (``llama_requests.plan``) holds the answer to exactly the
  call object, the arguments to the function's own ``parameters`` schema.
- ``auto``: the grammar lets the answer be such a call *or* text that does not start with ``{``
  (``gbnf_for``). A 135M model calls a tool under ``auto`` only when the request makes it obvious;
  ``required`` or a named tool is the reliable way (docs/API.md, "Tool calls").
- Conversations carry calls back: an assistant message's ``tool_calls`` become its JSON call, a ``tool``
  message becomes a user turn ``Result of <name>: <content>`` (the template knows system, user, assistant).
"""

from __future__ import annotations

from serve_app.engines.structured import ToolUse


def gbnf_for(use: ToolUse, call_gbnf: str) -> str:
    """``auto``: the call's grammar, or text whose first character is not ``{``."""
    if use.mode != "auto":
        return call_gbnf
    renamed = call_gbnf.replace("root ::=", "call ::=", 1)
    return renamed + '\nroot ::= call | text\ntext ::= [^{ \\t\\n] [^\\x00]*\n'
