"""The exact response cache through the whole graph (local Ray, one ingress replica, a private
redis-server, a fake upstream), on the ingress replica's own port.

1. **Hits**: one deterministic request repeated: p50/p99 at c=1, req/s at c=16.
2. **Miss overhead**: unique deterministic prompts (lookup + store) against the same prompts with
   ``Cache-Control: no-store`` (no cache work at all): the difference of the p50s.
   **Semantic**: a paraphrase of a stored answer, repeated (each an exact miss and a semantic hit);
   unique prompts on a ``semantic_cache`` model (the semantic miss overhead).
3. **Redis killed under load**: c=8 of cache hits for 6 s; redis-server is killed at 2 s. Failed
   requests (target 0), the worst latency, and how many were answered by ``bypass``.

    .venv/bin/python bench/cache_bench.py [--requests 500]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp  # noqa: E402
import httpx  # noqa: E402

from bench.auth_bench import RAY_ENV, deploy, local_ray, redis_server, write_config_files  # noqa: E402
from bench.loadgen import percentile  # noqa: E402
from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.net import free_port  # noqa: E402


def body(text: str, model: str = "fake/echo-chat") -> dict[str, Any]:
    return {"model": model, "temperature": 0, "max_tokens": 16,
            "messages": [{"role": "user", "content": text}]}


async def run(url: str, headers: dict[str, str], bodies: list[dict[str, Any]], concurrency: int,
              extra: dict[str, str] | None = None) -> tuple[list[float], float, dict[str, int], int]:
    """(latencies ms, req/s, x-iir-cache counts, failures)."""
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    failures = 0
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                     timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def worker() -> None:
            nonlocal failures
            while queue:
                b = queue.pop()
                start = time.perf_counter()
                try:
                    async with session.post(f"{url}/v1/chat/completions", json=b,
                                            headers={**headers, **(extra or {})}) as r:
                        await r.read()
                        if r.status != 200:
                            failures += 1
                        outcome = cache_outcome(r.headers)
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1
                except aiohttp.ClientError:
                    failures += 1
                latencies.append((time.perf_counter() - start) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, len(latencies) / (time.perf_counter() - started), outcomes, failures


async def for_duration(url: str, headers: dict[str, str], b: dict[str, Any], concurrency: int,
                       seconds: float) -> tuple[list[float], dict[str, int], int]:
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    failures = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async def worker() -> None:
            nonlocal failures
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                try:
                    async with session.post(f"{url}/v1/chat/completions", json=b, headers=headers) as r:
                        await r.read()
                        failures += r.status != 200
                        outcome = cache_outcome(r.headers)
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1
                except aiohttp.ClientError:
                    failures += 1
                latencies.append((time.perf_counter() - start) * 1000)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, outcomes, failures


def cache_outcome(headers: Any) -> str:
    """``hit:exact``, ``hit:semantic``, ``miss`` or ``bypass``."""
    match = headers.get("x-iir-cache-match")
    return headers.get("x-iir-cache", "?") + (f":{match}" if match else "")


def line(label: str, lat: list[float]) -> str:
    return (f"{label}: p50 {percentile(lat, 0.5):.2f} ms, p99 {percentile(lat, 0.99):.2f} ms, "
            f"max {max(lat):.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()
    os.environ.update(RAY_ENV)
    with tempfile.TemporaryDirectory() as tmp, FakeUpstream() as upstream, redis_server() as redis_url:
        echo = {"id": "fake/echo-chat", "engine": "openai", "task": "chat", "source": "echo-1"}
        faq = {"id": "fake/echo-faq", "engine": "openai", "task": "chat", "source": "echo-faq",
               "semantic_cache": True}
        models = {"default_model": "fake/echo-chat", "models": [echo, faq]}
        providers = {"providers": [{"name": "fake", "base_url": upstream.base_url}]}
        paths = write_config_files(Path(tmp), models, providers, {"default": "fake/echo-chat"})
        env = {f"IIR_{k.upper()}": v for k, v in paths.items()}
        env |= {"IIR_DATABASE_URL": f"sqlite:///{Path(tmp) / 'iir.db'}", "IIR_REDIS_URL": redis_url,
                "IIR_CACHE_BACKEND": "redis"}
        port = free_port()
        with local_ray(port):
            [url], _ = deploy({}, env, f"http://127.0.0.1:{port}", replicas=1)
            key = httpx.post(f"{url}/api/v1/apikeys", json={"description": "bench"}, timeout=30).json()
            headers = {"Authorization": f"Bearer {key['api_key']}"}
            same = body("What is the capital of France?")
            asyncio.run(run(url, headers, [same] * 50, 1))  # warm-up, and the entry is stored
            lat, _, outcomes, _ = asyncio.run(run(url, headers, [same] * args.requests, 1))
            print(line(f"hits, c=1 {outcomes}", lat), flush=True)
            lat, rps, outcomes, _ = asyncio.run(run(url, headers, [same] * args.requests * 2, 16))
            print(line(f"hits, c=16 ({rps:.0f} req/s) {outcomes}", lat), flush=True)

            prompts = [body(f"question {uuid.uuid4().hex}") for _ in range(args.requests)]
            off, _, o_off, _ = asyncio.run(run(url, headers, prompts, 1, {"cache-control": "no-store"}))
            miss, _, o_miss, _ = asyncio.run(run(url, headers, [body(f"q {uuid.uuid4().hex}")
                                                               for _ in range(args.requests)], 1))
            print(line(f"cache off (no-store) {o_off}", off), flush=True)
            print(line(f"misses (lookup + store) {o_miss}", miss), flush=True)
            print(f"miss overhead at p50: {percentile(miss, 0.5) - percentile(off, 0.5):+.2f} ms", flush=True)

            # Semantic: a paraphrase answered from the index is not stored under its own key, so each
            # repeat is an exact miss and a semantic hit (embed + FAISS search + Redis read).
            asyncio.run(run(url, headers, [body("How do I reverse a list in Python?", "fake/echo-faq")], 1))
            time.sleep(0.5)
            paraphrase = body("Please, how do I reverse a list in python", "fake/echo-faq")
            lat, _, outcomes, _ = asyncio.run(run(url, headers, [paraphrase] * args.requests, 1))
            print(line(f"semantic hits, c=1 {outcomes}", lat), flush=True)
            lat, rps, outcomes, _ = asyncio.run(run(url, headers, [paraphrase] * args.requests * 2, 16))
            print(line(f"semantic hits, c=16 ({rps:.0f} req/s) {outcomes}", lat), flush=True)
            unique = [body(f"q {uuid.uuid4().hex}", "fake/echo-faq") for _ in range(args.requests)]
            sem_miss, _, o_sem, _ = asyncio.run(run(url, headers, unique, 1))
            print(line(f"semantic misses (both lookups, store + index) {o_sem}", sem_miss), flush=True)
            print(f"semantic miss overhead over an exact-only miss at p50: "
                  f"{percentile(sem_miss, 0.5) - percentile(miss, 0.5):+.2f} ms", flush=True)

            async def kill_midway() -> tuple[list[float], dict[str, int], int]:
                load = asyncio.create_task(for_duration(url, headers, same, 8, 6.0))
                await asyncio.sleep(2.0)
                os.system(f"redis-cli -u {redis_url} shutdown nosave >/dev/null 2>&1")  # noqa: S605
                return await load

            lat, outcomes, failures = asyncio.run(kill_midway())
            print(line(f"Redis killed at 2 s of 6 s, c=8: {failures} failed, {outcomes}", lat), flush=True)


if __name__ == "__main__":
    main()
