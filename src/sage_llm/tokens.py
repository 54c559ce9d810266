"""A small deterministic tokenizer shared by the simulated engine and the control plane.

The control plane never sees a real engine's tokenizer, so it estimates prompt lengths and
prefix-block hashes with this one. The simulated engine uses the very same function, which
makes those estimates exact against simulated engines and close (about four characters per
token on English text) against real ones.

A token is a run of at most 8 word characters, or one other non-space character, with the
whitespace before it attached. Token ids are stable across processes (CRC-32 based).
"""

from __future__ import annotations

import re
import sys
import zlib
from array import array
from collections.abc import Mapping, Sequence
from itertools import accumulate
from typing import Any

import numpy as np

_TOKEN_RE = re.compile(r"\s*\w{1,8}|\s*[^\w\s]|\s+")
VOCAB_SIZE = 32000
_RESERVED = 256


def split(text: str) -> list[str]:
    """The text pieces, one per token; ``"".join(split(t)) == t``."""
    return _TOKEN_RE.findall(text)


def token_id(piece: str) -> int:
    """The piece's id: the same in every process (a lone surrogate, which a Python string
    may hold, is encoded as it is rather than refused)."""
    return _RESERVED + zlib.crc32(piece.encode("utf-8", "surrogatepass")) % (VOCAB_SIZE - _RESERVED)


