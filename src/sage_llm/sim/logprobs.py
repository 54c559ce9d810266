"""Logprobs for the simulated engine's tokens, in vLLM's response shapes.

The simulator has no model, so the numbers model nothing: each token gets a made-up
distribution, drawn from a generator seeded by the engine seed and the request id (the
same request on an engine of the same seed gets the same logprobs). They are plausible:
every logprob is at most 0, a token's alternatives are other words of the simulator's
vocabulary (:data:`~sage_llm.sim.text.WORDS`) with probabilities summing to at most 1,
listed most likely first, and the sampled token is usually, not always, the most likely.
Drawing them leaves the generated text unchanged.

The request asks as vLLM's OpenAI server is asked:

* completions: ``logprobs`` (an integer, 0 to :data:`MAX_LOGPROBS`): each chunk carries
  ``{"text_offset", "token_logprobs", "tokens", "top_logprobs"}``, one entry per token;
  ``top_logprobs`` maps the sampled token and the ``logprobs`` most likely ones to their
  logprobs (so up to ``logprobs + 1`` entries), ``text_offset`` counts from the start of
  the generated text;
* chat: ``logprobs: true`` and ``top_logprobs`` (0 to :data:`MAX_LOGPROBS`): each chunk
  carries ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
  "logprob", "bytes"}, ...]}, ...]}`` with ``top_logprobs`` most likely alternatives.

A chunk's logprobs cover its tokens; the chunks' lists joined key by key are the whole
answer's (what a non-streaming answer carries). Bad values raise
:class:`~sage_llm.errors.InvalidRequestError` naming the field.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

from sage_llm.engines.base import EngineRequest
from sage_llm.errors import InvalidRequestError
from sage_llm.sim.text import WORDS
from sage_llm.tokens import token_id

__all__ = [
    "MAX_LOGPROBS",
    "PseudoLogprobs",
    "echo_logprobs",
    "prompt_logprobs",
    "requested_logprobs",
    "requested_prompt_logprobs",
]

MAX_LOGPROBS = 20
"""The most alternatives a request may ask for per token (vLLM's default ``max_logprobs``)."""

_TOP_SAMPLED = 0.8
"""How often the sampled token is the most likely one."""
_PIECES = tuple(" " + word for word in WORDS)


def _count(value: Any, field: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and value.is_integer()):
        value = int(value)  # 2.0 is 2, as vLLM reads it
    if not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"`{field}` must be a non-negative integer", param=field)
    if value > MAX_LOGPROBS:
        raise InvalidRequestError(
            f"Requested {field} of {value}, which is greater than max allowed: {MAX_LOGPROBS}",
            param=field,
        )
    return value


def requested_logprobs(req: EngineRequest) -> int | None:
    """How many alternatives per token ``req`` asks for (0: only the sampled token's
    logprob), or None when it asks for no logprobs. Raises :class:`InvalidRequestError`
    on a bad ``logprobs`` or ``top_logprobs``."""
    extra: Mapping[str, Any] = req.extra
    if req.api == "completions":
        value = extra.get("logprobs")
        return None if value is None else _count(value, "logprobs")
    wanted = extra.get("logprobs")
    if wanted is not None and wanted not in (True, False):  # 0 and 1 pass, as for vLLM
        raise InvalidRequestError("`logprobs` must be a boolean", param="logprobs")
    top = extra.get("top_logprobs")
    top = 0 if top is None else _count(top, "top_logprobs")
    if top and not wanted:
        raise InvalidRequestError(
            "when using `top_logprobs`, `logprobs` must be set to true", param="top_logprobs"
        )
    return top if wanted else None


def requested_prompt_logprobs(body: Mapping[str, Any], *, stream: bool) -> int | None:
    """``prompt_logprobs`` of a request body (alternatives per prompt token, 0 to
    :data:`MAX_LOGPROBS`), or None; refused with ``stream``, as vLLM refuses it."""
    value = body.get("prompt_logprobs")
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidRequestError("`prompt_logprobs` must be an integer", param="prompt_logprobs")
    top = _count(value, "prompt_logprobs")
    if stream:
        raise InvalidRequestError(
            "`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs"
        )
    return top


def _prompt_draws(
    pieces: list[str], top: int, request_id: str
) -> list[tuple[str, float, list[tuple[str, float]], int]]:
    """Each prompt token after the first: its logprob, the ``top`` most likely tokens with
    theirs, and its rank: the same draws for a request id whatever ``top`` (an echo's and
    ``prompt_logprobs`` agree), ``top`` only cutting the list of alternatives."""
    drawer = PseudoLogprobs(MAX_LOGPROBS, chat=False, seed=0, request_id=f"prompt:{request_id}")
    out = []
    for piece in pieces[1:]:
        logprob, alternatives, rank = drawer._ranked(piece)
        out.append((piece, logprob, alternatives[:top], rank))
    return out


