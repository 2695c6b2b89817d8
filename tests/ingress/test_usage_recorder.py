"""The ingress's usage recorder: batching, early flushes, outages of the sink, shutdown, bounds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from serve_app.auth.keystore import KeyStore
from serve_app.auth.service import AuthService
from serve_app.errors import InvalidRequest, ServiceUnavailable
from serve_app.ingress.usage_recorder import UsageRecorder, UsageRow


class Sink:
    """Collects batches; can be told to fail, the way the Auth deployment does when its DB is down."""

    def __init__(self) -> None:
        self.batches: list[list[UsageRow]] = []
        self.failing: Exception | None = None
        self.delay_s = 0.0  # a slow database
        self.calls = 0

    async def record_usage(self, batch: list[UsageRow]) -> int:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.failing is not None:
            raise self.failing
        self.batches.append(batch)
        return len(batch)

    def totals(self) -> dict[str, tuple[int, int, int]]:
        out: dict[str, tuple[int, int, int]] = {}
        for batch in self.batches:
            for key_id, requests, prompt, completion, _ in batch:
                r, p, c = out.get(key_id, (0, 0, 0))
                out[key_id] = (r + requests, p + prompt, c + completion)
        return out


async def test_counts_are_summed_per_key_and_flushed_in_the_background() -> None:
    sink = Sink()
    recorder = UsageRecorder(sink, interval_s=0.05)
    await recorder.start()
    before = datetime.now(UTC)
    recorder.record("a", prompt_tokens=3, completion_tokens=4)
    recorder.record("a", prompt_tokens=1, completion_tokens=1)
    recorder.record("b")
    await asyncio.sleep(0.2)
    await recorder.stop()
    assert sink.totals() == {"a": (2, 4, 5), "b": (1, 0, 0)}
    last_used = sink.batches[0][0][4]
    assert last_used.tzinfo is not None and last_used >= before.replace(microsecond=0)


async def test_flush_returns_only_once_the_batch_the_background_loop_is_sending_has_landed() -> None:
    sink = Sink()
    sink.delay_s = 0.2
    recorder = UsageRecorder(sink, interval_s=0.01)
    await recorder.start()
    recorder.record("a", prompt_tokens=2, completion_tokens=3)
    await asyncio.sleep(0.05)  # the background loop has taken the batch and is waiting on the sink
    assert await recorder.flush()
    assert sink.totals() == {"a": (1, 2, 3)}  # what was recorded before flush() is in the sink
    await recorder.stop()


async def test_many_keys_flush_early_in_bounded_batches() -> None:
    sink = Sink()
    recorder = UsageRecorder(sink, interval_s=60, flush_at_keys=10)
    await recorder.start()
    for i in range(25):
        recorder.record(f"k{i}")
    await asyncio.sleep(0.05)  # well before the 60 s interval
    assert sum(len(b) for b in sink.batches) == 25 and max(len(b) for b in sink.batches) <= 10
    await recorder.stop()


async def test_failed_flushes_keep_the_counts_until_the_sink_is_back() -> None:
    sink = Sink()
    sink.failing = ServiceUnavailable("The API key store is unavailable")
    recorder = UsageRecorder(sink, interval_s=0.02, max_backoff_s=0.05)
    await recorder.start()
    recorder.record("a", completion_tokens=5)
    await asyncio.sleep(0.15)
    recorder.record("a", completion_tokens=5)
    assert sink.calls >= 2 and not sink.batches and recorder.failed_flushes >= 2
    sink.failing = None
    await asyncio.sleep(0.15)
    await recorder.stop()
    assert sink.totals() == {"a": (2, 0, 10)}  # nothing lost, nothing doubled


async def test_memory_is_bounded_while_the_sink_is_down() -> None:
    sink = Sink()
    sink.failing = ServiceUnavailable("down")
    recorder = UsageRecorder(sink, flush_at_keys=2, max_keys=3)
    for i in range(5):
        recorder.record(f"k{i}")
    recorder.record("k0")  # a key already held still counts
    assert await recorder.flush() is False
    assert recorder.stats()["pending_keys"] == 3 and recorder.requests_dropped == 2
    sink.failing = None
    assert await recorder.flush() is True
    assert sink.totals() == {"k0": (2, 0, 0), "k1": (1, 0, 0), "k2": (1, 0, 0)}


async def test_a_batch_the_sink_refuses_is_dropped_not_retried_forever() -> None:
    sink = Sink()
    sink.failing = InvalidRequest("bad usage batch")
    recorder = UsageRecorder(sink)
    recorder.record("a")
    assert await recorder.flush() is True
    assert recorder.stats()["pending_keys"] == 0 and recorder.requests_dropped == 1


async def test_shutdown_flushes_what_is_pending() -> None:
    sink = Sink()
    recorder = UsageRecorder(sink, interval_s=3600)
    await recorder.start()
    recorder.record("a", prompt_tokens=2)
    await recorder.stop()
    assert sink.totals() == {"a": (1, 2, 0)}


@pytest.fixture
async def auth(tmp_path: Path) -> AsyncIterator[tuple[AuthService, KeyStore]]:
    store = KeyStore(f"sqlite:///{tmp_path / 'keys.db'}")
    store.create_schema()
    service = AuthService(store, redis_url=None, redis_timeout_s=0.25)
    yield service, store
    await service.close()
    store.close()


async def test_batches_reach_the_key_store(auth: tuple[AuthService, KeyStore]) -> None:
    service, store = auth
    _, info = store.create("usage test")
    recorder = UsageRecorder(service, interval_s=0.02)
    await recorder.start()
    recorder.record(info.id, prompt_tokens=3, completion_tokens=7)
    await asyncio.sleep(0.1)
    recorder.record(info.id, prompt_tokens=1, completion_tokens=1)
    await recorder.stop()
    usage = await service.usage(info.id)
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (2, 4, 8)
    assert usage["last_used_at"] is not None
