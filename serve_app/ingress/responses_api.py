"""OpenAI's Responses API (``POST /v1/responses``) as a translation at both edges of the chat pipeline.

    request   ResponsesRequest (+ the stored items of previous_response_id) ──to_chat──▶ chat request
    answer    chat.completion ──response_object──▶ response
    stream    chat.completion.chunk… ──ResponseEvents──▶ response.created … response.completed

Everything between (keys, limits, ``auto``, the cache, admission, fallbacks, metering) is the chat
pipeline's, unchanged. A model whose provider speaks this API itself (``responses_api: true`` in
providers.yaml) is sent the request as it came, and its response or events pass back with IIR's response
id put in (stored conversations are IIR's, so ids must be too).

Conversation state: a stored response keeps its conversation as Responses items (the input items of
every turn, then the output items), so ``previous_response_id`` continues it on any model, local or
remote (docs/API.md, "Responses").
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from serve_app.errors import IIRError, InvalidRequest, UnsupportedParameter, UpstreamError
from serve_app.schemas import RESPONSE_END_EVENTS, ChatCompletionRequest, ResponsesRequest

Item = dict[str, Any]
# Output items' ids: the kind's prefix and 48 hex digits, as OpenAI's look.
_LOGPROBS_INCLUDE = "message.output_text.logprobs"
_ROLES = ("user", "system", "developer", "assistant")


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}{uuid.uuid4().hex[:16]}"


class ResponsesAsChat(ChatCompletionRequest):
    """A Responses request translated to chat. Its own class, so the response cache keys it apart from
    ``/v1/chat/completions`` (the cache keys on the body's class): a provider that speaks the Responses
    API answers it in that API's shape."""


# --- request ---------------------------------------------------------------------------------------

def input_items(body: ResponsesRequest) -> list[Item]:
    """The request's own input as items (a string is one user message)."""
    if isinstance(body.input, str):
        return [{"type": "message", "role": "user", "content": body.input}]
    return list(body.input)


@dataclass
class Translation:
    """The chat request, or why this request has none (it can still go to a provider that speaks the
    Responses API: its built-in tools, say)."""

    chat: ResponsesAsChat | None
    refusal: IIRError | None = None


def to_chat(body: ResponsesRequest, history: list[Item]) -> Translation:
    try:
        return Translation(_to_chat(body, history))
    except IIRError as exc:
        return Translation(None, exc)


def _to_chat(body: ResponsesRequest, history: list[Item]) -> ResponsesAsChat:
    if body.background:
        raise UnsupportedParameter("background responses are not supported; stream instead",
                                   param="background")
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    offset = -len(history)  # history items are named by their place in the stored conversation
    for i, item in enumerate([*history, *input_items(body)]):
        _add_item(messages, item, i + offset)
    if not messages:
        raise InvalidRequest("input has no message to answer", param="input", code="invalid_value")
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    for name in ("temperature", "top_p", "user", "parallel_tool_calls"):
        if (value := getattr(body, name)) is not None:
            chat[name] = value
    if body.max_output_tokens is not None:
        chat["max_completion_tokens"] = body.max_output_tokens
    if body.tools:
        chat["tools"] = [_tool(t, i) for i, t in enumerate(body.tools)]
    if body.tool_choice is not None:
        chat["tool_choice"] = _tool_choice(body.tool_choice)
    if body.text is not None and (response_format := _response_format(body)) is not None:
        chat["response_format"] = response_format
    if body.top_logprobs is not None or _LOGPROBS_INCLUDE in (body.include or ()):
        chat["logprobs"] = True
        chat["top_logprobs"] = body.top_logprobs or 0
    reasoning = (body.model_extra or {}).get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort"):
        chat["reasoning_effort"] = reasoning["effort"]  # for upstreams that reason; local models ignore it
    try:
        return ResponsesAsChat.model_validate(chat)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidRequest(f"input: {first['msg']}", param="input", code="invalid_value") from exc


def _add_item(messages: list[dict[str, Any]], item: Any, index: int) -> None:
    where = f"input[{index}]" if index >= 0 else "previous_response_id"
    if not isinstance(item, dict):
        raise InvalidRequest(f"{where}: an item must be an object", param=where, code="invalid_value")
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in _ROLES:
            raise InvalidRequest(f"{where}.role must be one of {', '.join(_ROLES)}", param=f"{where}.role",
                                 code="invalid_value")
        messages.append({"role": role, "content": _content(item.get("content"), f"{where}.content")})
    elif kind == "function_call":
        call = {"id": _text_field(item, "call_id", where), "type": "function",
                "function": {"name": _text_field(item, "name", where),
                             "arguments": _text_field(item, "arguments", where)}}
        last = messages[-1] if messages else None
        if last is not None and last["role"] == "assistant" and last.get("tool_calls") \
                and not last.get("content"):
            last["tool_calls"].append(call)  # parallel calls are one assistant turn in chat
        else:
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _content(output, f"{where}.output")
        messages.append({"role": "tool", "tool_call_id": _text_field(item, "call_id", where),
                         "content": text if isinstance(text, str) else _joined(text)})
    elif kind == "reasoning":
        return  # a provider's reasoning summary: chat has no place for it, and the answer follows it
    else:
        raise UnsupportedParameter(f"{where}: items of type {kind!r} are not supported by this model",
                                   param=f"{where}.type")


def _text_field(item: dict[str, Any], name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise InvalidRequest(f"{where}.{name} must be a string", param=f"{where}.{name}",
                             code="invalid_value")
    return value


def _content(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message's content as chat content: a string stays one; parts become chat's parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of parts", param=where,
                             code="invalid_value")
    parts: list[dict[str, Any]] = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{where}[{i}].text must be a string", param=f"{where}[{i}].text",
                                     code="invalid_value")
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "refusal":
            parts.append({"type": "text", "text": str(part.get("refusal", ""))})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": part["image_url"],
                                                             "detail": part.get("detail", "auto")}})
        else:
            raise UnsupportedParameter(f"{where}[{i}]: content parts of type {kind!r} are not supported by "
                                       "this model", param=f"{where}[{i}].type")
    return parts


