"""A local engine's run slots, handed out in IIR's order (serve_app/fair_queue.py), with preemption.

llama.cpp runs one generation at a time per ``Llama``. Requests queue here, inside the model replica,
where their ``Turn`` (key priority, key, priority class) arrived with them, so a high-priority request
is next no matter how many low-priority ones reached the replica first.

Ordering alone still leaves a high-priority request waiting for the generation in progress (half a
generation on average: p50 ≈ 1.5× its unloaded latency). So a waiter whose class outranks a running
request's asks it to yield (``Slot.yield_now``): the engine stops that generation at its next token or
prompt chunk, gives the slot back, and queues it again ahead of its peers (``acquire(...,
resuming=True)``); it goes on from the tokens it had (vLLM's "recompute" preemption).

**Linger.** Resuming is not free: on this CPU re-reading a prompt costs ~6 ms a token. A client that
sends its next high-priority request as soon as the last one answers leaves the slot free for the few
milliseconds its request takes to come back; a lower class started in that gap would be preempted again
at once, each time paying a resume. So for ``linger_s`` after a slot held by a higher class is given
back, only that class or higher may take it.

**Budget.** A waiter with ``Turn.max_wait_s`` (its class's budget) waits here at most that long in all
(``waited_s`` carries what earlier waits of the same call used): a lower class that higher ones keep
preempting is refused (503 ``overloaded``) rather than held indefinitely.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field

from serve_app import metrics
from serve_app.errors import ServiceUnavailable
from serve_app.fair_queue import FairQueue, Turn

LINGER_S = 0.05  # longer than a client's turnaround through the gateway here (5–30 ms)


@dataclass(eq=False)
class Slot:
    turn: Turn
    # False for a request that cannot resume (a grammar-constrained one): never asked to yield.
    preemptible: bool = True
    # Set (from the event loop) when a higher class waits; read by the worker thread at each token.
    yield_now: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Waiter:
    grant: asyncio.Future[Slot]
    preemptible: bool


class RunSlots:
    def __init__(self, slots: int = 1, *, preempt: bool = True, model: str = "",
                 linger_s: float = LINGER_S) -> None:
        self._free = slots
        self._preempt = preempt
        self._model = model
        self._linger_s = linger_s if preempt else 0.0
        self._reserved_for = -1  # while lingering: the lowest class rank that may start
        self._reserved_until = 0.0
        self._running: list[Slot] = []
        self._waiting: FairQueue[_Waiter] = FairQueue()
        self._depth: dict[str, int] = {}  # priority class → waiting here

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    async def acquire(self, turn: Turn, *, resuming: bool = False, preemptible: bool = True,
                      waited_s: float = 0.0) -> Slot:
        """Wait for a slot (in order); ``release`` it exactly once. ``resuming``: a preempted request
        coming back, ahead of its peers; ``waited_s``: what this call already waited here."""
        if self._free > 0 and not len(self._waiting) and self._may_start(turn):
            return self._start(turn, preemptible)
        waiter = _Waiter(asyncio.get_running_loop().create_future(), preemptible)
        entry = self._waiting.push(turn, waiter, first=resuming)
        self._count(turn, +1)
        self._wake()  # a slot may be free for this class (lingering for it)
        if not waiter.grant.done():
            self._ask_to_yield(turn)
        started = time.perf_counter()
        budget_s = turn.max_wait_s - waited_s if turn.max_wait_s is not None else None
        try:
            async with asyncio.timeout(budget_s):
                slot = await asyncio.shield(waiter.grant)
        except TimeoutError:
            if waiter.grant.done():  # granted at the last moment: take it
                slot = waiter.grant.result()
            else:
                self._waiting.remove(entry)
                waiter.grant.cancel()
                metrics.SHED.inc(model=self._model, priority_class=turn.label, reason="engine_deadline")
                raise ServiceUnavailable(
                    f"model '{self._model}' is overloaded: higher-priority requests kept it busy for "
                    f"this {turn.label}-priority request's {turn.max_wait_s:g} s; retry later",
                    param="model", code="overloaded",
                    headers={"Retry-After": str(math.ceil(turn.max_wait_s or 1))}) from None
        except asyncio.CancelledError:
            self._waiting.remove(entry)
            if waiter.grant.done() and not waiter.grant.cancelled():
                self.release(waiter.grant.result())  # granted just as the caller left: pass it on
            else:
                waiter.grant.cancel()
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
        best = self._waiting.peek()
        if self._linger_s and best is not None and best.turn.rank < slot.turn.rank:
            loop = asyncio.get_running_loop()
            until = loop.time() + self._linger_s
            self._reserved_for, self._reserved_until = slot.turn.rank, until
            loop.call_later(self._linger_s, self._end_linger, until)
        self._wake()

    def _end_linger(self, until: float) -> None:
        # Ends the reservation by itself rather than by comparing clocks: asyncio may run a timer up to
        # its clock resolution early, and a _wake() that still saw the reservation would leave the
        # waiter stranded until some other request came or went.
        if self._reserved_until == until:
            self._reserved_for, self._reserved_until = -1, 0.0
        self._wake()

    def _may_start(self, turn: Turn) -> bool:
        if turn.rank >= self._reserved_for:
            return True
        return asyncio.get_running_loop().time() >= self._reserved_until

    def _wake(self) -> None:
        while self._free > 0 and (entry := self._waiting.peek()) is not None:
            if not self._may_start(entry.turn):
                return  # lingering for a higher class; _end_linger wakes us after
            self._waiting.pop()
            if not entry.item.grant.done():
                entry.item.grant.set_result(self._start(entry.turn, entry.item.preemptible))

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
