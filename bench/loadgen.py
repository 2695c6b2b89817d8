"""A small closed-loop load generator (asyncio, one keep-alive pool per step) and a CPU meter.

The default client is ``aiohttp``: against the bare fake upstream on this 2-core box it sustains
2,000-6,000 req/s at 64 connections, where ``httpx.AsyncClient`` managed 60-95 req/s with a 0.5-0.7 s
median and 7 ms of client CPU per request (httpcore's pool scans every connection on every request
event: encode/httpx#3215), so an httpx-driven run measures the client, not the gateway. ``--client
httpx`` reproduces that.

Each step runs ``concurrency`` workers that send one request after another until ``duration_s`` has
passed or ``max_requests`` have been sent, whichever comes first, after a short untimed warm-up that
opens the pool's connections. Non-stream latency is the whole response; a stream's latency is the time
to its first ``data:`` event (the stream is still read to the end and must finish with ``[DONE]``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx

MAX_ERROR_SAMPLES = 3


@dataclass
class StepResult:
    scenario: str  # "chat" | "stream"
    target: str  # "direct" | "iir-proxy" | "iir-ingress-port"
    concurrency: int
    requests: int
    errors: int
    elapsed_s: float
    latencies_ms: list[float] = field(repr=False)
    error_samples: list[str] = field(default_factory=list)
    cpu_ms_per_req: dict[str, float] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 0.50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 0.99)

    def to_json(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "target": self.target, "concurrency": self.concurrency,
                "requests": self.requests, "errors": self.errors, "elapsed_s": round(self.elapsed_s, 3),
                "rps": round(self.rps, 1), "p50_ms": round(self.p50_ms, 2), "p99_ms": round(self.p99_ms, 2),
                "error_samples": self.error_samples,
                "cpu_ms_per_req": {k: round(v, 2) for k, v in self.cpu_ms_per_req.items()}}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Target:
    name: str
    url: str  # full URL of the chat completions route (or of /v1/responses, with its own body)
    headers: dict[str, str]
    model: str
    body: dict[str, Any] | None = None  # instead of the step's chat body


class _SseCheck:
    """Follows one SSE body: when its first event came, and that it ended with ``[DONE]``."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.first: float | None = None
        self.done = False

    def feed(self, line: str) -> None:
        if not line.startswith("data:"):
            return
        if self.first is None:
            self.first = time.perf_counter() - self.start
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
        elif "error" in json.loads(data):
            raise RuntimeError(f"error event: {data[:200]}")

    def result(self) -> float:
        if self.first is None or not self.done:
            raise RuntimeError("stream ended without [DONE]")
        return self.first


def _check(status: int, body: bytes) -> None:
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
    answer = json.loads(body)
    if not answer.get("choices") and not answer.get("output"):  # chat/completions, or a response
        raise RuntimeError(f"no choices or output: {body[:200]!r}")


async def _aiohttp_request(session: aiohttp.ClientSession, target: Target, payload: dict[str, Any],
                           stream: bool) -> float:
    start = time.perf_counter()
    async with session.post(target.url, json=payload, headers=target.headers) as r:
        if not stream:
            body = await r.read()
            elapsed = time.perf_counter() - start
            _check(r.status, body)
            return elapsed
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.read())[:200]!r}")
        sse = _SseCheck(start)
        async for raw in r.content:  # one line at a time
            sse.feed(raw.decode().rstrip("\r\n"))
    return sse.result()


async def _httpx_request(client: httpx.AsyncClient, target: Target, payload: dict[str, Any],
                         stream: bool) -> float:
    start = time.perf_counter()
    if not stream:
        r = await client.post(target.url, json=payload, headers=target.headers)
        elapsed = time.perf_counter() - start
        _check(r.status_code, r.content)
        return elapsed
    async with client.stream("POST", target.url, json=payload, headers=target.headers) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        sse = _SseCheck(start)
        async for line in r.aiter_lines():
            sse.feed(line)
    return sse.result()


@contextlib.asynccontextmanager
async def _sender(kind: str, concurrency: int) -> AsyncIterator[Callable[..., Awaitable[float]]]:
    """``send(target, payload, stream) -> seconds`` on one keep-alive pool of ``concurrency``."""
    if kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
            yield functools.partial(_httpx_request, client)
        return
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield functools.partial(_aiohttp_request, session)


async def run_step(target: Target, body: dict[str, Any], *, scenario: str, concurrency: int,
                   duration_s: float, max_requests: int, stream: bool = False,
                   client: str = "aiohttp") -> StepResult:
    payload = {**(target.body or body), "model": target.model, "stream": stream}
    async with _sender(client, concurrency) as send:
        # Warm-up: open every connection and let each hop's caches fill; not timed.
        warm = await asyncio.gather(*(send(target, payload, stream) for _ in range(concurrency * 2)),
                                    return_exceptions=True)
        latencies: list[float] = []
        errors: list[str] = []
        sent = 0
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal sent
            while sent < max_requests and time.perf_counter() < deadline:
                sent += 1
                try:
                    latencies.append(1000 * await send(target, payload, stream))
                except Exception as exc:  # noqa: BLE001 - every failure is counted, none stops the step
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    warm_errors = [f"warm-up {type(e).__name__}: {e}"[:300] for e in warm if isinstance(e, BaseException)]
    return StepResult(scenario=scenario, target=target.name, concurrency=concurrency,
                      requests=len(latencies), errors=len(errors) + len(warm_errors), elapsed_s=elapsed,
                      latencies_ms=latencies, error_samples=(warm_errors + errors)[:MAX_ERROR_SAMPLES])


