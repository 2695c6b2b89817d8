"""What API-key auth costs on the hot path with 100,000 keys in PostgreSQL, and how fast a revocation
reaches every ingress replica (issue 3).

    .venv/bin/python bench/auth_bench.py [--json out.json]
    .venv/bin/python bench/auth_bench.py --backstop-rounds 0     # skip the Redis-down (TTL) run

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth) and ``redis-server`` on PATH. Steps:

1. Creates a fresh database (``--database``, default ``iir_auth_bench``; dropped again at the end),
   builds the schema with ``KeyStore.upgrade()`` (the migrations) and COPYs in 100,000 keys hashed
   with ``serve_app.auth.keystore.hash_key``, keeping the plaintext of a few hundred.
2. **In-process**: ``VerifiedKeyCache`` over ``AuthService`` over the PostgreSQL ``KeyStore``, with the
   default cache settings. Times ``authenticate()`` for a key's first use (cache miss: one lookup
   among the 100,000 rows, in a worker thread) and for warm keys, and counts the SQL statements the
   store's engine sends (SQLAlchemy ``before_cursor_execute``); also a bare ``KeyStore.verify`` and
   unknown keys (negative cache).
3. **Through the real graph** on a fresh local Ray (``ray.init(address="local")``,
   ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, 2 ingress replicas, a private ``redis-server`` for the
   revocation channel, one remote model that is never called): ``GET /v1/models`` with a warm key vs
   ``GET /health`` (no auth) on each ingress replica's own port (and, fewer, through Serve's proxy),
   one request at a time, interleaved. The difference bounds what auth adds. PostgreSQL's own count
   of transactions in the database (``pg_stat_database.xact_commit + xact_rollback``) is read before
   and after, from a connection to the ``postgres`` database (so the reads never count themselves);
   to make the count exact, every backend of the bench database is terminated before each read (a
   backend writes its pending statistics when it exits; otherwise they can lag up to 10 s) and the
   Auth replica's pool reconnects on its next use. A positive control first sends N first-use keys
   and shows the counter moving by about N.
4. **Revocation**: a key warmed on both replicas, both replica ports polled in a tight loop (bounded),
   ``DELETE /api/v1/apikeys/{id}`` through the proxy port; ms from the DELETE's response (and from its
   send) to the first 401 on each replica. Then the app is redeployed with
   ``IIR_REDIS_URL=redis://127.0.0.1:1/0`` (unreachable) and ``IIR_KEY_CACHE_TTL_S=5`` to show the
   TTL backstop.

Ray, Serve, redis-server and the database are cleaned up on errors, Ctrl-C, SIGTERM and after
``--deadline-s``. Results: docs/PERFORMANCE.md, "API keys (issue 3)".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script, not only as ``-m bench.auth_bench``
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import httpx  # noqa: E402
import psycopg2  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import event, text  # noqa: E402

from bench.gateway_bench import _interrupt  # noqa: E402
from bench.loadgen import CpuMeter, percentile  # noqa: E402
from tests.support.net import free_port, wait_ready  # noqa: E402

PG_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
RAY_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "HF_HUB_OFFLINE": "1",
    # As in gateway_bench: nothing outside this script waits for a draining direct-ingress replica.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
}
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"
BACKSTOP_TTL_S = 5.0


def _stats(values: list[float], digits: int = 2) -> dict[str, Any]:
    return {"n": len(values), "p50": round(percentile(values, 0.5), digits),
            "p99": round(percentile(values, 0.99), digits),
            "max": round(max(values), digits) if values else None}


def _line(label: str, s: dict[str, Any], unit: str) -> str:
    return f"{label}: n={s['n']} p50 {s['p50']} {unit}  p99 {s['p99']} {unit}  max {s['max']} {unit}"


# -- PostgreSQL -----------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(name: str) -> Iterator[str]:
    """A new, empty database for this run; dropped (connections and all) when the block ends."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain database name: {name!r}")
    conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
        yield f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()
        print(f"dropped database {name}", flush=True)


