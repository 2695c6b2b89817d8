"""Per-key usage accounting in the ingress, batched to the key store off the request path.

    record(key_id, ...)  on the request path: an in-memory add, nothing awaited
    every interval_s (sooner once flush_at_keys keys are pending) a background task hands the totals to
    sink.record_usage(batch), batch = [(key_id, requests, prompt_tokens, completion_tokens, last_used_at)]

The sink is the ``Auth`` deployment (or ``AuthService`` in-process), which writes the batch to the
database. A failed flush puts its counts back and the next attempt waits longer (capped backoff), so
nothing is lost while the database is down — up to ``max_keys`` distinct keys held; usage of further
keys is dropped and counted, because memory must stay bounded whatever the outage. Delivery is at least
once: a flush that timed out may still have been applied, and its counts are sent again. ``stop()``
(at shutdown) ends the loop and makes one last flush.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from serve_app.background import cancel_and_wait
from serve_app.errors import InvalidRequest
from serve_app.failopen import Backoff, FailOpen

logger = logging.getLogger(__name__)

# (key_id, requests, prompt_tokens, completion_tokens, last_used_at)
UsageRow = tuple[str, int, int, int, datetime]


class UsageSink(Protocol):
    async def record_usage(self, batch: list[UsageRow]) -> Any: ...


@dataclass(slots=True)
class _Tally:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used: float = 0.0  # time.time(); turned into a datetime only when flushed

    def merge(self, other: _Tally) -> None:
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.last_used = max(self.last_used, other.last_used)


class UsageRecorder:
    def __init__(
        self,
        sink: UsageSink,
        *,
        interval_s: float = 2.0,
        flush_at_keys: int = 1000,
        max_keys: int = 100_000,
        timeout_s: float = 10.0,
        max_backoff_s: float = 60.0,
    ) -> None:
        self._sink = sink
        self._interval_s = interval_s
        self._flush_at_keys = flush_at_keys
        self._max_keys = max(max_keys, flush_at_keys)
        self._timeout_s = timeout_s
        self._pending: dict[str, _Tally] = {}
        # One flush at a time: a caller's flush() must also wait for the batch the background loop
        # is sending, or "flushed" would return while that batch is still on its way.
        self._flushing = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # After a failed flush the next one waits 2, 4, 8… intervals, up to max_backoff_s.
        self._sink_guard = FailOpen(
            logger, backoff=Backoff(interval_s * 2, max_backoff_s),
            lost="could not record usage (%(error)s); keeping the counts and retrying",
            back="usage recording resumed after %(failures)d failed flushes")
        # For the metrics module and tests.
        self.rows_flushed = 0
        self.failed_flushes = 0
        self.requests_dropped = 0

    def record(self, key_id: str, *, requests: int = 1, prompt_tokens: int = 0,
               completion_tokens: int = 0) -> None:
        tally = self._pending.get(key_id)
        if tally is None:
            if len(self._pending) >= self._max_keys:
                self._drop(requests)
                return
            tally = self._pending[key_id] = _Tally()
        tally.requests += requests
        tally.prompt_tokens += prompt_tokens
        tally.completion_tokens += completion_tokens
        tally.last_used = time.time()
        if len(self._pending) >= self._flush_at_keys and self._sink_guard.available:
            self._wake.set()  # flush early; while the sink is failing, the backoff decides instead

    async def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="iir-usage-flush")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)
        if not await self.flush() and self._pending:
            held = sum(t.requests for t in self._pending.values())
            logger.error("usage of %d keys (%d requests) could not be recorded before shutdown",
                         len(self._pending), held)

    def stats(self) -> dict[str, int]:
        return {"pending_keys": len(self._pending), "rows_flushed": self.rows_flushed,
                "failed_flushes": self.failed_flushes, "requests_dropped": self.requests_dropped}

    async def flush(self) -> bool:
        """Send everything pending, in batches of ``flush_at_keys``; False if the sink failed."""
        async with self._flushing:
            return await self._flush()

    async def _flush(self) -> bool:
        batch, self._pending = self._pending, {}
        items = list(batch.items())
        for start in range(0, len(items), self._flush_at_keys):
            chunk = items[start:start + self._flush_at_keys]
            try:
                async with asyncio.timeout(self._timeout_s):
                    await self._sink.record_usage([_row(key_id, t) for key_id, t in chunk])
            except asyncio.CancelledError:
                self._restore(items[start:])
                raise
            except (InvalidRequest, ValueError) as exc:
                # The sink refuses the batch itself: sending it again would fail forever.
                logger.error("usage batch of %d keys refused, dropped: %s", len(chunk), exc)
                self.requests_dropped += sum(t.requests for _, t in chunk)
                continue
            except Exception as exc:
                self._restore(items[start:])
                self._failed(exc)
                return False
            self.rows_flushed += len(chunk)
        if items:  # an empty flush proves nothing about the sink
            self._sink_guard.succeeded()
        return True

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._delay())
            self._wake.clear()
            await self.flush()

    def _delay(self) -> float:
        if self._sink_guard.available:
            return self._interval_s
        return self._sink_guard.backoff.retry_in()

    def _restore(self, items: list[tuple[str, _Tally]]) -> None:
        """Put unsent counts back, merged with what arrived meanwhile, within the same bound."""
        for key_id, tally in items:
            held = self._pending.get(key_id)
            if held is not None:
                held.merge(tally)
            elif len(self._pending) < self._max_keys:
                self._pending[key_id] = tally
            else:
                self._drop(tally.requests)

    def _failed(self, exc: BaseException) -> None:
        self.failed_flushes += 1
        self._sink_guard.failed(exc)  # warns once per outage, not once per attempt

    def _drop(self, requests: int) -> None:
        if not self.requests_dropped:
            logger.error("usage recorder is full (%d keys pending); dropping usage of further keys",
                         len(self._pending))
        self.requests_dropped += requests


def _row(key_id: str, tally: _Tally) -> UsageRow:
    return (key_id, tally.requests, tally.prompt_tokens, tally.completion_tokens,
            datetime.fromtimestamp(tally.last_used, UTC))
