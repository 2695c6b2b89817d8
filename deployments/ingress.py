"""``Ingress``: the HTTP entry point. Serves the FastAPI app from ``serve_app.ingress.app.create_app``.

Hot path: key from the local cache (``Auth`` only on a miss), the prompt classifier in this process (on
its worker thread) only for ``auto``, ``SemanticCache`` only on an exact-cache miss of a request that
opted in, then one hop to a ``ModelReplica`` — or none for a remote model, called from this process.
Which models exist, and where their replicas live, comes from the ``Registry``'s snapshot, followed by
long poll.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.handles import HandleClient, ReplicaEngine
from serve_app.dataplane import behind_haproxy
from serve_app.engines.base import InferenceEngine
from serve_app.ingress.app import create_app
from serve_app.ingress.gateway import Gateway, build_gateway
from serve_app.registry.model_registry import RegistryEntry
from serve_app.registry.render import model_app_name
from serve_app.routing.classifier import RoutingPolicy
from serve_app.routing.in_process import InProcessClassifier
from serve_app.settings import Settings

logger = logging.getLogger(__name__)


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, settings: Settings, auth: DeploymentHandle, registry: DeploymentHandle,
                 semantic_cache: DeploymentHandle, policy: RoutingPolicy | None = None) -> None:
        auth_client = HandleClient(auth)
        # In this process, not behind a Serve hop (serve_app/routing/in_process.py says why). The model
        # loads on the classifier's worker thread while the replica starts.
        classifier = InProcessClassifier(settings.classifier_head, settings.cache_dir)
        classifier.start()
        # Either word counts: the builder's setting, or Ray's own switch in this replica's process.
        behind_proxy = settings.data_plane == "haproxy" or behind_haproxy()
        if behind_proxy and settings.proxy_token is None:
            logger.warning("behind HAProxy without IIR_PROXY_TOKEN: no client address is trusted; "
                           "create keys with `iir keys create` (docs/SETUP.md)")
        self._gateway: Gateway = build_gateway(
            settings, verifier=auth_client, key_admin=auth_client,  # type: ignore[arg-type]
            classifier=classifier,
            registry=HandleClient(registry),  # type: ignore[arg-type]
            local_engine=_model_handle, policy=policy,
            semantic=HandleClient(semantic_cache),  # type: ignore[arg-type]
            behind_proxy=behind_proxy,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._gateway)


def _model_handle(entry: RegistryEntry) -> InferenceEngine | None:
    """A handle made without asking the controller: that check is a blocking ``ray.get`` on this event
    loop and raises for an application Serve has not registered yet. If no handle can be made at all,
    ``None``: the router answers 503 for that model while the others are applied as usual."""
    try:
        handle = serve.get_deployment_handle(entry.spec.deployment_name, app_name=model_app_name(entry.spec),
                                             _check_exists=False)
    except Exception:
        logger.warning("no handle for %s; it answers 503 until the next snapshot", entry.id, exc_info=True)
        return None
    return ReplicaEngine(handle)
