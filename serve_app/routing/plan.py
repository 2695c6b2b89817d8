"""Which models one request may try, in what order, and when it moves on (retries and fallbacks).

A request names a *target*: a model, a group (one public id served by several models), or ``auto``.
The plan walks *stages*: the target first, then, as failures call for them, its fallbacks:

    stage = one target's members, ordered by its group strategy (a plain model is a group of one)
    attempt = one call to one member; a member whose breaker is open is skipped (health.py)

    a retryable failure (connect, timeout, 429, 5xx; before the first streamed byte)
        → the next member of the stage, at once; the same member again only after a backoff
          (doubling from ``backoff_s``, or the upstream's Retry-After), while the stage has attempts
          left (``retries`` + 1) and the deadline allows the wait
        → then the target's ``fallbacks``, in order; for ``auto``, the category's next candidate
    context window exceeded → the target's (or the failing model's) ``context_window_fallbacks``
    content filtered        → ``content_policy_fallbacks`` (none by default)
    anything else           → the error, as it is (a bad request is not made better elsewhere)

Every wait and every attempt fits in the target's ``timeouts.total_s``; each attempt gets at most
``first_byte_s`` to its answer (or its stream's first chunk). A target is visited once per request, so
fallback lists that point at each other end.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from serve_app.errors import IIRError, InvalidRequest, RateLimited, ServiceUnavailable, UpstreamError
from serve_app.registry.catalog import Fallbacks, ModelGroup, ModelSpec, Resilience
from serve_app.routing.health import HealthBoard, ModelHealth, Severity

if TYPE_CHECKING:
    from serve_app.routing.router import Decision, Route

FailureKind = Literal["retry", "context_window", "content_policy", "final"]
# Upstreams word these their own way; OpenAI's codes first, then what vLLM and llama.cpp servers say.
_CONTEXT = re.compile(r"context[ _-]?(length|window)|maximum context|too many tokens|prompt is too long",
                      re.I)
_CONTENT = re.compile(r"content[ _-]?(filter|policy|management)|safety system", re.I)


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    severity: Severity = "soft"
    retry_after_s: float | None = None


def classify(exc: BaseException) -> Failure:
    """What a failed attempt means for the plan and for the model's breaker."""
    if isinstance(exc, TimeoutError):
        return Failure("retry", "hard")
    if not isinstance(exc, IIRError):
        return Failure("final")
    code = exc.code or ""
    if isinstance(exc, InvalidRequest):
        if code == "context_length_exceeded" or _CONTEXT.search(exc.message):
            return Failure("context_window")
        if code in ("content_filter", "content_policy_violation") or _CONTENT.search(exc.message):
            return Failure("content_policy")
        return Failure("final")
    if isinstance(exc, RateLimited):  # the upstream's 429 (our own limits are checked before any call)
        return Failure("retry", "hard", _seconds(exc.headers.get("Retry-After")))
    if isinstance(exc, UpstreamError):
        hard = code in ("upstream_unreachable", "upstream_timeout", "upstream_auth_failed",
                        "upstream_quota_exhausted")
        return Failure("retry", "hard" if hard else "soft", _seconds(exc.headers.get("Retry-After")))
    if isinstance(exc, ServiceUnavailable) and exc.reason in ("replica_unavailable", "model_unavailable",
                                                               "service_unavailable"):
        return Failure("retry", "soft", _seconds(exc.headers.get("Retry-After")))
    return Failure("final")


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # an HTTP date: rare from model APIs; the backoff applies instead


@dataclass
class Stage:
    target: str
    members: list[ModelSpec]
    rules: Fallbacks  # the target's fallbacks, retries and timeouts
    attempts: int = 0
    tried: list[str] = field(default_factory=list)
    unusable: set[str] = field(default_factory=set)  # members that cannot serve now (loading, ...)


@dataclass(frozen=True)
class Attempt:
    route: Route
    health: ModelHealth
    wait_s: float  # backoff to sleep before calling (0 for another member)
    timeout_s: float  # this attempt's budget to its first byte
    fallback: bool  # not the request's own target


