"""Engine fixtures: one real SmolLM2 engine per test module (loading it costs ~1 s)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from serve_app.engines.llama_cpp import LlamaCppEngine
from tests.engines.local_models import SMOLLM2


@pytest.fixture(scope="module")
async def llama() -> AsyncIterator[LlamaCppEngine]:
    engine = LlamaCppEngine.from_spec(SMOLLM2)
    yield engine
    await engine.aclose()
