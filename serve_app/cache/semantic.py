"""Semantic response cache: a paraphrase of an answered request gets the stored answer.

Opt-in, per model (``semantic_cache: true`` in models.yaml) or per request
(``x-iir-semantic-cache: on``; ``off`` refuses it for a model that has it on). It runs only after an
exact-cache miss, on requests the exact cache would store, and points at the exact cache's entries:
the answer itself is stored once, under its exact key.

What is compared, and what must be equal:

- **Scope** (exact): SHA-256 of the namespace (API key or global, as the exact cache), the model after
  routing, the endpoint, every parameter, and every message but the last user turn: system prompt,
  earlier turns and response format included. Two requests can only match inside one scope.
- **Text** (similar): the last user turn (or a completion's single prompt), embedded with the packaged
  all-MiniLM-L6-v2 and matched by cosine similarity ≥ ``IIR_SEMANTIC_CACHE_THRESHOLD``.
- **Guard** (exact): the two texts must also agree word for word once filler is set aside: the same
  numbers in the same order, the same content words (a typo apart; question words and negations
  count), and the same word after "to"/"from"/"than". MiniLM alone puts "convert 5 km to miles" and
  "convert 5 miles to km", or "capital of France" and "capital of Spain", above any usable
  threshold; an answer for one is wrong for the other. Paraphrases that change words ("exit vim" /
  "quit vim") are given up: a wrong answer costs more than a miss.

Never for tool calls: a request offering tools, or carrying tool calls or results, is not looked up.

The index is FAISS (``IndexFlatIP``, exact inner product over normalized vectors), one per scope, in
the ``SemanticCache`` deployment's memory, journaled in Redis (``SemanticJournal``) so a restarted
replica rebuilds it. ``docs/ARCHITECTURE.md`` says why not pgvector (not in
this Debian's packages) and why exact search rather than HNSW (scopes are small; expiry needs delete).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from serve_app.failopen import Backoff, FailOpen
from serve_app.schemas import ChatCompletionRequest, CompletionRequest, GenerateRequest

logger = logging.getLogger(__name__)

HEADER = "x-iir-semantic-cache"


@dataclass(frozen=True)
class SemanticQuery:
    scope: str
    text: str


@dataclass(frozen=True)
class Probe:
    """A lookup's result: the matched entry's exact-cache key (or None), and what ``add`` needs."""

    key: str | None
    similarity: float
    vector: bytes
    signature: Signature


class SemanticLookup(Protocol):
    """The ``SemanticCache`` deployment's handle, or a ``SemanticIndex`` in-process."""

    async def lookup(self, scope: str, text: str) -> Probe: ...
    async def add(self, scope: str, probe: Probe, key: str, ttl_s: int) -> None: ...


class CacheTarget(Protocol):
    """What the caches key a request's target on: a model's spec, or a group's identity
    (``serve_app/routing/router.py``, ``CacheIdentity``)."""

    @property
    def id(self) -> str: ...
    @property
    def cache_ttl_s(self) -> int | None: ...
    @property
    def semantic_cache(self) -> bool: ...


def semantic_query(headers: Mapping[str, str], body: GenerateRequest, spec: CacheTarget, namespace: str
                   ) -> SemanticQuery | None:
    """The request's scope and text, or None when it must not be matched semantically."""
    asked = headers.get(HEADER, "").lower()
    if asked == "off" or not (asked == "on" or spec.semantic_cache):
        return None
    if isinstance(body, CompletionRequest):
        if not isinstance(body.prompt, str):
            return None
        text, rest = body.prompt, body.model_dump(mode="json", exclude={"model", "user", "prompt"},
                                                  exclude_none=True)
    else:
        text_and_rest = _chat_parts(body)
        if text_and_rest is None:
            return None
        text, rest = text_and_rest
    if not text.strip():
        return None
    document = {"ns": namespace, "model": spec.id, "kind": type(body).__name__, "rest": rest}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return SemanticQuery(hashlib.sha256(canonical.encode()).hexdigest(), text)


