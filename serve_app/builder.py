"""The one place that binds the Ray Serve graph (``serve_config.yaml``: ``serve_app.builder:build_app``).

    application "iir" (serve deploy):
      Ingress ──(key-cache miss)──▶ Auth
              ──(opted-in miss)───▶ SemanticCache
              ──(long poll)───────▶ Registry ──creates, updates, drains──▶ applications "iir-model-<m>"
              ──(local model)─────▶ ModelReplica in "iir-model-<m>"   (handle from the registry snapshot)
              ──(remote model)────▶ provider over pooled HTTP, from the ingress process
      (model: "auto" is classified inside each ingress process, on a worker thread: no hop)

Local models are not bound here: the Registry deploys each as its own application once it has checked
that the model fits the cluster (``serve_app.registry.model_applications`` says why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application, Deployment

from deployments.auth import Auth
from deployments.ingress import Ingress
from deployments.model_replica import ModelReplica
from deployments.registry import Registry
from deployments.semantic_cache import SemanticCache
from serve_app.registry.catalog import CatalogSourceArgs, ModelSpec
from serve_app.registry.render import deployment_override
from serve_app.routing.classifier import RoutingPolicy
from serve_app.settings import Settings


class BuildArgs(BaseModel):
    """``args:`` of the application in ``serve_config.yaml``; anything unset comes from ``IIR_*``."""

    model_config = ConfigDict(extra="forbid")
    models_config: Path | None = None
    providers_config: Path | None = None
    routing_config: Path | None = None
    # The same documents inline (``iir config render --inline``): the Serve config alone then says
    # what is served, as KubeRay's serveConfigV2 needs, and `serve deploy` of it changes the models.
    models: dict[str, Any] | None = None
    providers: dict[str, Any] | None = None
    routing: dict[str, Any] | None = None
    ingress_replicas: int = Field(1, ge=1)
    # Logical CPUs reserved per replica of the I/O-bound deployments; models reserve their own.
    ingress_num_cpus: float = Field(0.25, ge=0)
    service_num_cpus: float = Field(0.1, ge=0)


def build_app(args: dict[str, Any] | None = None) -> Application:
    build = BuildArgs.model_validate(args or {})
    overrides = {k: v for k, v in build.model_dump(include={"models_config", "providers_config",
                                                              "routing_config"}).items() if v}
    settings = Settings(**overrides)
    declared = CatalogSourceArgs(models=build.models, providers=build.providers)
    declared.loader(settings)()  # a broken catalog fails the deploy here, with the file and field named
    policy = RoutingPolicy.model_validate(build.routing) if build.routing is not None else None
    io_bound: dict[str, Any] = {"max_ongoing_requests": 256,
                                "ray_actor_options": {"num_cpus": build.service_num_cpus}}
    auth = _deployment(Auth).options(**io_bound).bind(settings)
    # Each ingress replica keeps one long poll open here. No CPU reserved: it is idle but for refreshes
    # and status reads, like Serve's own controller, and a reservation here would be taken from the
    # models (on 2 CPUs, SmolLM2 1 + MiniLM 0.5 + the services fill the node).
    registry = _deployment(Registry).options(
        num_replicas=1, max_ongoing_requests=4096, graceful_shutdown_timeout_s=2,
        ray_actor_options={"num_cpus": 0}).bind(settings, declared, build_model_app)
    # One replica (the index is its memory). No CPU reserved, for the same reason as the Registry: it
    # embeds only for requests that opted in; give it CPUs in serve_config.yaml where they do.
    semantic_cache = _deployment(SemanticCache).options(
        num_replicas=1, max_ongoing_requests=256, ray_actor_options={"num_cpus": 0}).bind(settings)
    return _deployment(Ingress).options(
        num_replicas=build.ingress_replicas, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": build.ingress_num_cpus},
    ).bind(settings, auth, registry, semantic_cache, policy)


def build_model_app(spec: ModelSpec) -> Application:
    """One local model's application, with the registry's placement and autoscaling."""
    return _deployment(ModelReplica).options(**deployment_override(spec)).bind(spec)


def _deployment(decorated: object) -> Deployment:
    """``@serve.deployment`` classes are ``Deployment`` objects at run time; type checkers can't tell."""
    return cast(Deployment, decorated)
