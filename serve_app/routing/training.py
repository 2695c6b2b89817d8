"""``iir classifier train``: fit the classifier's head on ``data/classifier/*.jsonl`` and write
``configs/classifier/head.json`` and ``metrics.json``.

- **Split** (fixed, reproducible): an example is in validation when ``sha256(id) % 5 == 0`` (~20 %),
  else in training. ``hard_cases.jsonl`` (boundary cases) is never trained on: it is a second,
  harder test set.
- **Model**: multinomial logistic regression on ``classifier.features`` (the regularization strength
  picked by 5-fold cross-validation on the training split only), and ridge regression for complexity.
- **Augmentation** (``augment``, off by default): each training example also appears perturbed
  (``perturb``: with typos, or lower-cased without punctuation); never a validation one. Folds group an
  example with its copies, so cross-validation never scores a copy of what it trained on. Tried and
  left off: it cost clean and typo accuracy for a gain on lower-cased text (docs/PERFORMANCE.md).
- **Metrics** (validation and hard cases): accuracy, macro-F1, per-category precision/recall/F1, the
  confusion matrix, complexity MAE, and accuracy/coverage when abstaining below a confidence; for
  validation also the same prompts with typos and lower-cased (accuracy, macro-F1, how many
  predictions flip) and accuracy by language (``non_english``).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.routing.classifier import CATEGORIES, ClassifierHead, Embedder, features

REPO = Path(__file__).resolve().parents[2]
DATA_DIR = REPO / "data" / "classifier"
OUT_DIR = REPO / "configs" / "classifier"
HARD_CASES = "hard_cases.jsonl"
EMBEDDER = "all-MiniLM-L6-v2 int8 ONNX (serve_app/routing/embedder.py)"
VARIANTS = ("typos", "lowercase_no_punct")
TYPO_EVERY = 8  # one edit per ~8 words of 4+ letters, at least one per user turn


@dataclass(frozen=True)
class Example:
    id: str
    category: str
    complexity: float
    conversation: list[tuple[str, str]]

    @property
    def in_validation(self) -> bool:
        return int(hashlib.sha256(self.id.encode()).hexdigest(), 16) % 5 == 0


def load_examples(path: Path) -> list[Example]:
    examples = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if row["category"] not in CATEGORIES:
            raise ValueError(f"{path}:{n}: unknown category {row['category']!r}")
        examples.append(Example(row["id"], row["category"], float(row["complexity"]),
                                [(m["role"], m["content"]) for m in row["messages"]]))
    return examples


def load_dataset(data_dir: Path = DATA_DIR) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, validation, hard cases)."""
    regular = [e for f in sorted(data_dir.glob("*.jsonl")) if f.name != HARD_CASES for e in load_examples(f)]
    ids = [e.id for e in regular]
    if len(ids) != len(set(ids)):
        raise ValueError("duplicate example ids")
    hard = load_examples(data_dir / HARD_CASES) if (data_dir / HARD_CASES).exists() else []
    return [e for e in regular if not e.in_validation], [e for e in regular if e.in_validation], hard


