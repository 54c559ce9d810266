"""Tests for the real-process PD benchmark's time compression (no processes started)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sage_llm.bench import pd_realtime
from sage_llm.bench.loadgen import LoadReport
from sage_llm.bench.pd_bench import FleetSpec, chat_workload
from sage_llm.bench.stats import RequestMeasurement
from sage_llm.bench.workloads import Workload
from sage_llm.errors import ConfigError
from sage_llm.types import RequestPriority


def _report(w: Workload) -> LoadReport:
    """Every request of ``w`` answered: arrival 0, first token at 0.1 s, end at 0.12 s (real)."""
    ms = [
        RequestMeasurement(
            r.request_id, RequestPriority.NORMAL, None, 0.0, 0.1, [0.1, 0.11, 0.12], 0.12, 10, 3
        )
        for r in w.requests
    ]
    return LoadReport(ms, duration_s=0.5, mean_send_lag_s=0.0, max_send_lag_s=0.0)


def test_arrivals_are_sped_up_and_measured_times_slowed_back_before_the_slos(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At speed K the engines run K times faster and the workload arrives K times faster;
    every measured time is multiplied by K before the SLOs (TTFT ≤ 2 s) apply."""
    seen: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def fleet() -> AsyncIterator[object]:
        yield object()

    async def fake_sims(n: int, *, speed: float, **_kwargs: Any) -> Any:
        seen["speed"] = speed
        return fleet()

    async def fake_sage(_fleet: object, w: Workload, _seed: int) -> LoadReport:
        seen["workload"] = w
        return _report(w)

    monkeypatch.setattr(pd_realtime, "start_engine_sims", fake_sims)
    monkeypatch.setattr(pd_realtime, "_via_sage", fake_sage)
    spec = FleetSpec("pd-1:1", prefill=1, decode=1, decider="always")
    rt = asyncio.run(
        pd_realtime.run_realtime(
            fleets=[spec], n_long=0, n_chat=3, chat_rate=5.0, speed=4.0, peers=False
        )
    )
    original = chat_workload(3, 5.0, 0)
    sent = seen["workload"]
    assert seen["speed"] == 4.0
    assert [r.arrival_s for r in sent.requests] == [r.arrival_s / 4.0 for r in original]
    (case,) = rt["cases"]
    assert case["rate_rps"] == 5.0  # in simulated requests/s
    assert case["duration_s"] == pytest.approx(2.0)  # 0.5 real seconds × 4
    assert case["ttft_p50_s"] == pytest.approx(0.4)  # 0.1 real seconds × 4
    assert case["slo_attainment"] == 0.0  # 10 ms real gaps are 40 ms > the 25 ms ITL SLO


def test_bad_sizes_and_rates_are_refused_by_name_before_any_engine_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same checks, with the same messages, as the in-process part's."""

    async def no_sims(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("an engine was started")

    monkeypatch.setattr(pd_realtime, "start_engine_sims", no_sims)
    bad: list[tuple[dict[str, Any], str, str]] = [
        ({"speed": 0.0}, "speed", "must be a finite number > 0, got 0"),
        ({"speed": float("inf")}, "speed", "must be a finite number > 0, got inf"),
        ({"n_long": -1}, "n_long", "must be >= 0"),
        ({"n_chat": -2}, "n_chat", "must be >= 0"),
        (
            {"n_long": 0, "n_chat": 0},
            "",
            "n_long and n_chat are both 0: there is no request to run",
        ),
        ({"long_rate": 0.0}, "long_rate", "must be a finite number > 0, got 0"),
        ({"chat_rate": -1.0}, "chat_rate", "must be a finite number > 0, got -1"),
        ({"chat_rate": float("nan")}, "chat_rate", "must be a finite number > 0, got nan"),
        ({"prefill": 0}, "prefill", "need at least one prefill and one decode engine"),
    ]
    for kwargs, key, message in bad:
        with pytest.raises(ConfigError) as info:
            asyncio.run(pd_realtime.run_realtime(peers=False, **kwargs))
        assert (info.value.key or "", info.value.detail) == (key, message), kwargs
