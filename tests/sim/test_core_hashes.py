"""The engine core's copy of the prompt block hashes equals ``sage_llm.tokens``'s."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest

from sage_llm import tokens
from sage_llm.sim.core import STEP_FIELDS, StepResult, prompt_block_hashes


@pytest.mark.parametrize("seed", range(20))
def test_random_prompts_hash_as_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        n = rng.randrange(0, 600)
        top = rng.choice([2**8, 2**17, 2**32])
        ids = [rng.randrange(top) for _ in range(n)]
        block = rng.choice([1, 3, 16, 32, 64])
        assert prompt_block_hashes(ids, block) == tokens.block_hashes(ids, block)


@pytest.mark.parametrize(
    "ids",
    [
        [],
        [7] * 15,
        [7] * 16,
        [2**32 - 1] * 40,
        [2**32, 5, 6] * 20,  # outside uint32: taken modulo 2**32, as the reference does
        [-1] * 33,
        [1.0] * 32,
        [True, False] * 20,
        (3, 4, 5) * 20,  # not a list: the reference hashes it
        np.arange(100, dtype=np.int64),
        list(np.arange(100, dtype=np.int64)),
    ],
)
def test_odd_inputs_hash_as_the_reference(ids: Sequence[int]) -> None:
    for block in (1, 16):
        assert prompt_block_hashes(ids, block) == tokens.block_hashes(ids, block)


def test_bad_block_size_is_refused_as_the_reference() -> None:
    with pytest.raises(ValueError, match="block_size"):
        prompt_block_hashes([1, 2, 3], 0)


def test_step_result_lists_are_made_when_first_read() -> None:
    res = StepResult(duration_s=0.5)
    assert not res.has_firsts_or_finishes()
    assert res.finished == [] and res.first_tokens == []
    res.first_tokens.append("a")
    assert res.has_firsts_or_finishes()
    res.finished = [("b", "length")]
    assert res.finished == [("b", "length")]
    assert {name: getattr(res, name) for name in STEP_FIELDS} == {
        "duration_s": 0.5,
        "idle": False,
        "new_tokens": [],
        "finished": [("b", "length")],
        "preempted": [],
        "admitted": [],
        "num_prefill_tokens": 0,
        "num_decode_tokens": 0,
        "num_cached_tokens": 0,
        "kv_pinned": [],
        "kv_pulled": [],
        "num_new_tokens": 0,
        "first_tokens": ["a"],
    }
    assert res == StepResult(duration_s=0.5, finished=[("b", "length")], first_tokens=["a"])
    assert res != StepResult(duration_s=0.5)
    assert res != "a step"  # only a step equals a step
    res.preempted, res.admitted, res.kv_pulled = ["c"], [("d", 3)], [("e0", "d")]
    res.kv_pinned = []
    assert (res.preempted, res.admitted, res.kv_pulled) == (["c"], [("d", 3)], [("e0", "d")])
    assert res == StepResult(
        duration_s=0.5, finished=[("b", "length")], first_tokens=["a"], preempted=["c"],
        admitted=[("d", 3)], kv_pulled=[("e0", "d")],
    )  # fmt: skip
    assert repr(StepResult()).startswith("StepResult(duration_s=0.0, idle=False, new_tokens=[]")
