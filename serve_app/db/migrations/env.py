"""Alembic's environment: runs the migrations on the connection ``serve_app.db.migrate`` passes in.

That connection is already inside a transaction holding the migration lock, so Alembic neither opens
its own connection nor commits; ``serve_app.db.migrate.upgrade`` commits when every step has run.
"""

from __future__ import annotations

from alembic import context

from serve_app.db.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `iir db upgrade` (serve_app.db.migrate); "
                       "it supplies the connection")
if context.is_offline_mode():
    raise RuntimeError("offline (--sql) migrations are not supported")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
