"""One real Ray Serve graph for the whole test session, on a free port, behind HAProxy (the default)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import REDIS_URL, write_configs
from tests.support.env import data_plane_env, environ
from tests.support.fake_upstream import FakeUpstream
from tests.support.net import free_port, wait_ready


@dataclass(frozen=True)
class Graph:
    base_url: str
    database_url: str
    metrics_url: str  # Ray's Prometheus endpoint on this node: IIR's metrics and Serve's
    env: dict[str, str]  # what the graph's processes started with: the same settings for a CLI run






@pytest.fixture(scope="session")
def graph(tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream) -> Iterator[Graph]:
    import ray
    from ray import serve

    folder = tmp_path_factory.mktemp("graph")
    configs = write_configs(folder, fake_upstream.base_url)
    database_url = f"sqlite:///{folder / 'iir.db'}"
    port, metrics_port = free_port(), free_port()
    # Replica logs unbuffered (throughput-optimized Serve keeps 1,000 records), for the access-log test.
    # The shipped data plane: HAProxy on port 8000, via the iir-haproxy shim, with a proxy token.
    env = {**data_plane_env("haproxy"), "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
           # Replicas drain 30 s at shutdown by default; the end of the session needs no such wait.
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
           "IIR_TEST_UPSTREAM_KEY": fake_upstream.api_key, "IIR_DATABASE_URL": database_url,
           "IIR_REDIS_URL": REDIS_URL,
           **{f"IIR_{k.upper()}": str(v) for k, v in configs.items()}}
    from serve_app.builder import build_app

    # address="local": always a fresh cluster of our own, never one some other process left running.
    with environ(env):
        # Metrics reach the endpoint every report interval (10 s by default); 1 s keeps the test short.
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 1000})
        try:
            # All interfaces: tests/e2e/test_client_address.py calls from a network namespace.
            serve.start(http_options={"host": "0.0.0.0", "port": port})
            serve.run(build_app({}), name="iir", route_prefix="/", blocking=False)
            base_url = f"http://localhost:{port}"
            wait_ready(base_url, timeout_s=240, all_models=True)
            yield Graph(base_url=base_url, database_url=database_url,
                        metrics_url=f"http://127.0.0.1:{metrics_port}/metrics", env=env)
        finally:
            serve.shutdown()
            ray.shutdown()


@pytest.fixture(scope="session")
def admin_headers(graph: Graph) -> dict[str, str]:
    r = requests.post(f"{graph.base_url}/api/v1/apikeys", json={"description": "e2e", "priority": 5},
                      timeout=30)
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['api_key']}"}


REPO = Path(__file__).resolve().parents[2]
