"""The prompt classifier with the real model (ONNX MiniLM) and the committed head (the routing policy:
tests/test_routing_policy.py).

The quality numbers themselves live in ``configs/classifier/metrics.json`` (and ``bench/classifier_bench.py``
prints them); these tests check that the committed artifact is the one those numbers describe, that
the dataset is what the issue asked for, and the behaviour around it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from serve_app.classifier import CATEGORIES, EmbeddingClassifier, conversation_parts
from serve_app.classifier_train import DATA_DIR, OUT_DIR, evaluate, load_dataset

REPO = Path(__file__).resolve().parent.parent


def test_dataset_has_at_least_60_varied_prompts_per_category_and_a_fixed_split() -> None:
    train, validation, hard = load_dataset(DATA_DIR)
    everything = train + validation
    per_category = Counter(e.category for e in everything)
    assert set(per_category) == set(CATEGORIES)
    assert min(per_category.values()) >= 60, per_category
    for category in CATEGORIES:
        mine = [e for e in everything if e.category == category]
        assert any(e.conversation[0][0] == "system" for e in mine), f"{category}: no system prompts"
        assert any(sum(1 for role, _ in e.conversation if role == "user") > 1 for e in mine), category
        assert any(not e.conversation[-1][1].isascii() for e in mine), f"{category}: nothing non-English"
        assert all(e.conversation[-1][0] == "user" for e in mine)
    # The split is a function of the id alone: a re-run, or a new example elsewhere, moves nothing.
    assert {e.id for e in validation} == {e.id for e in everything if e.in_validation}
    assert 0.15 < len(validation) / len(everything) < 0.25
    assert {e.category for e in hard} == set(CATEGORIES)


def test_committed_head_reproduces_its_committed_metrics(prompt_classifier: EmbeddingClassifier) -> None:
    metrics = json.loads((OUT_DIR / "metrics.json").read_text())
    _, validation, hard = load_dataset(DATA_DIR)
    from serve_app.classifier import ClassifierHead

    head = ClassifierHead.load(OUT_DIR / "head.json")
    got = evaluate(prompt_classifier.embedder, head, validation)
    assert got["accuracy"] == metrics["validation"]["accuracy"]
    assert got["macro_f1"] == metrics["validation"]["macro_f1"]
    assert got["confusion"] == metrics["validation"]["confusion"]
    assert evaluate(prompt_classifier.embedder, head, hard)["accuracy"] == metrics["hard_cases"]["accuracy"]
    assert metrics["counts"]["validation"] == len(validation)


@pytest.mark.parametrize(("prompt", "category"), [
    ("Fix this: TypeError: 'NoneType' object is not subscriptable in my flask view", "code"),
    ("What is the integral of x^2 * sin(x) dx?", "math"),
    ("Translate 'where is the train station' into German", "translate"),
    ("Write a limerick about a cat who learns to fly", "creative"),
    ("hey, how's it going?", "chat"),
])
async def test_plain_requests(prompt_classifier: EmbeddingClassifier, prompt: str, category: str) -> None:
    result = await prompt_classifier.classify([("user", prompt)])
    assert result.category == category, result
    assert 0 <= result.complexity <= 1 and abs(sum(result.scores.values()) - 1) < 1e-3


async def test_the_last_turn_is_read_with_its_context(prompt_classifier: EmbeddingClassifier) -> None:
    article = ("The city council voted on Tuesday to extend the bike-lane network by 40 km over three years. "
               "Supporters cited a 30% rise in cycling since 2021; opponents worried about parking. The plan "
               "costs 12 million euros, half from a national grant, and construction starts in the spring.")
    follow_up = [("user", article), ("assistant", "Noted."), ("user", "now give me that in 3 bullets")]
    assert (await prompt_classifier.classify(follow_up)).category == "summarize"
    code = [("user", "def load(path):\n    with open(path) as f:\n        return json.loads(f)\n"),
            ("assistant", "This reads a JSON file."), ("user", "why does it crash?")]
    assert (await prompt_classifier.classify(code)).category == "code"
    # A system prompt describes the assistant, not the request: a coding bot asked for a poem.
    poem = [("system", "You are a senior Python engineer. Answer with code."),
            ("user", "write a short poem about autumn leaves")]
    assert (await prompt_classifier.classify(poem)).category == "creative"


def test_a_result_depends_on_the_text_alone_not_on_its_batch(prompt_classifier: EmbeddingClassifier) -> None:
    prompt = [("user", "Summarize the meeting notes below in two sentences: we agreed to ship on Friday.")]
    alone = prompt_classifier.classify_many([prompt])[0]
    others = [[("user", "hello")], [("user", "x" * 3000)], [("user", "ありがとう")]]
    batched = prompt_classifier.classify_many([*others, prompt])[-1]
    assert alone == batched


def test_long_turns_keep_their_head_and_tail() -> None:
    text = "intro " * 300 + "Please translate the paragraph above into French."
    request, context = conversation_parts([("user", text)])
    assert request.endswith("Please translate the paragraph above into French.") and len(request) < 1100
    assert context == ""
