"""The vLLM engine against the same contract as the CPU engines. GPU only.

Runs where vLLM is installed (``pip install .[gpu]``), CUDA is visible and ``IIR_TEST_VLLM_MODEL``
names a local Hugging Face model folder (no hub is reachable from the test machines). Skips elsewhere.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator

import pytest

from serve_app.registry.catalog import ModelSpec
from tests.engines import contract

pytestmark = pytest.mark.gpu

MODEL_PATH = os.environ.get("IIR_TEST_VLLM_MODEL", "")


def _missing() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install .[gpu])"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    if not MODEL_PATH:
        return "IIR_TEST_VLLM_MODEL does not name a local model folder"
    return None


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[object]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from serve_app.engines.vllm_engine import VLLMEngine

    spec = ModelSpec(id="local/vllm-test", engine="vllm", task="chat", source=MODEL_PATH,
                     engine_options={"gpu_memory_utilization": 0.5, "max_model_len": 2048},
                     resources={"num_gpus": 1})
    vllm_engine = VLLMEngine.from_spec(spec)
    yield vllm_engine
    await vllm_engine.aclose()


@pytest.mark.parametrize("check", contract.CORE_GENERATION_CHECKS + [contract.check_n_choices])
async def test_contract(engine: object, check: contract.Check) -> None:
    await check(engine, contract.Requests(model="local/vllm-test"))  # type: ignore[arg-type]
