"""API keys: the ``api_keys`` table and a small synchronous store over it (PostgreSQL or SQLite).

Only a SHA-256 hash of each key is stored. The key is 256 random bits, so a fast hash is enough: no
dictionary exists to attack, and a slow KDF would only add latency to every cache miss. The store is
blocking on purpose; async callers (``serve_app.auth.AuthService``) run it in a worker thread.

``Base.metadata`` is the schema that a later Alembic environment will target.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Engine, Integer, String, create_engine, event, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import StaticPool
from sqlalchemy.types import TypeDecorator

from serve_app.errors import NotFound

KEY_PREFIX = "iir-"
PREFIX_CHARS = 8  # random chars kept in ``prefix`` for display: identifies a key, reveals 48 of 256 bits
MAX_KEY_CHARS = 512  # anything longer is not one of our keys; don't spend hashing work on it
SCOPE_INFERENCE = "inference"
SCOPE_ADMIN = "admin"
KNOWN_SCOPES = frozenset({SCOPE_INFERENCE, SCOPE_ADMIN})

# A miss is compared against this so that it does the same work as a hit (see ``KeyStore.verify``).
_DUMMY_HASH = hashlib.sha256(b"iir-no-such-key").hexdigest()


def hash_key(api_key: str) -> str:
    """The stored form of a key: SHA-256, hex."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def _utcnow() -> datetime:
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


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    description: Mapped[str] = mapped_column(String(512), default="")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    # Comma-separated: portable across SQLite and PostgreSQL, and scopes never contain commas.
    scopes: Mapped[str] = mapped_column(String(256), default=SCOPE_INFERENCE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=_utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the gateway knows about a key once verified; picklable, so it crosses Ray process lines."""

    id: str
    prefix: str
    description: str
    priority: int
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    # Per-key limits enforced by the ingress (None: no limit of that kind).
    rate_limit_rpm: int | None = None
    rate_limit_tpm: int | None = None
    # Not secret (it cannot be reversed), but internal: ingress caches are keyed by it, and revocation
    # messages carry it. Kept out of repr and ``to_public``.
    key_hash: str = field(default="", repr=False)

    @property
    def active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > _utcnow()

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def to_public(self) -> dict[str, Any]:
        def iso(ts: datetime | None) -> str | None:
            return ts.isoformat() if ts is not None else None

        return {
            "id": self.id,
            "object": "api_key",
            "prefix": self.prefix,
            "description": self.description,
            "priority": self.priority,
            "scopes": list(self.scopes),
            "created_at": iso(self.created_at),
            "expires_at": iso(self.expires_at),
            "revoked_at": iso(self.revoked_at),
            "active": self.active,
        }

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyInfo:
        return cls(
            id=row.id,
            prefix=row.prefix,
            description=row.description,
            priority=row.priority,
            scopes=tuple(s for s in row.scopes.split(",") if s),
            created_at=row.created_at,
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            key_hash=row.key_hash,
        )


def _normalize_scopes(scopes: Iterable[str]) -> str:
    chosen = sorted(set(scopes))
    unknown = set(chosen) - KNOWN_SCOPES
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
    if not chosen:
        raise ValueError("a key needs at least one scope")
    return ",".join(chosen)


def _make_engine(database_url: str, connect_timeout_s: float) -> Engine:
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
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


class KeyStore:
    """Create, verify, list and revoke API keys. Thread-safe; every call uses its own session."""

    def __init__(self, database_url: str, *, connect_timeout_s: float = 3.0) -> None:
        self.engine = _make_engine(database_url, connect_timeout_s)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def create_schema(self) -> None:
        Base.metadata.create_all(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def create(
        self,
        description: str,
        priority: int,
        scopes: Iterable[str] = (SCOPE_INFERENCE,),
        expires_at: datetime | None = None,
    ) -> tuple[str, KeyInfo]:
        """A new key and its info. The key itself is returned once and never stored."""
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")
        token = secrets.token_urlsafe(32)
        api_key = KEY_PREFIX + token
        row = ApiKey(
            id=str(uuid.uuid4()),
            prefix=KEY_PREFIX + token[:PREFIX_CHARS],
            key_hash=hash_key(api_key),
            description=description,
            priority=priority,
            scopes=_normalize_scopes(scopes),
            created_at=_utcnow(),
            expires_at=expires_at,
        )
        with self._sessions.begin() as session:
            session.add(row)
        return api_key, KeyInfo.from_row(row)

    def verify(self, api_key: str) -> KeyInfo | None:
        """The key's info if it exists and is active; None otherwise (never says why)."""
        well_formed = isinstance(api_key, str) and 0 < len(api_key) <= MAX_KEY_CHARS
        candidate = hash_key(api_key) if well_formed else _DUMMY_HASH
        with self._sessions() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.key_hash == candidate)).one_or_none()
            # The index lookup finds the row; the constant-time compare is the actual check, and a miss
            # runs it too (against a dummy) so hits and misses cost the same.
            stored = row.key_hash if row is not None else _DUMMY_HASH
            matched = hmac.compare_digest(stored, candidate)
            if row is None or not matched or not well_formed:
                return None
            info = KeyInfo.from_row(row)
        return info if info.active else None

    def get(self, key_id: str) -> KeyInfo:
        with self._sessions() as session:
            row = session.get(ApiKey, key_id)
            if row is None:
                raise NotFound(f"No API key with id '{key_id}'", param="key_id")
            return KeyInfo.from_row(row)

    def list(self) -> builtins.list[KeyInfo]:
        with self._sessions() as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))
            return [KeyInfo.from_row(r) for r in rows]

    def revoke(self, key_id: str) -> KeyInfo:
        """Mark a key revoked. Revoking twice keeps the first timestamp."""
        with self._sessions.begin() as session:
            row = session.get(ApiKey, key_id, with_for_update=True)
            if row is None:
                raise NotFound(f"No API key with id '{key_id}'", param="key_id")
            if row.revoked_at is None:
                row.revoked_at = _utcnow()
            return KeyInfo.from_row(row)
