"""Benchmark metrics: per-request latencies and the summary of a run.

Definitions (times in seconds, all measured on the client's clock):

* **TTFT** = first output chunk time − arrival (scheduled send time of the request).
* **E2E** = end time − arrival.
* **TPOT** = (E2E − TTFT) / (output tokens − 1); undefined with fewer than 2 output tokens.
* **ITL** = gaps between successive output chunks (``token_times_s`` includes the first
  chunk); pooled over requests for the percentiles, as vLLM's benchmark does.
* A request **meets the SLO** when it completed (``ok``) and every defined target holds:
  TTFT ≤ ``ttft_s`` (a request that completed with no output token uses its E2E as TTFT),
  TPOT ≤ ``tpot_s`` (vacuous with fewer than 2 tokens), its largest ITL gap ≤ ``itl_s``,
  E2E ≤ ``e2e_s``. A request's own ``slo_ttft_s``/``slo_tpot_s``/``slo_e2e_s`` override the
  named SLO's targets.
* **Goodput** = requests meeting the SLO per second of the run (DistServe's definition).
* **SLO attainment** = requests meeting the SLO / all requests (failed ones count as misses),
  overall and per priority.
* **Fairness** = Jain's index (Σx)² / (n·Σx²) over each user's mean TTFT of completed
  requests (users without an id are left out): 1.0 when every user waits as long as every
  other, 1/n when one user gets all the waiting. TTFT is chosen because queueing, which is
  what scheduling decides, shows up there and it depends little on output length.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sage_llm.types import RequestPriority

__all__ = [
    "SLO",
    "BenchSummary",
    "LatencyStats",
    "MeasuredRequest",
    "RequestMeasurement",
    "e2e",
    "itl",
    "jain_index",
    "latency_stats",
    "measure",
    "meets_slo",
    "percentile",
    "summarize",
    "tpot",
    "ttft",
]


@dataclass(frozen=True, slots=True)
class RequestMeasurement:
    """What the load generator observed for one request (absolute times, seconds).

    ``token_times_s`` holds the arrival time of every output chunk, the first one included.
    Failed requests set ``ok=False`` and ``error``; their ``end_s`` is when they failed.
    Slotted: a simulated run keeps a million of them (152 bytes each rather than 272).
    """

    request_id: str
    priority: RequestPriority
    user_id: str | None
    arrival_s: float
    first_token_s: float | None
    token_times_s: Sequence[float]
    end_s: float
    prompt_tokens: int
    output_tokens: int
    ok: bool = True
    error: str | None = None
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    slo_e2e_s: float | None = None

    def __post_init__(self) -> None:
        times = tuple(float(t) for t in self.token_times_s)
        object.__setattr__(self, "token_times_s", times)
        if self.end_s < self.arrival_s:
            raise ValueError(f"{self.request_id}: end_s {self.end_s} < arrival_s")
        if self.first_token_s is not None and self.first_token_s < self.arrival_s:
            raise ValueError(f"{self.request_id}: first_token_s before arrival_s")
        if any(b < a for a, b in itertools.pairwise(times)):
            raise ValueError(f"{self.request_id}: token_times_s must be non-decreasing")
        if self.prompt_tokens < 0 or self.output_tokens < 0:
            raise ValueError(f"{self.request_id}: token counts must be >= 0")


class MeasuredRequest(Protocol):
    """What a measurement keeps of the request it measures (a workload request, or what
    the cluster simulator kept of one)."""

    @property
    def request_id(self) -> str: ...
    @property
    def priority(self) -> RequestPriority: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def slo_ttft_s(self) -> float | None: ...
    @property
    def slo_tpot_s(self) -> float | None: ...
    @property
    def slo_e2e_s(self) -> float | None: ...


def measure(
    req: MeasuredRequest,
    arrival: float,
    first: float | None,
    end: float,
    output: int,
    error: str | None = None,
    times: Sequence[float] | None = None,
) -> RequestMeasurement:
    """What a client that sent ``req`` at ``arrival`` observed: its first output at
    ``first`` (None: none), every output chunk at ``times``, its end at ``end``, ``output``
    tokens, and ``error`` when it failed."""
    return RequestMeasurement(
        request_id=req.request_id,
        priority=req.priority,
        user_id=req.user_id,
        arrival_s=arrival,
        first_token_s=first,
        token_times_s=times or (),
        end_s=end,
        prompt_tokens=req.prompt_tokens,
        output_tokens=output,
        ok=error is None,
        error=error,
        slo_ttft_s=req.slo_ttft_s,
        slo_tpot_s=req.slo_tpot_s,
        slo_e2e_s=req.slo_e2e_s,
    )


@dataclass(frozen=True)
class SLO:
    """A named latency target; ``None`` leaves a dimension unconstrained."""

    ttft_s: float | None
    tpot_s: float | None
    itl_s: float | None = None
    e2e_s: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"SLO {key} must be > 0, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "itl_s": self.itl_s,
            "e2e_s": self.e2e_s,
        }


def ttft(m: RequestMeasurement) -> float | None:
    """Time to first token, or None when no token arrived."""
    return None if m.first_token_s is None else m.first_token_s - m.arrival_s


def e2e(m: RequestMeasurement) -> float:
    """End-to-end latency."""
    return m.end_s - m.arrival_s


def tpot(m: RequestMeasurement) -> float | None:
    """Time per output token after the first: (E2E − TTFT) / (output_tokens − 1)."""
    if m.first_token_s is None or m.output_tokens < 2:
        return None
    return (m.end_s - m.first_token_s) / (m.output_tokens - 1)


def itl(m: RequestMeasurement) -> list[float]:
    """Inter-token (inter-chunk) latencies: gaps between successive ``token_times_s``."""
    t = m.token_times_s
    return [b - a for a, b in itertools.pairwise(t)]


def percentile(values: Iterable[float], q: float) -> float:
    """The ``q``-th percentile (0–100) with linear interpolation between closest ranks,
    like ``numpy.percentile``'s default. Raises ValueError on no values or q out of range."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of no values")
    return _sorted_percentile(data, q)


