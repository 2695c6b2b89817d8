"""Database fixtures for the key-store tests: every test runs on SQLite (a temp file) and on PostgreSQL
(a throwaway database for the session, emptied before each test). Import the fixtures into a test module
to use them."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, MetaData, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from serve_app.auth.keystore import KeyStore
from tests.support.env import POSTGRES_URL as PG_ADMIN_URL  # IIR_TEST_POSTGRES_URL (docs/SETUP.md)


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """A throwaway database for this session, dropped afterwards."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 2})
    name = f"iir_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except OperationalError as exc:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {make_url(PG_ADMIN_URL).host}: {exc.orig}")
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def drop_everything(engine: Engine) -> None:
    """Every table, alembic_version included: the PostgreSQL database is shared by the session's tests."""
    metadata = MetaData()
    metadata.reflect(engine)
    metadata.drop_all(engine)


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres")])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    url: str = request.getfixturevalue("pg_database_url")
    engine = create_engine(url)
    drop_everything(engine)
    engine.dispose()
    return url


@pytest.fixture
def store(database_url: str) -> Iterator[KeyStore]:
    ks = KeyStore(database_url)
    ks.upgrade()
    yield ks
    ks.close()
