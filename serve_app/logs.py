"""Structured logs: the access log is JSON lines, one per request, on stderr.

    {"ts": "2026-11-28T08:01:02.345Z", "level": "INFO", "logger": "iir.access", "msg": "request",
     "request_id": "5f0c…", "method": "POST", "path": "/v1/chat/completions", "status": 200,
     "latency_ms": 41.2, "key_id": "key_…", "model": "local/smollm2-135m", "category": "chat",
     "route": "auto: chat → local/smollm2-135m", "cache": "miss"}

Never the key itself: handlers note the key's id. Inside Ray, a replica's stderr goes to its worker
log (``/tmp/ray/session_latest/logs/worker-*.err``) and to ``ray logs``; other IIR logs follow
Serve's ``logging_config`` (JSON in the rendered serve_config.yaml).
"""

from __future__ import annotations

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
