"""Admin routes: API keys and the registry refresh."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from serve_app.ingress.deps import AdminKey, GatewayDep, TrustedIp
from serve_app.schemas import ApiKeyCreate, ApiKeyUpdate

router = APIRouter()


@router.post("/api/v1/apikeys", status_code=201)
async def create_key(body: ApiKeyCreate, gateway: GatewayDep, _: TrustedIp) -> dict[str, Any]:
    return await gateway.key_admin.create(body)


@router.get("/api/v1/apikeys")
async def list_keys(gateway: GatewayDep, _: AdminKey) -> dict[str, Any]:
    keys = await gateway.key_admin.list()
    return {"object": "list", "data": [k.to_public() for k in keys]}


@router.get("/api/v1/apikeys/{key_id}")
async def get_key(key_id: str, gateway: GatewayDep, _: AdminKey) -> dict[str, Any]:
    return (await gateway.key_admin.get(key_id)).to_public()


@router.patch("/api/v1/apikeys/{key_id}")
async def update_key(key_id: str, body: ApiKeyUpdate, gateway: GatewayDep, _: AdminKey) -> dict[str, Any]:
    info = (await gateway.key_admin.update(key_id, **body.changes())).info
    # As for a revocation: this replica drops its cached copy now, the others hear it on the channel, and
    # the next request re-verifies, so a new priority or limit applies at once.
    gateway.keys.invalidate(info.key_hash)
    return info.to_public()


@router.get("/api/v1/apikeys/{key_id}/usage")
async def key_usage(key_id: str, gateway: GatewayDep, _: AdminKey) -> dict[str, Any]:
    return await gateway.key_admin.usage(key_id)


@router.delete("/api/v1/apikeys/{key_id}")
async def revoke_key(key_id: str, gateway: GatewayDep, _: AdminKey) -> dict[str, Any]:
    info = (await gateway.key_admin.revoke(key_id)).info
    # This replica drops the key at once; the others hear it through the revocation channel.
    gateway.keys.invalidate(info.key_hash)
    return {**info.to_public(), "revoked": True}


@router.post("/v1/registry/refresh")
async def refresh_registry(gateway: GatewayDep, _: AdminKey) -> dict[str, Any]:
    return await gateway.refresh_registry()


@router.get("/v1/registry")
async def registry(gateway: GatewayDep, _: AdminKey) -> dict[str, Any]:
    """Every model with its status (and why it is unavailable), cost and placement, the nodes, the
    groups and their members, and each model's health as this ingress replica sees it (circuit state,
    in flight, moving-average latency): ``health``."""
    snapshot = gateway.registry_snapshot().model_dump(mode="json")
    snapshot["health"] = gateway.router.health.views()
    return snapshot
