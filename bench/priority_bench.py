"""Priority that holds under overload: the acceptance benchmark of issue 15.

    .venv/bin/python bench/priority_bench.py [--loaded-s 40] [--low-callers 16] [--json out.json]

Starts the real IIR graph on a local Ray (``iir_graph`` of bench/gateway_bench.py: SQLite key store,
the repo's configs with ``local/smollm2-135m`` as the only local model, llama.cpp on one core) and
talks to it over HTTP only, so it measures whatever scheduling the gateway has. Two keys, "low"
(priority 1) and "high" (priority 100), send the same chat completion (48 tokens, temperature 0,
``Cache-Control: no-store`` so the response cache stays out of it), so their latencies compare.

1. **Unloaded**: the high key alone, one request every 0.5 s (the next at once when one takes
   longer), 20 requests: p50/p99.
2. **Loaded**: 16 low callers in a closed loop. A refusal (503 or 429) with ``Retry-After`` is slept
   off as the openai SDK does (``retry-after-ms`` first; used when 0 < s ≤ 60); anything else failed
   waits 1 s. After a 2 s ramp, so the lows already fill the queue, the high key paces as in 1 for 40 s.
3. **Disconnect**: the lows still running, the high key opens a stream (200 tokens), drops the
   connection at its first token, then sends a normal request at once; it must be a 200 within 3× the
   unloaded p50 (the dropped stream gave its slot back). Three times.
4. Ray's Prometheus endpoint: ``iir_shed_requests`` and ``iir_preemptions`` totals, by label.

Checks (exit status 1 when one fails): loaded high p50 ≤ 1.5× and p99 ≤ 3× unloaded, every high
request a 200; lows get only 200s or refusals with ``Retry-After`` (p99 within ``--fast-refusal-s``),
never a client timeout (120 s); every disconnect follow-up passes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import yaml  # noqa: E402

from bench.gateway_bench import iir_graph  # noqa: E402
from bench.loadgen import percentile  # noqa: E402
from tests.support.net import wait_ready  # noqa: E402

MODEL = "local/smollm2-135m"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Write a short story about a robot."}],
        "max_tokens": 48, "temperature": 0}
NO_STORE = {"cache-control": "no-store"}
REFUSED = (429, 503)
TIMEOUT, CONN_ERROR = 0, -1  # Outcome.status when no HTTP status came back
METRICS = ("iir_shed_requests", "iir_preemptions")


@dataclass
class Outcome:
    phase: str  # "unloaded" | "ramp" | "loaded" | "disconnect"
    sent_s: float  # since the run's clock started
    latency_s: float
    status: int  # HTTP status, or TIMEOUT / CONN_ERROR
    retry_after_s: float | None = None  # None: no Retry-After (nor retry-after-ms) header
    code: str = ""  # the OpenAI error's ``code`` (or ``type``) when not a 200
    error: str = ""

    @property
    def refused(self) -> bool:
        return self.status in REFUSED


class Clock:
    """The run's time origin and current phase: a request is labelled with the phase it was sent in."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.phase = "warm-up"

    def now(self) -> float:
        return time.perf_counter() - self.start


@dataclass(frozen=True)
class Caller:
    """One key's way in: its own connection pool, its headers, the request it sends, the run's clock."""

    http: aiohttp.ClientSession
    url: str
    headers: dict[str, str]
    body: dict[str, Any]
    clock: Clock


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The openai SDK's reading: ``retry-after-ms``, then ``retry-after`` in seconds (an HTTP date,
    which IIR never sends, counts as present and 1 s)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        if (value := headers.get(name)) is not None:
            try:
                return float(value) * scale
            except ValueError:
                return 1.0
    return None