def _chat_parts(body: ChatCompletionRequest) -> tuple[str, dict[str, Any]] | None:
    payload = body.model_dump(mode="json", exclude={"model", "user"}, exclude_none=True)
    if any(payload.get(k) for k in ("tools", "functions", "tool_choice", "function_call")):
        return None
    last = body.messages[-1]
    if last.role != "user":
        return None  # an assistant prefill or a tool result continues a specific exchange
    for message in body.messages:
        extra = message.model_extra or {}
        if message.role in ("tool", "function") or extra.get("tool_calls") or extra.get("function_call"):
            return None
    payload["messages"] = payload["messages"][:-1]
    return last.text(), payload


# Tokens: numbers; one CJK character each (those scripts put no spaces between words); words (with
# "c++", "c#"); and operators, which change a request as much as a word does ("2x + 3" / "2x - 3").
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af"
_WORD = re.compile(rf"\d+(?:[.,]\d+)*|[{_CJK}]|(?:(?![{_CJK}])[^\W\d_])+(?:\+\+|#)?|[-+*/=<>^]")
_CONTRACTIONS = [(re.compile(p), r) for p, r in (
    (r"\bwon't\b", "will not"), (r"\bcan't\b", "can not"), (r"\bcannot\b", "can not"),
    (r"n't\b", " not"), (r"'re\b", " are"), (r"'ve\b", " have"), (r"'ll\b", " will"),
    (r"'m\b", " am"), (r"\b(what|who|how|where|when|it|that|there)'s\b", r"\1 is"), (r"\bwhats\b", "what is"),
    (r"'s\b", ""), (r"%", " percent "),
    (r"(?<=[^\W\d_])[.-](?=[^\W\d_])", ""),  # node.js = nodejs, co-worker = coworker
)]
_NUMBER_WORDS = {w: str(n) for n, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}
# Words that change no request: articles, pronouns, auxiliaries, politeness, "explain"/"tell me".
# Kept on purpose: question words, negations (not, no, without, never), and every other word.
_FILLER = frozenset("""
a an the i me my mine myself you your yours we us our it its this that these those there here
is are was were be been being am do does did done doing have has had can could would should will shall
may might must please kindly just simply quickly briefly exactly really actually basically also very
tell explain show describe give help want need like know let lets wondering curious quick question
of in on at for with by about as and or but so if any some one thing things way ways someone something
hi hello hey thanks thank u ur pls plz thx teh
""".split())
# A word right after one of these says where something goes: "5 km to miles" is not "5 miles to km".
_DIRECTION = {"to": "to", "into": "to", "from": "from", "than": "than", "vs": "vs", "versus": "vs"}


@dataclass(frozen=True)
class Signature:
    """What must agree between two texts besides their embeddings (``agrees``)."""

    numbers: tuple[str, ...]
    words: tuple[str, ...]  # content words, in order, each once
    directed: frozenset[tuple[str, str]]


def signature(text: str) -> Signature:
    lowered = text.lower().replace("\u2019", "'")
    for pattern, replacement in _CONTRACTIONS:
        lowered = pattern.sub(replacement, lowered)
    numbers: list[str] = []
    words: dict[str, None] = {}  # ordered set
    directed: set[tuple[str, str]] = set()
    marker = None
    for token in _WORD.findall(lowered):
        token = _NUMBER_WORDS.get(token, token)
        if token[0].isdigit():
            numbers.append(token)
            word = token
        elif token in _DIRECTION:
            marker = _DIRECTION[token]
            continue
        elif token in _FILLER:
            continue
        else:
            word = _stem(token)
        words.setdefault(word)
        if marker is not None:
            directed.add((marker, word))
            marker = None
    return Signature(tuple(numbers), tuple(words), frozenset(directed))


def agrees(a: Signature, b: Signature) -> bool:
    """Same numbers, the same content words in the same order (a typo apart), the same directions."""
    return (a.numbers == b.numbers and _same_words(a.words, b.words)
            and {" ".join(d) for d in a.directed} == {" ".join(d) for d in b.directed})


