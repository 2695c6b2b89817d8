"""Admission gates: where requests wait, by key priority, for room on a full model, and where they are
refused at once when waiting would take longer than their priority class allows.

A gate fronts a local model (capacity: what its engines run at once, × running replicas) or, when
configured, a remote model or provider (``max_concurrency``). Waiters go in IIR's order
(serve_app/fair_queue.py: priority, then fair share between keys, then arrival).

Three rules (docs/ARCHITECTURE.md, "Priority under overload"):

1. **Capacity follows the engine.** A llama.cpp replica runs one generation at a time, so the gate lets
   one request per replica through: the rest wait here, in order, instead of in the replica.
2. **Burst for preemption.** A request whose class outranks one in flight may go past the capacity (up
   to ``capacity + burst``: the replicas' ``max_ongoing_requests``): the engine's own queue puts it first
   and pauses the lower one (serve_app/engines/slots.py), so it never waits for a low-priority
   generation to end.
3. **Shedding.** A request whose estimated wait (requests ahead of it × the time each holds the gate ÷
   capacity; ``_Gate.estimate_s``) passes its class's ``max_wait_s`` gets 503 ``overloaded`` with
   ``Retry-After`` at once.
   When a higher-priority request joins, lower ones behind it whose estimate now passes their budget
   are refused the same way ("pushed out"), and one still waiting when its budget runs out is refused
   then ("deadline"). The estimate counts the share of the gate that higher classes took lately: a
   stream of high-priority requests passing through the burst room leaves lower ones little.
   Budgets never shrink with rank (config validation), so a higher priority is never shed while a
   lower one waits. A wait past ``IIR_QUEUE_TIMEOUT_S`` is the backstop: 503 ``model_busy``.

Why 503 and not 429: 429 says the caller exceeded its own quota (rate limits, docs/API.md); here the
server is full. Both carry ``Retry-After`` (and ``retry-after-ms``), which the official SDKs honour.

With several ingress replicas each keeps its own gates; a model's replicas then see up to (ingress
replicas × capacity) requests, and the engine's queue orders them the same way.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from serve_app import metrics
from serve_app.errors import ServiceUnavailable
from serve_app.fair_queue import Entry, FairQueue, GateLimits, Turn

Release = Callable[[], None]
_EWMA = 0.2  # weight of the newest hold time in the gate's average
_BUSY_WINDOW_S = 10.0  # time constant of each class's measured share of the gate
_MIN_SHARE = 0.05  # what a class is assumed to keep of a gate that higher classes fill


@dataclass(eq=False)
class _Waiter:
    future: asyncio.Future[None]
    max_wait_s: float | None
    queued_at: float = field(default_factory=time.perf_counter)


class _Gate:
    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self.ranks: Counter[int] = Counter()  # class rank → requests in flight
        self.priorities: Counter[int] = Counter()  # key priority → requests in flight
        self.waiting: FairQueue[_Waiter] = FairQueue()
        self.hold_s: dict[int, float] = {}  # class rank → moving average of admission → release
        self.busy: dict[int, tuple[float, float]] = {}  # class rank → (decayed held seconds, as of)
        self.created = time.monotonic()
        self.depth: Counter[str] = Counter()  # class label → waiting

    def can_enter(self, turn: Turn, limits: GateLimits) -> bool:
        if self.in_flight < limits.capacity:
            return True
        lowest = min((r for r, n in self.ranks.items() if n > 0), default=turn.rank)
        return self.in_flight < limits.capacity + limits.burst and turn.rank > lowest

    def estimate_s(self, entry: Entry[_Waiter], limits: GateLimits) -> float:
        """How long ``entry`` will wait: the requests ahead of it, served ``capacity`` at a time, on
        the share of the gate that higher classes have recently left over (a stream of high-priority
        requests that never queue here still takes the slots)."""
        if not self.hold_s:
            return 0.0  # nothing measured yet: never shed on a guess
        priority = entry.turn.priority
        # With burst room the engine preempts lower classes, so only requests at or above count.
        in_flight = (sum(n for p, n in self.priorities.items() if p >= priority) if limits.burst
                     else self.in_flight)
        queued = sum(1 for w in self.waiting if w.order < entry.order)
        ahead = max(0, in_flight + queued - limits.capacity + 1)
        # Time per request ahead: what this class's requests have held the gate lately (pauses for
        # higher classes included), or, when higher classes took more of it since, the quickest
        # class's hold (a request's own work, unpaused) stretched by the share they left.
        left = max(_MIN_SHARE, 1.0 - self.share_above(entry.turn.rank, limits))
        per_request_s = max(self.hold_s.get(entry.turn.rank, 0.0), min(self.hold_s.values()) / left)
        return ahead * per_request_s / limits.capacity

    def take(self, turn: Turn, waited_s: float) -> None:
        self.in_flight += 1
        self.ranks[turn.rank] += 1
        self.priorities[turn.priority] += 1
        metrics.QUEUE_WAIT.observe(waited_s, model=self.name, priority_class=turn.label, where="ingress")

    def give_back(self, turn: Turn, held_s: float) -> None:
        self.in_flight -= 1
        self.ranks[turn.rank] -= 1
        self.priorities[turn.priority] -= 1
        old = self.hold_s.get(turn.rank)
        self.hold_s[turn.rank] = held_s if old is None else old + _EWMA * (held_s - old)
        self._add_busy(turn.rank, held_s)

    def _add_busy(self, rank: int, seconds: float) -> None:
        now = time.monotonic()
        total, since = self.busy.get(rank, (0.0, now))
        self.busy[rank] = (total * math.exp((since - now) / _BUSY_WINDOW_S) + seconds, now)

    def share_above(self, rank: int, limits: GateLimits) -> float:
        """The fraction of the gate's slots that classes above ``rank`` held lately."""
        now = time.monotonic()
        held = sum(total * math.exp((since - now) / _BUSY_WINDOW_S)
                   for r, (total, since) in self.busy.items() if r > rank)
        # The same decay applied to the time the gate has existed: a new gate is not "mostly idle".
        seen = _BUSY_WINDOW_S * -math.expm1((self.created - now) / _BUSY_WINDOW_S)
        return min(1.0, held / (max(seen, 1e-3) * limits.capacity))


