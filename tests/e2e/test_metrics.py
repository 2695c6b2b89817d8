"""IIR's metrics after real traffic, scraped from Ray's Prometheus endpoint the way Prometheus does."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

import requests

from serve_app import metrics
from tests.e2e.conftest import Graph


def scrape(graph: Graph, wanted: list[str], timeout_s: float = 60) -> str:
    """Ray's endpoint once every pattern in ``wanted`` shows (samples arrive every report interval)."""
    deadline = time.monotonic() + timeout_s
    missing = wanted
    while time.monotonic() < deadline:
        text = requests.get(graph.metrics_url, timeout=10).text
        missing = [p for p in wanted if not re.search(p, text)]
        if not missing:
            return text
        time.sleep(1)
    raise AssertionError(f"not in the scrape after {timeout_s} s: {missing}")


def test_a_scrape_shows_iir_metrics_after_traffic(graph: Graph, admin_headers: dict[str, str]) -> None:
    marker = uuid.uuid4().hex
    body = {"model": "fake/echo-chat", "temperature": 0, "messages": [{"role": "user", "content": marker}]}
    for _ in range(2):  # a miss, then a hit
        r = requests.post(f"{graph.base_url}/v1/chat/completions", headers=admin_headers, json=body,
                          timeout=60)
        assert r.status_code == 200, r.text
        time.sleep(0.3)  # the store happens after the response
    assert requests.post(f"{graph.base_url}/v1/chat/completions", json=body, timeout=30).status_code == 401
    auto = {"model": "auto", "messages": [{"role": "user", "content": "write a haiku about rain"}]}
    assert requests.post(f"{graph.base_url}/v1/chat/completions", headers=admin_headers, json=auto,
                         timeout=120).status_code == 200

    text = scrape(graph, [
        r'ray_iir_cache_lookups_total\{[^}]*result="hit"',
        r'ray_iir_auth_failures_total\{[^}]*reason="missing_key"',
        r'ray_iir_request_latency_seconds_bucket\{',
        r'ray_iir_tokens_total\{[^}]*direction="out"',
        r'ray_iir_classifier_decisions_total\{[^}]*category="creative"',
        r'ray_iir_registry_models\{[^}]*status="available"',
        r'ray_iir_in_flight_requests\{',
    ])
    requests_lines = [line for line in text.splitlines() if line.startswith("ray_iir_requests_total{")]
    assert any('route="/v1/chat/completions"' in line and 'status="200"' in line
               and 'model="fake/echo-chat"' in line for line in requests_lines), requests_lines
    assert "ray_serve_" in text  # Serve's own metrics come from the same endpoint
    for line in text.splitlines():
        if line.startswith("ray_iir_"):
            assert "key_" not in line and "Bearer" not in line  # no key or key id on any label


def test_every_metric_is_named_iir() -> None:
    assert metrics.ALL and all(m.name.startswith("iir_") for m in metrics.ALL)
    assert len({m.name for m in metrics.ALL}) == len(metrics.ALL)


def test_the_access_log_line_lands_in_the_ingress_replica_log(graph: Graph,
                                                             admin_headers: dict[str, str]) -> None:
    import ray

    request_id = f"e2e-log-{uuid.uuid4().hex}"
    body = {"model": "fake/echo-chat", "messages": [{"role": "user", "content": "log me"}]}
    r = requests.post(f"{graph.base_url}/v1/chat/completions", json=body, timeout=60,
                      headers={**admin_headers, "x-request-id": request_id})
    assert r.status_code == 200 and r.headers["x-request-id"] == request_id
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"
    deadline = time.monotonic() + 20
    found: list[str] = []
    while not found and time.monotonic() < deadline:
        found = [line for f in logs.glob("replica_iir_Ingress_*.log") for line in f.read_text().splitlines()
                 if request_id in line and "latency_ms" in line]
        time.sleep(0.5)
    assert found, "no access-log line with the request id in the ingress replica's log"
    line = json.loads(found[0][found[0].index("{"):])
    assert line["status"] == 200 and line["model"] == "fake/echo-chat" and line["key_id"]
    secret = admin_headers["Authorization"].removeprefix("Bearer ")
    assert all(secret not in f.read_text() for f in logs.glob("*.log"))
