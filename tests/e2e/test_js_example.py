"""The JavaScript example under examples/ runs unmodified against the graph (Node 20 fetch)."""

from __future__ import annotations

import json
import os
import subprocess

from tests.e2e.conftest import REPO, Graph


def test_node_fetch_example(graph: Graph) -> None:
    env = {**os.environ, "IIR_BASE_URL": graph.base_url}
    done = subprocess.run(["node", str(REPO / "examples" / "node_fetch.mjs")], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["priority"] == 3
    assert "local/smollm2-135m" in result["models"]
    assert result["chat"].strip() and result["streamed"].strip() and result["sawDone"] is True
    assert result["embeddingLength"] == 384


def test_openai_js_sdk_example(graph: Graph, admin_headers: dict[str, str]) -> None:
    env = {**os.environ, "IIR_BASE_URL": graph.base_url,
           "IIR_API_KEY": admin_headers["Authorization"].removeprefix("Bearer "),
           "IIR_REMOTE_MODEL": "fake/echo-chat"}
    done = subprocess.run(["node", str(REPO / "examples" / "openai_sdk.mjs")], env=env, capture_output=True,
                          text=True, timeout=120, check=False, cwd=REPO / "examples")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "local/smollm2-135m" in result["models"]
    assert result["chat"].strip() and result["streamed"] == result["chat"]
    assert result["usage"]["completion_tokens"] > 0
    assert result["embeddings"] == [384, 384]
    assert result["notFound"] == {"status": 404, "code": "model_not_found"}
    city = result["structured"]  # held to its schema: exactly these keys, a boolean
    assert set(city) == {"name", "coastal"} and isinstance(city["coastal"], bool)
    for suffix in ("", "Streamed"):
        assert result[f"toolFinish{suffix}"] == "tool_calls"
        call = result[f"toolCall{suffix}"]
        assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"])["city"], str)
    streamed = result["structuredStreamed"]
    assert set(streamed) == {"name", "coastal"} and isinstance(streamed["coastal"], bool)
    responses = result["responses"]
    assert responses["text"].strip() and responses["usage"]["output_tokens"] > 0
    assert responses["followUp"]["previous"] is True and responses["followUp"]["text"].strip()
    types = responses["eventTypes"]
    assert types[0] == "response.created" and types[-1] in ("response.completed", "response.incomplete")
    assert responses["streamed"].strip() and responses["helper"] == responses["streamed"]
    for city in (responses["structured"], responses["structuredStreamed"]):
        assert set(city) == {"name", "coastal"} and isinstance(city["coastal"], bool)
    assert responses["call"]["name"] == "get_weather"
    assert isinstance(json.loads(responses["call"]["arguments"])["city"], str)
    assert responses["remote"] == {"model": "fake/echo-chat", "text": "hello from javascript"}
