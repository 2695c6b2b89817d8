"""The ingress's FastAPI app alone under uvicorn, in its own process: no Ray, no HAProxy.

    python -m bench.inprocess_server --models M.yaml --providers P.yaml --routing R.yaml --port PORT

For benchmarks of the ingress's own code (the request pipeline, the plan of a group): what it costs
without Serve's hop and HAProxy around it. SQLite keys in a temporary folder, Redis as configured
(``IIR_REDIS_URL``), no response cache unless asked. Prints one JSON line ``{"port", "pid"}`` once it
listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import uvicorn  # noqa: E402

from serve_app.auth.keystore import KeyStore  # noqa: E402
from serve_app.auth.service import AuthService  # noqa: E402
from serve_app.ingress.app import create_app  # noqa: E402
from serve_app.ingress.gateway import build_in_process_gateway  # noqa: E402
from serve_app.settings import Settings  # noqa: E402


def _classifier(settings: Settings) -> object:
    """This checkout's classifier as the ingress runs it; an older checkout (before
    ``serve_app/routing/in_process.py``) gets the same on a worker thread, for ``bench/inprocess_ab.py``."""
    try:
        from serve_app.routing.in_process import InProcessClassifier
    except ImportError:
        import asyncio

        from serve_app.routing.classifier import EmbeddingClassifier

        loaded = EmbeddingClassifier.load(settings.classifier_head, settings.cache_dir)

        class OnAThread:
            async def classify(self, conversation: object) -> object:
                return (await asyncio.to_thread(loaded.classify_many, [conversation]))[0]

        return OnAThread()
    classifier = InProcessClassifier(settings.classifier_head, settings.cache_dir)
    classifier.start()
    return classifier


@contextlib.contextmanager
def running(args: list[str], *, env: dict[str, str], cwd: Path = REPO,
            script: Path = Path(__file__)) -> Iterator[tuple[str, int]]:
    """This server in its own process (``script``: this file, or its copy in another checkout):
    (base URL, pid) once it listens; stopped on exit."""
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        yield f"http://127.0.0.1:{info['port']}", int(info["pid"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def ready_with_key(base_url: str, timeout_s: float = 120.0) -> dict[str, str]:
    """Wait for ``/ready``, then make a key: the headers a benchmark sends (no-store: every request
    reaches the model)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(f"{base_url}/ready") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{base_url} never became ready")
            await asyncio.sleep(0.2)
        async with http.post(f"{base_url}/api/v1/apikeys", json={"description": "bench"}) as r:
            return {"Authorization": f"Bearer {(await r.json())['api_key']}", "Cache-Control": "no-store"}


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
    gateway = build_in_process_gateway(settings, verifier=auth, key_admin=auth,
                                       classifier=_classifier(settings))  # type: ignore[arg-type]
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