def _error_code(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = json.loads(body)["error"]
        return str(error.get("code") or error.get("type") or "")
    return ""


async def chat(caller: Caller) -> Outcome:
    phase, sent, start = caller.clock.phase, caller.clock.now(), time.perf_counter()
    try:
        async with caller.http.post(caller.url, json=caller.body, headers=caller.headers) as r:
            body = await r.read()
            if r.status == 200 and b'"choices"' in body:
                return Outcome(phase, sent, time.perf_counter() - start, 200)
            return Outcome(phase, sent, time.perf_counter() - start, r.status, retry_after(r.headers),
                           _error_code(body), body[:200].decode(errors="replace"))
    except TimeoutError:  # before ClientError: aiohttp's read timeout is both
        return Outcome(phase, sent, time.perf_counter() - start, TIMEOUT, error="client timeout")
    except aiohttp.ClientError as exc:
        return Outcome(phase, sent, time.perf_counter() - start, CONN_ERROR,
                       error=f"{type(exc).__name__}: {exc}"[:200])


async def paced(caller: Caller, *, interval_s: float, count: int | None = None,
                until: float | None = None) -> list[Outcome]:
    """One request every ``interval_s``, one at a time: a slow answer is followed at once."""
    out: list[Outcome] = []
    while (count is None or len(out) < count) and (until is None or caller.clock.now() < until):
        started = time.perf_counter()
        out.append(await chat(caller))
        await asyncio.sleep(max(0.0, started + interval_s - time.perf_counter()))
    return out


async def low_caller(caller: Caller, stop: asyncio.Event, out: list[Outcome]) -> None:
    while not stop.is_set():
        outcome = await chat(caller)
        out.append(outcome)
        pause = 0.0
        if outcome.status != 200:
            ra = outcome.retry_after_s
            pause = ra if outcome.refused and ra is not None and 0 < ra <= 60 else 1.0
        if pause:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)


async def dropped_stream(caller: Caller, max_tokens: int) -> tuple[float | None, str]:
    """Open a stream, read to its first token, drop the connection: (seconds to that token, error)."""
    start = time.perf_counter()
    body = {**caller.body, "stream": True, "max_tokens": max_tokens}
    try:
        async with caller.http.post(caller.url, json=body, headers=caller.headers) as r:
            if r.status != 200:
                return None, f"HTTP {r.status}: {(await r.read())[:200]!r}"
            async for raw in r.content:
                line = raw.decode().strip()
                if line.startswith("data:") and _has_content(line[5:].strip()):
                    r.close()  # gone mid-stream, as a client that disconnects is
                    return time.perf_counter() - start, ""
            return None, "stream ended before its first token"
    except (TimeoutError, aiohttp.ClientError) as exc:
        return None, f"{type(exc).__name__}: {exc}"[:200]


def _has_content(data: str) -> bool:
    if data == "[DONE]":
        return False
    return any((c.get("delta") or {}).get("content") for c in json.loads(data).get("choices", []))


async def disconnects(caller: Caller, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for _ in range(args.disconnects):
        ttft, error = await dropped_stream(caller, args.stream_max_tokens)
        follow = await chat(caller)  # at once: it must not wait for the dropped stream's tokens
        rows.append({"stream_first_token_s": ttft, "stream_error": error, "follow_status": follow.status,
                     "follow_latency_s": follow.latency_s, "follow_error": follow.error})
        await asyncio.sleep(args.interval_s)
    return rows


async def measure(base_url: str, low_headers: dict[str, str], high_headers: dict[str, str],
                  args: argparse.Namespace) -> dict[str, Any]:
    url, clock = f"{base_url}/v1/chat/completions", Clock()
    body = {**BODY, "max_tokens": args.max_tokens}
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    # Separate pools: a low caller's connection never stands between the high key and the gateway.
    async with (aiohttp.ClientSession(timeout=timeout) as high_http,
                aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(
                    limit=args.low_callers)) as low_http):
        high = Caller(high_http, url, high_headers, body, clock)
        low = Caller(low_http, url, low_headers, body, clock)
        warm = [await chat(high) for _ in range(args.warmup)]
        if any(o.status != 200 for o in warm):
            raise RuntimeError(f"warm-up failed: {[(o.status, o.error) for o in warm]}")
        clock.phase = "unloaded"
        unloaded = await paced(high, interval_s=args.interval_s, count=args.unloaded_n)
        print(f"unloaded: p50 {_ms(unloaded, 0.5)} ms, p99 {_ms(unloaded, 0.99)} ms; "
              f"{args.low_callers} low callers start", flush=True)
        clock.phase = "ramp"
        stop, lows = asyncio.Event(), list[Outcome]()
        callers = [asyncio.create_task(low_caller(low, stop, lows)) for _ in range(args.low_callers)]
        await asyncio.sleep(args.ramp_s)
        clock.phase, loaded_from = "loaded", clock.now()
        loaded = await paced(high, interval_s=args.interval_s, until=loaded_from + args.loaded_s)
        loaded_to = clock.now()
        print(f"loaded: {len(loaded)} high requests, p50 {_ms(loaded, 0.5)} ms, p99 {_ms(loaded, 0.99)} ms; "
              f"disconnect check", flush=True)
        clock.phase = "disconnect"
        dropped = await disconnects(high, args)
        stop.set()
        drain_from = clock.now()
        await asyncio.gather(*callers)  # the lows in flight finish (or time out)
        print(f"lows drained in {clock.now() - drain_from:.1f} s", flush=True)
    return {"unloaded": unloaded, "loaded": loaded, "lows": lows, "disconnects": dropped,
            "loaded_window_s": [loaded_from, loaded_to]}


