"""Who the ingress thinks the caller is behind HAProxy (the shipped data plane), and whether that can be
spoofed, from an untrusted host on a real network interface.

Behind HAProxy the ingress's TCP peer is HAProxy for every caller; HAProxy (patched by ``iir-haproxy``)
states the client address beside the proxy token, and nothing a client sends can stand in for that.
Serve's Python proxy is covered by tests/deploy/test_data_planes.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

from tests.e2e.conftest import Graph
from tests.support.graph_processes import graph_processes, haproxy_config_paths, ingress_ports
from tests.support.netns import FORGED_CLIENT_HEADERS as FORGED
from tests.support.netns import UntrustedHost, chat_request, create_key_request


def test_loopback_caller_is_trusted(graph: Graph) -> None:
    r = requests.post(f"{graph.base_url}/api/v1/apikeys", json={"description": "local"}, timeout=30)
    assert r.status_code == 201, r.text


def test_loopback_caller_stays_trusted_whatever_it_forwards(graph: Graph) -> None:
    # HAProxy's statement names the connection's source; a client's X-Forwarded-For is its own say-so,
    # believed only from a configured trusted proxy (none here).
    r = requests.post(f"{graph.base_url}/api/v1/apikeys", json={"description": "local"}, timeout=30,
                      headers={"X-Forwarded-For": "8.8.8.8"})
    assert r.status_code == 201, r.text


def test_untrusted_host_cannot_mint_keys_through_port_8000(graph: Graph, stranger: UntrustedHost,
                                                           admin_headers: dict[str, str]) -> None:
    port = urlsplit(graph.base_url).port
    assert port is not None
    results = stranger.requests([create_key_request(port, headers) for headers in FORGED])
    assert [r["status"] for r in results] == [403] * len(FORGED), results
    assert all("trusted network address" in json.loads(r["body"])["error"]["message"] for r in results)
    # The same host is served otherwise: the refusals are about trust, not reachability.
    chat = stranger.requests([chat_request(port, admin_headers)])
    assert chat[0]["status"] == 200, chat


def test_untrusted_host_cannot_mint_keys_at_the_ingress_port(graph: Graph, stranger: UntrustedHost) -> None:
    # HAProxy needs the replicas' own ports open on every interface; a caller going there directly
    # bypasses HAProxy, and its peer address is its own.
    ports = ingress_ports()
    assert ports, "no ingress replica port found"
    results = stranger.requests([create_key_request(ports[0], headers) for headers in FORGED])
    assert [r["status"] for r in results] == [403] * len(FORGED), results


def test_haproxy_runs_the_shims_configuration(graph: Graph) -> None:
    # Judged by what the running HAProxy does, not by its file: Ray rewrites the file before each
    # reload, and the shim patches it as the new process starts.
    procs = list(graph_processes("bin/haproxy"))
    assert procs, "no HAProxy process found in this graph"
    stats_port = int(graph.env["RAY_SERVE_HAPROXY_STATS_PORT"])
    listening = {(c.laddr.ip, c.laddr.port) for p in procs for c in p.net_connections(kind="tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert ("127.0.0.1", stats_port) in listening and ("0.0.0.0", stats_port) not in listening
    for path in haproxy_config_paths():  # the token is read from HAProxy's environment, never written
        assert graph.env["IIR_PROXY_TOKEN"] not in Path(path).read_text()
