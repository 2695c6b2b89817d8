"""Model groups, retries, fallbacks and cooldowns (issue 14), over real HTTP: the gateway under uvicorn,
fake OpenAI-compatible upstreams (threads, or processes that are SIGKILLed), real Redis or none."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import prometheus_client
import pytest
import uvicorn
import yaml

from bench.gateway_bench import UPSTREAM_KEY, upstream_process
from serve_app import metrics
from serve_app.auth.keystore import KeyStore
from serve_app.auth.service import AuthService
from serve_app.ingress.app import create_app
from serve_app.ingress.gateway import Gateway, build_in_process_gateway
from serve_app.registry.catalog import CatalogError, load_catalog
from serve_app.routing.classifier import EmbeddingClassifier
from serve_app.settings import Settings
from tests.conftest import REDIS_URL, REPO
from tests.support.fake_upstream import FakeUpstream

DEAD_REDIS = "redis://127.0.0.1:1/0"
CHAT = {"messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
# Fast enough for a test: a stuck upstream costs 0.5 s, a cooldown 2 s.
RESILIENCE = {"retries": 2, "backoff_s": 0.05, "max_backoff_s": 0.2,
              "timeouts": {"first_byte_s": 0.5, "total_s": 5},
              "cooldown": {"failures": 3, "window_s": 30, "cooldown_s": 2}}


def catalog(upstreams: dict[str, str], *, groups: list[dict[str, Any]] | None = None,
            models: list[dict[str, Any]] | None = None, resilience: dict[str, Any] | None = None,
            ) -> dict[str, Any]:
    """models.yaml and providers.yaml as documents: one provider and one chat model per upstream."""
    listed = [{"id": f"{name}/echo", "engine": "openai", "task": "chat", "source": "echo-1"}
              for name in upstreams]
    return {"models": {"default_model": listed[0]["id"], "models": listed + (models or []),
                       "groups": groups or [], "resilience": resilience or RESILIENCE},
            "providers": {"providers": [{"name": name, "base_url": url,
                                         "api_key_env": "IIR_TEST_UPSTREAM_KEY"}
                                        for name, url in upstreams.items()]}}


class Served:
    def __init__(self, base_url: str, gateway: Gateway, headers: dict[str, str],
                 http: aiohttp.ClientSession) -> None:
        self.base_url, self.gateway, self.headers, self.http = base_url, gateway, headers, http

    async def chat(self, model: str, **extra: Any) -> tuple[int, dict[str, str], Any]:
        body = {**CHAT, "model": model, **extra}
        async with self.http.post(f"{self.base_url}/v1/chat/completions", json=body,
                                  headers={**self.headers, "Cache-Control": "no-store"}) as r:
            text = await r.text()
            data = json.loads(text) if r.content_type == "application/json" else text
            return r.status, dict(r.headers), data


Serve = Callable[..., contextlib.AbstractAsyncContextManager[Served]]


@pytest.fixture
def serve(tmp_path: Path, prompt_classifier: EmbeddingClassifier, monkeypatch: pytest.MonkeyPatch) -> Serve:
    cooldowns = f"iir-test:{uuid.uuid4().hex}:cooldown:"  # this test's ingress replicas share only theirs

    @contextlib.asynccontextmanager
    async def make(documents: dict[str, Any], *, redis_url: str = REDIS_URL,
                   upstream_key: str = UPSTREAM_KEY) -> AsyncIterator[Served]:
        monkeypatch.setenv("IIR_TEST_UPSTREAM_KEY", upstream_key)
        folder = tmp_path / uuid.uuid4().hex
        folder.mkdir()
        (folder / "models.yaml").write_text(yaml.safe_dump(documents["models"]))
        (folder / "providers.yaml").write_text(yaml.safe_dump(documents["providers"]))
        routing = yaml.safe_load((REPO / "configs" / "routing.yaml").read_text())
        routing.update(default=documents["models"]["default_model"], categories={})
        (folder / "routing.yaml").write_text(yaml.safe_dump(routing))
        settings = Settings(database_url=f"sqlite:///{folder / 'keys.db'}", redis_url=redis_url,
                            models_config=folder / "models.yaml", providers_config=folder / "providers.yaml",
                            routing_config=folder / "routing.yaml", cache_backend="off",
                            cooldown_key_prefix=cooldowns)
        store = KeyStore(settings.database_url_plain())
        store.create_schema()
        auth = AuthService(store, redis_url=redis_url, redis_timeout_s=0.1)
        gateway = build_in_process_gateway(settings, verifier=auth, key_admin=auth,
                                           classifier=prompt_classifier)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(create_app(gateway), log_level="warning", lifespan="on"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            while not server.started:
                await asyncio.sleep(0.01)
            base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                async with http.post(f"{base_url}/api/v1/apikeys", json={"description": "r"}) as r:
                    key = (await r.json())["api_key"]
                yield Served(base_url, gateway, {"Authorization": f"Bearer {key}"}, http)
        finally:
            server.should_exit = True
            await task
            await auth.close()
            store.close()

    return make


@pytest.fixture
def pair() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with FakeUpstream(api_key=UPSTREAM_KEY) as a, FakeUpstream(api_key=UPSTREAM_KEY) as b:
        yield a, b


def a_first(a: FakeUpstream, b: FakeUpstream) -> dict[str, Any]:
    """A group ``echo`` that tries ``a/echo`` first (cheapest), then ``b/echo``."""
    documents = catalog({"a": a.base_url, "b": b.base_url},
                        groups=[{"id": "echo", "strategy": "cheapest", "members": ["a/echo", "b/echo"]}])
    documents["models"]["models"][0]["cost_per_1k_tokens"] = 0.001
    documents["models"]["models"][1]["cost_per_1k_tokens"] = 1.0
    return documents


def served_by(upstream: FakeUpstream) -> int:
    return sum(1 for r in upstream.requests if r.path.endswith("/chat/completions"))


# -- groups -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("redis_url", [REDIS_URL, DEAD_REDIS], ids=["redis", "redis-down"])
async def test_a_killed_member_costs_no_request_and_gets_traffic_back_after_its_cooldown(
        serve: Serve, redis_url: str) -> None:
    """Two upstream processes in one group at c=16 for 30 s; one is SIGKILLed at 10 s and restarted
    (same port) at 20 s: no request fails, and the restarted one serves again after its cooldown."""
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(upstream_process())
        b = stack.enter_context(upstream_process())
        # Timeouts generous enough for a busy box: this test is about a dead member, not slow ones.
        resilience = {**RESILIENCE, "timeouts": {"first_byte_s": 10, "total_s": 30}}
        documents = catalog({"a": a.base_url, "b": b.base_url}, resilience=resilience,
                            groups=[{"id": "echo", "members": ["a/echo", "b/echo"]}])
        async with serve(documents, redis_url=redis_url) as served:
            outcomes: list[tuple[float, int, str]] = []
            started = time.monotonic()

            async def caller() -> None:
                while (now := time.monotonic() - started) < 30:
                    status, headers, _ = await served.chat("echo")
                    outcomes.append((now, status, headers.get("x-iir-model", "")))

            async def chaos() -> None:
                await asyncio.sleep(10)
                os.kill(a.pid, signal.SIGKILL)
                await asyncio.sleep(10)
                stack.enter_context(upstream_process(port=a.port))

            await asyncio.gather(chaos(), *(caller() for _ in range(16)))
            health = served.gateway.router.health["a/echo"]
    failed = [(t, s) for t, s, _ in outcomes if s != 200]
    assert not failed, failed[:10]
    assert len(outcomes) > 1000
    back = [t for t, _, model in outcomes if model == "a/echo" and t > 20]
    assert back, "the restarted member never served again"
    assert min(back) < 20 + 2 + 3, "traffic came back later than its cooldown (2 s) allows"
    assert any(model == "b/echo" for t, _, model in outcomes if 10 < t < 20)
    assert health.breaker.state == "closed"


async def test_strategies_order_the_members(serve: Serve, pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = pair
    groups = [{"id": "cheap", "strategy": "cheapest", "members": ["a/echo", "b/echo"]},
              {"id": "weighted", "strategy": "weighted",
               "members": [{"model": "a/echo", "weight": 1}, {"model": "b/echo", "weight": 9}]}]
    documents = catalog({"a": a.base_url, "b": b.base_url}, groups=groups)
    documents["models"]["models"][0]["cost_per_1k_tokens"] = 0.002
    documents["models"]["models"][1]["cost_per_1k_tokens"] = 0.001
    async with serve(documents) as served:
        models = [(await served.chat("cheap"))[1]["x-iir-model"] for _ in range(5)]
        assert models == ["b/echo"] * 5
        weighted = [(await served.chat("weighted"))[1]["x-iir-model"] for _ in range(200)]
        share = weighted.count("b/echo") / len(weighted)
        assert 0.8 < share < 0.97, share


async def test_lowest_latency_prefers_the_faster_member(serve: Serve,
                                                        pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = pair
    a.first_byte_delay_s = 0.05
    try:
        documents = catalog({"a": a.base_url, "b": b.base_url},
                            groups=[{"id": "fast", "strategy": "lowest_latency",
                                     "members": ["a/echo", "b/echo"]}])
        async with serve(documents) as served:
            models = [(await served.chat("fast"))[1]["x-iir-model"] for _ in range(20)]
    finally:
        a.first_byte_delay_s = 0.0
    assert models[-10:] == ["b/echo"] * 10  # each tried once at first, then the faster one


async def test_models_and_registry_show_the_group(serve: Serve,
                                                  pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = pair
    documents = catalog({"a": a.base_url, "b": b.base_url},
                        groups=[{"id": "echo", "members": ["a/echo", "b/echo"]}])
    async with serve(documents) as served:
        await served.chat("echo")
        async with served.http.get(f"{served.base_url}/v1/models", headers=served.headers) as r:
            ids = [m["id"] for m in (await r.json())["data"]]
        assert ids.count("echo") == 1 and {"a/echo", "b/echo"} <= set(ids)
        async with served.http.get(f"{served.base_url}/v1/models/echo", headers=served.headers) as r:
            card = await r.json()
        assert card["group"] == {"strategy": "least_busy", "members": ["a/echo", "b/echo"]}
        async with served.http.get(f"{served.base_url}/v1/registry", headers=served.headers) as r:
            registry = await r.json()
        assert registry["groups"][0]["id"] == "echo"
        assert {registry["health"][m]["state"] for m in registry["health"]} == {"closed"}


# -- retries before the first byte ------------------------------------------------------------------


@pytest.mark.parametrize("redis_url", [REDIS_URL, DEAD_REDIS], ids=["redis", "redis-down"])
async def test_a_500_is_retried_on_another_member(serve: Serve, pair: tuple[FakeUpstream, FakeUpstream],
                                                   redis_url: str) -> None:
    a, b = pair
    documents = catalog({"a": a.base_url, "b": b.base_url},
                        groups=[{"id": "echo", "strategy": "cheapest", "members": ["a/echo", "b/echo"]}])
    documents["models"]["models"][0]["cost_per_1k_tokens"] = 0.001  # a first
    documents["models"]["models"][0]["cost_per_1k_tokens"] = 0.001  # a first
    documents["models"]["models"][1]["cost_per_1k_tokens"] = 1.0
    async with serve(documents, redis_url=redis_url) as served:
        a.fail_next(500, "boom")
        started = time.monotonic()
        status, headers, _ = await served.chat("echo")
        assert time.monotonic() - started < 2
    assert status == 200 and headers["x-iir-model"] == "b/echo" and headers["x-iir-attempts"] == "2"
    assert "x-iir-fallback" not in headers  # another member of the same group is not a fallback


async def test_a_single_model_is_retried_after_a_backoff(serve: Serve,
                                                        pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, _ = pair
    async with serve(catalog({"a": a.base_url})) as served:
        a.fail_next(503, "overloaded", times=2)
        status, headers, body = await served.chat("a/echo")
        assert status == 200 and headers["x-iir-attempts"] == "3", body
        a.fail_next(503, "overloaded", times=3)
        status, headers, body = await served.chat("a/echo")  # retries (2) spent: the upstream's error
        assert status == 502 and body["error"]["code"] == "upstream_error"


@pytest.mark.parametrize("redis_url", [REDIS_URL, DEAD_REDIS], ids=["redis", "redis-down"])
async def test_a_429_honours_retry_after_and_cools_that_member_down(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream], redis_url: str) -> None:
    a, b = pair
    documents = a_first(a, b)
    async with serve(documents, redis_url=redis_url) as served:
        a.fail_next(429, "slow down", headers={"Retry-After": "3"})
        status, headers, _ = await served.chat("echo")
        assert status == 200 and headers["x-iir-model"] == "b/echo"
        breaker = served.gateway.router.health["a/echo"].breaker
        assert breaker.state == "open" and 2.5 < breaker.retry_in() <= 3.0  # Retry-After, over cooldown_s
        before = served_by(a)
        for _ in range(5):
            assert (await served.chat("echo"))[1]["x-iir-model"] == "b/echo"
        assert served_by(a) == before  # spared while it cools down


@pytest.mark.parametrize("redis_url", [REDIS_URL, DEAD_REDIS], ids=["redis", "redis-down"])
async def test_a_hanging_member_costs_one_timeout_then_is_cooled_down(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream], redis_url: str) -> None:
    a, b = pair
    documents = a_first(a, b)
    a.first_byte_delay_s = 30  # hangs
    try:
        async with serve(documents, redis_url=redis_url) as served:
            started = time.monotonic()
            status, headers, _ = await served.chat("echo")
            first = time.monotonic() - started
            assert status == 200 and headers["x-iir-model"] == "b/echo"
            assert 0.5 <= first < 1.5, first  # first_byte_s (0.5 s) once, then b
            started = time.monotonic()
            for _ in range(5):
                assert (await served.chat("echo"))[1]["x-iir-model"] == "b/echo"
            assert time.monotonic() - started < 1.0  # no further timeouts: a is cooling down
            assert served.gateway.router.health["a/echo"].breaker.reason == "upstream_timeout"
    finally:
        a.first_byte_delay_s = 0.0


@pytest.mark.parametrize("redis_url", [REDIS_URL, DEAD_REDIS], ids=["redis", "redis-down"])
async def test_a_stream_cut_after_its_first_chunk_is_not_retried(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream], redis_url: str) -> None:
    a, b = pair
    documents = a_first(a, b)
    async with serve(documents, redis_url=redis_url) as served:
        a.cut_next_stream(after_chunks=1)
        status, headers, text = await served.chat("echo", stream=True, max_tokens=8)
    assert status == 200 and headers["x-iir-model"] == "a/echo"
    events = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    assert json.loads(events[-1])["error"]["code"] == "upstream_stream_interrupted"
    assert sum(1 for e in events[:-1] if json.loads(e).get("choices")) == 1  # one chunk, never spliced
    assert served_by(b) == 0


async def test_a_stream_failing_before_its_first_chunk_is_retried(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = pair
    documents = a_first(a, b)
    async with serve(documents) as served:
        a.cut_next_stream(after_chunks=0)
        status, headers, text = await served.chat("echo", stream=True, max_tokens=8)
    assert status == 200 and headers["x-iir-model"] == "b/echo"
    assert text.rstrip().endswith("data: [DONE]")


async def test_retries_stop_at_the_requests_total_deadline(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = pair
    resilience = {**RESILIENCE, "timeouts": {"first_byte_s": 0.5, "total_s": 0.8}}
    documents = catalog({"a": a.base_url, "b": b.base_url}, resilience=resilience,
                        groups=[{"id": "echo", "members": ["a/echo", "b/echo"]}])
    a.first_byte_delay_s = b.first_byte_delay_s = 30  # both hang
    try:
        async with serve(documents) as served:
            started = time.monotonic()
            status, headers, body = await served.chat("echo")
            took = time.monotonic() - started
    finally:
        a.first_byte_delay_s = b.first_byte_delay_s = 0.0
    assert status == 502 and body["error"]["code"] == "upstream_timeout"
    assert 0.75 <= took < 1.3, took  # 0.5 s on one member, the 0.3 s left on the other, no third try


@contextlib.contextmanager
def unanswered_port() -> Iterator[str]:
    """A port whose TCP handshakes never complete: a listener with a full accept queue (Linux drops
    further SYNs), as a host that is down or firewalled looks to a client."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = []
    for _ in range(3):  # backlog 0 holds one; the rest stay half-open
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(address)
        fillers.append(filler)
    time.sleep(0.2)
    try:
        yield f"http://127.0.0.1:{address[1]}/v1"
    finally:
        for sock in [*fillers, listener]:
            sock.close()


