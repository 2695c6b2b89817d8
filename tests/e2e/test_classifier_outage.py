"""``model: "auto"`` through the real graph while the Classifier replica is dead: the default route,
at once, and classification again once Serve has restarted the replica."""

from __future__ import annotations

import time

import ray
import requests

from tests.e2e.conftest import Graph

CODE = "Write a Python function that reverses a linked list"


def auto(graph: Graph, headers: dict[str, str]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    r = requests.post(f"{graph.base_url}/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": "auto", "messages": [{"role": "user", "content": CODE}],
                            "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r, time.monotonic() - started


def test_a_dead_classifier_sends_auto_to_the_default_model_until_it_is_back(
        graph: Graph, admin_headers: dict[str, str]) -> None:
    routed, _ = auto(graph, admin_headers)
    assert routed.headers["x-iir-category"] == "code"

    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "Classifier" in a["name"]]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    answers = [auto(graph, admin_headers) for _ in range(6)]
    assert answers[0][0].headers["x-iir-category"] == "unclassified"
    assert all(r.headers["x-iir-category"] in ("unclassified", "code") for r, _ in answers)
    # At most one classifier timeout (1 s) per ingress replica; the rest skip the classifier.
    assert max(took for _, took in answers) < 2.5, [took for _, took in answers]

    deadline = time.monotonic() + 120
    while auto(graph, admin_headers)[0].headers["x-iir-category"] != "code":
        assert time.monotonic() < deadline, "auto never classified again after the Classifier restarted"
        time.sleep(1)