class PgTransactions:
    """PostgreSQL's own count of transactions (commits + rollbacks) in one database.

    Reads from a connection to the ``postgres`` database, so the reads are never counted. Before each
    read it terminates the measured database's backends: a backend flushes its pending statistics at
    exit, while an idle one may hold them for up to 10 s (PostgreSQL 15's PGSTAT_IDLE_INTERVAL).
    """

    def __init__(self, database: str) -> None:
        self._db = database
        self._conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
        self._conn.autocommit = True

    def read(self) -> int:
        with self._conn.cursor() as cur:
            cur.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()", (self._db,))
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self._db,))
                row = cur.fetchone()
                if row is not None and row[0] == 0:
                    break
                time.sleep(0.05)
            time.sleep(0.2)
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
                        (self._db,))
            row = cur.fetchone()
        assert row is not None
        return int(row[0])

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True)
class BenchKey:
    id: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def load_keys(database_url: str, count: int, keep: int) -> tuple[list[BenchKey], dict[str, Any]]:
    """Schema from the migrations, then ``count`` keys by COPY; returns ``keep`` of them, spread out."""
    from serve_app.auth.keystore import KEY_PREFIX, PREFIX_CHARS, KeyStore, hash_key

    started = time.perf_counter()
    store = KeyStore(database_url)
    try:
        store.upgrade()
        created = dt.datetime.now(dt.UTC).isoformat()
        every = max(1, count // keep)
        kept: list[BenchKey] = []
        buf = io.StringIO()
        for i in range(count):
            token = secrets.token_urlsafe(32)  # as KeyStore.create: [A-Za-z0-9_-], safe in COPY text
            secret, key_id = KEY_PREFIX + token, str(uuid.uuid4())
            buf.write(f"{key_id}\t{KEY_PREFIX + token[:PREFIX_CHARS]}\t{hash_key(secret)}\tauth-bench\t0\t"
                      f"inference\t{created}\n")
            if i % every == 0 and len(kept) < keep:
                kept.append(BenchKey(key_id, secret))
        generated = time.perf_counter()
        buf.seek(0)
        raw = store.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.copy_expert("COPY api_keys (id, prefix, key_hash, description, priority, scopes, created_at) "
                            "FROM STDIN", buf)
            raw.commit()
            cur.execute("ANALYZE api_keys")
            raw.commit()
        finally:
            raw.close()
        with store.engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM api_keys")).scalar_one()
            plan = [r[0] for r in conn.execute(
                text("EXPLAIN SELECT * FROM api_keys WHERE key_hash = :h"), {"h": hash_key(kept[0].secret)})]
    finally:
        store.close()
    info = {"rows": rows, "generate_s": round(generated - started, 1),
            "copy_s": round(time.perf_counter() - generated, 1), "lookup_plan": plan}
    return kept, info


# -- 1a: in-process ---------------------------------------------------------------------------------


async def in_process(database_url: str, first_use: list[BenchKey], direct: list[BenchKey],
                     warm_calls: int, unknown: int) -> dict[str, Any]:
    from serve_app.auth.keystore import KeyStore
    from serve_app.auth.service import AuthService
    from serve_app.errors import AuthenticationFailed
    from serve_app.ingress.key_cache import VerifiedKeyCache
    from serve_app.settings import Settings

    defaults = {name: Settings.model_fields[name].default for name in (
        "key_cache_ttl_s", "key_cache_size", "negative_key_cache_ttl_s", "negative_key_cache_size")}
    store = KeyStore(database_url)
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    event.listen(store.engine, "before_cursor_execute", count)
    service = AuthService(store, redis_url=None, redis_timeout_s=0.25)
    cache = VerifiedKeyCache(service, ttl_s=defaults["key_cache_ttl_s"], max_size=defaults["key_cache_size"],
                             negative_ttl_s=defaults["negative_key_cache_ttl_s"],
                             negative_max_size=defaults["negative_key_cache_size"])
    out: dict[str, Any] = {"cache_settings": defaults}
    try:
        # Untimed: opens the pool's connection and starts the worker thread.
        await cache.authenticate(direct[0].headers["Authorization"])

        async def timed(headers: list[str], label: str, expect_ok: bool = True) -> None:
            before, samples = statements[0], []
            for header in headers:
                start = time.perf_counter_ns()
                try:
                    await cache.authenticate(header)
                    ok = True
                except AuthenticationFailed:
                    ok = False
                samples.append((time.perf_counter_ns() - start) / 1000)
                if ok != expect_ok:
                    raise RuntimeError(f"{label}: authenticate() gave ok={ok}")
            used = statements[0] - before
            out[label] = {"us": _stats(samples), "sql_statements": used,
                          "sql_per_request": round(used / len(headers), 3)}

        first = [k.headers["Authorization"] for k in first_use]
        await timed(first, "first_use")
        await timed([first[i % len(first)] for i in range(warm_calls)], "warm")
        strangers = [f"Bearer iir-{secrets.token_urlsafe(32)}" for _ in range(unknown)]
        await timed(strangers, "unknown_first", expect_ok=False)
        await timed([strangers[i % len(strangers)] for i in range(warm_calls // 4)], "unknown_repeat",
                    expect_ok=False)
        # The store alone, no thread and no cache: the PostgreSQL lookup itself.
        before, samples = statements[0], []
        for key in direct[1:]:
            start = time.perf_counter_ns()
            if store.verify(key.secret) is None:
                raise RuntimeError("KeyStore.verify rejected a bench key")
            samples.append((time.perf_counter_ns() - start) / 1000)
        out["store_verify"] = {"us": _stats(samples), "sql_statements": statements[0] - before,
                               "sql_per_request": round((statements[0] - before) / len(samples), 3)}
    finally:
        await service.close()
        store.close()
    return out


# -- the graph ------------------------------------------------------------------------------------------


def write_config_files(folder: Path, models: dict[str, Any], providers: dict[str, Any],
                       routing: dict[str, Any]) -> dict[str, str]:
    """models/providers/routing documents as YAML files; their paths by setting name (``models_config``)."""
    paths = {}
    docs = {"models_config": models, "providers_config": providers, "routing_config": routing}
    for name, doc in docs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(doc))
        paths[name] = str(folder / f"{name}.yaml")
    return paths


def write_configs(folder: Path) -> dict[str, str]:
    """One remote model (never called) and no local ones: nothing but the auth path to start or to run."""
    models = {"default_model": "fake/echo-chat",
              "models": [{"id": "fake/echo-chat", "engine": "openai", "task": "chat", "source": "echo-1"}]}
    providers = {"providers": [{"name": "fake", "base_url": "http://127.0.0.1:9/v1"}]}
    routing = {"default": "fake/echo-chat", "categories": {}}
    paths = write_config_files(folder, models, providers, routing)
    from serve_app.registry.catalog import load_catalog

    load_catalog(Path(paths["models_config"]), Path(paths["providers_config"]))  # fail before Ray starts
    return paths


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private redis-server: other sessions' pub/sub on the shared one (a ``*`` revocation) can't
    empty our caches mid-measurement."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not on PATH")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.1)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def local_ray(http_port: int) -> Iterator[None]:
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    signal.signal(signal.SIGTERM, _interrupt)  # Ray's handler would exit without unwinding
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        yield
    finally:
        stop = time.perf_counter()
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        print(f"Ray shut down in {time.perf_counter() - stop:.1f} s", flush=True)


