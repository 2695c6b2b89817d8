"""The ``iir`` command: ``iir serve`` runs the graph on a local Ray; ``iir keys ...`` manages keys;
``iir db upgrade`` applies schema migrations; ``iir config render`` writes a ``serve_config.yaml``;
``iir dataplane env`` prints what ``ray start`` needs for port 8000."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from serve_app.db.tables import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, SCOPE_INFERENCE
from serve_app.settings import Settings

if TYPE_CHECKING:
    from pydantic import ValidationError

    from serve_app.auth.service import AuthService
    from serve_app.schemas import ApiKeyCreate, ApiKeyUpdate

def _serve(args: argparse.Namespace) -> int:
    from serve_app.dataplane import ray_environment

    # Read by every Ray process, so set before ray.init; what the caller already set wins.
    for key, value in ray_environment(Settings().data_plane).items():
        os.environ.setdefault(key, value)
    # Serve keeps a draining ingress port open 30 s for remote load balancers; on one node HAProxy
    # learns of the change within 0.1 s, and waiting 30 s only slows every stop and redeploy.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")
    import ray
    from ray import serve

    from serve_app.builder import build_app

    settings = Settings()  # again: the proxy token may be new
    if args.address == "local":
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=args.dashboard)
    else:  # a cluster `ray start` made: it read the data plane's variables when it started
        ray.init(address=args.address)
    serve.start(http_options={"host": settings.http_host, "port": settings.http_port})
    serve.run(build_app({}), name="iir", route_prefix="/", blocking=False)
    base_url = f"http://{settings.http_host}:{settings.http_port}"
    # The control plane is up; the Registry now deploys the local models. Say when the default answers.
    print(f"IIR is up on {base_url}; loading models…", flush=True)  # noqa: T201
    print(_wait_ready(base_url, timeout_s=300), flush=True)  # noqa: T201
    stop = False

    def _stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while not stop:
        time.sleep(0.5)
    print("stopping IIR…", flush=True)  # noqa: T201
    serve.shutdown()
    ray.shutdown()
    return 0


def _dataplane(args: argparse.Namespace) -> int:
    """``iir dataplane env``: the ``export`` lines for ``ray start`` on every node (one shared token)."""
    from serve_app.dataplane import ray_environment

    data_plane = args.data_plane or Settings().data_plane
    env = {**ray_environment(data_plane), "IIR_DATA_PLANE": data_plane}
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")  # noqa: T201
    return 0


def _wait_ready(base_url: str, timeout_s: float) -> str:
    import httpx

    deadline, last = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/ready", timeout=5)
            # Ready, and no local model still loading: the quick start's first calls all answer.
            if r.status_code == 200 and "loading" not in r.json()["models"].values():
                return f"IIR is ready: {r.json()['models']}"
            last = r.text
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(1)
    return f"IIR is serving, but not ready after {timeout_s:g} s (GET {base_url}/ready): {last}"


# The CLI waits on one publish, with a person at the other end: more room than the request path's
# IIR_REDIS_TIMEOUT_S (a first connection, maybe TLS), since a spurious "not announced" misleads.
CLI_REDIS_TIMEOUT_S = 2.0
UPDATE_FIELDS = "--description, --priority, --rpm, --tpm"


def _keys(args: argparse.Namespace) -> int:
    """``iir keys``: the same ``AuthService`` the Auth deployment wraps, so every revocation and update
    is announced to the ingress caches whichever door it came through."""
    from pydantic import ValidationError
    from sqlalchemy.exc import SQLAlchemyError

    from serve_app.auth.keystore import KeyStore
    from serve_app.auth.service import AuthService
    from serve_app.errors import IIRError, ServiceUnavailable

    command = f"iir keys {args.keys_command}"
    try:
        request = _key_request(args)
    except ValidationError as exc:
        print(f"{command}: {_validation_message(exc)}", file=sys.stderr)  # noqa: T201
        return 2
    except ValueError as exc:
        print(f"{command}: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    settings = Settings()
    store = KeyStore(settings.database_url_plain())
    try:
        store.upgrade()  # a couple of reads when the schema is current
        service = AuthService(store, redis_url=settings.redis_url,
                              redis_timeout_s=max(settings.redis_timeout_s, CLI_REDIS_TIMEOUT_S))
        payload, announced = asyncio.run(_run_keys(service, args, request))
    except IIRError as exc:
        print(f"{command}: {exc.message}", file=sys.stderr)  # noqa: T201
        return 1 if isinstance(exc, ServiceUnavailable) else 2
    except SQLAlchemyError as exc:  # the schema check, before the service's own error handling
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        print(f"{command}: the key store is unavailable: {reason}", file=sys.stderr)  # noqa: T201
        return 1
    finally:
        store.close()
    _print(payload)
    if not announced:
        # Exit 0 all the same: the change is committed, as a DELETE's 200 says in the same case; why, in
        # docs/API.md (API keys). The JSON says "announced": false for scripts.
        print(_not_announced(command, args.keys_command), file=sys.stderr)  # noqa: T201
    return 0


def _not_announced(command: str, keys_command: str) -> str:
    done = "revoked" if keys_command == "revoke" else "updated"
    return (f"{command}: WARNING: {done} in the database, but the announcement to the ingress replicas "
            "did not go out (Redis at IIR_REDIS_URL unreachable). Replicas that cached the key keep its "
            "old state until their cache entry expires (IIR_KEY_CACHE_TTL_S, default 30 s); run the "
            "command again once Redis is back to announce it.")


def _key_request(args: argparse.Namespace) -> ApiKeyCreate | ApiKeyUpdate | None:
    """The HTTP API's request models, so a value the API refuses is refused here with the same rule."""
    from serve_app.schemas import ApiKeyCreate, ApiKeyUpdate

    if args.keys_command == "create":
        return ApiKeyCreate.model_validate({
            "description": args.description, "priority": args.priority, "scopes": args.scopes,
            "expires_in": args.expires_in,
            "rate_limit": {"requests_per_minute": args.rpm, "tokens_per_minute": args.tpm}})
    if args.keys_command == "update":
        given = vars(args)  # the update options default to SUPPRESS: present only when given
        body: dict[str, Any] = {name: given[name] for name in ("description", "priority") if name in given}
        limits = {field: given[opt] for opt, field in (("rpm", "requests_per_minute"),
                                                      ("tpm", "tokens_per_minute")) if opt in given}
        if limits:
            body["rate_limit"] = limits
        if not body:
            raise ValueError(f"nothing to change: give at least one of {UPDATE_FIELDS}")
        return ApiKeyUpdate.model_validate(body)
    return None


