"""The test suite's own settings (docs/SETUP.md names them), and environment variables for a Ray
cluster a test starts: its processes inherit them at start."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from serve_app.dataplane import DataPlane, ray_environment
from tests.support.net import free_port

# The servers the tests use (docs/SETUP.md): IIR_TEST_REDIS_URL and IIR_TEST_POSTGRES_URL.
REDIS_URL = os.environ.get("IIR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("IIR_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


@contextmanager
def environ(updates: dict[str, str]) -> Iterator[None]:
    """Set ``updates`` in ``os.environ``, and restore what was there (or wasn't) afterwards."""
    saved = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def data_plane_env(data_plane: DataPlane = "haproxy") -> dict[str, str]:
    """What ``iir dataplane env`` gives ``ray start``, with HAProxy's own stats and metrics ports on free
    ones: a test's cluster and a benchmark's on one machine would otherwise both want 8404 and 9101."""
    env = {**ray_environment(data_plane, {}), "IIR_DATA_PLANE": data_plane}
    if data_plane == "haproxy":
        env.update(RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()),
                   RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()))
    return env
