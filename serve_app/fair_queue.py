"""Who goes next: the one ordering every IIR queue uses (the ingress's admission gates and a local
engine's run slots).

1. Higher key priority first.
2. Within one priority, keys take turns (fair share): start-time fair queuing with a unit cost per
   request. A key's next request is tagged ``max(V, F_key)``, where ``V`` is the tag last served at that
   priority and ``F_key`` is one past the key's previous tag. So a key with 50 requests queued holds
   tags V..V+49, and a key arriving now is tagged V: it is served second, not 51st.
3. Within one key, arrival order.

``Turn`` is what a request carries for this: its priority, its key (``tenant``) and its priority class
(``rank`` and ``label``, from ``scheduling.classes`` in models.yaml). Classes decide preemption, load
shedding budgets and metric labels; raw priorities decide order.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Turn:
    """A request's place in line: it crosses the Serve hop to the model replica with the request."""

    priority: int = 0
    tenant: str = ""  # the API key's id: fair share is per key
    rank: int = 0  # the priority class's rank, 0 the lowest; a higher rank may preempt a lower one
    label: str = "default"  # the priority class's name, for metrics
    max_wait_s: float | None = None  # the class's budget for waiting in one queue; None: no limit


NO_TURN = Turn()


@dataclass(frozen=True, slots=True)
class GateLimits:
    """An admission gate's room (serve_app/ingress/admission.py)."""

    capacity: int  # requests let through at once
    burst: int = 0  # extra room for a request that outranks one in flight (its engine preempts)


class Entry(Generic[T]):
    """One waiter in a ``FairQueue``; ``remove`` takes it out (lazily: ``pop`` skips it)."""

    __slots__ = ("alive", "item", "order", "turn")

    def __init__(self, order: tuple[int, int, int], turn: Turn, item: T) -> None:
        self.order = order
        self.turn = turn
        self.item = item
        self.alive = True

    def __lt__(self, other: Entry[T]) -> bool:
        return self.order < other.order


class FairQueue(Generic[T]):
    """A priority queue in IIR's order (module docstring). Push and pop are O(log n)."""

    _PRUNE_AT = 4096  # tenants' finish tags kept before the caught-up ones are forgotten

    def __init__(self) -> None:
        self._heap: list[Entry[T]] = []
        self._arrivals = itertools.count()
        self._served: dict[int, int] = {}  # priority → V, the start tag last served
        self._finish: dict[tuple[int, str], int] = {}  # (priority, tenant) → F_key
        self._live = 0

    def __len__(self) -> int:
        return self._live

    def push(self, turn: Turn, item: T, *, first: bool = False) -> Entry[T]:
        """``first``: ahead of every waiter of its priority (a preempted request resuming its turn)."""
        if first:
            start = -1  # tags start at 0
        else:
            served = self._served.get(turn.priority, 0)
            start = max(served, self._finish.get((turn.priority, turn.tenant), 0))
            self._finish[(turn.priority, turn.tenant)] = start + 1
        entry = Entry((-turn.priority, start, next(self._arrivals)), turn, item)
        heapq.heappush(self._heap, entry)
        self._live += 1
        return entry

    def remove(self, entry: Entry[T]) -> None:
        if entry.alive:
            entry.alive = False
            self._live -= 1

    def peek(self) -> Entry[T] | None:
        while self._heap and not self._heap[0].alive:
            heapq.heappop(self._heap)
        return self._heap[0] if self._heap else None

    def pop(self) -> Entry[T] | None:
        entry = self.peek()
        if entry is None:
            return None
        heapq.heappop(self._heap)
        entry.alive = False
        self._live -= 1
        priority, start = -entry.order[0], entry.order[1]
        self._served[priority] = max(self._served.get(priority, 0), start)
        if len(self._finish) > self._PRUNE_AT:
            self._finish = {k: f for k, f in self._finish.items() if f > self._served.get(k[0], 0)}
        return entry

    def __iter__(self) -> Iterator[Entry[T]]:
        """The live waiters, in no particular order."""
        return (e for e in self._heap if e.alive)
