"""Where a request goes: ``model`` (or ``auto``) → a catalog entry and the engine that serves it.

Local models are reached through a ``ModelReplica`` handle (one Serve hop); remote models through a
``RemoteEngine`` living in the ingress process (no hop). Both look like ``InferenceEngine`` here.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from serve_app.catalog import Catalog, ModelSpec
from serve_app.classifier import Classification, RoutingPolicy
from serve_app.engines.base import InferenceEngine
from serve_app.errors import ModelNotFound, ServiceUnavailable

AUTO_MODELS = frozenset({"auto", "iir/auto"})
logger = logging.getLogger(__name__)


class PromptClassifier(Protocol):
    async def classify(self, text: str) -> Classification: ...


@dataclass(frozen=True)
class Route:
    spec: ModelSpec
    engine: InferenceEngine
    classification: Classification | None = None


class ModelRouter:
    def __init__(self, catalog: Catalog, engines: Mapping[str, InferenceEngine], *,
                 policy: RoutingPolicy, classifier: PromptClassifier) -> None:
        self._classifier = classifier
        self._policy = policy
        self.replace(catalog, engines)

    def replace(self, catalog: Catalog, engines: Mapping[str, InferenceEngine]) -> None:
        """Swap in a new catalog at once; requests in flight keep the engine they resolved."""
        self.catalog = catalog
        self._engines = dict(engines)

    def models(self) -> list[ModelSpec]:
        return [m for m in self.catalog.models if m.id in self._engines]

    def engine_for(self, model_id: str) -> InferenceEngine | None:
        return self._engines.get(model_id)

    async def resolve(self, model: str, prompt_text: str) -> Route:
        classification = None
        if model in AUTO_MODELS:
            classification = await self._classify(prompt_text)
            model = self._policy.choose(classification.category, set(self._engines))
        spec = self.catalog.get(model)
        if spec is None:
            raise ModelNotFound(f"The model '{model}' does not exist or you do not have access to it.",
                                param="model")
        engine = self._engines.get(spec.id)
        if engine is None:
            raise ServiceUnavailable(f"model '{spec.id}' is configured but not deployed", param="model")
        return Route(spec, engine, classification)

    async def _classify(self, text: str) -> Classification:
        try:
            return await self._classifier.classify(text)
        except Exception:  # a broken classifier must not break "auto": take the default route
            logger.warning("classifier failed; routing to the default model", exc_info=True)
            return Classification("chat", 0.0, 0.0, {})
