"""``Classifier``: answers ``model: "auto"``; called only for such requests."""

from __future__ import annotations

from ray import serve

from serve_app.classifier import Classification, KeywordClassifier


@serve.deployment
class Classifier:
    def __init__(self) -> None:
        self._classifier = KeywordClassifier()

    async def classify(self, text: str) -> Classification:
        return self._classifier.classify_text(text)
