"""Hardware discovery from ``ray.nodes()``: the shapes below are Ray 2.60's own output."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from serve_app.registry import hardware
from serve_app.registry.hardware import NodeInfo, accelerator_type, nodes_from_ray

HEAD_ID = "c46be046813f05566a734bd86fda9b80b81d46652d643872711e4cc7"
GPU_ID = "9f1d7a3c5e2b4d6f8a0c1e3b5d7f9a1c3e5b7d9f1a3c5e7b9d1f3a5c"

# ray.nodes() of `ray.init(address="local", num_cpus=1)` on the dev box, verbatim.
CPU_HEAD: dict[str, Any] = {
    "NodeID": HEAD_ID, "Alive": True, "NodeManagerAddress": "192.0.2.2", "NodeManagerHostname": "vm",
    "NodeManagerPort": 41407, "ObjectManagerPort": 41573,
    "ObjectStoreSocketName": "/tmp/ray/session_2026-11-28_04-07-58_561304_26108/sockets/plasma_store",
    "RayletSocketName": "/tmp/ray/session_2026-11-28_04-07-58_561304_26108/sockets/raylet",
    "MetricsExportPort": 45565, "MetricsAgentPort": 40893, "DashboardAgentListenPort": 52365,
    "NodeName": "192.0.2.2", "RuntimeEnvAgentPort": 37721, "DeathReason": 0, "DeathReasonMessage": "",
    "alive": True,
    "Resources": {"CPU": 1.0, "node:192.0.2.2": 1.0, "object_store_memory": 7384409702.0,
                  "memory": 17230289306.0, "node:__internal_head__": 1.0},
    "Labels": {"ray.io/node-id": HEAD_ID},
}


def gpu_worker(accel: str = "A10G", gpus: float = 1.0, *, alive: bool = True) -> dict[str, Any]:
    """The same shape for a worker with GPUs: Ray adds GPU and accelerator_type:<T> resources."""
    node = copy.deepcopy(CPU_HEAD)
    node.update({"NodeID": GPU_ID, "Alive": alive, "alive": alive, "NodeManagerAddress": "192.0.2.3",
                 "NodeName": "192.0.2.3", "Labels": {"ray.io/node-id": GPU_ID}})
    node["Resources"] = {"CPU": 8.0, "GPU": gpus, f"accelerator_type:{accel}": 1.0,
                         "node:192.0.2.3": 1.0, "object_store_memory": 9e9, "memory": 32 * 1024**3}
    return node


def test_cpu_head_from_real_shape() -> None:
    [node] = nodes_from_ray([CPU_HEAD])
    assert node == NodeInfo(node_id=HEAD_ID, address="192.0.2.2", num_cpus=1.0, num_gpus=0.0,
                            accelerator_type=None, memory_gb=16.05, gpu_memory_gb=None, is_head=True,
                            labels={"ray.io/node-id": HEAD_ID})


def test_gpu_worker_gets_type_and_table_memory() -> None:
    head, worker = nodes_from_ray([CPU_HEAD, gpu_worker("A10G", 4)])
    assert not head.num_gpus and not worker.is_head
    assert (worker.num_gpus, worker.accelerator_type, worker.gpu_memory_gb, worker.memory_gb) == (
        4.0, "A10G", 24, 32.0)


def test_dead_nodes_are_left_out() -> None:
    assert [n.node_id for n in nodes_from_ray([CPU_HEAD, gpu_worker(alive=False)])] == [HEAD_ID]


@pytest.mark.parametrize(("resources", "labels", "expected"), [
    pytest.param({"accelerator_type:L4": 1.0}, {}, "L4", id="resource"),
    pytest.param({}, {"ray.io/accelerator-type": "H100"}, "H100", id="label"),
    pytest.param({"accelerator_type:A100-80G": 1.0}, {"ray.io/accelerator-type": "A100"}, "A100-80G",
                 id="resource-wins"),
    pytest.param({"CPU": 4.0}, {}, None, id="none"),
])
def test_accelerator_type(resources: dict[str, float], labels: dict[str, str], expected: str | None) -> None:
    assert accelerator_type(resources, labels) == expected


@pytest.mark.parametrize(("accel", "memory"), [
    pytest.param("T4", 16, id="T4"), pytest.param("L4", 24, id="L4"),
    pytest.param("A100", 40, id="A100-ambiguous-is-40"), pytest.param("A100-80G", 80, id="A100-80G"),
    pytest.param("H100", 80, id="H100"), pytest.param("H200", 141, id="H200"),
    pytest.param("Unknown-GPU", None, id="unknown"),
])
def test_gpu_memory_table(accel: str, memory: float | None) -> None:
    assert hardware.table_gpu_memory_gb(accel) == memory


def test_nvml_absent_is_none() -> None:
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert hardware.nvml_gpu_memory_gb() is None
    else:
        pytest.skip("pynvml installed: covered by the gpu-marked checks")
