"""Each model's health as this ingress replica sees it, for groups, retries and cooldowns.

Per model (a deployment of a group, or a model on its own): requests in flight from this replica, a
moving average of its latency, and a circuit breaker:

    closed ──3 server errors in 30 s, or 1 timeout / refused connection / 429──▶ open (cooling down)
    open ──cooldown_s over──▶ half-open: the next request probes it, the others still go elsewhere
    half-open ──the probe answers──▶ closed            ──the probe fails──▶ open again

Nothing here waits on anything: the request path reads and updates plain fields. A breaker that opens
is told to the other ingress replicas through Redis (``CooldownShare``); without Redis each replica
cools down on its own, which only costs each one its own first failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app import metrics
from serve_app.failopen import Backoff, FailOpen
from serve_app.redis_client import ChannelListener, make_redis
from serve_app.registry.catalog import Cooldown

State = Literal["closed", "open", "half_open"]
STATE_VALUE = {"closed": 0, "half_open": 1, "open": 2}  # the iir_model_circuit_state gauge
# What failed, as the breaker counts it: "hard" opens at once (the model is away or out of quota),
# "soft" counts toward ``failures`` within ``window_s`` (one 500 may be one bad request).
Severity = Literal["hard", "soft"]
LATENCY_WEIGHT = 0.2  # the moving average's weight of each new sample


@dataclass
class Breaker:
    cooldown: Cooldown
    model: str = ""
    state: State = "closed"
    open_until: float = 0.0  # wall clock (time.time()), so replicas can share it
    reason: str = ""
    _failures: deque[float] = field(default_factory=deque)
    _probe_since: float | None = None  # monotonic; a probe that never reports back expires
    on_open: Callable[[str, float, str], None] | None = None  # (model, until, reason): to share it

    def allows(self) -> bool:
        """May a request go to this model now? In half-open, yes for exactly one (the probe)."""
        if self.state == "closed":
            return True
        now = time.time()
        if self.state == "open":
            if now < self.open_until:
                return False
            self._set("half_open")
        # half-open: one probe at a time; one that went silent for a cooldown lets another through
        mono = time.monotonic()
        if self._probe_since is not None and mono - self._probe_since < self.cooldown.cooldown_s:
            return False
        self._probe_since = mono
        return True

    def cooling_down(self) -> bool:
        """Open and not yet due for a probe (no side effect, unlike ``allows``)."""
        return self.state == "open" and time.time() < self.open_until

    def released(self) -> None:
        """A probe slot taken by ``allows`` but not used (the request went elsewhere)."""
        self._probe_since = None

    def retry_in(self) -> float:
        return max(0.0, self.open_until - time.time())

    def succeeded(self) -> None:
        self._probe_since = None
        if self.state != "closed":
            self._failures.clear()
            self.reason = ""
            self._set("closed")

    def failed(self, severity: Severity, reason: str, retry_after_s: float | None = None) -> None:
        self._probe_since = None
        now = time.monotonic()
        if severity == "soft" and self.state == "closed":
            self._failures.append(now)
            while self._failures and now - self._failures[0] > self.cooldown.window_s:
                self._failures.popleft()
            if len(self._failures) < self.cooldown.failures:
                return
        self.cool_down_until(time.time() + max(self.cooldown.cooldown_s, retry_after_s or 0.0), reason)

    def cool_down_until(self, until: float, reason: str, *, share: bool = True) -> None:
        """Open (or keep open) until the wall-clock time ``until``; never shortens a cooldown."""
        if self.state == "open" and until <= self.open_until:
            return
        self.open_until, self.reason = until, reason
        self._failures.clear()
        self._set("open")
        metrics.COOLDOWNS.inc(model=self.model)
        if share and self.on_open is not None:
            self.on_open(self.model, until, reason)

    def learned(self, until: float, reason: str) -> None:
        """Another replica opened it: cool down until then too (not shared again)."""
        if until > time.time():
            self.cool_down_until(until, reason, share=False)

    def _set(self, state: State) -> None:
        self.state = state
        metrics.CIRCUIT_STATE.set(STATE_VALUE[state], model=self.model)


@dataclass
class ModelHealth:
    breaker: Breaker
    in_flight: int = 0
    latency_s: float | None = None  # moving average: time to answer, or to the first chunk of a stream
    requests: int = 0
    failures: int = 0

    def started(self) -> None:
        self.in_flight += 1
        self.requests += 1

    def ended(self) -> None:
        self.in_flight -= 1

    def answered(self, latency_s: float) -> None:
        self.latency_s = latency_s if self.latency_s is None else (
            (1 - LATENCY_WEIGHT) * self.latency_s + LATENCY_WEIGHT * latency_s)
        self.breaker.succeeded()

    def failed(self, severity: Severity, reason: str, retry_after_s: float | None = None) -> None:
        self.failures += 1
        self.breaker.failed(severity, reason, retry_after_s)

    def view(self) -> dict[str, object]:
        """For ``GET /v1/registry``."""
        b = self.breaker
        return {"state": b.state, "cooling_down_s": round(b.retry_in(), 1) if b.state == "open" else 0,
                "reason": b.reason or None, "in_flight": self.in_flight,
                "latency_ms": round(self.latency_s * 1000, 1) if self.latency_s is not None else None,
                "requests": self.requests, "failures": self.failures}


class HealthBoard:
    """Every model's ``ModelHealth`` in this replica, made on first use."""

    def __init__(self, cooldown: Cooldown | None = None,
                 on_open: Callable[[str, float, str], None] | None = None) -> None:
        self._cooldown = cooldown or Cooldown()
        self._models: dict[str, ModelHealth] = {}
        self.on_open = on_open

    def configure(self, cooldown: Cooldown) -> None:
        """A new catalog: its cooldown settings apply from now on (states are kept)."""
        self._cooldown = cooldown
        for health in self._models.values():
            health.breaker.cooldown = cooldown

    def __getitem__(self, model_id: str) -> ModelHealth:
        health = self._models.get(model_id)
        if health is None:
            breaker = Breaker(self._cooldown, model_id, on_open=self._share)
            health = self._models[model_id] = ModelHealth(breaker)
        return health

    def _share(self, model: str, until: float, reason: str) -> None:
        if self.on_open is not None:
            self.on_open(model, until, reason)

    def views(self) -> dict[str, dict[str, object]]:
        return {model_id: h.view() for model_id, h in sorted(self._models.items())}




