"""Prompt classification for ``model: "auto"``: sentence embeddings + a trained linear head, and the
routing policy that turns a classification into a model.

    conversation ─▶ (last user turn, earlier turns) ─▶ MiniLM int8 embeddings (serve_app/routing/embedder.py)
                                    └─▶ hashed character and word n-grams of the last user turn
                 ─▶ features ─▶ softmax head → category, confidence
                             ─▶ ridge head  → complexity in [0, 1]

The n-grams catch what sentence embeddings blur (code syntax, "tl;dr", "traduis", digits and
operators): on the validation split a head on the embeddings alone scores 0.77, on both 0.88
(``validation_feature_ablation`` in configs/classifier/metrics.json).

The head is trained by ``iir classifier train`` (``serve_app/routing/training.py``) on the
hand-written prompts in ``data/classifier/``; the artifact (``configs/classifier/head.json``) and its
metrics (``configs/classifier/metrics.json``) are committed. ``features`` below is used by both the
training and the serving path, so they cannot drift apart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.utils import murmurhash3_32

CATEGORIES = ("code", "math", "reasoning", "creative", "summarize", "translate", "chat")
Conversation = Sequence[tuple[str, str]]  # (role, text), in order; the last user turn is the request

# Long turns keep their head and tail, where instructions sit: ~1,000 characters for the n-grams, and
# ~500 (~128 tokens) for the embedding, whose cost grows with the square of its length (a 256-token
# text took 68 ms here, a 30-token one 5 ms).
HEAD_CHARS, TAIL_CHARS, CONTEXT_CHARS = 600, 400, 600
EMBED_HEAD_CHARS, EMBED_TAIL_CHARS = 300, 200
FOLLOW_UP_WORDS, FOLLOW_UP_CONTEXT_CHARS = 10, 300


@dataclass(frozen=True)
class Classification:
    category: str
    confidence: float
    complexity: float
    scores: dict[str, float]


class Embedder(Protocol):
    dimensions: int

    def embed(self, texts: list[str]) -> np.ndarray: ...


def conversation_parts(conversation: Conversation) -> tuple[str, str]:
    """(the request: the last user turn, its context: earlier user/assistant turns, newest last).

    System prompts are left out: they describe the assistant, not the request, and are often
    unrelated to it (a coding bot asked for small talk).
    """
    turns = [(role, text) for role, text in conversation if role in ("user", "assistant") and text.strip()]
    last_user = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=len(turns) - 1)
    if last_user < 0:
        return "", ""
    request = _clip(turns[last_user][1])
    context = "\n".join(text for _, text in turns[:last_user])[-CONTEXT_CHARS:]
    if context and len(request.split()) < FOLLOW_UP_WORDS:
        # "why does it crash?", "now in 3 bullets": a short follow-up means little without what it
        # follows, so the request is read with the end of the conversation before it.
        request = context[-FOLLOW_UP_CONTEXT_CHARS:] + "\n" + request
    return request, context


def _clip(text: str, head: int = HEAD_CHARS, tail: int = TAIL_CHARS) -> str:
    text = text.strip()
    if len(text) <= head + tail:
        return text
    return text[:head] + " … " + text[-tail:]


class HashedNGrams:
    """``HashingVectorizer(..., alternate_sign=False, norm="l2").transform(texts).toarray()`` as float32,
    without its per-call cost (parameter checks, a sparse matrix and its normalization: 0.7 ms a call,
    against 0.1 ms here). The same numbers to the bit: the same analyzer and hash (murmurhash3,
    sklearn's index rule), and the counts are small integers, so their sum of squares is exact in any
    order; the square root and the division are then the same IEEE operations.
    tests/routing/test_classifier.py compares the two on every prompt of the dataset.
    """

    def __init__(self, vectorizer: HashingVectorizer) -> None:
        assert not vectorizer.alternate_sign and vectorizer.norm == "l2" and not vectorizer.binary
        self.vectorizer = vectorizer  # the reference, for the tests
        self._analyze = vectorizer.build_analyzer()
        self._n = int(vectorizer.n_features)

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self._n), dtype=np.float64)
        for row, text in enumerate(texts):
            hashes = [murmurhash3_32(token, seed=0) for token in self._analyze(text)]
            if not hashes:
                continue
            counts = np.bincount([self._index(h) for h in hashes], minlength=self._n).astype(np.float64)
            out[row] = counts / np.sqrt(np.dot(counts, counts))
        return out.astype(np.float32)

    def _index(self, h: int) -> int:
        # sklearn's rule (feature_extraction/_hashing_fast.pyx): abs() of INT32_MIN does not fit
        return (2**31 - 1 - (self._n - 1)) % self._n if h == -(2**31) else abs(h) % self._n


# Stateless (hashing, no vocabulary to ship): the same transform at training and serving time.
_CHAR_NGRAMS = HashedNGrams(HashingVectorizer(n_features=2**12, analyzer="char_wb", ngram_range=(2, 4),
                                              alternate_sign=False, norm="l2"))
_WORD_NGRAMS = HashedNGrams(HashingVectorizer(n_features=2**12, analyzer="word", ngram_range=(1, 2),
                                              alternate_sign=False, norm="l2",
                                              token_pattern=r"(?u)\b\w+\b|[^\w\s]"))


def features(embedder: Embedder, conversations: Sequence[Conversation]) -> np.ndarray:
    """One row per conversation: [request embedding, context embedding (zeros if none),
    has_context, log length of the request, request char n-grams, request word n-grams,
    context word n-grams]."""
    parts = [conversation_parts(c) for c in conversations]
    texts = [request for request, _ in parts]
    with_context = [i for i, (_, context) in enumerate(parts) if context]
    vectors = embedder.embed([_clip(t, EMBED_HEAD_CHARS, EMBED_TAIL_CHARS) for t in texts]
                             + [parts[i][1][-(EMBED_HEAD_CHARS + EMBED_TAIL_CHARS):] for i in with_context])
    dims = embedder.dimensions
    context = np.zeros((len(parts), dims), dtype=np.float32)
    for row, i in enumerate(with_context):
        context[i] = vectors[len(texts) + row]
    extra = np.array([[1.0 if ctx else 0.0, math.log1p(len(req)) / 10] for req, ctx in parts],
                     dtype=np.float32)
    chars = _CHAR_NGRAMS.transform(texts)
    both = _WORD_NGRAMS.transform(texts + [ctx for _, ctx in parts])
    words, context_words = both[: len(texts)], both[len(texts):]
    return np.hstack([vectors[: len(texts)], context, extra, chars, words, context_words])


class ClassifierHead(BaseModel):
    """The trained artifact: a multinomial logistic regression and a ridge regression on ``features``.

    Weights are stored as base64 of little-endian float32 (head.json ≈ 560 KB instead of megabytes of
    JSON digits); ``categories``, the shape and the training facts stay readable.
    """

    model_config = ConfigDict(extra="forbid")
    categories: list[str]
    n_features: int
    weights_b64: str  # categories × n_features
    bias: list[float]
    complexity_weights_b64: str  # n_features
    complexity_bias: float
    embedder: str = Field(description="the embedding the head was trained on")
    trained_on: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_arrays(cls, categories: list[str], weights: np.ndarray, bias: np.ndarray,
                    complexity_weights: np.ndarray, complexity_bias: float, **info: Any) -> ClassifierHead:
        return cls(categories=categories, n_features=int(weights.shape[1]), weights_b64=_pack(weights),
                   bias=[float(b) for b in bias], complexity_weights_b64=_pack(complexity_weights),
                   complexity_bias=float(complexity_bias), **info)

    @classmethod
    def load(cls, path: Path) -> ClassifierHead:
        return cls.model_validate(json.loads(path.read_text()))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        weights = _unpack(self.weights_b64).reshape(len(self.categories), self.n_features)
        return (weights, np.asarray(self.bias, dtype=np.float32), _unpack(self.complexity_weights_b64),
                self.complexity_bias)


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def _unpack(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


class EmbeddingClassifier:
    def __init__(self, embedder: Embedder, head: ClassifierHead) -> None:
        self.embedder = embedder
        self._categories = head.categories
        self._w, self._b, self._cw, self._cb = head.arrays()

    @classmethod
    def load(cls, head_path: Path, cache_dir: Path) -> EmbeddingClassifier:
        from serve_app.routing.embedder import OnnxEmbedder

        head = ClassifierHead.load(head_path)  # first: a missing head fails before the model's ~0.6 s load
        return cls(OnnxEmbedder(cache_dir=cache_dir), head)

    def classify_many(self, conversations: Sequence[Conversation]) -> list[Classification]:
        x = features(self.embedder, conversations)
        # Row by row: a matrix product rounds differently with the batch's shape, and a result must
        # not depend on what else was in the batch.
        logits = np.stack([self._w @ row for row in x]) + self._b
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        complexity = np.clip(np.array([self._cw @ row for row in x]) + self._cb, 0.0, 1.0)
        results = []
        for row, c in zip(probs, complexity, strict=True):
            best = int(row.argmax())
            scores = {cat: round(float(p), 4) for cat, p in zip(self._categories, row, strict=True)}
            results.append(Classification(self._categories[best], round(float(row[best]), 4),
                                          round(float(c), 3), scores))
        return results

    async def classify(self, conversation: Conversation) -> Classification:
        """For tests and tools; the ingress runs ``classify_many`` on its own worker thread
        (``serve_app/routing/in_process.py``)."""
        [result] = await asyncio.to_thread(self.classify_many, [conversation])
        return result


# ------------------------------------------------------------------------------------------- routing


class RoutingPolicy(BaseModel):
    """``configs/routing.yaml``: classification → model.

    Preference lists (default): the first *available* model of the category's list, falling through
    to the next; at ``complexity >= complex_from`` the category's ``when_complex`` list is tried first.
    An entry ``tag:<name>`` stands for the available models carrying that tag (``models.yaml``),
    cheapest first. Cost-aware (``cost_aware: true``): among available chat models whose
    ``quality_tier`` covers the category's tier (one tier more when complex), the cheapest by
    ``cost_per_1k_tokens``; when none covers it, the best tier there is. A classification below
    ``min_confidence``, or none at all (classifier down), takes ``default``: abstaining beats a
    confident-looking guess. ``default`` itself falls through to the cheapest available chat model.
    """

    model_config = ConfigDict(extra="forbid")
    default: str
    min_confidence: float = Field(0.0, ge=0, le=1)
    categories: dict[str, list[str]] = Field(default_factory=dict)
    when_complex: dict[str, list[str]] = Field(default_factory=dict)
    cost_aware: bool = False
    tiers: dict[str, int] = Field(default_factory=dict)
    complex_from: float = Field(0.7, ge=0, le=1)

    @field_validator("categories", "when_complex", "tiers")
    @classmethod
    def _known_categories(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(CATEGORIES))
        if unknown:  # a misspelt key would otherwise be ignored in silence
            raise ValueError(f"unknown categories {unknown}; the taxonomy is {list(CATEGORIES)}")
        return value

    @classmethod
    def load(cls, path: Path) -> RoutingPolicy:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})

    def choose(self, result: Classification, candidates: Sequence[Candidate]) -> tuple[str, str]:
        """(model id, why): ``candidates`` are the available chat models."""
        category = result.category
        if result.confidence < self.min_confidence:
            why = f"confidence {result.confidence:.2f} below {self.min_confidence:g}"
            return self.fallback(candidates, why)
        complex_ = result.complexity >= self.complex_from
        if self.cost_aware:
            return self._cheapest_covering(category, complex_, candidates)
        lists = [(self.when_complex.get(category, []), f"complex {category}")] if complex_ else []
        lists.append((self.categories.get(category, []), category))
        for preferences, label in lists:
            for model_id in self._expand(preferences, candidates):
                return model_id, f"first available for {label}"
        return self.fallback(candidates, f"none of {category}'s models is available")

    def fallback(self, candidates: Sequence[Candidate], why: str) -> tuple[str, str]:
        """``default``, or while it is unavailable the cheapest available chat model."""
        if self.default in {c.id for c in candidates} or not candidates:
            return self.default, f"{why}: default"
        cheapest = min(candidates, key=_cost_then_tier)
        return cheapest.id, f"{why}: default {self.default} unavailable, cheapest available"

    def _cheapest_covering(self, category: str, complex_: bool,
                           candidates: Sequence[Candidate]) -> tuple[str, str]:
        tier = self.tiers.get(category, 1) + (1 if complex_ else 0)
        covering = [c for c in candidates if c.quality_tier >= tier]
        if covering:
            return min(covering, key=_cost_then_tier).id, f"cheapest with quality tier >= {tier}"
        if not candidates:
            return self.fallback(candidates, f"no model available for tier {tier}")
        # Nothing is good enough: the best there is beats the default small model.
        best_tier = max(c.quality_tier for c in candidates)
        best = min((c for c in candidates if c.quality_tier == best_tier), key=_cost_then_tier)
        return best.id, f"no available model has quality tier >= {tier}: best tier ({best_tier})"

    @staticmethod
    def _expand(preferences: Sequence[str], candidates: Sequence[Candidate]) -> list[str]:
        """Available model ids in preference order; ``tag:x`` → the models tagged x, cheapest first."""
        available = {c.id for c in candidates}
        models: list[str] = []
        for entry in preferences:
            if entry.startswith(TAG_PREFIX):
                tag = entry[len(TAG_PREFIX):]
                models += [c.id for c in sorted(candidates, key=_cost_then_tier) if tag in c.tags]
            elif entry in available:
                models.append(entry)
        return models


TAG_PREFIX = "tag:"


@dataclass(frozen=True)
class Candidate:
    id: str
    quality_tier: int
    cost: float | None
    tags: frozenset[str] = frozenset()


def _cost_then_tier(candidate: Candidate) -> tuple[float, int, str]:
    """Cheapest first (unknown cost last), then the higher tier, then by id for a stable choice."""
    return (math.inf if candidate.cost is None else candidate.cost, -candidate.quality_tier, candidate.id)
