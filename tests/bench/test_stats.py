"""Tests of the benchmark metric computations against hand-checked cases."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from sage_llm.bench import stats
from sage_llm.bench.loadgen import measurement
from sage_llm.bench.stats import (
    SLO,
    RequestMeasurement,
    e2e,
    error_kind,
    itl,
    jain_index,
    latency_stats,
    meets_slo,
    percentile,
    summarize,
    tpot,
    ttft,
)
from sage_llm.bench.workloads import WorkloadRequest
from sage_llm.types import RequestPriority


def measure(
    request_id: str = "r",
    *,
    arrival: float = 0.0,
    ttft_s: float | None = 0.5,
    gap: float = 0.1,
    tokens: int = 4,
    ok: bool = True,
    user: str | None = "u0",
    priority: RequestPriority = RequestPriority.NORMAL,
    slo_ttft_s: float | None = None,
    slo_tpot_s: float | None = None,
    slo_e2e_s: float | None = None,
) -> RequestMeasurement:
    """A request whose chunks arrive ``gap`` apart, one token each, after ``ttft_s``."""
    times = [] if ttft_s is None else [arrival + ttft_s + i * gap for i in range(tokens)]
    end = times[-1] if times else arrival + 1.0
    return RequestMeasurement(
        request_id=request_id,
        priority=priority,
        user_id=user,
        arrival_s=arrival,
        first_token_s=times[0] if times else None,
        token_times_s=times,
        end_s=end,
        prompt_tokens=10,
        output_tokens=tokens if times else 0,
        ok=ok,
        error=None if ok else "engine down",
        slo_ttft_s=slo_ttft_s,
        slo_tpot_s=slo_tpot_s,
        slo_e2e_s=slo_e2e_s,
    )


def test_per_request_latencies_by_hand() -> None:
    m = RequestMeasurement(
        request_id="a",
        priority=RequestPriority.HIGH,
        user_id="u",
        arrival_s=10.0,
        first_token_s=10.5,
        token_times_s=[10.5, 10.6, 10.8, 11.0],
        end_s=11.0,
        prompt_tokens=7,
        output_tokens=4,
    )
    assert ttft(m) == pytest.approx(0.5)
    assert e2e(m) == pytest.approx(1.0)
    assert tpot(m) == pytest.approx(0.5 / 3)
    assert itl(m) == pytest.approx([0.1, 0.2, 0.2])
    assert m.token_times_s == (10.5, 10.6, 10.8, 11.0)


def test_undefined_latencies() -> None:
    one = measure(tokens=1)
    assert tpot(one) is None
    assert itl(one) == []
    none = measure(ttft_s=None, ok=False)
    assert ttft(none) is None
    assert tpot(none) is None
    assert e2e(none) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"end_s": -1.0}, "end_s"),
        ({"first_token_s": -0.5}, "first_token_s"),
        ({"token_times_s": [0.3, 0.2]}, "non-decreasing"),
        ({"output_tokens": -1}, "token counts"),
    ],
)
def test_measurement_rejects_impossible_values(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {
        "request_id": "x",
        "priority": RequestPriority.NORMAL,
        "user_id": None,
        "arrival_s": 0.0,
        "first_token_s": 0.1,
        "token_times_s": [0.1, 0.2],
        "end_s": 0.2,
        "prompt_tokens": 1,
        "output_tokens": 2,
    }
    with pytest.raises(ValueError, match=message):
        RequestMeasurement(**{**base, **kwargs})  # type: ignore[arg-type]


def test_percentile_hand_checked() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([0.0, 10.0], 25) == pytest.approx(2.5)


def test_percentile_matches_numpy_default() -> None:
    rng = np.random.default_rng(7)
    for size in (1, 2, 5, 100, 1001):
        values = rng.lognormal(0, 1, size=size).tolist()
        for q in (0, 1, 33.3, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_bad_input() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_jain_index_hand_checked() -> None:
    assert jain_index([2.0, 2.0, 2.0, 2.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([1.0, 2.0, 3.0]) == pytest.approx(36 / 42)
    assert jain_index([0.0, 0.0]) == 1.0
    assert jain_index([]) is None
    with pytest.raises(ValueError, match="non-negative"):
        jain_index([-1.0, 1.0])


def test_latency_stats() -> None:
    stats = latency_stats([1.0, 2.0, 3.0, 4.0])
    assert stats is not None
    assert (stats.count, stats.mean, stats.p50, stats.max) == (4, 2.5, 2.5, 4.0)
    assert stats.p90 == pytest.approx(3.7)
    assert stats.p99 == pytest.approx(3.97)
    assert latency_stats([]) is None


def test_meets_slo_each_dimension() -> None:
    slo = SLO(ttft_s=1.0, tpot_s=0.2)
    assert meets_slo(measure(ttft_s=0.5, gap=0.1), slo)
    assert not meets_slo(measure(ttft_s=1.5, gap=0.1), slo)  # TTFT too slow
    assert not meets_slo(measure(ttft_s=0.5, gap=0.3), slo)  # TPOT too slow
    assert not meets_slo(measure(ok=False), slo)  # failed requests never meet it
    assert meets_slo(measure(ttft_s=0.5, gap=5.0, tokens=1), slo)  # TPOT undefined: vacuous
    # ITL: the largest gap counts; E2E: arrival to end.
    uneven = RequestMeasurement(
        "i", RequestPriority.NORMAL, None, 0.0, 0.1, [0.1, 0.2, 0.9, 1.0], 1.0, 1, 4
    )
    assert meets_slo(uneven, SLO(ttft_s=None, tpot_s=0.5))
    assert not meets_slo(uneven, SLO(ttft_s=None, tpot_s=0.5, itl_s=0.5))
    assert not meets_slo(uneven, SLO(ttft_s=None, tpot_s=None, e2e_s=0.9))
    assert meets_slo(uneven, SLO(ttft_s=None, tpot_s=None, e2e_s=1.0))
    # Completed with no output token: its E2E stands in for TTFT.
    empty = RequestMeasurement("e", RequestPriority.NORMAL, None, 0.0, None, [], 2.0, 1, 0)
    assert not meets_slo(empty, slo)
    assert meets_slo(empty, SLO(ttft_s=3.0, tpot_s=0.1))
    # A target reached exactly is met.
    on_time = RequestMeasurement("t", RequestPriority.NORMAL, None, 0.0, 0.5, [0.5], 0.5, 1, 1)
    assert meets_slo(on_time, SLO(ttft_s=0.5, tpot_s=None))
    # No SLO at all: a completed request meets it.
    assert meets_slo(measure(ttft_s=100.0), None)


def test_per_request_slo_overrides_named_slo() -> None:
    slo = SLO(ttft_s=1.0, tpot_s=0.2, e2e_s=10.0)
    assert not meets_slo(measure(ttft_s=0.5, slo_ttft_s=0.25), slo)  # stricter own target
    assert meets_slo(measure(ttft_s=1.5, slo_ttft_s=2.0), slo)  # looser own target
    assert meets_slo(measure(gap=0.3, slo_tpot_s=0.5), slo)
    assert not meets_slo(measure(gap=0.1, slo_e2e_s=0.6), slo)


def test_slo_validation_and_dict() -> None:
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(ttft_s=0.0, tpot_s=None)
    slo = SLO(ttft_s=0.5, tpot_s=0.05, name="chat")
    assert slo.to_dict() == {
        "name": "chat",
        "ttft_s": 0.5,
        "tpot_s": 0.05,
        "itl_s": None,
        "e2e_s": None,
    }


def test_summarize_hand_checked() -> None:
    high, low = RequestPriority.HIGH, RequestPriority.LOW
    ms = [
        measure("a", ttft_s=0.2, gap=0.1, tokens=3, user="u1", priority=high),  # meets
        measure("b", ttft_s=2.0, gap=0.1, tokens=3, user="u1", priority=high),  # TTFT miss
        measure("c", ttft_s=0.4, gap=0.1, tokens=5, user="u2", priority=low),  # meets
        measure("d", ttft_s=None, ok=False, user="u2", priority=low),  # failed
    ]
    summary = summarize(ms, duration_s=10.0, slo=SLO(ttft_s=1.0, tpot_s=0.2, name="chat"))
    assert (summary.count, summary.ok, summary.failed) == (4, 3, 1)
    assert summary.request_throughput == pytest.approx(0.3)
    assert summary.output_token_throughput == pytest.approx(1.1)  # 3 + 3 + 5 tokens
    assert summary.total_token_throughput == pytest.approx(4.1)  # + 3 x 10 prompt tokens
    assert summary.slo_met == 2
    assert summary.goodput == pytest.approx(0.2)
    assert summary.slo_attainment == pytest.approx(0.5)
    assert summary.slo_attainment_by_priority == {high: 0.5, low: 0.5}
    assert summary.slo_counts_by_priority == {high: (1, 2), low: (1, 2)}
    assert summary.slo_attainment_of([high, low]) == pytest.approx(0.5)
    assert summary.slo_attainment_of([RequestPriority.CRITICAL]) is None
    assert summary.ttft is not None
    assert summary.ttft.count == 3
    assert summary.ttft.mean == pytest.approx((0.2 + 2.0 + 0.4) / 3)
    assert summary.ttft.p50 == pytest.approx(0.4)
    assert summary.tpot is not None
    assert summary.tpot.mean == pytest.approx(0.1)
    assert summary.itl is not None
    assert summary.itl.count == 2 + 2 + 4
    assert summary.e2e is not None
    assert summary.e2e.max == pytest.approx(2.2)
    # Fairness over per-user mean TTFT: u1 = 1.1, u2 = 0.4.
    assert summary.fairness_index == pytest.approx(1.5**2 / (2 * (1.1**2 + 0.4**2)))
    assert summary.users == 2
    assert summary.errors == {"engine down": 1}
    as_dict = summary.to_dict()
    assert as_dict["slo_attainment_by_priority"] == {"high": 0.5, "low": 0.5}
    assert as_dict["slo_counts_by_priority"] == {
        "high": {"met": 1, "requests": 2},
        "low": {"met": 1, "requests": 2},
    }
    assert as_dict["slo"]["name"] == "chat"
    assert as_dict["ttft_s"]["count"] == 3
    assert json.loads(json.dumps(as_dict)) == as_dict


def test_summarize_empty_and_all_failed() -> None:
    empty = summarize([], duration_s=1.0)
    assert (empty.count, empty.goodput, empty.slo_attainment) == (0, 0.0, None)
    assert empty.ttft is None
    assert empty.fairness_index is None
    failed = summarize([measure(ok=False, ttft_s=None)], duration_s=2.0, slo=None)
    assert failed.slo_attainment == 0.0
    assert failed.e2e is None
    assert failed.slo_attainment_by_priority == {RequestPriority.NORMAL: 0.0}
    with pytest.raises(ValueError, match="duration_s"):
        summarize([], duration_s=0.0)


def test_summarize_fair_users_score_one() -> None:
    ms = [measure(f"r{i}", user=f"u{i % 3}", ttft_s=0.3) for i in range(9)]
    summary = summarize(ms, duration_s=3.0, slo=SLO(ttft_s=1.0, tpot_s=None))
    assert summary.fairness_index == pytest.approx(1.0)
    assert summary.goodput == pytest.approx(3.0)
    assert math.isclose(summary.slo_attainment or 0.0, 1.0)


def _reference_summary(ms: list[RequestMeasurement], slo: SLO | None) -> dict[str, Any]:
    """The summary computed straight from the module's definitions, one figure at a time."""
    done = [m for m in ms if m.ok]
    met = [meets_slo(m, slo) for m in ms]
    users: dict[str, list[float]] = {}
    for m in done:
        if m.user_id is not None and (t := ttft(m)) is not None:
            users.setdefault(m.user_id, []).append(t)
    prios = sorted({m.priority for m in ms})
    return {
        "ok": len(done),
        "ttft": latency_stats([t for m in done if (t := ttft(m)) is not None]),
        "tpot": latency_stats([t for m in done if (t := tpot(m)) is not None]),
        "itl": latency_stats([g for m in done for g in itl(m)]),
        "e2e": latency_stats([e2e(m) for m in done]),
        "slo_met": sum(met),
        "by_priority": {
            p: sum(h for m, h in zip(ms, met, strict=True) if m.priority == p)
            / sum(1 for m in ms if m.priority == p)
            for p in prios
        },
        "fairness": jain_index([sum(v) / len(v) for v in users.values()]),
        "errors": {e: sum(1 for m in ms if not m.ok and (m.error or "unknown error") == e)
                   for e in dict.fromkeys(m.error or "unknown error" for m in ms if not m.ok)},
    }  # fmt: skip


