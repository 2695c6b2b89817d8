"""The semantic cache through the real graph: fail-open when the SemanticCache replica dies, and the
index rebuilt from Redis when Serve restarts it."""

from __future__ import annotations

import time
import uuid

import ray
import requests

from tests.e2e.conftest import Graph


def ask(graph: Graph, headers: dict[str, str], text: str) -> requests.Response:
    body = {"model": "fake/echo-faq", "temperature": 0, "messages": [{"role": "user", "content": text}]}
    r = requests.post(f"{graph.base_url}/v1/chat/completions", headers=headers, json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r


def polite(marker: str) -> str:
    return f"Please, what is the tallest tree species ({marker})?"


def paraphrase_hits(graph: Graph, headers: dict[str, str], timeout_s: float) -> str | None:
    """Store a fresh question, then ask it again politely; its marker once that is a semantic hit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        marker = uuid.uuid4().hex[:8]
        ask(graph, headers, f"What is the tallest tree species ({marker})?")
        time.sleep(0.5)  # the answer is stored, then indexed, after the response
        if ask(graph, headers, polite(marker)).headers.get("x-iir-cache-match") == "semantic":
            return marker
        time.sleep(1)
    return None


def test_semantic_hits_through_the_graph_and_a_dead_index_fails_open(
        graph: Graph, admin_headers: dict[str, str]) -> None:
    before = paraphrase_hits(graph, admin_headers, 30)
    assert before is not None

    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
              if "SemanticCache" in a["name"]]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    took = []
    for n in range(6):
        started = time.monotonic()
        r = ask(graph, admin_headers, f"Name a prime number above {n}00 ({uuid.uuid4().hex[:8]})")
        took.append(time.monotonic() - started)
        assert r.headers["x-iir-cache"] == "miss"
    assert max(took) < 1.5, took  # one lookup may wait out the 0.25 s timeout; then they skip it

    assert paraphrase_hits(graph, admin_headers, 120), "the semantic cache did not come back"
    # The restarted replica rebuilt its index from the Redis journal: the answer from before the
    # kill is found by meaning again (a semantic hit is never stored under its own exact key).
    assert ask(graph, admin_headers, polite(before)).headers.get("x-iir-cache-match") == "semantic"
