"""KeyStore against both real backends: SQLite (a temp file) and PostgreSQL (a fresh database).

The database fixtures (``database_url``, ``store``) live in ``tests/db_fixtures.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from serve_app.auth.keystore import MAX_RATE_LIMIT, UNSET, KeyInfo, KeyStore, hash_key
from serve_app.errors import NotFound

KEY_SHAPE = re.compile(r"^iir-[A-Za-z0-9_-]{43}$")


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


@pytest.mark.parametrize("action", [pytest.param("get", id="get"), pytest.param("revoke", id="revoke"),
                                    pytest.param("update", id="update"), pytest.param("usage", id="usage")])
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
        pytest.param({"priority": 101}, "priority", id="priority-too-high"),
        pytest.param({"priority": -1}, "priority", id="priority-negative"),
        pytest.param({"rate_limit_rpm": 0}, "rate_limit_rpm", id="rpm-zero"),
        pytest.param({"rate_limit_tpm": MAX_RATE_LIMIT + 1}, "rate_limit_tpm", id="tpm-overflows-int32"),
        pytest.param({"description": "x" * 513}, "description", id="description-too-long"),
    ],
)
def test_create_rejects_bad_input(store: KeyStore, kwargs: dict, message: str) -> None:
    fields: dict[str, Any] = {"description": "bad", "priority": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        store.create(**fields)
    assert store.list() == []


def test_list_never_contains_secrets(store: KeyStore) -> None:
    created = [store.create(f"key {i}", i) for i in range(3)]
    listed = store.list()
    assert [i.id for i in listed] == [info.id for _, info in created]
    public = json.dumps([i.to_public() for i in listed])
    for api_key, info in created:
        assert api_key not in public and api_key[12:] not in public
        assert info.key_hash not in public and info.key_hash not in repr(info)
    assert set(listed[0].to_public()) == {
        "id", "object", "prefix", "description", "priority", "scopes", "rate_limit",
        "created_at", "expires_at", "revoked_at", "last_used_at", "active",
    }  # fmt: skip


def test_create_with_limits_scopes_and_expiry(store: KeyStore) -> None:
    expires = datetime.now(UTC) + timedelta(days=1)
    api_key, info = store.create("limited", 42, ("admin",), expires, rate_limit_rpm=60, rate_limit_tpm=10_000)
    assert (info.rate_limit_rpm, info.rate_limit_tpm, info.scopes) == (60, 10_000, ("admin",))
    assert store.verify(api_key) == info == store.get(info.id)
    assert info.to_public()["rate_limit"] == {"requests_per_minute": 60, "tokens_per_minute": 10_000}


# --- update ---------------------------------------------------------------------------------------------


def test_update_changes_only_what_is_given(store: KeyStore) -> None:
    api_key, info = store.create("before", 1, rate_limit_rpm=10, rate_limit_tpm=1000)
    updated = store.update(info.id, priority=50, rate_limit_rpm=20)
    assert (updated.priority, updated.rate_limit_rpm) == (50, 20)
    assert (updated.description, updated.rate_limit_tpm) == ("before", 1000), "untouched fields kept"
    assert store.verify(api_key) == updated == store.get(info.id)
    assert (updated.id, updated.key_hash, updated.created_at) == (info.id, info.key_hash, info.created_at)


def test_update_none_removes_a_limit_and_unset_keeps_it(store: KeyStore) -> None:
    _, info = store.create("limits", 0, rate_limit_rpm=10, rate_limit_tpm=1000)
    cleared = store.update(info.id, rate_limit_rpm=None, rate_limit_tpm=UNSET)
    assert (cleared.rate_limit_rpm, cleared.rate_limit_tpm) == (None, 1000)
    assert store.update(info.id) == cleared, "an empty update is a no-op"


def test_update_description(store: KeyStore) -> None:
    _, info = store.create("old name", 0)
    assert store.update(info.id, description="new name").description == "new name"
    assert store.get(info.id).description == "new name"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"priority": 101}, "priority", id="priority-too-high"),
        pytest.param({"priority": True}, "priority", id="priority-bool"),
        pytest.param({"rate_limit_rpm": 0}, "rate_limit_rpm", id="rpm-zero"),
        pytest.param({"rate_limit_tpm": -5}, "rate_limit_tpm", id="tpm-negative"),
        pytest.param({"description": None}, "description", id="description-null"),
    ],
)
def test_update_rejects_bad_values_and_changes_nothing(store: KeyStore, kwargs: dict, message: str) -> None:
    _, info = store.create("keep me", 3, rate_limit_rpm=7)
    with pytest.raises(ValueError, match=message):
        store.update(info.id, **kwargs)
    assert store.get(info.id) == info


def test_update_of_a_revoked_key_keeps_it_revoked(store: KeyStore) -> None:
    api_key, info = store.create("gone", 0)
    store.revoke(info.id)
    updated = store.update(info.id, priority=9)
    assert updated.revoked_at is not None and not updated.active
    assert store.verify(api_key) is None


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