def deploy(build_args: dict[str, Any], env: dict[str, str], proxy_url: str,
           replicas: int) -> tuple[list[str], float]:
    """(Re)deploy the app with these ``IIR_*`` settings (read by ``build_app`` in this process);
    returns each ingress replica's own URL."""
    from ray import serve

    from serve_app.builder import build_app

    for name in ("IIR_REDIS_URL", "IIR_KEY_CACHE_TTL_S"):
        os.environ.pop(name, None)
    os.environ.update(env)
    start = time.perf_counter()
    with contextlib.suppress(Exception):
        serve.delete("iir")
    serve.run(build_app(build_args), name="iir", route_prefix="/", blocking=False)
    wait_ready(proxy_url, timeout_s=240)
    meter = CpuMeter(exclude_pids=set(), upstream_pid=None)
    deadline, urls = time.monotonic() + 60, []
    while time.monotonic() < deadline:
        urls = []
        for host, port in meter.listening_ports("ingress", 30000, 31000):
            url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200 and url not in urls:
                    urls.append(url)
        if len(urls) == replicas:
            break
        time.sleep(0.5)
    if len(urls) != replicas:
        raise RuntimeError(f"found ingress ports {urls}, expected {replicas}")
    return sorted(urls), time.perf_counter() - start


def wait_subscribed(urls: list[str], timeout_s: float) -> bool:
    """Each replica's ``/ready`` says its revocation listener is subscribed."""
    deadline = time.monotonic() + timeout_s
    pending = set(urls)
    while pending and time.monotonic() < deadline:
        for url in list(pending):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if httpx.get(f"{url}/ready", timeout=5).json().get("cache") == "ok":
                    pending.discard(url)
        time.sleep(0.2)
    return not pending


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                 timeout=aiohttp.ClientTimeout(total=10))


