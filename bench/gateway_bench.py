"""What the IIR gateway adds on top of a provider, and what the local CPU model delivers through it.

    .venv/bin/python bench/gateway_bench.py [--json out.json]
    .venv/bin/python bench/gateway_bench.py --no-throughput-optimized   # Serve's defaults, c=1/16 only
    .venv/bin/python bench/gateway_bench.py --upstream-delay-ms 50 --concurrency 16 64 \
        --stream-concurrency --local-requests 0                          # a slow provider

Starts a fake OpenAI-compatible upstream in its own process and the real IIR graph on a local Ray
(``ray.init(num_cpus=4)``, SQLite key store, ``configs/models.yaml`` plus remote models on the fake
upstream), then drives ``fake/echo-chat`` with the same asyncio client (aiohttp, see bench/loadgen.py)
three ways:

    direct            the upstream itself                          (the baseline)
    iir-proxy         port 8000: Ray's HAProxy (IIR's default) or   proxy → ingress replica → upstream
                      Serve's Python proxy (``--data-plane python``)
    iir-ingress-port  the ingress replica's own HTTP port (30000+,  ingress replica → upstream
                      only with RAY_SERVE_THROUGHPUT_OPTIMIZED=1)

and finally ``local/smollm2-135m`` through the router, then (graph shut down) in-process.
See docs/PERFORMANCE.md for results and what each column means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script (``make bench``), not only as ``-m bench.gateway_bench``
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench import local_model  # noqa: E402
from bench.loadgen import CpuMeter, StepResult, Target, metered_step, run_step  # noqa: E402
from bench.report import render  # noqa: E402
from serve_app.dataplane import DataPlane  # noqa: E402
from tests.support.env import data_plane_env  # noqa: E402
from tests.support.net import free_port, wait_ready  # noqa: E402

UPSTREAM_KEY = "sk-upstream-bench"
CHAT_BODY = {"messages": [{"role": "user", "content": "hello from the gateway benchmark please echo this"}],
             "max_tokens": 8}
# The same question through /v1/responses (stored, as by default): translated to chat and back.
RESPONSES_BODY = {"input": "hello from the gateway benchmark please echo this", "max_output_tokens": 8}


@dataclass(frozen=True)
class Upstream:
    port: int
    pid: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@contextlib.contextmanager
def upstream_process(delay_ms: float = 0.0, port: int = 0) -> Iterator[Upstream]:
    # Its own session: a Ctrl-C reaches only us, and we stop it in order (after Ray).
    command = [sys.executable, "-m", "bench.upstream_runner", "--api-key", UPSTREAM_KEY,
               "--first-byte-delay-ms", str(delay_ms), "--port", str(port)]
    proc = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fake upstream exited with {proc.wait()}")
        info = json.loads(line)
        yield Upstream(port=int(info["port"]), pid=int(info["pid"]))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class Graph:
    base_url: str
    startup_s: float






@contextlib.contextmanager
def iir_graph(configs: dict[str, Path], database_url: str, *, throughput_optimized: bool,
              data_plane: DataPlane = "haproxy", ingress_replicas: int = 1) -> Iterator[Graph]:
    # Read by every Ray process (and by this driver's copy of Serve), so set before Ray is imported.
    # Serve's own defaults (not throughput-optimized) have no ingress port for HAProxy to send to.
    data_plane = data_plane if throughput_optimized else "python"
    os.environ.update({
        **data_plane_env(data_plane),
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if throughput_optimized else "0",
        # Serve keeps a direct-ingress replica draining for 30 s at shutdown so outside load balancers
        # notice; nothing outside this script is watching, and the wait would be a sixth of the run.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "IIR_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "IIR_DATABASE_URL": database_url,
        **{f"IIR_{k.upper()}": str(v) for k, v in configs.items()},
    })
    import ray
    from ray import serve

    from serve_app.builder import build_app

    port = free_port()
    start = time.perf_counter()
    # address="local": a new cluster of our own, never one some `ray start` left on this machine.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    # Ray's own SIGTERM handler ends the process on the spot; ours unwinds like Ctrl-C, through
    # every ``finally``, so Serve, Ray and the upstream all stop.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"ingress_replicas": ingress_replicas}), name="iir", route_prefix="/",
                  blocking=False)
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(base_url, timeout_s=240)
        yield Graph(base_url=base_url, startup_s=time.perf_counter() - start)
    finally:
        stop = time.perf_counter()
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        print(f"graph shut down in {time.perf_counter() - stop:.1f} s", flush=True)


def ingress_cpu_by_pid() -> dict[int, float]:
    """CPU seconds of each ingress replica so far: how evenly HAProxy spreads the load across them."""
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            if ":Ingress" in " ".join(proc.cmdline()):
                times = proc.cpu_times()
                found[proc.pid] = times.user + times.system
        except psutil.Error:
            continue
    return found


def create_key(base_url: str) -> dict[str, str]:
    r = httpx.post(f"{base_url}/api/v1/apikeys", json={"description": "bench", "priority": 10}, timeout=30)
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


def ingress_port_url(meter: CpuMeter) -> str | None:
    """The ingress replica's own HTTP port (direct ingress), found from its listening sockets."""
    for host, port in meter.listening_ports("ingress", 30000, 31000):
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return url
    return None


