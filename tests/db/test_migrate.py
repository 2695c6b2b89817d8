"""Schema migrations on both backends: fresh databases, databases from before migrations, concurrent
start-ups, failures, and a database newer than the code."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, DateTime, Engine, Integer, MetaData, String, Table, inspect, text

from serve_app.auth.keystore import KeyStore
from serve_app.db import migrate
from serve_app.db.tables import Base

LEGACY_KEY = "iir-" + "L" * 43


def legacy_metadata() -> MetaData:
    """``api_keys`` as ``Base.metadata.create_all`` built it before migrations (frozen copy of that model)."""
    metadata = MetaData()
    ts = DateTime(timezone=True)
    Table(
        "api_keys", metadata,
        Column("id", String(36), primary_key=True),
        Column("prefix", String(32), nullable=False),
        Column("key_hash", String(64), nullable=False, unique=True, index=True),
        Column("description", String(512), nullable=False),
        Column("priority", Integer, nullable=False),
        Column("scopes", String(256), nullable=False),
        Column("created_at", ts, nullable=False),
        Column("expires_at", ts, nullable=True),
        Column("revoked_at", ts, nullable=True),
        Column("last_used_at", ts, nullable=True),
    )  # fmt: skip
    return metadata


def schema_diff(engine: Engine, metadata: MetaData) -> list[object]:
    with engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


def revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def make_legacy_database(engine: Engine) -> None:
    legacy_metadata().create_all(engine)
    row = {"id": "legacy-1", "prefix": LEGACY_KEY[:12], "description": "from before migrations",
           "priority": 7, "scopes": "admin,inference", "created_at": datetime(2024, 5, 1, tzinfo=UTC),
           "key_hash": hashlib.sha256(LEGACY_KEY.encode()).hexdigest()}
    with engine.begin() as conn:
        conn.execute(legacy_metadata().tables["api_keys"].insert(), row)


@pytest.fixture
def bare(database_url: str) -> Iterator[KeyStore]:
    """A store on an empty database, not yet migrated."""
    ks = KeyStore(database_url)
    yield ks
    ks.close()


def test_fresh_database_reaches_head_and_matches_the_models(bare: KeyStore) -> None:
    result = bare.upgrade()
    assert (result.before, result.after, result.legacy) == (None, migrate.head_revision(), False)
    assert revision(bare.engine) == migrate.head_revision() == "0003"
    assert schema_diff(bare.engine, Base.metadata) == [], "serve_app.db.tables and the migrations disagree"


def test_upgrade_at_head_is_a_no_op(bare: KeyStore) -> None:
    bare.upgrade()
    again = bare.upgrade()
    assert again.before == again.after == migrate.head_revision() and not again.changed


def test_revision_0001_is_the_schema_create_all_used_to_build(bare: KeyStore) -> None:
    with bare.engine.begin() as conn:
        command.upgrade(migrate._config(conn), "0001")
    assert schema_diff(bare.engine, legacy_metadata()) == []


def test_pre_migration_database_is_stamped_and_upgraded_with_its_keys(bare: KeyStore) -> None:
    make_legacy_database(bare.engine)
    assert migrate.current_revision(bare.engine) == migrate.LEGACY_REVISION
    result = bare.upgrade()
    assert result.legacy and result.after == migrate.head_revision()
    assert schema_diff(bare.engine, Base.metadata) == []
    info = bare.verify(LEGACY_KEY)
    assert info is not None and info.id == "legacy-1" and info.priority == 7
    assert info.scopes == ("admin", "inference") and info.rate_limit_rpm is None
    assert bare.record_usage([("legacy-1", 1, 2, 3, datetime.now(UTC))]) == 1
    assert bare.usage("legacy-1")["total_tokens"] == 5


def test_concurrent_start_ups_migrate_once(database_url: str) -> None:
    stores = [KeyStore(database_url) for _ in range(4)]
    barrier = threading.Barrier(len(stores))
    results: list[migrate.UpgradeResult] = []
    errors: list[BaseException] = []

    def start(ks: KeyStore) -> None:
        barrier.wait()
        try:
            results.append(ks.upgrade())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(ks,)) for ks in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert errors == []
        assert len(results) == 4 and all(r.after == migrate.head_revision() for r in results)
        assert schema_diff(stores[0].engine, Base.metadata) == []
    finally:
        for ks in stores:
            ks.close()


def test_failed_migration_leaves_nothing_half_applied(bare: KeyStore) -> None:
    make_legacy_database(bare.engine)
    with bare.engine.begin() as conn:  # 0002 adds columns to api_keys, then trips over this table
        conn.execute(text("CREATE TABLE api_key_usage (x INTEGER)"))
    with pytest.raises(Exception, match="api_key_usage"):
        bare.upgrade()
    columns = {c["name"] for c in inspect(bare.engine).get_columns("api_keys")}
    assert "rate_limit_rpm" not in columns, "0002's first steps were not rolled back"
    assert not inspect(bare.engine).has_table("alembic_version"), "the stamp was not rolled back"
    with bare.engine.connect() as conn:
        assert conn.execute(text("SELECT priority FROM api_keys")).scalar_one() == 7


def test_database_newer_than_the_code_is_left_alone(bare: KeyStore, caplog: pytest.LogCaptureFixture) -> None:
    bare.upgrade()
    with bare.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    caplog.set_level(logging.WARNING, logger="serve_app.db.migrate")
    result = bare.upgrade()
    assert result.before == result.after == "9999"
    assert any("newer than this release" in r.getMessage() for r in caplog.records)


def test_downgrade_and_upgrade_again(bare: KeyStore) -> None:
    bare.upgrade()
    with bare.engine.begin() as conn:
        command.downgrade(migrate._config(conn), "0001")
    assert schema_diff(bare.engine, legacy_metadata()) == []
    bare.upgrade()
    assert schema_diff(bare.engine, Base.metadata) == []
