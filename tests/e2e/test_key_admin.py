"""``iir keys revoke``/``update`` from a shell reach every ingress replica's key cache at once, as the HTTP
admin routes do: both go through ``AuthService``, which announces the change on Redis.

The shared graph runs one ingress replica. Two more, in an application of their own bound to the graph's
Auth, Registry and SemanticCache, make the "every replica" claim mean something: each has its
own key cache and revocation listener. Each replica is reached on its own port (throughput-optimized
Serve's direct ingress), never through the proxy, so the test knows which cache answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Graph
from tests.support.env import environ

EXTRA_APP = "iir-key-admin-test"
EXTRA_REPLICAS = 2
REFUSED_WITHIN_S = 1.0
POLL_INTERVAL_S = 0.02  # leaves a small machine's cores to the CLI process and the replicas

Send = Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]
Changed = Callable[[httpx.Response], bool]


def _descendants() -> list[int]:
    """This process's descendants: the Ray processes this session started (``/proc``), and no one
    else's graph that may be running on the machine."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # after "pid (comm) state"
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [os.getpid()]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def _listening_ports(pid: int) -> set[int]:
    """TCP ports ``pid`` listens on: its socket inodes matched against the LISTEN rows of /proc/net."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:["):-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _replica_urls(app_name: str) -> list[str]:
    """Each ingress replica of ``app_name`` at its own HTTP port (direct ingress, 30000 and up; Ray titles
    the process ``ray::ServeReplica:<app>:Ingress``). The replica serves the app's route prefix there
    too, and listens on Serve's ``http_options`` host: 127.0.0.1 in the graph fixture."""
    prefix = "" if app_name == "iir" else f"/{app_name}"
    urls = []
    for pid in _descendants():
        with contextlib.suppress(OSError):
            title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if f"ServeReplica:{app_name}:Ingress" in title and "graceful_shutdown" not in title:
                urls += [f"http://127.0.0.1:{port}{prefix}" for port in _listening_ports(pid)
                         if 30000 <= port <= 31000]
    return sorted(urls)


def _subscribed(url: str) -> bool:
    """The replica answers, and its revocation listener is on the channel (``/ready`` says so)."""
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return bool(httpx.get(f"{url}/ready", timeout=5).json().get("cache") == "ok")
    return False


@pytest.fixture(scope="module")
def ingress_urls(graph: Graph) -> Iterator[list[str]]:
    from ray import serve

    from deployments.ingress import Ingress
    from serve_app.settings import Settings

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("finds each ingress replica's port through /proc (Linux)")
    with environ(graph.env):
        settings = Settings()  # what build_app gave the graph's own Ingress
    upstream = [serve.get_deployment_handle(name, app_name="iir")
                for name in ("Auth", "Registry", "SemanticCache")]
    # No CPU reserved: the graph's 4 logical CPUs are spoken for by its models and services.
    extra = Ingress.options(num_replicas=EXTRA_REPLICAS, ray_actor_options={"num_cpus": 0})
    serve.run(extra.bind(settings, *upstream), name=EXTRA_APP, route_prefix=f"/{EXTRA_APP}", blocking=False)
    try:
        deadline, urls = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            urls = _replica_urls("iir") + _replica_urls(EXTRA_APP)
            if len(urls) == 1 + EXTRA_REPLICAS and all(_subscribed(url) for url in urls):
                break
            time.sleep(0.5)
        assert len(urls) == 1 + EXTRA_REPLICAS and all(_subscribed(url) for url in urls), urls
        yield urls
    finally:
        serve.delete(EXTRA_APP, _blocking=False)


def _cli_env(graph: Graph) -> dict[str, str]:
    # The graph's own settings (IIR_DATABASE_URL, IIR_REDIS_URL, ...): the operator's shell on that host.
    return {**{k: v for k, v in os.environ.items() if not k.startswith("IIR_")}, **graph.env}


def _iir() -> list[str]:
    script = Path(sys.executable).with_name("iir")  # the console script installed with the package
    return [str(script)] if script.exists() else [sys.executable, "-m", "serve_app.cli"]


