"""API keys: a small synchronous store over the ``api_keys`` and ``api_key_usage`` tables.

Only a SHA-256 hash of each key is stored. The key is 256 random bits, so a fast hash is enough: no
dictionary exists to attack, and a slow KDF would only add latency to every cache miss. The store is
blocking on purpose; async callers (``serve_app.auth.service.AuthService``) run it in a worker thread. The
tables live in ``serve_app.db.tables`` and are built by the migrations (``KeyStore.upgrade``).
"""

from __future__ import annotations

import builtins
import enum
import hashlib
import hmac
import secrets
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import sessionmaker

from serve_app.auth.usage_store import UsageDelta, add_usage
from serve_app.db import migrate
from serve_app.db.engine import make_engine, utcnow
from serve_app.db.tables import (
    DEFAULT_PRIORITY,
    MAX_DESCRIPTION_CHARS,
    MAX_PRIORITY,
    MAX_RATE_LIMIT,
    MIN_PRIORITY,
    SCOPE_ADMIN,
    SCOPE_INFERENCE,
    ApiKey,
    ApiKeyUsage,
)
from serve_app.errors import NotFound

KEY_PREFIX = "iir-"
PREFIX_CHARS = 8  # random chars kept in ``prefix`` for display: identifies a key, reveals 48 of 256 bits
MAX_KEY_CHARS = 512  # anything longer is not one of our keys; don't spend hashing work on it
KNOWN_SCOPES = frozenset({SCOPE_INFERENCE, SCOPE_ADMIN})

# A miss is compared against this so that it does the same work as a hit (see ``KeyStore.verify``).
_DUMMY_HASH = hashlib.sha256(b"iir-no-such-key").hexdigest()


class Unset(enum.Enum):
    """'Leave this field as it is' in ``KeyStore.update``, distinct from None ('no limit')."""

    UNSET = "unset"


UNSET = Unset.UNSET