async def _get(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
               ) -> tuple[int, float, float]:
    """(status, sent, received), perf_counter seconds."""
    sent = time.perf_counter()
    async with session.get(url, headers=headers) as r:
        await r.read()
        return r.status, sent, time.perf_counter()


async def warm_up(urls: list[str], keys: list[BenchKey]) -> None:
    async with _session() as session:
        for url in urls:
            for key in keys:
                for _ in range(2):
                    status, _, _ = await _get(session, f"{url}/v1/models", key.headers)
                    if status != 200:
                        raise RuntimeError(f"warm-up of key {key.id} on {url}: HTTP {status}")


async def first_use_requests(url: str, keys: list[BenchKey]) -> dict[str, Any]:
    async with _session() as session:
        samples = []
        for key in keys:
            status, sent, got = await _get(session, f"{url}/v1/models", key.headers)
            if status != 200:
                raise RuntimeError(f"first use of key {key.id}: HTTP {status}")
            samples.append(1000 * (got - sent))
    return _stats(samples)


async def models_vs_health(url: str, key: BenchKey, n: int) -> dict[str, Any]:
    """``n`` of each, one at a time, alternating on one keep-alive connection."""
    models, health, errors = [], [], 0
    async with _session() as session:
        for _ in range(10):  # untimed: the connection, the route's first call
            await _get(session, f"{url}/v1/models", key.headers)
            await _get(session, f"{url}/health")
        for _ in range(n):
            status, sent, got = await _get(session, f"{url}/v1/models", key.headers)
            errors += status != 200
            models.append(1000 * (got - sent))
            status, sent, got = await _get(session, f"{url}/health")
            errors += status != 200
            health.append(1000 * (got - sent))
    m, h = _stats(models), _stats(health)
    return {"models_ms": m, "health_ms": h, "errors": errors,
            "added_p50_ms": round(m["p50"] - h["p50"], 2), "added_p99_ms": round(m["p99"] - h["p99"], 2)}


async def _poll_until_401(url: str, key: BenchKey, deadline: float, max_polls: int) -> dict[str, Any]:
    polls, last_ok, other = 0, None, []
    async with _session() as session:
        while polls < max_polls and time.perf_counter() < deadline:
            status, sent, got = await _get(session, f"{url}/v1/models", key.headers)
            polls += 1
            if status == 401:
                return {"polls": polls, "sent": sent, "got": got, "last_200": last_ok, "other": other[:3]}
            if status == 200:
                last_ok = got
            else:
                other.append(status)
    return {"polls": polls, "sent": None, "got": None, "last_200": last_ok, "other": other[:3]}


