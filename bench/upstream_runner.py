"""Run ``FakeUpstream`` in its own process, so its CPU is not charged to the gateway or the client.

    python -m bench.upstream_runner --api-key KEY [--first-byte-delay-ms MS] [--port PORT]

Prints one JSON line ``{"port": ..., "pid": ...}`` once it listens, then serves until SIGTERM/SIGINT
or until its stdin closes (the parent went away), whichever comes first.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from typing import Any

from tests.support.fake_upstream import FakeUpstream


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--first-byte-delay-ms", type=float, default=0.0,
                        help="wait this long before answering each request (a slow provider)")
    parser.add_argument("--port", type=int, default=0, help="listen here (0: any free port)")
    args = parser.parse_args(argv)
    stop = threading.Event()

    def _stop(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)

    def _watch_parent() -> None:
        sys.stdin.read()  # returns at EOF: the parent closed the pipe or died
        stop.set()

    threading.Thread(target=_watch_parent, daemon=True, name="parent-watch").start()
    delay_s = args.first_byte_delay_ms / 1000
    with FakeUpstream(api_key=args.api_key, max_recorded=16, first_byte_delay_s=delay_s,
                      port=args.port) as upstream:
        print(json.dumps({"port": upstream.port, "pid": os.getpid()}), flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
