"""``ModelReplica``: one deployment per local model; Ray places it by the model's resources."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from serve_app.engines.base import InferenceEngine
from serve_app.engines.factory import build_local_engine
from serve_app.fair_queue import NO_TURN, Turn
from serve_app.registry.catalog import ModelSpec
from serve_app.schemas import EmbeddingRequest, GenerateRequest


@serve.deployment
class ModelReplica:
    def __init__(self, spec: ModelSpec) -> None:
        self._engine: InferenceEngine = build_local_engine(spec)

    # ``turn`` (key priority, key, class) orders the engine's own queue: serve_app/engines/slots.py.
    async def generate(self, request: GenerateRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        return await self._engine.generate(request, turn)

    async def stream(self, request: GenerateRequest, turn: Turn = NO_TURN) -> AsyncIterator[dict[str, Any]]:
        async for chunk in self._engine.stream(request, turn):
            yield chunk

    async def embed(self, request: EmbeddingRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        return await self._engine.embed(request, turn)

    async def infer(self, payload: dict[str, Any], turn: Turn = NO_TURN) -> dict[str, Any]:
        return await self._engine.infer(payload, turn)

    async def check_health(self) -> None:
        """Also Serve's own replica health check: a failing engine gets the replica restarted."""
        await self._engine.check_health()