async def revocation_round(proxy_url: str, urls: list[str], admin: BenchKey, key: BenchKey,
                           timeout_s: float, max_polls: int) -> dict[str, Any]:
    await warm_up(urls, [key])
    deadline = time.perf_counter() + timeout_s
    pollers = [asyncio.create_task(_poll_until_401(url, key, deadline, max_polls)) for url in urls]
    await asyncio.sleep(0.05)  # both loops are running before the DELETE goes out
    async with _session() as session:
        sent = time.perf_counter()
        async with session.delete(f"{proxy_url}/api/v1/apikeys/{key.id}", headers=admin.headers) as r:
            body = await r.read()
            answered = time.perf_counter()
            if r.status != 200:
                raise RuntimeError(f"DELETE: HTTP {r.status}: {body[:200]!r}")
    polls = await asyncio.gather(*pollers)
    replicas = {}
    for url, p in zip(urls, polls, strict=True):
        got = p["got"]
        replicas[url] = {
            "polls": p["polls"], "other_statuses": p["other"],
            "ms_from_response": None if got is None else round(1000 * (got - answered), 1),
            "ms_from_send": None if got is None else round(1000 * (got - sent), 1),
            "early": got is not None and p["sent"] < sent,  # a 401 for a request sent before the DELETE
        }
    return {"delete_ms": round(1000 * (answered - sent), 1), "replicas": replicas}


async def quiet_deletes(proxy_url: str, admin: BenchKey, keys: list[BenchKey]) -> dict[str, Any]:
    """DELETE alone, nobody polling: what the revocation request costs without the pollers' CPU."""
    samples = []
    async with _session() as session:
        for key in keys:
            sent = time.perf_counter()
            async with session.delete(f"{proxy_url}/api/v1/apikeys/{key.id}", headers=admin.headers) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"DELETE: HTTP {r.status}")
            samples.append(1000 * (time.perf_counter() - sent))
    return _stats(samples, 1)


def summarize_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": len(rounds),
                           "delete_ms": _stats([r["delete_ms"] for r in rounds], 1)}
    missed = sum(v["ms_from_response"] is None for r in rounds for v in r["replicas"].values())
    out["timeouts"] = missed
    for field in ("ms_from_response", "ms_from_send"):
        done = [r for r in rounds if all(v[field] is not None for v in r["replicas"].values())]
        every = [max(v[field] for v in r["replicas"].values()) for r in done]
        first = [min(v[field] for v in r["replicas"].values()) for r in done]
        out[field] = {"every_replica": _stats(every, 1), "first_replica": _stats(first, 1)}
    out["polls_per_replica_round"] = _stats([v["polls"] for r in rounds for v in r["replicas"].values()], 0)
    return out


