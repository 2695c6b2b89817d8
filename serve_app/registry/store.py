"""The registry's snapshot in the SQL database (``registry_models``), written by the Registry deployment
only: on every new snapshot, never per request. Readable by operators with plain SQL."""

from __future__ import annotations

import json

from sqlalchemy import delete, select
from sqlalchemy.orm import sessionmaker

from serve_app.db import migrate
from serve_app.db.engine import make_engine, utcnow
from serve_app.db.tables import RegistryModel
from serve_app.registry.model_registry import RegistryEntry


class SqlRegistryStore:
    def __init__(self, database_url: str, *, connect_timeout_s: float = 3.0) -> None:
        self.engine = make_engine(database_url, connect_timeout_s)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def upgrade(self) -> None:
        migrate.upgrade(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    def load(self) -> list[RegistryEntry]:
        with self._sessions() as session:
            rows = session.scalars(select(RegistryModel).order_by(RegistryModel.id)).all()
        return [RegistryEntry.model_validate_json(row.entry) for row in rows]

    def save(self, entries: list[RegistryEntry]) -> None:
        """Replace the stored list with ``entries`` in one transaction."""
        now = utcnow()
        with self._sessions.begin() as session:
            session.execute(delete(RegistryModel).where(RegistryModel.id.not_in([e.id for e in entries])))
            for entry in entries:
                session.merge(RegistryModel(
                    id=entry.id, owner=entry.spec.owner, origin=entry.origin, engine=entry.spec.engine,
                    task=entry.spec.task, status=entry.status, reason=entry.reason,
                    cost_per_1k_tokens=entry.cost_per_1k_tokens, tags=json.dumps(entry.spec.tags),
                    entry=entry.model_dump_json(), updated_at=now,
                ))
