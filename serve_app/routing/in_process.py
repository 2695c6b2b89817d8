"""The prompt classifier run inside the ingress process, for ``model: "auto"`` and ``POST /v1/classify``.

Why not a ``Classifier`` deployment (issue 13, port 8000 at c=1 on the 2-core box): "auto" added
16 ms p50 over naming the model through one. A Serve hop to a replica that answered at once, without
classifying, already added 6.7 ms, and the classification itself takes ~5 ms (quiet box), so no
deployment could meet the 8 ms budget. In-process there is no hop; the classification runs on a
worker thread (ONNX Runtime releases the GIL for the embedding, most of the work), so the event loop
keeps serving other requests meanwhile.

One worker thread: on two cores more would only contend, and a request that stopped waiting
(``IIR_CLASSIFIER_TIMEOUT_S``) is dropped from its queue before it runs. Each text is embedded on its
own (``serve_app/routing/embedder.py``), so a result does not depend on what else was queued.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from serve_app.failopen import describe
from serve_app.routing.classifier import Classification, Conversation, EmbeddingClassifier

logger = logging.getLogger(__name__)


class InProcessClassifier:
    """``await classify(conversation)``, run on one worker thread; a ``PromptClassifier`` for the router.

    ``start()`` begins loading the model (~0.6 s; the first time on a machine, ~20 s of ONNX export) on
    that thread: the ingress calls it in its constructor, so the model loads while the replica starts
    and the first "auto" request does not pay for it. A load that failed fails the calls waiting for
    it, and the router takes the default route (``ModelRouter.decide``); the next call loads again, and
    the router makes that call only after its pause, so a head file put right is picked up without a
    restart and a broken one costs one attempt per pause (1 s doubling to 30 s).

    ``executor``: the one worker thread, made here unless given.
    """

    def __init__(self, head_path: Path, cache_dir: Path, *,
                 executor: ThreadPoolExecutor | None = None) -> None:
        self._head_path, self._cache_dir = head_path, cache_dir
        # No thread starts here: ThreadPoolExecutor makes its thread at the first submit.
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="iir-classifier")
        self._loaded: Future[EmbeddingClassifier] | None = None
        self._lock = threading.Lock()

    def start(self) -> Future[EmbeddingClassifier]:
        """Begin loading the model, unless it is loaded or loading; a load that failed is begun again."""
        with self._lock:
            if self._loaded is None or _failed(self._loaded):
                self._loaded = self._executor.submit(EmbeddingClassifier.load, self._head_path,
                                                     self._cache_dir)
                self._loaded.add_done_callback(self._log_failure)
            return self._loaded

    async def classify(self, conversation: Conversation) -> Classification:
        loaded = self.start()
        # Once loaded, no trip through the event loop to read the finished future. Shielded: a caller
        # that stops waiting must not cancel a load the next callers need.
        classifier = loaded.result() if loaded.done() else await asyncio.shield(asyncio.wrap_future(loaded))
        loop = asyncio.get_running_loop()
        # Not shielded: a caller that stops waiting takes its classification out of the queue.
        [result] = await loop.run_in_executor(self._executor, classifier.classify_many, [conversation])
        return result

    def _log_failure(self, loaded: Future[EmbeddingClassifier]) -> None:
        error = None if loaded.cancelled() else loaded.exception()
        if error is not None:
            logger.warning("the prompt classifier (head %s) did not load: %s; auto takes the default route "
                           "until it does", self._head_path, describe(error))


def _failed(future: Future[EmbeddingClassifier]) -> bool:
    return future.done() and (future.cancelled() or future.exception() is not None)
