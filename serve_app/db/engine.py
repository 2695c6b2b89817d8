"""Database plumbing shared by the key store and its migrations: the engine factory and UTC timestamps.

PostgreSQL (psycopg2) in production, SQLite as the embedded default. Every wait is bounded so that a dead
database surfaces as an error, never as a hung request.
"""

from __future__ import annotations

import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend: SQLite keeps no offset, so we add it back."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("datetimes stored in api_keys must be timezone-aware")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def make_engine(database_url: str, connect_timeout_s: float) -> Engine:
    url = make_url(database_url)
    # Bounded waits everywhere: a dead database must surface as an error, not a hung request.
    # hide_parameters: statement parameters (key hashes, descriptions) stay out of errors and logs.
    kwargs: dict[str, Any] = {
        "pool_pre_ping": True,
        "hide_parameters": True,
        "pool_timeout": connect_timeout_s,
    }
    if url.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": connect_timeout_s}
        if url.database in (None, "", ":memory:"):
            # One shared connection, or each worker thread would see its own empty in-memory database.
            kwargs["poolclass"] = StaticPool
            del kwargs["pool_timeout"]
        else:
            # The embedded default (~/.iir/iir.db) must work on a fresh machine.
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif url.get_driver_name() in ("psycopg2", "psycopg"):
        kwargs["connect_args"] = {
            "connect_timeout": max(1, round(connect_timeout_s)),
            # keepalives notice a peer that vanished without closing the socket
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
    engine = create_engine(url, **kwargs)
    if url.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the admin path write while replicas read; busy_timeout waits instead of failing at once.
    cur = dbapi_conn.cursor()
    try:
        cur.execute("PRAGMA busy_timeout=5000")
        _enable_wal(cur)
    finally:
        cur.close()


def _enable_wal(cur: Any) -> None:
    """Switch a fresh database to WAL once. The switch needs the file to itself and SQLite answers it
    with "locked" at once (no busy wait) while another connection, e.g. a migrator, holds a lock."""
    for attempt in range(50):
        if cur.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.1)
