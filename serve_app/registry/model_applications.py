"""``ServeReplicas``: each local model of the registry runs as its own Serve application.

    iir             Ingress, Auth, SemanticCache, Registry  ← serve deploy serve_config.yaml (declarative)
    iir-model-<m>   ModelReplica for model <m>              ← created, updated, deleted by the Registry

Why separate applications: the Registry can add, change and drain a model without redeploying the
``iir`` application (its ingress keeps serving), and Serve keeps applications created through its
Python API when a config is applied with ``serve deploy`` (it deletes only applications that came
from an earlier config), so a control-plane redeploy never restarts model replicas. Each model
application has no route prefix: only the ingress reaches it, through a handle.

Each deployment carries the registry's ``ray_actor_options`` (``num_cpus``, ``num_gpus``,
``accelerator_type``), ``max_ongoing_requests`` and ``autoscaling_config``, so Ray places replicas on
nodes that have what the model needs and Serve scales them between the registry's bounds.

A model whose deploy call fails is reported ``unavailable`` with the error and retried on the next
refresh; the other models are deployed all the same. A model application deleted behind the
registry's back (``serve delete``) reads ``unavailable`` with that reason until a refresh deploys it
again: the registry does not fight an operator. Applications of models that left the registry are
deleted by ``drain_removed``, which the registry calls after publishing the snapshot without them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ray import serve
from ray.serve import Application

from serve_app.registry.catalog import ModelSpec
from serve_app.registry.hardware import NodeInfo, discover_nodes
from serve_app.registry.model_registry import ReplicaState
from serve_app.registry.render import MODEL_APP_PREFIX as APP_PREFIX
from serve_app.registry.render import model_app_name

logger = logging.getLogger(__name__)


class ServeReplicas:
    def __init__(self, build: Callable[[ModelSpec], Application]) -> None:
        self._build = build
        self._deployed: dict[str, ModelSpec] = {}  # what this manager (or its predecessor) deployed
        self._wanted: dict[str, ModelSpec] = {}
        self._failed: dict[str, str] = {}  # model id → why its last deploy call failed
        self._leaving: list[str] = []  # applications to delete once the registry has published

    def adopt(self, specs: Mapping[str, ModelSpec]) -> None:
        """After a Registry restart: the specs its predecessor deployed (from the DB copy), so unchanged
        models are left running instead of being redeployed."""
        self._deployed = dict(specs)

    async def nodes(self) -> list[NodeInfo]:
        return await asyncio.to_thread(discover_nodes)

    async def apply(self, wanted: Mapping[str, ModelSpec]) -> dict[str, ReplicaState]:
        # One serve.status() per refresh: inside a replica it costs ~100 ms on a busy 2-core node.
        status = await asyncio.to_thread(serve.status)
        existing = {name for name in status.applications if name.startswith(APP_PREFIX)}
        self._wanted = dict(wanted)
        self._failed = {k: v for k, v in self._failed.items() if k in wanted}
        deployed_now = set()
        for model_id, spec in wanted.items():
            name = model_app_name(spec)
            if name in existing and self._deployed.get(model_id) == spec:
                continue
            logger.info("deploying %s as application %s (%s)", model_id, name,
                        "update" if name in existing else "new")
            try:
                await asyncio.to_thread(self._deploy, name, spec)
            except Exception as exc:  # this model only: the others deploy and the snapshot goes out
                logger.warning("deploying %s failed", model_id, exc_info=True)
                self._failed[model_id] = f"deploy failed: {type(exc).__name__}: {exc}"[:500]
                continue
            self._failed.pop(model_id, None)
            self._deployed[model_id] = spec
            deployed_now.add(model_id)
        keep = {model_app_name(s) for s in wanted.values()}
        self._leaving = sorted(existing - keep)
        self._deployed = {k: v for k, v in self._deployed.items() if k in wanted}
        return {model_id: ReplicaState(status="loading") if model_id in deployed_now
                else self._state(model_id, spec, status.applications)
                for model_id, spec in wanted.items()}

    async def drain_removed(self) -> None:
        """Delete the applications of models the last ``apply`` no longer wanted (Serve drains them)."""
        leaving, self._leaving = self._leaving, []
        for name in leaving:
            logger.info("draining application %s: its model left the registry", name)
            try:
                await asyncio.to_thread(serve.delete, name, _blocking=False)
            except Exception:  # still listed by serve.status(): the next refresh tries again
                logger.warning("deleting application %s failed", name, exc_info=True)

    async def states(self) -> dict[str, ReplicaState]:
        status = await asyncio.to_thread(serve.status)
        return {model_id: self._state(model_id, spec, status.applications)
                for model_id, spec in self._wanted.items()}

    def _state(self, model_id: str, spec: ModelSpec, applications: Mapping[str, Any]) -> ReplicaState:
        if model_id in self._failed:
            return ReplicaState(status="unavailable", message=self._failed[model_id])
        name = model_app_name(spec)
        if name not in applications and self._deployed.get(model_id) == spec:
            # Deployed, then deleted outside the registry (`serve delete`): the operator's act stands,
            # and says so, rather than "loading" forever; a refresh deploys it again.
            return ReplicaState(status="unavailable", message=f"application {name} was deleted outside the "
                                "registry; POST /v1/registry/refresh deploys it again")
        return _state(spec, applications.get(name))

    def _deploy(self, name: str, spec: ModelSpec) -> None:
        # serve._run with _blocking=False returns once Serve has the application, without waiting for
        # its replicas: the watch loop follows them, and a model that loads for minutes blocks nothing.
        serve._run(self._build(spec), _blocking=False, name=name, route_prefix=None)


def _state(spec: ModelSpec, app: Any) -> ReplicaState:
    """Serve's view of a model application → the registry's status."""
    if app is None:
        return ReplicaState(status="loading", message="application not created yet")
    deployment = app.deployments.get(spec.deployment_name)
    running = sum(n for state, n in deployment.replica_states.items() if _name(state) == "RUNNING") \
        if deployment else 0
    failed = _name(app.status) in ("DEPLOY_FAILED", "UNHEALTHY") or (
        deployment is not None and _name(deployment.status) in ("DEPLOY_FAILED", "UNHEALTHY"))
    if failed and running == 0:
        message = (deployment.message if deployment and deployment.message else app.message)
        return ReplicaState(status="unavailable", message=(message or _name(app.status))[:500])
    if running > 0:
        return ReplicaState(status="available", running=running)
    if spec.autoscaling.min_replicas == 0 and _name(app.status) == "RUNNING":
        return ReplicaState(status="available", running=0)  # scaled to zero: the router wakes it
    # Serve says why a replica is not up yet, e.g. "taken more than 30s to be scheduled ... Resources
    # required for each replica: ...": the reason an operator needs when a model stays loading.
    return ReplicaState(status="loading", running=0, message=(deployment.message if deployment else "")[:500])


def _name(value: Any) -> str:
    """Serve's status enums are ``str`` enums; compare by value whatever ``str()`` makes of them."""
    return str(getattr(value, "value", value))
