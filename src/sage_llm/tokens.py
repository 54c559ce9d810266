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

_TOKEN_RE = re.compile(r"\s*\w{1,8}|\s*[^\w\s]|\s+")
VOCAB_SIZE = 32000
_RESERVED = 256


def split(text: str) -> list[str]:
    """The text pieces, one per token; ``"".join(split(t)) == t``."""
    return _TOKEN_RE.findall(text)


def token_id(piece: str) -> int:
    return _RESERVED + zlib.crc32(piece.encode("utf-8")) % (VOCAB_SIZE - _RESERVED)


def tokenize(prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt; a list of ints is taken to be token ids already."""
    if isinstance(prompt, str):
        return [token_id(p) for p in split(prompt)]
    return [int(t) for t in prompt]


def count_tokens(prompt: str | Sequence[int] | None) -> int:
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        return len(_TOKEN_RE.findall(prompt))
    return len(prompt)


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


def prompt_blocks(prompt: str | Sequence[int], block_size: int) -> tuple[int, tuple[int, ...]]:
    """The token count of ``prompt`` and the :func:`block_hashes` of its ids, as
    ``(len(tokenize(prompt)), block_hashes(tokenize(prompt), block_size))``, without
    computing the ids of a text's last, partial block (which is never hashed)."""
    if not isinstance(prompt, str):
        ids = tokenize(prompt)
        return len(ids), block_hashes(ids, block_size)
    pieces = split(prompt)
    n = len(pieces)
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    full = n - n % block_size
    if full == 0:
        return n, ()
    return n, block_hashes([token_id(p) for p in pieces[:full]], block_size)


def chat_prompt_text(messages: Sequence[object]) -> str:
    """Flatten chat messages into the text the engine would tokenize (role tags included)."""
    parts: list[str] = []
    for msg in messages:
        if isinstance(msg, Mapping):
            role = str(msg.get("role", "user"))
            content = msg.get("content", "")
            if isinstance(content, list):  # OpenAI content parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"<|{role}|> {content}")
    parts.append("<|assistant|>")
    return "\n".join(parts)