async def _remote_steps(targets: list[Target], meter: CpuMeter, args: argparse.Namespace,
                        log: list[StepResult]) -> None:
    plan = [("chat", False, c) for c in args.concurrency]
    plan += [("stream", True, c) for c in args.stream_concurrency]
    for scenario, stream, concurrency in plan:
        for target in targets:
            if stream and target.body is not None:
                continue  # typed events end without [DONE]: the stream steps time chat only
            result = await metered_step(meter, functools.partial(
                run_step, target, CHAT_BODY, scenario=scenario, concurrency=concurrency,
                duration_s=args.step_seconds, max_requests=args.max_requests, stream=stream,
                client=args.client))
            log.append(result)
            print(f"  {scenario:6} {target.name:16} c={concurrency:<3} n={result.requests:<5} "
                  f"err={result.errors} {result.rps:7.1f} req/s  p50 {result.p50_ms:6.1f} ms  "
                  f"p99 {result.p99_ms:6.1f} ms", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"meta": _meta(args), "steps": [], "local": {}}
    steps: list[StepResult] = []
    with (tempfile.TemporaryDirectory(prefix="iir-bench-") as tmp,
          upstream_process(args.upstream_delay_ms) as upstream):
        from tests.conftest import write_configs

        configs = write_configs(Path(tmp), upstream.base_url)
        print(f"fake upstream on {upstream.base_url} (pid {upstream.pid}); starting the graph", flush=True)
        database_url = f"sqlite:///{tmp}/iir.db"
        with iir_graph(configs, database_url, throughput_optimized=args.throughput_optimized,
                       data_plane=args.data_plane, ingress_replicas=args.ingress_replicas) as graph:
            out["meta"]["startup_s"] = round(graph.startup_s, 1)
            print(f"graph ready on {graph.base_url} after {graph.startup_s:.1f} s", flush=True)
            headers = create_key(graph.base_url)
            meter = CpuMeter(exclude_pids={upstream.pid}, upstream_pid=upstream.pid)
            out["meta"]["idle_cpu_ms_per_s"] = meter.measure_idle(3.0)
            out["meta"]["niceness"] = meter.niceness()
            targets = [
                Target("direct", f"{upstream.base_url}/chat/completions",
                       {"Authorization": f"Bearer {UPSTREAM_KEY}"}, "echo-1"),
                Target("iir-proxy", f"{graph.base_url}/v1/chat/completions", headers, "fake/echo-chat"),
            ]
            if args.responses:
                targets.append(Target("iir-responses", f"{graph.base_url}/v1/responses", headers,
                                      "fake/echo-chat", RESPONSES_BODY))
            ingress_url = ingress_port_url(meter) if args.throughput_optimized else None
            out["meta"]["ingress_port_url"] = ingress_url
            if ingress_url:
                targets.append(Target("iir-ingress-port", f"{ingress_url}/v1/chat/completions", headers,
                                      "fake/echo-chat"))
            ingress_before = ingress_cpu_by_pid()
            try:
                asyncio.run(_remote_steps(targets, meter, args, steps))
                out["meta"]["ingress_cpu_s_by_pid"] = spread = {
                    pid: round(cpu - ingress_before.get(pid, 0.0), 1)
                    for pid, cpu in ingress_cpu_by_pid().items()}
                print(f"CPU seconds per ingress replica over the run: {spread}", flush=True)
                if args.local_requests:
                    print("local model through the router...", flush=True)
                    out["local"]["router"] = asyncio.run(
                        local_model.through_router(graph.base_url, headers, args.local_requests))
            finally:
                out["steps"] = [s.to_json() for s in steps]
        if args.local_requests:
            print("local model in-process (graph shut down)...", flush=True)
            out["local"]["in_process"] = asyncio.run(local_model.in_process(
                configs["models_config"], configs["providers_config"], args.local_requests))
    out["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _meta(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()], "ray": version("ray"),
            "throughput_optimized": args.throughput_optimized, "data_plane": args.data_plane,
            "ingress_replicas": args.ingress_replicas,
            "step_seconds": args.step_seconds,
            "max_requests": args.max_requests, "client": args.client,
            "upstream_delay_ms": args.upstream_delay_ms, "argv": sys.argv[1:]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--data-plane", choices=["haproxy", "python"], default="haproxy",
                        help="what serves port 8000: Ray's HAProxy (IIR's default) or Serve's Python proxy")
    parser.add_argument("--ingress-replicas", type=int, default=1,
                        help="ingress replicas behind port 8000 (the iir-ingress-port row uses one of them)")
    parser.add_argument("--no-throughput-optimized", dest="throughput_optimized", action="store_false",
                        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=0 (Serve's defaults); non-stream c=1/16 only")
    parser.add_argument("--responses", action="store_true",
                        help="also time /v1/responses on port 8000 (non-streaming steps)")
    parser.add_argument("--step-seconds", type=float, default=6.0, help="timed length of each load step")
    parser.add_argument("--max-requests", type=int, default=3000, help="cap on requests per load step")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="non-stream concurrency levels (default 1 16 64)")
    parser.add_argument("--stream-concurrency", type=int, nargs="*", default=None,
                        help="stream concurrency levels (default 1 16)")
    parser.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp",
                        help="load-generator client (httpx collapses at high concurrency: bench/loadgen.py)")
    parser.add_argument("--upstream-delay-ms", type=float, default=0.0,
                        help="the fake upstream waits this long per request (keeps calls in flight)")
    parser.add_argument("--local-requests", type=int, default=None,
                        help="local-model requests per measurement, 0 skips it (default 5)")
    return parser


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    variant = not args.throughput_optimized  # the variant answers one question: c=1/16 non-stream
    if args.concurrency is None:
        args.concurrency = [1, 16] if variant else [1, 16, 64]
    if args.stream_concurrency is None:
        args.stream_concurrency = [] if variant else [1, 16]
    if args.local_requests is None:
        args.local_requests = 0 if variant else 5
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        results = run(args)
    except KeyboardInterrupt:
        print("interrupted; Ray and the upstream were shut down", file=sys.stderr)
        return 130
    print()
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0 if all(s["errors"] == 0 for s in results["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
