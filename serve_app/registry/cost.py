"""What a model costs per 1,000 tokens, so routing can prefer the cheapest model that is good enough.

Remote models: the provider's price, set as ``cost_per_1k_tokens`` in ``models.yaml``.

Local models: the hourly price of what one replica reserves, divided by what it produces in an hour::

    cost_per_1k = (num_cpus × CPU $/h + num_gpus × GPU $/h[accelerator]) / (tokens_per_s × 3600) × 1000

``tokens_per_s`` is the model's measured single-stream decode speed (``models.yaml``; the packaged
SmolLM2 was measured at 61 tok/s on one thread here). Single-stream speed makes this an upper bound:
batched GPU engines produce many times more per replica under load. Without a measured speed (or a
declared price) the cost is ``None``, unknown: a guessed speed would be off by orders of magnitude
between models, and cost-aware routing would trust it. The hourly prices are on-demand
cloud list prices, rounded (``docs/ARCHITECTURE.md``, "Model cost"); set ``IIR_CPU_HOUR_USD`` or a
model's own ``cost_per_1k_tokens`` where your prices differ.
"""

from __future__ import annotations

from serve_app.registry.catalog import ModelSpec

CPU_HOUR_USD = 0.04  # one vCPU of a general-purpose instance
GPU_HOUR_USD: dict[str, float] = {
    "T4": 0.35, "L4": 0.80, "A10G": 1.00, "L40S": 1.90, "V100": 2.50,
    "A100": 3.00, "A100-40G": 3.00, "A100-80G": 4.00, "H100": 5.00, "H200": 6.50, "B200": 9.00,
}
DEFAULT_GPU_HOUR_USD = 2.00  # a GPU of unknown type


def hourly_usd(spec: ModelSpec, *, cpu_hour_usd: float = CPU_HOUR_USD) -> float:
    res = spec.resources
    gpu_rate = GPU_HOUR_USD.get(res.accelerator_type or "", DEFAULT_GPU_HOUR_USD)
    return res.num_cpus * cpu_hour_usd + res.num_gpus * gpu_rate


def cost_per_1k_tokens(spec: ModelSpec, *, cpu_hour_usd: float = CPU_HOUR_USD) -> float | None:
    """``None`` when nothing is known (a remote model without a price, a local one without a speed)."""
    if spec.cost_per_1k_tokens is not None:
        return spec.cost_per_1k_tokens
    if not spec.is_local or spec.task == "embedding":
        return None
    if spec.tokens_per_s is None:
        return None
    return round(hourly_usd(spec, cpu_hour_usd=cpu_hour_usd) / (spec.tokens_per_s * 3600) * 1000, 6)
