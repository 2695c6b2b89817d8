"""The onboarding guide, verbatim, against the real Ray Serve graph (issue 2's examples)."""

from __future__ import annotations

import requests

from tests.e2e.conftest import Graph

LOCAL_CHAT = "local/smollm2-135m"


def test_guide_examples_work_as_written(graph: Graph) -> None:
    base = graph.base_url
    r = requests.post(f"{base}/api/v1/apikeys", json={"description": "dev test key", "priority": 10})
    api_key = r.json()["api_key"]
    assert r.json()["priority"] == 10 and {"id", "prefix", "created_at"} <= r.json().keys()
    headers = {"Authorization": f"Bearer {api_key}"}

    models = requests.get(f"{base}/v1/models", headers=headers).json()
    ids = {m["id"] for m in models["data"]}
    assert {LOCAL_CHAT, "local/minilm-l6-v2", "fake/echo-chat"} <= ids

    hello = {"model": LOCAL_CHAT, "messages": [{"role": "user", "content": "Hello!"}]}
    chat = requests.post(f"{base}/v1/chat/completions", headers=headers, json=hello).json()
    assert chat["object"] == "chat.completion" and chat["model"] == LOCAL_CHAT
    # The guide samples at temperature 1: a 135M model may answer with nothing, so check the shape.
    assert isinstance(chat["choices"][0]["message"]["content"], str)
    assert chat["choices"][0]["finish_reason"] in ("stop", "length")
    usage = chat["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    out = requests.post(f"{base}/infer", headers=headers,
                        json={"model": LOCAL_CHAT, "input": {"prompt": "hello"}}).json()
    assert out["model"] == LOCAL_CHAT and isinstance(out["output"]["text"], str)
    assert out["usage"]["prompt_tokens"] > 0

    refreshed = requests.post(f"{base}/v1/registry/refresh", headers=headers).json()
    assert LOCAL_CHAT in refreshed["models"] and refreshed["added"] == [] and refreshed["removed"] == []


def test_unknown_model_is_404_model_not_found(graph: Graph, admin_headers: dict[str, str]) -> None:
    r = requests.post(f"{graph.base_url}/v1/chat/completions", headers=admin_headers,
                      json={"model": "local/nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"


def test_missing_and_invalid_keys_are_401(graph: Graph) -> None:
    body = {"model": LOCAL_CHAT, "messages": [{"role": "user", "content": "hi"}]}
    missing = requests.post(f"{graph.base_url}/v1/chat/completions", json=body)
    wrong = requests.post(f"{graph.base_url}/v1/chat/completions", json=body,
                          headers={"Authorization": "Bearer iir-not-a-real-key"})
    for r in (missing, wrong):
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"


def test_revoked_key_is_refused_at_once(graph: Graph) -> None:
    created = requests.post(f"{graph.base_url}/api/v1/apikeys", json={"description": "short-lived"}).json()
    headers = {"Authorization": f"Bearer {created['api_key']}"}
    assert requests.get(f"{graph.base_url}/v1/models", headers=headers).status_code == 200
    revoked = requests.delete(f"{graph.base_url}/api/v1/apikeys/{created['id']}", headers=headers)
    assert revoked.status_code == 200
    assert requests.get(f"{graph.base_url}/v1/models", headers=headers).status_code == 401


def test_embeddings_and_generic_infer(graph: Graph, admin_headers: dict[str, str]) -> None:
    emb = requests.post(f"{graph.base_url}/infer", headers=admin_headers,
                        json={"model": "local/minilm-l6-v2", "input": {"text": "a cat sat"}}).json()
    assert len(emb["output"]["embedding"]) == 384
    generic = requests.post(f"{graph.base_url}/infer", headers=admin_headers,
                            json={"model": "fake/musicgen", "input": {"prompt": "lofi beat", "seconds": 3}})
    assert generic.status_code == 200, generic.text
    assert generic.json()["output"]["echo"] == {"prompt": "lofi beat", "seconds": 3}


def test_auto_routes_and_says_where(graph: Graph, admin_headers: dict[str, str]) -> None:
    r = requests.post(f"{graph.base_url}/v1/chat/completions", headers=admin_headers,
                      json={"model": "auto", "max_tokens": 8, "messages": [
                          {"role": "user", "content": "Write a python function to sort a list"}]})
    assert r.status_code == 200, r.text
    assert r.headers["x-iir-category"] == "code"
    assert r.json()["model"] == r.headers["x-iir-model"]


def test_classify_concurrently_through_the_ingress(graph: Graph, admin_headers: dict[str, str]) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prompts = {"code": "Why does my bash script say 'permission denied' when I run ./deploy.sh?",
               "math": "Solve for x: 3x + 7 = 22",
               "translate": "How do you say 'good morning' in Japanese?"}

    def classify(text: str) -> dict[str, object]:
        r = requests.post(f"{graph.base_url}/v1/classify", headers=admin_headers, json={"input": text})
        assert r.status_code == 200, r.text
        return dict(r.json())

    # Concurrent calls queue for the ingress's one classifier thread; each still gets its own answer.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(classify, [p for p in prompts.values() for _ in range(4)]))
    assert [r["category"] for r in results] == [c for c in prompts for _ in range(4)]
    assert all(r["model"] == "local/smollm2-135m" for r in results)  # the only chat model there
