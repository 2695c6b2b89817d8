"""The official ``openai`` Python SDK, unmodified, against the graph."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel

from tests.e2e.conftest import Graph
from tests.support.fake_upstream import FakeUpstream


@pytest.fixture(scope="module")
def client(graph: Graph, admin_headers: dict[str, str]) -> OpenAI:
    api_key = admin_headers["Authorization"].removeprefix("Bearer ")
    return OpenAI(base_url=f"{graph.base_url}/v1", api_key=api_key, max_retries=0)


@pytest.mark.parametrize("model", [pytest.param("local/smollm2-135m", id="local"),
                                   pytest.param("fake/echo-chat", id="remote")])
def test_chat_non_streaming(client: OpenAI, model: str) -> None:
    resp = client.chat.completions.create(model=model, max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": "Say hi to Ada"}])
    assert resp.model == model
    assert resp.choices[0].message.role == "assistant" and resp.choices[0].message.content
    assert resp.usage is not None and resp.usage.completion_tokens <= 12


@pytest.mark.parametrize("model", [pytest.param("local/smollm2-135m", id="local"),
                                   pytest.param("fake/echo-chat", id="remote")])
def test_chat_streaming_with_usage(client: OpenAI, model: str) -> None:
    stream = client.chat.completions.create(model=model, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Count to three"}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert all(c.model == model for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


def test_stream_matches_non_stream_at_temperature_zero(client: OpenAI) -> None:
    kwargs = {"model": "local/smollm2-135m", "max_tokens": 10, "temperature": 0, "seed": 7,
              "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        stream=True, **kwargs) if c.choices)
    assert streamed == whole


def test_models_list(client: OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"local/smollm2-135m", "local/minilm-l6-v2", "fake/echo-chat"} <= ids


@pytest.mark.parametrize("model", [pytest.param("local/minilm-l6-v2", id="local"),
                                   pytest.param("fake/echo-embed", id="remote")])
def test_embeddings_create(client: OpenAI, model: str) -> None:
    resp = client.embeddings.create(model=model, input=["first text", "second text"])
    assert [d.index for d in resp.data] == [0, 1]
    assert len(resp.data[0].embedding) == len(resp.data[1].embedding) > 0
    assert resp.model == model


def test_completions(client: OpenAI) -> None:
    resp = client.completions.create(model="local/smollm2-135m", prompt="The sky is", max_tokens=5,
                                     temperature=0)
    assert resp.object == "text_completion" and resp.choices[0].text


def test_errors_surface_as_sdk_exceptions(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody/none", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="local/smollm2-135m", temperature=9,
                                       messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]


def test_a_group_of_a_provider_and_a_local_replica_fails_over(client: OpenAI,
                                                              fake_upstream: FakeUpstream) -> None:
    """Through the real graph: the provider answers; when it fails, the local replica (one Serve hop)
    does, on the same request, and the response says so."""
    asked = {"model": "mixed", "max_tokens": 4, "messages": [{"role": "user", "content": "Say hi"}]}
    raw = client.chat.completions.with_raw_response.create(**asked)  # type: ignore[call-overload]
    assert raw.headers["x-iir-model"] == "fake/echo-chat" and raw.headers["x-iir-attempts"] == "1"
    fake_upstream.fail_next(500, "provider down")
    raw = client.chat.completions.with_raw_response.create(**asked)  # type: ignore[call-overload]
    assert raw.headers["x-iir-model"] == "local/smollm2-135m" and raw.headers["x-iir-attempts"] == "2"
    assert "x-iir-fallback" not in raw.headers and raw.parse().model == "local/smollm2-135m"
    assert "mixed" in [m.id for m in client.models.list()]


class City(BaseModel):
    """What ``client.beta.chat.completions.parse`` / ``response_format=City`` sends as a strict schema."""

    name: str
    population: int
    coastal: bool


@pytest.mark.parametrize("stream", [pytest.param(False, id="whole"), pytest.param(True, id="streamed")])
def test_structured_output_from_the_local_model_parses_with_the_sdk(client: OpenAI, stream: bool) -> None:
    """``response_format: json_schema`` on the local model is held by a grammar: the SDK's own parser
    (pydantic, strict schema) accepts the answer, whole or streamed."""
    messages = [{"role": "user", "content": "Tell me about Lisbon as a record."}]
    if not stream:
        parsed = client.beta.chat.completions.parse(model="local/smollm2-135m", max_tokens=80, temperature=0,
                                                    messages=messages, response_format=City)
        city = parsed.choices[0].message.parsed
    else:
        with client.beta.chat.completions.stream(model="local/smollm2-135m", max_tokens=80, temperature=0,
                                                 messages=messages, response_format=City) as events:
            city = events.get_final_completion().choices[0].message.parsed
    assert isinstance(city, City)  # parsed and validated by the SDK itself (the content is the model's)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 40}}}}}


@pytest.mark.parametrize("stream", [pytest.param(False, id="whole"), pytest.param(True, id="streamed")])
def test_tool_call_from_the_local_model_with_the_sdk(client: OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": "local/smollm2-135m", "max_tokens": 60, "temperature": 0,
                              "tools": [WEATHER_TOOL], "tool_choice": "required",
                              "messages": [{"role": "user", "content": "What's the weather in Oslo?"}]}
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]  # type: ignore[index]
        name, arguments = call.function.name, call.function.arguments
    else:
        with client.beta.chat.completions.stream(**kwargs) as events:
            final = events.get_final_completion().choices[0]
        assert final.finish_reason == "tool_calls"
        call = final.message.tool_calls[0]  # type: ignore[index]
        name, arguments = call.function.name, call.function.arguments
    assert name == "get_weather" and isinstance(json.loads(arguments)["city"], str)


# --- the Responses API (client.responses) --------------------------------------------------------

@pytest.mark.parametrize("model", [pytest.param("local/smollm2-135m", id="local"),
                                   pytest.param("fake/echo-chat", id="remote"),
                                   pytest.param("fake/echo-responses", id="pass-through")])
def test_responses_create_and_continue(client: OpenAI, model: str) -> None:
    first = client.responses.create(model=model, input="Say hi to Ada", instructions="Be brief.",
                                    max_output_tokens=16, temperature=0)
    assert first.object == "response" and first.model == model
    assert first.status in ("completed", "incomplete") and first.output_text.strip()
    assert first.usage is not None and 0 < first.usage.output_tokens <= 16
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    second = client.responses.create(model=model, previous_response_id=first.id, max_output_tokens=8,
                                     input=[{"role": "user", "content": "Again"}])
    assert second.previous_response_id == first.id and second.output_text.strip()
    # The second turn carried the first: more input tokens than its own words.
    assert second.usage is not None and second.usage.input_tokens > first.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    items = client.responses.input_items.list(second.id, order="asc").data
    assert [item.role for item in items] == ["user", "assistant", "user"]  # type: ignore[union-attr]
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


@pytest.mark.parametrize("model", [pytest.param("local/smollm2-135m", id="local"),
                                   pytest.param("fake/echo-chat", id="remote"),
                                   pytest.param("fake/echo-responses", id="pass-through")])
def test_responses_stream_with_the_sdk_helper(client: OpenAI, model: str) -> None:
    """``client.responses.stream`` checks the event protocol as it accumulates (created first, items
    added before their deltas, one response id) and gives the final response."""
    # Room to finish: a stream cut by max_output_tokens ends in response.incomplete, which the SDK's
    # get_final_response() refuses, as it does OpenAI's.
    with client.responses.stream(model=model, input="What is 2+2? Answer with a number.",
                                 max_output_tokens=64, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.output_text.strip()
    assert final.usage is not None and final.usage.output_tokens > 0
    raw = list(client.responses.create(model=model, input="Count to three", max_output_tokens=12,
                                       temperature=0, stream=True))
    assert raw[0].type == "response.created" and raw[-1].type in ("response.completed",
                                                                  "response.incomplete")
    assert [e.sequence_number for e in raw] == list(range(len(raw)))


@pytest.mark.parametrize("stream", [pytest.param(False, id="whole"), pytest.param(True, id="streamed")])
def test_responses_structured_output_from_the_local_model(client: OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": "local/smollm2-135m", "max_output_tokens": 80, "temperature": 0,
                              "input": "Tell me about Lisbon as a record.", "text_format": City}
    if not stream:
        city = client.responses.parse(**kwargs).output_parsed
    else:
        with client.responses.stream(**kwargs) as events:
            city = events.get_final_response().output_parsed
    assert isinstance(city, City)  # parsed and validated by the SDK (strict schema)


@pytest.mark.parametrize("stream", [pytest.param(False, id="whole"), pytest.param(True, id="streamed")])
def test_responses_function_call_from_the_local_model(client: OpenAI, stream: bool) -> None:
    function = {"type": "function", **WEATHER_TOOL["function"]}  # type: ignore[dict-item]
    kwargs: dict[str, Any] = {"model": "local/smollm2-135m", "max_output_tokens": 60, "temperature": 0,
                              "tools": [function], "tool_choice": "required",
                              "input": "What's the weather in Oslo?"}
    if not stream:
        response = client.responses.create(**kwargs)
    else:
        with client.responses.stream(**kwargs) as events:
            response = events.get_final_response()
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert isinstance(json.loads(calls[0].arguments)["city"], str)
    # The call's result goes back as an item; the model answers in text.
    answer = client.responses.create(
        model="local/smollm2-135m", previous_response_id=response.id, max_output_tokens=20, tools=[function],
        tool_choice="none",
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 18 C"}])
    assert answer.output_text.strip() and not [i for i in answer.output if i.type == "function_call"]


def test_logprobs_from_the_local_model_chat_and_responses(client: OpenAI) -> None:
    """Part 4: the local model's log probabilities, token for token with its text, through both APIs."""
    choice = client.chat.completions.create(
        model="local/smollm2-135m", max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
        messages=[{"role": "user", "content": "What is 2+2? Answer with a number."}]).choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 for t in tokens)
    response = client.responses.create(model="local/smollm2-135m", max_output_tokens=8, temperature=0,
                                       top_logprobs=3, include=["message.output_text.logprobs"],
                                       input="What is 2+2? Answer with a number.")
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.type == "output_text" and part.logprobs
    assert "".join(t.token for t in part.logprobs) == part.text == choice.message.content
    # Elsewhere, a clear 400 naming the parameter.
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="local/smollm2-135m", logprobs=True, top_logprobs=21,
                                       messages=[{"role": "user", "content": "x"}])
    assert bad.value.body["param"] == "top_logprobs"  # type: ignore[index]