def tokenize(prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt; a list of ints is taken to be token ids already."""
    if isinstance(prompt, str):
        return [token_id(p) for p in split(prompt)]
    return [int(t) for t in prompt]


def last_tokens(prompt: str | Sequence[int], keep: int) -> str | list[int]:
    """The prompt's last ``keep`` tokens (``keep >= 1``), as vLLM's
    ``truncate_prompt_tokens`` keeps them: text stays text, token ids stay ids."""
    if isinstance(prompt, str):
        return "".join(split(prompt)[-keep:])
    return list(prompt)[-keep:]


def block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full blocks of ``token_ids`` (like vLLM's prefix caching):
    block *i*'s hash covers every token up to the end of block *i*, so equal hashes mean
    equal prefixes.

    Each block is its ids as little-endian uint32 (ids outside ``[0, 2**32)`` taken modulo
    2**32) after the previous block's hash; the hash is CRC-32 | Adler-32 << 32 of that,
    so values are the same in every process and on every platform."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    n = len(token_ids)
    full = n - n % block_size
    if full == 0:
        return ()
    packed = array("I")
    try:  # a list of ints (the usual case) packs fastest through fromlist
        if type(token_ids) is list:
            packed.fromlist(token_ids)
        else:
            packed = array("I", token_ids)
    except (OverflowError, TypeError):
        packed = array("I", [int(t) & 0xFFFFFFFF for t in token_ids[:full]])
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        packed.byteswap()
    raw = packed.tobytes()  # a partial last block is packed too, but never hashed
    step = 4 * block_size
    crc32, adler32 = zlib.crc32, zlib.adler32
    hashes: list[int] = []
    append = hashes.append
    parent = 0
    for start in range(0, 4 * full, step):
        data = parent.to_bytes(8, "little") + raw[start : start + step]
        parent = crc32(data) | (adler32(data) << 32)
        append(parent)
    return tuple(hashes)


ADAPTER_SALT = "\x00lora:"
"""Before a LoRA adapter's name, the salt of its prompts' block hashes (vLLM hashes an
adapter's blocks apart; a ``cache_salt`` of the same text is salted apart from it)."""


def salted_hashes(hashes: tuple[int, ...], salt: str) -> tuple[int, ...]:
    """``hashes`` (:func:`block_hashes`, :func:`prompt_blocks`) of a prompt sent with
    vLLM's ``cache_salt``: vLLM mixes the salt into its first block's hash, so no block of
    the prompt is shared with the same prompt unsalted or under another salt. Each hash is
    XORed with the salt's CRC-32 | Adler-32 << 32 (the same in every process)."""
    if not hashes:
        return hashes
    data = salt.encode("utf-8", "surrogatepass")
    key = zlib.crc32(data) | (zlib.adler32(data) << 32)
    return tuple(h ^ key for h in hashes)


def prompt_blocks(prompt: str | Sequence[int], block_size: int) -> tuple[int, tuple[int, ...]]:
    """The token count of ``prompt`` and the hashes of its full blocks of ``block_size``
    tokens: what the control plane needs of a prompt to schedule and route it.

    For token ids, the hashes are :func:`block_hashes` of them. For a text, block *i*'s hash
    covers the text up to the end of its block's last piece (:func:`split`): the CRC-32 and
    Adler-32 of those UTF-8 bytes (``crc | adler << 32``). Equal hashes therefore mean equal
    token prefixes, as for :func:`block_hashes`, but no token id is computed, so a long
    prompt costs the control plane a few microseconds per hundred tokens instead of one or
    two per token (see docs/benchmarks.md, "Prompt intake"). A text and the ids of the same
    text hash differently; the control plane keeps its prefix index to itself.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    if not isinstance(prompt, str):
        ids = tokenize(prompt)
        return len(ids), block_hashes(ids, block_size)
    if len(prompt) < _VECTOR_MIN_CHARS:
        pieces = split(prompt)
        n = len(pieces)
        if n < block_size:
            return n, ()
        ends = list(accumulate(map(len, pieces)))
        return n, _text_block_hashes(prompt, ends[block_size - 1 :: block_size])
    starts, n, classes = _token_starts(prompt)
    full = n - n % block_size
    if full == 0:
        return n, ()
    return n, _text_block_hashes(prompt, _block_ends(starts, n, classes, block_size, full))


def count_tokens(prompt: str | Sequence[int] | None) -> int:
    """How many tokens ``prompt`` is (:func:`split` of a text: the same count, faster for a
    long one)."""
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        if len(prompt) < _VECTOR_MIN_CHARS:
            return len(_TOKEN_RE.findall(prompt))
        return _token_starts(prompt)[1]
    return len(prompt)


_VECTOR_MIN_CHARS = 1024
"""Texts at least this long are split by :func:`_token_starts` (numpy) rather than by the
regular expression, which is faster below it (numpy's fixed cost per call)."""

_SPACE, _WORD, _OTHER = 0, 1, 2


def _class_of(ch: str) -> int:
    """The class of one character in :data:`_TOKEN_RE`: ``\\s`` (what ``str.isspace``
    says), ``\\w`` (``str.isalnum`` or ``_``) or neither; a test checks every code point."""
    return _SPACE if ch.isspace() else _WORD if ch.isalnum() or ch == "_" else _OTHER


_BMP_CLASSES = np.array([_class_of(chr(c)) for c in range(0x10000)], dtype=np.uint8)
"""The class of every code point below U+10000 (read-only)."""
_BMP_CLASSES.setflags(write=False)
_ASCII_CLASSES = bytes(_BMP_CLASSES[:128].tolist()) + bytes(128)
"""``bytes.translate`` table: an ASCII byte to its class."""


def _char_classes(text: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The class (:data:`_SPACE`, :data:`_WORD`, :data:`_OTHER`) of each character."""
    if text.isascii():
        return np.frombuffer(text.encode("ascii").translate(_ASCII_CLASSES), dtype=np.uint8)
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    astral = codes > 0xFFFF
    if not astral.any():
        return _BMP_CLASSES[codes]
    classes = _BMP_CLASSES[np.minimum(codes, 0xFFFF)]
    uniq, inverse = np.unique(codes[astral], return_inverse=True)
    table = np.array([_class_of(chr(c)) for c in uniq.tolist()], dtype=np.uint8)
    classes[astral] = table[inverse]
    return classes


def _token_starts(
    text: str,
) -> tuple[np.ndarray[Any, np.dtype[np.intp]], int, np.ndarray[Any, np.dtype[np.uint8]]]:
    """What :func:`split` finds in ``text`` (not empty), without making the pieces: the
    index of each piece's first non-space character, the number of pieces (one more when
    the text ends in whitespace: that is a piece of its own) and the characters' classes.

    A piece is the whitespace before it and then one character that is neither space nor
    word, or a run of at most 8 word characters: so a piece starts at every such
    character, at the first character of every run of word characters, and 8, 16, …
    characters into a longer run."""
    classes = _char_classes(text)
    word = classes == _WORD
    first = np.empty(len(word), dtype=bool)  # a word character with none before it
    first[0] = word[0]
    np.greater(word[1:], word[:-1], out=first[1:])
    starts = classes == _OTHER
    starts |= first
    run_at = np.flatnonzero(first)
    if len(run_at):
        last = np.empty(len(word), dtype=bool)  # a word character with none after it
        last[-1] = word[-1]
        np.greater(word[:-1], word[1:], out=last[:-1])
        run_len = np.flatnonzero(last) + 1 - run_at
        long = run_len > 8
        if long.any():
            more = (run_len[long] - 1) // 8  # the pieces of a long run after its first
            before = np.cumsum(more) - more
            at = np.repeat(run_at[long] - 8 * before, more)
            at += 8 * (np.arange(len(at)) + 1)
            starts[at] = True
    where = np.flatnonzero(starts)
    return where, len(where) + (1 if classes[-1] == _SPACE else 0), classes


def _block_ends(
    starts: np.ndarray[Any, np.dtype[np.intp]],
    n: int,
    classes: np.ndarray[Any, np.dtype[np.uint8]],
    block_size: int,
    full: int,
) -> list[int]:
    """The character offsets where the first ``full`` pieces' blocks end (see
    :func:`_token_starts` for ``starts``, ``n`` and ``classes``): piece *t* begins right
    after the last non-space character before its start (its whitespace is its own)."""
    after = list(range(block_size, full + 1, block_size))
    inner = [t for t in after if t < len(starts)]
    non_space = np.flatnonzero(classes)
    ends: list[int] = []
    if inner:
        ends = (non_space[np.searchsorted(non_space, starts[inner]) - 1] + 1).tolist()
    for t in after[len(inner) :]:  # the end of the text, or its trailing whitespace
        ends.append(len(classes) if t == n else int(non_space[-1]) + 1)
    return ends


def _text_block_hashes(text: str, ends: Sequence[int]) -> tuple[int, ...]:
    """CRC-32 | Adler-32 << 32 of ``text`` up to each of ``ends`` (character offsets, in
    order), in UTF-8."""
    crc, adler, start = 0, 1, 0
    crc32, adler32 = zlib.crc32, zlib.adler32
    hashes: list[int] = []
    if text.isascii():  # character offsets are byte offsets
        data = memoryview(text.encode("ascii"))
        for end in ends:
            crc = crc32(data[start:end], crc)
            adler = adler32(data[start:end], adler)
            hashes.append(crc | adler << 32)
            start = end
        return tuple(hashes)
    for end in ends:
        part = text[start:end].encode("utf-8", "surrogatepass")
        crc, adler = crc32(part, crc), adler32(part, adler)
        hashes.append(crc | adler << 32)
        start = end
    return tuple(hashes)


def chat_prompt_text(messages: Sequence[object], *, generation_prompt: bool = True) -> str:
    """Flatten chat messages into the text the engine would tokenize (role tags included,
    and the assistant's tag that asks for the answer unless ``generation_prompt`` is
    False, as a chat template's ``add_generation_prompt``)."""
    parts: list[str] = []
    for msg in messages:
        if isinstance(msg, Mapping):
            role = str(msg.get("role", "user"))
            content = msg.get("content")
            if content is None:  # an assistant's tool-call turn has none
                content = ""
            elif isinstance(content, list):  # OpenAI content parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"<|{role}|> {content}")
    if generation_prompt:
        parts.append("<|assistant|>")
    return "\n".join(parts)
