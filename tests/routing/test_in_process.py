"""The classifier as the ingress runs it (``serve_app/routing/in_process.py``): the same answers as the
classifier itself, one load however often it is started, and a classifier that cannot load sends
"auto" to the default route."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from serve_app.registry.catalog import Catalog
from serve_app.routing.classifier import Conversation, EmbeddingClassifier, RoutingPolicy
from serve_app.routing.in_process import InProcessClassifier
from serve_app.routing.router import ModelRouter
from serve_app.settings import Settings

DEFAULT = "up/default"


@pytest.mark.parametrize("conversation", [
    pytest.param([("user", "Write a Python function that reverses a linked list")], id="code"),
    pytest.param([("user", "hello from the peer benchmark please echo this")], id="chat"),
    pytest.param([("user", "def f(x): return x"), ("assistant", "A function."),
                  ("user", "why does it crash?")], id="short-follow-up"),
])
async def test_answers_as_the_classifier_does(prompt_classifier: EmbeddingClassifier,
                                              conversation: Conversation) -> None:
    settings = Settings()
    local = InProcessClassifier(settings.classifier_head, settings.cache_dir)
    assert await local.classify(conversation) == prompt_classifier.classify_many([conversation])[0]


async def test_started_twice_it_loads_once() -> None:
    settings = Settings()
    local = InProcessClassifier(settings.classifier_head, settings.cache_dir)
    loading = local.start()
    assert local.start() is loading
    assert isinstance(loading.result(timeout=120), EmbeddingClassifier)
    assert local.start() is loading


async def test_a_classifier_that_cannot_load_sends_auto_to_the_default(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = InProcessClassifier(tmp_path / "missing-head.json", Settings().cache_dir)
    router = ModelRouter(Catalog.model_construct(models=[], providers=[], default_model=DEFAULT), {},
                         policy=RoutingPolicy(default=DEFAULT), classifier=broken)
    with caplog.at_level(logging.WARNING):
        decision = await router.decide([("user", "Write a Python function that reverses a linked list")])
    assert decision.classification is None and decision.model == DEFAULT
    # The ingress's log says which head did not load, and why.
    assert any("missing-head.json" in r.getMessage() and "FileNotFoundError" in r.getMessage()
               for r in caplog.records), caplog.text
