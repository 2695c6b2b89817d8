"""IIR's one queue order (serve_app/fair_queue.py) and the priority classes that configure it."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.fair_queue import FairQueue, Turn
from serve_app.registry.catalog import CatalogError, Scheduling, catalog_from_documents


def drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while (entry := queue.pop()) is not None:
        out.append(entry.item)
    return out


def test_priority_first_then_keys_take_turns_then_arrival() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(3):
        queue.push(Turn(1, "a"), f"a{i}")
    queue.push(Turn(1, "b"), "b0")
    queue.push(Turn(1, "b"), "b1")
    queue.push(Turn(9, "c"), "c0")
    assert drain(queue) == ["c0", "a0", "b0", "a1", "b1", "a2"]


def test_a_key_that_comes_back_later_does_not_get_credit_for_its_idle_time() -> None:
    """Fair share is between keys waiting now: a key idle while others were served starts at the
    current round, not with a backlog of turns."""
    queue: FairQueue[str] = FairQueue()
    for i in range(4):
        queue.push(Turn(1, "a"), f"a{i}")
    assert [queue.pop().item for _ in range(3)] == ["a0", "a1", "a2"]  # type: ignore[union-attr]
    queue.push(Turn(1, "b"), "b0")
    queue.push(Turn(1, "b"), "b1")
    # b starts at the current round (tag 2, beside a's a3 at 3): one turn each from here, not b's
    # two turns ahead of a3 that a start at round 0 would give it.
    assert drain(queue) == ["b0", "a3", "b1"]


def test_removed_entries_are_skipped_and_a_resumed_one_goes_first_among_its_peers() -> None:
    queue: FairQueue[str] = FairQueue()
    gone = queue.push(Turn(1, "a"), "gone")
    queue.push(Turn(1, "a"), "a1")
    queue.push(Turn(5, "x"), "high")
    queue.push(Turn(1, "b"), "resumed", first=True)
    queue.remove(gone)
    assert len(queue) == 3
    assert drain(queue) == ["high", "resumed", "a1"]


def test_classes_rank_priorities_and_build_turns() -> None:
    scheduling = Scheduling()
    assert [scheduling.rank(p) for p in (0, 29, 30, 69, 70, 100)] == [0, 0, 1, 1, 2, 2]
    turn = scheduling.turn(75, "key-id")
    assert (turn.rank, turn.label, turn.priority, turn.tenant) == (2, "high", 75, "key-id")
    assert scheduling.turn(0, "k").max_wait_s == 10.0 and turn.max_wait_s is None


@pytest.mark.parametrize(("classes", "named"), [
    pytest.param([{"name": "low", "min_priority": 5}], "min_priority 0", id="no-floor"),
    pytest.param([{"name": "low", "min_priority": 0}, {"name": "low", "min_priority": 50}], "unique",
                 id="duplicate-name"),
    pytest.param([{"name": "low", "min_priority": 0, "max_wait_s": 30},
                  {"name": "high", "min_priority": 50, "max_wait_s": 5}], "high.max_wait_s",
                 id="higher-class-smaller-budget"),
    pytest.param([{"name": "low", "min_priority": 0, "max_wait_s": -1}], "max_wait_s", id="negative"),
])
def test_the_catalog_refuses_bad_classes_naming_the_field(classes: list[dict[str, Any]], named: str) -> None:
    models = {"default_model": "local/x", "scheduling": {"classes": classes},
              "models": [{"id": "local/x", "engine": "llama_cpp", "task": "chat", "source": "/x.gguf"}]}
    with pytest.raises(CatalogError) as info:
        catalog_from_documents(models, {})
    assert named in str(info.value)
