"""Schema migrations for the key store: Alembic, driven from code so every entry point can call it.

``upgrade(engine)`` brings a database to the newest revision in ``serve_app/db/migrations/versions``. The
Auth deployment and ``iir keys`` call it at start; ``iir db upgrade`` calls it on demand. It is safe to
run from several processes at once: the migration runs in one transaction behind a lock
(``pg_advisory_xact_lock`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), and whoever gets the lock
second finds the work done. Both backends have transactional DDL, so a failed migration leaves nothing
half-applied.

Databases created before migrations existed (``Base.metadata.create_all``: an ``api_keys`` table and no
``alembic_version``) hold exactly revision 0001's schema; they are stamped 0001 and upgraded from there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
LEGACY_REVISION = "0001"  # the schema that create_all built before there were migrations
LEGACY_TABLE = "api_keys"
VERSION_TABLE = "alembic_version"  # Alembic's default name
# Any fixed 64-bit number; it names the lock that serializes migrations across processes.
_PG_LOCK_ID = 0x11F_5EED_0001


@dataclass(frozen=True, slots=True)
class UpgradeResult:
    before: str | None  # None: an empty database (or one from before migrations, see ``legacy``)
    after: str | None
    legacy: bool = False  # the database predated migrations and was stamped first

    @property
    def changed(self) -> bool:
        return self.before != self.after or self.legacy


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    # env.py runs on this connection, inside the transaction (and lock) that ``upgrade`` holds.
    cfg.attributes["connection"] = connection
    return cfg


@cache
def head_revision() -> str | None:
    return ScriptDirectory.from_config(_config()).get_current_head()


def _known_revisions() -> set[str]:
    return {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}


def _current(conn: Connection) -> tuple[str | None, bool]:
    """The database's revision, and whether it is a pre-migration database (no version, old table)."""
    # Read directly rather than through a MigrationContext: this runs on every start and every
    # `iir keys` call, and Alembic logs two INFO lines per context.
    inspector = inspect(conn)
    if inspector.has_table(VERSION_TABLE):
        versions = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
        if len(versions) > 1:
            raise RuntimeError(f"{VERSION_TABLE} holds several heads ({versions}); merge them first")
        if versions:
            return versions[0], False
    return None, inspector.has_table(LEGACY_TABLE)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        revision, legacy = _current(conn)
    return LEGACY_REVISION if legacy else revision


def upgrade(engine: Engine) -> UpgradeResult:
    """Bring the schema to head: a couple of reads when it is already there, else migrate under a lock."""
    head = head_revision()
    with engine.connect() as conn:
        revision, legacy = _current(conn)
    if revision == head and not legacy:
        return UpgradeResult(revision, revision)
    with _exclusive(engine) as conn:
        # Read again under the lock: another process may have migrated while we waited for it.
        revision, legacy = _current(conn)
        if revision is not None and revision not in _known_revisions():
            # A newer release migrated this database (rolling deploy). Its migrations are additive, so
            # this older code keeps working; failing here would only crash-loop the old replicas.
            logger.warning("database schema is at revision %s, newer than this release's %s; not "
                           "touching it", revision, head)
            return UpgradeResult(revision, revision)
        cfg = _config(conn)
        if legacy:
            logger.info("database predates migrations; stamping it %s", LEGACY_REVISION)
            command.stamp(cfg, LEGACY_REVISION)
        if revision != head or legacy:
            logger.info("upgrading database schema from %s to %s", revision or "empty", head)
            command.upgrade(cfg, "head")
        conn.commit()
    return UpgradeResult(revision, head, legacy=legacy)


MIGRATION_LOCK_WAIT_MS = 60_000
REQUEST_BUSY_TIMEOUT_MS = 5_000


@contextmanager
def _exclusive(engine: Engine) -> Iterator[Connection]:
    """A connection inside a transaction that no other migrator can enter at the same time."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            # Transaction-scoped: released by the commit or rollback that ends the migration.
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_LOCK_ID})
            yield conn
        elif conn.dialect.name == "sqlite":
            with _sqlite_immediate(conn):
                yield conn
        else:
            yield conn


@contextmanager
def _sqlite_immediate(conn: Connection) -> Iterator[None]:
    # pysqlite opens transactions lazily and only before DML, so DDL would autocommit statement by
    # statement. Taking over transaction control for this one connection gives a real transaction
    # around DDL, and IMMEDIATE takes the write lock up front (others wait on busy_timeout).
    dbapi = conn.connection.driver_connection
    assert dbapi is not None
    saved = dbapi.isolation_level
    dbapi.isolation_level = None
    # Replicas starting together queue here behind one migrator; on a loaded box its run (imports
    # included) can outlast the 5 s request-path busy timeout, so waiters get a minute.
    conn.exec_driver_sql(f"PRAGMA busy_timeout={MIGRATION_LOCK_WAIT_MS}")
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield
    finally:
        if dbapi.in_transaction:
            dbapi.rollback()  # only reached on error: the happy path committed already
        dbapi.isolation_level = saved
        conn.exec_driver_sql(f"PRAGMA busy_timeout={REQUEST_BUSY_TIMEOUT_MS}")