async def _run_keys(service: AuthService, args: argparse.Namespace,
                    request: ApiKeyCreate | ApiKeyUpdate | None) -> tuple[Any, bool]:
    """The command's JSON and whether its change reached the ingress caches (True when nothing changed)."""
    from serve_app.schemas import ApiKeyCreate, ApiKeyUpdate

    try:
        if isinstance(request, ApiKeyCreate):
            return await service.create(request), True
        if args.keys_command == "list":
            return [k.to_public() for k in await service.list()], True
        if args.keys_command == "show":
            return (await service.get(args.key_id)).to_public(), True
        if isinstance(request, ApiKeyUpdate):
            change = await service.update(args.key_id, **request.changes())
        else:
            change = await service.revoke(args.key_id)
        return {**change.info.to_public(), "announced": change.announced}, change.announced
    finally:
        await service.close()


def _validation_message(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                     for error in exc.errors())


def _db(args: argparse.Namespace) -> int:
    from serve_app.auth.keystore import KeyStore
    from serve_app.db import migrate

    store = KeyStore(Settings().database_url_plain())
    try:
        if args.db_command == "upgrade":
            result = store.upgrade()
            _print({"before": result.before, "after": result.after, "legacy": result.legacy,
                    "changed": result.changed})
        elif args.db_command == "current":
            _print({"current": migrate.current_revision(store.engine), "head": migrate.head_revision()})
    finally:
        store.close()
    return 0