def train(embedder: Embedder, data_dir: Path = DATA_DIR, *,
          augment: tuple[str, ...] = ()) -> tuple[ClassifierHead, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold

    train_set, validation, hard = load_dataset(data_dir)
    started = time.perf_counter()
    rows = [*train_set, *(perturb(e, v, seed="train") for v in augment for e in train_set)]
    x_train = features(embedder, [e.conversation for e in rows])
    y_train = np.array([CATEGORIES.index(e.category) for e in rows])
    search = GridSearchCV(LogisticRegression(max_iter=5000),
                          {"C": [2, 4, 8, 16, 32]}, scoring="f1_macro",
                          cv=StratifiedGroupKFold(5, shuffle=True, random_state=0))
    search.fit(x_train, y_train, groups=[e.id for e in rows])
    clf = search.best_estimator_
    ablation = feature_ablation(x_train, y_train, features(embedder, [e.conversation for e in validation]),
                                validation, search.best_params_["C"], embedder.dimensions)
    ridge = Ridge(alpha=10.0).fit(x_train, np.array([e.complexity for e in rows]))
    head = ClassifierHead.from_arrays(
        [CATEGORIES[i] for i in clf.classes_], clf.coef_, clf.intercept_, ridge.coef_,
        float(ridge.intercept_),
        embedder=EMBEDDER,
        trained_on={"examples": len(train_set), "rows": len(rows),
                    "augmentation": list(augment), "C": search.best_params_["C"],
                    "cv_macro_f1": round(float(search.best_score_), 4)},
    )
    metrics = {
        "split": "validation = sha256(id) % 5 == 0; hard_cases.jsonl never trained on",
        "counts": {"train": len(train_set), "validation": len(validation), "hard_cases": len(hard),
                   "per_category_train": _counts(train_set), "per_category_validation": _counts(validation)},
        "validation": evaluate(embedder, head, validation),
        "validation_robustness": robustness(embedder, head, validation),
        "validation_feature_ablation": ablation,
        "hard_cases": evaluate(embedder, head, hard) if hard else None,
        "train_seconds": round(time.perf_counter() - started, 1),
        "head": head.trained_on,
    }
    return head, metrics


def feature_ablation(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, validation: list[Example],
                     c: float, dims: int) -> dict[str, Any]:
    """Validation accuracy of heads fitted (same rows, same C) on parts of ``features``: what each
    part is worth. Columns: [request, context embeddings (2 × dims), 2 extras, n-grams]."""
    from sklearn.linear_model import LogisticRegression

    truth = [e.category for e in validation]
    parts = {"embeddings_only": slice(0, 2 * dims + 2), "ngrams_only": slice(2 * dims, None)}
    out: dict[str, Any] = {"C": c}
    for name, columns in parts.items():
        clf = LogisticRegression(C=c, max_iter=5000).fit(x_train[:, columns], y_train)
        out[name] = _accuracy(truth, [CATEGORIES[i] for i in clf.predict(x_val[:, columns])])
    return out


def evaluate(embedder: Embedder, head: ClassifierHead, examples: list[Example]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from serve_app.routing.classifier import EmbeddingClassifier

    results = EmbeddingClassifier(embedder, head).classify_many([e.conversation for e in examples])
    truth = [e.category for e in examples]
    predicted = [r.category for r in results]
    confidence = np.array([r.confidence for r in results])
    correct = np.array([t == p for t, p in zip(truth, predicted, strict=True)])
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=list(CATEGORIES), zero_division=0)
    matrix = confusion_matrix(truth, predicted, labels=list(CATEGORIES))
    abstain = {}
    for threshold in (0.3, 0.4, 0.5, 0.6, 0.7):
        kept = confidence >= threshold
        accuracy = round(float(correct[kept].mean()), 4) if kept.any() else None
        abstain[str(threshold)] = {"coverage": round(float(kept.mean()), 4), "accuracy_when_kept": accuracy}
    return {
        "n": len(examples),
        "accuracy": round(float(correct.mean()), 4),
        "macro_f1": round(float(f1_score(truth, predicted, labels=list(CATEGORIES), average="macro",
                                         zero_division=0)), 4),
        "per_category": {cat: {"precision": round(float(p), 4), "recall": round(float(r), 4),
                               "f1": round(float(f), 4), "support": int(s)}
                         for cat, p, r, f, s in zip(CATEGORIES, precision, recall, f1, support, strict=True)},
        "confusion": {"labels": list(CATEGORIES), "rows_true_cols_predicted": matrix.tolist()},
        "complexity_mae": round(float(np.mean([abs(r.complexity - e.complexity)
                                               for r, e in zip(results, examples, strict=True)])), 4),
        "abstain": abstain,
        "errors": [{"id": e.id, "true": e.category, "predicted": r.category, "confidence": r.confidence}
                   for e, r in zip(examples, results, strict=True) if e.category != r.category],
    }


def robustness(embedder: Embedder, head: ClassifierHead, examples: list[Example]) -> dict[str, Any]:
    """The same prompts with typos and lower-cased: accuracy, macro-F1 and how many predictions
    change from the clean text; and accuracy by language of the request."""
    from sklearn.metrics import f1_score

    from serve_app.routing.classifier import EmbeddingClassifier

    classifier = EmbeddingClassifier(embedder, head)
    truth = [e.category for e in examples]
    clean = [r.category for r in classifier.classify_many([e.conversation for e in examples])]
    out: dict[str, Any] = {"perturbation": f"user turns only; typos: one edit (swap, drop, double, "
                                           f"keyboard neighbour) per ~{TYPO_EVERY} words of 4+ letters, "
                                           "at least one per turn; seeded by id"}
    for variant in VARIANTS:
        changed = [perturb(e, variant) for e in examples]
        predicted = [r.category for r in classifier.classify_many([e.conversation for e in changed])]
        flips = sum(a != b for a, b in zip(clean, predicted, strict=True))
        out[variant] = {
            "accuracy": _accuracy(truth, predicted),
            "macro_f1": round(float(f1_score(truth, predicted, labels=list(CATEGORIES), average="macro",
                                             zero_division=0)), 4),
            "flips": flips, "flip_rate": round(flips / len(examples), 4),
        }
    out["by_language"] = by_language(examples, clean)
    return out


def by_language(examples: list[Example], predicted: list[str]) -> dict[str, Any]:
    """Accuracy on requests in other languages (``non_english``) against English ones, translation
    requests apart: the classifier once took "not English" for "translate"."""
    foreign = [non_english(e.conversation[-1][1]) for e in examples]
    out: dict[str, Any] = {}
    for name, language, translate in (("non_english", True, None), ("non_english_non_translate", True, False),
                                      ("english_non_translate", False, False)):
        idx = [i for i, e in enumerate(examples) if foreign[i] == language
               and (translate is None or (e.category == "translate") == translate)]
        out[name] = {"n": len(idx), "accuracy": _accuracy([examples[i].category for i in idx],
                                                          [predicted[i] for i in idx]),
                     "predicted_translate": sum(predicted[i] == "translate" for i in idx)}
    return out


def _accuracy(truth: list[str], predicted: list[str]) -> float | None:
    if not truth:
        return None
    return round(sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth), 4)