def _ok_latencies(outcomes: list[Outcome]) -> list[float]:
    return [o.latency_s for o in outcomes if o.status == 200]


def _ms(outcomes: list[Outcome], q: float) -> float:
    return round(1000 * percentile(_ok_latencies(outcomes), q), 1)


def _low_summary(lows: list[Outcome], window: list[float], fast_s: float) -> dict[str, Any]:
    refused_ra = [o for o in lows if o.refused and o.retry_after_s is not None]
    waits = [o.retry_after_s for o in refused_ra if o.retry_after_s is not None]
    start, end = window
    done_in_window = sum(o.status == 200 and start <= o.sent_s + o.latency_s < end for o in lows)
    return {"requests": len(lows), "ok": sum(o.status == 200 for o in lows),
            "refused_with_retry_after": len(refused_ra),
            "refused_without_retry_after": sum(o.refused and o.retry_after_s is None for o in lows),
            "other_errors": sum(o.status not in (200, *REFUSED, TIMEOUT) for o in lows),
            "timeouts": sum(o.status == TIMEOUT for o in lows),
            "refusal_p50_ms": _pct_ms([o.latency_s for o in refused_ra], 0.5),
            "refusal_p99_ms": _pct_ms([o.latency_s for o in refused_ra], 0.99),
            f"refusals_slower_than_{fast_s:g}_s": sum(o.latency_s > fast_s for o in refused_ra),
            "refusal_codes": dict(Counter(f"{o.status} {o.code}" for o in lows if o.refused)),
            "retry_after_range_s": [round(min(waits), 2), round(max(waits), 2)] if waits else None,
            "ok_p50_ms": _ms(lows, 0.5), "ok_p99_ms": _ms(lows, 0.99),
            "ok_per_s_in_loaded_window": round(done_in_window / (end - start), 2) if end > start else None,
            "error_samples": sorted({f"{o.status}: {o.error}"[:160] for o in lows
                                     if o.status != 200 and not o.refused})[:5]}


