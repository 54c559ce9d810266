"""Registered instances and their live state: load, health, latency estimates.

The :class:`InstanceRegistry` is the control plane's single source of truth about the fleet.
The dispatcher changes load counters here when it starts and finishes requests, the health
and stats loops change health and engine figures, and :meth:`InstanceRegistry.snapshot`
freezes all of it into the :class:`ClusterSnapshot` that policies and routers read.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import numpy as np

from sage_llm.control_plane.health import CircuitBreaker, CircuitState
from sage_llm.control_plane.metrics import mean, percentile
from sage_llm.control_plane.snapshot import (
    ClusterSnapshot,
    InstanceView,
    PrefixView,
    fill_snapshot,
    fill_view,
)
from sage_llm.engines.base import EngineClient, EngineStats
from sage_llm.errors import ConflictError, InstanceNotFoundError
from sage_llm.types import (
    ExecutionInstance,
    ExecutionInstanceType,
    InstanceMetrics,
    ParallelismType,
)

_Placement = tuple[
    int, float, str | None, str | None, int | None, str | None, frozenset[str], float
]

# EWMA weight of a new observation in the latency estimates.
_ALPHA = 0.2
LEARN_SAMPLES = 5
"""Observations after which an instance counts as measured (``1 / _ALPHA``: up to then an
estimate is the plain mean of its observations)."""
RATE_FROM_TOKENS = 256
"""Prompts shorter than this tell the fixed part of the time to first token, not the
prefill rate: what such a TTFT has above the fixed part is mostly the engine's overhead
(one 2 s TTFT of a one-token prompt had set the rate to half a token a second, and a
full queue's Retry-After to 17 minutes)."""
MIN_S_PER_PREFILL_TOKEN = 1e-7
"""The estimate's floor: 10 million prompt tokens a second (more than any instance)."""

FIT_DECAY = 1.0 / 64
"""How fast :class:`PrefillFit` forgets: each new sample weighs ``1 / (1 - FIT_DECAY)``
times the one before (a memory of about 64 samples; a window of a few had let noisy chat
traffic swing the fitted rate over four orders of magnitude)."""
FIT_MIN_SAMPLES = 16
FIT_MIN_SPREAD = 0.25
"""The least coefficient of variation of the prompts' lengths a fit is read from: prompts
of about one length cannot tell a fixed part from a per-token cost."""
FIT_RESET_DRIFT = 0.3
"""The drift (:attr:`PrefillFit.drift`) past which the fit is forgotten: an engine that
became 3x slower or faster is then followed as fast as the EWMA rule follows it (a fit
over ~64 samples had taken up to 130 samples to; noisy chat traffic stays below it)."""
FIT_MIN_T = 4.0
"""The least t-statistic of the fitted per-token cost (its estimate over its standard
error) a fit is read with."""


@dataclass(slots=True)
class PrefillFit:
    """A weighted least-squares line through the latest (pending tokens, TTFT) pairs of
    prompts of :data:`RATE_FROM_TOKENS` tokens or more: both parts of the time to first
    token, read when the prompts' lengths vary enough to tell them apart (a fleet whose
    prompts are all long otherwise reads an engine's fixed overhead as per-token cost).
    Forgotten when the TTFTs drift from their predictions (:data:`FIT_RESET_DRIFT`)."""

    w: float = 0.0
    w2: float = 0.0
    x: float = 0.0
    y: float = 0.0
    xx: float = 0.0
    xy: float = 0.0
    yy: float = 0.0
    samples: int = 0
    drift: float = 0.0
    """The exponentially weighted mean log ratio of the TTFTs to the fit's own predictions
    (measured while it has a line, read or paused: the EWMA rule's predictions are off in
    just the case the fit is for): a change of the engine's speed shows in it first."""
    short: float = 0.0
    """The decayed count of short prompts seen: those tell the fixed part directly, and a
    fit is not read while they come."""

    def add(self, x: float, y: float) -> None:
        keep = 1.0 - FIT_DECAY
        self.w = keep * self.w + 1.0
        self.w2 = keep * keep * self.w2 + 1.0
        self.x = keep * self.x + x
        self.y = keep * self.y + y
        self.xx = keep * self.xx + x * x
        self.xy = keep * self.xy + x * y
        self.yy = keep * self.yy + y * y
        self.short *= keep
        self.samples += 1

    def note_short(self) -> None:
        self.short = (1.0 - FIT_DECAY) * self.short + 1.0

    def line(self, *, paused: bool = False) -> tuple[float, float] | None:
        """(fixed part in seconds, seconds per token) when the samples tell both apart:
        enough of them, lengths spread, a per-token cost clear of the noise, and neither
        part negative (a superlinear prefill would give a negative fixed part); else
        None. Also None while short prompts come, unless ``paused`` (the line they keep
        from being read)."""
        if self.samples < FIT_MIN_SAMPLES or (self.short >= 0.5 and not paused):
            return None
        w = self.w
        mx, my = self.x / w, self.y / w
        var_x = self.xx / w - mx * mx
        if var_x <= (FIT_MIN_SPREAD * mx) ** 2:
            return None
        cov = self.xy / w - mx * my
        slope = cov / var_x
        fixed = my - slope * mx
        if slope <= 0.0 or fixed < 0.0:
            return None
        residual = max(self.yy / w - my * my - slope * cov, 0.0)
        n_eff = w * w / self.w2
        if n_eff <= 2.0:
            return None
        error = math.sqrt(residual / ((n_eff - 2.0) * var_x))
        if slope < FIT_MIN_T * error:
            return None
        return fixed, slope


CHUNK_SETTLE_SAMPLES = 8
"""Compute-bound samples a :class:`ChunkCost` takes in before its drift may reset it."""
CHUNK_RESET_KEEP = 0.1
"""The weight a :class:`ChunkCost` keeps of what it had learnt when its drift resets it:
a prompt's compute time (its TTFT less the fixed part) is noisy, and an estimate forgotten
outright was read from the next noisy sample alone (on chat traffic with 50 % noise its
95th percentile went from 1.7x to 2.5x the engine's rate); a tenth is forgotten within
a few samples when the engine did change."""


@dataclass(slots=True)
class ChunkCost:
    """The compute cost of a prompt token in a step that also runs decodes: what a
    chunked prompt's step adds to the inter-token gap of the decodes beside it.

    A step takes the roofline's smoothed maximum of its memory time (a decode step, the
    TPOT estimate ``t``) and its compute time (tokens × seconds per token ``s``):
    ``hypot(t, chunk × s)``. The TTFT line (:class:`PrefillFit`, or the EWMA rule) averages
    over prompts whose steps are still memory-bound and reads a rate about twice the
    compute-bound one on chat traffic (a stall model on it kept 1,500-token prompts beside
    running decodes, predicting a 22 ms gap where they took 38 ms). Here each long prompt's
    TTFT above the fixed part ``e`` is read through the same curve, ``chunk × s =
    sqrt((e + t)² − t²)``, and ``s`` is the size-weighted least-squares slope of those
    (weighted toward the largest prompts, whose steps are compute-bound), forgetting as
    :class:`PrefillFit` does."""

    xy: float = 0.0
    xx: float = 0.0
    settled: int = 0
    """Compute-bound samples since the estimate began (or was last forgotten)."""
    drift: float = 0.0
    """The exponentially weighted mean log ratio of compute-bound prompts' compute times to
    the estimate's (those whose predicted compute is at least twice a decode step: the
    others' are mostly noise). Past :data:`FIT_RESET_DRIFT` the estimate is mostly
    forgotten (:data:`CHUNK_RESET_KEEP`; an engine that got 3x slower had been followed
    over ~100 samples where its prompts were of one length, so that no fit formed to be
    reset with)."""

    def add(self, tokens: int, excess_s: float, tpot_s: float) -> None:
        keep = 1.0 - FIT_DECAY
        compute_s = math.sqrt(max((excess_s + tpot_s) ** 2 - tpot_s * tpot_s, 0.0))
        s = self.s_per_token()
        if s is not None and tokens * s >= 2.0 * tpot_s:
            ratio = min(max(compute_s / (tokens * s), 0.01), 100.0)
            self.drift += _ALPHA * (math.log(ratio) - self.drift)
            self.settled += 1
            # the engine changed: mostly start again (not before the estimate has settled
            # on a few samples)
            if abs(self.drift) > FIT_RESET_DRIFT and self.settled >= CHUNK_SETTLE_SAMPLES:
                self.xy *= CHUNK_RESET_KEEP
                self.xx *= CHUNK_RESET_KEEP
                self.drift = 0.0
                self.settled = 0
        self.xy = keep * self.xy + tokens * compute_s
        self.xx = keep * self.xx + float(tokens) * tokens

    def s_per_token(self) -> float | None:
        """Seconds per prompt token, or None before a long prompt's TTFT told any."""
        if self.xy <= 0.0 or self.xx <= 0.0:
            return None
        return max(self.xy / self.xx, MIN_S_PER_PREFILL_TOKEN)


TPOT_BUCKETS = 12
"""Batch buckets the TPOT is learnt in (:func:`batch_bucket`): b = 1, 2, 3-4, 5-8, …; the
last takes every batch above 1,024."""


def batch_bucket(batch: int) -> int:
    """The TPOT bucket of a request that ran in a batch of ``batch`` (itself included):
    0 for 1, 1 for 2, 2 for 3-4, 3 for 5-8, … (by bit length), at most
    :data:`TPOT_BUCKETS` - 1."""
    return min(max(batch - 1, 0).bit_length(), TPOT_BUCKETS - 1)


_KEEP_LATENCIES = 512
"""Latencies kept per instance for its average (``public_instance``) and percentiles
(``report``)."""


def gpus_of(instance: ExecutionInstance) -> int:
    """GPUs an instance occupies: its ``gpu_count``, at least TP × PP."""
    return max(instance.gpu_count, instance.tensor_parallel_size * instance.pipeline_parallel_size)


def price_per_second(instance: ExecutionInstance) -> float:
    """What an instance's GPUs (:func:`gpus_of`) cost a second."""
    return instance.price_per_gpu_hour * gpus_of(instance) / 3600.0


@dataclass(frozen=True, slots=True)
class LatencyPriors:
    """Starting latency estimates of an instance, before traffic refines them."""

    ttft_base_s: float = 0.05
    prefill_tokens_per_s: float = 8000.0
    tpot_s: float = 0.02


@dataclass
class InstanceState:
    """Mutable live state of one registered instance (owned by the registry)."""

    instance: ExecutionInstance
    client: EngineClient
    in_flight: int = 0
    queued_prefill_tokens: int = 0
    outstanding_decode_tokens: int = 0
    healthy: bool = True
    draining: bool = False
    removed: bool = False
    consecutive_failures: int = 0
    completed: int = 0
    """Requests this instance did its part of: whole requests and decode legs that
    completed here, and prefill legs that ended here."""
    failed_requests: int = 0
    """Requests that ended failed here (as ``sage_llm_requests_total{status="failed"}``
    counts them by instance: an engine's refusal too)."""
    failed_calls: int = 0
    """Engine calls that failed here and counted against its health (a request retried
    elsewhere counts too; an engine's refusal of the request does not)."""
    tokens_generated: int = 0
    prefilled_tokens: int = 0
    """Prompt tokens of the prefill legs that ended here."""
    last_stats: EngineStats | None = None
    progress: tuple[float, float] | None = None
    """The engine's processed tokens (prompt and generated, from its stats) and the time
    they were first seen at that count with calls in flight: how long it has stood still
    (see ``HealthMonitor.watch_progress``)."""
    context_length: int | None = None
    """The engine's ``max_model_len``, as it last said (None: not known yet; asked again
    after each ejection, as a restarted engine may serve another)."""
    context_asked_at: float = -math.inf
    """When the engine was last asked for it (at most once a minute while unknown)."""
    adapters: frozenset[str] = frozenset()
    """The LoRA adapters it serves: its instance's ``lora_adapters`` and those its engine
    last listed (see ``HealthMonitor``)."""
    lora_in_flight: dict[str, int] = field(default_factory=dict)
    """Engine calls in flight here by the LoRA adapter they are for (adapters with some)."""
    lora_others: frozenset[str] = frozenset()
    """The LoRA adapters of the engine's running and waiting requests, as its stats last
    said, that no call of this control plane was for while they were read: another
    client's requests (see ``HealthMonitor``)."""
    last_health_check: float | None = None
    est_ttft_base_s: float = 0.05
    est_s_per_prefill_token: float = 1 / 8000.0
    est_tpot_s: float = 0.02
    ttft_samples: int = 0
    rate_samples: int = 0
    """TTFTs of :data:`RATE_FROM_TOKENS` pending tokens or more (those the prefill rate is
    learnt from), among ``ttft_samples``."""
    prefill_fit: PrefillFit = field(default_factory=PrefillFit)
    """Both parts of the TTFT fitted to long prompts (:meth:`observe_first_token`)."""
    chunk_cost: ChunkCost = field(default_factory=ChunkCost)
    """A prompt token's share of a step beside running decodes (:meth:`observe_first_token`;
    the PD decider's stall model reads it as :attr:`est_s_per_chunk_token`)."""
    tpot_samples: int = 0
    """Observations behind the estimates: the first ones replace the priors outright (an
    average of those seen), later ones move them by :data:`_ALPHA`."""
    tpot_by_batch: list[float] = field(default_factory=lambda: [0.0] * TPOT_BUCKETS)
    """The TPOT estimate per batch bucket (:func:`batch_bucket`), learnt as
    :attr:`est_tpot_s` is (the first observations of a bucket averaged, then EWMA): an
    instance's decode steps are slower in a bigger batch, and one estimate over every batch
    kept the TPOT learnt in a burst for the idle instance after it (~3x a solo request's
    on vLLM), so that deadlines and budgets a solo request meets were refused."""
    tpot_batch_samples: list[int] = field(default_factory=lambda: [0] * TPOT_BUCKETS)
    """Observations behind each bucket of :attr:`tpot_by_batch`."""
    tpot_buckets_seen: int = 0
    """Bit ``k`` is set once bucket ``k`` has an observation (:meth:`tpot_at` reads it)."""
    stream_credit: float = 1.0
    """Sampled engine streaming (``engine_stream = "sampled"``): a non-streaming request
    streams when the credit is 1, which it then gives up; each adds the sample fraction (so
    the instance's first one streams, then one in every 1 / fraction)."""
    stream_sample_due: float = -math.inf
    """The earliest time (clock seconds) the next sampled request may stream: the sample's
    rate limit (``engine_stream_sample_max_per_s``). Until then the credit stays full."""
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_KEEP_LATENCIES))
    """The latest end-to-end latencies (at most :data:`_KEEP_LATENCIES`), for the average
    :meth:`public_instance` reports."""
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    registered_at: float = 0.0
    """When the instance was registered, in the control plane's running seconds (see
    ``ControlPlaneManager``: the divisor of its rates)."""
    _view: InstanceView | None = field(default=None, init=False, repr=False, compare=False)
    _view_key: tuple[object, ...] = field(default=(), init=False, repr=False, compare=False)
    _placement: _Placement | None = field(default=None, init=False, repr=False, compare=False)
    """The view's fields from ``gpu_count`` to ``network_bandwidth_gbps`` (read from the
    registered instance; see :meth:`_build_view`)."""
    _placement_of: ExecutionInstance | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id

    @property
    def accepting(self) -> bool:
        return self.instance.is_available and not self.draining and not self.removed

    @property
    def routable(self) -> bool:
        """Healthy, as the instance's view shows it: probes pass, the registered instance
        is marked healthy and its circuit lets requests through (closed, or half-open for
        a trial request: :attr:`CircuitBreaker.routable`)."""
        return self.healthy and self.instance.is_healthy and self.breaker.routable

    @property
    def up(self) -> bool:
        """Healthy and accepting, as the instance's view shows it."""
        return self.routable and self.accepting

    def observe_first_token(self, ttft_s: float, pending_tokens: int) -> None:
        """Refine the prefill estimate from one request's TTFT (pending tokens at dispatch).
        A TTFT no later than the fixed part's estimate lowers that estimate, as a short
        prompt's does, and leaves the rate (read against a prior above the engine's real
        overhead, every token's share would be 0 and the prefill rate endless);
        one of fewer than :data:`RATE_FROM_TOKENS` pending tokens refines the fixed part
        only (what it has beyond the tokens' predicted share). While only long prompts
        come, and their lengths vary enough to tell them apart, both parts are a line fitted
        to the latest of them (:class:`PrefillFit`)."""
        if pending_tokens <= 0:
            return
        self.ttft_samples += 1
        alpha = max(_ALPHA, 1.0 / self.ttft_samples)
        if pending_tokens < RATE_FROM_TOKENS:
            self.prefill_fit.note_short()
            self._refine_fixed_part(ttft_s, pending_tokens, alpha)
            return
        excess_s = ttft_s - self.est_ttft_base_s
        fit = self.prefill_fit
        if (own := fit.line(paused=True)) is not None and ttft_s > 0.0:
            # against the fit's own line, read or paused by short prompts (not the EWMA
            # rule's, which is off in just the case the fit is for)
            predicted = own[0] + pending_tokens * own[1]
            fit.drift += _ALPHA * (math.log(ttft_s / predicted) - fit.drift)
            if abs(fit.drift) > FIT_RESET_DRIFT:  # the engine changed: forget the old line
                fit = self.prefill_fit = PrefillFit()
                self.chunk_cost = ChunkCost()
        if excess_s > 0.0:
            self.chunk_cost.add(pending_tokens, excess_s, self.est_tpot_s)
        fit.add(pending_tokens, ttft_s)
        line = fit.line()
        if line is None and excess_s <= 0.0:
            # no later than the fixed part's estimate alone: that estimate is too high (a
            # prior above the engine's overhead). Read against it, the tokens' share would
            # be 0 and the rate endless; the fixed part is lowered as a short prompt lowers
            # it, and the rate kept
            self._refine_fixed_part(ttft_s, pending_tokens, alpha)
            return
        self.rate_samples += 1
        if line is not None:
            self.est_ttft_base_s = line[0]
            self.est_s_per_prefill_token = max(line[1], MIN_S_PER_PREFILL_TOKEN)
            return
        alpha = max(_ALPHA, 1.0 / self.rate_samples)  # (the first replaces the prior)
        per_token = excess_s / pending_tokens
        estimate = self.est_s_per_prefill_token + alpha * (per_token - self.est_s_per_prefill_token)
        self.est_s_per_prefill_token = max(estimate, MIN_S_PER_PREFILL_TOKEN)

    def _refine_fixed_part(self, ttft_s: float, pending_tokens: int, alpha: float) -> None:
        """Move the TTFT's fixed part by ``alpha`` toward what ``ttft_s`` leaves beyond the
        ``pending_tokens``' predicted share (at least 0)."""
        fixed = max(ttft_s - pending_tokens * self.est_s_per_prefill_token, 0.0)
        self.est_ttft_base_s += alpha * (fixed - self.est_ttft_base_s)

    @property
    def est_s_per_chunk_token(self) -> float:
        """Seconds a prompt token adds to a step beside running decodes
        (:class:`ChunkCost`; the prefill estimate until a long prompt told it)."""
        s = self.chunk_cost.s_per_token()
        return self.est_s_per_prefill_token if s is None else s

    def observe_tpot(self, tpot_s: float, batch: int | None = None) -> None:
        """Refine the TPOT estimates from one request's TPOT: the overall one
        (:attr:`est_tpot_s`, what ``/admin/status`` reports) and, given the ``batch`` the
        request ran in (a proxy: the larger of the instance's in-flight counts when it
        started and when it ended, itself included), that batch's bucket's
        (:attr:`tpot_by_batch`)."""
        self.tpot_samples += 1
        self.est_tpot_s += max(_ALPHA, 1.0 / self.tpot_samples) * (tpot_s - self.est_tpot_s)
        if batch is None:
            return
        k = batch_bucket(batch)
        n = self.tpot_batch_samples[k] = self.tpot_batch_samples[k] + 1
        self.tpot_by_batch[k] += max(_ALPHA, 1.0 / n) * (tpot_s - self.tpot_by_batch[k])
        self.tpot_buckets_seen |= 1 << k

    def tpot_at(self, batch: int) -> tuple[float, bool]:
        """The predicted TPOT of a request that runs in a batch of ``batch``, and whether it
        is known there: the estimate of the batch's bucket when it has observations; else
        that of the nearest lower bucket with some (decode steps are no faster in a bigger
        batch: the closest bound from below), also known; else that of the lowest bucket
        with some, not known (a bound from above); else the overall estimate (the prior
        at first), not known."""
        seen = self.tpot_buckets_seen
        if not seen:
            return self.est_tpot_s, False
        k = batch_bucket(batch)
        below = seen & ((2 << k) - 1)
        if below:
            return self.tpot_by_batch[below.bit_length() - 1], True
        return self.tpot_by_batch[(seen & -seen).bit_length() - 1], False

    @property
    def measured(self) -> bool:
        """Whether traffic has told enough of it: :data:`LEARN_SAMPLES` requests completed
        here or latencies observed (before, its estimates are its priors, or the mean of a
        few observations, which one noisy request can put far off)."""
        return max(self.completed, self.tpot_samples, self.ttft_samples) >= LEARN_SAMPLES

    def record_latency(self, latency_ms: float) -> None:
        self.latencies_ms.append(latency_ms)  # the oldest drops out past the window

    def lora_call_started(self, adapter: str) -> None:
        """An engine call for the LoRA ``adapter`` starts here."""
        calls = self.lora_in_flight
        calls[adapter] = calls.get(adapter, 0) + 1

    def lora_call_ended(self, adapter: str) -> None:
        """An engine call for the LoRA ``adapter`` here is over."""
        calls = self.lora_in_flight
        left = calls[adapter] - 1
        if left:
            calls[adapter] = left
        else:
            del calls[adapter]

    def note_stats(self, stats: EngineStats, ours: Iterable[str] = ()) -> None:
        """Its engine's stats, just read: :attr:`last_stats`, and :attr:`lora_others` from
        their adapters (those of a call in flight here, now or when the stats were asked
        for, ``ours``, are this control plane's)."""
        self.last_stats = stats
        if stats.lora_adapters or self.lora_others:
            self.lora_others = stats.lora_adapters.difference(self.lora_in_flight, ours)

    def lora_slots_left(self) -> int | None:
        """The LoRA slots of its engine's batch (vLLM's ``--max-loras``, from its stats)
        that no adapter holds: those of the calls in flight here (known as they start and
        end) and of another client's requests (:attr:`lora_others`, as its stats said a
        second ago) hold one each. None when the engine does not say how many it has."""
        stats = self.last_stats
        if stats is None or not stats.max_lora:
            return None
        calls, others = self.lora_in_flight, self.lora_others
        busy = len(calls) + sum(1 for name in others if name not in calls)
        return max(0, stats.max_lora - busy)

    @property
    def gpu_count(self) -> int:
        """GPUs the instance occupies (:func:`gpus_of`)."""
        return gpus_of(self.instance)

    @property
    def parallelism(self) -> ParallelismType | None:
        """The instance's parallelism, from its TP, PP and DP sizes (None: none)."""
        inst = self.instance
        return ParallelismType.of(
            inst.tensor_parallel_size, inst.pipeline_parallel_size, inst.data_parallel_size
        )

    @property
    def cost_per_second(self) -> float:
        """Price of the instance's GPUs per second (the same figure its view reports)."""
        return price_per_second(self.instance)

    def _live_key(self) -> tuple[object, ...]:
        inst = self.instance
        stats = self.last_stats
        return (
            inst, inst.is_healthy, inst.is_available, inst.max_concurrent_requests,
            self.healthy, self.draining, self.removed, self.breaker.state,
            self.breaker.probe_passed, self.in_flight,
            self.queued_prefill_tokens, self.outstanding_decode_tokens, stats,
            self.est_ttft_base_s, self.est_s_per_prefill_token, self.est_tpot_s,
            self.tpot_samples, self.chunk_cost.xy, self.chunk_cost.xx, self.rate_samples > 0,
            self.measured,
        )  # fmt: skip

    def view(self) -> InstanceView:
        """The frozen view of this instance now. Views are rebuilt only when a field they
        read changed (several snapshots are taken per request; most see the same state).
        The instance's topology fields are read when it is registered and again whenever
        the registered object is replaced."""
        key = self._live_key()
        if self._view is not None and key == self._view_key:
            return self._view
        view = self._build_view()
        self._view, self._view_key = view, key
        return view

    def _build_view(self) -> InstanceView:
        inst = self.instance
        placement = self._placement
        if placement is None or self._placement_of is not inst:  # new, or object replaced
            placement = self._placement = (
                self.gpu_count, inst.price_per_gpu_hour, inst.machine_id, inst.rack_id,
                inst.numa_node, inst.nvlink_domain, frozenset(inst.nvlink_peers),
                inst.network_bandwidth_gbps,
            )  # fmt: skip
            self._placement_of = inst
        stats = self.last_stats
        breaker = self.breaker.state
        tpot_s, tpot_known = self.tpot_at(self.in_flight + 1)  # a request joining now
        # every field, in InstanceView's order (a view is built per request and instance)
        return fill_view(
            inst.instance_id,
            inst.model_name,
            inst.instance_type,
            self.routable,
            self.accepting,
            self.in_flight,
            # half-open: one trial request at a time
            1 if breaker is CircuitState.HALF_OPEN else inst.max_concurrent_requests,
            self.queued_prefill_tokens,
            self.outstanding_decode_tokens,
            stats.kv_usage if stats else 0.0,
            stats.waiting if stats else 0,
            *placement,
            self.est_ttft_base_s,
            1.0 / max(self.est_s_per_prefill_token, MIN_S_PER_PREFILL_TOKEN),
            tpot_s,
            1.0 / self.est_s_per_chunk_token,
            self.rate_samples > 0,
            self.measured,
            tpot_known,
        )

    def public_instance(self, running_s: float = 0.0) -> ExecutionInstance:
        """A copy of the registered instance with its live fields filled in (tokens per
        second over the ``running_s`` seconds the control plane has run since it was
        registered, as :meth:`report`'s), and the GPUs the control plane counts it on
        (``gpu_count``, at least TP × PP)."""
        inst = self.instance
        avg = sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else 0.0
        prefilling = inst.instance_type is ExecutionInstanceType.PREFILLING
        tokens = self.prefilled_tokens if prefilling else self.tokens_generated
        return replace(
            inst,
            gpu_count=self.gpu_count,
            is_healthy=self.routable,
            is_available=self.accepting,
            active_requests=self.in_flight,
            current_load=min(1.0, self.in_flight / max(inst.max_concurrent_requests, 1)),
            avg_latency_ms=avg,
            throughput_tokens_per_sec=tokens / running_s if running_s > 0 else 0.0,
            gpu_utilization=self.last_stats.kv_usage if self.last_stats else 0.0,
            lora_adapters=sorted(self.adapters),
        )

    def report(
        self, *, running_s: float, timestamp: datetime, to_datetime: Callable[[float], datetime]
    ) -> InstanceMetrics:
        """The instance's figures (``ControlPlaneManager.get_instance_report``):
        requests and tokens since it was registered, latency percentiles over its latest
        :data:`_KEEP_LATENCIES` completed requests, tokens per second over the
        ``running_s`` seconds the control plane has run since then, and the engine's
        latest scraped load. A PREFILLING instance's requests are its prefill legs, its
        latencies theirs (dispatch to the leg's end) and its tokens the prompt tokens it
        prefilled. ``gpu_utilization`` is the engine's KV cache usage (what
        engines export; the same figure :meth:`public_instance` reports);
        ``gpu_memory_used_gb`` is not measured."""
        inst = self.instance
        lat = np.asarray(self.latencies_ms, dtype=float)
        stats = self.last_stats
        prefilling = inst.instance_type is ExecutionInstanceType.PREFILLING
        tokens = self.prefilled_tokens if prefilling else self.tokens_generated
        checked = self.last_health_check
        metadata: dict[str, Any] = {
            "accepting": self.accepting,
            "draining": self.draining,
            "circuit": self.breaker.state.label,
            "completed_requests": self.completed,
            "failed_calls": self.failed_calls,
            "tokens_generated": self.tokens_generated,
            "prefilled_tokens": self.prefilled_tokens,
            "queued_prefill_tokens": self.queued_prefill_tokens,
            "outstanding_decode_tokens": self.outstanding_decode_tokens,
        }
        if stats is not None:
            metadata.update(
                engine_running=stats.running,
                engine_waiting=stats.waiting,
                kv_cache_usage=stats.kv_usage,
                prefix_cache_hit_rate=stats.prefix_hit_rate,
                engine_stats_source=stats.source,
            )
        return InstanceMetrics(
            instance_id=inst.instance_id,
            timestamp=timestamp,
            total_requests_processed=self.completed + self.failed_requests,
            active_requests=self.in_flight,
            failed_requests=self.failed_requests,
            avg_latency_ms=mean(lat),
            p50_latency_ms=percentile(lat, 50),
            p95_latency_ms=percentile(lat, 95),
            p99_latency_ms=percentile(lat, 99),
            throughput_tokens_per_sec=tokens / running_s if running_s > 0 else 0.0,
            gpu_utilization=stats.kv_usage if stats is not None else 0.0,
            gpu_memory_total_gb=inst.gpu_memory_gb * self.gpu_count,
            current_load=min(1.0, self.in_flight / max(inst.max_concurrent_requests, 1)),
            is_healthy=self.routable,
            last_health_check=None if checked is None else to_datetime(checked),
            consecutive_failures=max(self.consecutive_failures, self.breaker.consecutive_failures),
            metadata=metadata,
        )


