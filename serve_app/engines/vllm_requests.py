"""OpenAI requests as vLLM ``SamplingParams`` keywords and prompts, and vLLM's logprobs as OpenAI's
(for ``VLLMEngine``). Plain data both ways, so it tests without vLLM; the engine builds vLLM's objects.

Structured outputs (``response_format``, tool calls; serve_app/engines/structured.py) go to vLLM's
guided decoding as a plain dict of ``StructuredOutputsParams`` fields (checked against vLLM 0.34; the
engine hands the same fields to ``GuidedDecodingParams`` on releases that predate it): a JSON Schema
under ``json``, which vLLM holds with xgrammar or, for what xgrammar cannot, guidance (its ``auto``
backend); what neither can hold vLLM refuses, and the engine answers 400. ``tool_choice: auto`` is a
call *or* text not starting with ``{``: an xgrammar structural tag in its ``format`` form (``or`` of the
call's schema and that text), checked against the xgrammar 0.2.8 that vLLM 0.34 ships; a vLLM whose
backend lacks that form refuses it (a 400).

Tools reach the prompt two ways. Under ``required`` or a named tool the answer is held to the call's
schema whatever the model would write, so a chat template that renders tools gets them (``tools=``, as
vLLM's server does) and the model sees them the way it was trained to. Under ``auto`` the model itself
must write our call format (``{"name", "arguments"}``), not its template's (``<tool_call>`` tags and the
like, which only a per-model parser would read), so the tools and that format are described in a system
message, and earlier calls and results are plain turns, as for templates without tools.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_app.engines.structured import (
    CallOrText,
    ToolUse,
    arguments,
    chat_constraints,
    message_text,
    refuse_unsupported,
    refuse_unsupported_message,
    requested_logprobs,
    tool_calls,
)
from serve_app.errors import InvalidRequest, UnsupportedParameter
from serve_app.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest

# Audio out, predicted outputs and the legacy Functions API (tools replace it): refused, not ignored.
_REFUSED = ("functions", "audio", "prediction")
# JSON has no -inf; vLLM's server reports a masked-out token this way too.
_LOWEST_LOGPROB = -9999.0


@dataclass(frozen=True)
class Plan:
    """One request, ready for vLLM."""

    sampling: dict[str, Any]  # SamplingParams keywords; "structured_outputs" a dict of its fields
    prompts: list[str] = field(default_factory=list)  # completions; a chat's prompt comes from messages
    messages: list[dict[str, Any]] | None = None  # chat: the conversation for the chat template
    tools: list[dict[str, Any]] | None = None  # chat: the template's ``tools``
    tool_use: bool = False  # the answer may be a tool call
    logprobs: int | None = None  # alternatives per token; None: logprobs not asked for
    constraint_param: str | None = None  # where the structured output came from, for vLLM's refusals


def plan(request: GenerateRequest, *, template_tools: bool = False) -> Plan:
    """``template_tools``: the model's chat template renders ``tools`` (and tool turns)."""
    refuse_unsupported(request, _REFUSED)
    logprobs = requested_logprobs(request)
    sampling = _sampling(request, logprobs)
    if isinstance(request, CompletionRequest):
        if request.echo and logprobs is not None:
            raise UnsupportedParameter("echo with logprobs is not supported by this model", param="echo")
        return Plan(sampling=sampling, prompts=request.prompts(), logprobs=logprobs)
    response, use = chat_constraints(request)
    native = template_tools and (use is None or use.mode != "auto")
    messages = _messages(request, native=native)
    tools = None
    param = None
    if response is not None:
        sampling["structured_outputs"] = {"json": response.schema}
        param = response.param
    elif use is not None:
        sampling["structured_outputs"] = _call_or_text(use) if use.mode == "auto" else {"json": use.schema}
        param = "tools"
        if native:
            tools = use.tools
        else:
            messages = _with_system(messages, use.system)
    return Plan(sampling=sampling, messages=messages, tools=tools, tool_use=use is not None,
                logprobs=logprobs, constraint_param=param)


def _sampling(request: GenerateRequest, logprobs: int | None) -> dict[str, Any]:
    sampling: dict[str, Any] = {
        "n": request.n,
        "temperature": 1.0 if request.temperature is None else request.temperature,
        "top_p": 1.0 if request.top_p is None else request.top_p,
        "max_tokens": request.token_limit(),
        "stop": request.stop_list() or None,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
    }
    if logprobs is not None:
        # vLLM, as OpenAI, always adds the sampled token: logprobs=0 is that token alone.
        sampling["logprobs"] = logprobs
    if bias := (request.model_extra or {}).get("logit_bias"):
        sampling["logit_bias"] = _logit_bias(bias)
    return sampling


