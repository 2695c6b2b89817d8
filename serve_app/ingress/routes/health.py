"""Liveness and readiness. Both are open (probes carry no keys) and reveal no secrets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serve_app.ingress.deps import GatewayDep

router = APIRouter()
CHECK_TIMEOUT_S = 2.0


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


async def _check(probe: Awaitable[Any]) -> str:
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT_S)
        return "ok"
    except TimeoutError:
        return "timeout"
    except Exception as exc:  # noqa: BLE001 - readiness reports any failure, it never raises
        return f"error: {type(exc).__name__}"


@router.get("/ready")
async def ready(gateway: GatewayDep) -> JSONResponse:
    """200 when the key store answers, the registry's list has arrived and the default model answers.

    Other models are reported, not required: one broken or still-loading model must not take the
    whole gateway out of a load balancer.
    """
    snapshot = gateway.registry_snapshot()
    local = [m for m in gateway.router.models() if m.is_local and gateway.router.entry(m.id) is not None]
    results = await asyncio.gather(
        _check(gateway.key_admin.ping()),
        *(_model_check(gateway, m.id) for m in local),
    )
    database, checked = results[0], dict(zip((m.id for m in local), results[1:], strict=True))
    states = {e.id: checked.get(e.id, e.status if e.status != "unavailable" else f"unavailable: {e.reason}")
              for e in snapshot.entries if e.spec.is_local}
    default = snapshot.default_model
    default_ok = checked.get(default, "ok" if default and not default.startswith("local/") else "missing")
    cache = "ok" if gateway.revocations.subscribed else "degraded: revocations fall back to the TTL"
    ok = database == "ok" and snapshot.version > 0 and default_ok == "ok"
    response_cache = gateway.cache.store.status() if gateway.cache else "off"
    body = {"status": "ready" if ok else "not_ready", "database": database, "cache": cache,
            "response_cache": response_cache, "registry_version": snapshot.version,
            "default_model": default, "models": states}
    return JSONResponse(body, status_code=200 if ok else 503)


async def _model_check(gateway: GatewayDep, model_id: str) -> str:
    entry = gateway.router.entry(model_id)
    engine = gateway.router.engine_for(model_id)
    if entry is None or engine is None or entry.status != "available" or entry.cold:
        return entry.status if entry and not entry.cold else "scaled to zero"
    return await _check(engine.check_health())
