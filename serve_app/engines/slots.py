"""A local engine's run slots, handed out in IIR's order (serve_app/fair_queue.py), with preemption.

llama.cpp runs one generation at a time per ``Llama``. Requests queue here, inside the model replica,
where their ``Turn`` (key priority, key, priority class) arrived with them, so a high-priority request
is next no matter how many low-priority ones reached the replica first.

Ordering alone still leaves a high-priority request waiting for the generation in progress (half a
generation on average: p50 ≈ 1.5× its unloaded latency). So a waiter whose class outranks a running
request's asks it to yield (``Slot.yield_now``): the engine stops that generation at the next token,
gives the slot back, and queues it again ahead of its peers (``acquire(..., resuming=True)``); it goes
on from the tokens it had (vLLM's "recompute" preemption, on CPU: re-reading prompt and tokens so far
is one batched evaluation, far cheaper than generating them).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

from serve_app import metrics
from serve_app.fair_queue import FairQueue, Turn


@dataclass(eq=False)
class Slot:
    turn: Turn
    # False for a request that cannot resume (a grammar-constrained one): never asked to yield.
    preemptible: bool = True
    # Set (from the event loop) when a higher class waits; read by the worker thread at each token.
    yield_now: threading.Event = field(default_factory=threading.Event)


class RunSlots:
    def __init__(self, slots: int = 1, *, preempt: bool = True, model: str = "") -> None:
        self._free = slots
        self._preempt = preempt
        self._model = model
        self._running: list[Slot] = []
        self._waiting: FairQueue[tuple[asyncio.Future[Slot], bool]] = FairQueue()  # (grant, preemptible)
        self._depth: dict[str, int] = {}  # priority class → waiting here

    @property
    def running(self) -> list[Slot]:
        return list(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, turn: Turn, *, resuming: bool = False, preemptible: bool = True) -> Slot:
        """Wait for a slot (in order); ``release`` it exactly once. ``resuming``: a preempted request
        coming back, ahead of its peers."""
        if self._free > 0 and not len(self._waiting):
            return self._start(turn, preemptible)
        future: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        entry = self._waiting.push(turn, (future, preemptible), first=resuming)
        self._count(turn, +1)
        self._ask_to_yield(turn)
        started = time.perf_counter()
        try:
            slot = await future
        except asyncio.CancelledError:
            self._waiting.remove(entry)
            if future.done() and not future.cancelled():
                self.release(future.result())  # granted just as the caller left: pass it on
            raise
        finally:
            self._count(turn, -1)
        metrics.QUEUE_WAIT.observe(time.perf_counter() - started, model=self._model,
                                   priority_class=turn.label, where="engine")
        return slot

    def release(self, slot: Slot) -> None:
        if slot not in self._running:
            return
        self._running.remove(slot)
        self._free += 1
        while self._free > 0 and (entry := self._waiting.pop()) is not None:
            future, preemptible = entry.item
            if not future.done():
                future.set_result(self._start(entry.turn, preemptible))

    def _start(self, turn: Turn, preemptible: bool) -> Slot:
        self._free -= 1
        slot = Slot(turn, preemptible)
        self._running.append(slot)
        return slot

    def _ask_to_yield(self, turn: Turn) -> None:
        """The lowest-class running request below ``turn``'s class, not already asked, yields."""
        if not self._preempt:
            return
        candidates = [s for s in self._running
                      if s.preemptible and s.turn.rank < turn.rank and not s.yield_now.is_set()]
        if candidates:
            victim = min(candidates, key=lambda s: s.turn.rank)
            victim.yield_now.set()
            metrics.PREEMPTIONS.inc(model=self._model, priority_class=victim.turn.label)

    def _count(self, turn: Turn, delta: int) -> None:
        depth = self._depth[turn.label] = self._depth.get(turn.label, 0) + delta
        metrics.QUEUED.set(depth, model=self._model, priority_class=turn.label, where="engine")
