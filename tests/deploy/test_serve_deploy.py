"""``serve deploy serve_config.yaml`` against ``ray start --head``, as a platform engineer runs it.

Runs before the shared graph of tests/e2e (directory order) so the two Ray clusters never overlap.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent




def _wait(url: str, timeout_s: float, *, any_answer: bool = False) -> requests.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            r = requests.get(url, timeout=5)
            if r.status_code == 200 or any_answer or time.monotonic() > deadline:
                return r
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
        time.sleep(2)


def _dataplane_env() -> dict[str, str]:
    """What docs/SETUP.md has the operator do before `ray start`: eval "$(iir dataplane env)"."""
    printed = subprocess.run([str(BIN / "iir"), "dataplane", "env"], capture_output=True, text=True,
                             check=True, timeout=60).stdout
    pairs = (shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in printed.splitlines())
    # HAProxy's stats and metrics ports: free ones, as another cluster on this machine may hold 8404/9101.
    return {**dict(pairs), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("cluster")
    dashboard_port = free_port()
    env = {**os.environ, "IIR_DATABASE_URL": f"sqlite:///{folder / 'iir.db'}",
           "PATH": f"{BIN}:{os.environ['PATH']}", **_dataplane_env(),
           # A redeploy drains the old ingress 30 s by default, for remote load balancers; none here.
           "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    # --block keeps Ray's daemons under this process group, so teardown stops this cluster only
    # (`ray stop` would stop every Ray on the machine).
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=4",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         "--disable-usage-stats"],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # With token auth on, the dashboard answers 401 without the token: any answer means it is up.
        _wait(f"http://127.0.0.1:{dashboard_port}/api/version", timeout_s=120, any_answer=True)
        yield {**env, "RAY_AUTH_MODE": "token", "DASHBOARD": f"http://127.0.0.1:{dashboard_port}"}
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_serve_deploy_of_the_repo_config(ray_head: dict[str, str], tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    port = free_port()
    # Only the port changes: the suite must not depend on 8000 being free.
    config["http_options"].update(host="127.0.0.1", port=port)
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    deploy = subprocess.run([str(BIN / "serve"), "deploy", str(path), "-a", ray_head["DASHBOARD"]],
                            env=ray_head, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert deploy.returncode == 0, deploy.stderr[-2000:]

    ready = _wait(f"http://127.0.0.1:{port}/ready", timeout_s=300)
    assert ready.status_code == 200, ready.text
    base = f"http://127.0.0.1:{port}"
    created = requests.post(f"{base}/api/v1/apikeys", json={"description": "deploy", "priority": 1})
    key = created.json()["api_key"]
    chat = requests.post(f"{base}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                         json={"model": "local/smollm2-135m", "max_tokens": 8, "temperature": 0,
                               "messages": [{"role": "user", "content": "What is the capital of France?"}]},
                         timeout=60)
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"].strip()

    before = _serve_status(ray_head)
    model_app = before["applications"]["iir-model-smollm2-135m"]
    assert before["applications"]["iir"]["status"] == "RUNNING" and model_app["status"] == "RUNNING"

    # A later `serve deploy` of `iir config render --inline` (the catalog inside the config, same models):
    # the iir application is redeployed, its Registry restarts, and the model applications it runs are
    # adopted as they are (not restarted).
    render = subprocess.run([str(BIN / "iir"), "config", "render", "--inline", "--out", str(path)],
                            env=ray_head, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert render.returncode == 0, render.stderr
    config = yaml.safe_load(path.read_text())
    assert config["applications"][0]["args"]["models"]["default_model"] == "local/smollm2-135m"
    config["http_options"].update(host="127.0.0.1", port=port)
    path.write_text(yaml.safe_dump(config))
    again = subprocess.run([str(BIN / "serve"), "deploy", str(path), "-a", ray_head["DASHBOARD"]],
                           env=ray_head, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    deadline = time.monotonic() + 180
    while True:
        after = _serve_status(ray_head)["applications"]
        iir = after["iir"]
        if iir["status"] == "RUNNING" and iir["last_deployed_time_s"] > before["applications"]["iir"][
                "last_deployed_time_s"] and _wait(f"{base}/ready", 60).status_code == 200:
            break
        assert time.monotonic() < deadline, after
        time.sleep(2)
    assert after["iir-model-smollm2-135m"]["last_deployed_time_s"] == model_app["last_deployed_time_s"]
    assert after["iir-model-smollm2-135m"]["status"] == "RUNNING"


def _serve_status(env: dict[str, str]) -> dict[str, Any]:
    status = subprocess.run([str(BIN / "serve"), "status", "-a", env["DASHBOARD"]], env=env,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr[-2000:]
    parsed: dict[str, Any] = yaml.safe_load(status.stdout)
    return parsed
