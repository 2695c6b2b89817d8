"""``iir keys`` and ``iir db`` against a real SQLite file (the embedded default's shape)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from serve_app import migrate
from serve_app.cli import main


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("IIR_DATABASE_URL", url)
    return url


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_db_upgrade_then_current(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    first = run(capsys, "db", "upgrade")
    assert (first["before"], first["after"], first["changed"]) == (None, migrate.head_revision(), True)
    assert run(capsys, "db", "upgrade")["changed"] is False
    head = migrate.head_revision()
    assert run(capsys, "db", "current") == {"current": head, "head": head}


def test_keys_create_with_every_option_then_show_list_revoke(
    db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    created = run(capsys, "keys", "create", "--description", "ops", "--priority", "60",
                  "--scopes", "inference,admin", "--expires-in", "3600", "--rpm", "120", "--tpm", "50000")
    assert created["api_key"].startswith("iir-") and created["priority"] == 60
    assert created["scopes"] == ["admin", "inference"]
    assert created["rate_limit"] == {"requests_per_minute": 120, "tokens_per_minute": 50000}
    remaining = datetime.fromisoformat(created["expires_at"]) - datetime.now(UTC)
    assert 3590 < remaining.total_seconds() <= 3600
    shown = run(capsys, "keys", "show", created["id"])
    assert "api_key" not in shown and shown["description"] == "ops"
    assert [k["id"] for k in run(capsys, "keys", "list")] == [created["id"]]
    revoked = run(capsys, "keys", "revoke", created["id"])
    assert revoked["revoked_at"] is not None and revoked["active"] is False


def test_keys_create_defaults(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    created = run(capsys, "keys", "create")
    assert (created["priority"], created["scopes"], created["expires_at"]) == (0, ["inference"], None)


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["keys", "create", "--priority", "500"], "priority", id="priority-range"),
    pytest.param(["keys", "create", "--scopes", "root"], "unknown scopes", id="unknown-scope"),
    pytest.param(["keys", "show", "no-such-id"], "No API key", id="unknown-id"),
])
def test_keys_errors_exit_2_with_a_message(db_url: str, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], message: str) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_option_values_are_refused_by_the_parser(db_url: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["keys", "create", "--rpm", "0"])
    assert exit_info.value.code == 2
