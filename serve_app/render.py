"""``iir config render``: a ``serve_config.yaml`` for ``serve deploy``, written from ``configs/``.

The application part is the committed ``serve_config.yaml``. On top of it, each local model of
``models.yaml`` gets a ``deployments:`` entry with the same ``ray_actor_options``,
``max_ongoing_requests`` and ``autoscaling_config`` that ``serve_app.builder`` binds in code. Serve lets
the config file override what the code sets, so the rendered file shows a platform engineer where each
model's replicas go and how they scale, and editing it there wins without touching ``models.yaml``.

The committed ``serve_config.yaml`` leaves these entries out on purpose: Serve refuses an override for a
deployment the application does not build, so a static file listing ``Model_<name>`` would break
``serve deploy`` as soon as ``models.yaml`` drops that model. The rendered file is therefore a superset,
rendered again whenever ``models.yaml`` changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from serve_app.catalog import Catalog, ModelSpec, load_catalog

HEADER = """\
# Deploy with: serve deploy serve_config.yaml  (against `ray start --head`; see docs/SETUP.md).
# Start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in its environment: it is read by Serve's proxy
# and controller, which this file's runtime_env does not reach.
"""
RENDERED_NOTE = "# Rendered by `iir config render` from configs/; deployments: mirrors models.yaml.\n"
APP_NAME = "iir"


def base_config(args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The committed ``serve_config.yaml`` (``tests/test_render.py`` keeps the two equal)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "serve_app.builder:build_app",
            "args": dict(args or {}),
            "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}},
        }],
    }


def actor_options(spec: ModelSpec) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": spec.resources.num_cpus, "num_gpus": spec.resources.num_gpus}
    if spec.resources.accelerator_type:
        options["accelerator_type"] = spec.resources.accelerator_type
    return options


def autoscaling_config(spec: ModelSpec) -> dict[str, Any]:
    scaling = spec.autoscaling
    return {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        # Serve needs at least one replica to start from; min 0 then scales down to zero.
        "initial_replicas": max(1, scaling.min_replicas),
        "target_ongoing_requests": scaling.target_ongoing_requests,
    }


def deployment_override(spec: ModelSpec) -> dict[str, Any]:
    return {
        "name": spec.deployment_name,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "ray_actor_options": actor_options(spec),
        "autoscaling_config": autoscaling_config(spec),
    }


def render_config(catalog: Catalog, args: dict[str, Any] | None = None) -> dict[str, Any]:
    config = base_config(args)
    overrides = [deployment_override(spec) for spec in catalog.local_models]
    if overrides:
        config["applications"][0]["deployments"] = overrides
    return config


def render_yaml(config: dict[str, Any]) -> str:
    return HEADER + RENDERED_NOTE + yaml.safe_dump(config, sort_keys=False)


def render_from_files(models_config: Path, providers_config: Path | None,
                      args: dict[str, Any] | None = None) -> str:
    return render_yaml(render_config(load_catalog(models_config, providers_config), args))
