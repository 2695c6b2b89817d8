"""The database side of usage accounting: add a batch of per-key counts to the running totals.

The ingress counts requests and tokens in memory and hands a batch over every few seconds, off the
request path. Here a batch becomes one transaction of additive upserts
(``requests = api_key_usage.requests + excluded.requests``), so concurrent batches from many ingress
replicas never overwrite each other's counts: the database does the addition under its row lock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, bindparam, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from serve_app.db.engine import utcnow
from serve_app.db.tables import ApiKey, ApiKeyUsage


class UsageDelta(NamedTuple):
    """One key's usage since the previous batch. A plain 5-tuple in this order works too."""

    key_id: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    last_used_at: datetime | float  # timezone-aware, or POSIX seconds


@dataclass(slots=True)
class _Totals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    last_used_at: datetime | None = None


def _timestamp(value: datetime | float) -> datetime:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("usage last_used_at must be timezone-aware")
        return value.astimezone(UTC)
    return datetime.fromtimestamp(value, UTC)


def aggregate(batch: Iterable[UsageDelta | tuple[Any, ...]]) -> dict[str, _Totals]:
    """One entry per key: PostgreSQL refuses an upsert that touches the same row twice in a statement."""
    totals: dict[str, _Totals] = {}
    for entry in batch:
        key_id, requests, prompt, completion, last_used = UsageDelta(*entry)
        counts = (requests, prompt, completion)
        if any(not isinstance(n, int) or isinstance(n, bool) or n < 0 for n in counts):
            raise ValueError(f"usage counts must be non-negative integers, got {counts!r}")
        t = totals.setdefault(str(key_id), _Totals())
        t.requests += requests
        t.prompt_tokens += prompt
        t.completion_tokens += completion
        ts = _timestamp(last_used)
        t.last_used_at = ts if t.last_used_at is None else max(t.last_used_at, ts)
    return totals


def add_usage(conn: Connection, batch: Iterable[UsageDelta | tuple[Any, ...]]) -> int:
    """Add ``batch`` within the caller's transaction; returns the number of keys it touched."""
    totals = aggregate(batch)
    if not totals:
        return 0
    known = set(conn.scalars(select(ApiKey.id).where(ApiKey.id.in_(totals))))
    # A fixed (sorted) lock order: two batches touching the same keys queue up instead of deadlocking.
    key_ids = sorted(known)
    if not key_ids:
        return 0
    now = utcnow()
    rows = [{"key_id": k, "requests": totals[k].requests, "prompt_tokens": totals[k].prompt_tokens,
             "completion_tokens": totals[k].completion_tokens, "updated_at": now} for k in key_ids]
    conn.execute(_upsert(conn.dialect.name), rows)
    conn.execute(_advance_last_used(), [{"kid": k, "ts": totals[k].last_used_at} for k in key_ids])
    return len(key_ids)


def _upsert(dialect: str) -> Any:
    # ON CONFLICT ... DO UPDATE is spelled the same on PostgreSQL and SQLite (3.24+); only the
    # SQLAlchemy construct differs.
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(ApiKeyUsage)
    elif dialect == "sqlite":
        stmt = sqlite.insert(ApiKeyUsage)
    else:
        raise NotImplementedError(f"usage accounting supports PostgreSQL and SQLite, not {dialect}")
    table = ApiKeyUsage.__table__.c
    return stmt.on_conflict_do_update(
        index_elements=[table.key_id],
        set_={
            "requests": table.requests + stmt.excluded.requests,
            "prompt_tokens": table.prompt_tokens + stmt.excluded.prompt_tokens,
            "completion_tokens": table.completion_tokens + stmt.excluded.completion_tokens,
            "updated_at": stmt.excluded.updated_at,
        },
    )


def _advance_last_used() -> Any:
    # Only forward: a batch delayed behind a newer one must not move last_used_at back in time.
    ts = bindparam("ts", type_=ApiKey.last_used_at.type)
    return (
        update(ApiKey)
        .where(ApiKey.id == bindparam("kid"), or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < ts))
        .values(last_used_at=ts)
    )
