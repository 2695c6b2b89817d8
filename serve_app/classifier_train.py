"""``iir classifier train``: fit the classifier's head on ``data/classifier/*.jsonl`` and write
``configs/classifier/head.json`` and ``metrics.json``.

- **Split** (fixed, reproducible): an example is in validation when ``sha256(id) % 5 == 0`` (~20 %),
  else in training. ``hard_cases.jsonl`` (boundary cases) is never trained on: it is a second,
  harder test set.
- **Model**: multinomial logistic regression on ``classifier.features`` (the regularization strength
  picked by 5-fold cross-validation on the training split only), and ridge regression for complexity.
- **Metrics** (validation and hard cases): accuracy, macro-F1, per-category precision/recall/F1, the
  confusion matrix, complexity MAE, and accuracy/coverage when abstaining below a confidence.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serve_app.classifier import CATEGORIES, ClassifierHead, Embedder, features

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "data" / "classifier"
OUT_DIR = REPO / "configs" / "classifier"
HARD_CASES = "hard_cases.jsonl"
EMBEDDER = "all-MiniLM-L6-v2 int8 ONNX (serve_app/embedder.py)"


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


def train(embedder: Embedder, data_dir: Path = DATA_DIR) -> tuple[ClassifierHead, dict[str, Any]]:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.model_selection import GridSearchCV, StratifiedKFold

    train_set, validation, hard = load_dataset(data_dir)
    started = time.perf_counter()
    x_train = features(embedder, [e.conversation for e in train_set])
    y_train = np.array([CATEGORIES.index(e.category) for e in train_set])
    search = GridSearchCV(LogisticRegression(max_iter=5000),
                          {"C": [2, 4, 8, 16, 32]}, scoring="f1_macro",
                          cv=StratifiedKFold(5, shuffle=True, random_state=0))
    search.fit(x_train, y_train)
    clf = search.best_estimator_
    ridge = Ridge(alpha=10.0).fit(x_train, np.array([e.complexity for e in train_set]))
    head = ClassifierHead.from_arrays(
        [CATEGORIES[i] for i in clf.classes_], clf.coef_, clf.intercept_, ridge.coef_,
        float(ridge.intercept_),
        embedder=EMBEDDER,
        trained_on={"examples": len(train_set), "C": search.best_params_["C"],
                    "cv_macro_f1": round(float(search.best_score_), 4)},
    )
    metrics = {
        "split": "validation = sha256(id) % 5 == 0; hard_cases.jsonl never trained on",
        "counts": {"train": len(train_set), "validation": len(validation), "hard_cases": len(hard),
                   "per_category_train": _counts(train_set), "per_category_validation": _counts(validation)},
        "validation": evaluate(embedder, head, validation),
        "hard_cases": evaluate(embedder, head, hard) if hard else None,
        "train_seconds": round(time.perf_counter() - started, 1),
        "head": head.trained_on,
    }
    return head, metrics


def evaluate(embedder: Embedder, head: ClassifierHead, examples: list[Example]) -> dict[str, Any]:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    from serve_app.classifier import EmbeddingClassifier

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


def _counts(examples: list[Example]) -> dict[str, int]:
    return {cat: sum(1 for e in examples if e.category == cat) for cat in CATEGORIES}


def write(head: ClassifierHead, metrics: dict[str, Any], out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "head.json").write_text(head.model_dump_json() + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
