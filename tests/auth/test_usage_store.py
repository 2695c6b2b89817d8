"""Usage batches on both backends: additive, per key, concurrent without lost updates."""

from __future__ import annotations

import random
import threading
from datetime import UTC, datetime, timedelta

import pytest

from serve_app.auth.keystore import KeyStore
from serve_app.auth.usage_store import UsageDelta

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def test_a_new_key_has_zero_usage(store: KeyStore) -> None:
    _, info = store.create("idle", 0)
    assert store.usage(info.id) == {"id": info.id, "object": "api_key.usage", "requests": 0,
                                    "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                                    "last_used_at": None}


def test_batches_add_up(store: KeyStore) -> None:
    _, a = store.create("a", 0)
    _, b = store.create("b", 0)
    assert store.record_usage([UsageDelta(a.id, 2, 10, 5, T0), UsageDelta(b.id, 1, 1, 1, T0)]) == 2
    assert store.record_usage([(a.id, 3, 100, 50, T0 + timedelta(seconds=5))]) == 1
    usage = store.usage(a.id)
    assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (5, 110, 55)
    assert usage["total_tokens"] == 165
    assert usage["last_used_at"] == (T0 + timedelta(seconds=5)).isoformat()
    assert store.usage(b.id)["requests"] == 1
    assert store.get(a.id).last_used_at == T0 + timedelta(seconds=5), "the key row follows the batches"


def test_one_batch_may_name_a_key_twice(store: KeyStore) -> None:
    _, info = store.create("twice", 0)
    # A plain INSERT ... ON CONFLICT of both rows would fail on PostgreSQL; the store merges them first.
    assert store.record_usage([(info.id, 1, 1, 0, T0), (info.id, 1, 2, 0, T0 + timedelta(seconds=1))]) == 1
    usage = store.usage(info.id)
    assert (usage["requests"], usage["prompt_tokens"]) == (2, 3)
    assert usage["last_used_at"] == (T0 + timedelta(seconds=1)).isoformat()


def test_last_used_at_never_moves_back(store: KeyStore) -> None:
    _, info = store.create("late batch", 0)
    store.record_usage([(info.id, 1, 0, 0, T0 + timedelta(minutes=1))])
    store.record_usage([(info.id, 1, 0, 0, T0)])  # an older batch, delivered late
    assert store.get(info.id).last_used_at == T0 + timedelta(minutes=1)
    assert store.usage(info.id)["requests"] == 2


def test_posix_seconds_are_accepted(store: KeyStore) -> None:
    _, info = store.create("epoch", 0)
    store.record_usage([(info.id, 1, 0, 0, T0.timestamp())])
    assert store.get(info.id).last_used_at == T0


def test_unknown_keys_are_skipped_not_fatal(store: KeyStore) -> None:
    _, info = store.create("real", 0)
    assert store.record_usage([("no-such-key", 1, 1, 1, T0), (info.id, 1, 1, 1, T0)]) == 1
    assert store.usage(info.id)["requests"] == 1
    assert store.record_usage([]) == 0


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(("k", -1, 0, 0, T0), id="negative-count"),
        pytest.param(("k", 1.5, 0, 0, T0), id="fractional-count"),
        pytest.param(("k", 1, 0, 0, datetime(2030, 1, 1)), id="naive-timestamp"),
    ],
)
def test_malformed_entries_are_refused_whole(store: KeyStore, entry: tuple[object, ...]) -> None:
    _, info = store.create("strict", 0)
    with pytest.raises(ValueError):
        store.record_usage([(info.id, 1, 1, 1, T0), (info.id, *entry[1:])])
    assert store.usage(info.id)["requests"] == 0, "nothing of a refused batch is applied"


def test_concurrent_batches_lose_no_update(database_url: str) -> None:
    """Eight ingress replicas flushing at once, each batch naming the same keys in its own order."""
    stores = [KeyStore(database_url) for _ in range(8)]
    stores[0].upgrade()
    key_ids = [stores[0].create(f"busy {i}", 0)[1].id for i in range(5)]
    batches_each = 15
    barrier = threading.Barrier(len(stores))
    errors: list[BaseException] = []

    def replica(ks: KeyStore, seed: int) -> None:
        rng = random.Random(seed)
        barrier.wait()
        try:
            for n in range(batches_each):
                order = rng.sample(key_ids, len(key_ids))  # shuffled: the store must fix the lock order
                ks.record_usage([(k, 1, 10, 1, T0 + timedelta(seconds=n)) for k in order])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=replica, args=(ks, i)) for i, ks in enumerate(stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        expected = len(stores) * batches_each
        for key_id in key_ids:
            usage = stores[0].usage(key_id)
            assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (
                expected, 10 * expected, expected)
            assert usage["last_used_at"] == (T0 + timedelta(seconds=batches_each - 1)).isoformat()
    finally:
        for ks in stores:
            ks.close()