def _sorted_percentile(data: Sequence[float], q: float) -> float:
    """:func:`percentile` of values already sorted (at least one)."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(data) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index (Σx)² / (n·Σx²) in [1/n, 1]; None for no values, 1.0 when all
    values are zero."""
    if not values:
        return None
    if any(v < 0 for v in values):
        raise ValueError("Jain's index needs non-negative values")
    square_sum = sum(v * v for v in values)
    if square_sum == 0:
        return 1.0
    return sum(values) ** 2 / (len(values) * square_sum)


@dataclass(frozen=True)
class LatencyStats:
    """Mean and percentiles of one latency, in seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.mean,
            "p50": self.p50,
            "p90": self.p90,
            "p99": self.p99,
            "max": self.max,
        }


def latency_stats(values: Sequence[float]) -> LatencyStats | None:
    """Summary of some latencies; None when there are none."""
    if not values:
        return None
    data = sorted(values)  # once, for every percentile
    return LatencyStats(
        count=len(values),
        mean=sum(values) / len(values),
        p50=_sorted_percentile(data, 50),
        p90=_sorted_percentile(data, 90),
        p99=_sorted_percentile(data, 99),
        max=data[-1],
    )


def meets_slo(m: RequestMeasurement, slo: SLO | None) -> bool:
    """Whether ``m`` completed within its targets (see the module docstring)."""
    if not m.ok:
        return False
    named = slo if slo is not None else _NO_SLO
    ttft_target = m.slo_ttft_s if m.slo_ttft_s is not None else named.ttft_s
    tpot_target = m.slo_tpot_s if m.slo_tpot_s is not None else named.tpot_s
    e2e_target = m.slo_e2e_s if m.slo_e2e_s is not None else named.e2e_s
    itl_target = named.itl_s
    if ttft_target is not None:
        first = m.first_token_s if m.first_token_s is not None else m.end_s
        if first - m.arrival_s > ttft_target:
            return False
    if tpot_target is not None:
        per_token = tpot(m)
        if per_token is not None and per_token > tpot_target:
            return False
    if itl_target is not None:
        gaps = itl(m)
        if gaps and max(gaps) > itl_target:
            return False
    return not (e2e_target is not None and m.end_s - m.arrival_s > e2e_target)


_NO_SLO = SLO(ttft_s=None, tpot_s=None)
"""No named targets (a request's own ones still apply); immutable."""


@dataclass(frozen=True)
class BenchSummary:
    """The figures of one benchmark run. Latency fields are None when nothing was measured;
    ratios are None when there were no requests."""

    count: int
    ok: int
    failed: int
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    ttft: LatencyStats | None
    tpot: LatencyStats | None
    itl: LatencyStats | None
    e2e: LatencyStats | None
    slo: SLO | None
    slo_met: int
    goodput: float
    slo_attainment: float | None
    slo_attainment_by_priority: dict[RequestPriority, float] = field(default_factory=dict)
    fairness_index: float | None = None
    users: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Failed requests by kind of error: the message with its numbers shown as ``N``
    (:func:`error_kind`), so that one cause with per-request figures is one entry."""
    error_examples: dict[str, str] = field(default_factory=dict)
    """For each kind in ``errors``, the first message of that kind, as it came."""
    slo_counts_by_priority: dict[RequestPriority, tuple[int, int]] = field(default_factory=dict)
    """Per priority: (requests meeting the SLO, requests), the counts behind
    ``slo_attainment_by_priority``."""

    def slo_attainment_of(self, priorities: Iterable[RequestPriority]) -> float | None:
        """The share of the requests of ``priorities`` that met the SLO: met / requests over
        those classes together (each class weighs by its request count, not equally); None
        when the run had none of them."""
        met = total = 0
        for p in set(priorities):
            m, n = self.slo_counts_by_priority.get(p, (0, 0))
            met += m
            total += n
        return met / total if total else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (priorities by lower-case name)."""

        def stats(s: LatencyStats | None) -> dict[str, Any] | None:
            return None if s is None else s.to_dict()

        return {
            "count": self.count,
            "ok": self.ok,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "request_throughput": self.request_throughput,
            "output_token_throughput": self.output_token_throughput,
            "total_token_throughput": self.total_token_throughput,
            "ttft_s": stats(self.ttft),
            "tpot_s": stats(self.tpot),
            "itl_s": stats(self.itl),
            "e2e_s": stats(self.e2e),
            "slo": None if self.slo is None else self.slo.to_dict(),
            "slo_met": self.slo_met,
            "goodput": self.goodput,
            "slo_attainment": self.slo_attainment,
            "slo_attainment_by_priority": {
                p.name.lower(): v for p, v in sorted(self.slo_attainment_by_priority.items())
            },
            "slo_counts_by_priority": {
                p.name.lower(): {"met": m, "requests": n}
                for p, (m, n) in sorted(self.slo_counts_by_priority.items())
            },
            "fairness_index": self.fairness_index,
            "fairness_metric": "jain(per-user mean ttft)",
            "users": self.users,
            "errors": dict(self.errors),
            "error_examples": dict(self.error_examples),
        }


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def error_kind(message: str) -> str:
    """``message`` with every number as ``N`` (``context length is N tokens; you requested
    N``): the kind of error, whatever the request's own figures, ids and instance indices."""
    return _NUMBER.sub("N", message)


def summarize(
    measurements: Sequence[RequestMeasurement], duration_s: float, slo: SLO | None = None
) -> BenchSummary:
    """Summarise a run of ``duration_s`` seconds (definitions in the module docstring)."""
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    # One pass (a simulated run has a million measurements); every list is built in the
    # measurements' order, so sums and means are the same floats as term by term.
    named = slo if slo is not None else _NO_SLO
    ttfts: list[float] = []
    tpots: list[float] = []
    itls: list[float] = []
    e2es: list[float] = []
    met = ok = output_tokens = prompt_tokens = 0
    by_priority: dict[RequestPriority, list[int]] = {}  # [met, all]
    per_user: dict[str, list[float]] = defaultdict(list)
    users: set[str] = set()
    errors: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for m in measurements:
        hit = meets_slo(m, named)
        counts = by_priority.get(m.priority)
        if counts is None:
            counts = by_priority[m.priority] = [0, 0]
        counts[1] += 1
        user = m.user_id
        if user is not None:
            users.add(user)
        if not m.ok:
            message = m.error or "unknown error"
            kind = error_kind(message)
            errors[kind] += 1
            examples.setdefault(kind, message)
            continue
        if hit:
            met += 1
            counts[0] += 1
        ok += 1
        output_tokens += m.output_tokens
        prompt_tokens += m.prompt_tokens
        first = m.first_token_s
        if first is not None:
            ttfts.append(first - m.arrival_s)
            if m.output_tokens >= 2:
                tpots.append((m.end_s - first) / (m.output_tokens - 1))
            if user is not None:
                per_user[user].append(first - m.arrival_s)
        times = m.token_times_s
        if len(times) > 1:
            itls.extend(b - a for a, b in itertools.pairwise(times))
        e2es.append(m.end_s - m.arrival_s)
    count = len(measurements)
    return BenchSummary(
        count=count,
        ok=ok,
        failed=count - ok,
        duration_s=duration_s,
        request_throughput=ok / duration_s,
        output_token_throughput=output_tokens / duration_s,
        total_token_throughput=(output_tokens + prompt_tokens) / duration_s,
        ttft=latency_stats(ttfts),
        tpot=latency_stats(tpots),
        itl=latency_stats(itls),
        e2e=latency_stats(e2es),
        slo=slo,
        slo_met=met,
        goodput=met / duration_s,
        slo_attainment=met / count if count else None,
        slo_attainment_by_priority={p: v[0] / v[1] for p, v in sorted(by_priority.items())},
        fairness_index=jain_index([sum(v) / len(v) for v in per_user.values()]),
        users=len(users),
        errors=dict(errors),
        error_examples=examples,
        slo_counts_by_priority={p: (v[0], v[1]) for p, v in sorted(by_priority.items())},
    )