_NONE: frozenset[str] = frozenset()


class InstanceRegistry:
    """All registered instances, by id, in registration order."""

    def __init__(self) -> None:
        self._states: dict[str, InstanceState] = {}

    def __iter__(self) -> Iterator[InstanceState]:
        return iter(list(self._states.values()))

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, instance_id: object) -> bool:
        return instance_id in self._states

    def add(
        self, instance: ExecutionInstance, client: EngineClient, priors: LatencyPriors
    ) -> InstanceState:
        if instance.instance_id in self._states:
            raise ConflictError(f"instance {instance.instance_id!r} is already registered")
        if instance.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be at least 1")
        state = InstanceState(
            instance=instance,
            client=client,
            healthy=instance.is_healthy,
            est_ttft_base_s=priors.ttft_base_s,
            est_s_per_prefill_token=1.0 / priors.prefill_tokens_per_s,
            est_tpot_s=priors.tpot_s,
            adapters=frozenset(instance.lora_adapters),
        )
        self._states[instance.instance_id] = state
        return state

    def get(self, instance_id: str) -> InstanceState:
        try:
            return self._states[instance_id]
        except KeyError:
            raise InstanceNotFoundError(f"no instance {instance_id!r} is registered") from None

    def find(self, instance_id: str) -> InstanceState | None:
        return self._states.get(instance_id)

    def discard(self, instance_id: str) -> InstanceState | None:
        return self._states.pop(instance_id, None)

    def models(self) -> set[str]:
        return {s.instance.model_name for s in self._states.values() if not s.removed}

    def serves(self, model: str) -> bool:
        """Whether ``model`` is among :meth:`models` (without building the set)."""
        for s in self._states.values():  # noqa: SIM110 (per request: no generator)
            if s.instance.model_name == model and not s.removed:
                return True
        return False

    def adapter_base(self, name: str) -> str | None:
        """The model of the LoRA adapter ``name``: that of the first registered instance
        (not removed) that serves it; None when none does."""
        for s in self._states.values():
            if name in s.adapters and not s.removed:
                return s.instance.model_name
        return None

    def adapter_named(self, model: str, adapter: object) -> bool:
        """Whether an instance of ``model`` (not removed) serves the LoRA ``adapter``."""
        return any(
            adapter in s.adapters and s.instance.model_name == model and not s.removed
            for s in self._states.values()
        )

    def split_adapter(self, name: str) -> tuple[str, str] | None:
        """SGLang's name of an adapter, ``MODEL:ADAPTER``, as (model, adapter) when an
        instance of that model serves that adapter (either name may hold a colon too);
        None otherwise."""
        at = name.find(":")
        while at > 0:
            model, adapter = name[:at], name[at + 1 :]
            if self.adapter_named(model, adapter):
                return model, adapter
            at = name.find(":", at + 1)
        return None

    def adapters(self) -> dict[str, str]:
        """Every LoRA adapter an instance (not removed) serves, with its model (as
        :meth:`adapter_base` gives it); not one named as a served model, which that
        name means."""
        models = self.models()
        out: dict[str, str] = {}
        for s in self._states.values():
            if s.removed:
                continue
            for name in s.adapters:
                if name not in models:
                    out.setdefault(name, s.instance.model_name)
        return out

    def without_adapter(self, model: str, adapter: str) -> frozenset[str]:
        """The instances of ``model`` that do not serve its LoRA adapter ``adapter``."""
        return frozenset(
            s.instance_id
            for s in self._states.values()
            if s.instance.model_name == model and adapter not in s.adapters
        )

    def up_kinds(self, model: str) -> tuple[bool, bool]:
        """Whether an instance serving ``model`` is up (its view shows it healthy and
        accepting, as a snapshot's ``healthy and accepting`` views of the model are), and
        whether one of those runs whole requests (not only a PD leg); in one pass."""
        some = False
        for s in self._states.values():
            if s.instance.model_name == model and s.up:
                if s.instance.instance_type.runs_whole_requests:
                    return True, True
                some = True
        return some, False

    def too_short(self, model: str, tokens: int) -> frozenset[str]:
        """The instances of ``model`` whose known context holds fewer than ``tokens``
        (a request's prompt and ``max_tokens``) while another of its instances that is up
        has a longer one, or one not known yet: the request is kept off them (vLLM 0.11+
        would cut its answer to the context rather than refuse it). Empty when none is
        that short, or none is longer (the engines then answer as they do)."""
        short = [
            s.instance_id
            for s in self._states.values()  # (per request: the context first, cheapest)
            if (known := s.context_length) is not None
            and known < tokens
            and s.instance.model_name == model
            and not s.removed
        ]
        if not short:
            return _NONE
        for s in self._states.values():
            known = s.context_length
            if (known is None or known >= tokens) and s.instance.model_name == model and s.up:
                return frozenset(short)
        return _NONE

    def up_members(
        self, model: str, among: Callable[[InstanceState], bool] | None = None
    ) -> list[tuple[str, ExecutionInstanceType]]:
        """The instances serving ``model`` (of those ``among`` takes, when given) that are
        up (see :meth:`up_kinds`), with their roles."""
        return [
            (s.instance_id, s.instance.instance_type)
            for s in self._states.values()
            if s.instance.model_name == model and s.up and (among is None or among(s))
        ]

    def pair_down_reason(
        self,
        model: str,
        among: Callable[[InstanceState], bool] | None = None,
        *,
        what: str | None = None,
    ) -> str:
        """Why no prefill/decode pair of ``model`` (of the instances ``among`` takes, when
        given) is up, for an error: the role none of whose instances is up; ``what``
        names what they serve (by default "model '<model>'")."""
        what = what or f"model {model!r}"
        up = self.up_members(model, among)
        for role, can in (("prefill", "runs_prefill"), ("decode", "runs_decode")):
            if not any(getattr(kind, can) for _, kind in up):
                total = sum(
                    1
                    for st in self._states.values()
                    if st.instance.model_name == model
                    and not st.removed
                    and (among is None or among(st))
                    and getattr(st.instance.instance_type, can)
                )
                return (
                    f"no {role}-capable instance of {what} is healthy and accepting "
                    f"requests right now (0 of {total})"
                )
        return f"no prefill/decode pair of {what} is up right now"

    def down(
        self,
        model: str,
        among: Callable[[InstanceState], bool] | None = None,
        *,
        what: str | None = None,
    ) -> tuple[str, str]:
        """Why no instance serving ``model`` (of those ``among`` takes, when given) is up:
        ``("draining", why)`` when every one of them is draining, else
        ``("no_healthy_instance", why)`` (the reason label of a refusal in
        ``sage_llm_requests_rejected_total``, and the error's message, which names what
        they serve as ``what``: by default "model '<model>'")."""
        what = what or f"model {model!r}"
        serving = [
            s
            for s in self._states.values()
            if s.instance.model_name == model and not s.removed and (among is None or among(s))
        ]
        if serving and all(s.draining for s in serving):  # ejected ones too: a planned stop
            why = f"every instance serving {what} is draining ({len(serving)})"
            return "draining", why
        if serving and all(s.routable for s in serving):
            return (
                "no_healthy_instance",
                f"no instance serving {what} is accepting requests right now",
            )
        return "no_healthy_instance", f"no healthy instance serves {what} right now"

    def back_in(
        self, model: str, now: float, among: Callable[[InstanceState], bool] | None = None
    ) -> float | None:
        """Seconds until the nearest cool-down of an ejected instance serving ``model`` (of
        those ``among`` takes, when given) ends (when it may take requests again; 0 for one
        whose trial probe is under way); None when none is cooling down or on trial."""
        waits = [
            0.0 if s.breaker.state is CircuitState.HALF_OPEN else s.breaker.open_until - now
            for s in self._states.values()
            if s.instance.model_name == model
            and not s.removed
            and (among is None or among(s))
            and not s.draining
            and s.breaker.state is not CircuitState.CLOSED
        ]
        return max(0.0, min(waits)) if waits else None

    def snapshot(self, now: float, prefix: PrefixView) -> ClusterSnapshot:
        views = tuple(s.view() for s in self._states.values() if not s.removed)
        return fill_snapshot(now, views, prefix)
