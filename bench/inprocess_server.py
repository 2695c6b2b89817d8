"""The ingress's FastAPI app alone under uvicorn, in its own process: no Ray, no HAProxy.

    python -m bench.inprocess_server --models M.yaml --providers P.yaml --routing R.yaml --port PORT

For benchmarks of the ingress's own code (the request pipeline, the plan of a group): what it costs
without Serve's hop and HAProxy around it. SQLite keys in a temporary folder, Redis as configured
(``IIR_REDIS_URL``), no response cache unless asked. Prints one JSON line ``{"port", "pid"}`` once it
listens.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import uvicorn  # noqa: E402

from serve_app.auth.keystore import KeyStore  # noqa: E402
from serve_app.auth.service import AuthService  # noqa: E402
from serve_app.ingress.app import create_app  # noqa: E402
from serve_app.ingress.gateway import build_in_process_gateway  # noqa: E402
from serve_app.routing.in_process import InProcessClassifier  # noqa: E402
from serve_app.settings import Settings  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--providers", type=Path, required=True)
    parser.add_argument("--routing", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cache", default="off", choices=["off", "auto", "redis", "memory"])
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="iir-inprocess-"))
    settings = Settings(database_url=f"sqlite:///{folder / 'keys.db'}", models_config=args.models,
                        providers_config=args.providers, routing_config=args.routing,
                        cache_backend=args.cache)
    store = KeyStore(settings.database_url_plain())
    store.create_schema()
    auth = AuthService(store, redis_url=settings.redis_url, redis_timeout_s=settings.redis_timeout_s)
    classifier = InProcessClassifier(settings.classifier_head, settings.cache_dir)
    classifier.start()
    gateway = build_in_process_gateway(settings, verifier=auth, key_admin=auth, classifier=classifier)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}), flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(gateway), log_level="warning", access_log=False,
                                           lifespan="on", loop="uvloop", http="httptools"))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
