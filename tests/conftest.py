"""Shared fixtures: test configs pointing at real upstreams started by the tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

# database_url (SQLite and PostgreSQL), store: for the key-store tests
from serve_app.routing.classifier import EmbeddingClassifier
from tests.db_fixtures import database_url, pg_database_url, store  # noqa: F401
from tests.support.env import POSTGRES_URL, REDIS_URL  # noqa: F401 - imported from here by tests
from tests.support.fake_upstream import FakeUpstream
from tests.support.llama_server import llama_server  # noqa: F401 - session fixture for every test
from tests.support.netns import UntrustedHost, untrusted_host

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_iir_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their own Settings; a developer's IIR_* variables must not leak in."""
    for name in list(os.environ):
        if name.startswith("IIR_") and not name.startswith("IIR_TEST_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def prompt_classifier() -> EmbeddingClassifier:
    """The real classifier (ONNX MiniLM + the committed head), loaded once per session."""
    from serve_app.settings import Settings

    defaults = Settings()
    return EmbeddingClassifier.load(defaults.classifier_head, defaults.cache_dir)


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(api_key="sk-upstream-test") as upstream:
        yield upstream


@pytest.fixture(scope="session")
def stranger() -> Iterator[UntrustedHost]:
    """A host outside the trusted networks, in a network namespace (needs root; skips otherwise)."""
    try:
        host = untrusted_host()
        entered = host.__enter__()
    except Exception as exc:  # not root, or no iproute2
        pytest.skip(f"no network namespace here: {exc}")
    try:
        yield entered
    finally:
        host.__exit__(None, None, None)


def write_configs(folder: Path, upstream_base_url: str, llama_base_url: str | None = None, *,
                  local: bool = True) -> dict[str, Path]:
    """The repo's models plus remote models on the tests' fake upstream (and llama.cpp's server).

    ``local=False`` leaves the repo's local models out (the default model becomes ``fake/echo-chat``):
    for tests of the HTTP layer, which would otherwise load them in-process for every test.
    """
    models = yaml.safe_load((REPO / "configs" / "models.yaml").read_text())
    if not local:
        models["default_model"] = "fake/echo-chat"
    models["models"] = [m for m in models["models"] if local and m["id"].startswith("local/")] + [
        {"id": "fake/echo-chat", "engine": "openai", "task": "chat", "source": "echo-1"},
        {"id": "fake/echo-code", "engine": "openai", "task": "chat", "source": "echo-code",
         "quality_tier": 2, "cost_per_1k_tokens": 0.002},
        {"id": "fake/echo-embed", "engine": "openai", "task": "embedding", "source": "echo-embed"},
        {"id": "fake/echo-faq", "engine": "openai", "task": "chat", "source": "echo-faq",
         "semantic_cache": True},
        {"id": "fake/musicgen", "engine": "http", "task": "generic", "endpoint": "generic/echo"},
        # The same upstream as a provider whose Responses API /v1/responses passes through to.
        {"id": "fake/echo-responses", "engine": "openai", "task": "chat", "source": "echo-1",
         "provider": "fake-responses"},
    ]
    if local:
        # One public id served by a provider and a local replica (issue 14): the provider first.
        models["groups"] = [{"id": "mixed", "strategy": "weighted",
                             "members": [{"model": "fake/echo-chat", "weight": 1e6},
                                         {"model": "local/smollm2-135m", "weight": 1e-6}]}]
    providers = {"providers": [{"name": "fake", "base_url": upstream_base_url,
                                "api_key_env": "IIR_TEST_UPSTREAM_KEY"},
                               {"name": "fake-responses", "base_url": upstream_base_url,
                                "api_key_env": "IIR_TEST_UPSTREAM_KEY", "responses_api": True}]}
    if llama_base_url:
        models["models"].append({"id": "llamacpp/smollm2-135m", "engine": "openai", "task": "chat",
                                 "source": "smollm2-135m"})
        providers["providers"].append({"name": "llamacpp", "base_url": llama_base_url})
    paths = {"models_config": folder / "models.yaml", "providers_config": folder / "providers.yaml",
             "routing_config": REPO / "configs" / "routing.yaml"}
    if not local:
        # "auto" among the fake models: code prompts to echo-code, everything else to echo-chat.
        paths["routing_config"] = folder / "routing.yaml"
        routing = yaml.safe_load((REPO / "configs" / "routing.yaml").read_text())
        routing.update(default="fake/echo-chat", categories={"code": ["fake/echo-code", "fake/echo-chat"]})
        paths["routing_config"].write_text(yaml.safe_dump(routing))
    paths["models_config"].write_text(yaml.safe_dump(models))
    paths["providers_config"].write_text(yaml.safe_dump(providers))
    return paths
