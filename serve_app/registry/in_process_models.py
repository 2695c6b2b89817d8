"""``InProcessReplicas``: local models run as engines inside this process, with no Ray.

The registry's replica manager for the in-process app (tests of the HTTP layer, and tools that embed
the gateway). On Ray the manager is ``serve_app.registry.model_applications.ServeReplicas``; both
answer the same ``ReplicaManager`` protocol, so the registry code is one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from serve_app.engines.base import InferenceEngine
from serve_app.engines.factory import build_local_engine
from serve_app.registry.catalog import ModelSpec
from serve_app.registry.hardware import NodeInfo
from serve_app.registry.model_registry import ReplicaState

logger = logging.getLogger(__name__)


def this_machine() -> NodeInfo:
    return NodeInfo(node_id="local", address="127.0.0.1", num_cpus=float(os.cpu_count() or 1),
                    num_gpus=0.0, is_head=True)


class InProcessReplicas:
    def __init__(self, node: NodeInfo | None = None) -> None:
        self._node = node or this_machine()
        self._specs: dict[str, ModelSpec] = {}
        self._engines: dict[str, InferenceEngine] = {}
        self._loading: dict[str, asyncio.Task[InferenceEngine]] = {}
        self._failed: dict[str, str] = {}

    async def nodes(self) -> list[NodeInfo]:
        return [self._node]

    async def apply(self, wanted: Mapping[str, ModelSpec]) -> dict[str, ReplicaState]:
        for model_id in [m for m in self._specs if m not in wanted or wanted[m] != self._specs[m]]:
            await self._retire(model_id)
        for model_id, spec in wanted.items():
            if model_id not in self._specs:
                self._specs[model_id] = spec
                self._loading[model_id] = asyncio.create_task(asyncio.to_thread(build_local_engine, spec))
        return await self.states()

    async def states(self) -> dict[str, ReplicaState]:
        for model_id, task in list(self._loading.items()):
            if task.done():
                del self._loading[model_id]
                if task.exception() is not None:
                    self._failed[model_id] = f"engine failed to load: {task.exception()}"
                else:
                    self._engines[model_id] = task.result()
        states = {m: ReplicaState(status="available", running=1) for m in self._engines}
        states |= {m: ReplicaState(status="loading") for m in self._loading}
        states |= {m: ReplicaState(status="unavailable", message=why) for m, why in self._failed.items()}
        return states

    async def drain_removed(self) -> None:
        return None  # in-process, ``apply`` already retired the engines that left ``wanted``

    def engine(self, model_id: str) -> InferenceEngine | None:
        return self._engines.get(model_id)

    async def aclose(self) -> None:
        for model_id in list(self._specs):
            await self._retire(model_id)

    async def _retire(self, model_id: str) -> None:
        self._specs.pop(model_id, None)
        self._failed.pop(model_id, None)
        task = self._loading.pop(model_id, None)
        if task is not None:
            task.cancel()
        engine = self._engines.pop(model_id, None)
        if engine is not None:
            await engine.aclose()
