"""OpenAI requests as vLLM's arguments, and vLLM's outputs as OpenAI's (serve_app/engines/vllm_requests.py).

Plain data both ways, so these run without vLLM or a GPU. vLLM's output shapes are its own: per generated
token a dict token id → ``Logprob`` (``vllm/logprobs.py``: ``logprob``, ``rank``, ``decoded_token``), the
sampled token first. The structural tag for ``tool_choice: auto`` is checked against xgrammar where it is
installed (it comes with vLLM).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest

from serve_app.engines.vllm_engine import renders_tools
from serve_app.engines.vllm_requests import ChoiceStream, Plan, choice, plan, refusal
from serve_app.errors import IIRError, InvalidRequest, UnsupportedParameter
from tests.engines.contract import Requests

REQUESTS = Requests(model="local/vllm-test")
PERSON = {"type": "object", "required": ["name", "age"], "additionalProperties": False,
          "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
WEATHER = {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": ADD}},
         {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}}]
ASK = [{"role": "user", "content": "What is 2 plus 3?"}]


@dataclass
class Logprob:
    """vLLM's ``vllm.logprobs.Logprob``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def chat(**overrides: Any) -> Any:
    return REQUESTS.chat(**overrides)


def tools_request(**overrides: Any) -> Any:
    return chat(**{"messages": ASK, "tools": TOOLS, **overrides})


# --- sampling -------------------------------------------------------------------------------------------

def test_openai_defaults_become_vllms_keywords() -> None:
    planned = plan(chat(max_tokens=20, stop="END", seed=7, presence_penalty=0.5))
    assert planned.sampling == {"n": 1, "temperature": 0, "top_p": 1.0, "max_tokens": 20, "stop": ["END"],
                                "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0.0}
    assert planned.messages == [{"role": "system", "content": "You are a helpful assistant."},
                                {"role": "user", "content": "Name three colours of the rainbow."}]
    assert (planned.tools, planned.tool_use, planned.logprobs) == (None, False, None)


def test_a_completion_keeps_its_prompts_and_n() -> None:
    planned = plan(REQUESTS.completion(prompt=["a", "b"], n=2, max_completion_tokens=None))
    assert planned.prompts == ["a", "b"] and planned.messages is None
    assert planned.sampling["n"] == 2 and planned.sampling["max_tokens"] == 12


def test_logit_bias_goes_to_vllm_by_token_id() -> None:
    assert plan(chat(logit_bias={"15": -100, "7": 2.5})).sampling["logit_bias"] == {15: -100.0, 7: 2.5}


@pytest.mark.parametrize("bias", [pytest.param({"x": 1}, id="not-a-token-id"),
                                  pytest.param({"1": 101}, id="out-of-range"),
                                  pytest.param(["1"], id="not-a-map")])
def test_a_bad_logit_bias_is_a_400(bias: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        plan(chat(logit_bias=bias))
    assert info.value.param == "logit_bias"


# --- response_format ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("response_format", "schema", "param"), [
    pytest.param({"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
                 PERSON, "response_format.json_schema.schema", id="json-schema"),
    pytest.param({"type": "json_object"}, {"type": "object"}, "response_format", id="json-object"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "object"}, "response_format",
                 id="name-without-schema"),
])
def test_response_format_is_a_json_schema_for_vllm(response_format: dict[str, Any], schema: dict[str, Any],
                                                   param: str) -> None:
    planned = plan(chat(response_format=response_format))
    assert planned.sampling["structured_outputs"] == {"json": schema}
    assert planned.constraint_param == param


def test_text_response_format_is_unconstrained() -> None:
    assert "structured_outputs" not in plan(chat(response_format={"type": "text"})).sampling


