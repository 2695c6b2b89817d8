"""FastAPI dependencies: the request's context, the pipeline, the caller's key, and the admin checks.

All ``async def``: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop per
dependency per request (measured: 4 of them cost ~0.6 ms of CPU per request here).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from serve_app.auth.keystore import KeyInfo
from serve_app.errors import PermissionDenied
from serve_app.ingress.context import RequestContext
from serve_app.ingress.gateway import Gateway
from serve_app.ingress.middleware import context_of
from serve_app.ingress.pipeline import Pipeline
from serve_app.ingress.trusted_ip import is_allowed_ip


async def get_gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline = request.app.state.pipeline
    return pipeline


async def get_context(request: Request) -> RequestContext:
    return context_of(request.scope)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
Context = Annotated[RequestContext, Depends(get_context)]


async def current_key(request: Request, pipeline: PipelineDep, ctx: Context) -> KeyInfo:
    """The pipeline's first step, for every route that needs a key."""
    return await pipeline.authenticate(ctx, request.headers.get("authorization"))


CurrentKey = Annotated[KeyInfo, Depends(current_key)]


async def inference_key(pipeline: PipelineDep, ctx: Context, key: CurrentKey) -> KeyInfo:
    pipeline.require_inference(ctx)
    return key


InferenceKey = Annotated[KeyInfo, Depends(inference_key)]


@dataclass(slots=True, frozen=True)
class ModelCall:
    """What a model route needs once its caller's key may call models."""

    pipeline: Pipeline
    ctx: RequestContext
    headers: Mapping[str, str]


async def model_call(request: Request) -> ModelCall:
    """``deps.InferenceKey``'s two steps (authenticate, require the inference scope), with the pipeline
    and the context, as one dependency: FastAPI spends ~20 µs of CPU per dependency per request, and
    this replaces five of them on the busiest routes. Like any dependency it runs before the body is
    validated, so a request without a valid key gets 401 whatever its body."""
    pipeline: Pipeline = request.app.state.pipeline
    ctx = context_of(request.scope)
    await pipeline.authenticate(ctx, request.headers.get("authorization"))
    pipeline.require_inference(ctx)
    return ModelCall(pipeline, ctx, request.headers)


Call = Annotated[ModelCall, Depends(model_call)]


def from_trusted_ip(request: Request, gateway: Gateway) -> bool:
    peer = request.client.host if request.client else None
    settings = gateway.settings
    token = settings.proxy_token.get_secret_value() if settings.proxy_token else None
    return is_allowed_ip(peer, request.headers, trusted_networks=settings.trusted_networks,
                         trusted_proxies=settings.trusted_proxies, proxy_token=token,
                         behind_proxy=gateway.behind_proxy)


async def require_trusted_ip(request: Request, gateway: GatewayDep) -> None:
    if from_trusted_ip(request, gateway):
        return
    if gateway.behind_proxy and gateway.settings.proxy_token is None:
        raise PermissionDenied(
            "no address is trusted: HAProxy hides client addresses and IIR_PROXY_TOKEN is not set "
            "(docs/SETUP.md); create keys with `iir keys create`, or set the token", reason="untrusted_ip")
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
