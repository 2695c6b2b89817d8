"""``iir config render``: a ``serve_config.yaml`` for ``serve deploy``, written from ``configs/``.

The application is the committed ``serve_config.yaml`` (``tests/registry/test_render.py`` keeps them
equal) with its ``args`` pinned: either the config files' absolute paths, or with ``--inline`` the documents
themselves, so that the Serve config alone says what is served (KubeRay's ``serveConfigV2``, or any
cluster whose nodes don't share the files). Then ``serve deploy`` of a re-rendered file is how a
platform engineer changes the declared models: the ``iir`` application is updated, its Registry
starts with the new catalog and adds, updates or drains model applications to match.

Local models are not deployments of the ``iir`` application: the Registry runs each as its own
application ``iir-model-<name>`` (``serve_app.registry.model_applications``), with the ``ray_actor_options``,
``max_ongoing_requests`` and ``autoscaling_config`` below (``deployment_override``). The rendered file
lists them in a comment so the placement can be reviewed next to the config it comes from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from serve_app.registry.catalog import Catalog, ModelSpec, load_catalog

HEADER = """\
# Deploy with: serve deploy serve_config.yaml  (against `ray start --head`; see docs/SETUP.md).
# Start Ray with RAY_SERVE_THROUGHPUT_OPTIMIZED=1 in its environment: it is read by Serve's proxy
# and controller, which this file's runtime_env does not reach.
"""
RENDERED_NOTE = "# Rendered by `iir config render` from configs/.\n"
APP_NAME = "iir"
MODEL_APP_PREFIX = "iir-model-"


def base_config(args: dict[str, Any] | None = None) -> dict[str, Any]:
    """The committed ``serve_config.yaml`` (``tests/registry/test_render.py`` keeps the two equal)."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": "/",
            "import_path": "serve_app.builder:build_app",
            "args": dict(args or {}),
            "runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}},
            # Serve's replica logs (ours included) as JSON lines with Serve's request id and replica.
            "logging_config": {"encoding": "JSON"},
        }],
    }


def actor_options(spec: ModelSpec) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": spec.resources.num_cpus, "num_gpus": spec.resources.num_gpus}
    if spec.resources.accelerator_type:
        options["accelerator_type"] = spec.resources.accelerator_type
    return options


def autoscaling_config(spec: ModelSpec) -> dict[str, Any]:
    scaling = spec.autoscaling
    config: dict[str, Any] = {
        "min_replicas": scaling.min_replicas,
        "max_replicas": scaling.max_replicas,
        # One replica up front unless told otherwise: min 0 then scales down to zero when idle.
        "initial_replicas": scaling.initial_replicas if scaling.initial_replicas is not None
        else max(1, scaling.min_replicas),
        "target_ongoing_requests": scaling.target_ongoing_requests,
    }
    if scaling.downscale_delay_s is not None:
        config["downscale_delay_s"] = scaling.downscale_delay_s
    return config


def deployment_override(spec: ModelSpec) -> dict[str, Any]:
    return {
        "name": spec.deployment_name,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "ray_actor_options": actor_options(spec),
        "autoscaling_config": autoscaling_config(spec),
    }


def model_applications_comment(catalog: Catalog) -> str:
    lines = ["# Model applications the Registry deploys from this catalog (placement and scaling):"]
    for spec in catalog.local_models:
        scaling = autoscaling_config(spec)
        lines.append(f"#   {model_app_name(spec)}: {spec.deployment_name} "
                     f"ray_actor_options={actor_options(spec)} "
                     f"replicas={scaling['min_replicas']}..{scaling['max_replicas']} "
                     f"target_ongoing_requests={scaling['target_ongoing_requests']:g}")
    return "\n".join(lines) + "\n"


def render_yaml(config: dict[str, Any], catalog: Catalog | None = None) -> str:
    comment = model_applications_comment(catalog) if catalog else ""
    return HEADER + RENDERED_NOTE + comment + yaml.safe_dump(config, sort_keys=False)


def render_from_files(models_config: Path, providers_config: Path | None,
                      args: dict[str, Any] | None = None, *, inline: bool = False,
                      routing_config: Path | None = None) -> str:
    """Validate the catalog, then render; ``inline`` embeds the documents instead of naming the files."""
    catalog = load_catalog(models_config, providers_config)
    args = dict(args or {})
    if inline:
        args = {k: v for k, v in args.items() if not k.endswith("_config")}
        args["models"] = yaml.safe_load(models_config.read_text())
        if providers_config and providers_config.exists():
            args["providers"] = yaml.safe_load(providers_config.read_text())
        if routing_config and routing_config.exists():
            args["routing"] = yaml.safe_load(routing_config.read_text())
    return render_yaml(base_config(args), catalog)


def model_app_name(spec: ModelSpec) -> str:
    """The Serve application of one local model (also what the ingress's handles name)."""
    return MODEL_APP_PREFIX + spec.app_slug