@pytest.mark.parametrize(("response_format", "error", "param"), [
    pytest.param({"type": "json_schema"}, InvalidRequest, "response_format.json_schema", id="no-json-schema"),
    pytest.param({"type": "json_schema", "json_schema": {"schema": PERSON}}, InvalidRequest,
                 "response_format.json_schema", id="no-name"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, InvalidRequest,
                 "response_format.json_schema.schema", id="schema-not-an-object"),
    pytest.param({"type": "yaml"}, UnsupportedParameter, "response_format.type", id="unknown-type"),
    pytest.param("json", InvalidRequest, "response_format", id="not-an-object"),
])
def test_a_bad_response_format_is_a_400_naming_it(response_format: Any, error: type[IIRError],
                                                  param: str) -> None:
    with pytest.raises(error) as info:
        plan(chat(response_format=response_format))
    assert info.value.param == param


# --- tools ----------------------------------------------------------------------------------------------

def call_schema(*names: str) -> dict[str, Any]:
    parameters = {"add": ADD, "get_weather": WEATHER}
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": n}, "arguments": parameters[n]}} for n in names]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


@pytest.mark.parametrize(("tool_choice", "names"), [
    pytest.param("required", ("add", "get_weather"), id="required"),
    pytest.param({"type": "function", "function": {"name": "get_weather"}}, ("get_weather",), id="named"),
])
def test_a_required_call_is_held_to_its_schema_and_tools_go_to_the_template(
        tool_choice: Any, names: tuple[str, ...]) -> None:
    planned = plan(tools_request(tool_choice=tool_choice), template_tools=True)
    assert planned.sampling["structured_outputs"] == {"json": call_schema(*names)}
    assert [t["function"]["name"] for t in planned.tools or []] == list(names)
    assert planned.messages == ASK  # the template describes the tools
    assert planned.tool_use and planned.constraint_param == "tools"


def test_a_template_without_tools_gets_them_in_a_system_message() -> None:
    planned = plan(tools_request(tool_choice="required"), template_tools=False)
    assert planned.tools is None
    assert planned.messages is not None and planned.messages[0]["role"] == "system"
    assert "add: Add two integers" in planned.messages[0]["content"]
    assert planned.messages[1:] == ASK


def test_auto_is_a_call_or_text_in_our_format_whatever_the_template() -> None:
    planned = plan(tools_request(), template_tools=True)
    tag = json.loads(planned.sampling["structured_outputs"]["structural_tag"])
    call, text = tag["format"]["elements"]
    assert tag["type"] == "structural_tag" and tag["format"]["type"] == "or"
    assert call == {"type": "json_schema", "json_schema": call_schema("add", "get_weather")}
    assert text["elements"] == [{"type": "regex", "pattern": r"[^{ \t\n\r]"}, {"type": "any_text"}]
    # The model must write our call format, so it is told that format (not the template's own).
    assert planned.tools is None
    assert planned.messages is not None and "plain text instead" in planned.messages[0]["content"]


def test_tool_choice_none_describes_no_tools() -> None:
    planned = plan(tools_request(tool_choice="none"), template_tools=True)
    assert "structured_outputs" not in planned.sampling
    assert (planned.tools, planned.tool_use, planned.messages) == (None, False, ASK)


@pytest.mark.parametrize(("overrides", "error", "param"), [
    pytest.param({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, InvalidRequest,
                 "tool_choice", id="unknown-name"),
    pytest.param({"tool_choice": "sometimes"}, InvalidRequest, "tool_choice", id="bad-choice"),
    pytest.param({"tools": [{"type": "function"}]}, InvalidRequest, "tools[0]", id="no-function"),
    pytest.param({"response_format": {"type": "json_object"}}, UnsupportedParameter, "response_format",
                 id="with-response-format"),
    pytest.param({"tools": None, "tool_choice": "required"}, InvalidRequest, "tool_choice", id="no-tools"),
    pytest.param({"functions": [{"name": "f"}]}, UnsupportedParameter, "functions", id="functions-api"),
])
def test_bad_tool_requests_are_400s_naming_the_parameter(overrides: dict[str, Any], error: type[IIRError],
                                                         param: str) -> None:
    with pytest.raises(error) as info:
        plan(tools_request(**overrides))
    assert info.value.param == param


CONVERSATION = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": "Weather in Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "21 C and sunny"},
]


