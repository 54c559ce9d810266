"""The shared tokenizer's prefix-block hashes."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest

from sage_llm.tokens import block_hashes, tokenize


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