def _joined(parts: list[dict[str, Any]]) -> str:
    return "".join(p.get("text", "") for p in parts)


def _tool(tool: dict[str, Any], index: int) -> dict[str, Any]:
    if tool.get("type") != "function":
        raise UnsupportedParameter(f"tools[{index}]: tools of type {tool.get('type')!r} are not supported by "
                                   "this model; function tools are", param=f"tools[{index}].type")
    if not isinstance(tool.get("name"), str):
        raise InvalidRequest(f"tools[{index}].name must be a string", param=f"tools[{index}].name",
                             code="invalid_value")
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                if tool.get(k) is not None}
    return {"type": "function", "function": function}


def _tool_choice(choice: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise UnsupportedParameter("tool_choice may be none, auto, required or {type: function, name}",
                               param="tool_choice")


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    assert body.text is not None
    fmt = body.text.format
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
    for name, value in (("description", fmt.description), ("strict", fmt.strict)):
        if value is not None:
            schema[name] = value
    return {"type": "json_schema", "json_schema": schema}


# --- answer ----------------------------------------------------------------------------------------

@dataclass
class Echo:
    """The request's settings every response object repeats, and its identity."""

    id: str
    created_at: int
    body: ResponsesRequest
    model: str = ""

    def response(self, status: str, output: list[Item], usage: dict[str, Any] | None,
                 incomplete: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        body = self.body
        fmt = body.text.format.model_dump(mode="json", by_alias=True, exclude_none=True) if body.text \
            else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": False, "error": error,
            "incomplete_details": {"reason": incomplete} if incomplete else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": self.model or body.model, "output": output,
            "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None}, "store": body.store,
            "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": fmt}, "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
            "top_logprobs": body.top_logprobs,
            "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled",
            "usage": usage, "user": body.user, "metadata": body.metadata or {},
        }


