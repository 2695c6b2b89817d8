"""``/v1/responses`` in-process over real HTTP to a real (fake) upstream, real Redis and SQLite keys:
the translation to chat and back, typed events, stored conversations scoped to their key, the pass-through
to a provider that speaks the API, and the pipeline's steps (cache, limits, metering, auto) applying."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.ingress.gateway import Gateway
from serve_app.routing.classifier import EmbeddingClassifier
from serve_app.settings import Settings
from tests.conftest import write_configs
from tests.ingress.conftest import serving
from tests.support.fake_upstream import FakeUpstream, expected_reply
from tests.support.net import free_port


async def create(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> httpx.Response:
    body.setdefault("model", "fake/echo-chat")
    return await client.post("/v1/responses", headers=headers, json=body)


def output_text(response: dict[str, Any]) -> str:
    return "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"] if part["type"] == "output_text")


def events_of(raw: str) -> list[dict[str, Any]]:
    """Parse typed SSE: each event's ``event:`` line must name its ``type``."""
    events = []
    for block in raw.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        event = json.loads(lines["data"])
        assert lines["event"] == event["type"]
        events.append(event)
    return events


def last_upstream_body(upstream: FakeUpstream, path: str) -> dict[str, Any]:
    body = [r for r in upstream.requests if r.path == path][-1].body
    assert isinstance(body, dict)
    return body


async def new_key(client: httpx.AsyncClient, **extra: Any) -> dict[str, str]:
    r = await client.post("/api/v1/apikeys", json={"description": "responses", **extra})
    assert r.status_code == 201, r.text
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


