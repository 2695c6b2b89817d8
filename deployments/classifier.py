"""``Classifier``: answers ``model: "auto"`` (and ``POST /v1/classify``); called only for such requests.

``@serve.batch`` gathers concurrent requests into one call: one trip to a worker thread and one head
evaluation for the batch (embeddings are per text, see ``serve_app/routing/embedder.py``).
"""

from __future__ import annotations

import asyncio

from ray import serve

from serve_app.routing.classifier import Classification, Conversation, EmbeddingClassifier
from serve_app.settings import Settings


@serve.deployment
class Classifier:
    def __init__(self, settings: Settings) -> None:
        self._classifier = EmbeddingClassifier.load(settings.classifier_head, settings.cache_dir)

    # A short wait: at c=1 every request pays it; under load the queue fills batches by itself.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001)
    async def classify(self, conversations: list[Conversation]) -> list[Classification]:
        return await asyncio.to_thread(self._classifier.classify_many, conversations)
