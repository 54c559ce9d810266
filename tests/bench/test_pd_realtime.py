"""Tests for the real-process PD benchmark's time compression and the runs it makes (no
processes started)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sage_llm.bench import pd_realtime
from sage_llm.bench.loadgen import LoadReport
from sage_llm.bench.pd_bench import FleetSpec, chat_workload, manager_kwargs
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

    async def fake_sage(
        _spec: FleetSpec, _fleet: object, w: Workload, _seed: int, speed: float
    ) -> tuple[LoadReport, dict[str, Any]]:
        seen["workload"], seen["gateway_speed"] = w, speed
        return _report(w), {"disaggregated_requests": 3}

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
    assert seen["speed"] == seen["gateway_speed"] == 4.0
    assert [r.arrival_s for r in sent.requests] == [r.arrival_s / 4.0 for r in original]
    (case,) = rt["cases"]
    assert case["rate_rps"] == 5.0  # in simulated requests/s
    assert case["duration_s"] == pytest.approx(2.0)  # 0.5 real seconds × 4
    assert case["ttft_p50_s"] == pytest.approx(0.4)  # 0.1 real seconds × 4
    assert case["slo_attainment"] == 0.0  # 10 ms real gaps are 40 ms > the 25 ms ITL SLO
    assert case["pd"]["disaggregated_requests"] == 3  # the gateway's counters kept


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


def test_vllm_router_runs_beside_sage_on_the_layouts_it_can_serve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its PD mode on a pd-P:D layout, round robin on a colocated one, and nothing on an
    adaptive one (it has no hybrid instances); each run on engines of the layout's roles."""
    runs: list[tuple[str, Any]] = []

    @contextlib.asynccontextmanager
    async def fleet(roles: Any) -> AsyncIterator[object]:
        yield roles

    async def fake_sims(n: int, *, role: Any, **_kwargs: Any) -> Any:
        assert len(role) == n
        return fleet(role)

    async def fake_sage(
        spec: FleetSpec, roles: Any, w: Workload, _seed: int, _speed: float
    ) -> tuple[LoadReport, dict[str, Any]]:
        runs.append((f"sage-llm {spec.name}", roles))
        return _report(w), {}

    async def fake_router(roles: Any, w: Workload, mode: str) -> LoadReport:
        runs.append((f"vllm-router {mode}", roles))
        return _report(w)

    monkeypatch.setattr(pd_realtime, "start_engine_sims", fake_sims)
    monkeypatch.setattr(pd_realtime, "_via_sage", fake_sage)
    monkeypatch.setattr(pd_realtime, "_via_vllm_router", fake_router)
    fleets = [
        FleetSpec("colocated", general=2),
        FleetSpec("pd-1:1", prefill=1, decode=1, decider="always"),
        FleetSpec("adaptive-hybrid", hybrid=2, decider="adaptive"),
        FleetSpec("adaptive-1:1+1", prefill=1, decode=1, general=1, decider="adaptive"),
    ]
    rt = asyncio.run(pd_realtime.run_realtime(fleets=fleets, n_long=0, n_chat=2))
    general, pd = ["general"] * 2, ["prefill", "decode"]
    assert runs == [
        ("sage-llm colocated", general),
        ("vllm-router plain", general),
        ("sage-llm pd-1:1", pd),
        ("vllm-router pd", pd),
        ("sage-llm adaptive-hybrid", general),
        ("sage-llm adaptive-1:1+1", [*pd, "general"]),
    ]
    assert [c["fleet"]["name"] for c in rt["cases"]] == [
        "rt:sage-llm-colocated", "rt:vllm-router-colocated", "rt:sage-llm-pd-1:1",
        "rt:vllm-router-pd-1:1", "rt:sage-llm-adaptive-hybrid", "rt:sage-llm-adaptive-1:1+1",
    ]  # fmt: skip


def test_the_gateway_gets_the_pd_settings_in_real_time() -> None:
    """At speed 0.25 a simulated second lasts four real ones: the decider's SLO targets and
    the prefill reserve's hold (given or default) are four times as long, the KV links a
    quarter as fast; nothing else changes, and at speed 1 nothing at all."""
    spec = FleetSpec(
        "adaptive-hybrid", hybrid=2, decider="adaptive",
        decider_params=(("slack", 0.5),), pairing_params=(("reserve_hold_s", 2.0),),
    )  # fmt: skip
    sim = manager_kwargs(spec)["pd_config"].metadata
    cfg = pd_realtime.realtime_manager_kwargs(spec, 0.25)["pd_config"]
    assert cfg.connector == "vllm"
    decider, pairing = cfg.metadata["decider_params"], cfg.metadata["pairing_params"]
    for key in ("ttft_slo_s", "tpot_slo_s", "itl_slo_s"):
        assert decider[key] == pytest.approx(sim["decider_params"][key] * 4)
    assert decider["slack"] == 0.5 and "max_transfer_s" not in decider  # (no limit)
    assert (decider["nvlink_gbps"], decider["machine_gbps"]) == (75.0, 6.25)
    assert pairing == {"reserve_hold_s": 8.0, "nvlink_gbps": 75.0, "machine_gbps": 6.25}
    assert cfg.metadata["kv_bytes_per_token"] == sim["kv_bytes_per_token"]
    same = pd_realtime.realtime_manager_kwargs(spec, 1.0)["pd_config"].metadata
    assert same["decider_params"]["itl_slo_s"] == sim["decider_params"]["itl_slo_s"]
    assert same["pairing_params"]["reserve_hold_s"] == 2.0
    # an "always" layout has no decider parameters; a colocated one no PD at all
    pd = FleetSpec("pd-1:1", prefill=1, decode=1, decider="always")
    assert (
        "decider_params" not in pd_realtime.realtime_manager_kwargs(pd, 0.5)["pd_config"].metadata
    )
    colocated = pd_realtime.realtime_manager_kwargs(FleetSpec("colocated", general=2), 0.5)
    assert colocated == {"enable_pd_separation": False}
