"""The processes of a Ray graph this test process started: found by the titles Ray gives its workers."""

from __future__ import annotations

from collections.abc import Iterator

import psutil


def graph_processes(marker: str) -> Iterator[psutil.Process]:
    """Descendants of this process whose command line contains ``marker`` (e.g. ``:Ingress``)."""
    for proc in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(proc.cmdline()):
                yield proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def ingress_ports() -> list[int]:
    """The ingress replicas' own HTTP ports (Serve's direct ingress, 30000+), where HAProxy sends."""
    ports = []
    for proc in graph_processes(":Ingress"):
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        ports += [c.laddr.port for c in conns
                  if c.status == psutil.CONN_LISTEN and 30000 <= c.laddr.port <= 31000]
    return sorted(set(ports))


def haproxy_config_paths() -> list[str]:
    """The ``-f`` file of each running HAProxy of this graph."""
    paths = []
    for proc in graph_processes("bin/haproxy"):
        args = proc.cmdline()
        paths += [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-f"]
    return paths
