"""A broken or stuck prompt classifier never holds up ``model: "auto"`` (docs/ARCHITECTURE.md, failure
policies): the default route, at most one classifier timeout, then classification again once the
classifier recovers.

The real ``InProcessClassifier`` with the real model, behind the real router, held up or broken the
ways it can be inside an ingress: its one worker thread busy (a classification or a load that does
not end), or its head file missing.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from serve_app.registry.catalog import Catalog
from serve_app.routing.classifier import RoutingPolicy
from serve_app.routing.in_process import InProcessClassifier
from serve_app.routing.router import Decision, ModelRouter
from serve_app.settings import Settings

DEFAULT = "up/default"
CODE = [("user", "Write a Python function that reverses a linked list")]
TIMEOUT_S = 0.3  # IIR_CLASSIFIER_TIMEOUT_S, shortened; a short prompt classifies in ~10 ms
SKIPPED_S = 0.1  # a request that skips the classifier does not wait for it
RECOVERY_S = 30.0  # the router's first pause is 1 s; generous for a loaded box


def router_with(classifier: InProcessClassifier) -> ModelRouter:
    return ModelRouter(Catalog.model_construct(models=[], providers=[], default_model=DEFAULT), {},
                       policy=RoutingPolicy(default=DEFAULT), classifier=classifier,
                       classifier_timeout_s=TIMEOUT_S)


async def timed_auto(router: ModelRouter) -> tuple[Decision, float]:
    started = time.monotonic()
    decision = await router.decide(CODE)
    return decision, time.monotonic() - started


async def until_classified(router: ModelRouter) -> Decision:
    deadline = time.monotonic() + RECOVERY_S
    while (decision := await router.decide(CODE)).classification is None:
        assert time.monotonic() < deadline, "auto never classified again after the classifier recovered"
        await asyncio.sleep(0.05)
    return decision


def outages_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum("classifier failed" in r.getMessage() for r in caplog.records)


@pytest.fixture(autouse=True, scope="module")
def _metrics_ready() -> None:
    """The router's metrics import Ray at their first use (~0.7 s): paid here, not in a timed request."""
    import ray  # noqa: F401


@pytest.fixture
def worker() -> Iterator[ThreadPoolExecutor]:
    """The classifier's one worker thread, given to it so that a test can hold it up."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="test-classifier")
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.parametrize("while_loading", [
    pytest.param(False, id="stuck-classifying"),
    pytest.param(True, id="stuck-loading"),
])
async def test_a_stuck_classifier_costs_one_timeout_then_auto_classifies_again_when_it_is_free(
        worker: ThreadPoolExecutor, while_loading: bool, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings()
    classifier = InProcessClassifier(settings.classifier_head, settings.cache_dir, executor=worker)
    router = router_with(classifier)
    release = threading.Event()
    if not while_loading:
        await asyncio.wrap_future(classifier.start())
        first = await router.decide(CODE)
        assert first.classification is not None and first.classification.category == "code"
    worker.submit(release.wait)  # the worker thread is busy until released: nothing it queues runs
    classifier.start()  # with while_loading, the load waits behind it, as on a replica's slow first start
    try:
        with caplog.at_level(logging.WARNING, logger="serve_app.routing.router"):
            answers = [await timed_auto(router) for _ in range(6)]
    finally:
        release.set()
    assert all(d.classification is None and d.model == DEFAULT for d, _ in answers), answers
    took = [t for _, t in answers]
    # One classifier timeout, paid by the first request only; the next ones skip the classifier.
    assert TIMEOUT_S * 0.9 <= took[0] < TIMEOUT_S + 0.5, took
    assert max(took[1:]) < SKIPPED_S, took
    assert outages_logged(caplog) == 1

    recovered = await until_classified(router)  # after the router's pause
    assert recovered.classification is not None and recovered.classification.category == "code"


async def test_a_classifier_whose_head_is_missing_routes_auto_to_the_default_until_it_is_there(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings()
    head = tmp_path / "head.json"
    classifier = InProcessClassifier(head, settings.cache_dir)
    router = router_with(classifier)
    with pytest.raises(FileNotFoundError):
        await asyncio.wrap_future(classifier.start())  # as when the ingress started

    with caplog.at_level(logging.WARNING, logger="serve_app.routing.router"):
        answers = [await timed_auto(router) for _ in range(6)]
    assert all(d.classification is None and d.model == DEFAULT for d, _ in answers), answers
    # Broken, not stuck: no request waits for the timeout.
    assert max(t for _, t in answers) < TIMEOUT_S, answers
    assert outages_logged(caplog) == 1

    shutil.copyfile(settings.classifier_head, head)  # put right, no restart: loaded again after the pause
    recovered = await until_classified(router)
    assert recovered.classification is not None and recovered.classification.category == "code"