@pytest.mark.parametrize("named", [None, SLO(ttft_s=0.05, tpot_s=0.004, itl_s=0.3, e2e_s=1.2)])
def test_summary_equals_the_definitions_figure_by_figure(named: SLO | None) -> None:
    rng = random.Random(7)
    ms = []
    for i in range(3000):
        arrival = rng.random() * 10
        first = None if rng.random() < 0.05 else arrival + rng.random() * 0.1
        times = sorted(arrival + 0.1 + rng.random() for _ in range(rng.choice((0, 0, 3))))
        ok = rng.random() > 0.05
        ms.append(
            RequestMeasurement(
                f"r{i}", rng.choice(list(RequestPriority)),
                None if rng.random() < 0.2 else f"u{rng.randrange(9)}",
                arrival, first, times, max(times, default=first or arrival) + rng.random(),
                rng.randrange(100), rng.randrange(50), ok,
                None if ok else rng.choice(["boom", None]),
                slo_ttft_s=0.04 if rng.random() < 0.3 else None,
                slo_tpot_s=0.005 if rng.random() < 0.3 else None,
                slo_e2e_s=1.0 if rng.random() < 0.3 else None,
            )
        )  # fmt: skip
    got = summarize(ms, 10.0, named)
    want = _reference_summary(ms, named)
    assert got.ok == want["ok"] and got.slo_met == want["slo_met"]
    assert (got.ttft, got.tpot, got.itl, got.e2e) == (
        want["ttft"],
        want["tpot"],
        want["itl"],
        want["e2e"],
    )  # exactly the same floats
    assert got.slo_attainment_by_priority == want["by_priority"]
    assert got.fairness_index == want["fairness"]
    assert got.errors == want["errors"]


