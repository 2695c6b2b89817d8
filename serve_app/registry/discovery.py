"""Discovery: what could be served, beyond what ``models.yaml`` declares.

- the models directory (``IIR_MODELS_DIR``): GGUF files and Hugging Face folders (``models_dir``);
- remote providers with ``discover: true``: their ``GET {base_url}/models``, with the provider's key
  from the environment.

Declared models always win: a discovered model whose id is already declared is dropped, so
``models.yaml`` can pin resources or a price for a model that discovery also finds. A discovered local
model whose id differs but whose Serve application name would be the same (``local/Tiny-Chat``
declared, ``tiny-chat.gguf`` found: both ``iir-model-tiny-chat``) is kept in the list as a
``conflict``, which the registry shows ``unavailable`` with the reason and never deploys.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx
from pydantic import ValidationError

from serve_app.registry.catalog import ModelSpec, ProviderSpec
from serve_app.registry.models_dir import scan_models_dir, task_from_name

logger = logging.getLogger(__name__)

Origin = Literal["config", "models_dir", "provider"]


@dataclass(frozen=True)
class Discovered:
    specs: list[tuple[ModelSpec, Origin]]
    # Discovery that failed, by source ("provider fake", "models_dir"): shown in the refresh diff.
    errors: dict[str, str] = field(default_factory=dict)
    # Providers whose /models failed this time (the registry keeps what they listed last time).
    failed_providers: frozenset[str] = frozenset()
    # Discovered models that must not be deployed, by id: why (an application name already taken).
    conflicts: dict[str, str] = field(default_factory=dict)


async def discover(declared: Iterable[ModelSpec], providers: Iterable[ProviderSpec], *,
                   models_dir: Path | None, timeout_s: float = 5.0) -> Discovered:
    specs: dict[str, tuple[ModelSpec, Origin]] = {m.id: (m, "config") for m in declared}
    errors: dict[str, str] = {}
    failed: set[str] = set()
    if models_dir is not None:
        if not models_dir.is_dir():
            errors["models_dir"] = f"{models_dir} is not a directory"
        for spec in await asyncio.to_thread(scan_models_dir, models_dir):
            specs.setdefault(spec.id, (spec, "models_dir"))
    wanted = [p for p in providers if p.discover]
    if wanted:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            listings = await asyncio.gather(*(provider_models(p, client) for p in wanted),
                                            return_exceptions=True)
        for provider, listing in zip(wanted, listings, strict=True):
            if isinstance(listing, BaseException):
                errors[f"provider {provider.name}"] = _describe(listing)
                failed.add(provider.name)
                continue
            for spec in listing:
                specs.setdefault(spec.id, (spec, "provider"))
    found = list(specs.values())
    return Discovered(found, errors, frozenset(failed), _app_conflicts(found))


def _app_conflicts(found: list[tuple[ModelSpec, Origin]]) -> dict[str, str]:
    """Discovered local models whose application name a declared one (or an earlier find) already has:
    deploying both would make one application overwrite the other."""
    owners: dict[str, str] = {}
    conflicts: dict[str, str] = {}
    # Declared first: models.yaml wins (it has no collisions of its own: the catalog refuses them).
    for spec, _ in sorted(found, key=lambda item: item[1] != "config"):
        if not spec.is_local:
            continue
        taken_by = owners.setdefault(spec.app_slug, spec.id)
        if taken_by != spec.id:
            conflicts[spec.id] = (f"its Serve application name ({spec.app_slug}) is taken by {taken_by}; "
                                  f"rename the file or folder")
    return conflicts


async def provider_models(provider: ProviderSpec, client: httpx.AsyncClient) -> list[ModelSpec]:
    """The provider's ``/models`` listing as remote ``ModelSpec``s (``<provider>/<upstream id>``)."""
    headers = {}
    if provider.api_key_env:
        key = os.environ.get(provider.api_key_env)
        if not key:
            raise LookupError(f"environment variable {provider.api_key_env} is not set")
        headers["Authorization"] = f"Bearer {key}"
    response = await client.get(provider.base_url.rstrip("/") + "/models", headers=headers)
    if response.status_code != 200:
        raise LookupError(f"GET /models answered {response.status_code}")
    try:
        entries = response.json().get("data", [])
    except (ValueError, AttributeError) as exc:
        raise LookupError("GET /models did not answer an OpenAI model list") from exc
    specs = []
    for entry in entries:
        upstream_id = str(entry.get("id", "")) if isinstance(entry, dict) else ""
        if not upstream_id or not _kept(upstream_id, provider.discover_prefixes):
            continue
        try:
            specs.append(ModelSpec(id=f"{provider.name}/{upstream_id}", engine="openai",
                                   task=task_from_name(upstream_id), source=upstream_id,
                                   description=f"listed by {provider.name}'s /models"))
        except ValidationError:
            logger.info("provider %s: model id %r cannot be served under our naming; skipped",
                        provider.name, upstream_id)
    return specs


def _kept(upstream_id: str, prefixes: list[str]) -> bool:
    return not prefixes or any(upstream_id.startswith(p) for p in prefixes)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "timed out listing models"
    if isinstance(exc, httpx.TransportError):
        return f"unreachable: {type(exc).__name__}"
    return str(exc) or type(exc).__name__
