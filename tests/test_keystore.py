"""KeyStore against both real backends: SQLite (a temp file) and PostgreSQL (a fresh database)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from serve_app.errors import NotFound
from serve_app.keystore import Base, KeyInfo, KeyStore, hash_key

PG_ADMIN_URL = os.environ.get("IIR_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
KEY_SHAPE = re.compile(r"^iir-[A-Za-z0-9_-]{43}$")


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A throwaway database for this session, dropped afterwards."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 2})
    name = f"iir_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {make_url(PG_ADMIN_URL).host}: {exc.orig}")
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres")])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    return request.getfixturevalue("pg_database_url")


@pytest.fixture
def store(database_url: str) -> Iterator[KeyStore]:
    ks = KeyStore(database_url)
    Base.metadata.drop_all(ks.engine)  # the PostgreSQL database is shared by the session's tests
    ks.create_schema()
    yield ks
    ks.close()


def test_create_returns_a_well_formed_key(store: KeyStore) -> None:
    api_key, info = store.create("ci runner", 7)
    assert KEY_SHAPE.match(api_key)
    assert info.prefix == api_key[:12] and info.prefix.startswith("iir-")
    assert info.description == "ci runner" and info.priority == 7
    assert info.scopes == ("inference",)
    assert info.created_at.tzinfo is not None and info.active
    assert info.expires_at is None and info.revoked_at is None
    assert store.get(info.id) == info


def test_keys_are_unique(store: KeyStore) -> None:
    keys = {store.create("k", 0)[0] for _ in range(20)}
    assert len(keys) == 20


def test_only_the_hash_is_stored(store: KeyStore) -> None:
    api_key, info = store.create("secret holder", 1)
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT * FROM api_keys")).mappings().all()
    assert len(rows) == 1
    row = rows[0]
    assert row["key_hash"] == hashlib.sha256(api_key.encode()).hexdigest() == hash_key(api_key)
    token = api_key.removeprefix("iir-")
    for value in row.values():
        assert token not in str(value), "the key (or its random part) is in the table"


def test_verify_hit_returns_the_key_info(store: KeyStore) -> None:
    api_key, info = store.create("hit", 3, scopes=("inference", "admin"))
    found = store.verify(api_key)
    assert found == info
    assert found is not None and found.has_scope("admin") and found.scopes == ("admin", "inference")


@pytest.mark.parametrize(
    "presented",
    [
        pytest.param("iir-" + "A" * 43, id="unknown-well-formed"),
        pytest.param("", id="empty"),
        pytest.param("iir-" + "x" * 5000, id="too-long"),
        pytest.param("not-even-close", id="garbage"),
    ],
)
def test_verify_miss_returns_none(store: KeyStore, presented: str) -> None:
    store.create("other", 0)
    assert store.verify(presented) is None


def test_verify_rejects_a_key_with_a_changed_character(store: KeyStore) -> None:
    api_key, _ = store.create("near miss", 0)
    flipped = api_key[:-1] + ("A" if api_key[-1] != "A" else "B")
    assert store.verify(flipped) is None


def test_revoked_key_does_not_verify(store: KeyStore) -> None:
    api_key, info = store.create("to revoke", 0)
    revoked = store.revoke(info.id)
    assert revoked.revoked_at is not None and not revoked.active
    assert store.verify(api_key) is None
    assert store.get(info.id).revoked_at == revoked.revoked_at
    # Revoking again is harmless and keeps the first timestamp.
    assert store.revoke(info.id).revoked_at == revoked.revoked_at


def test_expired_key_does_not_verify(store: KeyStore) -> None:
    now = datetime.now(UTC)
    expired_key, expired = store.create("old", 0, expires_at=now - timedelta(seconds=1))
    live_key, live = store.create("new", 0, expires_at=now + timedelta(hours=1))
    assert store.verify(expired_key) is None and not expired.active
    found = store.verify(live_key)
    assert found is not None and found.expires_at is not None
    assert abs((found.expires_at - live.expires_at).total_seconds()) < 1e-3  # type: ignore[operator]


@pytest.mark.parametrize("action", [pytest.param("get", id="get"), pytest.param("revoke", id="revoke")])
def test_unknown_id_raises_not_found(store: KeyStore, action: str) -> None:
    with pytest.raises(NotFound) as err:
        getattr(store, action)("no-such-id")
    assert err.value.status_code == 404 and err.value.param == "key_id"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"scopes": ("inference", "root")}, "unknown scopes", id="unknown-scope"),
        pytest.param({"scopes": ()}, "at least one scope", id="no-scope"),
        pytest.param({"expires_at": datetime(2030, 1, 1)}, "timezone-aware", id="naive-expiry"),
    ],
)
def test_create_rejects_bad_input(store: KeyStore, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store.create("bad", 0, **kwargs)


def test_list_never_contains_secrets(store: KeyStore) -> None:
    created = [store.create(f"key {i}", i) for i in range(3)]
    listed = store.list()
    assert [i.id for i in listed] == [info.id for _, info in created]
    public = json.dumps([i.to_public() for i in listed])
    for api_key, info in created:
        assert api_key not in public and api_key[12:] not in public
        assert info.key_hash not in public and info.key_hash not in repr(info)
    assert set(listed[0].to_public()) == {
        "id", "object", "prefix", "description", "priority", "scopes",
        "created_at", "expires_at", "revoked_at", "active",
    }  # fmt: skip


def test_key_info_is_frozen(store: KeyStore) -> None:
    _, info = store.create("frozen", 0)
    with pytest.raises(AttributeError):
        info.priority = 9  # type: ignore[misc]
    assert isinstance(info, KeyInfo)


def test_ping(store: KeyStore) -> None:
    store.ping()


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    ks = KeyStore(f"sqlite:///{tmp_path / 'wal.db'}")
    with ks.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    ks.close()
