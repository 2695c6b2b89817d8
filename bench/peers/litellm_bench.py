"""IIR against the LiteLLM proxy, side by side: same fake upstream, same client, rounds interleaved.

    .venv/bin/python bench/peers/litellm_bench.py [--rounds 2] [--step-seconds 6] [--json out.json]

What it does, bounded in time (about 4 minutes with the defaults, plus LiteLLM's first install):
1. installs LiteLLM proxy ``LITELLM_VERSION`` into its own virtualenv (``bench/peers/.venv-litellm``,
   git-ignored; from PyPI, once) and starts it with 2 workers in master-key mode (no database: its
   virtual keys need Prisma binaries from the internet), one model routed to the fake upstream;
2. starts the fake OpenAI-compatible upstream (``bench/upstream_runner.py``) and the IIR graph on a
   local Ray, exactly as ``bench/gateway_bench.py`` does, with keys, metrics, access log and usage
   accounting on as shipped;
3. for each round, for each load (chat c=1/16/64, stream c=1), runs LiteLLM then each IIR port
   (A B A B): non-streaming chat with ``max_tokens`` 16 and ``Cache-Control: no-store`` (every
   request reaches the upstream), streams read to ``[DONE]``;
4. prints req/s, added p50 over the upstream alone, and gateway CPU per request, then the ratio
   IIR / LiteLLM per load (medians over rounds).

``--api responses`` times ``POST /v1/responses`` instead (non-streaming, c=1/16/64, ``store: false``
so neither gateway writes a stored response): LiteLLM passes it to the upstream's own Responses API
(its ``openai/`` provider speaks it), and IIR both passes it through (``fake/echo-responses``, a
provider with ``responses_api: true``) and translates it to chat (``fake/echo-chat``).

Everything listens on 127.0.0.1 only. Results and the exact command go in docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from bench.gateway_bench import (  # noqa: E402
    UPSTREAM_KEY,
    create_key,
    iir_graph,
    ingress_port_url,
    upstream_process,
)
from bench.loadgen import CpuMeter, StepResult, Target, metered_step, run_step  # noqa: E402
from tests.support.net import free_port  # noqa: E402

LITELLM_VERSION = "1.108.7"
LITELLM_VENV = REPO / "bench" / "peers" / ".venv-litellm"
MASTER_KEY = "sk-litellm-bench-master"
BODY = {"messages": [{"role": "user", "content": "hello from the peer benchmark please echo this"}],
        "max_tokens": 16}
NO_STORE = {"Cache-Control": "no-store"}
LOADS = [("chat", False, 1), ("chat", False, 16), ("chat", False, 64), ("stream", True, 1)]
RESPONSES_BODY = {"input": "hello from the peer benchmark please echo this", "max_output_tokens": 16,
                  "store": False}
RESPONSES_LOADS = [("responses", False, 1), ("responses", False, 16), ("responses", False, 64)]


def ensure_litellm() -> Path:
    """LiteLLM's proxy in a virtualenv of its own (its pins would fight ours); installed once."""
    binary = LITELLM_VENV / "bin" / "litellm"
    marker = LITELLM_VENV / f".installed-{LITELLM_VERSION}"
    if not marker.exists():
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} …", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run([str(LITELLM_VENV / "bin" / "pip"), "install", "-q",
                        f"litellm[proxy]=={LITELLM_VERSION}"], check=True, timeout=1200)
        marker.touch()
    return binary


