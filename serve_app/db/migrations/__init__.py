"""Alembic migrations for the key store; run them with ``iir db upgrade`` (see ``serve_app.db.migrate``).

A new revision goes in ``versions/`` as ``NNNN_what.py`` with ``down_revision`` set to the previous one.
Keep migrations additive (new nullable columns, new tables) so that the previous release keeps running
against the new schema during a rolling deploy. ``tests/auth/test_keystore.py`` fails if
``serve_app.db.tables`` and the migrations disagree.
"""