class CooldownShare(ChannelListener):
    """A breaker opened in one ingress replica cools the model down in all of them.

    On opening: ``SET <prefix><model>`` (expiring with the cooldown, for replicas that start later) and
    ``PUBLISH <prefix>events``; the prefix is ``IIR_COOLDOWN_KEY_PREFIX`` (``iir:cooldown:``), sent by
    a background task, never awaited by a request. Replicas
    apply what they hear as their own cooldown (not shared again) and, after a gap in the subscription,
    read the keys again. Each replica then probes the model itself when the cooldown ends. Redis away:
    each replica keeps its own breakers, and the publish is skipped while a probe finds Redis gone.
    """

    def __init__(self, board: HealthBoard, redis_url: str, *, prefix: str = "iir:cooldown:",
                 timeout_s: float = 0.25, **options: Any) -> None:
        super().__init__(redis_url, prefix + "events", what="cooldown listener",
                         while_away="each ingress replica cools models down on its own",
                         on_reconnect=self.resync, reconnect_on_start=True, **options)
        self._board = board
        self._prefix = prefix
        self._redis = make_redis(redis_url, timeout_s=timeout_s)
        self._timeout_s = timeout_s
        self._sending: set[asyncio.Task[None]] = set()
        self._publish_guard = FailOpen(
            logging.getLogger(__name__), probe=self._redis.ping, probe_timeout_s=timeout_s,
            backoff=Backoff(0.5, 5.0, jitter=True),
            lost="cooldowns are not shared: Redis unavailable (%(error)s)",
            back="cooldowns are shared again")
        board.on_open = self.publish

    def publish(self, model: str, until: float, reason: str) -> None:
        if self._publish_guard.paused():
            return
        task = asyncio.get_running_loop().create_task(self._send(model, until, reason))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, model: str, until: float, reason: str) -> None:
        message = json.dumps({"model": model, "until": until, "reason": reason})
        ttl_ms = max(1, int((until - time.time()) * 1000))
        try:
            async with asyncio.timeout(self._timeout_s):
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.set(self._prefix + model, message, px=ttl_ms)
                    pipe.publish(self._prefix + "events", message)
                    await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - fail open: this replica's breaker is open regardless
            self._publish_guard.failed(exc)

    def handle(self, data: str) -> None:
        try:
            message = json.loads(data)
            model, until, reason = str(message["model"]), float(message["until"]), str(message["reason"])
        except (ValueError, KeyError, TypeError):
            return  # not ours to understand; a cooldown is an optimisation, never a reason to fail
        self._board[model].breaker.learned(until, f"{reason} (another ingress replica)")

    async def resync(self) -> None:
        """The cooldowns in force now (after a start, or a gap in the subscription)."""
        async for key in self._redis.scan_iter(self._prefix + "*", count=100):
            value = await self._redis.get(key)
            if value is not None:
                self.handle(value.decode() if isinstance(value, bytes) else str(value))

    async def aclose(self) -> None:
        await self.stop()
        if self._sending:
            await asyncio.gather(*list(self._sending), return_exceptions=True)
        await self._publish_guard.aclose()
        await self._redis.aclose()
