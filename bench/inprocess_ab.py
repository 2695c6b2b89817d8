"""CPU per request of the ingress app alone (no Ray, no HAProxy), this checkout against another one.

    .venv/bin/python bench/inprocess_ab.py OTHER_CHECKOUT [--rounds 3] [--step-seconds 5]

OTHER_CHECKOUT is a git worktree of an older commit (``git worktree add /tmp/base <commit>``); the same
virtualenv runs both. Each round starts ``bench/inprocess_server.py`` (copied into the other checkout)
from one checkout, then from the other, against one fake upstream process, with the repo's remote test
models (``tests/conftest.py:write_configs``, local models left out), keys, metrics, access log and
usage on, cache off; and drives ``fake/echo-chat`` with non-streaming chat at c=1 and c=16 and
streams at c=1 (``Cache-Control: no-store``). It reports the server process's CPU ms per request
(warm-up included in both), req/s and p50, median over rounds. Fewer moving parts than
``bench/ingress_cpu.py --ab`` (no Ray workers, no HAProxy), so less noise on a 2-core box.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


from bench.gateway_bench import UPSTREAM_KEY, upstream_process  # noqa: E402
from bench.inprocess_server import ready_with_key, running  # noqa: E402
from bench.loadgen import Target, _psutil, run_step  # noqa: E402

BODY = {"messages": [{"role": "user", "content": "hello from the in-process benchmark"}], "max_tokens": 16}
STEPS = (("chat c=1", False, 1), ("chat c=16", False, 16), ("stream c=1", True, 1))


def configs(tree: Path, folder: Path, upstream_url: str) -> list[str]:
    """The other checkout's own test configs (its write_configs), so each side reads what it knows."""
    script = ("import sys, json; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
              "from tests.conftest import write_configs;"
              "print(json.dumps({k: str(v) for k, v in write_configs(Path(sys.argv[2]), sys.argv[3],"
              " local=False).items()}))")
    out = subprocess.run([sys.executable, "-c", script, str(tree), str(folder), upstream_url], check=True,
                         capture_output=True, text=True, cwd=tree).stdout
    paths = json.loads(out.strip().splitlines()[-1])
    return ["--models", paths["models_config"], "--providers", paths["providers_config"],
            "--routing", paths["routing_config"]]


async def measure(tree: Path, upstream_url: str, args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    folder = Path(tempfile.mkdtemp(prefix="iir-ab-"))
    env = {"IIR_TEST_UPSTREAM_KEY": UPSTREAM_KEY, "PYTHONPATH": str(tree)}
    with running(configs(tree, folder, upstream_url), env=env, cwd=tree,
                 script=tree / "bench" / "inprocess_server.py") as (base_url, pid):
        headers = await ready_with_key(base_url)
        target = Target(str(tree), f"{base_url}/v1/chat/completions", headers, "fake/echo-chat")
        server = _psutil().Process(pid)
        out: dict[str, tuple[float, ...]] = {}
        for name, stream, concurrency in STEPS:
            before = server.cpu_times()
            result = await run_step(target, BODY, scenario=name, concurrency=concurrency,
                                    duration_s=args.step_seconds, max_requests=100_000, stream=stream)
            after = server.cpu_times()
            used = (after.user + after.system) - (before.user + before.system)
            out[name] = (1000 * used / (result.requests + 2 * concurrency), result.rps, result.p50_ms)
    shutil.rmtree(folder, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=5.0)
    args = parser.parse_args(argv)
    other = args.other.resolve()
    (other / "bench").mkdir(exist_ok=True)
    shutil.copyfile(REPO / "bench" / "inprocess_server.py", other / "bench" / "inprocess_server.py")
    trees = [other, REPO]
    results: dict[tuple[Path, str], list[tuple[float, ...]]] = {}
    with upstream_process() as upstream:
        for round_no in range(1, args.rounds + 1):
            for tree in trees:
                for name, row in asyncio.run(measure(tree, upstream.base_url, args)).items():
                    results.setdefault((tree, name), []).append(row)
                    print(f"  r{round_no} {name:10} {tree}: CPU {row[0]:.3f} ms/req  {row[1]:6.0f} req/s  "
                          f"p50 {row[2]:.2f} ms", flush=True)
    print(f"\nA = {other}, B = {REPO}; median over {args.rounds} rounds\n"
          "| load | CPU ms/req A | B | req/s A | B | p50 ms A | B |\n|---|---|---|---|---|---|---|")
    for name, _, _ in STEPS:
        a, b = results[(other, name)], results[(REPO, name)]

        def med(rows: list[tuple[float, ...]], i: int) -> Any:
            return statistics.median(r[i] for r in rows)

        print(f"| {name} | {med(a, 0):.3f} | {med(b, 0):.3f} | {med(a, 1):.0f} | {med(b, 1):.0f} | "
              f"{med(a, 2):.2f} | {med(b, 2):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
