"""Tool calls on the real SmolLM2 (llama.cpp, CPU): ``required`` and named tools always give a call that
names a declared function and whose arguments validate against its parameters, whole or streamed."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from serve_app.engines.llama_cpp import LlamaCppEngine
from serve_app.errors import InvalidRequest
from tests.engines.contract import Requests, collect, expect_error, text_of
from tests.engines.local_models import SMOLLM2, needs_llama

pytestmark = needs_llama

CHAT = Requests(model=SMOLLM2.id)
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"], "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 40},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": ADD}}]
PARAMETERS = {"get_weather": WEATHER, "add": ADD}
QUESTIONS = ["What's the weather in Paris?", "What is 2 plus 3?", "Is it cold in Oslo today?",
             "Add 40 and 2.", "Hello there!", "Weather in Tokyo in fahrenheit, please."]


def ask(question: str, **overrides: Any) -> Any:
    return CHAT.chat(**{"max_tokens": 80, "messages": [{"role": "user", "content": question}], "tools": TOOLS,
                        **overrides})


def valid_call(call: dict[str, Any]) -> str:
    assert call["type"] == "function" and call["id"].startswith("call_")
    name = call["function"]["name"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])
    return str(name)


@pytest.mark.parametrize("question", QUESTIONS)
async def test_required_always_gives_a_valid_call(llama: LlamaCppEngine, question: str) -> None:
    choice = (await llama.generate(ask(question, tool_choice="required")))["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert len(choice["message"]["tool_calls"]) == 1
    valid_call(choice["message"]["tool_calls"][0])


async def test_a_named_tool_is_the_one_called(llama: LlamaCppEngine) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    choice = (await llama.generate(ask("What's the weather in Paris?", tool_choice=named)))["choices"][0]
    assert valid_call(choice["message"]["tool_calls"][0]) == "add"


async def test_a_streamed_call_arrives_as_a_tool_calls_delta(llama: LlamaCppEngine) -> None:
    chunks = await collect(llama.stream(ask("Weather in Rome?", tool_choice="required", stream=True)))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["index"] == 0
    valid_call(calls[0])
    assert not any(d.get("content") for d in deltas)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"


async def test_auto_gives_text_or_a_valid_call(llama: LlamaCppEngine) -> None:
    for question in QUESTIONS[:3]:
        message = (await llama.generate(ask(question, tool_choice="auto")))["choices"][0]["message"]
        if message.get("tool_calls"):
            valid_call(message["tool_calls"][0])
        else:
            assert message["content"] and not message["content"].lstrip().startswith("{")


async def test_none_answers_in_text(llama: LlamaCppEngine) -> None:
    choice = (await llama.generate(ask("What's the weather in Paris?", tool_choice="none")))["choices"][0]
    assert "tool_calls" not in choice["message"] and text_of(choice)


async def test_a_conversation_carries_calls_and_results_back(llama: LlamaCppEngine) -> None:
    messages = [{"role": "user", "content": "Weather in Rome?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Rome", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"}]
    request = CHAT.chat(max_tokens=30, messages=messages, tools=TOOLS, tool_choice="none")
    assert text_of((await llama.generate(request))["choices"][0])


@pytest.mark.parametrize(("overrides", "param"), [
    pytest.param({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
                 id="unknown-name"),
    pytest.param({"tool_choice": "sometimes"}, "tool_choice", id="bad-choice"),
    pytest.param({"tools": [{"type": "function"}]}, "tools[0]", id="no-function"),
    pytest.param({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "number", "maximum": 3}}}}}]}, "tools",
                 id="unenforceable"),
    pytest.param({"response_format": {"type": "json_object"}}, "response_format", id="with-response-format"),
])
async def test_bad_tool_requests_are_400s_naming_the_parameter(
        llama: LlamaCppEngine, overrides: dict[str, Any], param: str) -> None:
    await expect_error(llama.generate(ask("hi", **overrides)), InvalidRequest, param)


async def test_tool_choice_without_tools_is_a_400(llama: LlamaCppEngine) -> None:
    await expect_error(llama.generate(CHAT.chat(tool_choice="required")), InvalidRequest, "tool_choice")
