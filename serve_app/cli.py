"""The ``iir`` command: ``iir serve`` runs the graph on a local Ray; ``iir keys ...`` manages keys."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

from serve_app.settings import Settings

# Throughput-optimized Serve (gRPC between replicas, user code on the replica's loop) also gives each
# ingress replica its own HTTP port: 3-4x port 8000's req/s here (docs/PERFORMANCE.md). Read by every
# Ray process, so it is set before ray.init.
SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "HF_HUB_OFFLINE": "1"}


def _serve(args: argparse.Namespace) -> int:
    for key, value in SERVE_ENV.items():
        os.environ.setdefault(key, value)
    import ray
    from ray import serve

    from serve_app.builder import build_app

    settings = Settings()
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=args.dashboard)
    serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
    serve.run(build_app({}), name="iir", route_prefix="/", blocking=False)
    print(f"IIR is serving on http://{settings.http_host}:{settings.http_port}", flush=True)  # noqa: T201
    stop = False

    def _stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop:
        time.sleep(0.5)
    serve.shutdown()
    ray.shutdown()
    return 0


def _keys(args: argparse.Namespace) -> int:
    from serve_app.keystore import KeyStore

    store = KeyStore(Settings().database_url_plain())
    store.create_schema()
    if args.keys_command == "create":
        api_key, info = store.create(args.description, args.priority)
        _print({**info.to_public(), "api_key": api_key})
    elif args.keys_command == "list":
        _print([k.to_public() for k in store.list()])
    elif args.keys_command == "show":
        _print(store.get(args.key_id).to_public())
    elif args.keys_command == "revoke":
        _print(store.revoke(args.key_id).to_public())
    return 0


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))  # noqa: T201


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iir", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the router on a local Ray (Ctrl-C stops it)")
    serve_cmd.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for local Ray")
    serve_cmd.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                           help="skip the Ray dashboard (saves ~0.9 GB)")
    serve_cmd.set_defaults(func=_serve)
    keys = sub.add_parser("keys", help="manage API keys in the configured database")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("--description", default="")
    create.add_argument("--priority", type=int, default=0)
    keys_sub.add_parser("list")
    for name in ("show", "revoke"):
        keys_sub.add_parser(name).add_argument("key_id")
    keys.set_defaults(func=_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=Settings().log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
