"""Markdown tables from ``gateway_bench`` results (the same dict it writes with ``--json``)."""

from __future__ import annotations

from typing import Any

_LOCAL_PATHS = (("router", "through the router (proxy port)"), ("in_process", "engine in-process"))
_TITLES = {"chat": "Non-stream chat, fake/echo-chat (latency = whole response)",
           "stream": "Streaming chat, fake/echo-chat (latency = time to first chunk)"}


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [f"date {meta['date']}, {meta['cpus']} CPUs, ray {meta['ray']}, "
             f"RAY_SERVE_THROUGHPUT_OPTIMIZED={int(meta['throughput_optimized'])}, "
             f"{meta['step_seconds']:g} s per step (≤ {meta['max_requests']} requests, "
             f"{meta['client']} client, upstream delay {meta.get('upstream_delay_ms', 0):g} ms), "
             f"load average {meta['loadavg_start'][0]} at start / "
             f"{meta.get('loadavg_end', ['?'])[0]} at end, "
             f"graph cold start {meta.get('startup_s', '?')} s",
             f"idle CPU of the Ray processes (ms per s, subtracted below): {meta.get('idle_cpu_ms_per_s')}",
             f"nice values by process group: {meta.get('niceness')}"]
    for scenario, title in _TITLES.items():
        steps = [s for s in results["steps"] if s["scenario"] == scenario]
        if steps:
            lines += ["", f"**{title}**", "", *_step_table(steps)]
    local = results.get("local") or {}
    if local:
        lines += ["", "**local/smollm2-135m** (c=1, max_tokens=64, temperature 0; "
                  "TTFT on an 8-token reply)", "",
                  "| path | requests | completion tokens | tokens/s | mean request ms | first event p50 ms "
                  "| first token p50 ms | first token p99 ms |", "|---|---|---|---|---|---|---|---|"]
        for name, label in _LOCAL_PATHS:
            if name in local:
                r = local[name]
                lines.append(f"| {label} | {r['requests']} | {r['completion_tokens']} | "
                             f"{r['tokens_per_s']} | {r['mean_request_ms']} | "
                             f"{r['ttft_first_event_p50_ms']} | {r['ttft_first_token_p50_ms']} | "
                             f"{r['ttft_first_token_p99_ms']} |")
    return "\n".join(lines)


def _step_table(steps: list[dict[str, Any]]) -> list[str]:
    direct = {s["concurrency"]: s for s in steps if s["target"] == "direct"}
    rows = ["| c | target | requests | errors | req/s | p50 ms | p99 ms | added p50 ms "
            "| gateway CPU ms/req (proxy + ingress + rest) | upstream CPU ms/req | client CPU ms/req |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sorted(steps, key=lambda s: (s["concurrency"], s["target"] != "direct", s["target"])):
        base = direct.get(s["concurrency"])
        added = f"{s['p50_ms'] - base['p50_ms']:+.1f}" if base and s["target"] != "direct" else "—"
        cpu = s.get("cpu_ms_per_req") or {}
        if s["target"] == "direct" or not cpu:
            gateway = "—"
        else:
            rest = cpu.get("gateway", 0) - cpu.get("proxy", 0) - cpu.get("ingress", 0)
            gateway = (f"{cpu.get('gateway', 0):.1f} ({cpu.get('proxy', 0):.1f} + "
                       f"{cpu.get('ingress', 0):.1f} + {rest:.1f})")
        rows.append(f"| {s['concurrency']} | {s['target']} | {s['requests']} | {s['errors']} | "
                    f"{s['rps']:.1f} | {s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {added} | {gateway} | "
                    f"{cpu.get('upstream', 0):.2f} | {cpu.get('client', 0):.2f} |")
        if s["error_samples"]:
            rows.append(f"| | errors, e.g. | {'; '.join(s['error_samples'])[:300]} |")
    return rows
