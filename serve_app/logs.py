"""Structured logs: the access log, one JSON line per request.

    {"ts": "2026-11-28T08:01:02.345Z", "level": "INFO", "logger": "iir.access", "msg": "request",
     "request_id": "5f0c…", "method": "POST", "path": "/v1/chat/completions", "status": 200,
     "latency_ms": 41.2, "key_id": "key_…", "model": "local/smollm2-135m", "category": "chat",
     "route": "auto: chat → local/smollm2-135m", "cache": "miss"}

Never the key itself: handlers note the key's id.

Where it goes: inside a Serve replica, through Serve's own logger, so the line lands in the replica's
log (``/tmp/ray/session_latest/logs/serve/replica_iir_Ingress_*.log``) with Serve's fields (replica,
deployment) and, with ``logging_config: {encoding: JSON}`` (serve_config.yaml), as one JSON object
with our keys at the top level (and the line, again, as its message). Serve buffers replica logs
when RAY_SERVE_THROUGHPUT_OPTIMIZED is on (1,000 records, or an error); set
RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE=1 to see each line at once. Outside Serve (the in-process
gateway): JSON lines on stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {"ts": f"{ts}.{int(record.msecs):03d}Z", "level": record.levelname,
                                "logger": record.name, "msg": record.getMessage()}
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Whatever ``sys.stderr`` is at the time of writing (test runners swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def _access_logger() -> logging.Logger:
    logger = logging.getLogger("iir.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # its own JSON lines; not re-formatted by Ray's or the root handlers
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    return logger


access_log = _access_logger()


@functools.cache
def in_serve_replica() -> bool:
    from ray.serve.context import _get_internal_replica_context

    return _get_internal_replica_context() is not None


def log_request(fields: dict[str, Any]) -> None:
    if in_serve_replica():
        # The message is the JSON line (Serve's text format shows only the message); Serve's JSON
        # format also writes the extra attributes as top-level keys. Serve's own filter sets
        # request_id: the same id, since the ingress adopts the x-request-id Serve passes on.
        logging.getLogger("ray.serve").info(json.dumps(fields, ensure_ascii=False, default=str),
                           extra={k: v for k, v in fields.items() if k != "request_id"})
    else:
        access_log.info("request", extra={"fields": fields})