def iir_keys(graph: Graph, *argv: str) -> dict[str, Any]:
    done = subprocess.run([*_iir(), "keys", *argv], env=_cli_env(graph), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@dataclass
class Poll:
    """What one replica answered while the CLI ran: the first answer that shows the change, if any."""

    url: str
    statuses: list[int]
    changed_at: float | None = None  # perf_counter when the first changed answer arrived


@dataclass
class Until:
    """When the pollers give up; brought forward once the CLI has returned."""

    at: float


async def _poll(url: str, send: Send, changed: Changed, until: Until) -> Poll:
    result = Poll(url, [])
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while time.perf_counter() < until.at:
            response = await send(client)
            result.statuses.append(response.status_code)
            if changed(response):
                result.changed_at = time.perf_counter()
                break
            await asyncio.sleep(POLL_INTERVAL_S)
    return result


async def _cli_while_polling(graph: Graph, argv: list[str], urls: list[str], send: Send,
                             changed: Changed) -> tuple[float, list[Poll], dict[str, Any]]:
    """Poll every replica while ``iir keys <argv>`` runs; (when the CLI returned, the polls, its JSON)."""
    until = Until(time.perf_counter() + 60)  # the CLI itself takes seconds (imports, the schema check)
    pollers = [asyncio.create_task(_poll(url, send, changed, until)) for url in urls]
    await asyncio.sleep(0.1)  # every poller has its first answer before the CLI starts
    proc = await asyncio.create_subprocess_exec(*_iir(), "keys", *argv, env=_cli_env(graph),
                                                stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    returned = time.perf_counter()
    until.at = returned + REFUSED_WITHIN_S + 2  # long enough to say how late a slow replica was
    polls = await asyncio.gather(*pollers)
    assert proc.returncode == 0, err.decode()
    assert b"WARNING" not in err, err.decode()
    return returned, polls, json.loads(out)


def _report(what: str, returned: float, polls: list[Poll]) -> dict[str, float | None]:
    after = {p.url: None if p.changed_at is None else round(p.changed_at - returned, 3) for p in polls}
    print(f"\n{what}: seconds from the CLI's return to the change on each replica: {after}")
    return after


def test_cli_revoke_is_refused_on_every_ingress_replica_at_once(graph: Graph,
                                                                ingress_urls: list[str]) -> None:
    created = iir_keys(graph, "create", "--description", f"e2e cli revoke {uuid.uuid4().hex[:8]}")
    headers = {"Authorization": f"Bearer {created['api_key']}"}
    for url in ingress_urls:
        for _ in range(2):  # the first use verifies with Auth; the second comes from this replica's cache
            assert httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code == 200

    async def send(client: httpx.AsyncClient) -> httpx.Response:
        return await client.get("/v1/models", headers=headers)

    returned, polls, revoked = asyncio.run(_cli_while_polling(
        graph, ["revoke", created["id"]], ingress_urls, send, lambda r: r.status_code == 401))
    assert revoked["announced"] is True and revoked["active"] is False
    after = _report("iir keys revoke", returned, polls)
    for poll in polls:
        assert set(poll.statuses) <= {200, 401}, (poll.url, poll.statuses)
        assert poll.statuses[0] == 200, f"{poll.url} refused the key before the revocation"
        seconds = after[poll.url]
        assert seconds is not None and seconds <= REFUSED_WITHIN_S, (
            f"{poll.url} still accepted the revoked key {REFUSED_WITHIN_S} s after the CLI returned")


def test_cli_update_of_priority_and_limit_applies_on_every_ingress_replica_at_once(
    graph: Graph, ingress_urls: list[str]
) -> None:
    created = iir_keys(graph, "create", "--description", "e2e cli update", "--priority", "5")
    headers = {"Authorization": f"Bearer {created['api_key']}"}
    for url in ingress_urls:
        for _ in range(2):
            assert httpx.get(f"{url}/v1/models", headers=headers, timeout=10).status_code == 200

    async def send(client: httpx.AsyncClient) -> httpx.Response:
        # An inference call: the rate limiter runs there and names the key's limit in its headers.
        body = {"model": "fake/echo-chat", "max_tokens": 4,
                "messages": [{"role": "user", "content": f"update {uuid.uuid4().hex}"}]}
        return await client.post("/v1/chat/completions", headers=headers, json=body)

    def applied(response: httpx.Response) -> bool:
        # No response shows a key's priority; the new limit shows that the replica re-read the key, and
        # the priority comes with the same read.
        return response.headers.get("x-ratelimit-limit-requests") == "1000"

    returned, polls, updated = asyncio.run(_cli_while_polling(
        graph, ["update", created["id"], "--priority", "50", "--rpm", "1000"], ingress_urls, send, applied))
    assert (updated["priority"], updated["announced"]) == (50, True)
    after = _report("iir keys update", returned, polls)
    for poll in polls:
        assert set(poll.statuses) == {200}, (poll.url, poll.statuses)
        seconds = after[poll.url]
        assert seconds is not None and seconds <= REFUSED_WITHIN_S, (
            f"{poll.url} still had the key's old limits {REFUSED_WITHIN_S} s after the CLI returned")