def prompt_logprobs(
    pieces: list[str], ids: list[int], top: int, request_id: str
) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: None for the first prompt token (nothing comes before
    it), then for each token ``{token_id: {"logprob", "rank", "decoded_token"}}`` for it and
    the ``top`` most likely alternatives (its rank counts from 1 among them)."""
    out: list[dict[str, Any] | None] = [None]
    for (piece, logprob, alternatives, rank), tid in zip(
        _prompt_draws(pieces, top, request_id), ids[1:], strict=True
    ):
        entry: dict[str, Any] = {}
        entry[str(tid)] = {"logprob": logprob, "rank": rank, "decoded_token": piece}
        for place, (alt, lp) in enumerate(alternatives, start=1):
            if place != rank:  # the prompt's own token is listed once, under its id
                entry[str(token_id(alt))] = {"logprob": lp, "rank": place, "decoded_token": alt}
        out.append(entry)
    return out


def echo_logprobs(pieces: list[str], top: int, request_id: str) -> dict[str, Any]:
    """A completion's logprobs of its echoed prompt, in the shape of its own: the first
    token's logprob and alternatives None (nothing comes before it), offsets from the start
    of the prompt."""
    drawn = _prompt_draws(pieces, top, request_id)
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "text_offset": offsets,
        "token_logprobs": [None, *(logprob for _, logprob, _, _ in drawn)],
        "tokens": list(pieces),
        "top_logprobs": [None, *({p: lp, **dict(alts)} for p, lp, alts, _ in drawn)],
    }


class PseudoLogprobs:
    """The logprobs of one request's tokens, chunk by chunk."""

    __slots__ = ("_chat", "_greedy", "_offset", "_rng", "_top")

    def __init__(
        self,
        top: int,
        *,
        chat: bool,
        seed: int,
        request_id: str,
        offset: int = 0,
        greedy: bool = False,
    ) -> None:
        self._top = top
        self._chat = chat
        self._greedy = greedy
        """Greedy sampling (``temperature`` 0): the sampled token is always the most likely."""
        self._rng = random.Random(f"logprobs:{seed}:{request_id}")
        self._offset = offset
        """Where the next token's text begins (an echoed prompt's length comes first)."""

    def _token(self, piece: str) -> tuple[float, list[tuple[str, float]]]:
        """The sampled ``piece``'s logprob and the most likely tokens with theirs."""
        logprob, top, _ = self._ranked(piece)
        return logprob, top

    def _ranked(self, piece: str) -> tuple[float, list[tuple[str, float]], int]:
        """:meth:`_token`, and ``piece``'s rank (1: the most likely)."""
        rng = self._rng
        ranks = max(self._top, 1) + 1
        left = 1.0
        probs: list[float] = []
        for _ in range(ranks):  # each takes a share of what the ones before left
            p = left * rng.uniform(0.5, 0.98) if not probs else left * rng.uniform(0.2, 0.7)
            probs.append(p)
            left -= p
        probs.sort(reverse=True)
        top_sampled = rng.random() < _TOP_SAMPLED or self._greedy
        sampled = 0 if top_sampled else rng.randrange(1, ranks)
        others = iter(rng.sample([p for p in _PIECES if p != piece], ranks - 1))
        top = [
            (piece if rank == sampled else next(others), math.log(p))
            for rank, p in enumerate(probs[: self._top])
        ]
        return math.log(probs[sampled]), top, sampled + 1

    def next(self, pieces: list[str]) -> dict[str, Any]:
        """The logprobs object of a chunk of ``pieces`` (one token each)."""
        drawn = [(piece, *self._token(piece)) for piece in pieces]
        if self._chat:
            return {
                "content": [
                    {
                        "token": piece,
                        "logprob": logprob,
                        "bytes": list(piece.encode()),
                        "top_logprobs": [
                            {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top
                        ],
                    }
                    for piece, logprob, top in drawn
                ]
            }
        offsets = []
        for piece in pieces:
            offsets.append(self._offset)
            self._offset += len(piece)
        return {
            "text_offset": offsets,
            "token_logprobs": [logprob for _, logprob, _ in drawn],
            "tokens": list(pieces),
            "top_logprobs": [{piece: logprob, **dict(top)} for piece, logprob, top in drawn],
        }
