"""Deterministic pseudo-text for the simulated engine.

Every generated piece is a space followed by a short word, which is exactly one token
under :mod:`sage_llm.tokens`, so the text of ``n`` pieces re-tokenizes to ``n`` tokens.
The words depend only on the engine seed and the request id.
"""

from __future__ import annotations

import random

from sage_llm import tokens

WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
    "have", "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her",
    "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
    "model", "token", "cache", "engine", "request", "batch", "prefill", "decode", "layer",
    "memory", "latency", "queue", "router", "cluster", "signal", "river", "mountain",
    "garden", "window", "paper", "light", "music", "number", "system", "answer", "simple",
    "quiet", "bright", "early", "later", "always", "often", "never", "maybe", "through",
    "between", "under", "over", "across", "around", "before", "after", "during", "while",
)  # fmt: skip


class PseudoText:
    """A stream of one-token words for one request: ``next_pieces(n)`` → ``[" word", ...]``."""

    __slots__ = ("_rng",)

    def __init__(self, key: str) -> None:
        """``key``: what the words are drawn from (``"{seed}:{request_id}"``, see
        :func:`sage_llm.sim.engine.text_key`)."""
        self._rng = random.Random(key)

    def next_pieces(self, n: int) -> list[str]:
        """The next ``n`` pieces, each one token (a space and a word)."""
        return [" " + self._rng.choice(WORDS) for _ in range(n)]

    @staticmethod
    def token_ids(pieces: list[str]) -> tuple[int, ...]:
        return tuple(tokens.token_id(p) for p in pieces)
