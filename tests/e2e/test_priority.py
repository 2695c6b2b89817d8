"""Priority through the real Ray graph: the key's priority crosses the Serve hop with the request, and a
high-priority request pauses a low-priority generation running in the model replica."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from tests.e2e.conftest import Graph
from tests.e2e.test_metrics import scrape

MODEL = "local/smollm2-135m"


def new_key(graph: Graph, priority: int) -> dict[str, str]:
    r = requests.post(f"{graph.base_url}/api/v1/apikeys", json={"description": "priority e2e",
                                                                  "priority": priority}, timeout=30)
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['api_key']}", "cache-control": "no-store"}


def chat(graph: Graph, headers: dict[str, str], max_tokens: int) -> tuple[dict[str, Any], float, float]:
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]}
    started = time.monotonic()
    r = requests.post(f"{graph.base_url}/v1/chat/completions", headers=headers, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json(), started, time.monotonic()


def test_a_high_priority_request_overtakes_a_running_low_priority_one(graph: Graph) -> None:
    low, high = new_key(graph, 1), new_key(graph, 100)
    alone, started, ended = chat(graph, low, 160)
    alone_s = ended - started
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(chat, graph, low, 160)
        time.sleep(alone_s / 3)  # the low one is well into its generation
        _, high_started, high_ended = chat(graph, high, 8)
        paused, _, low_ended = running.result(timeout=120)
    assert high_ended < low_ended, "the high-priority request waited for the low-priority one"
    assert high_ended - high_started < alone_s * 2 / 3  # not the rest of the low one's generation
    assert paused["usage"] == alone["usage"]  # the low one resumed and ended whole
    assert paused["choices"][0]["finish_reason"] == alone["choices"][0]["finish_reason"]
    scrape(graph, [r'iir_preemptions_total\{[^}]*priority_class="low"'])  # and the metric shows it