def _logit_bias(bias: Any) -> dict[int, float]:
    out: dict[int, float] | None
    try:
        out = {int(token): float(value) for token, value in dict(bias).items()}
    except (TypeError, ValueError):
        out = None
    if out is None or not all(-100 <= value <= 100 for value in out.values()):
        raise InvalidRequest("logit_bias maps token ids to numbers from -100 to 100", param="logit_bias")
    return out


def _call_or_text(use: ToolUse) -> dict[str, Any]:
    """``auto``: a call, or text whose first character is not ``{`` (llama_tools.gbnf_for's rule)."""
    text = {"type": "sequence", "elements": [{"type": "regex", "pattern": r"[^{ \t\n\r]"},
                                             {"type": "any_text"}]}
    tag = {"type": "structural_tag",
           "format": {"type": "or", "elements": [{"type": "json_schema", "json_schema": use.schema}, text]}}
    return {"structural_tag": json.dumps(tag)}


def _messages(request: ChatCompletionRequest, *, native: bool) -> list[dict[str, Any]]:
    """The conversation for the chat template; ``native``: tool turns as the template's own (OpenAI's
    shape, arguments decoded), else as plain turns (structured.message_text)."""
    out: list[dict[str, Any]] = []
    for m in request.messages:
        extra = m.model_extra or {}
        refuse_unsupported_message(m)
        if not native and (m.role == "tool" or extra.get("tool_calls")):
            role, content = message_text(m)
            out.append({"role": role, "content": content})
            continue
        out.append(_native(m))
    return out


def _native(m: Any) -> dict[str, Any]:
    """A message as templates that render tools take it (OpenAI's shape, a call's arguments decoded)."""
    extra = m.model_extra or {}
    # "developer" is OpenAI's new "system", which templates do not know.
    message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
    if m.role == "tool":
        message |= {k: extra[k] for k in ("tool_call_id", "name") if extra.get(k)}
    calls = [c for c in extra.get("tool_calls") or ()
             if isinstance(c, dict) and isinstance(c.get("function"), dict)]
    if calls:
        message["tool_calls"] = [{**c, "function": {**c["function"], "arguments": arguments(c["function"])}}
                                 for c in calls]
    return message