def test_tool_turns_go_to_a_template_that_renders_tools_in_its_own_shape() -> None:
    planned = plan(tools_request(messages=CONVERSATION, tool_choice="required"), template_tools=True)
    assert planned.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "21 C and sunny", "tool_call_id": "call_1"},
    ]


def test_tool_turns_are_plain_turns_otherwise() -> None:
    planned = plan(chat(messages=CONVERSATION), template_tools=False)
    assert planned.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
        {"role": "user", "content": "Result of call_1: 21 C and sunny"},
    ]


def test_non_text_content_is_refused() -> None:
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    with pytest.raises(UnsupportedParameter) as info:
        plan(chat(messages=[{"role": "user", "content": image}]))
    assert info.value.param == "messages"


@pytest.mark.parametrize(("template", "expected"), [
    pytest.param("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}", True, id="tools"),
    pytest.param("{% for m in messages %}{{ m.content }}{% endfor %}", False, id="no-tools"),
    pytest.param({"default": "{{ messages }}", "tool_use": "{{ tools }}"}, True, id="named-templates"),
    pytest.param(None, False, id="none"),
])
def test_a_template_renders_tools_when_it_uses_them(template: Any, expected: bool) -> None:
    @dataclass
    class Tokenizer:  # a Hugging Face tokenizer's attribute
        chat_template: Any

    assert renders_tools(Tokenizer(template)) is expected


# --- logprobs -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "expected"), [
    pytest.param({"logprobs": True, "top_logprobs": 3}, 3, id="top-3"),
    pytest.param({"logprobs": True}, 0, id="sampled-token-only"),
    pytest.param({"logprobs": False}, None, id="off"),
    pytest.param({}, None, id="absent"),
])
def test_chat_logprobs_ask_vllm_for_that_many_alternatives(overrides: dict[str, Any],
                                                            expected: int | None) -> None:
    planned = plan(chat(**overrides))
    assert planned.logprobs == expected
    assert planned.sampling.get("logprobs") == expected


def test_completion_logprobs_ask_vllm_for_that_many_alternatives() -> None:
    planned = plan(REQUESTS.completion(logprobs=2))
    assert planned.logprobs == planned.sampling["logprobs"] == 2


