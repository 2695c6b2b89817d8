"""The one place that binds the Ray Serve graph (``serve_config.yaml``: ``serve_app.builder:build_app``).

    Ingress ──(key-cache miss)──▶ Auth
            ──(model: "auto")───▶ Classifier
            ──(local model)─────▶ ModelReplica[<model>]   one deployment per local model
            ──(remote model)────▶ provider over pooled HTTP, from the ingress process
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application, Deployment

from deployments.auth import Auth
from deployments.classifier import Classifier
from deployments.ingress import Ingress
from deployments.model_replica import ModelReplica
from serve_app.catalog import ModelSpec, load_catalog
from serve_app.render import deployment_override
from serve_app.settings import Settings


class BuildArgs(BaseModel):
    """``args:`` of the application in ``serve_config.yaml``; anything unset comes from ``IIR_*``."""

    model_config = ConfigDict(extra="forbid")
    models_config: Path | None = None
    providers_config: Path | None = None
    routing_config: Path | None = None
    ingress_replicas: int = Field(1, ge=1)
    # Logical CPUs reserved per replica of the I/O-bound deployments; models reserve their own.
    ingress_num_cpus: float = Field(0.25, ge=0)
    service_num_cpus: float = Field(0.1, ge=0)


def build_app(args: dict[str, Any] | None = None) -> Application:
    build = BuildArgs.model_validate(args or {})
    overrides = {k: v for k, v in build.model_dump(include={"models_config", "providers_config",
                                                              "routing_config"}).items() if v}
    settings = Settings(**overrides)
    catalog = load_catalog(settings.models_config, settings.providers_config)
    io_bound: dict[str, Any] = {"max_ongoing_requests": 256,
                                "ray_actor_options": {"num_cpus": build.service_num_cpus}}
    auth = _deployment(Auth).options(**io_bound).bind(settings)
    classifier = _deployment(Classifier).options(**io_bound).bind()
    models = {spec.id: _model_replica(spec) for spec in catalog.local_models}
    return _deployment(Ingress).options(
        num_replicas=build.ingress_replicas, max_ongoing_requests=1024,
        ray_actor_options={"num_cpus": build.ingress_num_cpus},
    ).bind(settings, catalog, auth, classifier, models)


def _deployment(decorated: object) -> Deployment:
    """``@serve.deployment`` classes are ``Deployment`` objects at run time; type checkers can't tell."""
    return cast(Deployment, decorated)


def _model_replica(spec: ModelSpec) -> Application:
    # The same overrides `iir config render` writes, so a rendered serve_config.yaml and this agree.
    return _deployment(ModelReplica).options(**deployment_override(spec)).bind(spec)
