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

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TypeAlias

import numpy as np

from sage_llm.bench.generators import (
    SHAREGPT_INPUT,
    SHAREGPT_OUTPUT,
    ArrivalKind,
    arrival_times,
    multi_turn,
    sharegpt,
    sharegpt_like,
    synthetic,
)
from sage_llm.bench.lengths import (
    Empirical,
    Fixed,
    LengthDist,
    LengthSpec,
    LogNormal,
    Uniform,
    as_length_dist,
)
from sage_llm.bench.stats import SLO
from sage_llm.bench.traces import TraceFormat, trace_replay
from sage_llm.bench.workload_core import (
    TRACE_BLOCK_TOKENS,
    Workload,
    WorkloadRequest,
    check_arg,
    evolve,
    text_prompt,
    token_block,
)
from sage_llm.errors import ConfigError
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
    "lora_names",
    "multi_turn",
    "scale_rate",
    "sharegpt",
    "sharegpt_like",
    "synthetic",
    "text_prompt",
    "token_block",
    "trace_replay",
    "with_adapters",
    "with_priorities",
]


# --- transformations ------------------------------------------------------------------


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
    check_arg(bool(weights), "mix", "priority mix is empty")
    check_arg(all(w >= 0 and math.isfinite(w) for w in weights.values()), "mix", "bad weight")
    total = sum(weights.values())
    check_arg(total > 0, "mix", "priority weights must not all be 0")
    slos = {
        _priority(p, "slo_by_priority"): (t.ttft_s, t.tpot_s, t.e2e_s) if isinstance(t, SLO) else t
        for p, t in (slo_by_priority or {}).items()
    }
    for targets in slos.values():
        check_arg(
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
            r = evolve(r, priority=priority, slo_ttft_s=ttft_s, slo_tpot_s=tpot_s, slo_e2e_s=e2e_s)
        else:
            r = evolve(r, priority=priority)
        requests.append(r)
    params = {
        **workload.params,
        "priority_mix": {p.name.lower(): w for p, w in weights.items()},
        "priority_seed": seed,
    }
    return replace(workload, requests=tuple(requests), params=params)


def lora_names(n: int) -> list[str]:
    """The names of ``n`` LoRA adapters, as the benchmarks serve and ask for them:
    ``lora-0`` … ``lora-{n-1}``."""
    return [f"lora-{k}" for k in range(n)]


def with_adapters(
    workload: Workload,
    adapters: Sequence[str],
    *,
    zipf: float = 1.0,
    share: float = 1.0,
    seed: int = 0,
) -> Workload:
    """Requests for LoRA adapters: ``share`` of the sessions (of the requests, where they
    have none) ask for one of ``adapters`` (their ``model``), the k-th (from 0) in
    proportion to ``1 / (k + 1) ** zipf`` (0: all alike; 1, the default: Zipf's law); the
    others keep the model they asked for. Requests of one session ask for the same."""
    names = list(adapters)
    check_arg(bool(names), "adapters", "no adapters given")
    check_arg(all(isinstance(n, str) and n for n in names), "adapters", "names must be strings")
    check_arg(len(set(names)) == len(names), "adapters", "an adapter is named twice")
    check_arg(zipf >= 0 and math.isfinite(zipf), "zipf", f"zipf must be >= 0, got {zipf}")
    check_arg(0.0 <= share <= 1.0, "share", f"share must be within [0, 1], got {share}")
    weights = np.array([1.0 / (k + 1) ** zipf for k in range(len(names))])
    groups = list(dict.fromkeys(r.session_id or r.request_id for r in workload))
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(names), size=len(groups), p=weights / weights.sum())
    asks = rng.random(len(groups)) < share
    chosen = {
        g: names[int(k)] if ask else None for g, k, ask in zip(groups, picks, asks, strict=True)
    }
    requests = []
    for r in workload:
        name = chosen[r.session_id or r.request_id]
        requests.append(r if name is None else evolve(r, model=name))
    params = {
        **workload.params,
        "adapters": len(names),
        "adapter_zipf": zipf,
        "adapter_share": share,
        "adapter_seed": seed,
    }
    return replace(workload, requests=tuple(requests), params=params)


def scale_rate(workload: Workload, factor: float) -> Workload:
    """The same requests arriving ``factor`` times as fast (arrival offsets / factor)."""
    check_arg(factor > 0 and math.isfinite(factor), "factor", f"factor must be > 0, got {factor}")
    requests = tuple(evolve(r, arrival_s=r.arrival_s / factor) for r in workload)
    params = {**workload.params, "rate_scale": workload.params.get("rate_scale", 1.0) * factor}
    return replace(workload, requests=requests, params=params)