@pytest.mark.parametrize(("request_", "param"), [
    pytest.param(lambda: chat(top_logprobs=2), "top_logprobs", id="top-without-logprobs"),
    pytest.param(lambda: chat(logprobs=True, top_logprobs=21), "top_logprobs", id="too-many"),
    pytest.param(lambda: chat(logprobs=3), "logprobs", id="chat-logprobs-not-bool"),
    pytest.param(lambda: REQUESTS.completion(logprobs=6), "logprobs", id="completion-too-many"),
    pytest.param(lambda: REQUESTS.completion(logprobs=1, top_logprobs=1), "top_logprobs",
                 id="completion-top-logprobs"),
    pytest.param(lambda: REQUESTS.completion(logprobs=1, echo=True), "echo", id="echo"),
])
def test_bad_logprobs_are_400s_naming_the_parameter(request_: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        plan(request_())
    assert info.value.param == param


# Two generated tokens, " Paris" (sampled, the likeliest) and "!" (sampled though third), each with the
# two likeliest alternatives: vLLM puts the sampled token first.
TOKENS = [11, 3]
POSITIONS = [
    {11: Logprob(-0.1, 1, " Paris"), 12: Logprob(-2.5, 2, " Lyon")},
    {3: Logprob(-3.0, 3, "!"), 4: Logprob(-0.2, 1, "."), 5: Logprob(-float("inf"), 2, None)},
]


def test_chat_logprobs_list_the_likeliest_alternatives_first() -> None:
    plan_ = Plan(sampling={}, messages=[], logprobs=2)
    result = choice(plan_, chat=True, index=0, text=" Paris!", finish_reason="stop", token_ids=TOKENS,
                    positions=POSITIONS)
    assert result["message"] == {"role": "assistant", "content": " Paris!"}
    content = result["logprobs"]["content"]
    assert [(c["token"], c["logprob"], c["bytes"]) for c in content] == [
        (" Paris", -0.1, list(b" Paris")), ("!", -3.0, [33])]
    assert [(t["token"], t["logprob"]) for t in content[1]["top_logprobs"]] == [(".", -0.2),
                                                                               ("token_id:5", -9999.0)]
    assert [t["token"] for t in content[0]["top_logprobs"]] == [" Paris", " Lyon"]
    assert result["logprobs"]["refusal"] is None


def test_top_logprobs_zero_reports_the_sampled_tokens_alone() -> None:
    plan_ = Plan(sampling={}, messages=[], logprobs=0)
    content = choice(plan_, chat=True, index=0, text=" Paris!", finish_reason="stop", token_ids=TOKENS,
                     positions=POSITIONS)["logprobs"]["content"]
    assert [c["top_logprobs"] for c in content] == [[], []]


def test_completion_logprobs_are_the_legacy_parallel_lists() -> None:
    plan_ = Plan(sampling={}, prompts=["The capital of France is"], logprobs=2)
    result = choice(plan_, chat=False, index=1, text=" Paris!", finish_reason="stop", token_ids=TOKENS,
                    positions=POSITIONS, text_offset=24)
    assert result["index"] == 1 and result["text"] == " Paris!"
    assert result["logprobs"] == {
        "tokens": [" Paris", "!"],
        "token_logprobs": [-0.1, -3.0],
        # The k likeliest and always the sampled one.
        "top_logprobs": [{" Paris": -0.1, " Lyon": -2.5}, {".": -0.2, "token_id:5": -9999.0, "!": -3.0}],
        "text_offset": [24, 30],
    }


def test_no_logprobs_unless_asked() -> None:
    result = choice(Plan(sampling={}, messages=[]), chat=True, index=0, text="hi", finish_reason="stop",
                    token_ids=TOKENS, positions=None)
    assert result["logprobs"] is None


# --- tool calls out -------------------------------------------------------------------------------------

def test_a_call_becomes_tool_calls() -> None:
    plan_ = plan(tools_request(tool_choice="required", logprobs=True))
    result = choice(plan_, chat=True, index=0, text='{"name": "add", "arguments": {"a": 2, "b": 3}}',
                    finish_reason="stop", token_ids=TOKENS, positions=POSITIONS)
    assert result["finish_reason"] == "tool_calls" and result["logprobs"] is None
    [call] = result["message"]["tool_calls"]
    assert result["message"]["content"] is None and call["id"].startswith("call_")
    assert call["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}


def test_text_under_auto_stays_text() -> None:
    result = choice(plan(tools_request()), chat=True, index=0, text="Hello!", finish_reason="stop",
                    token_ids=TOKENS, positions=None)
    assert result["message"] == {"role": "assistant", "content": "Hello!"}
    assert result["finish_reason"] == "stop"


def stream(plan_: Plan, pieces: list[tuple[str, str | None]], *, chat: bool = True) -> list[dict[str, Any]]:
    """Feed one choice's pieces as vLLM does (cumulative text, one token per piece)."""
    choice_stream = ChoiceStream(plan_, 0, chat=chat)
    text, out = "", []
    for i, (piece, finish) in enumerate(pieces, start=1):
        text += piece
        positions = [{token: Logprob(-0.5, 1, p)} for token, (p, _) in enumerate(pieces[:i])]
        out += choice_stream.step(text, list(range(i)), positions if plan_.logprobs is not None else None,
                                  finish)
    return out


CALL_PIECES = [('{"name": "add", ', None), ('"arguments": {"a": 2, ', None), ('"b": 3}}', "stop")]


def test_a_streamed_call_arrives_whole_as_one_tool_calls_delta() -> None:
    chunks = stream(plan(tools_request(tool_choice="required")), CALL_PIECES)
    assert [c["delta"] for c in chunks][0] == {"role": "assistant"}
    [call] = chunks[1]["delta"]["tool_calls"]
    assert call["index"] == 0 and call["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'}
    assert chunks[2] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    assert len(chunks) == 3 and not any(c["delta"].get("content") for c in chunks)


def test_streamed_text_under_auto_flows_with_its_held_logprobs() -> None:
    chunks = stream(plan(tools_request(logprobs=True)), [(" ", None), ("Hi", None), (" there", "stop")])
    assert "".join(c["delta"].get("content", "") for c in chunks) == " Hi there"
    assert [t["token"] for c in chunks if c["logprobs"] for t in c["logprobs"]["content"]] == [
        " ", "Hi", " there"]
    assert chunks[0]["delta"]["role"] == "assistant" and chunks[-1]["finish_reason"] == "stop"


def test_a_call_cut_short_by_max_tokens_is_sent_as_text() -> None:
    chunks = stream(plan(tools_request(tool_choice="required")), [('{"name": "add", ', None),
                                                                   ('"argu', "length")])
    assert "".join(c["delta"].get("content", "") for c in chunks) == '{"name": "add", "argu'
    assert chunks[-1]["finish_reason"] == "length"


def test_a_streamed_chunk_carries_the_logprobs_of_the_tokens_whose_text_it_carries() -> None:
    # The second token has no text yet (vLLM's detokenizer waits for the rest of a character).
    plan_ = Plan(sampling={}, prompts=["x"], logprobs=0)
    chunks = stream(plan_, [("a", None), ("", None), ("bc", None), ("", "length")], chat=False)
    assert [c["text"] for c in chunks] == ["a", "bc", ""]
    assert [c["logprobs"]["tokens"] for c in chunks] == [["a"], ["", "bc"], [""]]
    assert [c["logprobs"]["text_offset"] for c in chunks] == [[0], [1, 1], [3]]
    assert chunks[-1]["finish_reason"] == "length"


# --- vLLM's refusals ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "parameter", "param", "code"), [
    pytest.param("The provided JSON schema contains features not supported by xgrammar.", None,
                 "response_format.json_schema.schema", "invalid_json_schema", id="schema"),
    pytest.param("Invalid grammar specification.", None, "response_format.json_schema.schema",
                 "invalid_json_schema", id="grammar"),
    pytest.param("The decoder prompt (length 9000) is longer than the maximum model length of 2048.", None,
                 "messages", "context_length_exceeded", id="too-long"),
    pytest.param("Requested sample logprobs of 30, which is greater than max allowed: 20", "logprobs",
                 "logprobs", None, id="named"),
])
def test_what_vllm_refuses_is_a_400_naming_the_parameter(message: str, parameter: str | None, param: str,
                                                         code: str | None) -> None:
    schema = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    plan_ = plan(chat(response_format=schema))
    error = refusal(message, parameter, plan_)
    assert isinstance(error, InvalidRequest) and (error.param, error.code) == (param, code)


# --- the structural tag, in xgrammar ----------------------------------------------------------------------

@pytest.mark.parametrize(("answer", "accepted"), [
    pytest.param('{"name": "add", "arguments": {"a": 1, "b": 2}}', True, id="call"),
    pytest.param('{"name":"get_weather","arguments":{"city":"Oslo"}}', True, id="compact-call"),
    pytest.param("Hello {there}", True, id="text"),
    pytest.param('{"name": "sub", "arguments": {}}', False, id="undeclared-function"),
    pytest.param('{"name": "add", "arguments": {"a": 1}}', False, id="missing-argument"),
    pytest.param(' {"name": "add"', False, id="text-hiding-a-call"),
    pytest.param('{"name": "add", "arguments": {"a": 1, "b": 2}} and more', False, id="text-after-a-call"),
])
def test_xgrammar_holds_auto_to_a_call_or_text(answer: str, accepted: bool) -> None:
    xgr = pytest.importorskip("xgrammar")
    tag = plan(tools_request()).sampling["structured_outputs"]["structural_tag"]
    vocab = [chr(c) for c in range(32, 127)] + ["\n", "<eos>"]
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, stop_token_ids=[len(vocab) - 1])
    matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_structural_tag(tag))
    assert (matcher.accept_string(answer) and matcher.accept_token(len(vocab) - 1)) is accepted

