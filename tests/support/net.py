"""Loopback helpers shared by the tests and benchmarks that start servers."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 now; the short window before the server binds it is fine for tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