def graph_phase(args: argparse.Namespace, database_url: str, keys: list[BenchKey],
                out: dict[str, Any]) -> None:
    from serve_app.auth.keystore import KeyStore

    # An admin-scoped key made through the store's own API, for the DELETEs.
    store = KeyStore(database_url)
    try:
        secret, info = store.create("auth-bench admin", scopes=("admin", "inference"))
    finally:
        store.close()
    admin = BenchKey(info.id, secret)
    warm, control = keys[0], keys[1:1 + args.control_keys]
    quiet = keys[1 + args.control_keys:1 + args.control_keys + args.quiet_deletes]
    revoke = keys[1 + args.control_keys + args.quiet_deletes:]
    counter = PgTransactions(args.database)
    http_port = free_port()
    proxy_url = f"http://127.0.0.1:{http_port}"
    with (tempfile.TemporaryDirectory(prefix="iir-auth-bench-") as tmp, redis_server() as redis_url,
          local_ray(http_port)):
        build_args = {"ingress_replicas": args.ingress_replicas, **write_configs(Path(tmp))}
        env = {"IIR_DATABASE_URL": database_url, "IIR_REDIS_URL": redis_url}
        urls, took = deploy(build_args, env, proxy_url, args.ingress_replicas)
        print(f"graph ready after {took:.1f} s: proxy {proxy_url}, ingress replicas {urls}", flush=True)
        subscribed = wait_subscribed(urls, 30)
        out["graph"] = {"startup_s": round(took, 1), "ingress_urls": urls, "redis": "private redis-server",
                        "revocation_listeners_subscribed": subscribed}
        asyncio.run(warm_up(urls, [warm, admin]))

        before = counter.read()
        out["graph"]["first_use_ms"] = asyncio.run(first_use_requests(urls[0], control))
        control_tx = counter.read() - before
        out["graph"]["positive_control"] = {"first_use_keys": len(control), "pg_transactions": control_tx}
        print(f"positive control: {len(control)} first-use keys -> {control_tx} PostgreSQL transactions; "
              + _line("latency", out["graph"]["first_use_ms"], "ms"), flush=True)

        before = counter.read()
        per_port = {}
        for url in urls:
            per_port[url] = asyncio.run(models_vs_health(url, warm, args.requests))
        per_port[proxy_url] = asyncio.run(models_vs_health(proxy_url, warm, args.proxy_requests))
        warm_tx = counter.read() - before
        total = sum(2 * (args.requests if u != proxy_url else args.proxy_requests) + 20 for u in per_port)
        out["graph"]["warm"] = {"by_url": per_port, "http_requests": total, "pg_transactions": warm_tx,
                                "pg_transactions_per_request": round(warm_tx / total, 4)}
        for url, r in per_port.items():
            kind = "proxy" if url == proxy_url else "ingress port"
            print(f"{kind} {url}: " + _line("GET /v1/models (warm key)", r["models_ms"], "ms"), flush=True)
            pad = " " * (len(kind) + len(url) + 2)
            print(pad + _line("GET /health (no auth)", r["health_ms"], "ms")
                  + f"  -> added p50 {r['added_p50_ms']} ms, p99 {r['added_p99_ms']} ms, "
                    f"errors {r['errors']}",
                  flush=True)
        print(f"PostgreSQL transactions during {total} warm/health requests: {warm_tx}", flush=True)

        if quiet:
            out["graph"]["quiet_delete_ms"] = asyncio.run(quiet_deletes(proxy_url, admin, quiet))
            print(_line("DELETE with nobody polling", out["graph"]["quiet_delete_ms"], "ms"), flush=True)
        rounds = []
        for key in revoke[:args.rounds]:
            rounds.append(asyncio.run(revocation_round(proxy_url, urls, admin, key, 3.0, args.max_polls)))
        out["revocation_push"] = {"detail": rounds, "summary": summarize_rounds(rounds)}
        _print_revocations("revocation, Redis push", out["revocation_push"]["summary"])

        if args.backstop_rounds:
            env = {"IIR_DATABASE_URL": database_url, "IIR_REDIS_URL": UNREACHABLE_REDIS,
                   "IIR_KEY_CACHE_TTL_S": str(BACKSTOP_TTL_S)}
            urls, took = deploy(build_args, env, proxy_url, args.ingress_replicas)
            print(f"redeployed with Redis unreachable and a {BACKSTOP_TTL_S:g} s TTL in {took:.1f} s: {urls}",
                  flush=True)
            asyncio.run(warm_up(urls, [admin]))
            rounds = []
            for key in revoke[args.rounds:args.rounds + args.backstop_rounds]:
                rounds.append(asyncio.run(revocation_round(proxy_url, urls, admin, key, BACKSTOP_TTL_S + 3,
                                                           args.max_polls)))
            out["revocation_backstop"] = {"redis_url": UNREACHABLE_REDIS, "key_cache_ttl_s": BACKSTOP_TTL_S,
                                          "redeploy_s": round(took, 1), "detail": rounds,
                                          "summary": summarize_rounds(rounds)}
            _print_revocations(f"revocation, Redis unreachable, TTL {BACKSTOP_TTL_S:g} s",
                               out["revocation_backstop"]["summary"])
    counter.close()


def _print_revocations(title: str, s: dict[str, Any]) -> None:
    print(f"{title}: {s['rounds']} rounds, {s['timeouts']} replica timeouts; "
          + _line("DELETE itself", s["delete_ms"], "ms"), flush=True)
    for field in ("ms_from_response", "ms_from_send"):
        e, f = s[field]["every_replica"], s[field]["first_replica"]
        print(f"  first 401, {field.replace('ms_', '').replace('_', ' ')}: every replica p50 {e['p50']} "
              f"max {e['max']} ms; first replica p50 {f['p50']} max {f['max']} ms", flush=True)
    p = s["polls_per_replica_round"]
    print(f"  polls per replica per round: p50 {p['p50']} max {p['max']}", flush=True)


