"""Every IIR metric, in one place. Names start with ``iir_``; no label ever holds an API key or key id.

Export, decided in docs/ARCHITECTURE.md ("Metrics"): inside Ray (every Serve replica) through
``ray.util.metrics``, so they reach each node's Ray metrics endpoint next to Serve's own and show in
the Ray dashboard; Ray prefixes them, so Prometheus sees ``ray_iir_requests_total``. Outside Ray (the
in-process gateway of tests and tools) through ``prometheus_client``'s default registry under their
own names. A metric picks its backend at first use.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0)
FAST_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _Metric:
    kind = ""

    def __init__(self, name: str, description: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] | None = None) -> None:
        assert name.startswith("iir_"), name
        self.name = name
        self.description = description
        self.labels = tuple(labels)
        self.buckets = tuple(buckets) if buckets else None
        self._backend: Any = None
        self._failed = False
        self._lock = threading.Lock()
        ALL.append(self)

    def _made(self) -> Any:
        if self._backend is None:
            with self._lock:
                if self._backend is None:
                    self._backend = _make(self)
        return self._backend

    def _tags(self, labels: dict[str, Any]) -> dict[str, str]:
        return {k: str(labels.get(k, "")) for k in self.labels}


    def _record(self, how: str, value: float, labels: dict[str, Any]) -> None:
        # A metric must never fail the request it describes: a backend error is logged once, then dropped.
        try:
            getattr(self._made(), how)(value, self._tags(labels))
        except Exception:
            if not self._failed:
                self._failed = True
                logger.exception("metric %s could not be recorded; later failures are not logged", self.name)


class Counter(_Metric):
    kind = "counter"

    def inc(self, value: float = 1.0, **labels: Any) -> None:
        if value > 0:  # Ray refuses 0
            self._record("inc", value, labels)


class Histogram(_Metric):
    kind = "histogram"

    def observe(self, value: float, **labels: Any) -> None:
        self._record("observe", value, labels)


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels: Any) -> None:
        self._record("set", value, labels)


ALL: list[_Metric] = []


def _make(metric: _Metric) -> Any:
    import ray

    if ray.is_initialized():
        return _RayMetric(metric)
    return _PrometheusMetric(metric)


class _RayMetric:
    def __init__(self, metric: _Metric) -> None:
        from ray.util import metrics

        if metric.kind == "counter":
            self._m: Any = metrics.Counter(metric.name, metric.description, tag_keys=metric.labels)
        elif metric.kind == "histogram":
            self._m = metrics.Histogram(metric.name, metric.description,
                                        boundaries=list(metric.buckets or ()), tag_keys=metric.labels)
        else:
            self._m = metrics.Gauge(metric.name, metric.description, tag_keys=metric.labels)

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self._m.inc(value, tags=tags)

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self._m.observe(value, tags=tags)

    def set(self, value: float, tags: dict[str, str]) -> None:
        self._m.set(value, tags=tags)


class _PrometheusMetric:
    def __init__(self, metric: _Metric) -> None:
        import prometheus_client as prom

        # prometheus_client appends _total to counters itself; our names carry no suffix.
        if metric.kind == "counter":
            self._m: Any = prom.Counter(metric.name, metric.description, metric.labels)
        elif metric.kind == "histogram":
            self._m = prom.Histogram(metric.name, metric.description, metric.labels,
                                     buckets=metric.buckets or prom.Histogram.DEFAULT_BUCKETS)
        else:
            self._m = prom.Gauge(metric.name, metric.description, metric.labels)

    def _child(self, tags: dict[str, str]) -> Any:
        return self._m.labels(**tags) if tags else self._m

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self._child(tags).inc(value)

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self._child(tags).observe(value)

    def set(self, value: float, tags: dict[str, str]) -> None:
        self._child(tags).set(value)


# -- traffic ----------------------------------------------------------------------------------------
REQUESTS = Counter("iir_requests", "HTTP requests answered, by route, model and status code",
                   ("route", "model", "status"))
REQUEST_LATENCY = Histogram("iir_request_latency_seconds", "Time to the end of the response",
                            ("route", "model"), LATENCY_BUCKETS_S)
TIME_TO_FIRST_TOKEN = Histogram("iir_time_to_first_token_seconds",
                                "Streams: time to the first event with content", ("model",),
                                LATENCY_BUCKETS_S)
TOKENS = Counter("iir_tokens", "Tokens in (prompt) and out (completion), as the model reported",
                 ("model", "direction"))
# -- priority scheduling (serve_app/fair_queue.py; docs/ARCHITECTURE.md, "Priority under overload") ----
# ``where``: "ingress" (an admission gate: a full local model, or a remote one with max_concurrency) or
# "engine" (a local engine's run slots, inside the model replica).
QUEUED = Gauge("iir_queued_requests", "Requests waiting, by model, priority class and where they wait",
               ("model", "priority_class", "where"))
QUEUE_WAIT = Histogram("iir_queue_wait_seconds", "Time a request waited for its turn, by priority class",
                       ("model", "priority_class", "where"), LATENCY_BUCKETS_S)
SHED = Counter("iir_shed_requests", "Requests refused at once (503 + Retry-After) to keep a queue within "
               "its class's budget", ("model", "priority_class", "reason"))
PREEMPTIONS = Counter("iir_preemptions", "Running requests paused for a higher priority class (they "
                      "resume after it)", ("model", "priority_class"))
IN_FLIGHT = Gauge("iir_in_flight_requests",
                  "Model requests in progress on this ingress replica, by key priority", ("priority",))

# -- cache ------------------------------------------------------------------------------------------
CACHE_LOOKUPS = Counter("iir_cache_lookups",
                        "Response cache: hit, miss or bypass; match exact or semantic",
                        ("model", "result", "match"))
CACHE_ERRORS = Counter("iir_cache_errors", "Cache backends failing or timing out (requests then go on)",
                       ("backend",))

STORED_RESPONSES = Counter("iir_stored_responses",
                           "Responses API answers asked to be stored: stored, too_large (over "
                           "IIR_RESPONSES_MAX_BYTES) or unavailable (the store is away)", ("outcome",))

# -- routing ----------------------------------------------------------------------------------------
CLASSIFIER_DECISIONS = Counter("iir_classifier_decisions", "model: auto, by category and chosen model",
                               ("category", "model"))
CLASSIFIER_LATENCY = Histogram("iir_classifier_latency_seconds", "Classification, seen from the ingress",
                               (), FAST_BUCKETS_S)

# -- refusals and failures --------------------------------------------------------------------------
AUTH_FAILURES = Counter("iir_auth_failures", "401/403 by reason (missing, invalid, revoked, expired, ...)",
                        ("reason",))
RATE_LIMITED = Counter("iir_rate_limited", "429s by the limit that was hit", ("limit",))
UPSTREAM_ERRORS = Counter("iir_upstream_errors", "Model calls that failed, by model and error code",
                          ("model", "code"))
UPSTREAM_RETRIES = Counter("iir_upstream_retries",
                           "Model calls tried again, on the same model or another one, by the model that "
                           "failed, why, and how (retry | fallback)", ("model", "reason", "how"))
COOLDOWNS = Counter("iir_model_cooldowns", "Circuit breakers opened (a model cooled down), by model",
                    ("model",))
CIRCUIT_STATE = Gauge("iir_model_circuit_state", "Each model's breaker: 0 closed, 1 half-open, 2 open",
                      ("model",))
REDIS_FAIL_OPEN = Counter("iir_redis_fail_open", "Requests served without Redis (rate limits unchecked)",
                          ("component",))

# -- registry ---------------------------------------------------------------------------------------
REGISTRY_MODELS = Gauge("iir_registry_models", "Models in the registry by status", ("status",))