def response_usage(chat_usage: Any) -> dict[str, Any] | None:
    if not isinstance(chat_usage, dict):
        return None
    prompt = int(chat_usage.get("prompt_tokens") or 0)
    completion = int(chat_usage.get("completion_tokens") or 0)
    cached = (chat_usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (chat_usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + completion}


def _incomplete_reason(finish_reason: str | None) -> str | None:
    return {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason or "")


def _text_logprobs(choice_logprobs: Any) -> list[dict[str, Any]]:
    content = choice_logprobs.get("content") if isinstance(choice_logprobs, dict) else None
    return [{"token": t.get("token", ""), "logprob": t.get("logprob", 0.0), "bytes": t.get("bytes") or [],
             "top_logprobs": [{"token": x.get("token", ""), "logprob": x.get("logprob", 0.0),
                               "bytes": x.get("bytes") or []} for x in t.get("top_logprobs") or []]}
            for t in content or []]


def message_item(item_id: str, text: str, status: str, logprobs: list[dict[str, Any]]) -> Item:
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}]}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> Item:
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def response_object(echo: Echo, chat: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion as a response."""
    choice = (chat.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    output: list[Item] = []
    incomplete = _incomplete_reason(choice.get("finish_reason"))
    item_status = "incomplete" if incomplete else "completed"
    if message.get("content"):
        output.append(message_item(new_item_id("msg"), message["content"], item_status,
                                   _text_logprobs(choice.get("logprobs"))))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append(call_item(new_item_id("fc"), call.get("id") or new_item_id("call"),
                                function.get("name", ""), function.get("arguments", ""), "completed"))
    return echo.response("incomplete" if incomplete else "completed", output,
                         response_usage(chat.get("usage")), incomplete)


def passed_through(echo: Echo, response: dict[str, Any]) -> dict[str, Any]:
    """A provider's own response object, with IIR's id (the one its conversation is stored under)."""
    return {**response, "id": echo.id, "previous_response_id": echo.body.previous_response_id,
            "store": echo.body.store, "model": echo.model or response.get("model")}


def input_item_page(items: list[Item], response_id: str, *, order: str, limit: int,
                    after: str | None) -> dict[str, Any]:
    """``GET /v1/responses/{id}/input_items``: a page of the items a response answered, as OpenAI lists
    them (each with an id; a message's text content as parts)."""
    listed = [_listed(item, i, response_id) for i, item in enumerate(items)]
    if order == "desc":
        listed.reverse()
    if after is not None:
        ids = [item["id"] for item in listed]
        listed = listed[ids.index(after) + 1:] if after in ids else []
    page = listed[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(listed) > limit}


def _listed(item: Item, index: int, response_id: str) -> Item:
    listed = {"id": f"item_{index}_{response_id}", "type": "message", **item}
    if listed["type"] == "message":
        content = listed.get("content")
        if isinstance(content, str):
            kind = "output_text" if listed.get("role") == "assistant" else "input_text"
            listed["content"] = [{"type": kind, "text": content}]
        listed.setdefault("status", "completed")
    return listed


# --- stream ----------------------------------------------------------------------------------------

Keep = Callable[[dict[str, Any]], Awaitable[bool]]


@dataclass
class _OpenCall:
    output_index: int
    item: Item


@dataclass
class ResponseEvents:
    """Chat chunks in, the Responses API's typed events out, numbered by ``sequence_number``.

    Items open as their first piece arrives (the message at its first text, each tool call at its first
    delta) and are all finished, in order, when the chat stream ends; then the response is stored (if
    asked) and ``response.completed`` (or ``response.incomplete`` past ``max_output_tokens``) ends the
    stream. A failure after the first event ends it with an ``error`` event that the SDKs raise.
    """

    echo: Echo
    keep: Keep
    sequence: int = 0
    output: list[Item] = field(default_factory=list)
    _message: Item | None = None
    _message_index: int = 0
    _text: list[str] = field(default_factory=list)
    _logprobs: list[dict[str, Any]] = field(default_factory=list)
    _calls: dict[int, _OpenCall] = field(default_factory=dict)
    _usage: Any = None
    _finish: str | None = None

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, **fields, "sequence_number": self.sequence}
        self.sequence += 1
        return event

    def opening(self) -> list[dict[str, Any]]:
        snapshot = self.echo.response("in_progress", [], None)
        return [self.event("response.created", response=snapshot),
                self.event("response.in_progress", response=snapshot)]

    async def translate(self, chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        try:
            async for chunk in chunks:
                for event in self._chunk(chunk):
                    yield event
            for event in await self._closing():
                yield event
        except IIRError as exc:
            yield self.error(exc)
        except Exception as exc:  # noqa: BLE001 - the stream ends with an error event, never mid-air
            yield self.error(UpstreamError(f"the stream failed: {type(exc).__name__}"))

    def error(self, exc: IIRError) -> dict[str, Any]:
        body = exc.to_body()["error"]
        # "error" as well as the typed fields: the SDKs raise on a data line that carries "error".
        return self.event("error", code=body["code"], message=body["message"], param=body["param"],
                          error=body)

    def _chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        events: list[dict[str, Any]] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if delta.get("content"):
                events += self._text_delta(delta["content"], choice.get("logprobs"))
            for call in delta.get("tool_calls") or []:
                events += self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return events

    def _text_delta(self, text: str, logprobs: Any) -> list[dict[str, Any]]:
        events = []
        if self._message is None:
            self._message = message_item(new_item_id("msg"), "", "in_progress", [])
            self._message["content"] = []
            self.output.append(self._message)
            index = self._message_index = len(self.output) - 1
            events.append(self.event("response.output_item.added", output_index=index,
                                     item=dict(self._message, content=[])))
            events.append(self.event("response.content_part.added", item_id=self._message["id"],
                                     output_index=index, content_index=0,
                                     part={"type": "output_text", "text": "", "annotations": [],
                                           "logprobs": []}))
        pieces = _text_logprobs(logprobs)
        self._text.append(text)
        self._logprobs += pieces
        events.append(self.event("response.output_text.delta", item_id=self._message["id"],
                                 output_index=self._message_index, content_index=0, delta=text,
                                 logprobs=pieces))
        return events

    def _call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        open_call = self._calls.get(index)
        if open_call is None:
            item = call_item(new_item_id("fc"), call.get("id") or new_item_id("call"),
                             function.get("name") or "", "", "in_progress")
            self.output.append(item)
            open_call = self._calls[index] = _OpenCall(len(self.output) - 1, item)
            events.append(self.event("response.output_item.added", output_index=open_call.output_index,
                                     item=dict(item)))
        elif function.get("name"):
            open_call.item["name"] += function["name"]
        if arguments := function.get("arguments"):
            open_call.item["arguments"] += arguments
            events.append(self.event("response.function_call_arguments.delta",
                                     item_id=open_call.item["id"], output_index=open_call.output_index,
                                     delta=arguments))
        return events

    async def _closing(self) -> list[dict[str, Any]]:
        incomplete = _incomplete_reason(self._finish)
        events = []
        for index, item in enumerate(self.output):
            if item["type"] == "message":
                text = "".join(self._text)
                part = {"type": "output_text", "text": text, "annotations": [], "logprobs": self._logprobs}
                events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                         content_index=0, text=text, logprobs=self._logprobs))
                events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                         content_index=0, part=part))
                item.update(content=[part], status="incomplete" if incomplete else "completed")
            else:
                events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                         output_index=index, name=item["name"], arguments=item["arguments"]))
                item["status"] = "completed"
            events.append(self.event("response.output_item.done", output_index=index, item=item))
        status = "incomplete" if incomplete else "completed"
        response = self.echo.response(status, self.output, response_usage(self._usage), incomplete)
        response["store"] = await self.keep(response)
        events.append(self.event(f"response.{status}", response=response))
        return events


async def passed_through_events(echo: Echo, keep: Keep, events: AsyncIterator[dict[str, Any]]
                                ) -> AsyncIterator[dict[str, Any]]:
    """A provider's own events, with IIR's response id in each response snapshot; the final one is
    stored (if asked) before it is sent."""
    async for event in events:
        response = event.get("response")
        if isinstance(response, dict):
            event["response"] = response = passed_through(echo, response)
            if event.get("type") in RESPONSE_END_EVENTS:
                response["store"] = await keep(response)
        yield event

