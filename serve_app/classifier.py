"""Prompt classification for ``model: "auto"``: a keyword scorer and the routing policy.

This is the honest first version (weighted keyword cues, no learning); a later issue swaps in an
embedding model with a trained head behind the same ``classify`` call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

CATEGORIES = ("code", "math", "reasoning", "creative", "summarize", "translate", "chat")

_CUES: dict[str, tuple[str, ...]] = {
    "code": (r"\bcode\b", r"\bpython\b", r"\bjavascript\b", r"\bfunction\b", r"\bbug\b", r"\bsql\b",
             r"\bregex\b", r"\bbash\b", r"\bcompile", r"\bdebug", r"def |class |import |```", r"\bdocker"),
    "math": (r"\d+\s*[-+*/^]\s*\d+", r"\bsolve\b", r"\bequation", r"\bintegral", r"\bderivative",
             r"\bprove\b", r"\bcalculate\b", r"\bsum of\b", r"\bprobability\b", r"\balgebra"),
    "reasoning": (r"\bwhy\b", r"\bstep by step\b", r"\btrade-?offs?\b", r"\bcompare\b", r"\bplan\b",
                  r"\bpuzzle\b", r"\blogic", r"\bpros and cons\b", r"\banaly[sz]e\b"),
    "creative": (r"\bstory\b", r"\bpoem\b", r"\bhaiku\b", r"\bjoke\b", r"\bslogan\b", r"\blyrics\b",
                 r"\bname ideas\b", r"\bimagine\b", r"\bwrite a song\b"),
    "summarize": (r"\bsummari[sz]e\b", r"\bsummary\b", r"\btl;?dr\b", r"\bcondense\b", r"\bkey points\b"),
    "translate": (r"\btranslat", r"\bin (french|spanish|german|italian|chinese|japanese)\b",
                  r"\binto (english|french|spanish|german)\b"),
    "chat": (r"^\s*(hi|hello|hey)\b", r"\bhow are you\b", r"\bthanks?\b", r"\bwhat is the capital\b"),
}
_COMPILED = {cat: [re.compile(p, re.IGNORECASE) for p in pats] for cat, pats in _CUES.items()}


@dataclass(frozen=True)
class Classification:
    category: str
    confidence: float
    complexity: float
    scores: dict[str, float]


class KeywordClassifier:
    """Scores each category by the cues it matches; ``chat`` wins when nothing matches."""

    async def classify(self, text: str) -> Classification:
        return self.classify_text(text)

    def classify_text(self, text: str) -> Classification:
        hits = {cat: sum(1 for p in pats if p.search(text)) for cat, pats in _COMPILED.items()}
        total = sum(hits.values())
        if total == 0:
            scores = {cat: (1.0 if cat == "chat" else 0.0) for cat in CATEGORIES}
            return Classification("chat", 0.5, _complexity(text), scores)
        scores = {cat: hits[cat] / total for cat in CATEGORIES}
        best = max(CATEGORIES, key=lambda c: scores[c])
        return Classification(best, scores[best], _complexity(text), scores)


def _complexity(text: str) -> float:
    # Length is a crude but monotone proxy until the trained head lands.
    return round(min(1.0, len(text.split()) / 400), 3)


class RoutingPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    default: str
    categories: dict[str, list[str]] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> RoutingPolicy:
        return cls.model_validate(yaml.safe_load(path.read_text()) or {})

    def choose(self, category: str, available: set[str]) -> str:
        """The first preferred model that is available, else the default."""
        for model_id in self.categories.get(category, []):
            if model_id in available:
                return model_id
        return self.default