async def test_a_connect_timeout_costs_connect_s_once_then_the_member_cools_down(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    _, b = pair
    with unanswered_port() as silent:
        documents = catalog({"a": silent, "b": b.base_url},
                            groups=[{"id": "echo", "strategy": "cheapest", "members": ["a/echo", "b/echo"]}])
        documents["models"]["models"][0].update(cost_per_1k_tokens=0.001, timeouts={"connect_s": 0.3})
        documents["models"]["models"][1]["cost_per_1k_tokens"] = 1.0
        async with serve(documents) as served:
            started = time.monotonic()
            status, headers, _ = await served.chat("echo")
            took = time.monotonic() - started
            assert status == 200 and headers["x-iir-model"] == "b/echo" and headers["x-iir-attempts"] == "2"
            assert 0.3 <= took < 0.9, took  # connect_s once, not first_byte_s, not twice
            assert served.gateway.router.health["a/echo"].breaker.cooling_down()


# -- fallbacks --------------------------------------------------------------------------------------


def tokens_out(model: str) -> float | None:
    """Completion tokens charged to ``model`` in the in-process metrics (prometheus_client); None when
    this process's metrics go to Ray instead (the e2e graph started Ray earlier in the session)."""
    if isinstance(metrics.TOKENS._made(), metrics._RayMetric):  # noqa: SLF001
        return None
    value = prometheus_client.REGISTRY.get_sample_value("iir_tokens_total",
                                                        {"model": model, "direction": "out"})
    return value or 0.0


async def test_fallbacks_answer_and_are_charged_for_what_ran(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream], capsys: pytest.CaptureFixture[str]) -> None:
    a, b = pair
    documents = catalog({"a": a.base_url, "b": b.base_url})
    documents["models"]["models"][0].update(fallbacks=["b/echo"], retries=0)
    async with serve(documents) as served:
        a.fail_next(500, "down")
        charged = tokens_out("a/echo"), tokens_out("b/echo")
        capsys.readouterr()
        status, headers, body = await served.chat("a/echo")
        assert status == 200
        assert headers["x-iir-model"] == "b/echo" and headers["x-iir-fallback"] == "a/echo"
        assert headers["x-iir-attempts"] == "2" and body["model"] == "b/echo"
        completion = body["usage"]["completion_tokens"]
        assert completion > 0
        if charged[1] is not None:
            assert (tokens_out("a/echo"), tokens_out("b/echo")) == (charged[0], charged[1] + completion)
    [line] = [json.loads(raw) for raw in capsys.readouterr().err.splitlines()
              if raw.startswith("{") and '"iir.access"' in raw and "/v1/chat/completions" in raw]
    assert (line["model"], line["target"], line["attempts"]) == ("b/echo", "a/echo", 2)


