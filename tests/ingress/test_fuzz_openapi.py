"""The model routes' OpenAPI schema, fuzzed with schemathesis: whatever the body, no 5xx and no hang.

Each operation gets a fixed number of generated requests (Hypothesis, derandomized, so CI replays the same
ones), positive (bodies the schema allows, with arbitrary extra fields, which ``extra="allow"`` passes to
the upstream) and negative (bodies it does not, and bytes that are not JSON). Every request carries a
real key, and some fields are steered towards real values (the configured model ids, a stored response's
id, well-formed tools, formats and items) so bodies get past the 404s to the translation, the pipeline
and the fake upstream. The checks: no status >= 500, no stream that ends in a server-side error event,
and every 4xx is OpenAI's ``{"error": {"message", "type", "param", "code"}}``. Our OpenAPI declares no
response bodies, so schemathesis' conformance checks are not run.

The app is the one tests/ingress/conftest.py's ``client`` serves, inside its lifespan on the test's event
loop, where the gateway's Redis and HTTP clients live. schemathesis' own ASGI transport (Starlette's
TestClient) would run the app on a loop of its own, so Hypothesis runs in a worker thread and hands each
request to the test's loop, with a timeout that turns a hang into a failure naming the request.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, CheckContext, CheckFunction, GenerationMode, Response
from schemathesis.checks import not_a_server_error

from tests.support.fake_upstream import FakeUpstream

REQUEST_TIMEOUT_S = 10.0  # the fake upstream answers in milliseconds: a request this slow is stuck
MODELS = ("fake/echo-chat", "fake/echo-code", "fake/echo-faq", "fake/echo-responses", "fake/echo-embed",
          "fake/musicgen", "auto")
SERVER_ERROR_TYPES = {"server_error", "upstream_error", "service_unavailable"}

POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE


@dataclass(frozen=True)
class Target:
    method: str
    path: str
    examples: dict[GenerationMode, int]


TARGETS = [
    pytest.param(Target("POST", "/v1/responses", {POSITIVE: 80, NEGATIVE: 20}), id="create-response"),
    pytest.param(Target("GET", "/v1/responses/{response_id}", {POSITIVE: 60}), id="get-response"),
    pytest.param(Target("DELETE", "/v1/responses/{response_id}", {POSITIVE: 60}), id="delete-response"),
    pytest.param(Target("POST", "/v1/chat/completions", {POSITIVE: 80, NEGATIVE: 20}), id="chat"),
    pytest.param(Target("POST", "/v1/completions", {POSITIVE: 80, NEGATIVE: 20}), id="completions"),
    pytest.param(Target("POST", "/v1/embeddings", {POSITIVE: 80, NEGATIVE: 20}), id="embeddings"),
]

# --- steering: well-formed pieces mixed into generated bodies -----------------------------------------

_text = st.text(max_size=24)
_json = st.recursive(st.none() | st.booleans() | st.integers() | _text,
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                     max_leaves=8)
_json_schema = st.sampled_from([
    {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
    {"type": "array", "items": {"type": "integer"}},
    {"type": "object", "additionalProperties": False},
]) | st.dictionaries(_text, _json, max_size=3)
_name = st.sampled_from(["get_weather", "lookup", ""]) | _text


def _optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Each field present or not, and mostly a configured model: the rest of the body stays the
    generator's (a generated model id is only ever a 404)."""
    model = st.sampled_from([*MODELS, None]).map(lambda m: {} if m is None else {"model": m})
    return st.builds(lambda a, b: a | b, model, st.fixed_dictionaries({}, optional=fields))


def _chat_overlay() -> st.SearchStrategy[dict[str, Any]]:
    message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "tool"]),
                                     "content": _text | st.lists(st.fixed_dictionaries(
                                         {"type": st.just("text"), "text": _text}), max_size=2)})
    tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
        {"name": _name}, optional={"description": _text, "parameters": _json_schema})}) | _json
    response_format = st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | st.fixed_dictionaries(
        {"type": st.just("json_schema"), "json_schema": st.fixed_dictionaries(
            {"name": _name}, optional={"schema": _json_schema, "strict": st.booleans()})}) | _json
    return _optional(messages=st.lists(message, min_size=1, max_size=3),
                     tools=st.lists(tool, max_size=2) | _json, response_format=response_format,
                     tool_choice=st.sampled_from(["none", "auto", "required"]) | st.fixed_dictionaries(
                         {"type": st.just("function"), "function": st.fixed_dictionaries({"name": _name})}))


def _responses_overlay(stored: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    part = st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "refusal"]),
                                  "text": _text})
    item = (st.fixed_dictionaries({"type": st.just("message"),
                                   "role": st.sampled_from(["user", "system", "developer", "assistant"]),
                                   "content": _text | st.lists(part, max_size=2)})
            | st.fixed_dictionaries({"type": st.just("function_call"), "call_id": _text, "name": _name,
                                     "arguments": _text})
            | st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": _text,
                                     "output": _text}))
    tool = st.fixed_dictionaries({"type": st.just("function"), "name": _name},
                                 optional={"parameters": _json_schema, "strict": st.booleans()}) | _json
    fmt = st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema"])},
                                optional={"name": _name, "schema": _json_schema, "strict": st.booleans()})
    return _optional(input=_text | st.lists(item, min_size=1, max_size=3),
                     tools=st.lists(tool, max_size=2), text=st.fixed_dictionaries({"format": fmt}),
                     previous_response_id=st.sampled_from(stored), stream=st.booleans(),
                     include=st.just(["message.output_text.logprobs"]))


