"""The shared tokenizer: its pieces, their count and the prefix-block hashes."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import zlib
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from sage_llm import tokens
from sage_llm.tokens import (
    block_hashes,
    chat_prompt_text,
    count_tokens,
    prompt_blocks,
    split,
    tokenize,
)


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


def test_salted_hashes_share_no_block_across_salts() -> None:
    """vLLM's ``cache_salt``: the same prompt under two salts, or salted and not, shares no
    block; under one salt it shares all, in every process (fixed values)."""
    plain = tokens.block_hashes(list(range(64)), 16)
    a, b = tokens.salted_hashes(plain, "tenant-a"), tokens.salted_hashes(plain, "tenant-b")
    assert len(a) == len(b) == len(plain) == 4
    assert not set(a) & set(b) and not set(a) & set(plain) and not set(b) & set(plain)
    assert a == tokens.salted_hashes(plain, "tenant-a")
    key = zlib.crc32(b"tenant-a") | (zlib.adler32(b"tenant-a") << 32)
    assert a == tuple(h ^ key for h in plain)
    assert tokens.salted_hashes((), "tenant-a") == ()


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


def test_ids_wrap_modulo_2_to_the_32_with_the_high_bit_kept() -> None:
    # a negative id is its value modulo 2**32, not a 31-bit one: -1 is 2**32 - 1
    high = [2**32 - 1, 2**31, 2**31 + 5, 7]
    assert block_hashes([-1, 2**31, 2**31 + 5 - 2**32, 7], 4) == block_hashes(high, 4)
    assert block_hashes([2**32 - 1 + 2**32, 2**31, 2**31 + 5, 7], 4) == block_hashes(high, 4)
    assert block_hashes(high, 4) != block_hashes([2**31 - 1, 0, 5, 7], 4)


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


def _reference_text_hashes(text: str, block_size: int) -> tuple[int, ...]:
    """The documented definition for a text, written plainly: the CRC-32 and Adler-32 of
    the UTF-8 text up to the end of each full block of pieces."""
    pieces = split(text)
    out: list[int] = []
    for end in range(block_size, len(pieces) + 1, block_size):
        data = "".join(pieces[:end]).encode("utf-8", "surrogatepass")
        out.append(zlib.crc32(data) | (zlib.adler32(data) << 32))
    return tuple(out)


_PIECES = ["the", "control", "plane", "schedules", "é", "!", "  ", "\n", "\t", "requests,",
           "x" * 13, "y" * 8, "z" * 17, "_", "42", "日本語", "٣", "\x1c", "\u2028", "\u00a0",
           "😀", "𝐀𝐁", "\ud800", "a.b", "--", "\r\n"]  # fmt: skip


def _random_text(rng: random.Random, pieces: int) -> str:
    return "".join(rng.choice(_PIECES) + rng.choice(["", " "]) for _ in range(pieces))


@pytest.mark.parametrize("vector_min_chars", [0, 10**9])
@pytest.mark.parametrize("seed", range(3))
def test_prompt_blocks_of_a_text_count_its_pieces_and_hash_its_block_prefixes(
    seed: int, vector_min_chars: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # both ways of finding the pieces (numpy for long texts, the regex for short ones)
    monkeypatch.setattr(tokens, "_VECTOR_MIN_CHARS", vector_min_chars)
    rng = random.Random(seed)
    for _ in range(300):
        block_size = rng.choice([1, 2, 3, 8, 16, 17])
        text = _random_text(rng, rng.randrange(1, 80))
        n = len(split(text))
        assert prompt_blocks(text, block_size) == (n, _reference_text_hashes(text, block_size))
        assert count_tokens(text) == n


def test_prompt_blocks_of_token_ids_are_their_block_hashes() -> None:
    rng = random.Random(7)
    for _ in range(50):
        ids = tokenize(_random_text(rng, rng.randrange(1, 60)))
        for block_size in (1, 3, 16):
            assert prompt_blocks(ids, block_size) == (len(ids), block_hashes(ids, block_size))


def test_long_texts_take_the_vector_path_with_the_same_answer() -> None:
    rng = random.Random(11)
    text = _random_text(rng, 3000)
    assert len(text) >= tokens._VECTOR_MIN_CHARS
    assert prompt_blocks(text, 16) == (len(split(text)), _reference_text_hashes(text, 16))
    assert count_tokens(text) == len(split(text))
    for edge in (" " * 3000, "x" * 3000, "!" * 3000, text + "   ", "  " + text):
        assert prompt_blocks(edge, 16) == (len(split(edge)), _reference_text_hashes(edge, 16))


def test_shared_text_prefixes_share_their_leading_block_hashes() -> None:
    system = "You are a helpful assistant that answers questions about GPUs. " * 8
    a = prompt_blocks(system + "What is a GPU?", 16)[1]
    b = prompt_blocks(system + "Explain NVLink to me, please, in detail.", 16)[1]
    shared = len(split(system)) // 16
    assert shared >= 4
    assert a[:shared] == b[:shared]
    assert a[shared:] != b[shared:]
    # a word cut short at the same place is a different piece: nothing after it matches
    c = prompt_blocks(system[:-2] + "sX tail of the prompt", 16)[1]
    assert c[: shared - 1] == a[: shared - 1]


def test_character_classes_are_the_regular_expressions() -> None:
    # the vector path classifies characters with str methods; the regex with \\s and \\w
    space, word = re.compile(r"\s"), re.compile(r"\w")
    for code in range(0x110000):
        ch = chr(code)
        expected = 0 if space.match(ch) else 1 if word.match(ch) else 2
        assert tokens._class_of(ch) == expected, hex(code)
        if code < 0x10000:
            assert tokens._BMP_CLASSES[code] == expected, hex(code)


def test_prompt_blocks_rejects_a_bad_block_size_even_for_a_short_prompt() -> None:
    with pytest.raises(ValueError, match="block_size"):
        prompt_blocks("hi", 0)


def test_chat_prompt_text_of_a_turn_without_content_has_an_empty_body() -> None:
    turn: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": []}
    assert chat_prompt_text([turn], generation_prompt=False) == "<|assistant|> "
    assert chat_prompt_text([{"role": "user"}], generation_prompt=False) == "<|user|> "


def test_chat_prompt_text_joins_content_parts_with_a_space() -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "world"}]
    text = chat_prompt_text([{"role": "user", "content": parts}])
    assert text == "<|user|> Hello world\n<|assistant|>"


def test_token_ids_of_multibyte_pieces_are_fixed_values() -> None:
    # pinned like the block hashes: accented, CJK and astral characters, as UTF-8
    text = "héllo 日本語 😀 𝐀𝐁 naïve"
    assert split(text) == ["héllo", " 日本語", " 😀", " 𝐀𝐁", " naïve"]
    assert tokenize(text) == [13110, 24301, 19265, 19650, 8999]
    assert count_tokens(text) == 5


def test_no_prompt_counts_no_tokens_and_token_ids_count_as_given() -> None:
    assert count_tokens(None) == 0
    assert count_tokens([5, 6, 7]) == 3
    assert count_tokens("") == 0