async def test_a_string_input_is_answered_as_a_response(client: httpx.AsyncClient,
                                                       auth_headers: dict[str, str],
                                                       fake_upstream: FakeUpstream) -> None:
    r = await create(client, auth_headers, input="tell me about rivers", instructions="Be brief.")
    assert r.status_code == 200, r.text
    response = r.json()
    assert response["object"] == "response" and response["id"].startswith("resp_")
    assert response["status"] == "completed" and response["error"] is None
    assert response["model"] == "fake/echo-chat" == r.headers["x-iir-model"]
    assert output_text(response) == expected_reply("tell me about rivers")
    assert response["instructions"] == "Be brief."
    usage = response["usage"]
    assert usage["output_tokens"] == 4 and usage["total_tokens"] == usage["input_tokens"] + 4
    # Translated to chat: the instructions first, as a system message.
    sent = last_upstream_body(fake_upstream, "/v1/chat/completions")
    assert sent["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "tell me about rivers"}]


async def test_max_output_tokens_makes_an_incomplete_response(client: httpx.AsyncClient,
                                                              auth_headers: dict[str, str]) -> None:
    r = await create(client, auth_headers, input="one two three four five", max_output_tokens=2)
    assert r.status_code == 200, r.text
    response = r.json()
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert output_text(response) == "one two"


async def test_a_stream_is_the_responses_typed_events(client: httpx.AsyncClient,
                                                      auth_headers: dict[str, str]) -> None:
    r = await create(client, auth_headers, input="stream these words please", stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text
    events = events_of(r.text)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    ids = {e["response"]["id"] for e in events if "response" in e}
    assert len(ids) == 1
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == expected_reply("stream these words please")
    final = events[-1]["response"]
    assert final["status"] == "completed" and output_text(final) == text
    assert final["model"] == "fake/echo-chat"  # IIR's model id, not the upstream's name for it
    assert final["usage"]["output_tokens"] == 4


async def test_previous_response_id_continues_the_conversation_for_its_key_only(
        client: httpx.AsyncClient, auth_headers: dict[str, str], fake_upstream: FakeUpstream) -> None:
    first = (await create(client, auth_headers, input="my name is Ada", instructions="Say hi.")).json()
    r = await create(client, auth_headers, input=[{"role": "user", "content": "what is my name"}],
                     previous_response_id=first["id"])
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["previous_response_id"] == first["id"]
    # The stored turn (without its instructions, as OpenAI does), its answer, then the new input.
    assert last_upstream_body(fake_upstream, "/v1/chat/completions")["messages"] == [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": [{"type": "text", "text": expected_reply("my name is Ada")}]},
        {"role": "user", "content": "what is my name"}]
    # Streams store too, and chain on.
    streamed = events_of((await create(client, auth_headers, input="and again", stream=True,
                                       previous_response_id=second["id"])).text)[-1]["response"]
    assert streamed["store"] is True
    r = await create(client, auth_headers, input="last", previous_response_id=streamed["id"])
    assert len(last_upstream_body(fake_upstream, "/v1/chat/completions")["messages"]) == 7

    got = await client.get(f"/v1/responses/{first['id']}", headers=auth_headers)
    assert got.status_code == 200 and got.json() == first
    # Another key cannot see, continue or delete it: to that key it does not exist.
    other = await new_key(client)
    assert (await client.get(f"/v1/responses/{first['id']}", headers=other)).status_code == 404
    r = await create(client, other, input="hi", previous_response_id=first["id"])
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "previous_response_not_found"
    assert r.json()["error"]["param"] == "previous_response_id"
    assert (await client.delete(f"/v1/responses/{first['id']}", headers=other)).status_code == 404
    deleted = await client.delete(f"/v1/responses/{first['id']}", headers=auth_headers)
    assert deleted.json() == {"id": first["id"], "object": "response", "deleted": True}
    assert (await client.get(f"/v1/responses/{first['id']}", headers=auth_headers)).status_code == 404


async def test_input_items_list_what_a_response_answered(client: httpx.AsyncClient,
                                                         auth_headers: dict[str, str]) -> None:
    first = (await create(client, auth_headers, input="one")).json()
    second = (await create(client, auth_headers, input=[{"role": "user", "content": "two"}],
                           previous_response_id=first["id"])).json()
    url = f"/v1/responses/{second['id']}/input_items"
    page = (await client.get(url, headers=auth_headers, params={"order": "asc"})).json()
    assert [(i["type"], i["role"], i["content"][0]["text"]) for i in page["data"]] == [
        ("message", "user", "one"), ("message", "assistant", expected_reply("one")),
        ("message", "user", "two")]
    ids = [i["id"] for i in page["data"]]
    assert len(set(ids)) == 3
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[0], ids[2], False)
    newest = (await client.get(url, headers=auth_headers, params={"limit": 2})).json()  # desc by default
    assert [i["id"] for i in newest["data"]] == ids[:0:-1] and newest["has_more"] is True
    after = {"limit": 2, "after": newest["last_id"]}
    rest = (await client.get(url, headers=auth_headers, params=after)).json()
    assert [i["id"] for i in rest["data"]] == ids[:1] and rest["has_more"] is False
    assert (await client.get(url, headers=await new_key(client))).status_code == 404
    bad = await client.get(url, headers=auth_headers, params={"limit": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


async def test_store_false_is_not_kept(client: httpx.AsyncClient, auth_headers: dict[str, str]) -> None:
    response = (await create(client, auth_headers, input="forget me", store=False)).json()
    assert response["store"] is False
    assert (await client.get(f"/v1/responses/{response['id']}", headers=auth_headers)).status_code == 404
    r = await create(client, auth_headers, input="hi", previous_response_id=response["id"])
    assert r.status_code == 400


async def test_function_tools_and_calls_translate_both_ways(client: httpx.AsyncClient,
                                                            auth_headers: dict[str, str],
                                                            fake_upstream: FakeUpstream) -> None:
    tool = {"type": "function", "name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    items = [{"role": "user", "content": [{"type": "input_text", "text": "weather in Paris"}]},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather",
              "arguments": '{"city":"Paris"}'},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
             {"role": "user", "content": "so what is it"}]
    r = await create(client, auth_headers, input=items, tools=[tool],
                     tool_choice={"type": "function", "name": "get_weather"},
                     text={"format": {"type": "json_schema", "name": "w",
                                      "schema": {"type": "object", "properties": {}}}})
    assert r.status_code == 200, r.text
    sent = last_upstream_body(fake_upstream, "/v1/chat/completions")
    assert sent["tools"] == [{"type": "function", "function": {k: tool[k] for k in
                                                                ("name", "description", "parameters")}}]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object", "properties": {}}}}
    assert sent["messages"][1:3] == [
        {"role": "assistant", "tool_calls": [  # content null, left out as nulls are upstream
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    assert r.json()["tools"] == [tool]


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [{"type": "web_search_call", "id": "ws_1"}]}, "input[0].type"),
    ({"input": [{"role": "wizard", "content": "hi"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": []}, "input"),
    ({"input": "hi", "text": {"format": {"type": "json_schema"}}}, "text.format"),
    ({"input": "hi", "metadata": {str(i): "x" for i in range(17)}}, "metadata"),
    ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "hi", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({}, "input"),
])
async def test_bad_requests_are_400s_naming_the_parameter(client: httpx.AsyncClient,
                                                          auth_headers: dict[str, str],
                                                          body: dict[str, Any], param: str) -> None:
    r = await create(client, auth_headers, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_a_provider_that_speaks_the_api_gets_the_request_as_it_came(
        client: httpx.AsyncClient, auth_headers: dict[str, str], fake_upstream: FakeUpstream) -> None:
    first = (await create(client, auth_headers, model="fake/echo-responses", input="pass me through",
                          tools=[{"type": "web_search"}], metadata={"k": "v"})).json()
    assert first["served_by"] == "responses-api"  # the provider's own response, fields and all
    assert first["id"].startswith("resp_") and "fake" not in first["id"]  # with IIR's id
    assert output_text(first) == expected_reply("pass me through")
    sent = last_upstream_body(fake_upstream, "/v1/responses")
    assert sent["tools"] == [{"type": "web_search"}] and sent["model"] == "echo-1"
    assert sent["store"] is False  # IIR keeps the conversation
    # Continued through IIR's store: the provider is sent the whole conversation.
    r = await create(client, auth_headers, model="fake/echo-responses", input="and more", stream=True,
                     previous_response_id=first["id"])
    events = events_of(r.text)
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "response.completed"
    assert {e["response"]["id"] for e in events if "response" in e} == {events[0]["response"]["id"]}
    assert events[-1]["response"]["served_by"] == "responses-api"
    sent = last_upstream_body(fake_upstream, "/v1/responses")
    assert "previous_response_id" not in sent
    assert [i.get("role") for i in sent["input"]] == ["user", "assistant", "user"]
    # And on, on a model that is translated: the conversation is IIR's, not the provider's.
    r = await create(client, auth_headers, input="switch models",
                     previous_response_id=events[-1]["response"]["id"])
    assert r.status_code == 200, r.text
    assert len(last_upstream_body(fake_upstream, "/v1/chat/completions")["messages"]) == 5


async def test_the_pipeline_applies_cache_auto_limits_and_metering(
        gateway: Gateway, client: httpx.AsyncClient, auth_headers: dict[str, str],
        fake_upstream: FakeUpstream) -> None:
    marker = uuid.uuid4().hex
    first = await create(client, auth_headers, input=f"cache me {marker}", temperature=0)
    assert first.headers["x-iir-cache"] == "miss"
    assert gateway.cache is not None
    await gateway.cache.flush()
    second = await create(client, auth_headers, input=f"cache me {marker}", temperature=0)
    assert second.headers["x-iir-cache"] == "hit"
    assert output_text(second.json()) == output_text(first.json())
    assert second.json()["id"] != first.json()["id"]  # a hit is a new response, stored on its own
    assert (await client.get(f"/v1/responses/{second.json()['id']}", headers=auth_headers)).status_code == 200
    # The chat endpoint's cache is its own: the same conversation as chat is a miss.
    chat = await client.post("/v1/chat/completions", headers=auth_headers, json={
        "model": "fake/echo-chat", "temperature": 0,
        "messages": [{"role": "user", "content": f"cache me {marker}"}]})
    assert chat.headers["x-iir-cache"] == "miss"

    auto = await create(client, auth_headers, model="auto", input="def parse(s): return int(s)  # python")
    assert auto.status_code == 200, auto.text
    assert auto.json()["model"] == auto.headers["x-iir-model"] == "fake/echo-code"

    limited = await new_key(client, rate_limit={"requests_per_minute": 1})
    assert (await create(client, limited, input="one")).status_code == 200
    refused = await create(client, limited, input="two")
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"

    metered = await client.post("/api/v1/apikeys", json={"description": "metered"})
    key = metered.json()
    headers = {"Authorization": f"Bearer {key['api_key']}"}
    await create(client, headers, input="count these five words")
    await create(client, headers, model="fake/echo-responses", input="and these three")
    await create(client, headers, input="streamed two", stream=True)
    await gateway.usage.flush()
    usage = (await client.get(f"/api/v1/apikeys/{key['id']}/usage", headers=headers)).json()
    assert usage["requests"] == 3
    assert usage["completion_tokens"] == 4 + 3 + 2
    assert usage["prompt_tokens"] > 0


async def test_no_key_no_response(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/responses", json={"model": "fake/echo-chat", "input": "hi"})
    assert r.status_code == 401
    assert (await client.get("/v1/responses/resp_x")).status_code == 401


@pytest.mark.parametrize("backend", ["redis", "memory"])
async def test_the_store_without_redis(tmp_path: Path, fake_upstream: FakeUpstream,
                                       prompt_classifier: EmbeddingClassifier,
                                       monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Redis away: with the Redis store a response is still answered, says it was not stored, and
    continuing it is a 503 to retry (not an answer without its context); the in-process store keeps
    conversations without Redis."""
    monkeypatch.setenv("IIR_TEST_UPSTREAM_KEY", str(fake_upstream.api_key))
    configs = write_configs(tmp_path, fake_upstream.base_url, local=False)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'keys.db'}",
                        redis_url=f"redis://127.0.0.1:{free_port()}/0", responses_backend=backend, **configs)
    async with serving(settings, prompt_classifier) as (_, client):
        headers = await new_key(client)
        first = await create(client, headers, input="remember me")
        assert first.status_code == 200, first.text
        assert first.json()["store"] is (backend == "memory")
        again = await create(client, headers, input="and now", previous_response_id=first.json()["id"])
        if backend == "memory":
            assert again.status_code == 200, again.text
        else:
            assert again.status_code == 503
            assert again.json()["error"]["code"] == "response_store_unavailable"
            assert again.headers["retry-after"] == "5"
