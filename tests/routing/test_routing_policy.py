"""The routing policy (``configs/routing.yaml``): a classification and the available models → a model."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve_app.registry.catalog import load_catalog
from serve_app.routing.classifier import CATEGORIES, Candidate, Classification, RoutingPolicy

REPO = Path(__file__).resolve().parents[2]


def result(category: str, confidence: float = 0.9, complexity: float = 0.2) -> Classification:
    return Classification(category, confidence, complexity, {})


def test_the_first_available_preference_wins_and_lists_fall_through() -> None:
    policy = RoutingPolicy(default="local/small", categories={"code": ["remote/big", "local/mid"]})
    both = [Candidate("remote/big", 2, 0.5), Candidate("local/mid", 1, 0.01)]
    assert policy.choose(result("code"), both)[0] == "remote/big"
    assert policy.choose(result("code"), both[1:])[0] == "local/mid"
    assert policy.choose(result("code"), [])[0] == "local/small"
    # No list for math: the default, or while it is unavailable the cheapest available model.
    assert policy.choose(result("math"), both)[0] == "local/mid"
    assert policy.choose(result("math"), [*both, Candidate("local/small", 1, 0.02)])[0] == "local/small"


def test_an_unavailable_default_falls_to_the_cheapest_available_model() -> None:
    policy = RoutingPolicy(default="local/small", min_confidence=0.5)
    models = [Candidate("remote/big", 2, 0.5), Candidate("local/mid", 1, 0.01)]
    model, why = policy.fallback(models, "classifier unavailable")
    assert model == "local/mid" and "local/small unavailable" in why
    assert policy.choose(result("code", confidence=0.1), models)[0] == "local/mid"
    assert policy.fallback([], "x")[0] == "local/small"  # nothing at all: the default's own 503 says why


def test_low_confidence_abstains_to_the_default() -> None:
    policy = RoutingPolicy(default="local/small", min_confidence=0.5, categories={"code": ["remote/big"]})
    models = [Candidate("remote/big", 2, 0.5), Candidate("local/small", 1, 0.01)]
    model, why = policy.choose(result("code", confidence=0.42), models)
    assert model == "local/small" and "below" in why
    assert policy.choose(result("code", confidence=0.5), models)[0] == "remote/big"


def test_complex_prompts_try_their_own_list_first() -> None:
    policy = RoutingPolicy(default="small", complex_from=0.7, categories={"creative": ["small", "big"]},
                           when_complex={"creative": ["big"]})
    models = [Candidate("small", 1, 0.001), Candidate("big", 2, 0.5)]
    assert policy.choose(result("creative", complexity=0.69), models)[0] == "small"
    model, why = policy.choose(result("creative", complexity=0.7), models)
    assert model == "big" and "complex" in why
    assert policy.choose(result("creative", complexity=0.9), models[:1])[0] == "small"  # falls through


def test_a_tag_stands_for_the_available_models_carrying_it_cheapest_first() -> None:
    policy = RoutingPolicy(default="d", categories={"chat": ["tag:fast", "d"]})
    models = [Candidate("fast-dear", 1, 0.002, frozenset({"fast"})),
              Candidate("fast-cheap", 1, 0.001, frozenset({"fast", "cpu"})),
              Candidate("slow", 1, 0.0001), Candidate("d", 1, 0.01)]
    assert policy.choose(result("chat"), models)[0] == "fast-cheap"
    assert policy.choose(result("chat"), [models[0], *models[2:]])[0] == "fast-dear"
    assert policy.choose(result("chat"), models[2:])[0] == "d"


def test_cost_aware_picks_the_cheapest_model_whose_tier_covers_the_category() -> None:
    policy = RoutingPolicy(default="tiny", cost_aware=True, tiers={"code": 2, "chat": 1}, complex_from=0.7)
    models = [Candidate("tiny", 1, 0.0002), Candidate("mid", 2, 0.0006), Candidate("mid-cheap", 2, 0.0004),
              Candidate("big", 3, 0.01)]
    assert policy.choose(result("chat"), models)[0] == "tiny"
    assert policy.choose(result("code"), models)[0] == "mid-cheap"
    assert policy.choose(result("code", complexity=0.8), models)[0] == "big"  # one tier more
    # Nothing covers tier 3: the best tier there is (the cheaper of the two tier-2 models), not the default.
    model, why = policy.choose(result("code", complexity=0.8), models[:3])
    assert model == "mid-cheap" and "best tier" in why


def test_unknown_cost_counts_as_the_dearest() -> None:
    policy = RoutingPolicy(default="d", cost_aware=True, tiers={"code": 1})
    models = [Candidate("unknown", 1, None), Candidate("known", 1, 9.0)]
    assert policy.choose(result("code"), models)[0] == "known"


@pytest.mark.parametrize("field", ["categories", "when_complex", "tiers"])
def test_a_misspelt_category_is_refused(field: str) -> None:
    with pytest.raises(ValidationError, match="unknown categories"):
        RoutingPolicy.model_validate({"default": "d", field: {"cod": [] if field != "tiers" else 2}})


def test_repo_routing_config_loads_and_names_real_models() -> None:
    policy = RoutingPolicy.load(REPO / "configs" / "routing.yaml")
    catalog = load_catalog(REPO / "configs" / "models.yaml", REPO / "configs" / "providers.yaml")
    ids = {m.id for m in catalog.models}
    lists = [*policy.categories.values(), *policy.when_complex.values()]
    named = {policy.default} | {m for models in lists for m in models if not m.startswith("tag:")}
    assert named <= ids
    assert set(policy.categories) == set(CATEGORIES) and set(policy.tiers) == set(CATEGORIES)
    tags = {e.removeprefix("tag:") for ms in policy.categories.values() for e in ms if e.startswith("tag:")}
    assert all(any(tag in m.tags for m in catalog.models) for tag in tags)  # every tag names some model
