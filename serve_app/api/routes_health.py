"""Liveness and readiness. Both are open (probes carry no keys) and reveal no secrets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from serve_app.api.deps import GatewayDep

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
    """200 when the key store and every local model answer; the cache only degrades readiness."""
    models = gateway.router.models()
    local = [m for m in models if m.is_local]
    results = await asyncio.gather(
        _check(gateway.key_admin.ping()),
        *(_check(gateway.router.engine_for(m.id).check_health()) for m in local),  # type: ignore[union-attr]
    )
    database, model_states = results[0], dict(zip((m.id for m in local), results[1:], strict=True))
    cache = "ok" if gateway.revocations.subscribed else "degraded: revocations fall back to the TTL"
    ok = database == "ok" and all(s == "ok" for s in model_states.values())
    body = {"status": "ready" if ok else "not_ready", "database": database, "cache": cache,
            "models": model_states}
    return JSONResponse(body, status_code=200 if ok else 503)
