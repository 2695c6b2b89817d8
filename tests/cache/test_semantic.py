"""The semantic cache's rules (what is in scope, what is never matched) and its FAISS index, with the
packaged MiniLM: real embeddings, no stand-ins."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from serve_app.cache.semantic import SemanticIndex, agrees, semantic_query, signature
from serve_app.registry.catalog import ModelSpec
from serve_app.routing.classifier import EmbeddingClassifier
from serve_app.schemas import ChatCompletionRequest, CompletionRequest

ON = {"x-iir-semantic-cache": "on"}
SPEC = ModelSpec(id="fake/echo-chat", engine="openai", task="chat")
FAQ = ModelSpec(id="fake/echo-faq", engine="openai", task="chat", semantic_cache=True)


def chat(*messages: tuple[str, str], **extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest(model=SPEC.id, messages=[{"role": r, "content": c} for r, c in messages],
                                 **extra)


def scope(body: Any, headers: dict[str, str] = ON, spec: ModelSpec = SPEC, namespace: str = "key-1") -> str:
    query = semantic_query(headers, body, spec, namespace)
    assert query is not None
    return query.scope


def test_opt_in_by_model_or_request_and_opt_out_by_request() -> None:
    body = chat(("user", "What is the capital of France?"))
    assert semantic_query({}, body, SPEC, "k") is None
    assert semantic_query({}, body, FAQ, "k") is not None
    assert semantic_query({"x-iir-semantic-cache": "off"}, body, FAQ, "k") is None
    query = semantic_query(ON, body, SPEC, "k")
    assert query is not None and query.text == "What is the capital of France?"


def test_the_scope_holds_everything_but_the_last_user_turn() -> None:
    base = scope(chat(("system", "Be terse."), ("user", "hi")))
    assert scope(chat(("system", "Be terse."), ("user", "hello!"))) == base  # only the text differs
    assert scope(chat(("system", "Be verbose."), ("user", "hi"))) != base
    assert scope(chat(("user", "hi"))) != base
    assert scope(chat(("system", "Be terse."), ("user", "hi"), temperature=0.5)) != base
    assert scope(chat(("system", "Be terse."), ("user", "hi")), namespace="key-2") != base
    assert scope(chat(("system", "Be terse."), ("user", "hi")), spec=FAQ, headers={}) != base  # model
    earlier = chat(("system", "Be terse."), ("user", "Tell me about Rust."), ("assistant", "A language."),
                   ("user", "hi"))
    assert scope(earlier) != base
    prompt = CompletionRequest(model=SPEC.id, prompt="hi", max_tokens=5)
    assert scope(prompt) != base


def test_never_for_tool_calls_or_turns_that_do_not_end_with_the_user() -> None:
    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    assert semantic_query(ON, chat(("user", "weather in Paris?"), tools=[tool]), SPEC, "k") is None
    called = ChatCompletionRequest(model=SPEC.id, messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "user", "content": "and tomorrow?"}])
    assert semantic_query(ON, called, SPEC, "k") is None
    assert semantic_query(ON, chat(("user", "Write a poem"), ("assistant", "Roses")), SPEC, "k") is None
    assert semantic_query(ON, CompletionRequest(model=SPEC.id, prompt=["a", "b"]), SPEC, "k") is None
    assert semantic_query(ON, chat(("user", "   ")), SPEC, "k") is None


@pytest.mark.parametrize(("a", "b"), [
    ("What's the capital of Australia?", "what is the capital of australia"),
    ("Can you please explain what a closure is in JavaScript?", "Explain what a closure is in JavaScript."),
    ("My order hasn't arrived yet, how can I track it?", "My order has not arrived yet. How can I track it?"),
    ("How do I install Node.js on Ubuntu?", "how do i install nodejs on ubuntu"),
    ("what are the first 10 digits of pi", "What are the first ten digits of pi?"),
    ("How do I reverse a string in Python?", "how do I reverse a string in pyhton"),
])
def test_the_guard_lets_filler_case_contractions_and_typos_differ(a: str, b: str) -> None:
    assert agrees(signature(a), signature(b))


@pytest.mark.parametrize(("a", "b"), [
    ("convert 5 km to miles", "convert 50 km to miles"),
    ("Convert 5 km to miles", "Convert 5 miles to km"),
    ("Translate 'good morning' to French.", "Translate 'good morning' into German."),
    ("What is the capital of France?", "What is the capital of Spain?"),
    ("Does rock beat scissors?", "Does scissors beat rock?"),
    ("print hello world in C", "print hello world in C++"),
    ("Is it safe to eat raw eggs?", "Is it not safe to eat raw eggs?"),
    ("When did World War II end?", "Where did World War II end?"),
    ("solve 2x + 3 = 11", "solve 2x - 3 = 11"),
    ("如何在Excel中冻结首行？", "如何在Excel中冻结首列？"),
    ("Sort the list in ascending order", "Sort the list in descending order"),
])
def test_the_guard_refuses_other_numbers_words_order_and_directions(a: str, b: str) -> None:
    assert not agrees(signature(a), signature(b))


@pytest.fixture
def index(prompt_classifier: EmbeddingClassifier) -> SemanticIndex:
    return SemanticIndex(prompt_classifier.embedder, threshold=0.85, max_entries=5)


async def answer(index: SemanticIndex, scope: str, text: str, key: str, ttl_s: int = 60) -> None:
    probe = await index.lookup(scope, text)
    await index.add(scope, probe, key, ttl_s)


async def test_a_paraphrase_matches_and_a_different_question_does_not(index: SemanticIndex) -> None:
    await answer(index, "s", "How do I reverse a list in Python?", "key-reverse")
    hit = await index.lookup("s", "Please, how do I reverse a list in python")
    assert hit.key == "key-reverse" and hit.similarity >= 0.9
    assert (await index.lookup("s", "How do I sort a dictionary by value in Python?")).key is None
    assert (await index.lookup("other-scope", "How do I reverse a list in Python?")).key is None


async def test_similar_text_with_other_numbers_is_refused_by_the_guard(index: SemanticIndex) -> None:
    await answer(index, "s", "Convert 5 km to miles", "key-5")
    for other in ("Convert 7 km to miles", "Convert 5 miles to km"):  # cosine 0.87 and 0.98
        probe = await index.lookup("s", other)
        assert probe.key is None and probe.similarity >= index.threshold  # the embedding alone would match
    assert index.stats.rejected_by_guard == 2
    assert (await index.lookup("s", "convert 5 km into miles, please")).key == "key-5"


async def test_entries_expire_and_the_oldest_are_evicted(index: SemanticIndex) -> None:
    await answer(index, "s", "What is the boiling point of water?", "key-short", ttl_s=0)
    assert (await index.lookup("s", "What is the boiling point of water?")).key is None
    for n in range(6):  # max_entries is 5
        await answer(index, f"scope-{n}", "Tell me a joke about cats", f"key-{n}")
    assert index.stats.entries <= 5
    assert (await index.lookup("scope-0", "Tell me a joke about cats")).key is None
    assert (await index.lookup("scope-5", "Tell me a joke about cats")).key == "key-5"


async def test_concurrent_lookups_and_adds_keep_the_index_consistent(index: SemanticIndex) -> None:
    texts = [f"What is the population of city number {n}?" for n in range(5)]
    await asyncio.gather(*(answer(index, "s", t, f"key-{n}") for n, t in enumerate(texts)))
    found = await asyncio.gather(*(index.lookup("s", t) for t in texts))
    assert [p.key for p in found] == [f"key-{n}" for n in range(5)]


async def test_a_new_index_rebuilds_from_the_redis_journal(prompt_classifier: EmbeddingClassifier) -> None:
    from serve_app.cache.semantic import SemanticJournal
    from serve_app.redis_client import make_redis
    from tests.conftest import REDIS_URL

    prefix = f"iir-test:sem:{uuid.uuid4().hex}:"
    redis = make_redis(REDIS_URL, timeout_s=1.0)
    try:
        journal = SemanticJournal(redis, prefix=prefix)
        first = SemanticIndex(prompt_classifier.embedder, threshold=0.85)
        for text, key, ttl in (("How do I reverse a list in Python?", "key-kept", 60),
                               ("Tell me a joke about cats", "key-gone", 1)):
            probe = await first.lookup("s", text)
            await first.add("s", probe, key, ttl)
            await journal.record("s", probe, key, ttl)
        await asyncio.sleep(1.1)  # the second entry's TTL runs out in Redis

        restarted = SemanticIndex(prompt_classifier.embedder, threshold=0.85)
        assert await journal.replay(restarted) == 1
        assert (await restarted.lookup("s", "Please, how do I reverse a list in python")).key == "key-kept"
        assert (await restarted.lookup("s", "Tell me a joke about cats")).key is None
    finally:
        stale = [k async for k in redis.scan_iter(match=prefix + "*")]
        if stale:
            await redis.delete(*stale)
        await redis.aclose()
