"""``iir keys`` and ``iir db`` against a real SQLite file (the embedded default's shape) and PostgreSQL, with
the real Redis for the announcements ``iir keys revoke``/``update`` send to the ingress caches."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

from serve_app.auth.keystore import KeyStore, hash_key
from serve_app.auth.service import REVOKED_CHANNEL
from serve_app.cli import main
from serve_app.db import migrate
from tests.conftest import REDIS_URL
from tests.support.net import free_port


@pytest.fixture
def db_url(database_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("IIR_DATABASE_URL", database_url)
    monkeypatch.setenv("IIR_REDIS_URL", REDIS_URL)
    return database_url


@pytest.fixture
def announcements() -> Iterator[redis.client.PubSub]:
    """What the ingress replicas' revocation listeners would hear (the channel ``iir keys`` uses)."""
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable: {exc}")
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(REVOKED_CHANNEL)
    yield pubsub
    pubsub.close()
    client.close()


def heard(pubsub: redis.client.PubSub, key_hash: str, timeout_s: float = 2.0) -> bool:
    """The channel carried ``key_hash`` (messages for other keys, say another session's, are skipped)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.1)
        if msg is not None and msg["data"].decode() == key_hash:
            return True
    return False


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
    db_url: str, capsys: pytest.CaptureFixture[str], announcements: redis.client.PubSub
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
    assert revoked["revoked_at"] is not None and revoked["active"] is False and revoked["announced"] is True
    assert heard(announcements, hash_key(created["api_key"])), "the revocation was not announced"


def test_keys_create_defaults(db_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    created = run(capsys, "keys", "create")
    assert (created["priority"], created["scopes"], created["expires_at"]) == (0, ["inference"], None)
    assert created["rate_limit"] == {"requests_per_minute": None, "tokens_per_minute": None}


def test_keys_update_changes_only_what_is_given_and_announces_it(
    db_url: str, capsys: pytest.CaptureFixture[str], announcements: redis.client.PubSub
) -> None:
    created = run(capsys, "keys", "create", "--description", "before", "--priority", "5", "--rpm", "10",
                  "--tpm", "1000")
    updated = run(capsys, "keys", "update", created["id"], "--priority", "50", "--rpm", "none")
    assert (updated["description"], updated["priority"], updated["announced"]) == ("before", 50, True)
    assert updated["rate_limit"] == {"requests_per_minute": None, "tokens_per_minute": 1000}
    assert heard(announcements, hash_key(created["api_key"])), "the update was not announced"
    assert run(capsys, "keys", "update", created["id"], "--description", "after")["description"] == "after"
    assert run(capsys, "keys", "show", created["id"])["priority"] == 50


@pytest.mark.parametrize("argv", [
    pytest.param(["revoke"], id="revoke"),
    pytest.param(["update", "--priority", "9"], id="update"),
])
def test_redis_down_the_change_stands_with_a_warning_and_exit_0(
    db_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    created = run(capsys, "keys", "create")
    monkeypatch.setenv("IIR_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    assert main(["keys", argv[0], created["id"], *argv[1:]]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["announced"] is False
    assert "WARNING" in err and "did not go out" in err and "IIR_KEY_CACHE_TTL_S" in err
    store = KeyStore(db_url)
    try:
        info = store.get(created["id"])
    finally:
        store.close()
    if argv[0] == "revoke":
        assert info.revoked_at is not None
    else:
        assert info.priority == 9


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param(["keys", "create", "--priority", "500"], "priority", id="priority-range"),
    pytest.param(["keys", "create", "--scopes", "root"], "scopes", id="unknown-scope"),
    pytest.param(["keys", "create", "--expires-in", "999999999999"], "expires_in", id="expiry-range"),
    pytest.param(["keys", "show", "no-such-id"], "No API key", id="unknown-id"),
    pytest.param(["keys", "revoke", "no-such-id"], "No API key", id="revoke-unknown-id"),
    pytest.param(["keys", "update", "no-such-id", "--priority", "1"], "No API key", id="update-unknown-id"),
    pytest.param(["keys", "update", "no-such-id"], "nothing to change", id="update-nothing"),
    pytest.param(["keys", "update", "no-such-id", "--priority", "-1"], "priority", id="update-priority"),
])
def test_keys_errors_exit_2_with_a_message(db_url: str, capsys: pytest.CaptureFixture[str],
                                           argv: list[str], message: str) -> None:
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    pytest.param(["keys", "create", "--rpm", "0"], id="create-rpm"),
    pytest.param(["keys", "update", "some-id", "--tpm", "0"], id="update-tpm"),
])
def test_bad_option_values_are_refused_by_the_parser(db_url: str, argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_dataplane_env_prints_exports_for_ray_start(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex

    def exports() -> dict[str, str]:
        lines = capsys.readouterr().out.splitlines()
        assert all(line.startswith("export ") for line in lines)
        return dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines)

    assert main(["dataplane", "env"]) == 0
    made = exports()
    assert made["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and made["IIR_DATA_PLANE"] == "haproxy"
    assert made["RAY_SERVE_HAPROXY_BINARY_PATH"].endswith("/iir-haproxy")
    assert len(made["IIR_PROXY_TOKEN"]) >= 32
    # Run on the next node with the first node's token: the same token comes out.
    monkeypatch.setenv("IIR_PROXY_TOKEN", made["IIR_PROXY_TOKEN"])
    assert main(["dataplane", "env"]) == 0
    assert exports()["IIR_PROXY_TOKEN"] == made["IIR_PROXY_TOKEN"]
    assert main(["dataplane", "env", "--data-plane", "python"]) == 0
    python = exports()
    assert python["RAY_SERVE_ENABLE_HA_PROXY"] == "0" and "IIR_PROXY_TOKEN" not in python