class Plan:
    """One request's walk over its target and fallbacks; ``next()`` gives each attempt in turn."""

    def __init__(self, *, target: str, first: Stage, resilience: Resilience, health: HealthBoard,
                 stage_for: Callable[[str], Stage | None], route_for: Callable[[ModelSpec], Route],
                 more_for_auto: Callable[[set[str]], str | None] | None = None,
                 decision: Decision | None = None) -> None:
        self.target = target
        self.decision = decision
        self._resilience = resilience
        self._health = health
        self._stage_for = stage_for
        self._route_for = route_for
        self._more_for_auto = more_for_auto
        self._first = first
        self._stages: list[Stage] = [first]
        self._visited = {first.target}
        self._seen: set[str] = set()  # members looked at: for the Retry-After when all cool down
        timeouts = first.rules.timeouts
        self.deadline = time.monotonic() + (timeouts.total_s or resilience.timeouts.total_s or 600.0)
        self.attempts = 0
        self.last_failure: IIRError | None = None
        self._backoff_s = resilience.backoff_s

    def next(self, failed: Failure | None = None, error: IIRError | None = None) -> Attempt | None:
        """The next attempt, or None when nothing is left (the caller raises ``exhausted()``)."""
        if failed is not None:
            self.last_failure = error
            self._after(failed)
        while self._stages:
            attempt = self._in_stage(self._stages[0])
            if attempt is not None:
                self.attempts += 1
                return attempt
            self._stages.pop(0)
            if not self._stages and failed is not None and failed.kind == "retry":
                self._queue_auto_alternative()
        return None

    def exhausted(self) -> IIRError:
        """What the caller gets when no attempt is left: the last failure, or why none was made."""
        if self.last_failure is not None:
            return self.last_failure
        retry_in = min((self._health[m].breaker.retry_in() for m in self._seen), default=0.0)
        return ServiceUnavailable(
            f"every model that can serve '{self.target}' is cooling down after failures; retry shortly",
            param="model", code="model_cooling_down",
            headers={"Retry-After": str(max(1, round(retry_in + 0.5)))})

    # -- inside ------------------------------------------------------------------------------------

    def _in_stage(self, stage: Stage) -> Attempt | None:
        self._seen.update(m.id for m in stage.members)
        limit = (stage.rules.retries if stage.rules.retries is not None else self._resilience.retries) + 1
        remaining = self.deadline - time.monotonic()
        if stage.attempts >= limit or remaining <= 0:
            return None
        fresh = [m for m in stage.members if m.id not in stage.tried]
        wait = 0.0
        candidates: Sequence[ModelSpec] = fresh
        if not fresh:  # every member tried once: again, in the same order, after a backoff
            retry_after = self.last_failure.headers.get("Retry-After") if self.last_failure else None
            wait = _seconds(retry_after) or self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self._resilience.max_backoff_s)
            if wait >= remaining:
                return None
            stage.tried.clear()
            candidates = stage.members
        for spec in candidates:
            if spec.id in stage.unusable:
                continue
            health = self._health[spec.id]
            if not health.breaker.allows():
                stage.tried.append(spec.id)  # cooling down: counts as tried, costs no attempt
                continue
            try:
                route = self._route_for(spec)
            except IIRError as exc:  # not deployed, loading, unavailable: another member, no attempt
                stage.unusable.add(spec.id)
                self.last_failure = exc
                health.breaker.released()
                continue
            stage.attempts += 1
            stage.tried.append(spec.id)
            first_byte = stage.rules.timeouts.first_byte_s or spec.timeouts.first_byte_s \
                or self._resilience.timeouts.first_byte_s or 60.0
            budget = self.deadline - time.monotonic() - wait
            return Attempt(route, health, wait, max(0.001, min(first_byte, budget)),
                           fallback=stage is not self._first)
        return None

    def _after(self, failed: Failure) -> None:
        stage = self._stages[0] if self._stages else None
        if failed.kind == "final" or stage is None:
            self._stages.clear()
            return
        if failed.kind == "retry":
            self._enqueue(stage.rules.fallbacks)
            return
        # Another model is needed, not another try of this one: the target's list, else the model's.
        failing = stage.tried[-1] if stage.tried else None
        spec = next((m for m in stage.members if m.id == failing), None)
        pick: Callable[[Fallbacks], list[str]] = (
            (lambda r: r.context_window_fallbacks) if failed.kind == "context_window"
            else (lambda r: r.content_policy_fallbacks))
        targets = pick(stage.rules) or (pick(spec) if spec is not None else [])
        self._stages.clear()
        self._enqueue(targets)

    def _enqueue(self, targets: Sequence[str]) -> None:
        for target in targets:
            if target in self._visited:
                continue
            stage = self._stage_for(target)
            if stage is not None:
                self._visited.add(target)
                self._stages.append(stage)

    def _queue_auto_alternative(self) -> None:
        if self._more_for_auto is None:
            return
        tried = self._seen | self._visited
        model = self._more_for_auto(tried)
        if model is not None:
            self._enqueue([model])


def order_members(group: ModelGroup, specs: dict[str, ModelSpec], health: HealthBoard,
                  cost: Callable[[ModelSpec], float]) -> list[ModelSpec]:
    """A group's members in the order its strategy tries them (ties: a random member first)."""
    members = [specs[m.model] for m in group.members if m.model in specs]
    if len(members) < 2:
        return members
    random.shuffle(members)  # ties spread out instead of piling onto the first listed
    if group.strategy == "least_busy":
        members.sort(key=lambda s: health[s.id].in_flight)
    elif group.strategy == "lowest_latency":
        # Not measured yet sorts first: a member is tried before it is judged.
        members.sort(key=lambda s: health[s.id].latency_s or 0.0)
    elif group.strategy == "cheapest":
        members.sort(key=cost)
    else:  # weighted: a weighted draw for the first, the rest by weight
        weights = {m.model: m.weight for m in group.members}
        first = random.choices(members, weights=[weights[s.id] for s in members])[0]
        rest = sorted((s for s in members if s is not first), key=lambda s: -weights[s.id])
        members = [first, *rest]
    return members
