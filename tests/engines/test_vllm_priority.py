"""A request's priority reaches vLLM's scheduler. The mapping and the engine defaults are plain functions
and run anywhere; the last test runs the real engine and skips without a GPU, vLLM and a local model
(see test_vllm_engine.py)."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.engines.vllm_engine import (
    VLLM_DEFAULT_MAX_NUM_SEQS,
    concurrency,
    engine_args_options,
    vllm_priority,
)
from serve_app.fair_queue import NO_TURN, Turn
from serve_app.registry.catalog import ModelSpec
from tests.engines import contract
from tests.engines.test_vllm_engine import MODEL_PATH, _missing


def test_a_higher_iir_priority_is_served_earlier_by_vllm() -> None:
    # vLLM runs the lowest value first; Python's sort is stable, as vLLM's arrival tie-break is.
    turns = [Turn(priority=p, tenant=f"key-{i}") for i, p in enumerate([0, 50, 100, 10, 50, 0])]
    by_vllm = sorted(turns, key=vllm_priority)
    assert [t.priority for t in by_vllm] == [100, 50, 50, 10, 0, 0]
    assert [t.tenant for t in by_vllm] == ["key-2", "key-1", "key-4", "key-3", "key-0", "key-5"]


def test_equal_priorities_map_to_equal_values_whatever_the_key_or_class() -> None:
    assert vllm_priority(Turn(priority=40, tenant="a", rank=1, label="x")) == vllm_priority(
        Turn(priority=40, tenant="b", rank=0, label="y"))
    # A request without a turn gets vLLM's own default.
    assert vllm_priority(NO_TURN) == 0


@pytest.mark.parametrize(("options", "policy"), [
    pytest.param({}, "priority", id="default"),
    pytest.param({"max_model_len": 2048}, "priority", id="other-options-kept"),
    pytest.param({"scheduling_policy": "fcfs"}, "fcfs", id="explicit-fcfs-kept"),
])
def test_engine_args_default_to_the_priority_policy(options: dict[str, object], policy: str) -> None:
    given = dict(options)
    assert engine_args_options(options) == {**options, "scheduling_policy": policy}
    assert options == given  # the model spec's own options are left alone


@pytest.mark.parametrize(("options", "expected"), [
    pytest.param({"max_num_seqs": 8}, 8, id="max-num-seqs"),
    pytest.param({"max_num_seqs": 512, "max_num_batched_tokens": 256}, 512, id="explicit-seqs-win"),
    pytest.param({}, VLLM_DEFAULT_MAX_NUM_SEQS, id="vllm-default"),
    pytest.param({"max_num_batched_tokens": 64}, 64, id="default-capped-by-token-budget"),
    pytest.param({"max_num_batched_tokens": 8192}, VLLM_DEFAULT_MAX_NUM_SEQS, id="large-token-budget"),
])
def test_concurrency_is_vllms_max_num_seqs(options: dict[str, object], expected: int) -> None:
    assert concurrency(options) == expected
    assert VLLM_DEFAULT_MAX_NUM_SEQS == 128


# --- on a GPU ---------------------------------------------------------------------------------------

SEQS = 2  # a tiny batch, so most of the low-priority requests wait in vLLM's queue
LOW, HIGH = Turn(priority=0, tenant="bulk", label="batch"), Turn(priority=100, tenant="vip", rank=2,
                                                                  label="interactive")


@pytest.mark.gpu
async def test_a_high_priority_request_overtakes_a_queue_of_low_ones() -> None:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from serve_app.engines.vllm_engine import VLLMEngine

    spec = ModelSpec(id="local/vllm-priority", engine="vllm", task="completion", source=MODEL_PATH,
                     engine_options={"gpu_memory_utilization": 0.3, "max_model_len": 2048,
                                     "max_num_seqs": SEQS},
                     resources={"num_gpus": 1})
    engine = VLLMEngine.from_spec(spec)
    requests = contract.Requests(model=spec.id, prompt="1, 2, 3, 4, 5,", max_tokens=64)
    finished: list[str] = []
    busy = asyncio.Event()

    async def run(name: str, turn: Turn) -> None:
        async for _ in engine.stream(requests.completion(), turn):
            busy.set()
        finished.append(name)

    try:
        lows = [asyncio.create_task(run(f"low-{i}", LOW)) for i in range(8 * SEQS)]
        await asyncio.wait_for(busy.wait(), timeout=120)  # running, and the rest queued behind
        await run("high", HIGH)
        await asyncio.gather(*lows)
    finally:
        await engine.aclose()
    # First come, first served would put it last (16th). In priority order it waits for the batch
    # that was running, and runs next to at most one batch of low ones.
    assert finished.index("high") <= 2 * SEQS, finished
