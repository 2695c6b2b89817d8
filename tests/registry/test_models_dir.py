"""Scanning a models directory: GGUF files and Hugging Face folders become specs, unread."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.registry.catalog import Resources
from serve_app.registry.models_dir import scan_models_dir, slug


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    (tmp_path / "Qwen2.5-0.5B-Instruct.Q4_K_M.gguf").write_bytes(b"GGUF\x03\x00")
    (tmp_path / "nomic-embed-text-v1.5.f16.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes.txt").write_text("not a model")
    hf = tmp_path / "Llama-3.2-1B-Instruct"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\x00" * 8)
    (tmp_path / "half-downloaded").mkdir()
    (tmp_path / "half-downloaded" / "config.json").write_text("{}")  # no weights: not a model yet
    nested = tmp_path / "big"
    nested.mkdir()
    for part in (1, 2):
        (nested / f"Mixtral-8x7B.Q8_0-0000{part}-of-00002.gguf").write_bytes(b"GGUF")
    return tmp_path


def test_scan(models_dir: Path) -> None:
    specs = {s.id: s for s in scan_models_dir(models_dir)}
    assert sorted(specs) == ["local/llama-3.2-1b-instruct", "local/mixtral-8x7b.q8_0",
                             "local/nomic-embed-text-v1.5.f16", "local/qwen2.5-0.5b-instruct.q4_k_m"]
    qwen = specs["local/qwen2.5-0.5b-instruct.q4_k_m"]
    assert (qwen.engine, qwen.task, qwen.resources) == ("llama_cpp", "chat", Resources(num_cpus=1))
    assert qwen.source == str((models_dir / "Qwen2.5-0.5B-Instruct.Q4_K_M.gguf").resolve())
    assert specs["local/nomic-embed-text-v1.5.f16"].task == "embedding"
    llama = specs["local/llama-3.2-1b-instruct"]
    assert (llama.engine, llama.task, llama.resources.num_gpus) == ("vllm", "chat", 1)
    assert llama.deployment_name == "Model_llama_3_2_1b_instruct"
    mixtral = specs["local/mixtral-8x7b.q8_0"]
    assert mixtral.source.endswith("Mixtral-8x7B.Q8_0-00001-of-00002.gguf")  # type: ignore[union-attr]


def test_missing_or_empty_dir_has_no_models(tmp_path: Path) -> None:
    assert scan_models_dir(tmp_path / "nope") == []
    assert scan_models_dir(tmp_path) == []


def test_duplicate_slugs_keep_the_first(tmp_path: Path) -> None:
    (tmp_path / "Tiny Model.gguf").write_bytes(b"GGUF")
    (tmp_path / "tiny-model.gguf").write_bytes(b"GGUF")
    [spec] = scan_models_dir(tmp_path)
    assert spec.id == "local/tiny-model" and spec.source.endswith("Tiny Model.gguf")  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "expected"), [
    pytest.param("Qwen2.5-0.5B-Instruct.Q4_K_M", "qwen2.5-0.5b-instruct.q4_k_m", id="keeps-dots"),
    pytest.param("My Model (v2)!", "my-model-v2", id="spaces-and-punctuation"),
    pytest.param("___", "model", id="never-empty"),
])
def test_slug(name: str, expected: str) -> None:
    assert slug(name) == expected