def _config(args: argparse.Namespace) -> int:
    from pathlib import Path

    from serve_app.registry.catalog import CatalogError
    from serve_app.registry.render import render_from_files

    settings = Settings()
    # Files named here are pinned in the app's args, so the deployed graph reads what was rendered.
    pinned = {name: str(Path(value).resolve()) for name in ("models_config", "providers_config")
              if (value := getattr(args, name))}
    models = Path(pinned.get("models_config", settings.models_config))
    providers = Path(pinned.get("providers_config", settings.providers_config))
    try:
        text = render_from_files(models, providers, pinned, inline=args.inline,
                                 routing_config=settings.routing_config)
    except CatalogError as exc:
        print(f"iir config render: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)  # noqa: T201
    else:
        sys.stdout.write(text)
    return 0


def _classifier(args: argparse.Namespace) -> int:
    from pathlib import Path

    from serve_app.routing.embedder import OnnxEmbedder
    from serve_app.routing.training import DATA_DIR, OUT_DIR, train, write

    head, metrics = train(OnnxEmbedder(cache_dir=Settings().cache_dir), Path(args.data or DATA_DIR))
    write(head, metrics, Path(args.out or OUT_DIR))
    summary = {part: {k: metrics[part][k] for k in ("n", "accuracy", "macro_f1")}
               for part in ("validation", "hard_cases") if metrics[part]}
    _print({"written": str(args.out or OUT_DIR), **summary, "head": metrics["head"]})
    return 0


def _print(payload: Any) -> None:
    print(json.dumps(payload, indent=2, default=str))  # noqa: T201


def _scopes(value: str) -> list[str]:
    scopes = [s.strip() for s in value.split(",") if s.strip()]
    if not scopes:
        raise argparse.ArgumentTypeError("give at least one scope")
    return scopes


def _positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be a positive integer")
    return number


def _limit(value: str) -> int | None:
    return None if value.strip().lower() == "none" else _positive_int(value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iir", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the router on a local Ray (Ctrl-C stops it)")
    serve_cmd.add_argument("--address", default="local",
                           help="'local' (default): a new Ray of its own; 'auto' or HOST:PORT: join a "
                                "cluster `ray start` made, with `iir dataplane env` in its environment")
    serve_cmd.add_argument("--num-cpus", type=int, default=None, help="logical CPUs for local Ray")
    serve_cmd.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                           help="skip the Ray dashboard (saves ~0.9 GB)")
    serve_cmd.set_defaults(func=_serve)
    dataplane = sub.add_parser("dataplane", help="what stands in front of the ingress on port 8000")
    dataplane_sub = dataplane.add_subparsers(dest="dataplane_command", required=True)
    env = dataplane_sub.add_parser(
        "env", help="print the exports `ray start` needs (eval \"$(iir dataplane env)\"); keeps a "
                    "token already in IIR_PROXY_TOKEN, else makes one: share it with every node")
    env.add_argument("--data-plane", choices=["haproxy", "python"], default=None,
                     help="default: IIR_DATA_PLANE, else haproxy")
    dataplane.set_defaults(func=_dataplane)
    keys = sub.add_parser("keys", help="manage API keys in the configured database")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("--description", default="")
    create.add_argument("--priority", type=int, default=DEFAULT_PRIORITY,
                        help=f"{MIN_PRIORITY}-{MAX_PRIORITY}, higher first (default {DEFAULT_PRIORITY})")
    create.add_argument("--scopes", type=_scopes, default=[SCOPE_INFERENCE],
                        help="comma-separated: inference, admin (default inference)")
    create.add_argument("--expires-in", type=_positive_int, default=None, metavar="SECONDS")
    create.add_argument("--rpm", type=_positive_int, default=None, help="requests per minute (default: none)")
    create.add_argument("--tpm", type=_positive_int, default=None, help="tokens per minute (default: none)")
    keys_sub.add_parser("list")
    for name in ("show", "revoke"):
        keys_sub.add_parser(name).add_argument("key_id")
    # Announced like a revocation: every ingress re-reads the key on its next use.
    update = keys_sub.add_parser("update", help=f"change a key (any of {UPDATE_FIELDS})")
    update.add_argument("key_id")
    update.add_argument("--description", default=argparse.SUPPRESS)
    update.add_argument("--priority", type=int, default=argparse.SUPPRESS,
                        help=f"{MIN_PRIORITY}-{MAX_PRIORITY}, higher first")
    update.add_argument("--rpm", type=_limit, default=argparse.SUPPRESS,
                        help="requests per minute; 'none' removes the limit")
    update.add_argument("--tpm", type=_limit, default=argparse.SUPPRESS,
                        help="tokens per minute; 'none' removes the limit")
    keys.set_defaults(func=_keys)
    db = sub.add_parser("db", help="the database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply pending migrations (also done at start-up)")
    db_sub.add_parser("current", help="the schema's revision and the newest this release knows")
    db.set_defaults(func=_db)
    config = sub.add_parser("config", help="Serve config files")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    render = config_sub.add_parser("render", help="write serve_config.yaml from configs/ (for serve deploy)")
    render.add_argument("--out", default=None, metavar="PATH", help="file to write (default: stdout)")
    render.add_argument("--models-config", default=None, metavar="PATH",
                        help="models.yaml to render (default: IIR_MODELS_CONFIG or configs/models.yaml)")
    render.add_argument("--providers-config", default=None, metavar="PATH")
    render.add_argument("--inline", action="store_true",
                        help="embed models/providers/routing in the config instead of naming the files "
                             "(KubeRay serveConfigV2, nodes without the files)")
    config.set_defaults(func=_config)
    classifier = sub.add_parser("classifier", help="the prompt classifier of model \"auto\"")
    classifier_sub = classifier.add_subparsers(dest="classifier_command", required=True)
    train = classifier_sub.add_parser("train", help="fit the head on data/classifier")
    train.add_argument("--data", default=None, metavar="DIR", help="default: data/classifier")
    train.add_argument("--out", default=None, metavar="DIR", help="default: configs/classifier")
    classifier.set_defaults(func=_classifier)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=Settings().log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Alembic lists its autogenerate plugins at INFO whenever it is imported: noise on every `iir keys`.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    args = _parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
