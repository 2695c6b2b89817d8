"""Hardware discovery from Ray's own view of the cluster: nodes, CPUs, GPUs, accelerator types, GPU memory.

Ray reports *capacity* (``Resources`` of each alive node), not what is free right now: the fit check asks
whether a model could ever be placed, and Ray's scheduler decides where it goes when it is.

GPU memory per device, in GiB, comes from, in order:

1. NVML (``pynvml`` from ``nvidia-ml-py``) on each GPU node, read by a zero-resource Ray task pinned to
   that node (the Registry usually runs on a CPU head): the smallest device's total, since one replica
   may land on any of them. Read once per node and remembered; a node that does not answer within
   ``NVML_PROBE_TIMEOUT_S`` is asked again at the next discovery;
2. ``GPU_MEMORY_GB`` below, keyed by Ray's accelerator type. Ray names both A100 sizes ``A100`` unless
   the node says ``A100-40G``/``A100-80G``, so a bare ``A100`` is taken as the 40 GB card: a model
   that fits it fits the 80 GB card too, and an 80 GB cluster can advertise ``A100-80G`` (or
   NVML finds the real size) to be credited with more;
3. otherwise ``None``: unknown memory never makes a model unfit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

logger = logging.getLogger(__name__)

_GIB = 1024**3
ACCELERATOR_RESOURCE_PREFIX = "accelerator_type:"
ACCELERATOR_LABEL = "ray.io/accelerator-type"

# Per-device memory of the accelerator types Ray names (ray.util.accelerators), as sold.
GPU_MEMORY_GB: dict[str, float] = {
    "K80": 12, "P4": 8, "P100": 16, "V100": 16, "T4": 16,
    "A10G": 24, "L4": 24, "L40S": 48, "RTX-PRO-6000": 96,
    "A100": 40, "A100-40G": 40, "A100-80G": 80,
    "H100": 80, "H200": 141, "H20": 96, "B200": 180, "B300": 288, "GB200": 186, "GB300": 288,
    "AMD-Instinct-MI210": 64, "AMD-Instinct-MI250X": 128, "AMD-Instinct-MI300X-OAM": 192,
    "AMD-Instinct-MI325X-OAM": 256,
}


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    address: str
    num_cpus: float
    num_gpus: float
    accelerator_type: str | None = None
    memory_gb: float | None = None
    gpu_memory_gb: float | None = None  # per device
    is_head: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "address": self.address, "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus, "accelerator_type": self.accelerator_type,
                "memory_gb": self.memory_gb, "gpu_memory_gb": self.gpu_memory_gb,
                "is_head": self.is_head, "labels": dict(self.labels)}


def nodes_from_ray(ray_nodes: list[dict[str, Any]]) -> list[NodeInfo]:
    """``ray.nodes()`` → the alive nodes, GPU memory from the table only (NVML is the caller's)."""
    return [_node(raw) for raw in ray_nodes if raw.get("Alive", raw.get("alive", False))]


def _node(raw: dict[str, Any]) -> NodeInfo:
    resources: dict[str, float] = raw.get("Resources") or {}
    labels: dict[str, str] = raw.get("Labels") or {}
    accelerator = accelerator_type(resources, labels)
    memory = resources.get("memory")
    return NodeInfo(
        node_id=str(raw["NodeID"]),
        address=str(raw.get("NodeManagerAddress", "")),
        num_cpus=float(resources.get("CPU", 0)),
        num_gpus=float(resources.get("GPU", 0)),
        accelerator_type=accelerator,
        memory_gb=round(memory / _GIB, 2) if memory else None,
        gpu_memory_gb=table_gpu_memory_gb(accelerator),
        is_head="node:__internal_head__" in resources,
        labels=labels,
    )


def accelerator_type(resources: Mapping[str, float], labels: Mapping[str, str]) -> str | None:
    """Ray advertises ``accelerator_type:<T>`` as a resource; newer Ray also sets a node label."""
    for name in resources:
        if name.startswith(ACCELERATOR_RESOURCE_PREFIX):
            return name.removeprefix(ACCELERATOR_RESOURCE_PREFIX)
    return labels.get(ACCELERATOR_LABEL)


def table_gpu_memory_gb(accelerator: str | None) -> float | None:
    return GPU_MEMORY_GB.get(accelerator) if accelerator else None


def nvml_gpu_memory_gb() -> float | None:
    """The smallest local GPU's total memory, or ``None`` without NVML or GPUs."""
    try:
        import pynvml  # nvidia-ml-py: optional, present on GPU images
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver or no GPU: NVML raises its own error classes
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        totals = [pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).total
                  for i in range(count)]
        return round(min(totals) / _GIB, 2) if totals else None
    except Exception as exc:  # a broken device must not fail discovery
        logger.warning("NVML could not read GPU memory: %s", exc)
        return None
    finally:
        pynvml.nvmlShutdown()


NVML_PROBE_TIMEOUT_S = 10.0
_measured: dict[str, float | None] = {}  # node id → NVML's answer; pruned to the alive nodes


def discover_nodes(*, probe: Callable[[], float | None] = nvml_gpu_memory_gb) -> list[NodeInfo]:
    """The connected Ray cluster's alive nodes, each GPU node's memory measured there by ``probe``."""
    import ray

    nodes = nodes_from_ray(ray.nodes())
    alive = {n.node_id for n in nodes}
    for gone in [node_id for node_id in _measured if node_id not in alive]:
        del _measured[gone]
    _measured.update(_probe_nodes([n for n in nodes if n.num_gpus and n.node_id not in _measured], probe))
    return [_with_memory(n, _measured.get(n.node_id)) for n in nodes]


def _probe_nodes(nodes: list[NodeInfo], probe: Callable[[], float | None]) -> dict[str, float | None]:
    """Run ``probe`` on each node at once; nodes that fail or time out are left out (asked again later)."""
    if not nodes:
        return {}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(probe)
    pending = {remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False))
               .remote(): n.node_id for n in nodes}
    ready, not_ready = ray.wait(list(pending), num_returns=len(pending), timeout=NVML_PROBE_TIMEOUT_S)
    for ref in not_ready:
        ray.cancel(ref, force=True)
    measured = {}
    for ref in ready:
        try:
            measured[pending[ref]] = ray.get(ref)
        except Exception as exc:  # a node that cannot run the probe keeps the table's figure
            logger.warning("NVML probe failed on node %s: %s", pending[ref], exc)
    return measured


def _with_memory(node: NodeInfo, measured: float | None) -> NodeInfo:
    return node if measured is None else replace(node, gpu_memory_gb=measured)


def launchable_nodes(shapes: list[Any]) -> list[NodeInfo]:
    """Node shapes the autoscaler can add (``IIR_LAUNCHABLE_NODES``) as nodes for the fit check."""
    return [NodeInfo(node_id=f"launchable:{i}", address="", num_cpus=float(shape.num_cpus),
                     num_gpus=float(shape.num_gpus), accelerator_type=shape.accelerator_type,
                     gpu_memory_gb=shape.gpu_memory_gb or table_gpu_memory_gb(shape.accelerator_type),
                     labels={"iir/launchable": "true"})
            for i, shape in enumerate(shapes)]
