"""Does a model fit the cluster? A model that fits no node is listed ``unavailable`` rather than deployed
to wait forever for resources Ray will never have.

A replica is one Ray actor, so everything it asks for (CPUs, GPUs, accelerator type) must be on *one*
node. Capacities, not current free resources, are compared: a busy node frees up, a small one never grows.

GPU memory estimate (GiB), ``estimate_gpu_memory_gb``:

- GGUF file: file size × 1.2 (the 20 % covers llama.cpp's compute buffers and a modest context);
- Hugging Face folder: (sum of ``*.safetensors``, or else ``*.bin``, sizes) × 1.2 for activations and
  the CUDA context, plus a KV cache for one sequence of ``engine_options.max_model_len`` tokens (when
  unset, the model's ``max_position_embeddings``: vLLM's own default):
  ``2 (K and V) × num_hidden_layers × num_key_value_heads × head_dim × max_model_len × 2 bytes (fp16)``
  from ``config.json`` (``head_dim`` defaults to ``hidden_size / num_attention_heads``). vLLM refuses to
  start when not even one full-length sequence fits, which is what this allowance checks.

A node offers ``gpu_memory_gb × num_gpus × gpu_memory_utilization`` (vLLM's share, from
``engine_options``, default 0.9 for vLLM and 1.0 for other engines). Nodes whose GPU memory is unknown
are given the benefit of the doubt.

A model whose files are there but unusable (a ``config.json`` that is not JSON, not an object, or whose
sizes are not positive whole numbers; a ``max_model_len`` that is not a number) raises
``ModelSourceError``: the registry lists that one model ``unavailable`` with the message, and the
engine is never started on it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve_app.registry.catalog import ModelSpec, resolve_source
from serve_app.registry.hardware import NodeInfo

_GIB = 1024**3
OVERHEAD = 1.2
KV_BYTES_PER_VALUE = 2  # fp16/bf16 KV cache, vLLM's default
VLLM_DEFAULT_UTILIZATION = 0.9


@dataclass(frozen=True)
class FitResult:
    fits: bool
    reason: str | None = None
    node_ids: list[str] = field(default_factory=list)


class ModelSourceError(ValueError):
    """A local model's source exists but cannot be used as it is; the message says which file and why."""


def estimate_gpu_memory_gb(spec: ModelSpec, path: Path) -> float:
    """GPU memory the model needs on the GPUs of one replica; formula in the module docstring."""
    if path.is_file():
        return round(path.stat().st_size * OVERHEAD / _GIB, 3)
    weights = _weight_bytes(path)
    # Read even when no KV cache is counted: the engine would fail on a broken config.json anyway.
    config = read_model_config(path / "config.json")
    # Without max_model_len vLLM takes the model's whole context (max_position_embeddings).
    context = spec.engine_options.get("max_model_len") or config.get("max_position_embeddings")
    kv = _kv_cache_bytes(config, context)
    return round((weights * OVERHEAD + kv) / _GIB, 3)


def _weight_bytes(folder: Path) -> int:
    # A folder often ships both formats; the engine loads one, safetensors first.
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return sum(f.stat().st_size for f in files)
    return 0


_SIZES = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")


