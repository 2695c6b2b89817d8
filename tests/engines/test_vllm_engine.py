"""The vLLM engine against the same contract as the CPU engines, and its structured outputs, tool calls
and logprobs (their translation runs anywhere: test_vllm_requests.py). GPU only.

Runs where vLLM is installed (``pip install .[gpu]``), CUDA is visible and ``IIR_TEST_VLLM_MODEL``
names a local Hugging Face model folder (no hub is reachable from the test machines). Skips elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import pytest

from serve_app.errors import InvalidRequest
from serve_app.registry.catalog import ModelSpec
from tests.engines import contract

pytestmark = pytest.mark.gpu

MODEL_PATH = os.environ.get("IIR_TEST_VLLM_MODEL", "")


def _missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install .[gpu])"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if not MODEL_PATH:
        return "IIR_TEST_VLLM_MODEL does not name a local model folder"
    return None


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[object]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from serve_app.engines.vllm_engine import VLLMEngine

    spec = ModelSpec(id="local/vllm-test", engine="vllm", task="chat", source=MODEL_PATH,
                     engine_options={"gpu_memory_utilization": 0.5, "max_model_len": 2048},
                     resources={"num_gpus": 1})
    vllm_engine = VLLMEngine.from_spec(spec)
    yield vllm_engine
    await vllm_engine.aclose()


@pytest.mark.parametrize("check", contract.CORE_GENERATION_CHECKS + [contract.check_n_choices])
async def test_contract(engine: object, check: contract.Check) -> None:
    await check(engine, contract.Requests(model="local/vllm-test"))  # type: ignore[arg-type]


# --- structured outputs, tool calls and logprobs (serve_app/engines/vllm_requests.py) --------------------

REQUESTS = contract.Requests(model="local/vllm-test")
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": ADD}}]


def ask(question: str, **overrides: Any) -> Any:
    return REQUESTS.chat(**{"max_tokens": 80, "messages": [{"role": "user", "content": question}],
                            **overrides})


async def test_json_schema_answers_validate(engine: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for stream in (False, True):
        request = ask("Describe a retired sailor as a person record.", response_format=fmt, stream=stream,
                      temperature=0.8)
        if stream:
            text = contract.streamed_text(await contract.collect(engine.stream(request)))
        else:
            text = contract.text_of((await engine.generate(request))["choices"][0])
        jsonschema.validate(json.loads(text), PERSON)


async def test_a_schema_vllm_cannot_hold_is_a_400(engine: Any) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    await contract.expect_error(engine.generate(ask("hi", response_format=fmt)), InvalidRequest,
                                "response_format.json_schema.schema")


async def test_a_required_call_is_valid_whole_or_streamed(engine: Any) -> None:
    request = ask("What is 2 plus 3?", tools=TOOLS, tool_choice="required")
    choice = (await engine.generate(request))["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), ADD)
    chunks = await contract.collect(engine.stream(ask("Add 40 and 2.", tools=TOOLS, tool_choice="required",
                                                      stream=True)))
    calls = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", [])]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "add"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_auto_gives_text_or_a_valid_call(engine: Any) -> None:
    message = (await engine.generate(ask("What is 2 plus 3?", tools=TOOLS)))["choices"][0]["message"]
    if message.get("tool_calls"):
        jsonschema.validate(json.loads(message["tool_calls"][0]["function"]["arguments"]), ADD)
    else:
        assert message["content"] and not message["content"].lstrip().startswith("{")


async def test_logprobs_cover_every_generated_token(engine: Any) -> None:
    result = await engine.generate(ask("Say hello.", max_tokens=8, logprobs=True, top_logprobs=3))
    content = result["choices"][0]["logprobs"]["content"]
    assert len(content) == result["usage"]["completion_tokens"]
    assert all(len(t["top_logprobs"]) == 3 and t["logprob"] <= 0 for t in content)
    completion = await engine.generate(REQUESTS.completion(max_tokens=5, logprobs=2))
    legacy = completion["choices"][0]["logprobs"]
    assert len(legacy["tokens"]) == len(legacy["token_logprobs"]) == completion["usage"]["completion_tokens"]
    assert all(2 <= len(top) <= 3 for top in legacy["top_logprobs"])
