"""What ``model: "auto"`` adds over naming the model: port 8000, c=1, rounds interleaved (issue 13).

    .venv/bin/python bench/auto_latency_bench.py [--rounds 5] [--step-seconds 4] [--py-spy out_dir]

Starts the graph as bench/peers/litellm_bench.py does (fake upstream, ``write_configs(local=False)``:
"auto" routes the benchmark's chat prompt to ``fake/echo-chat``), then alternates a step naming the
model with a step of ``model: "auto"``, both ``Cache-Control: no-store`` so neither is an exact-cache
hit; the order alternates from round to round. Prints each round's p50s and the median of what
"auto" added. ``--py-spy DIR`` records the Ingress replica (and a Classifier replica, where the graph
has one) during one extra "auto" step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gateway_bench import create_key, iir_graph, upstream_process  # noqa: E402
from bench.loadgen import Target, run_step  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "hello from the peer benchmark please echo this"}],
        "max_tokens": 16}
NO_STORE = {"Cache-Control": "no-store"}


async def rounds(base_url: str, headers: dict[str, str], args: argparse.Namespace) -> dict[str, list[float]]:
    url = f"{base_url}/v1/chat/completions"
    targets = [Target("named", url, {**headers, **NO_STORE}, "fake/echo-chat"),
               Target("auto", url, {**headers, **NO_STORE}, "auto")]
    out: dict[str, list[float]] = {t.name: [] for t in targets}
    for i in range(args.rounds):
        for target in targets if i % 2 == 0 else targets[::-1]:
            result = await run_step(target, BODY, scenario="chat", concurrency=1,
                                    duration_s=args.step_seconds, max_requests=100_000)
            if result.errors:
                print(f"  {target.name}: {result.errors} errors {result.error_samples}", flush=True)
            out[target.name].append(round(result.p50_ms, 2))
        print(f"  round {i + 1}: named {out['named'][-1]:.2f} ms, auto {out['auto'][-1]:.2f} ms "
              f"(+{out['auto'][-1] - out['named'][-1]:.2f})", flush=True)
    return out


def replica_pids() -> dict[str, int]:
    import psutil

    found = {}
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            line = " ".join(proc.cmdline())
            for name in ("Ingress", "Classifier"):
                if f":{name}" in line and "ServeReplica" in line:
                    found[name] = proc.pid
    return found


async def profiled_step(base_url: str, headers: dict[str, str], args: argparse.Namespace) -> None:
    args.py_spy.mkdir(parents=True, exist_ok=True)
    seconds = int(args.step_seconds) + 2
    py_spy = str(Path(sys.executable).parent / "py-spy")
    procs = [subprocess.Popen([py_spy, "record", "-p", str(pid), "-d", str(seconds), "-r", "500", "-f", "raw",
                               "-o", str(args.py_spy / f"{name}.txt"), "--nonblocking"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, pid in replica_pids().items()]
    target = Target("auto", f"{base_url}/v1/chat/completions", {**headers, **NO_STORE}, "auto")
    await run_step(target, BODY, scenario="chat", concurrency=1, duration_s=seconds, max_requests=100_000)
    for proc in procs:
        proc.wait(timeout=60)
    print(f"py-spy profiles in {args.py_spy}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step-seconds", type=float, default=4.0)
    parser.add_argument("--py-spy", type=Path, help="record the replicas here (py-spy raw format)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="iir-auto-") as tmp, upstream_process() as upstream:
        from tests.conftest import write_configs

        configs = write_configs(Path(tmp), upstream.base_url, local=False)
        with iir_graph(configs, f"sqlite:///{tmp}/iir.db", throughput_optimized=True) as graph:
            headers = create_key(graph.base_url)
            out = asyncio.run(rounds(graph.base_url, headers, args))
            if args.py_spy:
                asyncio.run(profiled_step(graph.base_url, headers, args))
    added = [a - n for a, n in zip(out["auto"], out["named"], strict=True)]
    print(f"p50 per round {out}\nmodel \"auto\" adds {statistics.median(added):+.2f} ms (median of rounds; "
          f"named {statistics.median(out['named']):.2f}, auto {statistics.median(out['auto']):.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