def read_model_config(path: Path) -> dict[str, Any]:
    """A Hugging Face ``config.json`` (the language model's part of a multimodal one), with the sizes the
    KV cache is computed from checked; ``{}`` when the folder has none."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # unreadable, a directory, not UTF-8, not JSON
        raise ModelSourceError(f"{path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path}: expected a JSON object, found {type(config).__name__}")
    text = config.get("text_config", config)  # multimodal configs nest the language model's
    if not isinstance(text, dict):
        raise ModelSourceError(f"{path}: text_config is not a JSON object")
    for key in _SIZES:
        value = text.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ModelSourceError(f"{path}: {key} is {value!r}, not a positive whole number")
    return text


def _kv_cache_bytes(config: dict[str, Any], max_model_len: Any) -> int:
    if not max_model_len:
        return 0
    try:
        tokens = int(max_model_len)
    except (TypeError, ValueError) as exc:
        raise ModelSourceError(f"engine_options.max_model_len is {max_model_len!r}, not a whole number") \
            from exc
    layers = config.get("num_hidden_layers")
    heads = config.get("num_attention_heads")
    if not layers or not heads:
        return 0
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // heads
    return int(2 * layers * kv_heads * head_dim * tokens * KV_BYTES_PER_VALUE)


def estimate_for(spec: ModelSpec) -> float | None:
    """The estimate from the spec's source, or ``None`` for remote models and missing files; raises
    ``ModelSourceError`` for files that are there but unusable."""
    if not spec.is_local or not spec.source:
        return None
    try:
        path = resolve_source(spec.source)
    except FileNotFoundError:
        return None
    try:
        return estimate_gpu_memory_gb(spec, path)
    except OSError as exc:  # a weights file or folder that cannot be listed or sized
        raise ModelSourceError(f"{path}: {exc}") from exc


def check_fit(spec: ModelSpec, nodes: Sequence[NodeInfo], *, estimate_gb: float | None = None) -> FitResult:
    """Which nodes could host one replica of ``spec``; the reason names the first unmet need."""
    if not spec.is_local:
        return FitResult(True)
    if not nodes:
        return FitResult(False, "the Ray cluster has no alive nodes")
    candidates = list(nodes)
    for step in _steps(spec, estimate_gb):
        kept = [n for n in candidates if step.keep(n)]
        if not kept:
            return FitResult(False, step.reason(candidates))
        candidates = kept
    return FitResult(True, None, [n.node_id for n in candidates])


@dataclass(frozen=True)
class _Step:
    keep: Callable[[NodeInfo], bool]
    reason: Callable[[list[NodeInfo]], str]


def _steps(spec: ModelSpec, estimate_gb: float | None) -> list[_Step]:
    res = spec.resources
    steps: list[_Step] = []
    if res.num_gpus > 0:
        steps.append(_Step(lambda n: n.num_gpus >= res.num_gpus, lambda ns: _gpu_reason(res.num_gpus, ns)))
    if res.accelerator_type:
        wanted = res.accelerator_type
        steps.append(_Step(lambda n: n.accelerator_type == wanted, lambda ns: _accel_reason(wanted, ns)))
    if res.num_gpus > 0 and estimate_gb is not None:
        share = _utilization(spec)
        needed = estimate_gb
        steps.append(_Step(lambda n: _memory_ok(n, res.num_gpus, share, needed),
                           lambda ns: _memory_reason(needed, res.num_gpus, share, ns)))
    if res.num_gpus == 0 and estimate_gb is not None:
        # A CPU model (llama.cpp) holds its weights in the node's RAM: Ray's `memory` resource.
        ram = estimate_gb
        steps.append(_Step(lambda n: n.memory_gb is None or n.memory_gb >= ram,
                           lambda ns: _ram_reason(ram, ns)))
    steps.append(_Step(lambda n: n.num_cpus >= res.num_cpus, lambda ns: _cpu_reason(res.num_cpus, ns)))
    return steps


def _utilization(spec: ModelSpec) -> float:
    default = VLLM_DEFAULT_UTILIZATION if spec.engine == "vllm" else 1.0
    return float(spec.engine_options.get("gpu_memory_utilization", default))


def _offered(node: NodeInfo, num_gpus: float, share: float) -> float | None:
    if node.gpu_memory_gb is None:
        return None
    return node.gpu_memory_gb * num_gpus * share


def _memory_ok(node: NodeInfo, num_gpus: float, share: float, needed: float) -> bool:
    offered = _offered(node, num_gpus, share)
    return offered is None or offered >= needed


def _gpu_reason(wanted: float, nodes: list[NodeInfo]) -> str:
    most = max(n.num_gpus for n in nodes)
    if most == 0:
        return f"needs {_n(wanted)} GPU(s) on one node; the cluster has no GPUs"
    return f"needs {_n(wanted)} GPU(s) on one node; the most any node has is {_n(most)}"


def _accel_reason(wanted: str, nodes: list[NodeInfo]) -> str:
    have = sorted({n.accelerator_type for n in nodes if n.accelerator_type})
    return f"needs accelerator_type {wanted}; the cluster has {', '.join(have) if have else 'none'}"


def _memory_reason(needed: float, num_gpus: float, share: float, nodes: list[NodeInfo]) -> str:
    best = max(nodes, key=lambda n: n.gpu_memory_gb or 0)
    offered = (best.gpu_memory_gb or 0) * num_gpus * share
    return (f"needs ~{needed:.1f} GB of GPU memory; the largest matching node offers {offered:.1f} GB "
            f"({_n(num_gpus)} × {best.gpu_memory_gb:g} GB × utilization {share:g})")


def _ram_reason(needed: float, nodes: list[NodeInfo]) -> str:
    most = max(n.memory_gb or 0 for n in nodes)
    return (f"needs ~{needed:.1f} GB of memory on one node (CPU engine); the most any node offers Ray "
            f"is {most:g} GB")


def _cpu_reason(wanted: float, nodes: list[NodeInfo]) -> str:
    most = max(n.num_cpus for n in nodes)
    return f"needs {_n(wanted)} CPU(s) on one node; the most any matching node has is {_n(most)}"


def _n(value: float) -> str:
    return f"{value:g}"
