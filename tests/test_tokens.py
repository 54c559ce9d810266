"""The shared tokenizer's prefix-block hashes."""

from __future__ import annotations

import random
import subprocess
import sys
import zlib
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from sage_llm.tokens import block_hashes, prompt_blocks, tokenize


def test_block_hashes_are_fixed_values() -> None:
    # Pinned: the control plane's prefix index and every engine must agree, in any process.
    assert block_hashes(list(range(1000, 1032)), 16) == (
        18313623081336438796,
        4233395434211761849,
    )
    text = "The quick brown fox jumps over the lazy dog, again and again and again."
    assert block_hashes(tokenize(text), 4) == (
        1733889139948316241,
        7571402478297943295,
        6189640712558523409,
        5988386140009812544,
    )


def test_block_hashes_are_stable_across_processes() -> None:
    code = "from sage_llm.tokens import block_hashes; print(block_hashes(list(range(64)), 16))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == str(block_hashes(list(range(64)), 16))


def test_block_hashes_are_chained_and_cover_full_blocks_only() -> None:
    a = list(range(100, 148))
    b = [*a[:16], 7, *a[17:]]  # differs in block 1 only
    ha, hb = block_hashes(a, 16), block_hashes(b, 16)
    assert len(ha) == 3 and ha[0] == hb[0]
    assert ha[1] != hb[1] and ha[2] != hb[2]  # block 2 is equal but its prefix is not
    assert block_hashes([*a, 1, 2, 3], 16) == ha  # a partial last block is not hashed
    assert block_hashes(a[:15], 16) == ()
    with pytest.raises(ValueError, match="block_size"):
        block_hashes(a, 0)


def test_ids_outside_32_bits_wrap_and_other_int_types_agree() -> None:
    ids = list(range(32))
    wrapped = [i + 2**32 if i % 3 else i for i in ids]
    wrapped[5] = 5 - 2**32
    assert block_hashes(wrapped, 16) == block_hashes(ids, 16)
    assert block_hashes(np.arange(32, dtype=np.int64).tolist(), 16) == block_hashes(ids, 16)
    assert block_hashes(tuple(ids), 16) == block_hashes(ids, 16)
    floats: list[Any] = [float(i) for i in ids]  # not typed as ids, but accepted
    assert block_hashes(floats, 16) == block_hashes(ids, 16)


def _reference_block_hashes(token_ids: Sequence[Any], block_size: int) -> tuple[int, ...]:
    """The documented definition, written plainly (one block at a time, no packing)."""
    out: list[int] = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        ids = [int(t) & 0xFFFFFFFF for t in token_ids[start : start + block_size]]
        data = parent.to_bytes(8, "little") + b"".join(i.to_bytes(4, "little") for i in ids)
        parent = zlib.crc32(data) | (zlib.adler32(data) << 32)
        out.append(parent)
    return tuple(out)


@pytest.mark.parametrize("seed", range(6))
def test_block_hashes_equal_the_plain_definition_on_random_inputs(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(200):
        block_size = rng.choice([1, 3, 4, 16, 17, 64])
        n = rng.choice([0, 1, block_size - 1, block_size, rng.randrange(0, 700)])
        ids: list[Any] = [rng.randrange(0, 32_000) for _ in range(n)]
        expected = _reference_block_hashes(ids, block_size)
        assert block_hashes(ids, block_size) == expected
        assert block_hashes(tuple(ids), block_size) == expected
        assert block_hashes(array("I", ids), block_size) == expected
        if ids:  # ids outside 32 bits (anywhere, the partial last block included) wrap
            wide = list(ids)
            for _ in range(rng.randrange(1, 4)):
                i = rng.randrange(n)
                wide[i] += rng.choice([2**32, -(2**32), 5 * 2**32])
            assert block_hashes(wide, block_size) == expected
            floats: list[Any] = [float(t) for t in ids]
            assert block_hashes(floats, block_size) == expected


def test_a_partial_last_block_is_never_read() -> None:
    ids: list[Any] = [*range(32), "not an id"]
    assert block_hashes(ids, 16) == block_hashes(list(range(32)), 16)


@pytest.mark.parametrize("seed", range(3))
def test_prompt_blocks_equal_tokenize_then_hash(seed: int) -> None:
    rng = random.Random(seed)
    words = ["the", "control", "plane", "schedules", "é", "!", "  ", "\n", "requests,", "x" * 13]
    for _ in range(100):
        block_size = rng.choice([1, 3, 16, 17])
        text = "".join(rng.choice(words) + rng.choice(["", " "]) for _ in range(rng.randrange(60)))
        ids = tokenize(text)
        assert prompt_blocks(text, block_size) == (len(ids), block_hashes(ids, block_size))
        assert prompt_blocks(ids, block_size) == (len(ids), block_hashes(ids, block_size))


def test_prompt_blocks_rejects_a_bad_block_size_even_for_a_short_prompt() -> None:
    with pytest.raises(ValueError, match="block_size"):
        prompt_blocks("hi", 0)
