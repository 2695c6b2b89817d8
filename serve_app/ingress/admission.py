"""Priority admission for local models: when a model's replicas are full, waiting requests are let in
by their API key's ``priority`` (higher first; equal priorities in arrival order).

Capacity, per ingress replica, is what the model's replicas take at once: ``max_ongoing_requests``
× running replicas (at least 1, so a model waking from zero admits its first requests). Past it,
Serve would queue requests first-come-first-served inside its handle; IIR queues them here instead,
where the key is known. A request waits at most ``IIR_QUEUE_TIMEOUT_S``, then gets 503
``model_busy`` with ``Retry-After``. Remote models are not gated (their capacity is the provider's).

With several ingress replicas each orders its own queue; a model's replicas can then see up to
(ingress replicas × capacity) requests, and Serve queues the surplus in arrival order. Autoscaling
still sees the load: a full model runs at ``max_ongoing_requests`` per replica, above any
``target_ongoing_requests``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app import metrics
from serve_app.errors import ServiceUnavailable

Release = Callable[[], None]


@dataclass
class _Gate:
    in_flight: int = 0
    waiting: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)  # a heap


class Admission:
    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._gates: dict[str, _Gate] = {}
        self._order = itertools.count()
        self._queued: dict[int, int] = {}  # priority → requests waiting, over all models

    def queued(self, model_id: str) -> int:
        gate = self._gates.get(model_id)
        return sum(1 for *_, f in gate.waiting if not f.done()) if gate else 0

    async def enter(self, model_id: str, capacity: int, priority: int) -> Release:
        """Wait for a slot; the returned function gives it back (call it exactly once)."""
        gate = self._gates.setdefault(model_id, _Gate())
        if gate.in_flight < capacity and not any(not f.done() for *_, f in gate.waiting):
            gate.in_flight += 1
            return self._release_for(gate, capacity)
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(gate.waiting, (-priority, next(self._order), ticket))
        self._count_queued(priority, +1)
        try:
            await asyncio.wait_for(asyncio.shield(ticket), self._timeout_s)
        except TimeoutError:
            if not ticket.done():
                ticket.cancel()  # _wake skips it
                raise ServiceUnavailable(
                    f"model '{model_id}' is busy: all its replicas are serving requests; retry shortly",
                    param="model", code="model_busy", headers={"Retry-After": "1"}) from None
        except asyncio.CancelledError:  # the client left while waiting
            if ticket.done() and not ticket.cancelled():
                self._release_for(gate, capacity)()  # it was let in just now: pass the slot on
            else:
                ticket.cancel()
            raise
        finally:
            self._count_queued(priority, -1)
        return self._release_for(gate, capacity)

    def _release_for(self, gate: _Gate, capacity: int) -> Release:
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            gate.in_flight -= 1
            self._wake(gate, capacity)

        return release

    @staticmethod
    def _wake(gate: _Gate, capacity: int) -> None:
        while gate.waiting and gate.in_flight < capacity:
            *_, ticket = heapq.heappop(gate.waiting)
            if ticket.done():
                continue  # timed out or abandoned
            gate.in_flight += 1
            ticket.set_result(None)

    def _count_queued(self, priority: int, delta: int) -> None:
        self._queued[priority] = self._queued.get(priority, 0) + delta
        metrics.QUEUED.set(self._queued[priority], priority=str(priority))