def _same_words(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    # In order: "does rock beat scissors" is not "does scissors beat rock".
    return len(a) == len(b) and all(x == y or _one_typo_apart(x, y) for x, y in zip(a, b, strict=True))


def _stem(word: str) -> str:
    """Plurals and -ing/-ed forms, crudely: "keeping" and "keep" agree; "string" stays "string"."""
    for suffix, keep, root in (("ies", "y", 3), ("ing", "", 4), ("ed", "", 4), ("es", "", 4), ("s", "", 3)):
        if word.endswith(suffix) and len(word) - len(suffix) >= root and not word.endswith("ss"):
            return word[: -len(suffix)] + keep
    return word


def _one_typo_apart(a: str, b: str) -> bool:
    """One insertion, deletion, substitution or swap of neighbours; only for ASCII words of 4+ letters
    (in other scripts one character is too often the whole difference: 首行 / 首列)."""
    if min(len(a), len(b)) < 4 or abs(len(a) - len(b)) > 1 or not (a.isascii() and b.isascii()):
        return False
    if len(a) == len(b):
        diff = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]])
    short, long = (a, b) if len(a) < len(b) else (b, a)
    i = next((i for i in range(len(short)) if short[i] != long[i]), len(short))
    return short[i:] == long[i + 1:]


@dataclass
class _Entry:
    key: str
    signature: Signature
    expires_at: float


@dataclass
class _Scope:
    index: Any  # faiss.IndexIDMap2 over IndexFlatIP
    entries: dict[int, _Entry] = field(default_factory=dict)


class Embedder(Protocol):
    dimensions: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


@dataclass
class SemanticStats:
    lookups: int = 0
    hits: int = 0
    rejected_by_guard: int = 0  # similar enough, but the words or numbers differ
    entries: int = 0


class SemanticIndex:
    """Per-scope FAISS indexes of answered prompts, bounded in entries (oldest evicted first)."""

    def __init__(self, embedder: Embedder, *, threshold: float, max_entries: int = 100_000,
                 candidates: int = 4) -> None:
        import faiss

        self._faiss = faiss
        self._embedder = embedder
        self.threshold = threshold
        self._max_entries = max_entries
        self._candidates = candidates
        self._scopes: dict[str, _Scope] = {}
        self._order: OrderedDict[int, str] = OrderedDict()  # id → scope, oldest first
        self._next_id = 0
        self.stats = SemanticStats()

    async def lookup(self, scope: str, text: str) -> Probe:
        # The embedding (milliseconds) runs off the event loop; index reads and writes stay on it, so
        # they never run concurrently (FAISS indexes are not safe to write while read).
        vector = (await asyncio.to_thread(self._embedder.embed, [text]))[0]
        return self.lookup_now(scope, vector, signature(text))

    async def add(self, scope: str, probe: Probe, key: str, ttl_s: int) -> None:
        self.add_now(scope, np.frombuffer(probe.vector, dtype=np.float32), probe.signature, key, ttl_s)

    def lookup_now(self, scope: str, vector: np.ndarray, text: Signature) -> Probe:
        self.stats.lookups += 1
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        best_key, best = None, 0.0
        found = self._scopes.get(scope)
        if found is not None and found.entries:
            k = min(self._candidates, len(found.entries))
            sims, ids = found.index.search(vector.reshape(1, -1), k)
            now = time.monotonic()
            for sim, entry_id in zip(sims[0], ids[0], strict=True):
                entry = found.entries.get(int(entry_id))
                if entry is None or entry.expires_at <= now:
                    continue
                best = max(best, float(sim))
                if sim < self.threshold:
                    break  # results come best first
                if not agrees(entry.signature, text):
                    self.stats.rejected_by_guard += 1
                    continue
                best_key, best = entry.key, float(sim)
                break
        if best_key is not None:
            self.stats.hits += 1
        return Probe(best_key, best, vector.tobytes(), text)

    def add_now(self, scope: str, vector: np.ndarray, text: Signature, key: str, ttl_s: int) -> None:
        target = self._scopes.get(scope)
        if target is None:
            index = self._faiss.IndexIDMap2(self._faiss.IndexFlatIP(self._embedder.dimensions))
            target = self._scopes[scope] = _Scope(index)
        entry_id = self._next_id
        self._next_id += 1
        target.index.add_with_ids(np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1),
                                  np.array([entry_id], dtype=np.int64))
        target.entries[entry_id] = _Entry(key, text, time.monotonic() + ttl_s)
        self._order[entry_id] = scope
        while len(self._order) > self._max_entries:
            self._remove(*self._order.popitem(last=False))
        self._expire_some()
        self.stats.entries = len(self._order)

    def _expire_some(self, budget: int = 8) -> None:
        """Drop expired entries from the oldest end; a few per add keeps the cost flat."""
        now = time.monotonic()
        for entry_id, scope in list(itertools.islice(self._order.items(), budget)):
            entry = self._scopes[scope].entries.get(entry_id)
            if entry is not None and entry.expires_at > now:
                continue
            del self._order[entry_id]
            self._remove(entry_id, scope)

    def _remove(self, entry_id: int, scope: str) -> None:
        target = self._scopes[scope]
        target.entries.pop(entry_id, None)
        target.index.remove_ids(np.array([entry_id], dtype=np.int64))
        if not target.entries:
            del self._scopes[scope]



