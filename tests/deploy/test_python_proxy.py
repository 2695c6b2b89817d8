"""``IIR_DATA_PLANE=python iir serve``: Serve's Python proxy on port 8000 instead of HAProxy.

The one setting selects it; the trusted-address promise holds there too, checked from an untrusted host
in a network namespace. Runs ``iir serve`` itself, as a user would, before tests/e2e's shared graph.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import REDIS_URL, write_configs
from tests.support.fake_upstream import FakeUpstream
from tests.support.net import free_port, wait_ready
from tests.support.netns import FORGED_CLIENT_HEADERS, UntrustedHost, chat_request, create_key_request

BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Served:
    port: int
    pid: int  # the `iir serve` process: Ray's processes are its descendants


@pytest.fixture(scope="module")
def python_proxy(tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("python-proxy")
    configs = write_configs(folder, fake_upstream.base_url, local=False)
    port = free_port()
    env = {**os.environ, "IIR_DATA_PLANE": "python", "IIR_HTTP_HOST": "0.0.0.0", "IIR_HTTP_PORT": str(port),
           "IIR_DATABASE_URL": f"sqlite:///{folder / 'iir.db'}", "IIR_REDIS_URL": REDIS_URL,
           "IIR_TEST_UPSTREAM_KEY": fake_upstream.api_key,
           **{f"IIR_{k.upper()}": str(v) for k, v in configs.items()}}
    server = subprocess.Popen([str(BIN / "iir"), "serve", "--no-dashboard", "--num-cpus", "4"], env=env,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", timeout_s=240)
        yield Served(port=port, pid=server.pid)
    finally:
        server.send_signal(signal.SIGTERM)  # iir serve shuts Serve and Ray down
        try:
            server.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def _tree_titles(pid: int) -> str:
    titles = []
    for proc in psutil.Process(pid).children(recursive=True):
        try:
            titles.append(" ".join(proc.cmdline()))
        except psutil.Error:
            continue
    return "\n".join(titles)


def test_the_setting_selects_serves_python_proxy(python_proxy: Served) -> None:
    titles = _tree_titles(python_proxy.pid)
    assert "ProxyActor" in titles and "bin/haproxy" not in titles


def test_loopback_caller_is_trusted_and_forwarding_only_lowers_trust(python_proxy: Served) -> None:
    url = f"http://127.0.0.1:{python_proxy.port}/api/v1/apikeys"
    assert requests.post(url, json={"description": "local"}, timeout=30).status_code == 201
    # Serve's proxy believes X-Forwarded-For from a loopback peer: the caller now looks like 8.8.8.8.
    r = requests.post(url, json={"description": "local"}, headers={"X-Forwarded-For": "8.8.8.8"}, timeout=30)
    assert r.status_code == 403


def test_untrusted_host_cannot_mint_keys(python_proxy: Served, stranger: UntrustedHost) -> None:
    port = python_proxy.port
    results = stranger.requests([create_key_request(port, h) for h in FORGED_CLIENT_HEADERS])
    assert [r["status"] for r in results] == [403] * len(FORGED_CLIENT_HEADERS), results
    key = requests.post(f"http://127.0.0.1:{port}/api/v1/apikeys", json={"description": "k"},
                        timeout=30).json()["api_key"]
    [chat] = stranger.requests([chat_request(port, {"Authorization": f"Bearer {key}"})])
    assert chat["status"] == 200, chat