class Admission:
    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._gates: dict[str, _Gate] = {}

    def queued(self, gate: str) -> int:
        found = self._gates.get(gate)
        return len(found.waiting) if found else 0

    async def enter(self, gate_name: str, limits: GateLimits, turn: Turn) -> Release:
        """Wait for room (or be refused past ``turn.max_wait_s``, its class's budget); the returned
        function gives it back (call it once)."""
        gate = self._gates.get(gate_name) or self._gates.setdefault(gate_name, _Gate(gate_name))
        if not len(gate.waiting) and gate.can_enter(turn, limits):
            gate.take(turn, waited_s=0.0)
            return self._release_for(gate, turn, limits, time.perf_counter())
        waiter = _Waiter(asyncio.get_running_loop().create_future(), turn.max_wait_s)
        entry = gate.waiting.push(turn, waiter)
        self._wake(gate, limits)  # it may outrank everything in flight (burst)
        if not waiter.future.done():
            if (refusal := self._over_budget(gate, entry, limits)) is not None:
                gate.waiting.remove(entry)
                self._shed(gate, turn, "budget")
                raise refusal
            self._push_out_lower(gate, entry, limits)
        return await self._wait(gate, entry, limits)

    async def _wait(self, gate: _Gate, entry: Entry[_Waiter], limits: GateLimits) -> Release:
        turn, waiter = entry.turn, entry.item
        # A class never waits past its budget, even when the line moved slower than estimated.
        limit_s = min(self._timeout_s, waiter.max_wait_s or self._timeout_s)
        self._count(gate, turn, +1)
        try:
            async with asyncio.timeout(limit_s):
                await asyncio.shield(waiter.future)
        except TimeoutError:
            if not waiter.future.done():
                estimate_s = gate.estimate_s(entry, limits)
                gate.waiting.remove(entry)
                waiter.future.cancel()
                if limit_s < self._timeout_s:
                    self._shed(gate, turn, "deadline")
                    raise ServiceUnavailable(
                        f"model '{gate.name}' is overloaded: a {turn.label}-priority request waited "
                        f"{limit_s:g} s, this class's limit; retry later", param="model",
                        code="overloaded", headers=_retry_after(estimate_s)) from None
                self._shed(gate, turn, "timeout")
                raise ServiceUnavailable(
                    f"model '{gate.name}' is busy: all its replicas are serving requests; retry shortly",
                    param="model", code="model_busy", headers=_retry_after(1.0)) from None
        except asyncio.CancelledError:  # the client left while waiting
            gate.waiting.remove(entry)
            if waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self._release_for(gate, turn, limits, time.perf_counter())()  # let in just now: pass it on
            else:
                waiter.future.cancel()
            raise
        finally:
            self._count(gate, turn, -1)
        if (error := waiter.future.exception()) is not None:
            raise error  # pushed out by a higher priority
        return self._release_for(gate, turn, limits, time.perf_counter())

    def _release_for(self, gate: _Gate, turn: Turn, limits: GateLimits, since: float) -> Release:
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            gate.give_back(turn, held_s=time.perf_counter() - since)
            self._wake(gate, limits)

        return release

    def _wake(self, gate: _Gate, limits: GateLimits) -> None:
        while (entry := gate.waiting.peek()) is not None and gate.can_enter(entry.turn, limits):
            gate.waiting.pop()
            if entry.item.future.done():
                continue
            gate.take(entry.turn, waited_s=time.perf_counter() - entry.item.queued_at)
            entry.item.future.set_result(None)

    def _over_budget(self, gate: _Gate, entry: Entry[_Waiter], limits: GateLimits
                     ) -> ServiceUnavailable | None:
        budget = entry.item.max_wait_s
        if budget is None:
            return None
        wait_s = gate.estimate_s(entry, limits)
        if wait_s <= budget:
            return None
        return ServiceUnavailable(
            f"model '{gate.name}' is overloaded: the wait for a {entry.turn.label}-priority request "
            f"would be about {wait_s:.0f} s, over this class's {budget:g} s; retry later",
            param="model", code="overloaded", headers=_retry_after(wait_s - budget))

    def _push_out_lower(self, gate: _Gate, newcomer: Entry[_Waiter], limits: GateLimits) -> None:
        """A higher-priority request went ahead of lower ones: refuse those whose wait now passes their
        budget, from the back of the line."""
        lower = [e for e in gate.waiting if e.turn.priority < newcomer.turn.priority
                 and e.item.max_wait_s is not None]
        for entry in sorted(lower, key=lambda e: e.order, reverse=True):
            if (refusal := self._over_budget(gate, entry, limits)) is None:
                break  # the rest are ahead of this one: shorter waits
            gate.waiting.remove(entry)
            self._shed(gate, entry.turn, "pushed_out")
            entry.item.future.set_exception(refusal)

    @staticmethod
    def _shed(gate: _Gate, turn: Turn, reason: str) -> None:
        metrics.SHED.inc(model=gate.name, priority_class=turn.label, reason=reason)

    def _count(self, gate: _Gate, turn: Turn, delta: int) -> None:
        gate.depth[turn.label] += delta
        metrics.QUEUED.set(gate.depth[turn.label], model=gate.name, priority_class=turn.label,
                           where="ingress")


def _retry_after(seconds: float) -> dict[str, str]:
    seconds = max(1.0, seconds)
    return {"Retry-After": str(math.ceil(seconds)), "retry-after-ms": str(math.ceil(seconds * 1000))}