def _with_system(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


# --- logprobs -------------------------------------------------------------------------------------------
# vLLM reports, per generated token, a dict token id → ``Logprob`` (``.logprob``, ``.rank``,
# ``.decoded_token``): the sampled token and the ``logprobs`` most likely ones.

def chat_logprobs(token_ids: Sequence[int], positions: Sequence[Any], top: int) -> dict[str, Any]:
    """OpenAI chat ``logprobs`` of ``token_ids``, from vLLM's per-position dicts."""
    content = []
    for token_id, alternatives in zip(token_ids, positions, strict=False):
        chosen = alternatives[token_id]
        content.append({**_token(token_id, chosen),
                        "top_logprobs": [_token(t, lp) for t, lp in _ranked(alternatives)[:top]]})
    return {"content": content, "refusal": None}


def completion_logprobs(token_ids: Sequence[int], positions: Sequence[Any], *,
                        text_offset: int = 0) -> dict[str, Any]:
    """The completions API's ``logprobs``: parallel lists; alternatives as {text: logprob}, the k most
    likely and always the chosen one (so up to k + 1), as OpenAI."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, alternatives in zip(token_ids, positions, strict=False):
        chosen = _token(token_id, alternatives[token_id])
        top: dict[str, float] = {}
        for t, lp in _ranked(alternatives):
            # Tokens whose texts look alike (partial characters) share a key; the likelier one keeps it.
            top.setdefault(_text(t, lp), max(lp.logprob, _LOWEST_LOGPROB))
        out["tokens"].append(chosen["token"])
        out["token_logprobs"].append(chosen["logprob"])
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(chosen["token"])
    return out


def _ranked(alternatives: Any) -> list[tuple[int, Any]]:
    # vLLM puts the sampled token first, whatever its rank; OpenAI lists the likeliest first.
    return sorted(alternatives.items(), key=lambda item: (item[1].rank is None, item[1].rank or 0))


def _token(token_id: int, logprob: Any) -> dict[str, Any]:
    text = _text(token_id, logprob)
    return {"token": text, "logprob": max(logprob.logprob, _LOWEST_LOGPROB),
            "bytes": list(text.encode("utf-8", errors="replace"))}


def _text(token_id: int, logprob: Any) -> str:
    # No text when the engine runs without detokenizing; vLLM's server names such a token the same way.
    decoded = logprob.decoded_token
    return decoded if decoded is not None else f"token_id:{token_id}"


# --- responses ------------------------------------------------------------------------------------------

def choice(plan: Plan, *, chat: bool, index: int, text: str, finish_reason: str | None,
           token_ids: Sequence[int], positions: Sequence[Any] | None, text_offset: int = 0) -> dict[str, Any]:
    """One finished choice; ``positions``: vLLM's logprobs of ``token_ids`` (None unless asked for);
    ``text_offset``: where the completion starts (the completions API counts from the prompt's start)."""
    if chat and plan.tool_use and (calls := tool_calls(text)) is not None:
        # The call's JSON is rewritten (arguments re-serialized, an id added): no tokens spell it.
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
    logprobs = _logprobs_of(plan, chat, token_ids, positions, text_offset=text_offset)
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


class ChoiceStream:
    """One choice of a stream: vLLM's cumulative outputs in, the choices of OpenAI chunks out. A chunk
    carries the logprobs of the tokens whose text it carries. An answer that may be a tool call is held
    until its first character shows it is text (``CallOrText``)."""

    def __init__(self, plan: Plan, index: int, *, chat: bool, text_offset: int = 0) -> None:
        self._plan, self._index, self._chat = plan, index, chat
        self._chars = 0  # of vLLM's text, seen so far
        self._offset = text_offset  # completions: where the text sent so far ends, in the prompt's terms
        self._reported = 0  # tokens whose logprobs were sent
        self._token_ids: Sequence[int] = ()
        self._positions: Sequence[Any] | None = None
        self._started = False
        self._calls = CallOrText() if chat and plan.tool_use else None

    def step(self, text: str, token_ids: Sequence[int], positions: Sequence[Any] | None,
             finish_reason: str | None) -> list[dict[str, Any]]:
        new_text, self._chars = text[self._chars:], len(text)
        self._token_ids, self._positions = token_ids, positions
        first, self._started = not self._started, True
        if self._calls is None:
            return [self._delta(new_text, finish_reason, first)] if new_text or finish_reason or first else []
        send = self._calls.feed(new_text)
        out = [self._delta(send, None, first)] if send or first else []
        if finish_reason is not None:
            rest, calls = self._calls.end()
            if calls is None:
                out.append(self._delta(rest, finish_reason, False))
            else:
                self._reported = len(token_ids)  # the call's JSON is rewritten: no tokens spell it
                out.append(self._delta("", None, False, [{"index": 0, **call} for call in calls]))
                out.append(self._delta("", "tool_calls", False))
        return out

    def _delta(self, text: str, finish_reason: str | None, first: bool,
               calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        logprobs = self._unreported() if text or finish_reason else None
        self._offset += len(text)
        if not self._chat:
            return {"index": self._index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = calls
        return {"index": self._index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}

    def _unreported(self) -> dict[str, Any] | None:
        start, self._reported = self._reported, len(self._token_ids)
        if self._positions is None or start == self._reported:
            return None
        return _logprobs_of(self._plan, self._chat, self._token_ids[start:], self._positions[start:],
                            text_offset=self._offset)


def _logprobs_of(plan: Plan, chat: bool, token_ids: Sequence[int], positions: Sequence[Any] | None, *,
                 text_offset: int = 0) -> dict[str, Any] | None:
    if plan.logprobs is None or positions is None:
        return None
    if chat:
        return chat_logprobs(token_ids, positions, plan.logprobs)
    return completion_logprobs(token_ids, positions, text_offset=text_offset)


def refusal(message: str, parameter: str | None, plan: Plan) -> InvalidRequest:
    """A request vLLM refused (its validation error: ``message`` and, when it names one, ``parameter``)
    as our 400."""
    lowered = message.lower()
    if "maximum model length" in lowered or "max_model_len" in lowered:
        return InvalidRequest(message, param="messages" if plan.messages is not None else "prompt",
                              code="context_length_exceeded")
    # vLLM names no parameter when its structured-output backends refuse a schema.
    if plan.constraint_param and any(word in lowered for word in ("schema", "grammar", "structur")):
        return InvalidRequest(f"{plan.constraint_param}: {message}", param=plan.constraint_param,
                              code="invalid_json_schema")
    return InvalidRequest(message, param=parameter)
