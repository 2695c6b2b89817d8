"""Loopback helpers shared by the tests and benchmarks that start servers."""

from __future__ import annotations

import socket
import time

import httpx


def free_port() -> int:
    """A port free on 127.0.0.1 now; the short window before the server binds it is fine for tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base_url: str, timeout_s: float, *, interval_s: float = 0.5, all_models: bool = False) -> None:
    """Poll ``/ready`` until it answers 200 (and, with ``all_models``, every local model answers "ok");
    raise with the last answer when ``timeout_s`` runs out."""
    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/ready", timeout=5)
            if r.status_code == 200 and (not all_models or all(
                    state == "ok" for state in r.json()["models"].values())):
                return
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(interval_s)
    raise RuntimeError(f"graph not ready after {timeout_s}s: {last}")
