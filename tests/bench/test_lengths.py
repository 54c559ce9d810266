"""Promises of the length distributions."""

from __future__ import annotations

import numpy as np

from sage_llm.bench.lengths import LogNormal


def test_lognormal_is_clipped_to_both_bounds() -> None:
    draws = LogNormal(10, 2.0, lo=8, hi=12).sample(np.random.default_rng(0), 2000)
    assert (min(draws), max(draws)) == (8, 12)  # both tails pile onto the bounds