def hash_key(api_key: str) -> str:
    """The stored form of a key: SHA-256, hex."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


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
    last_used_at: datetime | None = None
    # Not secret (it cannot be reversed), but internal: ingress caches are keyed by it, and revocation
    # messages carry it. Kept out of repr and ``to_public``.
    key_hash: str = field(default="", repr=False)

    @property
    def active(self) -> bool:
        if self.revoked_at is not None:
            return False
        return self.expires_at is None or self.expires_at > utcnow()

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def to_public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "api_key",
            "prefix": self.prefix,
            "description": self.description,
            "priority": self.priority,
            "scopes": list(self.scopes),
            "rate_limit": {
                "requests_per_minute": self.rate_limit_rpm,
                "tokens_per_minute": self.rate_limit_tpm,
            },
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "revoked_at": _iso(self.revoked_at),
            "last_used_at": _iso(self.last_used_at),
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
            rate_limit_rpm=row.rate_limit_rpm,
            rate_limit_tpm=row.rate_limit_tpm,
            last_used_at=row.last_used_at,
            key_hash=row.key_hash,
        )


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


# --- validation: the API validates first (400 naming the field); this guards the CLI and direct callers


def _normalize_scopes(scopes: Iterable[str]) -> str:
    chosen = sorted(set(scopes))
    unknown = set(chosen) - KNOWN_SCOPES
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
    if not chosen:
        raise ValueError("a key needs at least one scope")
    return ",".join(chosen)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(changes: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first bad field among description, priority and the rate limits."""
    description = changes.get("description", "")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise ValueError(f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters")
    priority = changes.get("priority", DEFAULT_PRIORITY)
    if not _is_int(priority) or not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise ValueError(f"priority must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}")
    for name in ("rate_limit_rpm", "rate_limit_tpm"):
        limit = changes.get(name)
        if limit is not None and (not _is_int(limit) or not 1 <= limit <= MAX_RATE_LIMIT):
            raise ValueError(f"{name} must be null or an integer from 1 to {MAX_RATE_LIMIT}")


def _not_found(key_id: str) -> NotFound:
    return NotFound(f"No API key with id '{key_id}'", param="key_id")


class KeyStore:
    """Create, verify, list, update and revoke API keys, and keep their usage. Thread-safe; every call
    uses its own session."""

    def __init__(self, database_url: str, *, connect_timeout_s: float = 3.0) -> None:
        self.engine = make_engine(database_url, connect_timeout_s)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def upgrade(self) -> migrate.UpgradeResult:
        """Bring the schema to the newest migration; cheap (two catalog reads) when it is already there."""
        return migrate.upgrade(self.engine)

    def create_schema(self) -> None:
        # Kept for callers that predate migrations: the schema now always comes from them.
        self.upgrade()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def create(
        self,
        description: str,
        priority: int = DEFAULT_PRIORITY,
        scopes: Iterable[str] = (SCOPE_INFERENCE,),
        expires_at: datetime | None = None,
        *,
        rate_limit_rpm: int | None = None,
        rate_limit_tpm: int | None = None,
    ) -> tuple[str, KeyInfo]:
        """A new key and its info. The key itself is returned once and never stored."""
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError("expires_at must be timezone-aware")
        _check_fields({"description": description, "priority": priority,
                       "rate_limit_rpm": rate_limit_rpm, "rate_limit_tpm": rate_limit_tpm})
        token = secrets.token_urlsafe(32)
        api_key = KEY_PREFIX + token
        row = ApiKey(
            id=str(uuid.uuid4()),
            prefix=KEY_PREFIX + token[:PREFIX_CHARS],
            key_hash=hash_key(api_key),
            description=description,
            priority=priority,
            scopes=_normalize_scopes(scopes),
            created_at=utcnow(),
            expires_at=expires_at,
            rate_limit_rpm=rate_limit_rpm,
            rate_limit_tpm=rate_limit_tpm,
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
                raise _not_found(key_id)
            return KeyInfo.from_row(row)

    def list(self) -> builtins.list[KeyInfo]:
        with self._sessions() as session:
            rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id))
            return [KeyInfo.from_row(r) for r in rows]

    def update(
        self,
        key_id: str,
        *,
        description: str | Unset = UNSET,
        priority: int | Unset = UNSET,
        rate_limit_rpm: int | None | Unset = UNSET,
        rate_limit_tpm: int | None | Unset = UNSET,
    ) -> KeyInfo:
        """Change the given fields (UNSET leaves one alone; None removes a rate limit)."""
        given = {"description": description, "priority": priority,
                 "rate_limit_rpm": rate_limit_rpm, "rate_limit_tpm": rate_limit_tpm}
        changes = {name: value for name, value in given.items() if value is not UNSET}
        _check_fields(changes)
        with self._sessions.begin() as session:
            row = session.get(ApiKey, key_id, with_for_update=True)
            if row is None:
                raise _not_found(key_id)
            for name, value in changes.items():
                setattr(row, name, value)
            session.flush()
            return KeyInfo.from_row(row)

    def revoke(self, key_id: str) -> KeyInfo:
        """Mark a key revoked. Revoking twice keeps the first timestamp."""
        with self._sessions.begin() as session:
            row = session.get(ApiKey, key_id, with_for_update=True)
            if row is None:
                raise _not_found(key_id)
            if row.revoked_at is None:
                row.revoked_at = utcnow()
            return KeyInfo.from_row(row)

    def usage(self, key_id: str) -> dict[str, Any]:
        """Totals recorded so far (zeros for a key never used); NotFound for an unknown id."""
        with self._sessions() as session:
            key = session.get(ApiKey, key_id)
            if key is None:
                raise _not_found(key_id)
            row = session.get(ApiKeyUsage, key_id)
            requests, prompt, completion = (
                (row.requests, row.prompt_tokens, row.completion_tokens) if row is not None else (0, 0, 0)
            )
            return {
                "id": key_id,
                "object": "api_key.usage",
                "requests": requests,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
                "last_used_at": _iso(key.last_used_at),
            }

    def record_usage(self, batch: Iterable[UsageDelta | tuple[Any, ...]]) -> int:
        """Add a batch of per-key counts to the totals in one transaction; returns how many keys it
        touched. Unknown key ids are skipped so one stray entry cannot sink the whole batch."""
        with self._sessions.begin() as session:
            return add_usage(session.connection(), batch)
