"""``Backoff``: how the ingress skips a fail-open dependency (the classifier, the semantic index) after
it failed, so an outage costs one timeout per pause rather than one per request."""

from __future__ import annotations

import time


class Backoff:
    """Paused for ``first_s`` after a failure, doubling with each further failure up to ``max_s``; a
    success ends the outage."""

    def __init__(self, first_s: float = 1.0, max_s: float = 30.0) -> None:
        self.first_s, self.max_s = first_s, max_s
        self.pause_s = first_s  # the pause the next failure starts
        self.paused_until = 0.0

    def paused(self) -> bool:
        return time.monotonic() < self.paused_until

    def failed(self) -> bool:
        """Start a pause; True for the first failure of an outage (the one worth a log line)."""
        first = self.pause_s == self.first_s
        self.paused_until = time.monotonic() + self.pause_s
        self.pause_s = min(self.pause_s * 2, self.max_s)
        return first

    def succeeded(self) -> bool:
        """End the outage; True if there was one (worth saying it is over)."""
        recovered = self.pause_s > self.first_s
        self.pause_s = self.first_s
        return recovered