# -- main ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    from importlib.metadata import version

    out: dict[str, Any] = {"meta": {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()], "ray": version("ray"),
        "sqlalchemy": version("sqlalchemy"), "argv": sys.argv[1:]}}
    with fresh_database(args.database) as database_url:
        conn = psycopg2.connect(PG_ADMIN_DSN, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                out["meta"]["postgresql"] = cur.fetchone()[0]  # type: ignore[index]
        finally:
            conn.close()
        n_graph = 1 + args.control_keys + args.quiet_deletes + args.rounds + args.backstop_rounds
        needed = args.first_use + args.direct + n_graph
        keys, info = load_keys(database_url, args.keys, max(needed, 1))
        out["keys"] = info
        print(f"{info['rows']} keys in {args.database}: generated+hashed in {info['generate_s']} s, "
              f"COPY+ANALYZE {info['copy_s']} s; lookup plan: {info['lookup_plan'][0].strip()}", flush=True)
        graph_keys, first_use, direct = keys[:n_graph], keys[n_graph:n_graph + args.first_use], \
            keys[n_graph + args.first_use:]

        r = asyncio.run(in_process(database_url, first_use, direct, args.warm_calls, args.unknown))
        out["in_process"] = r
        print("in-process, VerifiedKeyCache -> AuthService -> KeyStore (PostgreSQL, "
              f"{info['rows']} keys), cache settings {r['cache_settings']}:", flush=True)
        for label, title in (("warm", "warm key authenticate()"),
                             ("first_use", "first use authenticate() (miss -> PG)"),
                             ("unknown_first", "unknown key, first (-> PG)"),
                             ("unknown_repeat", "unknown key, repeated (negative cache)"),
                             ("store_verify", "KeyStore.verify() alone (no thread, no cache)")):
            print(f"  {_line(title, r[label]['us'], 'us')}  SQL statements {r[label]['sql_statements']} "
                  f"({r[label]['sql_per_request']}/request)", flush=True)
        if not args.no_graph:
            graph_phase(args, database_url, graph_keys, out)
    out["meta"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--database", default="iir_auth_bench", help="created fresh, dropped at the end")
    parser.add_argument("--keys", type=int, default=100_000, help="keys loaded into PostgreSQL")
    parser.add_argument("--first-use", type=int, default=200, help="in-process first-use (cache miss) calls")
    parser.add_argument("--direct", type=int, default=100, help="bare KeyStore.verify calls")
    parser.add_argument("--unknown", type=int, default=100, help="unknown keys tried (negative cache)")
    parser.add_argument("--warm-calls", type=int, default=20_000, help="in-process warm authenticate() calls")
    parser.add_argument("--control-keys", type=int, default=50, help="first-use keys through the graph")
    parser.add_argument("--requests", type=int, default=1000,
                        help="GET /v1/models and GET /health each, per ingress port")
    parser.add_argument("--proxy-requests", type=int, default=300, help="the same through Serve's proxy")
    parser.add_argument("--ingress-replicas", type=int, default=2)
    parser.add_argument("--quiet-deletes", type=int, default=3, help="DELETEs timed with nobody polling")
    parser.add_argument("--rounds", type=int, default=10, help="revocations with Redis up")
    parser.add_argument("--backstop-rounds", type=int, default=3,
                        help=f"revocations with Redis unreachable and a {BACKSTOP_TTL_S:g} s TTL (0: skip)")
    parser.add_argument("--max-polls", type=int, default=5000, help="cap on polls per replica per round")
    parser.add_argument("--no-graph", action="store_true", help="only the in-process part")
    parser.add_argument("--deadline-s", type=int, default=420, help="stop (and clean up) after this long")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.update(RAY_ENV)  # before anything imports Ray
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGALRM, _interrupt)
    signal.alarm(args.deadline_s)
    try:
        results = run(args)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C, SIGTERM or --deadline-s); Ray, redis-server and the database were "
              "cleaned up", file=sys.stderr)
        return 130
    finally:
        signal.alarm(0)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    bad = results["in_process"]["warm"]["sql_statements"] or \
        results.get("graph", {}).get("warm", {}).get("pg_transactions", 0)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