async def test_context_window_and_content_filter_have_their_own_fallbacks(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = pair
    documents = catalog({"a": a.base_url, "b": b.base_url})
    documents["models"]["models"][0].update(context_window_fallbacks=["b/echo"])
    async with serve(documents) as served:
        a.fail_next(400, "This model's maximum context length is 8 tokens", code="context_length_exceeded")
        status, headers, _ = await served.chat("a/echo")
        assert status == 200 and headers["x-iir-model"] == "b/echo"
        a.fail_next(400, "filtered", code="content_filter")  # none by default: the caller's answer
        status, _, body = await served.chat("a/echo")
        assert status == 400 and body["error"]["code"] == "content_filter"
        a.fail_next(400, "bad temperature")  # any other 400: not retried, not fallen back
        before = served_by(a) + served_by(b)
        status, _, _ = await served.chat("a/echo")
        assert status == 400 and served_by(a) + served_by(b) == before + 1


async def test_every_member_cooling_down_is_a_503_with_retry_after(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, _ = pair
    async with serve(catalog({"a": a.base_url})) as served:
        a.first_byte_delay_s = 30
        try:
            status, _, body = await served.chat("a/echo")
            assert status == 502 and body["error"]["code"] == "upstream_timeout"
            started = time.monotonic()
            status, headers, body = await served.chat("a/echo")
            assert time.monotonic() - started < 0.2  # spared: no second timeout
            assert status == 503 and body["error"]["code"] == "model_cooling_down"
            assert 1 <= int(headers["Retry-After"]) <= 3
        finally:
            a.first_byte_delay_s = 0.0
        await asyncio.sleep(2.1)  # the cooldown ends: one probe, and it closes the breaker
        assert (await served.chat("a/echo"))[0] == 200
        assert served.gateway.router.health["a/echo"].breaker.state == "closed"


async def test_auto_falls_to_the_next_candidate_and_skips_a_cooling_one(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = pair
    documents = catalog({"a": a.base_url, "b": b.base_url})  # routing: default a/echo, then the cheapest
    documents["models"]["models"][0].update(retries=0)
    async with serve(documents) as served:
        a.fail_next(500, "down")
        status, headers, _ = await served.chat("auto")
        assert status == 200 and headers["x-iir-model"] == "b/echo"
        assert headers["x-iir-fallback"] == "a/echo" and headers["x-iir-attempts"] == "2"
        served.gateway.router.health["a/echo"].failed("hard", "upstream_unreachable")
        before = served_by(a)
        status, headers, _ = await served.chat("auto")  # chosen among the models not cooling down
        assert status == 200 and headers["x-iir-model"] == "b/echo" and headers["x-iir-attempts"] == "1"
        assert served_by(a) == before


# -- state shared across ingress replicas -----------------------------------------------------------


async def test_a_cooldown_reaches_the_other_ingress_replicas_through_redis(
        serve: Serve, pair: tuple[FakeUpstream, FakeUpstream]) -> None:
    a, b = pair
    documents = catalog({"a": a.base_url, "b": b.base_url},
                        groups=[{"id": "echo", "members": ["a/echo", "b/echo"]}])
    async with serve(documents) as one, serve(documents) as two:
        listener = two.gateway.router.health  # the second replica's board
        await asyncio.sleep(0.3)  # both subscribed
        one.gateway.router.health["a/echo"].failed("hard", "upstream_unreachable")
        deadline = time.monotonic() + 3
        while not listener["a/echo"].breaker.cooling_down():
            assert time.monotonic() < deadline, "the cooldown never reached the other replica"
            await asyncio.sleep(0.02)
        assert "another ingress replica" in listener["a/echo"].breaker.reason
        async with serve(documents) as three:  # started later: reads the cooldowns in force
            deadline = time.monotonic() + 3
            while not three.gateway.router.health["a/echo"].breaker.cooling_down():
                assert time.monotonic() < deadline, "a new replica did not learn the cooldown in force"
                await asyncio.sleep(0.02)


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "named"), [
    (lambda d: d["groups"].append({"id": "g", "members": ["nope/x"]}), "member 'nope/x'"),
    (lambda d: d["models"][0].update(fallbacks=["ghost"]), "fallback 'ghost'"),
    (lambda d: d["groups"].append({"id": "a/echo", "members": ["b/echo"]}), "group ids must be unique"),
    (lambda d: d["groups"].append({"id": "auto", "members": ["b/echo"]}), "reserved"),
    (lambda d: d["models"][0].update(fallbacks=["a/echo"]), "lists itself"),
    (lambda d: d["groups"].append({"id": "g", "members": ["a/echo"], "strategy": "fastest"}), "strategy"),
    (lambda d: d["resilience"]["cooldown"].update(failures=0), "failures"),
])
def test_the_catalog_refuses_bad_resilience_settings_naming_the_field(
        tmp_path: Path, change: Callable[[dict[str, Any]], Any], named: str) -> None:
    documents = catalog({"a": "http://127.0.0.1:9/v1", "b": "http://127.0.0.1:9/v1"})
    change(documents["models"])
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(documents["models"]))
    (tmp_path / "providers.yaml").write_text(yaml.safe_dump(documents["providers"]))
    with pytest.raises(CatalogError) as info:
        load_catalog(tmp_path / "models.yaml", tmp_path / "providers.yaml")
    assert named in str(info.value)

