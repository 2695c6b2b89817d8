"""What groups, retries and cooldowns cost and buy (issue 14).

    .venv/bin/python bench/resilience_bench.py [--rounds 3] [--step-seconds 5] [--json out.json]

Two fake upstreams (each its own process) and the ingress app alone under uvicorn
(``bench/inprocess_server.py``: the request pipeline without Serve's hop or HAProxy, so the number is
the pipeline's own). Keys, metrics, access log and usage accounting are on; the response cache is off.

1. **Happy-path cost**: the same chat request (``max_tokens`` 8, ``Cache-Control: no-store``) sent to a
   plain model (``a/echo``) and to a group of two (``echo``, least-busy, members ``a/echo``/``b/echo``),
   rounds interleaved A B A B, at c=1 and c=16: req/s, p50 and the gateway process's CPU ms per
   request (idle subtracted).
2. **Failover**: c=16 on the group for 30 s; upstream ``a`` is SIGKILLed at 10 s and started again on
   its port at 20 s. Failed requests, p50/p99/max latency in each 5 s window, the first and the last
   request answered by ``a`` around the kill, and when ``a`` served again after the restart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import yaml  # noqa: E402

from bench.gateway_bench import UPSTREAM_KEY, upstream_process  # noqa: E402
from bench.inprocess_server import ready_with_key, running  # noqa: E402
from bench.loadgen import CpuMeter, Target, percentile, run_step  # noqa: E402

CHAT = {"messages": [{"role": "user", "content": "hello from the resilience benchmark"}], "max_tokens": 8}
COOLDOWN_S = 2.0


def write_catalog(folder: Path, a_url: str, b_url: str) -> list[str]:
    models = {"default_model": "a/echo",
              "models": [{"id": "a/echo", "engine": "openai", "task": "chat", "source": "echo-1"},
                         {"id": "b/echo", "engine": "openai", "task": "chat", "source": "echo-1"}],
              "groups": [{"id": "echo", "members": ["a/echo", "b/echo"]}],
              "resilience": {"timeouts": {"first_byte_s": 2}, "cooldown": {"cooldown_s": COOLDOWN_S}}}
    providers = {"providers": [{"name": n, "base_url": u, "api_key_env": "IIR_TEST_UPSTREAM_KEY"}
                               for n, u in (("a", a_url), ("b", b_url))]}
    routing = yaml.safe_load((REPO / "configs" / "routing.yaml").read_text())
    routing.update(default="a/echo", categories={}, when_complex={})
    for name, doc in (("models", models), ("providers", providers), ("routing", routing)):
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc))
    return ["--models", str(folder / "models.yaml"), "--providers", str(folder / "providers.yaml"),
            "--routing", str(folder / "routing.yaml")]


async def happy_path(base_url: str, headers: dict[str, str], meter: CpuMeter,
                     args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    url = f"{base_url}/v1/chat/completions"
    targets = [Target("model", url, headers, "a/echo"), Target("group", url, headers, "echo")]
    for round_no in range(1, args.rounds + 1):
        for concurrency in (1, 16):
            for target in targets:
                before = meter.snapshot()
                started = time.perf_counter()
                result = await run_step(target, CHAT, scenario="chat", concurrency=concurrency,
                                        duration_s=args.step_seconds, max_requests=20000)
                elapsed = time.perf_counter() - started
                cpu = meter.per_request(before, meter.snapshot(), elapsed, result.requests + 2 * concurrency)
                row = {"round": round_no, "target": target.name, "concurrency": concurrency,
                       "rps": round(result.rps, 1), "p50_ms": round(result.p50_ms, 3),
                       "gateway_cpu_ms": round(cpu.get("gateway", 0.0), 3),
                       "errors": result.errors}
                rows.append(row)
                print(f"  r{round_no} c={concurrency:<2} {target.name:5} {row['rps']:7.1f} req/s "
                      f"p50 {row['p50_ms']:6.2f} ms  cpu {row['gateway_cpu_ms']:.3f} ms/req "
                      f"err={row['errors']}", flush=True)
    return rows


async def failover(base_url: str, headers: dict[str, str], a_pid: int, restart: Any) -> dict[str, Any]:
    outcomes: list[tuple[float, float, int, str]] = []  # (sent at, latency s, status, model)
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async def caller() -> None:
            while (sent := time.monotonic() - started) < 30:
                t0 = time.perf_counter()
                try:
                    async with http.post(f"{base_url}/v1/chat/completions", headers=headers,
                                         json={**CHAT, "model": "echo"}) as r:
                        await r.read()
                        outcomes.append((sent, time.perf_counter() - t0, r.status,
                                         r.headers.get("x-iir-model", "")))
                except aiohttp.ClientError:
                    outcomes.append((sent, time.perf_counter() - t0, 0, ""))

        async def chaos() -> None:
            await asyncio.sleep(10)
            os.kill(a_pid, signal.SIGKILL)
            await asyncio.sleep(10)
            restart()

        await asyncio.gather(chaos(), *(caller() for _ in range(16)))
    windows = []
    for start in range(0, 30, 5):
        lat = [1000 * lat for sent, lat, _, _ in outcomes if start <= sent < start + 5]
        windows.append({"window_s": f"{start}-{start + 5}", "requests": len(lat),
                        "p50_ms": round(percentile(lat, 0.5), 2), "p99_ms": round(percentile(lat, 0.99), 2),
                        "max_ms": round(max(lat), 1) if lat else 0.0})
    by_a = [sent for sent, _, status, model in outcomes if model == "a/echo" and status == 200]
    return {"requests": len(outcomes), "failed": sum(1 for o in outcomes if o[2] != 200),
            "last_a_before_kill_s": round(max((t for t in by_a if t < 20), default=0.0), 3),
            "first_a_after_restart_s": round(min((t for t in by_a if t >= 20), default=float("nan")), 3),
            "cooldown_s": COOLDOWN_S, "windows": windows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(upstream_process())
        b = stack.enter_context(upstream_process())
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="iir-resilience-")))
        env = {"IIR_TEST_UPSTREAM_KEY": UPSTREAM_KEY}
        base_url, _ = stack.enter_context(running(write_catalog(folder, a.base_url, b.base_url), env=env))
        headers = asyncio.run(ready_with_key(base_url))
        meter = CpuMeter(exclude_pids={a.pid, b.pid}, upstream_pid=a.pid)
        meter.measure_idle(2.0)
        print("happy path: a plain model against a group of two, interleaved", flush=True)
        rows = asyncio.run(happy_path(base_url, headers, meter, args))
        print("failover: c=16 on the group for 30 s; a killed at 10 s, restarted at 20 s", flush=True)
        report = asyncio.run(failover(base_url, headers, a.pid,
                                      lambda: stack.enter_context(upstream_process(port=a.port))))
    summary = []
    for concurrency in (1, 16):
        for name in ("model", "group"):
            mine = [r for r in rows if r["target"] == name and r["concurrency"] == concurrency]
            summary.append({"target": name, "concurrency": concurrency,
                            **{k: statistics.median(r[k] for r in mine) for k in ("rps", "p50_ms",
                                                                                   "gateway_cpu_ms")}})
    print("\n| load | target | req/s | p50 ms | gateway CPU ms/req |\n|---|---|---|---|---|")
    for s in summary:
        print(f"| c={s['concurrency']} | {s['target']} | {s['rps']:.0f} | {s['p50_ms']:.2f} | "
              f"{s['gateway_cpu_ms']:.3f} |")
    print(f"\nfailover: {report['requests']} requests, {report['failed']} failed; last answer from a before "
          f"the kill at {report['last_a_before_kill_s']} s, first after the restart (20 s) at "
          f"{report['first_a_after_restart_s']} s (cooldown {COOLDOWN_S} s)")
    for w in report["windows"]:
        print(f"  {w['window_s']:>6} s: {w['requests']:5} req  p50 {w['p50_ms']:6.2f}  "
              f"p99 {w['p99_ms']:7.2f}  max {w['max_ms']:7.1f} ms")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "failover": report}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
