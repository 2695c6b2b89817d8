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
           "IIR_API_KEY": admin_headers["Authorization"].removeprefix("Bearer ")}
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
    assert result["toolFinish"] == "tool_calls" and result["toolCall"]["name"] == "get_weather"
    assert isinstance(json.loads(result["toolCall"]["arguments"])["city"], str)
