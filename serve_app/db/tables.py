"""The key store's tables. ``Base.metadata`` is what the migrations in ``serve_app/migrations`` build;
``tests/auth/test_keystore.py`` checks that the two agree on both backends, so a model change without a
migration fails the suite.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from serve_app.db.engine import UTCDateTime, utcnow

MAX_DESCRIPTION_CHARS = 512
SCOPE_INFERENCE = "inference"
SCOPE_ADMIN = "admin"
# Priority: higher is served first under contention. The default is the lowest, so a key must be
# promoted deliberately.
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 100, 0
# Rate limits live in 32-bit integer columns; a larger value would be a 503 from PostgreSQL, not a 400.
MAX_RATE_LIMIT = 2**31 - 1


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=lambda: str(uuid.uuid4()))
    prefix: Mapped[str] = mapped_column(String(32))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    description: Mapped[str] = mapped_column(String(MAX_DESCRIPTION_CHARS), default="")
    priority: Mapped[int] = mapped_column(Integer, default=DEFAULT_PRIORITY)
    # Comma-separated: portable across SQLite and PostgreSQL, and scopes never contain commas.
    scopes: Mapped[str] = mapped_column(String(256), default=SCOPE_INFERENCE)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Moved forward by usage batches (never per request), so it lags real use by one batch interval.
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    rate_limit_rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    rate_limit_tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiKeyUsage(Base):
    """Running totals per key, added to by usage batches; a key that was never used has no row."""

    __tablename__ = "api_key_usage"

    key_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True
    )
    # 64-bit: token totals of a busy key pass 2**31 within months.
    requests: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)




class RegistryModel(Base):
    """The model registry's last snapshot, one row per model (``serve_app.registry.store``)."""

    __tablename__ = "registry_models"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64))
    origin: Mapped[str] = mapped_column(String(16))  # config | models_dir | provider
    engine: Mapped[str] = mapped_column(String(32))
    task: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))  # available | loading | unavailable
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    cost_per_1k_tokens: Mapped[float | None] = mapped_column(Float, nullable=True)
    tags: Mapped[str] = mapped_column(Text, default="[]")  # JSON list
    # The whole registry entry as JSON: what a restarted Registry serves before its first refresh.
    entry: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