# -- CPU ------------------------------------------------------------------------------------------


def _psutil() -> Any:
    """Ray vendors psutil (``ray/thirdparty_files``), on ``sys.path`` once ``ray`` is imported."""
    importlib.import_module("ray")
    import psutil

    return psutil


def process_group(proc: Any) -> str:
    """Which part of the Ray graph a process is, from the title Ray gives its workers."""
    psutil = _psutil()
    try:
        title = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    for marker, group in (("ProxyActor", "proxy"), ("bin/haproxy", "haproxy"), (":Ingress", "ingress"),
                          (":Auth", "auth"),
                          (":Classifier", "classifier"), ("ServeController", "controller"),
                          ("ServeReplica", "models")):
        if marker in title:
            return group
    return "ray-other"  # raylet, gcs_server, idle workers, log monitor


class CpuMeter:
    """CPU seconds used by the processes below this one (Ray's), by group, minus their idle rate.

    The driver process (this one, which also runs the load generator) and the upstream are metered
    separately as "client" and "upstream"; neither is part of the gateway's cost.
    """

    def __init__(self, *, exclude_pids: set[int], upstream_pid: int | None) -> None:
        psutil = self._ps = _psutil()
        self._exclude = exclude_pids
        self._upstream = psutil.Process(upstream_pid) if upstream_pid else None
        self._me = psutil.Process(os.getpid())
        self._idle_rate: dict[str, float] = {}

    def snapshot(self) -> dict[str, float]:
        psutil = self._ps
        totals: dict[str, float] = {}
        for proc in self._me.children(recursive=True):
            if proc.pid in self._exclude:
                continue
            try:
                times = proc.cpu_times()
                cpu = times.user + times.system + times.children_user + times.children_system
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            group = process_group(proc)
            totals[group] = totals.get(group, 0.0) + cpu
        own = self._me.cpu_times()
        totals["client"] = own.user + own.system
        if self._upstream is not None:
            up = self._upstream.cpu_times()
            totals["upstream"] = up.user + up.system
        return totals

    def measure_idle(self, seconds: float) -> dict[str, float]:
        before, start = self.snapshot(), time.perf_counter()
        time.sleep(seconds)
        elapsed = time.perf_counter() - start
        self._idle_rate = {k: max(0.0, v - before.get(k, 0.0)) / elapsed
                           for k, v in self.snapshot().items() if k not in ("client", "upstream")}
        return {k: round(1000 * v, 1) for k, v in self._idle_rate.items()}  # ms of CPU per second

    def per_request(self, before: dict[str, float], after: dict[str, float], elapsed_s: float,
                    requests: int) -> dict[str, float]:
        if not requests:
            return {}
        out: dict[str, float] = {}
        for group in after:
            used = after[group] - before.get(group, 0.0) - self._idle_rate.get(group, 0.0) * elapsed_s
            out[group] = 1000 * max(0.0, used) / requests
        out["gateway"] = sum(v for k, v in out.items() if k not in ("client", "upstream"))
        return out

    def niceness(self) -> dict[str, list[int]]:
        """Nice values by group: Ray starts its workers at ``RAY_worker_niceness`` (15 by default)."""
        found: dict[str, set[int]] = {"client": {self._me.nice()}}
        for proc in self._me.children(recursive=True):
            try:
                found.setdefault(process_group(proc), set()).add(proc.nice())
            except (self._ps.NoSuchProcess, self._ps.AccessDenied):
                continue
        return {k: sorted(v) for k, v in found.items()}

    def listening_ports(self, group: str, low: int, high: int) -> list[tuple[str, int]]:
        psutil = self._ps
        found = []
        for proc in self._me.children(recursive=True):
            if process_group(proc) != group:
                continue
            try:
                conns = proc.net_connections(kind="tcp")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            found += [(c.laddr.ip, c.laddr.port) for c in conns
                      if c.status == psutil.CONN_LISTEN and low <= c.laddr.port <= high]
        return found


async def metered_step(meter: CpuMeter | None, run: Callable[[], Any]) -> StepResult:
    before, start = (meter.snapshot() if meter else {}), time.perf_counter()
    result: StepResult = await run()
    if meter:
        # The warm-up is outside ``elapsed_s`` but inside the CPU window: count its requests too.
        warm = result.concurrency * 2
        result.cpu_ms_per_req = meter.per_request(before, meter.snapshot(), time.perf_counter() - start,
                                                  result.requests + warm)
    return result