def summarize(raw: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    unloaded, loaded = raw["unloaded"], raw["loaded"]
    base50, base99 = _ms(unloaded, 0.5), _ms(unloaded, 0.99)
    p50, p99 = _ms(loaded, 0.5), _ms(loaded, 0.99)
    low = _low_summary(raw["lows"], raw["loaded_window_s"], args.fast_refusal_s)
    high_errors = [f"{o.status}: {o.error}"[:160] for o in loaded if o.status != 200]
    limit_s = args.disconnect_factor * base50 / 1000
    drops = raw["disconnects"]
    checks = {
        f"high p50 ≤ {args.p50_factor:g}× unloaded": p50 <= args.p50_factor * base50,
        f"high p99 ≤ {args.p99_factor:g}× unloaded": p99 <= args.p99_factor * base99,
        "every high request 200": not high_errors and bool(loaded),
        "lows: 200 or refusal with Retry-After": not (low["refused_without_retry_after"]
                                                      or low["other_errors"]),
        "lows: no timeouts": low["timeouts"] == 0,
        f"refusals fast (p99 ≤ {args.fast_refusal_s:g} s)": not low["refused_with_retry_after"]
        or low["refusal_p99_ms"] <= 1000 * args.fast_refusal_s,
        f"disconnect: follow-ups 200 within {args.disconnect_factor:g}× unloaded p50": bool(drops) and all(
            d["follow_status"] == 200 and d["follow_latency_s"] <= limit_s for d in drops),
    }
    return {"unloaded": {"requests": len(unloaded), "p50_ms": base50, "p99_ms": base99},
            "loaded_high": {"requests": len(loaded), "p50_ms": p50, "p99_ms": p99,
                            "p50_ratio": round(p50 / base50, 2), "p99_ratio": round(p99 / base99, 2),
                            "errors": high_errors[:5], "error_count": len(high_errors)},
            "low": low, "disconnects": drops, "disconnect_limit_s": round(limit_s, 3), "checks": checks}


def _pct_ms(values: list[float], q: float) -> float:
    return round(1000 * percentile(values, q), 1)


def scrape(metrics_url: str, wait_s: float) -> dict[str, dict[str, float]]:
    """Totals of ``METRICS`` on Ray's endpoint, summed over processes, by their own labels. Ray
    reports every 10 s by default, hence the wait; a counter never incremented is not there."""
    time.sleep(wait_s)
    text = httpx.get(metrics_url, timeout=10).text
    pattern = re.compile(r"^ray_(iir_\w+?)(?:_total)?\{([^}]*)\} (\S+)$")
    out: dict[str, dict[str, float]] = {name: {} for name in METRICS}
    for line in text.splitlines():
        if (m := pattern.match(line)) and m.group(1) in out:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
            key = ",".join(f"{k}={labels[k]}" for k in ("priority_class", "reason", "model") if labels.get(k))
            out[m.group(1)][key] = out[m.group(1)].get(key, 0.0) + float(m.group(3))
    return out


def _ray_metrics_url() -> str | None:
    import ray  # iir_graph started it in this process: its node knows the port it picked

    port = getattr(ray._private.worker.global_worker.node, "metrics_export_port", None)
    return f"http://127.0.0.1:{port}/metrics" if port else None


def _shown(value: Any) -> bool:
    return value not in ([], {}, None) and value == value  # nan (no samples) != nan


def report(summary: dict[str, Any], metrics: dict[str, dict[str, float]] | None) -> str:
    u, h, low = summary["unloaded"], summary["loaded_high"], summary["low"]
    lines = ["| high key (priority 100) | requests | p50 ms | p99 ms |", "|---|---|---|---|",
             f"| unloaded | {u['requests']} | {u['p50_ms']} | {u['p99_ms']} |",
             f"| under load | {h['requests']} | {h['p50_ms']} ({h['p50_ratio']}×) | "
             f"{h['p99_ms']} ({h['p99_ratio']}×) |", "",
             "| low keys (priority 1) | |", "|---|---|",
             *(f"| {k.replace('_', ' ')} | {v} |" for k, v in low.items() if _shown(v)), "",
             f"disconnect (follow-up limit {summary['disconnect_limit_s']} s):"]
    for i, d in enumerate(summary["disconnects"], 1):
        ttft = f"{d['stream_first_token_s']:.2f} s" if d["stream_first_token_s"] is not None else "none"
        lines.append(f"  {i}. stream first token {ttft} {d['stream_error']}; follow-up HTTP "
                     f"{d['follow_status']} in {d['follow_latency_s']:.2f} s {d['follow_error'][:80]}")
    if h["errors"]:
        lines.append(f"high-key errors ({h['error_count']}), e.g. {h['errors']}")
    if metrics is not None:
        for name, by in metrics.items():
            lines.append(f"{name}: {sum(by.values()):g} {by if by else '(not in the scrape)'}")
    lines += ["", *(f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in summary["checks"].items())]
    return "\n".join(lines)


def write_configs(folder: Path) -> dict[str, Path]:
    """The repo's configs, less the other local models (the embedder): one core stays the model's."""
    models = yaml.safe_load((REPO / "configs" / "models.yaml").read_text())
    models["models"] = [m for m in models["models"] if m["id"] == MODEL or not m["id"].startswith("local/")]
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    return {"models_config": folder / "models.yaml", "providers_config": REPO / "configs" / "providers.yaml",
            "routing_config": REPO / "configs" / "routing.yaml"}


def create_key(base_url: str, description: str, priority: int) -> dict[str, str]:
    r = httpx.post(f"{base_url}/api/v1/apikeys", json={"description": description, "priority": priority},
                   timeout=30)
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['api_key']}", **NO_STORE}


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="iir-priority-") as tmp:
        with iir_graph(write_configs(Path(tmp)), f"sqlite:///{tmp}/iir.db", throughput_optimized=True,
                       data_plane=args.data_plane) as graph:
            wait_ready(graph.base_url, timeout_s=300, all_models=True)
            print(f"graph ready on {graph.base_url} after {graph.startup_s:.1f} s (model loaded)", flush=True)
            low = create_key(graph.base_url, "priority bench: low", 1)
            high = create_key(graph.base_url, "priority bench: high", 100)
            raw = asyncio.run(measure(graph.base_url, low, high, args))
            metrics = None
            if args.metrics_wait_s >= 0 and (url := _ray_metrics_url()):
                with contextlib.suppress(httpx.HTTPError):
                    metrics = scrape(url, args.metrics_wait_s)
    return raw, {"summary": summarize(raw, args), "metrics": metrics}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loaded-s", type=float, default=40.0, help="how long the high key paces under load")
    p.add_argument("--low-callers", type=int, default=16)
    p.add_argument("--unloaded-n", type=int, default=20, help="high requests for the unloaded baseline")
    p.add_argument("--max-tokens", type=int, default=48, help="of every non-stream request, low and high")
    p.add_argument("--interval-s", type=float, default=0.5, help="the high key's pace")
    p.add_argument("--warmup", type=int, default=3, help="untimed high requests first")
    p.add_argument("--ramp-s", type=float, default=2.0, help="lows alone before the high key starts")
    p.add_argument("--timeout-s", type=float, default=120.0, help="client timeout of every request")
    p.add_argument("--disconnects", type=int, default=3, help="dropped streams in the disconnect check")
    p.add_argument("--stream-max-tokens", type=int, default=200)
    p.add_argument("--p50-factor", type=float, default=1.5)
    p.add_argument("--p99-factor", type=float, default=3.0)
    p.add_argument("--disconnect-factor", type=float, default=3.0,
                   help="a follow-up must finish within this × the unloaded p50")
    p.add_argument("--fast-refusal-s", type=float, default=1.0, help="p99 a refusal must come within")
    p.add_argument("--metrics-wait-s", type=float, default=12.0,
                   help="wait for Ray's metrics report before the scrape (-1 skips the scrape)")
    p.add_argument("--data-plane", choices=["haproxy", "python"], default="haproxy")
    p.add_argument("--json", type=Path, help="also write the summary and every request here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        raw, out = run(args)
    except KeyboardInterrupt:
        print("interrupted; Ray was shut down", file=sys.stderr)
        return 130
    print("\n" + report(out["summary"], out["metrics"]))
    if args.json:
        out["requests"] = {k: [asdict(o) for o in raw[k]] for k in ("unloaded", "loaded", "lows")}
        out["argv"] = sys.argv[1:]
        args.json.write_text(json.dumps(out, indent=1))
        print(f"\nwrote {args.json}")
    return 0 if all(out["summary"]["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
