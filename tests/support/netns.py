"""An untrusted host for the tests: a network namespace joined to this machine by a veth pair.

The namespace has 198.51.100.2 (TEST-NET-2, outside every default trusted network) and reaches this
machine at 198.51.100.1, so whatever it sends crosses a real network interface, as a stranger's request
would. Needs root (``ip netns``); the fixture that uses it skips otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from serve_app.dataplane import CLIENT_ADDRESS_HEADER, PROXY_TOKEN_HEADER

# What an untrusted client might send to look local: none of it may work, in any data plane.
FORGED_CLIENT_HEADERS: list[dict[str, str]] = [
    {},
    {"X-Forwarded-For": "127.0.0.1"},
    {"X-Forwarded-For": "10.0.0.1, 127.0.0.1"},
    {"Forwarded": "for=127.0.0.1"},
    {"X-Real-IP": "127.0.0.1"},
    {CLIENT_ADDRESS_HEADER: "127.0.0.1"},
    {CLIENT_ADDRESS_HEADER: "127.0.0.1", PROXY_TOKEN_HEADER: "guessed"},
]

# Runs inside the namespace: sends each request and prints what came back (status, headers, body).
_CLIENT = r"""
import http.client, json, sys
out = []
for spec in json.loads(sys.argv[1]):
    conn = http.client.HTTPConnection(spec["host"], spec["port"], timeout=spec.get("timeout", 30))
    try:
        conn.request(spec["method"], spec["path"], body=spec.get("body"), headers=spec.get("headers", {}))
        r = conn.getresponse()
        body = r.read().decode("utf-8", "replace")
        out.append({"status": r.status, "headers": dict(r.getheaders()), "body": body})
    except OSError as exc:
        out.append({"status": None, "error": repr(exc)})
    finally:
        conn.close()
print(json.dumps(out))
"""


def create_key_request(port: int, headers: dict[str, str]) -> dict[str, Any]:
    return {"port": port, "method": "POST", "path": "/api/v1/apikeys",
            "body": json.dumps({"description": "from an untrusted host"}),
            "headers": {"Content-Type": "application/json", **headers}}


def chat_request(port: int, headers: dict[str, str]) -> dict[str, Any]:
    return {"port": port, "method": "POST", "path": "/v1/chat/completions",
            "headers": {**headers, "Content-Type": "application/json"},
            "body": json.dumps({"model": "fake/echo-chat", "max_tokens": 4,
                                "messages": [{"role": "user", "content": "hi"}]})}


@dataclass(frozen=True)
class UntrustedHost:
    namespace: str
    address: str  # the namespace's own address
    host_address: str  # this machine, as seen from the namespace

    def requests(self, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send HTTP requests from inside the namespace (one process for the batch).

        Each spec: ``port``, ``method``, ``path``, optional ``headers``, ``body`` (str), ``host``
        (default: this machine's address on the veth).
        """
        specs = [{"host": self.host_address, **spec} for spec in specs]
        done = subprocess.run(["ip", "netns", "exec", self.namespace, sys.executable, "-c", _CLIENT,
                               json.dumps(specs)], capture_output=True, text=True, timeout=120, check=True)
        results: list[dict[str, Any]] = json.loads(done.stdout)
        return results


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def untrusted_host(host_address: str = "198.51.100.1",
                   address: str = "198.51.100.2") -> Iterator[UntrustedHost]:
    """Make the namespace and its link; remove both afterwards. Raises if this process may not."""
    tag = f"iir{os.getpid() % 100000}"
    namespace, outside, inside = f"{tag}-untrusted", f"{tag}-h", f"{tag}-n"
    _ip("netns", "add", namespace)
    try:
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", inside, "netns", namespace)
        _ip("addr", "add", f"{host_address}/24", "dev", outside)
        _ip("link", "set", outside, "up")
        _ip("netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", inside)
        _ip("netns", "exec", namespace, "ip", "link", "set", inside, "up")
        _ip("netns", "exec", namespace, "ip", "link", "set", "lo", "up")
        yield UntrustedHost(namespace=namespace, address=address, host_address=host_address)
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
