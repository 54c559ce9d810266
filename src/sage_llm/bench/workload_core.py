"""The parts every workload shares: exact-length prompts (text and token ids),
:class:`WorkloadRequest` and :class:`Workload` (see :mod:`sage_llm.bench.workloads`)."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sage_llm.bench.stats import percentile
from sage_llm.errors import ConfigError
from sage_llm.tokens import VOCAB_SIZE, count_tokens
from sage_llm.types import RequestPriority

TRACE_BLOCK_TOKENS = 512
"""Tokens per ``hash_ids`` block in the Mooncake traces."""

_WORDS = (  # noqa: SIM905 (one string is easier to read than 200 literals)
    "the of and to in is it you that was for on are with as his they be at one have this "
    "from or had by word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like "
    "so these her long make thing see him two has look more day could go come did number "
    "sound no most people my over know water than call first who may down side been now "
    "find any new work part take get place made live where after back little only round man "
    "year came show every good me give our under name very through just form sentence great "
    "think say help low line differ turn cause much mean before move right boy old too same "
    "tell does set three want air well also play small end put home read hand port large "
    "spell add even land here must big high such follow act why ask men change went light "
    "kind off need house picture try us again animal point mother world near build self "
    "earth father model server request prompt token cache latency engine cluster schedule"
).split()


def _read_only_objects(items: Sequence[object]) -> np.ndarray[Any, np.dtype[np.object_]]:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    array.flags.writeable = False
    return array


# Read-only lookup tables. Indexing them hands out shared objects, so a token-id prompt
# costs 8 bytes per token (one reference) instead of a fresh int object per token.
_PIECES = _read_only_objects([*(" " + w for w in _WORDS), ",", "."])
_VOCAB = _read_only_objects(range(VOCAB_SIZE))
_FIRST_ID = 256
_MASK64 = (1 << 64) - 1


# --- prompts --------------------------------------------------------------------------


def text_prompt(rng: np.random.Generator, n_tokens: int) -> str:
    """Text of exactly ``n_tokens`` tokens: words of at most 8 letters and some punctuation."""
    if n_tokens <= 0:
        return ""
    pieces: list[str] = _PIECES[rng.integers(0, len(_PIECES), size=n_tokens)].tolist()
    return "".join(pieces).lstrip(" ")


def mix_key(*parts: int) -> int:
    """A 64-bit hash of some integers (splitmix64 finaliser, chained)."""
    h = 0
    for part in parts:
        z = ((h ^ (part & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        h = z ^ (z >> 31)
    return h


def _token_ids(keys: np.ndarray[Any, np.dtype[np.uint64]]) -> list[int]:
    """Token ids in ``[256, VOCAB_SIZE)`` hashed from ``keys`` (splitmix64 finaliser)."""
    z = keys + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    ids = z % np.uint64(VOCAB_SIZE - _FIRST_ID) + np.uint64(_FIRST_ID)
    tokens: list[int] = _VOCAB[ids.astype(np.intp)].tolist()
    return tokens


def token_segment(n: int, *key: int) -> list[int]:
    """``n`` token ids determined by ``key`` alone."""
    return _token_ids(np.arange(n, dtype=np.uint64) + np.uint64(mix_key(*key)))


def token_block(
    salt: int, block_ids: Sequence[int], block_size: int = TRACE_BLOCK_TOKENS
) -> list[int]:
    """Token ids for the blocks ``block_ids``: block id *b* always maps to the same
    ``block_size`` ids (for a given ``salt``), so equal leading ids give equal prefixes."""
    bases = np.asarray([mix_key(salt, b) for b in block_ids], dtype=np.uint64)
    keys = bases[:, None] + np.arange(block_size, dtype=np.uint64)
    return _token_ids(keys.reshape(-1).astype(np.uint64, copy=False))


# --- requests and workloads -----------------------------------------------------------


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload.

    ``arrival_s`` is the offset from the start of the run; ``prompt`` is text or token ids
    and ``prompt_tokens`` its exact length under :mod:`sage_llm.tokens`. ``slo_*`` are
    per-request latency targets (None: none). ``turn`` is the index of the request within
    its session (0 for the first, and for single-turn workloads).
    """

    request_id: str
    arrival_s: float
    prompt: str | list[int]
    prompt_tokens: int
    max_tokens: int
    priority: RequestPriority = RequestPriority.NORMAL
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    slo_e2e_s: float | None = None
    user_id: str | None = None
    session_id: str | None = None
    turn: int = 0
    model: str | None = None

    def __post_init__(self) -> None:
        if not (self.arrival_s >= 0 and math.isfinite(self.arrival_s)):
            raise ValueError(f"{self.request_id}: arrival_s must be finite and >= 0")
        if self.prompt_tokens < 1 or self.max_tokens < 1:
            raise ValueError(f"{self.request_id}: prompt_tokens and max_tokens must be >= 1")
        actual = count_tokens(self.prompt)
        if actual != self.prompt_tokens:
            raise ValueError(
                f"{self.request_id}: prompt has {actual} tokens, prompt_tokens says "
                f"{self.prompt_tokens}"
            )


@dataclass(frozen=True)
class Workload:
    """A named, arrival-ordered sequence of requests, with the parameters that made it."""

    name: str
    requests: tuple[WorkloadRequest, ...]
    description: str = ""
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        requests = tuple(self.requests)
        object.__setattr__(self, "requests", requests)
        if any(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(requests)):
            raise ValueError(f"workload {self.name}: requests must be ordered by arrival")
        if len({r.request_id for r in requests}) != len(requests):
            raise ValueError(f"workload {self.name}: request ids must be unique")

    @property
    def duration_s(self) -> float:
        """Arrival offset of the last request (0 for an empty workload)."""
        return self.requests[-1].arrival_s if self.requests else 0.0

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self) -> Iterator[WorkloadRequest]:
        return iter(self.requests)

    def summary(self) -> dict[str, Any]:
        """Counts, prompt/output length percentiles and the arrival rate,
        ``(n − 1) / duration_s`` (None when all requests arrive at once)."""

        def lengths(values: list[int]) -> dict[str, float] | None:
            if not values:
                return None
            pct = {f"p{q}": percentile(values, q) for q in (50, 90, 99)}
            return {
                "mean": sum(values) / len(values),
                **pct,
                "max": max(values),
                "total": sum(values),
            }

        reqs = self.requests
        priorities = sorted({r.priority for r in reqs})
        return {
            "name": self.name,
            "requests": len(reqs),
            "duration_s": self.duration_s,
            "rate_rps": (len(reqs) - 1) / self.duration_s if self.duration_s > 0 else None,
            "sessions": len({r.session_id for r in reqs if r.session_id is not None}),
            "users": len({r.user_id for r in reqs if r.user_id is not None}),
            "text_prompts": sum(isinstance(r.prompt, str) for r in reqs),
            "prompt_tokens": lengths([r.prompt_tokens for r in reqs]),
            "max_tokens": lengths([r.max_tokens for r in reqs]),
            "priorities": {p.name.lower(): sum(r.priority is p for r in reqs) for p in priorities},
        }


def check_arg(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(message, key=key)


def evolve(request: WorkloadRequest, **changes: Any) -> WorkloadRequest:
    """A copy of ``request`` with ``changes`` (checked by the caller), without counting the
    prompt's tokens again (that check dominates the cost of copying long text prompts)."""
    copied = copy.copy(request)
    for key, value in changes.items():
        object.__setattr__(copied, key, value)
    return copied