def test_measure_keeps_what_the_request_says_and_what_the_client_saw() -> None:
    wr = WorkloadRequest("w1", 0.0, "one two three", 3, 4, priority=RequestPriority.HIGH,
                         slo_ttft_s=0.5, slo_tpot_s=0.05, slo_e2e_s=2.0, user_id="u")  # fmt: skip
    got = stats.measure(wr, 1.0, 1.2, 1.9, 4, None, [1.2, 1.5, 1.7, 1.9])
    assert got == RequestMeasurement(
        request_id="w1", priority=RequestPriority.HIGH, user_id="u", arrival_s=1.0,
        first_token_s=1.2, token_times_s=(1.2, 1.5, 1.7, 1.9), end_s=1.9, prompt_tokens=3,
        output_tokens=4, ok=True, error=None, slo_ttft_s=0.5, slo_tpot_s=0.05, slo_e2e_s=2.0,
    )  # fmt: skip
    failed = stats.measure(wr, 1.0, None, 1.1, 0, "HTTP 503")
    assert (failed.ok, failed.error, failed.token_times_s) == (False, "HTTP 503", ())
    # the load generator's first output is its first chunk
    assert measurement(wr, 1.0, [1.2, 1.5, 1.7, 1.9], 1.9, 4, None) == got
    assert measurement(wr, 1.0, [], 1.1, 0, "HTTP 503") == failed


