"""VerifiedKeyCache, RevocationListener and AuthService over a real KeyStore (SQLite) and a real Redis.

Database work is observed by counting the SQL statements the store's engine executes, so "the hot path
makes no DB query" is checked on the real engine rather than on a stand-in.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy import event

from serve_app.auth.keystore import KeyStore, hash_key
from serve_app.auth.service import AuthService
from serve_app.errors import AuthenticationFailed, InvalidRequest, NotFound, ServiceUnavailable
from serve_app.ingress.key_cache import (
    INVALID_KEY,
    MALFORMED_HEADER,
    MISSING_KEY,
    RevocationListener,
    VerifiedKeyCache,
)
from serve_app.schemas import ApiKeyCreate

REDIS_URL = os.environ.get("IIR_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bearer(api_key: str) -> str:
    return f"Bearer {api_key}"


class StatementCounter:
    def __init__(self, store: KeyStore) -> None:
        self.count = 0
        event.listen(store.engine, "before_cursor_execute", self._seen)

    def _seen(self, *_: Any) -> None:
        self.count += 1

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[KeyStore]:
    ks = KeyStore(f"sqlite:///{db_path}")
    ks.create_schema()
    yield ks
    ks.close()


@pytest.fixture
def statements(store: KeyStore) -> StatementCounter:
    return StatementCounter(store)


@pytest.fixture(scope="session")
async def redis_url() -> str:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        await client.ping()
    except Exception as exc:
        pytest.skip(f"Redis not reachable: {exc}")
    finally:
        await client.aclose()
    return REDIS_URL


@pytest.fixture
def channel() -> str:
    # A channel of our own, so a gateway using the same Redis neither sees nor sends our messages.
    return f"iir:test:revoked:{uuid.uuid4().hex}"


@pytest.fixture
async def service(store: KeyStore, redis_url: str, channel: str) -> AsyncIterator[AuthService]:
    svc = AuthService(store, redis_url=redis_url, redis_timeout_s=2.0, revoked_channel=channel)
    yield svc
    await svc.close()


def make_cache(verifier: Any, **overrides: float) -> VerifiedKeyCache:
    opts: dict[str, Any] = {"ttl_s": 60.0, "max_size": 100, "negative_ttl_s": 60.0, "negative_max_size": 100}
    return VerifiedKeyCache(verifier, **(opts | overrides))


async def new_key(service: AuthService, **fields: Any) -> tuple[str, str]:
    created = await service.create(ApiKeyCreate(**fields))
    return created["api_key"], created["id"]


# --- the hot path -------------------------------------------------------------------------------------


async def test_second_use_makes_no_db_query(service: AuthService, statements: StatementCounter) -> None:
    api_key, key_id = await new_key(service, description="hot", priority=5)
    cache = make_cache(service)
    statements.take()
    first = await cache.authenticate(bearer(api_key))
    assert statements.take() > 0
    for _ in range(50):
        again = await cache.authenticate(bearer(api_key))
    assert statements.take() == 0
    assert again == first and first.id == key_id and first.priority == 5


@pytest.mark.parametrize(
    ("header", "message"),
    [
        pytest.param(None, MISSING_KEY, id="no-header"),
        pytest.param("   ", MISSING_KEY, id="blank"),
        pytest.param("Basic dXNlcjpwYXNz", MALFORMED_HEADER, id="basic-auth"),
        pytest.param("Bearer", MALFORMED_HEADER, id="no-token"),
        pytest.param("Bearer two words", MALFORMED_HEADER, id="spaces-in-token"),
        pytest.param("Bearer " + "a" * 600, MALFORMED_HEADER, id="oversized"),
        pytest.param("Bearer iir-not-a-real-key", INVALID_KEY, id="unknown-key"),
    ],
)
async def test_rejections_are_openai_style_401s(
    service: AuthService, statements: StatementCounter, header: str | None, message: str
) -> None:
    cache = make_cache(service)
    with pytest.raises(AuthenticationFailed) as err:
        await cache.authenticate(header)
    assert err.value.status_code == 401 and err.value.message == message
    assert err.value.to_body()["error"]["type"] == "authentication_error"
    if message != INVALID_KEY:
        assert statements.take() == 0, "a malformed header must not reach the database"


async def test_lowercase_bearer_scheme_is_accepted(service: AuthService) -> None:
    api_key, key_id = await new_key(service)
    assert (await make_cache(service).authenticate(f"bearer  {api_key} ")).id == key_id


async def test_concurrent_first_uses_share_one_verify(
    service: AuthService, statements: StatementCounter
) -> None:
    baseline_key, _ = await new_key(service)
    key, _ = await new_key(service)
    cache = make_cache(service)
    statements.take()
    await cache.authenticate(bearer(baseline_key))
    one_verify = statements.take()
    results = await asyncio.gather(*(cache.authenticate(bearer(key)) for _ in range(20)))
    assert statements.take() == one_verify
    assert len({r.id for r in results}) == 1 and cache.stats()["in_flight"] == 0


async def test_known_miss_is_answered_from_the_negative_cache(
    service: AuthService, statements: StatementCounter
) -> None:
    cache = make_cache(service)
    bad = bearer("iir-" + "Z" * 43)
    for expected_queries in (True, False, False):
        with pytest.raises(AuthenticationFailed):
            await cache.authenticate(bad)
        assert (statements.take() > 0) is expected_queries


async def test_negative_cache_is_bounded(service: AuthService, statements: StatementCounter) -> None:
    cache = make_cache(service, negative_max_size=3)
    bad = [bearer(f"iir-bad-{i}") for i in range(10)]
    for header in bad:
        with pytest.raises(AuthenticationFailed):
            await cache.authenticate(header)
    assert cache.stats()["negative_entries"] == 3
    statements.take()
    with pytest.raises(AuthenticationFailed):
        await cache.authenticate(bad[-1])
    assert statements.take() == 0, "the newest miss is remembered"
    with pytest.raises(AuthenticationFailed):
        await cache.authenticate(bad[0])
    assert statements.take() > 0, "the oldest miss was evicted"


async def test_negative_entries_expire(service: AuthService, statements: StatementCounter) -> None:
    cache = make_cache(service, negative_ttl_s=0.1)
    for pause, expected_queries in ((0, True), (0, False), (0.15, True)):
        await asyncio.sleep(pause)
        with pytest.raises(AuthenticationFailed):
            await cache.authenticate(bearer("iir-nope"))
        assert (statements.take() > 0) is expected_queries


async def test_positive_cache_is_bounded(service: AuthService, statements: StatementCounter) -> None:
    keys = [(await new_key(service))[0] for _ in range(3)]
    cache = make_cache(service, max_size=2)
    for key in keys:
        await cache.authenticate(bearer(key))
    assert cache.stats()["entries"] == 2
    statements.take()
    await cache.authenticate(bearer(keys[0]))
    assert statements.take() > 0, "least recently used entry was evicted"


async def test_ttl_expiry_is_the_revocation_backstop(
    service: AuthService, store: KeyStore, statements: StatementCounter
) -> None:
    api_key, key_id = await new_key(service)
    cache = make_cache(service, ttl_s=0.2)
    await cache.authenticate(bearer(api_key))
    store.revoke(key_id)  # straight in the DB: no announcement, as if the message were lost
    await cache.authenticate(bearer(api_key))  # still cached: the bounded staleness we accept
    await asyncio.sleep(0.25)
    statements.take()
    with pytest.raises(AuthenticationFailed):
        await cache.authenticate(bearer(api_key))
    assert statements.take() > 0


async def test_cache_never_outlives_the_keys_expiry(service: AuthService, store: KeyStore) -> None:
    from datetime import UTC, datetime, timedelta

    api_key, _ = store.create("short-lived", 0, expires_at=datetime.now(UTC) + timedelta(seconds=0.3))
    cache = make_cache(service, ttl_s=60)
    await cache.authenticate(bearer(api_key))
    await asyncio.sleep(0.35)
    with pytest.raises(AuthenticationFailed):
        await cache.authenticate(bearer(api_key))


# --- revocation push ----------------------------------------------------------------------------------


async def test_revocation_reaches_two_caches_within_a_second(
    service: AuthService, redis_url: str, channel: str
) -> None:
    api_key, key_id = await new_key(service)
    caches = [make_cache(service, ttl_s=300) for _ in range(2)]
    listeners = [RevocationListener(c, redis_url, channel=channel) for c in caches]
    for listener in listeners:
        listener.start()
    try:
        assert all([await lst.wait_subscribed(5) for lst in listeners])
        for cache in caches:
            await cache.authenticate(bearer(api_key))
        started = time.monotonic()
        await service.revoke(key_id)
        pending = set(range(len(caches)))
        while pending and time.monotonic() - started < 1.0:
            pending = {i for i in pending if caches[i].stats()["entries"]}
            await asyncio.sleep(0.005)
        assert not pending, "revocation did not reach every cache within 1 s"
        for cache in caches:
            with pytest.raises(AuthenticationFailed):
                await cache.authenticate(bearer(api_key))
    finally:
        for listener in listeners:
            await listener.stop()


async def test_wildcard_message_clears_the_cache(service: AuthService, redis_url: str, channel: str) -> None:
    api_key, _ = await new_key(service)
    cache = make_cache(service)
    await cache.authenticate(bearer(api_key))
    listener = RevocationListener(cache, redis_url, channel=channel)
    listener.start()
    client = Redis.from_url(redis_url)
    try:
        assert await listener.wait_subscribed(5)
        await client.publish(channel, "*")
        for _ in range(200):
            if not cache.stats()["entries"]:
                break
            await asyncio.sleep(0.005)
        assert cache.stats()["entries"] == 0
    finally:
        await client.aclose()
        await listener.stop()


async def test_quiet_channel_keeps_its_connection(service: AuthService, redis_url: str, channel: str) -> None:
    api_key, _ = await new_key(service)
    cache = make_cache(service)
    await cache.authenticate(bearer(api_key))
    listener = RevocationListener(cache, redis_url, channel=channel, ping_interval_s=0.05)
    listener.start()
    try:
        assert await listener.wait_subscribed(5)
        await asyncio.sleep(0.5)  # ten ping intervals with no messages: the PONGs keep it alive
        assert listener.subscribed and listener.failures == 0 and cache.stats()["entries"] == 1
    finally:
        await listener.stop()


async def test_redis_down_listener_survives_and_ttl_still_applies(
    store: KeyStore, caplog: pytest.LogCaptureFixture
) -> None:
    dead_redis = f"redis://127.0.0.1:{unused_port()}/0"
    service = AuthService(store, redis_url=dead_redis, redis_timeout_s=0.2)
    api_key, key_id = await new_key(service)
    cache = make_cache(service, ttl_s=0.4)
    listener = RevocationListener(cache, dead_redis, timeout_s=0.2, backoff_s=0.05, max_backoff_s=0.2)
    caplog.set_level(logging.WARNING)
    listener.start()
    try:
        await cache.authenticate(bearer(api_key))
        revoked = await service.revoke(key_id)  # the announcement fails; the revocation must not
        assert revoked.info.revoked_at is not None and not revoked.announced
        await asyncio.sleep(0.6)
        assert not listener.subscribed and 2 <= listener.failures <= 20, "retries, without spinning"
        with pytest.raises(AuthenticationFailed):
            await cache.authenticate(bearer(api_key))  # the TTL ran out; the DB says revoked
    finally:
        await listener.stop()
        await service.close()
    lost = [r for r in caplog.records if "revocation listener lost Redis" in r.getMessage()]
    assert len(lost) == 1, "one warning per outage, not one per retry"
    assert any("announce revocation" in r.getMessage() for r in caplog.records)
    assert all(api_key not in r.getMessage() for r in caplog.records)


# --- database outage ----------------------------------------------------------------------------------


def take_database_away(store: KeyStore, db_path: Path) -> None:
    """The database file vanishes: new connections find no api_keys table (an OperationalError)."""
    store.engine.dispose()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db_path}{suffix}").unlink(missing_ok=True)


async def test_db_down_cached_keys_work_new_keys_get_503(
    service: AuthService, store: KeyStore, db_path: Path
) -> None:
    known, _ = await new_key(service)
    unknown, _ = await new_key(service)
    cache = make_cache(service)
    await cache.authenticate(bearer(known))
    take_database_away(store, db_path)
    assert (await cache.authenticate(bearer(known))).prefix == known[:12]
    with pytest.raises(ServiceUnavailable) as err:
        await cache.authenticate(bearer(unknown))
    assert err.value.status_code == 503
    # A 503 is not remembered as a miss: once the database is back the key works.
    assert cache.stats()["negative_entries"] == 0


@pytest.mark.parametrize(
    ("stale_if_error_s", "works"),
    [pytest.param(0.0, False, id="no-grace"), pytest.param(5.0, True, id="grace")],
)
async def test_stale_if_error_window(
    service: AuthService, store: KeyStore, db_path: Path, stale_if_error_s: float, works: bool
) -> None:
    api_key, _ = await new_key(service)
    cache = make_cache(service, ttl_s=0.05, stale_if_error_s=stale_if_error_s)
    await cache.authenticate(bearer(api_key))
    await asyncio.sleep(0.1)
    take_database_away(store, db_path)
    if works:
        await cache.authenticate(bearer(api_key))
    else:
        with pytest.raises(ServiceUnavailable):
            await cache.authenticate(bearer(api_key))


async def test_unreachable_postgres_fails_fast_with_503() -> None:
    store = KeyStore(f"postgresql+psycopg2://postgres@127.0.0.1:{unused_port()}/iir", connect_timeout_s=1)
    service = AuthService(store, redis_url=None, redis_timeout_s=0.2, db_timeout_s=3)
    cache = make_cache(service)
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable):
        await cache.authenticate(bearer("iir-" + "q" * 43))
    with pytest.raises(ServiceUnavailable):
        await service.ping()
    assert time.monotonic() - started < 3
    store.close()


# --- AuthService --------------------------------------------------------------------------------------


async def test_auth_service_create_get_list_revoke(service: AuthService) -> None:
    created = await service.create(ApiKeyCreate(description="svc", priority=9))
    assert created["api_key"].startswith("iir-") and created["priority"] == 9
    assert created["prefix"] == created["api_key"][:12] and created["active"] is True
    key_id = created["id"]
    assert (await service.get(key_id)).description == "svc"
    assert [k.id for k in await service.list()] == [key_id]
    info = await service.verify(created["api_key"])
    assert info is not None and info.key_hash == hash_key(created["api_key"])
    assert (await service.revoke(key_id)).info.revoked_at is not None
    assert await service.verify(created["api_key"]) is None
    with pytest.raises(NotFound):
        await service.revoke("missing")
    await service.ping()


async def test_auth_service_create_takes_scopes_expiry_and_limits(service: AuthService) -> None:
    from datetime import UTC, datetime

    request = ApiKeyCreate.model_validate({"description": "full", "scopes": ["admin"], "expires_in": 3600,
                                           "rate_limit": {"requests_per_minute": 30}})
    before = datetime.now(UTC)
    created = await service.create(request)
    expires_at = datetime.fromisoformat(created["expires_at"])
    assert 3599 <= (expires_at - before).total_seconds() <= 3601
    assert created["scopes"] == ["admin"] and created["priority"] == 0
    assert created["rate_limit"] == {"requests_per_minute": 30, "tokens_per_minute": None}


async def test_update_reaches_two_caches_within_a_second(
    service: AuthService, redis_url: str, channel: str
) -> None:
    """A new priority (or limit) is announced like a revocation, and every cache re-verifies."""
    api_key, key_id = await new_key(service, priority=1)
    caches = [make_cache(service, ttl_s=300) for _ in range(2)]
    listeners = [RevocationListener(c, redis_url, channel=channel) for c in caches]
    for listener in listeners:
        listener.start()
    try:
        assert all([await lst.wait_subscribed(5) for lst in listeners])
        for cache in caches:
            assert (await cache.authenticate(bearer(api_key))).priority == 1
        started = time.monotonic()
        updated = await service.update(key_id, priority=90, rate_limit_tpm=5000)
        assert (updated.info.priority, updated.info.rate_limit_tpm) == (90, 5000) and updated.announced
        pending = set(range(len(caches)))
        while pending and time.monotonic() - started < 1.0:
            pending = {i for i in pending if caches[i].stats()["entries"]}
            await asyncio.sleep(0.005)
        assert not pending, "the update did not reach every cache within 1 s"
        for cache in caches:
            info = await cache.authenticate(bearer(api_key))
            assert (info.priority, info.rate_limit_tpm) == (90, 5000)
    finally:
        for listener in listeners:
            await listener.stop()


async def test_auth_service_update_errors(service: AuthService) -> None:
    _, key_id = await new_key(service)
    with pytest.raises(NotFound):
        await service.update("missing", priority=1)
    with pytest.raises(InvalidRequest, match="priority"):
        await service.update(key_id, priority=1000)


async def test_auth_service_usage_round_trip(service: AuthService) -> None:
    from datetime import UTC, datetime

    _, key_id = await new_key(service)
    assert await service.record_usage([(key_id, 2, 7, 3, datetime.now(UTC))]) == 1
    usage = await service.usage(key_id)
    assert (usage["requests"], usage["total_tokens"]) == (2, 10)
    with pytest.raises(InvalidRequest):
        await service.record_usage([(key_id, -1, 0, 0, datetime.now(UTC))])
    with pytest.raises(NotFound):
        await service.usage("missing")
