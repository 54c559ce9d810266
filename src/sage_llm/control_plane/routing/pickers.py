"""Routing pickers: choose one instance from the combined scores.

Pickers take a non-empty mapping of instance id → combined score in [0, 1] and use only
the ``random.Random`` they are given, so a seeded pipeline is deterministic. Ids are
sorted before any random draw so the result does not depend on mapping order.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, cast

TIE_EPSILON = 1e-9
"""Scores closer than this are treated as equal."""


def _require(scores: Mapping[str, float]) -> list[str]:
    if not scores:
        raise ValueError("cannot pick from an empty set of scores")
    return sorted(scores)


def best_of(ids: list[str], scores: Mapping[str, float], rng: random.Random) -> str:
    """The id with the highest score among ``ids``; ties broken uniformly by ``rng``, among
    the tied ids in sorted order (only they are sorted: ``ids`` may come in any order)."""
    top = max(map(scores.__getitem__, ids))
    tied = [i for i in ids if scores[i] >= top - TIE_EPSILON]
    if len(tied) == 1:
        return tied[0]
    tied.sort()
    return rng.choice(tied)


class MaxPicker:
    """The highest combined score; ties broken uniformly at random."""

    name = "max"

    def pick(self, scores: Mapping[str, float], rng: random.Random) -> str:
        if not scores:
            raise ValueError("cannot pick from an empty set of scores")
        return best_of(list(scores), scores, rng)  # sorts only the tied ids


class WeightedRandomPicker:
    """A random instance with probability proportional to its score (``floor`` added to
    every score so that low scorers keep a small chance); uniform when all are zero."""

    name = "weighted_random"

    def __init__(self, floor: float = 0.0) -> None:
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {floor!r}")
        self.floor = floor

    def pick(self, scores: Mapping[str, float], rng: random.Random) -> str:
        ids = _require(scores)
        weights = [max(0.0, scores[i]) + self.floor for i in ids]
        total = sum(weights)
        if total <= 0.0:
            return rng.choice(ids)
        x = rng.random() * total
        for iid, w in zip(ids, weights, strict=True):
            x -= w
            if x < 0.0:
                return iid
        return ids[-1]


def sample_two(ids: list[str], rng: random.Random) -> tuple[str, str]:
    """``rng.sample(ids, 2)`` (``len(ids) >= 2``): the same draws and the same pair.

    For a plain :class:`random.Random` the two draws are made as ``Random.sample`` makes
    them (a swap pool up to 21 members, rejection of a repeated index above), without its
    argument checks and lists; any other generator is asked for ``sample`` itself.
    """
    if type(rng) is not random.Random:
        a, b = rng.sample(ids, 2)
        return a, b
    randbelow = cast(Any, rng)._randbelow
    n = len(ids)
    j = randbelow(n)
    if n <= 21:
        k = randbelow(n - 1)
        return ids[j], ids[n - 1] if k == j else ids[k]
    k = randbelow(n)
    while k == j:
        k = randbelow(n)
    return ids[j], ids[k]


class PowerOfTwoPicker:
    """Samples two distinct instances uniformly and takes the better scored of the pair
    (ties broken at random); with a single candidate, that one."""

    name = "power_of_two"

    def pick(self, scores: Mapping[str, float], rng: random.Random) -> str:
        ids = _require(scores)
        if len(ids) == 1:
            return ids[0]
        a, b = sample_two(ids, rng)
        if b < a:
            a, b = b, a
        # best_of([a, b], scores, rng), unrolled
        score_a, score_b = scores[a], scores[b]
        top = score_b if score_b > score_a else score_a
        a_tied = score_a >= top - TIE_EPSILON
        b_tied = score_b >= top - TIE_EPSILON
        if a_tied and b_tied:
            return rng.choice([a, b])
        if a_tied != b_tied:
            return a if a_tied else b
        return best_of([a, b], scores, rng)  # neither (NaN scores): as best_of does
