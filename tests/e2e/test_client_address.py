"""Who the ingress thinks the caller is, behind Serve's real proxy, and whether that can be spoofed.

Serve's proxy applies ``X-Forwarded-For`` only from a loopback peer (MEASUREMENTS.md). So a loopback
caller can make itself look *untrusted*, never the reverse, and a non-loopback caller cannot make
itself look trusted with the header.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import shutil
import subprocess
from urllib.parse import urlsplit

import pytest

from serve_app.settings import DEFAULT_TRUSTED_NETWORKS
from tests.e2e.conftest import Graph


def _untrusted_local_ipv4() -> str | None:
    """An address of this machine outside the default trusted networks (here: a TEST-NET address)."""
    trusted = [ipaddress.ip_network(n) for n in DEFAULT_TRUSTED_NETWORKS]
    if shutil.which("ip") is None:
        return None
    listing = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=False)
    for line in listing.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            address = ipaddress.ip_interface(fields[fields.index("inet") + 1]).ip
            if not any(address in net for net in trusted):
                return str(address)
    return None


def _create_key(graph: Graph, headers: dict[str, str], source: str | None = None) -> int:
    parts = urlsplit(graph.base_url)
    conn = http.client.HTTPConnection("127.0.0.1", parts.port, timeout=30,
                                      source_address=(source, 0) if source else None)
    conn.request("POST", "/api/v1/apikeys", body=json.dumps({"description": "spoof"}),
                 headers={"Content-Type": "application/json", **headers})
    status = conn.getresponse().status
    conn.close()
    return status


def test_loopback_caller_is_trusted(graph: Graph) -> None:
    assert _create_key(graph, {}) == 201


def test_forwarded_header_from_loopback_cannot_gain_trust_elsewhere(graph: Graph) -> None:
    # The proxy believes a loopback peer's header: the caller now looks like 8.8.8.8, so it is refused.
    assert _create_key(graph, {"X-Forwarded-For": "8.8.8.8"}) == 403


def test_untrusted_peer_cannot_spoof_loopback(graph: Graph) -> None:
    source = _untrusted_local_ipv4()
    if source is None:
        pytest.skip("this machine has no local address outside the trusted networks")
    assert _create_key(graph, {}, source) == 403
    for header in ({"X-Forwarded-For": "127.0.0.1"}, {"Forwarded": "for=127.0.0.1"},
                   {"X-Forwarded-For": "10.0.0.1, 127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}):
        assert _create_key(graph, header, source) == 403, header
