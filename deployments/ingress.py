"""``Ingress``: the HTTP entry point. Serves the FastAPI app from ``serve_app.api.app.create_app``.

Hot path: key from the local cache (``Auth`` only on a miss), ``Classifier`` only for ``auto``, then
one hop to a ``ModelReplica`` — or none for a remote model, called from this process.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve_app.api.app import create_app
from serve_app.catalog import Catalog
from serve_app.gateway import Gateway, build_gateway
from serve_app.handles import HandleClient, ReplicaEngine
from serve_app.settings import Settings


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, settings: Settings, catalog: Catalog, auth: DeploymentHandle,
                 classifier: DeploymentHandle, models: dict[str, DeploymentHandle]) -> None:
        auth_client = HandleClient(auth)
        self._gateway: Gateway = build_gateway(
            settings, catalog, verifier=auth_client, key_admin=auth_client,  # type: ignore[arg-type]
            classifier=HandleClient(classifier),  # type: ignore[arg-type]
            local_engines={model_id: ReplicaEngine(h) for model_id, h in models.items()},
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self._gateway)
