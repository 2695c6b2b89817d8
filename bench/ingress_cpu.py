"""The ingress replica's CPU per request, its throughput, and where its CPU goes (issue 13 part 3).

    .venv/bin/python bench/ingress_cpu.py [--json out.json]          # one build: this checkout
    .venv/bin/python bench/ingress_cpu.py --profile /tmp/prof        # plus py-spy of the ingress
    .venv/bin/python bench/ingress_cpu.py --ab /tmp/base --rounds 3  # A B A B …: that checkout vs this

Starts the fake upstream and the IIR graph as ``bench/gateway_bench.py`` does (HAProxy on the
gateway port, the repo's remote test models only: no local model is loaded, so nothing else competes
for the two cores), with keys, metrics, access log and usage accounting on as shipped. Then drives
``fake/echo-chat`` with non-streaming chat (``max_tokens`` 16, ``Cache-Control: no-store``: every
request reaches the upstream) at c=1/16/64 and streams at c=1/16, through the gateway port
(HAProxy → ingress) and the ingress replica's own port, and reports req/s, p50 and the ingress
process's CPU ms per request (``CpuMeter``, idle rate subtracted).

``--profile DIR`` also samples the ingress replica with py-spy (``record --nonblocking -F``, GIL
holders only) during a chat and a stream step at c=16 through the gateway port, and prints the top
functions by own and cumulative share of the samples.

``--ab OTHER`` runs this script from OTHER (a git worktree of an older commit, with the same
virtualenv; the script is copied there) and from this checkout, alternately, ``--rounds`` times each,
and prints the median and range of each cell per build. One Ray cluster per run, shut down after it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gateway_bench import create_key, iir_graph, upstream_process  # noqa: E402
from bench.loadgen import CpuMeter, Target, metered_step, process_group, run_step  # noqa: E402
from tests.support.net import free_port  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "hello from the ingress benchmark please echo this"}],
        "max_tokens": 16}
NO_STORE = {"Cache-Control": "no-store"}
# (scenario, stream, concurrency, targets)
LOADS = [("chat", False, 1, ("gateway", "ingress")), ("chat", False, 16, ("gateway", "ingress")),
         ("chat", False, 64, ("gateway", "ingress")), ("stream", True, 1, ("gateway",)),
         ("stream", True, 16, ("gateway",))]
PROFILE_LOADS = [("chat", False, 16), ("stream", True, 16)]


def _ingress_url(meter: CpuMeter) -> str | None:
    for host, port in meter.listening_ports("ingress", 32000, 33000):
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    return None


def _ingress_pid(meter: CpuMeter) -> int:
    psutil = meter._ps
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        if process_group(proc) == "ingress":
            return int(proc.pid)
    raise RuntimeError("no ingress replica process found")


async def _steps(targets: dict[str, Target], meter: CpuMeter,
                 args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for scenario, stream, concurrency, names in LOADS:
        for name in names:
            result = await metered_step(meter, functools.partial(
                run_step, targets[name], BODY, scenario=scenario, concurrency=concurrency,
                duration_s=args.step_seconds, max_requests=args.max_requests, stream=stream))
            cpu = result.cpu_ms_per_req
            row = {"load": f"{scenario} c={concurrency}", "target": name, "requests": result.requests,
                   "errors": result.errors, "rps": round(result.rps, 1), "p50_ms": round(result.p50_ms, 2),
                   "ingress_cpu_ms": round(cpu.get("ingress", 0.0), 3),
                   "haproxy_cpu_ms": round(cpu.get("haproxy", 0.0), 3),
                   "gateway_cpu_ms": round(cpu.get("gateway", 0.0), 3)}
            out.append(row)
            print(f"  {row['load']:12} {name:8} n={row['requests']:<5} err={row['errors']} "
                  f"{row['rps']:7.1f} req/s  p50 {row['p50_ms']:6.2f} ms  "
                  f"ingress {row['ingress_cpu_ms']:.2f} ms/req  haproxy {row['haproxy_cpu_ms']:.2f}",
                  flush=True)
    return out


async def _profile(target: Target, pid: int, folder: Path, args: argparse.Namespace) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for scenario, stream, concurrency in PROFILE_LOADS:
        raw = folder / f"{scenario}-c{concurrency}.txt"
        spy = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "py-spy"), "record", "-p", str(pid), "-d",
            str(int(args.profile_seconds)), "-r", "200", "-F", "--gil", "--nonblocking", "-f", "raw",
            "-o", str(raw), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        result = await run_step(target, BODY, scenario=scenario, concurrency=concurrency,
                                duration_s=args.profile_seconds + 2, max_requests=10**9, stream=stream)
        await spy.wait()
        print(f"\nprofile {scenario} c={concurrency}: {result.requests} requests, {result.rps:.0f} req/s, "
              f"{raw}", flush=True)
        print(summarize(raw, args.top))


def summarize(raw: Path, top: int) -> str:
    """Own and cumulative shares of py-spy's folded stacks, by function (file:function)."""
    own: collections.Counter[str] = collections.Counter()
    cumulative: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        count = int(count_text)
        total += count
        frames = [_frame_name(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for name in set(frames):
            cumulative[name] += count
    lines = [f"{total} samples"]
    for title, counter in (("own", own), ("cumulative", cumulative)):
        lines.append(f"  top {top} by {title}:")
        lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in counter.most_common(top)]
    return "\n".join(lines)


def _frame_name(frame: str) -> str:
    func, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.replace(str(REPO) + "/", "")
    return f"{path}:{func}"


def _own_ports() -> None:
    """Ports of our own, so a run can share the box with another Ray graph (a test suite, say)."""
    os.environ.update({"RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
                       "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
                       "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "32000",
                       "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "32999",
                       "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "42000",
                       "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "42999"})


def measure(args: argparse.Namespace) -> dict[str, Any]:
    _own_ports()
    with tempfile.TemporaryDirectory(prefix="iir-ingress-") as tmp, upstream_process() as upstream:
        from tests.conftest import write_configs

        configs = write_configs(Path(tmp), upstream.base_url, local=False)
        with iir_graph(configs, f"sqlite:///{tmp}/iir.db", throughput_optimized=True) as graph:
            headers = {**create_key(graph.base_url), **NO_STORE}
            meter = CpuMeter(exclude_pids={upstream.pid}, upstream_pid=upstream.pid)
            ingress_url = _ingress_url(meter)
            if ingress_url is None:
                raise RuntimeError("the ingress replica has no port of its own")
            targets = {"gateway": Target("gateway", f"{graph.base_url}/v1/chat/completions", headers,
                                         "fake/echo-chat"),
                       "ingress": Target("ingress", f"{ingress_url}/v1/chat/completions", headers,
                                         "fake/echo-chat")}
            print(f"graph ready after {graph.startup_s:.1f} s ({REPO}); load average "
                  f"{os.getloadavg()[0]:.2f}", flush=True)
            meter.measure_idle(3.0)
            rows = asyncio.run(_steps(targets, meter, args)) if not args.profile_only else []
            if args.profile:
                asyncio.run(_profile(targets["gateway"], _ingress_pid(meter), args.profile, args))
    return {"repo": str(REPO), "rows": rows}


def ab(args: argparse.Namespace) -> None:
    """Alternate runs of the other checkout and this one; medians per cell."""
    other = args.ab.resolve()
    shutil.copy(__file__, other / "bench" / Path(__file__).name)
    builds = {"A": other, "B": REPO}
    results: dict[str, list[list[dict[str, Any]]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="iir-ab-") as tmp:
        for round_ in range(args.rounds):
            for label, repo in builds.items():
                out = Path(tmp) / f"{label}{round_}.json"
                print(f"\n=== round {round_ + 1}, {label}: {repo}", flush=True)
                command = [sys.executable, str(repo / "bench" / "ingress_cpu.py"), "--json", str(out),
                           "--step-seconds", str(args.step_seconds), "--max-requests", str(args.max_requests)]
                env = {**os.environ, "PYTHONPATH": str(repo)}
                if subprocess.run(command, cwd=repo, env=env).returncode != 0:
                    print(f"run {label}{round_} failed", flush=True)
                    continue
                results[label].append(json.loads(out.read_text())["rows"])
    print(f"\nA = {other}, B = {REPO}; median (min–max) over rounds")
    print("| load | target | ingress CPU ms/req A | B | req/s A | B | p50 ms A | B |")
    print("|---|---|---|---|---|---|---|---|")
    for i, row in enumerate(results["B"][0] if results["B"] else []):
        cells = []
        for field in ("ingress_cpu_ms", "rps", "p50_ms"):
            for label in ("A", "B"):
                values = [run[i][field] for run in results[label] if len(run) > i]
                cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"
                             if values else "—")
        print(f"| {row['load']} | {row['target']} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--step-seconds", type=float, default=6.0)
    parser.add_argument("--max-requests", type=int, default=4000)
    parser.add_argument("--profile", type=Path, help="also write py-spy profiles here and summarize them")
    parser.add_argument("--profile-only", action="store_true", help="skip the measured steps")
    parser.add_argument("--profile-seconds", type=float, default=15.0)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--ab", type=Path, help="another checkout to alternate with this one")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.ab:
        ab(args)
        return 0
    result = measure(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
