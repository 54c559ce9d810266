"""Pickers: max with seeded ties, weighted random, power of two."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sage_llm.control_plane.routing.base import Picker
from sage_llm.control_plane.routing.pickers import MaxPicker, PowerOfTwoPicker, WeightedRandomPicker


@pytest.mark.parametrize("picker", [MaxPicker(), WeightedRandomPicker(), PowerOfTwoPicker()])
def test_pickers_follow_the_protocol_and_refuse_empty_input(picker: Picker) -> None:
    assert isinstance(picker, Picker)
    with pytest.raises(ValueError, match="empty"):
        picker.pick({}, random.Random(0))


@pytest.mark.parametrize("picker", [MaxPicker(), WeightedRandomPicker(), PowerOfTwoPicker()])
def test_single_candidate_is_always_picked(picker: Picker) -> None:
    assert picker.pick({"only": 0.0}, random.Random(1)) == "only"


def test_max_picks_the_highest() -> None:
    assert MaxPicker().pick({"a": 0.2, "b": 0.9, "c": 0.5}, random.Random(0)) == "b"


def test_max_breaks_ties_randomly_but_deterministically() -> None:
    scores = {"a": 0.7, "b": 0.7, "c": 0.7, "d": 0.1}
    picks = [MaxPicker().pick(scores, random.Random(seed)) for seed in range(60)]
    assert set(picks) == {"a", "b", "c"}
    again = [MaxPicker().pick(scores, random.Random(seed)) for seed in range(60)]
    assert picks == again


def test_max_ignores_mapping_order() -> None:
    scores = {"b": 0.5, "a": 0.5}
    reordered = {"a": 0.5, "b": 0.5}
    for seed in range(20):
        assert MaxPicker().pick(scores, random.Random(seed)) == MaxPicker().pick(
            reordered, random.Random(seed)
        )


def test_weighted_random_ignores_mapping_order() -> None:
    scores = {"c": 0.2, "b": 0.5, "a": 0.3}
    reordered = {"a": 0.3, "b": 0.5, "c": 0.2}
    for seed in range(20):
        assert WeightedRandomPicker().pick(
            scores, random.Random(seed)
        ) == WeightedRandomPicker().pick(reordered, random.Random(seed))


def test_weighted_random_is_proportional_to_scores() -> None:
    rng = random.Random(7)
    picker = WeightedRandomPicker()
    counts = Counter(picker.pick({"a": 0.75, "b": 0.25, "c": 0.0}, rng) for _ in range(4000))
    assert counts["c"] == 0
    assert 0.70 < counts["a"] / 4000 < 0.80


def test_weighted_random_is_uniform_when_all_scores_are_zero() -> None:
    rng = random.Random(3)
    counts = Counter(WeightedRandomPicker().pick({"a": 0.0, "b": 0.0}, rng) for _ in range(2000))
    assert 0.4 < counts["a"] / 2000 < 0.6


def test_weighted_random_floor_keeps_zero_scores_possible() -> None:
    rng = random.Random(5)
    picker = WeightedRandomPicker(floor=0.1)
    counts = Counter(picker.pick({"a": 1.0, "b": 0.0}, rng) for _ in range(3000))
    assert counts["b"] > 0


def test_weighted_random_rejects_a_bad_floor() -> None:
    with pytest.raises(ValueError, match="floor"):
        WeightedRandomPicker(floor=-0.5)


def test_power_of_two_never_picks_the_worst() -> None:
    scores = {"low": 1.0, "mid": 0.5, "high": 0.0}  # score = 1 − load
    rng = random.Random(11)
    counts = Counter(PowerOfTwoPicker().pick(scores, rng) for _ in range(3000))
    assert counts["high"] == 0
    # "low" wins both pairs it is sampled in (2 of 3 pairs), "mid" one pair
    assert 0.6 < counts["low"] / 3000 < 0.73
    assert 0.27 < counts["mid"] / 3000 < 0.4


def test_power_of_two_picks_the_better_of_two() -> None:
    for seed in range(30):
        assert PowerOfTwoPicker().pick({"a": 0.1, "b": 0.8}, random.Random(seed)) == "b"


def _reference_max(scores: dict[str, float], rng: random.Random) -> str:
    """The max picker's definition: the highest score over the ids in sorted order, ties
    broken by one ``rng.choice`` among the tied ids in that order."""
    ids = sorted(scores)
    top = max(scores[i] for i in ids)
    tied = [i for i in ids if scores[i] >= top - 1e-9]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


@pytest.mark.parametrize("seed", range(4))
def test_max_matches_its_definition_draw_for_draw(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        n = rng.randrange(1, 12)
        ids = rng.sample([f"e{k}" for k in range(20)], n)
        scores = {i: rng.choice([0.0, 0.25, 0.5, 1.0, rng.random()]) for i in ids}
        draw = rng.randrange(10**6)
        assert MaxPicker().pick(scores, random.Random(draw)) == _reference_max(
            scores, random.Random(draw)
        )
