"""The fit check: which nodes could host one replica, and why none can."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from serve_app.registry.catalog import ModelSpec
from serve_app.registry.fit import ModelSourceError, check_fit, estimate_for, estimate_gpu_memory_gb
from serve_app.registry.hardware import NodeInfo

GIB = 1024**3
HEAD = NodeInfo("head", "10.0.0.1", num_cpus=4, num_gpus=0, is_head=True)
A10G = NodeInfo("a10g", "10.0.0.2", num_cpus=8, num_gpus=1, accelerator_type="A10G", gpu_memory_gb=24)
L4X4 = NodeInfo("l4x4", "10.0.0.3", num_cpus=16, num_gpus=4, accelerator_type="L4", gpu_memory_gb=24)
SMALL_RAM = NodeInfo("small-ram", "10.0.0.5", num_cpus=4, num_gpus=0, memory_gb=8)
BIG_RAM = NodeInfo("big-ram", "10.0.0.6", num_cpus=4, num_gpus=0, memory_gb=64)
MYSTERY = NodeInfo("mystery", "10.0.0.4", num_cpus=8, num_gpus=1, accelerator_type="X1")


def spec(engine: str = "vllm", **resources: Any) -> ModelSpec:
    return ModelSpec.model_validate({"id": "local/m", "engine": engine, "task": "chat", "source": "/m",
                                     "resources": resources})


CPU = spec("llama_cpp", num_cpus=2)


@pytest.mark.parametrize(("model", "nodes", "estimate", "fits", "node_ids", "reason"), [
    pytest.param(CPU, [HEAD, A10G], None, True, ["head", "a10g"], None, id="cpu-model-any-node"),
    pytest.param(spec("llama_cpp", num_cpus=12), [HEAD, A10G, L4X4], None, True, ["l4x4"], None,
                 id="cpu-model-big-node-only"),
    pytest.param(spec("llama_cpp", num_cpus=32), [HEAD, L4X4], None, False, [],
                 "needs 32 CPU(s) on one node; the most any matching node has is 16", id="too-many-cpus"),
    pytest.param(spec(num_gpus=1), [HEAD], None, False, [],
                 "needs 1 GPU(s) on one node; the cluster has no GPUs", id="no-gpus"),
    pytest.param(spec(num_gpus=1), [HEAD, A10G, L4X4], None, True, ["a10g", "l4x4"], None, id="one-gpu"),
    pytest.param(spec(num_gpus=2), [HEAD, A10G], None, False, [],
                 "needs 2 GPU(s) on one node; the most any node has is 1", id="gpus-not-on-one-node"),
    pytest.param(spec(num_gpus=1, accelerator_type="H100"), [A10G, L4X4], None, False, [],
                 "needs accelerator_type H100; the cluster has A10G, L4", id="missing-accelerator"),
    pytest.param(spec(num_gpus=1, accelerator_type="L4"), [A10G, L4X4], None, True, ["l4x4"], None,
                 id="accelerator-picks-node"),
    pytest.param(spec(num_gpus=1), [A10G, L4X4], 30.0, False, [],
                 "needs ~30.0 GB of GPU memory; the largest matching node offers 21.6 GB "
                 "(1 × 24 GB × utilization 0.9)", id="too-big-for-one-gpu"),
    pytest.param(spec(num_gpus=2), [A10G, L4X4], 30.0, True, ["l4x4"], None, id="fits-on-two-gpus"),
    pytest.param(spec(num_gpus=1), [A10G], 21.0, True, ["a10g"], None, id="just-fits"),
    pytest.param(spec(num_gpus=1), [A10G, MYSTERY], 30.0, True, ["mystery"], None,
                 id="unknown-memory-gets-benefit-of-doubt"),
    pytest.param(spec(num_gpus=1, num_cpus=12), [A10G, L4X4], 30.0, False, [],
                 "needs ~30.0 GB of GPU memory; the largest matching node offers 21.6 GB "
                 "(1 × 24 GB × utilization 0.9)", id="first-unmet-need-named"),
    pytest.param(spec(num_gpus=1, num_cpus=12), [A10G, L4X4], None, True, ["l4x4"], None,
                 id="one-node-must-have-cpus-and-gpus"),
    pytest.param(CPU, [], None, False, [], "the Ray cluster has no alive nodes", id="no-nodes"),
    pytest.param(CPU, [SMALL_RAM, BIG_RAM], 12.0, True, ["big-ram"], None, id="cpu-model-needs-ram"),
    pytest.param(CPU, [SMALL_RAM], 12.0, False, [],
                 "needs ~12.0 GB of memory on one node (CPU engine); the most any node offers Ray is 8 GB",
                 id="cpu-model-too-big-for-ram"),
    pytest.param(CPU, [HEAD], 12.0, True, ["head"], None, id="unknown-ram-never-unfit"),
])
def test_check_fit(model: ModelSpec, nodes: list[NodeInfo], estimate: float | None, fits: bool,
                   node_ids: list[str], reason: str | None) -> None:
    result = check_fit(model, nodes, estimate_gb=estimate)
    assert (result.fits, result.node_ids, result.reason) == (fits, node_ids, reason)


def test_gpu_memory_utilization_from_engine_options() -> None:
    model = ModelSpec.model_validate({"id": "local/m", "engine": "vllm", "task": "chat", "source": "/m",
                                      "engine_options": {"gpu_memory_utilization": 0.5},
                                      "resources": {"num_gpus": 1}})
    assert check_fit(model, [A10G], estimate_gb=11.0).fits
    assert check_fit(model, [A10G], estimate_gb=13.0).reason == (
        "needs ~13.0 GB of GPU memory; the largest matching node offers 12.0 GB "
        "(1 × 24 GB × utilization 0.5)")


def test_remote_models_always_fit() -> None:
    remote = ModelSpec.model_validate({"id": "openai/gpt-4o-mini", "engine": "openai", "task": "chat"})
    assert check_fit(remote, []).fits and estimate_for(remote) is None


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:  # sparse: the size without the disk
        f.truncate(size)


def test_gguf_estimate_is_file_size_plus_20_percent(tmp_path: Path) -> None:
    _sparse(tmp_path / "m.gguf", 10 * GIB)
    assert estimate_gpu_memory_gb(CPU, tmp_path / "m.gguf") == 12.0


@pytest.mark.parametrize(("files", "max_model_len", "expected"), [
    pytest.param({"model.safetensors": 5 * GIB}, None, 6.0, id="weights-only"),
    pytest.param({"a.safetensors": 2 * GIB, "b.safetensors": 3 * GIB, "pytorch_model.bin": 5 * GIB},
                 None, 6.0, id="safetensors-preferred-over-bin"),
    pytest.param({"pytorch_model.bin": 5 * GIB}, None, 6.0, id="bin-only"),
    # 2 × 24 layers × 2 kv heads × 64 head_dim × 4096 tokens × 2 bytes = 0.046875 GiB
    pytest.param({"model.safetensors": 5 * GIB}, 4096, 6.047, id="kv-cache-for-max-model-len"),
    # Unset max_model_len: vLLM's default, the model's whole context (max_position_embeddings 32768).
    pytest.param({"model.safetensors": 5 * GIB, "max_position_embeddings": 32768}, None, 6.375,
                 id="kv-cache-for-the-models-whole-context"),
    pytest.param({"model.safetensors": 5 * GIB, "max_position_embeddings": 32768}, 4096, 6.047,
                 id="max-model-len-overrides-the-models-context"),
])
def test_hf_folder_estimate(tmp_path: Path, files: dict[str, int], max_model_len: int | None,
                            expected: float) -> None:
    files = dict(files)
    config = {"num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
              "hidden_size": 896, "max_position_embeddings": files.pop("max_position_embeddings", None)}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    for name, size in files.items():
        _sparse(tmp_path / name, size)
    options = {"max_model_len": max_model_len} if max_model_len else {}
    model = ModelSpec.model_validate({"id": "local/m", "engine": "vllm", "task": "chat",
                                      "source": str(tmp_path), "engine_options": options})
    assert estimate_gpu_memory_gb(model, tmp_path) == expected
    assert estimate_for(model) == expected


def test_estimate_for_missing_source_is_none() -> None:
    assert estimate_for(spec(num_gpus=1)) is None


@pytest.mark.parametrize(("config", "max_model_len", "problem"), [
    pytest.param(b"{not json", None, "cannot be read as JSON", id="not-json-even-without-kv-cache"),
    pytest.param(b"\xff\xfe{}", 4096, "cannot be read as JSON", id="not-utf8"),
    pytest.param(b"[1, 2]", 4096, "expected a JSON object, found list", id="a-list"),
    pytest.param(b'{"text_config": 7}', 4096, "text_config is not a JSON object", id="odd-text-config"),
    pytest.param(b'{"num_hidden_layers": "24", "num_attention_heads": 14}', 4096,
                 "num_hidden_layers is '24', not a positive whole number", id="size-as-string"),
    pytest.param(b'{"num_hidden_layers": 24, "num_attention_heads": 0}', 4096,
                 "num_attention_heads is 0, not a positive whole number", id="zero-heads"),
    pytest.param(b'{"num_hidden_layers": 24, "num_attention_heads": 14}', "lots",
                 "engine_options.max_model_len is 'lots', not a whole number", id="bad-max-model-len"),
])
def test_unusable_hf_folder_is_an_error_naming_the_problem(tmp_path: Path, config: bytes,
                                                            max_model_len: Any, problem: str) -> None:
    (tmp_path / "config.json").write_bytes(config)
    _sparse(tmp_path / "model.safetensors", GIB)
    options = {"max_model_len": max_model_len} if max_model_len else {}
    model = ModelSpec.model_validate({"id": "local/m", "engine": "vllm", "task": "chat",
                                      "source": str(tmp_path), "engine_options": options})
    with pytest.raises(ModelSourceError) as caught:
        estimate_for(model)
    assert problem in str(caught.value)
    if max_model_len != "lots":
        assert str(tmp_path / "config.json") in str(caught.value)


def test_unreadable_config_json_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").mkdir()  # there, but not a file: no permissions needed to make it fail
    _sparse(tmp_path / "model.safetensors", GIB)
    model = ModelSpec.model_validate({"id": "local/m", "engine": "vllm", "task": "chat",
                                      "source": str(tmp_path)})
    with pytest.raises(ModelSourceError, match="cannot be read as JSON"):
        estimate_for(model)