class SemanticJournal:
    """The index's entries also in Redis, each with its own TTL, so a restarted ``SemanticCache``
    replica rebuilds its index instead of starting empty. Best effort: Redis failures only log."""

    def __init__(self, redis: Any, *, prefix: str = "iir:sem:", timeout_s: float = 1.0) -> None:
        self._redis = redis
        self._prefix = prefix
        self._timeout_s = timeout_s
        # Warns once per outage; no pause: each entry still tries (the deployment's add awaits it).
        self._guard = FailOpen(
            logger, backoff=Backoff(0.0, 0.0),
            lost="semantic cache: could not journal an entry in Redis (%(error)s); a restart will not "
                 "find it",
            back="semantic cache: journaling entries in Redis again")

    async def record(self, scope: str, probe: Probe, key: str, ttl_s: int) -> None:
        entry = {"scope": scope, "key": key, "vector": base64.b64encode(probe.vector).decode(),
                 "numbers": probe.signature.numbers, "words": probe.signature.words,
                 "directed": sorted(probe.signature.directed)}
        name = self._prefix + hashlib.sha256(f"{scope}\0{key}".encode()).hexdigest()
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.set(name, json.dumps(entry), ex=max(ttl_s, 1))
        except Exception as exc:
            self._guard.failed(exc)
            return
        self._guard.succeeded()

    async def replay(self, index: SemanticIndex) -> int:
        """Add every journaled entry that has not expired to ``index``; how many were added."""
        added = 0
        try:
            async for names in _batches(self._redis.scan_iter(match=self._prefix + "*", count=500), 500):
                pipe = self._redis.pipeline(transaction=False)
                for name in names:
                    pipe.get(name)
                    pipe.ttl(name)
                replies = await pipe.execute()
                for raw, ttl in zip(replies[::2], replies[1::2], strict=True):
                    if raw is None or ttl is None or ttl <= 0:
                        continue
                    entry = json.loads(raw)
                    signature = Signature(tuple(entry["numbers"]), tuple(entry["words"]),
                                          frozenset(tuple(d) for d in entry["directed"]))
                    vector = np.frombuffer(base64.b64decode(entry["vector"]), dtype=np.float32)
                    index.add_now(entry["scope"], vector, signature, entry["key"], int(ttl))
                    added += 1
        except Exception as exc:
            logger.warning("semantic cache: rebuilding the index from Redis stopped after %d entries (%s)",
                           added, type(exc).__name__)
        return added


async def _batches(items: Any, size: int) -> Any:
    batch: list[Any] = []
    async for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
