"""Structured outputs on the real SmolLM2 (llama.cpp, CPU): ``response_format: json_schema`` is held by a
grammar while sampling, so every answer parses and validates against the schema, streamed or not."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from serve_app.engines.llama_cpp import LlamaCppEngine
from serve_app.errors import InvalidRequest
from tests.engines.contract import Requests, collect, expect_error, streamed_text, text_of
from tests.engines.local_models import SMOLLM2, needs_llama

pytestmark = needs_llama

CHAT = Requests(model=SMOLLM2.id)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "maxItems": 3,
                    "items": {"type": "string", "enum": ["chess", "music", "hiking", "cooking"]}},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
PROMPTS = [f"Describe {who} as a person record." for who in (
    "a retired sailor", "a young chess champion", "your best friend", "a famous chef", "a mountain guide",
    "a jazz pianist", "a shy student", "a grandmother who loves gardening", "a robot", "a pirate captain",
    "a marathon runner", "a night-shift nurse", "a teenage hacker", "a village baker", "an astronaut",
    "a street musician", "a librarian", "a detective", "a fisherman", "a toddler", "a poet", "a pilot",
    "a farmer", "a wizard")]


def person(text: str) -> dict[str, Any]:
    value = json.loads(text)
    jsonschema.validate(value, PERSON)
    return dict(value)


async def test_every_answer_parses_and_validates(llama: LlamaCppEngine) -> None:
    for prompt in PROMPTS[:16]:
        request = CHAT.chat(max_tokens=120, temperature=0.8,
                            messages=[{"role": "user", "content": prompt}], response_format=FORMAT)
        choice = (await llama.generate(request))["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        person(text_of(choice))


async def test_every_streamed_answer_parses_and_validates(llama: LlamaCppEngine) -> None:
    for prompt in PROMPTS[16:]:
        request = CHAT.chat(max_tokens=120, temperature=0.8, stream=True,
                            messages=[{"role": "user", "content": prompt}], response_format=FORMAT)
        chunks = await collect(llama.stream(request))
        person(streamed_text(chunks))


async def test_a_name_without_a_schema_is_any_json_object(llama: LlamaCppEngine) -> None:
    request = CHAT.chat(max_tokens=40, response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert text_of((await llama.generate(request))["choices"][0]).lstrip().startswith("{")


@pytest.mark.parametrize(("response_format", "param"), [
    pytest.param({"type": "json_schema"}, "response_format.json_schema", id="no-json-schema"),
    pytest.param({"type": "json_schema", "json_schema": {"schema": PERSON}}, "response_format.json_schema",
                 id="no-name"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
                 "response_format.json_schema.schema", id="not-a-schema"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}}}},
                 "response_format.json_schema.schema", id="remote-ref"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"score": {"type": "number", "minimum": 0}}}}},
                 "response_format.json_schema.schema", id="number-minimum"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "integer"}, "uniqueItems": True}}},
                 "response_format.json_schema.schema", id="unique-items"),
    pytest.param({"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 0, "maximum": 10**6}}},
                 "response_format.json_schema.schema", id="huge-integer-range"),
])
async def test_a_schema_llama_cpp_cannot_hold_is_a_400_not_any_json(
        llama: LlamaCppEngine, response_format: dict[str, Any], param: str) -> None:
    await expect_error(llama.generate(CHAT.chat(response_format=response_format)), InvalidRequest, param)