# ------------------------------------------------------------------------- perturbations and language

_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS = {c: row[max(i - 1, 0):i] + row[i + 1:i + 2] for row in _ROWS for i, c in enumerate(row)}
# Sentence punctuation goes; punctuation inside a token stays (os.path, 3.14, f(x)): hurried typists
# drop full stops and question marks, not the syntax of what they paste.
_LOOSE_PUNCT = re.compile(r"(?<!\S)[.,;:!?¿¡'\"…]+|[.,;:!?'\"…]+(?!\S)|[«»“”„‘’。，、？！：；「」]")
_WORD = re.compile(r"[^\W\d_]+")


def perturb(example: Example, variant: str, seed: str = "validation") -> Example:
    """``example`` as a hurried user would type it: ``typos`` or ``lowercase_no_punct``, in user turns
    only (assistant turns are model output). Deterministic: seeded by ``seed`` and the id."""
    turns = []
    for n, (role, text) in enumerate(example.conversation):
        if role == "user":
            if variant == "typos":
                text = add_typos(text, random.Random(f"{seed}:{example.id}:{n}"))
            elif variant == "lowercase_no_punct":
                text = _LOOSE_PUNCT.sub("", text.lower())
            else:
                raise ValueError(f"unknown variant {variant!r}")
        turns.append((role, text))
    return Example(example.id, example.category, example.complexity, turns)


def add_typos(text: str, rng: random.Random) -> str:
    """One edit per ~``TYPO_EVERY`` words of 4+ letters (at least one): swap two adjacent letters,
    drop one, double one, or hit a keyboard (QWERTY) neighbour."""
    words = [m for m in _WORD.finditer(text) if len(m.group()) >= 4]
    if not words:
        return text
    chosen = sorted(rng.sample(words, max(1, round(len(words) / TYPO_EVERY))), key=lambda m: m.start())
    out, last = [], 0
    for match in chosen:
        out += [text[last:match.start()], _edit(match.group(), rng)]
        last = match.end()
    return "".join([*out, text[last:]])


def _edit(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word) - 1)
    kind = rng.choice(("swap", "drop", "double", "neighbour"))
    near = _NEIGHBOURS.get(word[i].lower(), "")
    if kind == "neighbour" and near:
        key = rng.choice(near)
        return word[:i] + (key.upper() if word[i].isupper() else key) + word[i + 1:]
    if kind == "drop":
        return word[:i] + word[i + 1:]
    if kind == "double":
        return word[:i + 1] + word[i:]
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]  # swap; also a neighbour off QWERTY


# Function words frequent in one language family and rare elsewhere ("do", "y", "a", "in" are not).
_ENGLISH = frozenset("the and of for with are was this that what how why can could you your my we our please "
                     "does not from into about should would it if have has there which who need want give "
                     "write tell help just like some any they them these those will than when where".split())
_OTHER = frozenset("de la el que en los las del por para una es le les et est une des du pas je der das und "
                   "ist ich nicht mit ein eine zu os não com il di che non sono het een ik niet yang cette "
                   "sur avec dans pour mon mes "
                   "dan ini itu aku saya nie się jak czy bir ve bu için och att är jag det som på".split())


def non_english(text: str) -> bool:
    """A crude language guess for reporting, from the first 300 characters (where the instruction
    sits): a dozen non-Latin letters (or 30 %, for short texts), or more common non-English function
    words than English ones, or no English function word at all and an accented letter."""
    head = text[:300]
    letters = [c for c in head if c.isalpha()]
    if not letters:
        return False
    non_latin = sum("LATIN" not in unicodedata.name(c, "") for c in letters)
    if non_latin >= min(12, 0.3 * len(letters)):
        return True
    words = [w.lower() for w in _WORD.findall(head) if not w.isupper()]  # not SQL's SELECT … FROM
    english, other = sum(w in _ENGLISH for w in words), sum(w in _OTHER for w in words)
    return other > english or (english == 0 and any(not c.isascii() for c in letters))


def _counts(examples: list[Example]) -> dict[str, int]:
    return {cat: sum(1 for e in examples if e.category == cat) for cat in CATEGORIES}


def write(head: ClassifierHead, metrics: dict[str, Any], out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "head.json").write_text(head.model_dump_json() + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
