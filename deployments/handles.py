"""Serve handles dressed as the plain objects they front, so the ingress code is the same in-process
and on Ray: ``await client.verify(key)`` instead of ``await handle.verify.remote(key)``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve_app.errors import IIRError, ServiceUnavailable
from serve_app.fair_queue import NO_TURN, Turn
from serve_app.schemas import EmbeddingRequest, GenerateRequest

# What Serve raises when the deployment is gone (deleted by a refresh), its replica died mid-call, or
# its queue is full: the caller gets a 503 to retry, not a 500.
HOP_FAILURES = (DeploymentUnavailableError, ActorDiedError, ActorUnavailableError, BackPressureError)


def _unwrap(exc: BaseException) -> BaseException:
    """Our own errors re-raised as themselves, so they keep their HTTP status across the hop; Serve's
    unavailability as a 503."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, IIRError):
        return cause
    if isinstance(exc, HOP_FAILURES):
        return ServiceUnavailable(f"the deployment is unavailable ({type(exc).__name__}); retry shortly",
                                  headers={"Retry-After": "1"}, reason="replica_unavailable")
    return exc


class HandleClient:
    """Awaitable method calls on a deployment: ``HandleClient(h).name(*args)``."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._handle = handle

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self._handle, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return await method.remote(*args, **kwargs)
            except (RayTaskError, *HOP_FAILURES) as exc:
                raise _unwrap(exc) from None

        return call


class ReplicaEngine:
    """A ``ModelReplica`` deployment seen as an ``InferenceEngine``: one Serve hop per call."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self._calls = HandleClient(handle)
        self._streaming = handle.options(stream=True)

    async def generate(self, request: GenerateRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        result: dict[str, Any] = await self._calls.generate(request, turn)
        return result

    async def stream(self, request: GenerateRequest, turn: Turn = NO_TURN) -> AsyncIterator[dict[str, Any]]:
        try:
            chunks = cast(DeploymentResponseGenerator, self._streaming.stream.remote(request, turn))
            async for chunk in chunks:
                yield chunk
        except (RayTaskError, *HOP_FAILURES) as exc:
            raise _unwrap(exc) from None

    async def embed(self, request: EmbeddingRequest, turn: Turn = NO_TURN) -> dict[str, Any]:
        result: dict[str, Any] = await self._calls.embed(request, turn)
        return result

    async def infer(self, payload: dict[str, Any], turn: Turn = NO_TURN) -> dict[str, Any]:
        result: dict[str, Any] = await self._calls.infer(payload, turn)
        return result

    async def check_health(self) -> None:
        await self._calls.check_health()

    async def aclose(self) -> None:
        return None