@contextlib.contextmanager
def litellm_proxy(upstream_base_url: str, workdir: Path) -> Iterator[tuple[str, int]]:
    config = workdir / "litellm.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "model_list": [{"model_name": "echo", "litellm_params": {
            "model": "openai/echo-1", "api_base": upstream_base_url, "api_key": UPSTREAM_KEY}}],
        "general_settings": {"master_key": MASTER_KEY},
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }))
    port = free_port()
    env = {**os.environ, "LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOG": "ERROR",
           "LITELLM_LOCAL_MODEL_COST_MAP": "True", "DISABLE_SCHEMA_UPDATE": "True"}
    env.pop("DATABASE_URL", None)
    log = (workdir / "litellm.log").open("w")
    proc = subprocess.Popen([str(ensure_litellm()), "--config", str(config), "--host", "127.0.0.1",
                             "--port", str(port), "--num_workers", "2"], env=env, cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"litellm exited with {proc.returncode}: see {workdir / 'litellm.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/health/liveliness", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise RuntimeError("litellm did not answer within 180 s")
        yield base_url, proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
        log.close()


def tree_pids(pid: int) -> set[int]:
    import psutil

    return {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its children (LiteLLM's workers)."""
    import psutil  # Ray's vendored copy, on sys.path once ray is imported (gateway_bench imports it)

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            t = proc.cpu_times()
            total += t.user + t.system
    return total


async def run_rounds(targets: list[Target], litellm_pid: int, meter: CpuMeter,
                     args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for round_no in range(1, args.rounds + 1):
        for scenario, stream, concurrency in _loads(args):
            for target in targets:
                step = functools.partial(run_step, target, BODY, scenario=scenario, concurrency=concurrency,
                                         duration_s=args.step_seconds, max_requests=args.max_requests,
                                         stream=stream)
                peer_before = tree_cpu_s(litellm_pid)
                result: StepResult = await metered_step(meter, step)
                peer_ms = 1000 * (tree_cpu_s(litellm_pid) - peer_before) / max(1, result.requests
                                                                               + 2 * concurrency)
                cpu = peer_ms if target.name == "litellm" else result.cpu_ms_per_req.get("gateway", 0.0)
                row = {"round": round_no, "scenario": scenario, "concurrency": concurrency,
                       "target": target.name, "rps": round(result.rps, 1), "p50_ms": round(result.p50_ms, 2),
                       "p99_ms": round(result.p99_ms, 2), "errors": result.errors,
                       "cpu_ms_per_req": round(cpu, 2)}
                rows.append(row)
                print(f"  r{round_no} {scenario:6} c={concurrency:<3} {target.name:16} "
                      f"{row['rps']:7.1f} req/s "
                      f"p50 {row['p50_ms']:6.1f} ms  cpu {row['cpu_ms_per_req']:5.2f} ms/req  "
                      f"err={row['errors']}", flush=True)
    return rows


async def iir_only_rounds(base_url: str, headers: dict[str, str], args: argparse.Namespace,
                          ) -> dict[str, list[float]]:
    """Port 8000 at c=1, rounds interleaved: the model named, ``model: "auto"`` (one Classifier call
    more), and an exact cache hit (no upstream call at all). p50 ms of each, per round."""
    url = f"{base_url}/v1/chat/completions"
    targets = [Target("named", url, {**headers, **NO_STORE}, "fake/echo-chat"),
               Target("auto", url, {**headers, **NO_STORE}, "auto"),
               Target("cache-hit", url, headers, "fake/echo-chat")]  # the warm-up stores the entry
    out: dict[str, list[float]] = {t.name: [] for t in targets}
    for _ in range(args.rounds):
        for target in targets:
            result = await run_step(target, BODY, scenario="chat", concurrency=1,
                                    duration_s=args.step_seconds, max_requests=args.max_requests)
            out[target.name].append(round(result.p50_ms, 2))
    return out


def _loads(args: argparse.Namespace) -> list[tuple[str, bool, int]]:
    return RESPONSES_LOADS if args.api == "responses" else LOADS


def summary(rows: list[dict[str, Any]], direct: dict[tuple[str, int], float],
            loads: list[tuple[str, bool, int]]) -> str:
    lines = ["| load | target | req/s | added p50 ms | CPU ms/req | req/s ÷ LiteLLM |",
             "|---|---|---|---|---|---|"]
    for scenario, _, concurrency in loads:
        mine = [r for r in rows if (r["scenario"], r["concurrency"]) == (scenario, concurrency)]
        med = {name: {k: statistics.median(r[k] for r in mine if r["target"] == name)
                      for k in ("rps", "p50_ms", "cpu_ms_per_req")}
               for name in dict.fromkeys(r["target"] for r in mine)}
        peer = med.get("litellm", {}).get("rps") or float("nan")
        for name, m in med.items():
            added = m["p50_ms"] - direct.get((scenario, concurrency), 0.0)
            lines.append(f"| {scenario} c={concurrency} | {name} | {m['rps']:.0f} | {added:+.1f} | "
                         f"{m['cpu_ms_per_req']:.1f} | {m['rps'] / peer:.2f}× |")
    return "\n".join(lines)


async def measure_direct(upstream_url: str, args: argparse.Namespace) -> dict[tuple[str, int], float]:
    """The upstream alone at each load: what 'added p50' is measured against."""
    auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    path, body = ("responses", RESPONSES_BODY) if args.api == "responses" else ("chat/completions", None)
    target = Target("direct", f"{upstream_url}/{path}", auth, "echo-1", body)
    out = {}
    for scenario, stream, concurrency in _loads(args):
        result = await run_step(target, BODY, scenario=scenario, concurrency=concurrency,
                                duration_s=min(3.0, args.step_seconds), max_requests=args.max_requests,
                                stream=stream)
        out[(scenario, concurrency)] = result.p50_ms
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds, interleaved (default 2)")
    parser.add_argument("--step-seconds", type=float, default=6.0)
    parser.add_argument("--max-requests", type=int, default=3000, help="cap per step")
    parser.add_argument("--ingress-replicas", type=int, default=1,
                        help="ingress replicas behind port 8000 (the ingress-port row uses one of them)")
    parser.add_argument("--api", choices=("chat", "responses"), default="chat",
                        help="what to time: chat completions (and streams), or /v1/responses")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    ensure_litellm()
    with (tempfile.TemporaryDirectory(prefix="iir-peers-") as tmp, upstream_process() as upstream):
        from tests.conftest import write_configs

        # Remote models only: the comparison is the gateway's own cost, and "auto" routes among them.
        configs = write_configs(Path(tmp), upstream.base_url, local=False)
        with (litellm_proxy(upstream.base_url, Path(tmp)) as (litellm_url, litellm_pid),
              iir_graph(configs, f"sqlite:///{tmp}/iir.db", throughput_optimized=True,
                        ingress_replicas=args.ingress_replicas) as graph):
            headers = create_key(graph.base_url)
            # LiteLLM is metered on its own (tree_cpu_s): none of its processes counts as IIR's.
            meter = CpuMeter(exclude_pids={upstream.pid, *tree_pids(litellm_pid)},
                             upstream_pid=upstream.pid)
            meter.measure_idle(3.0)
            peer_auth = {"Authorization": f"Bearer {MASTER_KEY}", **NO_STORE}
            if args.api == "responses":
                targets = [
                    Target("litellm", f"{litellm_url}/v1/responses", peer_auth, "echo", RESPONSES_BODY),
                    Target("iir-8000-pass", f"{graph.base_url}/v1/responses", {**headers, **NO_STORE},
                           "fake/echo-responses", RESPONSES_BODY),
                    Target("iir-8000-chat", f"{graph.base_url}/v1/responses", {**headers, **NO_STORE},
                           "fake/echo-chat", RESPONSES_BODY),
                ]
            else:
                targets = [
                    Target("litellm", f"{litellm_url}/v1/chat/completions", peer_auth, "echo"),
                    Target("iir-8000", f"{graph.base_url}/v1/chat/completions", {**headers, **NO_STORE},
                           "fake/echo-chat"),
                ]
                if (ingress := ingress_port_url(meter)) is not None:
                    targets.append(Target("iir-ingress-port", f"{ingress}/v1/chat/completions",
                                          {**headers, **NO_STORE}, "fake/echo-chat"))
            direct = asyncio.run(measure_direct(upstream.base_url, args))
            rows = asyncio.run(run_rounds(targets, litellm_pid, meter, args))
            extra = asyncio.run(iir_only_rounds(graph.base_url, headers, args)) if args.api == "chat" else {}
    table = summary(rows, direct, _loads(args))
    if not extra:
        print("\n" + table)
        if args.json:
            args.json.write_text(json.dumps({"litellm": LITELLM_VERSION, "rows": rows, "table": table},
                                            indent=1))
        return 0
    median = {name: statistics.median(p50s) for name, p50s in extra.items()}
    table += (f"\n\nPort 8000, c=1, p50 over rounds {extra}:\n"
              f"- exact cache hit: {median['cache-hit']:.1f} ms end to end\n"
              f"- model \"auto\" adds {median['auto'] - median['named']:+.1f} ms over naming the model")
    print("\n" + table)
    if args.json:
        args.json.write_text(json.dumps({"litellm": LITELLM_VERSION, "rows": rows, "iir_c1_p50": extra,
                                         "table": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
