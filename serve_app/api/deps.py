"""FastAPI dependencies: the gateway, the caller's key, and the admin check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from serve_app.api.middleware import annotate, count_in_flight
from serve_app.errors import PermissionDenied
from serve_app.gateway import Gateway
from serve_app.keystore import KeyInfo
from serve_app.trusted_ip import is_allowed_ip


def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def current_key(request: Request, gateway: GatewayDep) -> KeyInfo:
    key = await gateway.keys.authenticate(request.headers.get("authorization"))
    annotate(request.scope, key_id=key.id)
    return key


CurrentKey = Annotated[KeyInfo, Depends(current_key)]


async def inference_key(request: Request, key: CurrentKey) -> KeyInfo:
    """Model routes: the key must carry the ``inference`` scope (an admin-only key manages, never spends)."""
    if "inference" not in key.scopes:
        raise PermissionDenied("this key lacks the 'inference' scope needed to call models", reason="scope")
    count_in_flight(request.scope, key.priority)
    return key


InferenceKey = Annotated[KeyInfo, Depends(inference_key)]


def from_trusted_ip(request: Request, gateway: Gateway) -> bool:
    peer = request.client.host if request.client else None
    settings = gateway.settings
    return is_allowed_ip(peer, request.headers, trusted_networks=settings.trusted_networks,
                         trusted_proxies=settings.trusted_proxies)


def require_trusted_ip(request: Request, gateway: GatewayDep) -> None:
    if not from_trusted_ip(request, gateway):
        raise PermissionDenied("API keys can only be created from a trusted network address",
                               reason="untrusted_ip")


async def admin_key(request: Request, gateway: GatewayDep, key: CurrentKey) -> KeyInfo:
    """Admin routes: a valid key, and either a trusted network address or the ``admin`` scope."""
    if "admin" in key.scopes or from_trusted_ip(request, gateway):
        return key
    raise PermissionDenied("this route needs an admin-scoped key or a trusted network address",
                           reason="not_admin")


AdminKey = Annotated[KeyInfo, Depends(admin_key)]
TrustedIp = Annotated[None, Depends(require_trusted_ip)]
