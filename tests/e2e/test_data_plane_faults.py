"""Faults under load behind HAProxy: an ingress replica killed mid-request, and the HAProxy reloads that
follow (Serve replaces the replica; HAProxy is restarted with the new backend list each time).

Clients must see a served request (HAProxy retries a refused connection on the other replica) or a
clear JSON 503 with ``Retry-After`` (the shim's error file, for a request the dead replica had taken),
never a hang, a dropped connection or a 500. Two ingress replicas, in an application of their own bound
to the shared graph's services, so the graph's own ingress is not disturbed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from tests.e2e.conftest import Graph
from tests.support.env import environ
from tests.support.fake_upstream import FakeUpstream
from tests.support.graph_processes import graph_processes

APP = "iir-faults-test"
REPLICAS = 2
CONCURRENCY = 8
REQUEST_TIMEOUT_S = 30.0  # a hang would show as a timeout


@dataclass
class Outcome:
    started: float
    status: int | None  # None: the connection failed or timed out
    retry_after: str | None = None
    error_code: str | None = None
    failure: str | None = None


def _replica_pids() -> list[int]:
    return sorted(p.pid for p in graph_processes(f"ServeReplica:{APP}:Ingress")
                  if "graceful_shutdown" not in " ".join(p.cmdline()))


def _haproxy_pids() -> set[int]:
    return {p.pid for p in graph_processes("bin/haproxy")}


@pytest.fixture(scope="module")
def two_ingress_replicas(graph: Graph) -> Iterator[str]:
    from ray import serve

    from deployments.ingress import Ingress
    from serve_app.settings import Settings

    with environ(graph.env):
        settings = Settings()
    upstream = [serve.get_deployment_handle(name, app_name="iir")
                for name in ("Auth", "Registry", "SemanticCache")]
    extra = Ingress.options(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 0})
    serve.run(extra.bind(settings, *upstream), name=APP, route_prefix=f"/{APP}", blocking=False)
    url = f"{graph.base_url}/{APP}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if len(_replica_pids()) == REPLICAS and _ready(url):
                break
            time.sleep(0.5)
        assert len(_replica_pids()) == REPLICAS and _ready(url)
        yield url
    finally:
        serve.delete(APP, _blocking=False)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


async def _load(url: str, headers: dict[str, str], until: float, out: list[Outcome]) -> None:
    body = {"model": "fake/echo-chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    # A new connection per request, as many clients do: HAProxy picks a replica for each.
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=0),
                                 headers={**headers, "Cache-Control": "no-store"}) as client:
        while time.monotonic() < until:
            started = time.monotonic()
            try:
                r = await client.post(f"{url}/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                out.append(Outcome(started, None, failure=repr(exc)))
                continue
            code = None
            if r.status_code != 200:
                try:
                    code = r.json()["error"]["code"]
                except (ValueError, KeyError, TypeError):
                    code = f"not JSON: {r.text[:80]!r}"
            out.append(Outcome(started, r.status_code, r.headers.get("retry-after"), code))


def test_killed_ingress_replica_mid_load_gives_retries_or_clear_503s(
        two_ingress_replicas: str, admin_headers: dict[str, str], fake_upstream: FakeUpstream) -> None:
    victim = _replica_pids()[0]
    haproxy_before = _haproxy_pids()
    outcomes: list[Outcome] = []
    fake_upstream.first_byte_delay_s = 0.2  # requests are in flight on the victim when it dies
    try:
        async def scenario() -> float:
            until = time.monotonic() + 14
            workers = [asyncio.create_task(_load(two_ingress_replicas, admin_headers, until, outcomes))
                       for _ in range(CONCURRENCY)]
            await asyncio.sleep(3)
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            await asyncio.gather(*workers)
            return killed_at

        killed_at = asyncio.run(scenario())
    finally:
        fake_upstream.first_byte_delay_s = 0.0

    statuses = Counter(o.status for o in outcomes)
    print("outcomes:", statuses, flush=True)
    failed = [(round(o.started - killed_at, 2), o.failure) for o in outcomes if o.status is None]
    assert not failed, (statuses, failed[:10])
    assert set(statuses) <= {200, 503}, statuses
    for o in outcomes:
        if o.status == 503:
            assert o.retry_after and o.error_code in ("ingress_unavailable", "model_loading"), o
    after_kill = [o for o in outcomes if o.started > killed_at + 1]
    assert sum(o.status == 200 for o in after_kill) >= 10, statuses  # the other replica serves on
    assert sum(o.status == 200 for o in outcomes if o.started < killed_at) >= 10, statuses
    # Serve replaces the dead replica; HAProxy was reloaded (a new process) with the new backend list.
    deadline = time.monotonic() + 60
    while len(_replica_pids()) < REPLICAS and time.monotonic() < deadline:
        time.sleep(0.5)
    assert victim not in _replica_pids() and len(_replica_pids()) == REPLICAS
    assert _haproxy_pids() - haproxy_before, "HAProxy was not reloaded"