def _steered(target: Target, mode: GenerationMode, operation: APIOperation, stored: list[str]
             ) -> st.SearchStrategy[Case]:
    cases: st.SearchStrategy[Case] = operation.as_strategy(mode)
    if target.method != "POST":
        return st.tuples(cases, st.none() | st.sampled_from(stored)).map(lambda pair: _with_id(*pair))
    if mode is NEGATIVE:
        return cases  # invalid as generated: schema validation answers before the model matters
    overlay = {"/v1/responses": _responses_overlay(stored), "/v1/chat/completions": _chat_overlay()}.get(
        target.path, _optional())
    return st.tuples(cases, overlay).map(lambda pair: _with_body(*pair))


def _with_id(case: Case, response_id: str | None) -> Case:
    if response_id is not None:
        case.path_parameters = {**case.path_parameters, "response_id": response_id}
    return case


def _with_body(case: Case, overlay: dict[str, Any]) -> Case:
    if isinstance(case.body, dict):
        case.body = {**case.body, **overlay}
    return case


# --- checks ---------------------------------------------------------------------------------------

def openai_error_shape(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    if not 400 <= response.status_code < 500:
        return None
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error"}, f"not an OpenAI error body: {body!r}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str), error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return None


def no_server_error_in_stream(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """A stream fails after its 200 with an error event: a 5xx in all but status."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return None
    for line in response.text.splitlines():
        if not line.startswith("data: {"):
            continue
        error = json.loads(line.removeprefix("data: ")).get("error")
        assert not (isinstance(error, dict) and error.get("type") in SERVER_ERROR_TYPES), \
            f"the stream ended in a server-side error: {error!r}"
    return None


CHECKS: list[CheckFunction] = [not_a_server_error, openai_error_shape, no_server_error_in_stream]
# A failure's curl reproducer hides the key, and only the key: by default any field whose name holds
# "token" is hidden too, max_tokens included.
CONFIG = schemathesis.Config.from_dict({"output": {"sanitization": {
    "keys-to-sanitize": ["authorization"], "sensitive-markers": ["authorization"]}}})

# --- the run --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _own_cooldowns(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cooldowns are shared through Redis (serve_app/routing/health.py): a model that another test, or
    another run on this Redis, failed on purpose would be cooling down here, a 503 that is not ours.
    Set before the ``gateway`` fixture builds its Settings."""
    monkeypatch.setenv("IIR_COOLDOWN_KEY_PREFIX", f"iir-test:{uuid.uuid4().hex}:cooldown:")


class _Hung(BaseException):
    """A request got no answer. Not an ``Exception``, so Hypothesis stops at once instead of shrinking:
    each try would cost the whole timeout while whatever is stuck still holds the loop or the upstream."""


async def _send(client: httpx.AsyncClient, case: Case, headers: dict[str, str]) -> httpx.Response:
    kwargs = case.as_transport_kwargs(base_url=str(client.base_url), headers=headers)
    return await client.request(kwargs["method"], kwargs["url"], headers=kwargs["headers"],
                                params=kwargs.get("params"), json=kwargs.get("json"),
                                content=kwargs.get("data"))


def _fuzz(strategy: st.SearchStrategy[Case], examples: int, client: httpx.AsyncClient,
          headers: dict[str, str], loop: asyncio.AbstractEventLoop, statuses: Counter[int]) -> None:
    """Runs in a worker thread; each request runs on ``loop``, the app's."""

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much, HealthCheck.large_base_example])
    @given(case=strategy)
    def one(case: Case) -> None:
        future = asyncio.run_coroutine_threadsafe(_send(client, case, headers), loop)
        try:
            response = future.result(timeout=REQUEST_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            raise _Hung(f"no answer in {REQUEST_TIMEOUT_S:.0f} s:\n{case.as_curl_command(headers=headers)}"
                        ) from None
        statuses[response.status_code] += 1
        case.validate_response(response, checks=CHECKS, headers=headers)

    one()


async def _stored_responses(client: httpx.AsyncClient, headers: dict[str, str]) -> list[str]:
    """Ids a generated request may name: a translated response with a tool call in its conversation,
    and one from the provider that speaks the Responses API."""
    bodies = [{"model": "fake/echo-chat", "input": [
                  {"type": "message", "role": "user", "content": "what is the weather"},
                  {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]},
              {"model": "fake/echo-responses", "input": "tell me about rivers"}]
    ids = []
    for body in bodies:
        r = await client.post("/v1/responses", headers=headers, json=body)
        assert r.status_code == 200, r.text
        ids.append(str(r.json()["id"]))
    return ids


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target", TARGETS)
async def test_no_generated_request_gets_a_server_error(target: Target, client: httpx.AsyncClient,
                                                        auth_headers: dict[str, str],
                                                        fake_upstream: FakeUpstream) -> None:
    fake_upstream.reset()  # faults another test left queued would be the upstream's 5xx, not ours
    schema = schemathesis.openapi.from_dict((await client.get("/openapi.json")).json(), config=CONFIG)
    operation = schema[target.path][target.method]
    stored = await _stored_responses(client, auth_headers)
    statuses: Counter[int] = Counter()
    loop = asyncio.get_running_loop()
    for mode, examples in target.examples.items():
        strategy = _steered(target, mode, operation, stored)
        try:
            await asyncio.to_thread(_fuzz, strategy, examples, client, auth_headers, loop, statuses)
        except _Hung as hung:
            pytest.fail(str(hung), pytrace=False)
    # The steering works: some requests got past validation to the pipeline (and, for GET, to a stored
    # response), not only 400s and 404s.
    assert statuses[200] > 0, statuses
