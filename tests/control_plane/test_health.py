"""Circuit breaker state machine (explicit ``now``) and the health monitor in a manager
over faulty simulated engines (virtual time)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sage_llm import ControlPlaneManager, RequestMetadata, RequestStatus
from sage_llm.control_plane.health import (
    BreakerSettings,
    CircuitBreaker,
    CircuitState,
    HealthSettings,
    counts_against_health,
    with_stream_timeouts,
)
from sage_llm.engines.base import Chunk
from sage_llm.errors import EngineConnectionError, EngineError, EngineTimeoutError
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.factory import make_sim_engine
from sage_llm.sim.faults import FaultPlan, FaultyEngineClient
from tests.factories import make_instances


def test_breaker_opens_after_threshold_and_recovers_through_half_open() -> None:
    b = CircuitBreaker(BreakerSettings(failure_threshold=3, recovery_threshold=2))
    assert b.record_failure(0.0) is None
    assert b.record_failure(0.1) is None
    assert b.record_failure(0.2) is CircuitState.OPEN
    assert (b.state, b.routable) == (CircuitState.OPEN, False)
    assert b.poll(0.5) is None  # cool-down of 1 s not over
    assert b.poll(1.2) is CircuitState.HALF_OPEN
    assert (b.state, b.routable) == (CircuitState.HALF_OPEN, True)
    assert b.record_success(1.3) is None  # 1 of 2
    assert b.record_success(1.4) is CircuitState.CLOSED
    assert b.transitions == 3
    assert b.consecutive_failures == 0


def test_breaker_success_resets_failure_count_when_closed() -> None:
    b = CircuitBreaker(BreakerSettings(failure_threshold=2))
    b.record_failure(0.0)
    b.record_success(0.1)
    assert b.record_failure(0.2) is None
    assert b.state is CircuitState.CLOSED


def test_half_open_failure_reopens_with_doubled_capped_cooldown() -> None:
    b = CircuitBreaker(
        BreakerSettings(failure_threshold=1, base_cooldown_s=1.0, max_cooldown_s=3.0)
    )
    b.record_failure(0.0)
    assert b.open_until == pytest.approx(1.0)
    b.poll(1.0)
    assert b.record_failure(1.0) is CircuitState.OPEN
    assert b.open_until == pytest.approx(3.0)  # 2 s
    b.poll(3.0)
    b.record_failure(3.0)
    assert b.open_until == pytest.approx(6.0)  # capped at 3 s
    b.poll(6.0)
    b.record_success(6.0)
    assert b.state is CircuitState.CLOSED
    b.record_failure(7.0)
    assert b.open_until == pytest.approx(8.0)  # back to the base after closing


def test_force_open_and_describe() -> None:
    b = CircuitBreaker()
    assert b.force_open(2.0, "refused") is CircuitState.OPEN
    assert b.force_open(2.1, "again") is None
    d = b.describe(2.5)
    assert d["state"] == "open"
    assert d["cooldown_remaining_s"] == pytest.approx(0.5)
    assert d["last_failure"] == "again"


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BreakerSettings(failure_threshold=0)
    with pytest.raises(ValueError, match="cooldown"):
        BreakerSettings(base_cooldown_s=5.0, max_cooldown_s=1.0)
    with pytest.raises(ValueError, match="positive"):
        HealthSettings(interval_s=0.0)


def test_only_instance_errors_count_against_health() -> None:
    assert counts_against_health(EngineConnectionError("refused"))
    assert counts_against_health(EngineError("boom", status=503))
    assert not counts_against_health(EngineError("bad request", status=400))
    for status in (401, 403, 404):  # wrong credentials, model or engine on the instance
        assert counts_against_health(EngineError("misconfigured", status=status))


def _manager(
    plan: FaultPlan, n: int = 2, interval_s: float = 0.5, **kwargs: object
) -> ControlPlaneManager:
    settings = HealthSettings(
        interval_s=interval_s,
        timeout_s=0.2,
        breaker=BreakerSettings(failure_threshold=2, base_cooldown_s=0.5, max_cooldown_s=4.0),
    )
    cp = ControlPlaneManager(
        mode="simulated",
        health=settings,
        enable_pd_separation=False,
        seed=1,
        **kwargs,  # type: ignore[arg-type]
    )
    for i, inst in enumerate(make_instances(n, max_concurrent_requests=8)):
        engine = make_sim_engine(inst)
        cp.register_instance(inst, FaultyEngineClient(engine, plan) if i == 0 else engine)
    return cp


def test_crashed_instance_is_ejected_by_probes_and_readmitted() -> None:
    async def main() -> None:
        cp = _manager(FaultPlan.parse("crash@1+4"))
        async with cp:
            await asyncio.sleep(0.9)
            assert cp.get_status()["circuits"]["sim-0"] == "closed"
            await asyncio.sleep(1.2)  # two failed probes at 1.0 and 1.5
            assert cp.get_status()["circuits"]["sim-0"] == "open"
            assert not cp.get_instance_metrics("sim-0")["is_healthy"]
            text = cp.prometheus_metrics().decode()
            assert 'sage_llm_instance_circuit_state{instance="sim-0"} 2.0' in text
            await asyncio.sleep(4.0)  # crash over at 5 s; cool-downs pass; a probe succeeds
            assert cp.get_status()["circuits"]["sim-0"] == "closed"
            text = cp.prometheus_metrics().decode()
            assert 'sage_llm_instance_circuit_state{instance="sim-0"} 0.0' in text
            assert 'circuit_transitions_total{instance="sim-0",state="open"}' in text

    run_virtual(main())


def test_requests_to_a_dead_instance_eject_it_fast_and_are_retried() -> None:
    async def main() -> None:
        cp = _manager(FaultPlan.parse("crash"))
        async with cp:
            results = [
                await cp.generate(
                    RequestMetadata(request_id=f"r{i}", prompt="hello there", max_tokens=4)
                )
                for i in range(6)
            ]
            assert all(r.status is RequestStatus.COMPLETED for r in results)
            assert all(r.instance_id == "sim-1" for r in results)
            assert cp.get_status()["circuits"]["sim-0"] == "open"

    run_virtual(main())


def test_an_instance_down_from_the_start_is_out_after_its_first_probe() -> None:
    """Not after ``failure_threshold`` probes an interval apart: until then, readiness
    would count an instance that never answered."""

    async def main() -> None:
        cp = _manager(FaultPlan.parse("crash@0+5"), interval_s=100.0)
        async with cp:
            await asyncio.sleep(0.3)  # the first probe, at once (0.2 s timeout)
            assert cp.get_status()["circuits"]["sim-0"] == "open"
            assert cp.get_status()["available_instances"] == 1
            await asyncio.sleep(8.0)  # cool-downs of 0.5, 1, 2 and 4 s: readmitted at 7.5 s
            assert cp.get_status()["circuits"]["sim-0"] == "closed"

    run_virtual(main())


def test_an_ejection_by_a_request_is_probed_at_the_cool_downs_end_not_the_next_interval() -> None:
    async def main() -> None:
        cp = _manager(FaultPlan.parse("crash@1+0.2"), interval_s=100.0)
        async with cp:
            await asyncio.sleep(1.1)  # crashed: the next request to it ejects it
            for i in range(2):
                await cp.generate(RequestMetadata(request_id=f"r{i}", prompt="x", max_tokens=2))
            assert cp.get_status()["circuits"]["sim-0"] == "open"
            await asyncio.sleep(1.5)  # a 0.5 s cool-down, then a probe (not at t = 100 s)
            assert cp.get_status()["circuits"]["sim-0"] == "closed"

    run_virtual(main())


def test_half_open_admits_one_trial_request() -> None:
    async def main() -> None:
        cp = _manager(FaultPlan(), n=1)
        async with cp:
            state = cp._registry.get("sim-0")
            state.breaker.force_open(cp.clock.now(), "test")
            state.breaker.poll(state.breaker.open_until)
            assert state.breaker.state is CircuitState.HALF_OPEN
            view = state.view()
            assert view.healthy and view.max_concurrency == 1

    run_virtual(main())


def test_eject_on_errors_off_ignores_request_errors() -> None:
    async def main() -> None:
        settings = HealthSettings(interval_s=100.0, eject_on_errors=False)
        cp = ControlPlaneManager(mode="simulated", health=settings, enable_pd_separation=False)
        insts = make_instances(2)
        cp.register_instance(
            # a per-request fault: its health probes pass
            insts[0],
            FaultyEngineClient(make_sim_engine(insts[0]), FaultPlan.parse("error=500@p1")),
        )
        cp.register_instance(insts[1])
        async with cp:
            for i in range(5):
                await cp.generate(RequestMetadata(request_id=f"r{i}", prompt="x", max_tokens=2))
            assert cp.get_status()["circuits"]["sim-0"] == "closed"

    run_virtual(main())


async def _chunks(delays: list[float]) -> AsyncIterator[Chunk]:
    for i, d in enumerate(delays):
        await asyncio.sleep(d)
        yield Chunk(text="x", finish_reason="stop" if i == len(delays) - 1 else None)


def test_stream_timeouts_first_token_and_idle() -> None:
    async def collect(delays: list[float]) -> int | EngineTimeoutError:
        n = 0
        try:
            async for _ in with_stream_timeouts(
                _chunks(delays), first_token_s=1.0, idle_s=0.5, instance_id="e"
            ):
                n += 1
        except EngineTimeoutError as exc:
            return exc
        return n

    async def main() -> None:
        assert await collect([0.9, 0.4, 0.4]) == 3
        slow_first = await collect([1.5, 0.1])
        assert isinstance(slow_first, EngineTimeoutError) and slow_first.retryable
        assert "first token" in slow_first.message
        slow_gap = await collect([0.1, 0.2, 0.8])
        assert isinstance(slow_gap, EngineTimeoutError) and not slow_gap.retryable

    run_virtual(main())


def test_builder_wires_health_and_admission_config() -> None:
    from sage_llm.config import parse_config
    from sage_llm.control_plane.builder import build_manager

    cfg = parse_config(
        "[health]\ninterval_s = 2.0\ntimeout_s = 0.5\nfailure_threshold = 4\n"
        "recovery_threshold = 2\neject_on_errors = false\nconnect_timeout_s = 1.5\n"
        "first_token_timeout_s = 9.0\nidle_timeout_s = 3.0\n"
        "[admission]\nmax_queue_wait_s = 7.0\nreject_infeasible_slo = true\n"
    )
    cp = build_manager(cfg)
    h = cp.health_settings
    assert (h.interval_s, h.timeout_s, h.eject_on_errors) == (2.0, 0.5, False)
    assert (h.breaker.failure_threshold, h.breaker.recovery_threshold) == (4, 2)
    t = cp.engine_timeouts
    assert (t.connect_s, t.first_token_s, t.idle_s, t.health_s) == (1.5, 9.0, 3.0, 0.5)
    assert cp.max_queue_wait_s == 7.0 and cp.reject_infeasible_slo