def test_errors_are_counted_by_kind_with_an_example() -> None:
    """One cause with per-request figures is one entry, not one per request."""
    failed = [
        replace(
            measure(f"r{k}", ok=False),
            error=f"engine general-{k}: context length is 8192 tokens; you requested {8200 + k}",
        )
        for k in range(5)
    ]
    summary = summarize([*failed, replace(measure("x", ok=False), error=None)], 1.0)
    kind = "engine general-N: context length is N tokens; you requested N"
    assert summary.errors == {kind: 5, "unknown error": 1}
    assert summary.error_examples[kind] == failed[0].error
    assert summary.to_dict()["error_examples"][kind] == failed[0].error
    assert error_kind("HTTP 503 after 2.5 s") == "HTTP N after N s"


def test_slo_attainment_of_weighs_each_class_by_its_request_count() -> None:
    high, low = RequestPriority.HIGH, RequestPriority.LOW
    ms = [measure("h0", priority=high, slo_ttft_s=1.0)]  # 1 of 1 HIGH meets its target
    ms += [measure(f"l{i}", priority=low, slo_ttft_s=0.1) for i in range(3)]  # 0 of 3 LOW
    summary = summarize(ms, 1.0)
    assert summary.slo_attainment_of([high, low]) == pytest.approx(1 / 4)  # not (1 + 0) / 2
