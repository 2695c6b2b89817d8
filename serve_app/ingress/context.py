"""``RequestContext``: one request's state, created once and passed down.

The outermost middleware (``middleware.RequestContextMiddleware``) makes it when a request arrives and
hands it down the ASGI scope, as ASGI hands anything down; the dependencies and the pipeline fill in
their own fields (the key, the route, the cache result, the admission ticket, the meter); when the
last byte has left, the same middleware calls ``finish()`` and writes the access-log line and the
traffic metrics from it. Nothing per-request lives anywhere else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from serve_app import metrics
from serve_app.fair_queue import NO_TURN, Turn

if TYPE_CHECKING:
    from serve_app.auth.keystore import KeyInfo
    from serve_app.cache.exact import Found, Lookup
    from serve_app.ingress.admission import Release
    from serve_app.ingress.metering import Meter
    from serve_app.routing.health import ModelHealth
    from serve_app.routing.router import Decision, Route

UNCLASSIFIED = "unclassified"  # x-iir-category while the classifier is down and auto took the default


class InFlight:
    """Model requests in progress in this ingress replica, by key priority (the ``iir_in_flight`` gauge)."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def enter(self, priority: int) -> str:
        label = str(priority)
        self._counts[label] = self._counts.get(label, 0) + 1
        metrics.IN_FLIGHT.set(self._counts[label], priority=label)
        return label

    def leave(self, label: str) -> None:
        self._counts[label] -= 1
        metrics.IN_FLIGHT.set(self._counts[label], priority=label)


@dataclass(slots=True, eq=False)
class RequestContext:
    request_id: str
    started: float = field(default_factory=time.perf_counter)
    key: KeyInfo | None = None
    route: Route | None = None  # the attempt in progress, then the one that answered
    target: str = ""  # the model or group asked for (auto: the model it chose)
    attempts: int = 0
    turn: Turn = NO_TURN  # its place in the models' queues: key priority, key, priority class
    fallback: bool = False  # a fallback answered, not the target
    decision: Decision | None = None  # /v1/classify: what auto would do, no model called
    cache_lookup: Lookup | None = None
    cache: Found | None = None
    meter: Meter | None = None
    # Response headers the steps add (rate limits, x-iir-model, x-iir-cache, ...).
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # the reason label of the error that ended the request
    _release: Release | None = None  # the admission ticket, while held
    _group_release: Release | None = None  # a group's admission ticket: held across its attempts
    _occupied: ModelHealth | None = None  # the model this request is in flight on
    _in_flight: tuple[InFlight, str] | None = None

    def count_in_flight(self, gauge: InFlight, priority: int) -> None:
        self._in_flight = (gauge, gauge.enter(priority))

    def hold(self, release: Release) -> None:
        self._release = release

    def hold_group(self, release: Release) -> None:
        self._group_release = release

    def occupy(self, health: ModelHealth) -> None:
        """This request is now in flight on the model ``health`` follows (least-busy counts it)."""
        health.started()
        self._occupied = health

    def release_model(self) -> None:
        """Give the model slot back and leave its in-flight count (idempotent): after the model
        answered, after a failed attempt, or, failing those, when the request ends."""
        release, self._release = self._release, None
        if release is not None:
            release()
        occupied, self._occupied = self._occupied, None
        if occupied is not None:
            occupied.ended()

    def finish(self) -> None:
        """The response's last byte is sent, or the request failed or was abandoned."""
        self.release_model()
        group_release, self._group_release = self._group_release, None
        if group_release is not None:
            group_release()
        if self._in_flight is not None:
            gauge, label = self._in_flight
            self._in_flight = None
            gauge.leave(label)

    @property
    def model(self) -> str:
        """The model that served (or was last tried); before any attempt, what was asked for."""
        return self.route.spec.id if self.route is not None else self.target

    @property
    def category(self) -> str | None:
        decision = self.decision or (self.route.decision if self.route is not None else None)
        if decision is None:
            return None
        return decision.classification.category if decision.classification is not None else UNCLASSIFIED

    def log_fields(self) -> dict[str, Any]:
        """What the steps learned, for the access-log line (never the key itself)."""
        fields: dict[str, Any] = {}
        if self.key is not None:
            fields["key_id"] = self.key.id
        if self.route is not None:
            fields["model"] = self.route.spec.id
            if (category := self.category) is not None:
                fields["category"] = category
        if self.target and self.target != self.model:
            fields["target"] = self.target  # a group, or a model that fell back
        if self.attempts > 1:
            fields["attempts"] = self.attempts
        if self.cache is not None:
            found = self.cache
            fields["cache"] = found.outcome if found.match is None else f"{found.outcome}:{found.match}"
        if self.error is not None:
            fields["error"] = self.error
        return fields
