"""Circuit breaker state machine (explicit ``now``) and the health monitor in a manager
over faulty simulated engines (virtual time)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sage_llm import ControlPlaneManager, RequestMetadata, RequestResult, RequestStatus
from sage_llm.control_plane.health import (
    BreakerSettings,
    CircuitBreaker,
    CircuitState,
    HealthMonitor,
    HealthSettings,
    counts_against_health,
    with_stream_timeouts,
)
from sage_llm.control_plane.instances import InstanceState
from sage_llm.control_plane.metrics import ControlPlaneMetrics
from sage_llm.engines.base import Chunk, EngineStats
from sage_llm.engines.http import HTTPTimeouts
from sage_llm.errors import EngineConnectionError, EngineError, EngineTimeoutError
from sage_llm.sim.clock import VirtualClock, run_virtual
from sage_llm.sim.factory import make_sim_engine
from sage_llm.sim.faults import FaultPlan, FaultyEngineClient
from tests.factories import make_instance, make_instances, make_metadata


def test_breaker_opens_after_threshold_and_recovers_through_half_open() -> None:
    b = CircuitBreaker(BreakerSettings(failure_threshold=3, recovery_threshold=2))
    assert b.record_failure(0.0) is None
    assert b.record_failure(0.1) is None
    assert b.record_failure(0.2) is CircuitState.OPEN
    assert (b.state, b.routable) == (CircuitState.OPEN, False)
    assert b.poll(0.5) is None  # cool-down of 1 s not over
    assert b.poll(1.2) is CircuitState.HALF_OPEN
    # opened by probes: judged by probes, no request goes there until one passes
    assert (b.state, b.routable) == (CircuitState.HALF_OPEN, False)
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


def test_a_recovered_breaker_counts_failures_afresh() -> None:
    """Requests failing before probes opened the breaker: once the probes close it again,
    those failures are forgotten, and it takes failure_threshold new ones to open it."""
    b = CircuitBreaker(BreakerSettings(failure_threshold=3))
    b.record_failure(0.0, "HTTP 500", request=True)
    b.record_failure(0.1, "HTTP 500", request=True)
    for _ in range(3):
        b.record_failure(0.2, "probe timed out")
    assert b.describe(0.3)["opened_by"] == "probes"
    b.poll(5.0)
    assert b.record_success(5.0) is CircuitState.CLOSED
    assert b.describe(5.0)["consecutive_failures"] == 0
    assert b.record_failure(6.0, "HTTP 500", request=True) is None
    assert b.record_failure(6.1, "HTTP 500", request=True) is None
    assert b.record_failure(6.2, "HTTP 500", request=True) is CircuitState.OPEN


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
    assert b.open_until == pytest.approx(10.0)  # closed for less than 3 s: still 3 s
    b.poll(10.0)
    b.record_success(10.0)
    b.record_failure(13.0)
    assert b.open_until == pytest.approx(14.0)  # closed for 3 s: back to the base


def test_the_cool_down_grows_in_every_episode_however_long_ago_the_last_one_was() -> None:
    """An episode begins when a breaker that stayed closed a while opens; its failed trials
    then double the cool-down, though the breaker was last closed long before them."""
    b = CircuitBreaker(
        BreakerSettings(failure_threshold=1, base_cooldown_s=1.0, max_cooldown_s=30.0)
    )
    b.record_failure(0.0)
    b.poll(1.0)
    b.record_success(1.0)  # closed again: the first episode is over
    now, cooldowns = 100.0, []
    b.record_failure(now)  # a new outage, long after: a new episode, from the base
    for _ in range(7):
        cooldowns.append(b.open_until - now)
        now = b.open_until
        b.poll(now)
        b.record_failure(now)  # its trial fails
    assert cooldowns == pytest.approx([1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
    for _ in range(2000):  # an outage of many hours: the cool-down stays at its cap
        now = b.open_until
        b.poll(now)
        b.record_failure(now)
    assert b.open_until - now == pytest.approx(30.0)


def test_a_breaker_requests_opened_sends_no_trial_request_until_a_probe_passes() -> None:
    """Its engine went down after its requests opened it: while its probes fail, each
    cool-down ends in a failed probe, not in a client request sent there to fail."""
    b = CircuitBreaker(BreakerSettings(failure_threshold=1, base_cooldown_s=1.0))
    b.record_failure(0.0, "HTTP 500", request=True)
    now = b.open_until
    for cooldown in (2.0, 4.0):
        assert b.poll(now) is CircuitState.HALF_OPEN
        assert not b.routable  # no trial request before a probe has passed
        assert b.record_failure(now, "connection refused") is CircuitState.OPEN  # a probe
        assert b.open_until - now == pytest.approx(cooldown)
        now = b.open_until
    b.poll(now)
    assert b.record_success(now) is None  # a probe passes: requests still decide
    assert (b.state, b.routable) == (CircuitState.HALF_OPEN, True)
    assert b.record_success(now, request=True) is CircuitState.CLOSED


def test_a_breaker_requests_opened_is_closed_by_a_request_not_a_probe() -> None:
    b = CircuitBreaker(BreakerSettings(failure_threshold=2))
    b.record_failure(0.0, "HTTP 500", request=True)
    assert b.record_failure(0.1, "HTTP 500", request=True) is CircuitState.OPEN
    assert b.describe(0.2)["opened_by"] == "requests"
    b.poll(2.0)
    assert b.record_success(2.0) is None  # a probe: /health passes, requests may not
    assert b.state is CircuitState.HALF_OPEN
    assert b.record_success(2.1, request=True) is CircuitState.CLOSED
    assert b.describe(2.2)["opened_by"] is None
    # opened by probes: readmitted by a probe
    b.record_failure(40.0)
    b.record_failure(40.1)
    assert b.describe(40.2)["opened_by"] == "probes"
    b.poll(42.0)
    # a request begun before the engine hung, ending well, does not undo its failed probes
    assert b.record_success(42.0, request=True) is None
    assert b.state is CircuitState.HALF_OPEN
    assert b.record_success(42.0) is CircuitState.CLOSED


def test_a_share_of_failed_requests_opens_the_breaker_though_successes_come_between() -> None:
    b = CircuitBreaker(BreakerSettings(failure_threshold=3, failure_rate=0.5, rate_window=10))
    moved = []
    for i in range(11):  # fail, succeed, fail, succeed ...: never two failures in a row
        if i % 2:
            moved.append(b.record_success(float(i), request=True))
        else:
            moved.append(b.record_failure(float(i), "HTTP 500", request=True))
    assert moved[:10] == [None] * 10
    # the 11th, a failure: 5 of the last 10 failed
    assert moved[10] is CircuitState.OPEN and b.by_requests
    assert b.last_failure == "HTTP 500 (5 of its last 10 requests failed)"  # why, in the log
    b2 = CircuitBreaker(BreakerSettings(failure_rate=None, rate_window=10))
    for i in range(30):
        if i % 2:
            b2.record_success(float(i), request=True)
        else:
            b2.record_failure(float(i), request=True)
    assert b2.state is CircuitState.CLOSED  # the share is not looked at
    b3 = CircuitBreaker(BreakerSettings(failure_rate=0.5, rate_window=10))
    for i in range(40):  # one failure in four: below the share
        if i % 4:
            b3.record_success(float(i), request=True)
        else:
            b3.record_failure(float(i), request=True)
    assert b3.state is CircuitState.CLOSED


def test_probe_failures_and_request_failures_are_counted_apart() -> None:
    """Requests that began before an engine hung, and end well, do not undo its failed
    probes (nor probes that pass its failed requests)."""
    b = CircuitBreaker(BreakerSettings(failure_threshold=2))
    assert b.record_failure(0.0, "probe timed out") is None
    b.record_success(0.1, request=True)
    assert b.consecutive_failures == 1
    assert b.record_failure(0.5, "probe timed out") is CircuitState.OPEN
    c = CircuitBreaker(BreakerSettings(failure_threshold=2))
    c.record_failure(0.0, "HTTP 500", request=True)
    c.record_success(0.1)  # a probe
    assert c.record_failure(0.2, "HTTP 500", request=True) is CircuitState.OPEN


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
    for stall in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="stall_timeout_s must be positive or None"):
            HealthSettings(stall_timeout_s=stall)
    with pytest.raises(ValueError, match="failure_rate"):
        BreakerSettings(failure_rate=0.0)
    with pytest.raises(ValueError, match="rate_window"):
        BreakerSettings(rate_window=1)


def test_only_instance_errors_count_against_health() -> None:
    assert counts_against_health(EngineConnectionError("refused"))
    assert counts_against_health(EngineError("boom", status=503))
    assert not counts_against_health(EngineError("bad request", status=400))
    for status in (401, 403, 404):  # wrong credentials, model or engine on the instance
        assert counts_against_health(EngineError("misconfigured", status=status))


def _manager(
    plan: FaultPlan,
    n: int = 2,
    interval_s: float = 0.5,
    *,
    failure_threshold: int = 2,
    move_on_eject: bool = True,
    stall_timeout_s: float | None = 60.0,
    bound: int = 8,
    **kwargs: object,
) -> ControlPlaneManager:
    """``n`` simulated instances, the first under ``plan``'s faults; probes every
    ``interval_s`` (0.2 s timeout), cool-downs from 0.5 s to 4 s."""
    settings = HealthSettings(
        interval_s=interval_s,
        timeout_s=0.2,
        move_on_eject=move_on_eject,
        stall_timeout_s=stall_timeout_s,
        breaker=BreakerSettings(
            failure_threshold=failure_threshold, base_cooldown_s=0.5, max_cooldown_s=4.0
        ),
    )
    cp = ControlPlaneManager(
        mode="simulated",
        health=settings,
        enable_pd_separation=False,
        seed=1,
        **kwargs,  # type: ignore[arg-type]
    )
    for i, inst in enumerate(make_instances(n, max_concurrent_requests=bound)):
        engine = make_sim_engine(inst)
        cp.register_instance(inst, FaultyEngineClient(engine, plan) if i == 0 else engine)
    return cp


def test_crashed_instance_is_ejected_by_probes_and_readmitted() -> None:
    async def main() -> None:
        cp = _manager(FaultPlan.parse("crash@1+4"))
        async with cp:
            await asyncio.sleep(0.9)
            assert cp.get_status()["circuits"]["sim-0"] == "closed"
            kv = 'sage_llm_instance_kv_cache_usage{instance_id="sim-0"}'
            assert kv in cp.prometheus_metrics().decode()  # its stats were read
            await asyncio.sleep(1.2)  # two failed probes at 1.0 and 1.5
            assert cp.get_status()["circuits"]["sim-0"] == "open"
            assert not cp.get_instance_metrics("sim-0")["is_healthy"]
            text = cp.prometheus_metrics().decode()
            assert 'sage_llm_instance_circuit_state{instance_id="sim-0"} 2.0' in text
            assert kv not in text  # not its last figure, frozen: unknown while it is out
            await asyncio.sleep(4.0)  # crash over at 5 s; cool-downs pass; a probe succeeds
            assert cp.get_status()["circuits"]["sim-0"] == "closed"
            text = cp.prometheus_metrics().decode()
            assert 'sage_llm_instance_circuit_state{instance_id="sim-0"} 0.0' in text
            assert 'circuit_transitions_total{instance_id="sim-0",state="open"}' in text

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


def test_a_connection_broken_after_output_does_not_eject_at_once() -> None:
    """A refused connection (nothing produced) ejects at once; a stream broken mid-way
    counts as one failure towards ``failure_threshold``, as a 5xx does."""

    async def main() -> None:
        cp = _manager(FaultPlan(), n=1)
        async with cp:
            state = cp._registry.get("sim-0")
            monitor = cp._monitor()

            def circuit() -> str:
                return str(cp.get_status()["circuits"]["sim-0"])

            mid = EngineConnectionError("stream broken", instance_id="sim-0", retryable=False)
            monitor.on_request_failure(state, mid)
            assert circuit() == "closed"
            monitor.on_request_failure(state, mid)  # failure_threshold 2
            assert circuit() == "open"
            monitor.on_request_success(state)
            state.breaker.poll(state.breaker.open_until)
            monitor.on_request_success(state)
            assert circuit() == "closed"
            refused = EngineConnectionError("refused", instance_id="sim-0", retryable=True)
            monitor.on_request_failure(state, refused)
            assert circuit() == "open"

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


def test_an_instance_its_probes_ejected_is_readmitted_by_probes_in_a_row() -> None:
    """Ejected by its probes, with recovery_threshold 3: once its cool-down ends, the
    passing probes that readmit it come one after another (at interval_s, 100 s, it had
    stayed out for minutes after the engine was back)."""

    async def main() -> None:
        settings = HealthSettings(
            interval_s=100.0,
            timeout_s=0.2,
            breaker=BreakerSettings(
                failure_threshold=2, recovery_threshold=3, base_cooldown_s=0.5, max_cooldown_s=4.0
            ),
        )
        cp = ControlPlaneManager(mode="simulated", health=settings, seed=1)
        for i, inst in enumerate(make_instances(2)):
            engine = make_sim_engine(inst)
            plan = FaultPlan.parse("crash@0+5")
            cp.register_instance(inst, FaultyEngineClient(engine, plan) if i == 0 else engine)
        async with cp:
            await asyncio.sleep(0.3)
            assert cp.get_status()["circuits"]["sim-0"] == "open"
            await asyncio.sleep(8.2)  # cool-downs of 0.5, 1, 2 and 4 s; then 3 probes
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
            # opened by a request (a refused connection): a trial request readmits it
            assert cp.get_status()["circuits"]["sim-0"] == "half-open"
            trial = RequestMetadata(
                request_id="trial", prompt="x", max_tokens=2, preferred_instance_id="sim-0"
            )
            assert (await cp.generate(trial)).instance_id == "sim-0"
            assert cp.get_status()["circuits"]["sim-0"] == "closed"

    run_virtual(main())


def test_half_open_admits_one_trial_request() -> None:
    async def main() -> None:
        cp = _manager(FaultPlan(), n=1)
        async with cp:
            state = cp._registry.get("sim-0")
            state.breaker.force_open(cp.clock.now(), "HTTP 500", request=True)
            state.breaker.poll(state.breaker.open_until)
            assert state.breaker.state is CircuitState.HALF_OPEN
            assert not state.view().healthy  # not before a probe has passed
            state.breaker.record_success(cp.clock.now())  # a probe
            assert state.breaker.state is CircuitState.HALF_OPEN  # requests decide
            view = state.view()
            assert view.healthy and view.max_concurrency == 1
            # opened by probes instead: no request until a probe passes
            state.breaker.force_open(cp.clock.now(), "probe failed")
            assert not state.view().healthy
            state.breaker.poll(state.breaker.open_until)
            assert state.breaker.state is CircuitState.HALF_OPEN
            assert not state.view().healthy

    run_virtual(main())


def _erring_first(**health: Any) -> ControlPlaneManager:
    """Two simulated instances, every request to the first failing with a 500 (a
    per-request fault: its health probes pass); probes every 100 s."""
    settings = HealthSettings(interval_s=100.0, **health)
    cp = ControlPlaneManager(
        mode="simulated",
        health=settings,
        enable_pd_separation=False,
        routing_strategy="round_robin",
    )  # (each instance in turn: a request is sure to meet the failing one)
    insts = make_instances(2)
    faulty = FaultyEngineClient(make_sim_engine(insts[0]), FaultPlan.parse("error=500@p1"))
    cp.register_instance(insts[0], faulty)
    cp.register_instance(insts[1])
    return cp


def test_a_success_ends_the_instances_run_of_consecutive_failures() -> None:
    """A request failed on the instance (a 503), then one that completes there: its
    report's ``consecutive_failures`` counts the failures since the last success, 0."""

    async def main() -> None:
        settings = HealthSettings(interval_s=100.0, breaker=BreakerSettings(failure_threshold=5))
        cp = ControlPlaneManager(mode="simulated", health=settings, enable_pd_separation=False)
        (inst,) = make_instances(1)
        engine = FaultyEngineClient(make_sim_engine(inst), FaultPlan.parse("error=503@p1"))
        cp.register_instance(inst, engine)
        async with cp:
            failed = await cp.generate(make_metadata("r0", max_tokens=2))
            assert failed.status is RequestStatus.FAILED
            assert cp.get_instance_report("sim-0").consecutive_failures == 1
            engine.plan = FaultPlan()  # the engine answers again
            done = await cp.generate(make_metadata("r1", max_tokens=2))
            assert done.status is RequestStatus.COMPLETED
            assert cp.get_instance_report("sim-0").consecutive_failures == 0

    run_virtual(main())


def test_eject_on_errors_off_ignores_request_errors() -> None:
    async def main() -> None:
        cp = _erring_first(eject_on_errors=False)
        async with cp:
            for i in range(5):
                await cp.generate(RequestMetadata(request_id=f"r{i}", prompt="x", max_tokens=2))
            assert cp.get_status()["circuits"]["sim-0"] == "closed"

    run_virtual(main())


def test_instance_failure_counts_tell_failed_calls_from_failed_requests(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``failed_requests`` counts what ``sage_llm_requests_total{status="failed"}`` counts
    for the instance (requests that ended failed there); ``failed_calls`` the engine calls
    that failed there, a call whose request was retried elsewhere included. Each retry's
    log line carries the request id as a field (JSON logs show it)."""
    caplog.set_level(logging.INFO, logger="sage_llm.dispatcher")

    async def main() -> tuple[list[dict[str, Any]], str]:
        cp = _erring_first(eject_on_errors=False)
        async with cp:
            for i in range(4):
                meta = RequestMetadata(request_id=f"r{i}", prompt="x", max_tokens=2)
                assert (await cp.generate(meta)).status is RequestStatus.COMPLETED
            cp.drain_instance("sim-1")  # the last one has nowhere else to go
            last = await cp.generate(RequestMetadata(request_id="r4", prompt="x", max_tokens=2))
            assert last.status is RequestStatus.FAILED and last.instance_id == "sim-0"
            return [cp.get_instance_metrics(i) for i in ("sim-0", "sim-1")], (
                cp.prometheus_metrics().decode()
            )

    metrics, text = run_virtual(main())
    failed = {
        s.labels["instance_id"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == "sage_llm_requests"
        for s in family.samples
        if s.name == "sage_llm_requests_total" and s.labels["status"] == "failed"
    }
    assert failed == {"sim-0": 1.0}
    assert [m["failed_requests"] for m in metrics] == [1, 0]
    assert metrics[0]["failed_calls"] >= 2 and metrics[1]["failed_calls"] == 0
    assert metrics[1]["completed_requests"] == 4
    retries = [r for r in caplog.records if "retrying elsewhere" in r.getMessage()]
    assert len(retries) == metrics[0]["failed_calls"] - 1 >= 1  # r4's last call: no retry
    assert all(f"request {getattr(r, 'request_id', '?')}:" in r.getMessage() for r in retries)


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
        "first_token_timeout_s = 9.0\nidle_timeout_s = 3.0\nfailure_rate_threshold = 0.3\n"
        "failure_rate_window = 12\nmove_on_eject = false\n"
        "[admission]\nmax_queue_wait_s = 7.0\nreject_infeasible_slo = true\n"
    )
    cp = build_manager(cfg)
    h = cp.health_settings
    assert (h.interval_s, h.timeout_s, h.eject_on_errors) == (2.0, 0.5, False)
    assert (h.breaker.failure_threshold, h.breaker.recovery_threshold) == (4, 2)
    assert (h.breaker.failure_rate, h.breaker.rate_window, h.move_on_eject) == (0.3, 12, False)
    t = cp.engine_timeouts
    assert (t.connect_s, t.first_token_s, t.idle_s, t.health_s) == (1.5, 9.0, 3.0, 0.5)
    assert cp.max_queue_wait_s == 7.0 and cp.reject_infeasible_slo


# --- an ejection moves the calls that have delivered nothing ---------------------------------


@pytest.mark.parametrize(
    ("fault", "stream"),
    [
        ("hang@1", False),  # no output at all: a whole answer's call on a hung engine
        ("hang=2@1", False),  # output that reached no one (the call streamed anyway)
        ("hang@1", True),  # a stream before its first chunk
    ],
)
def test_an_ejection_moves_the_calls_that_delivered_nothing(fault: str, stream: bool) -> None:
    """sim-0 hangs from t = 1 s (its probes too): its second failed probe, at about 1.7 s,
    ejects it, and the request stuck on it is retried on sim-1 then, not after the
    request's own limit. Its result holds sim-1's output only."""

    async def main() -> None:
        cp = _manager(FaultPlan.parse(fault), routing_strategy="round_robin")
        async with cp:
            await asyncio.sleep(1.05)
            metas = [
                RequestMetadata(request_id=f"r{i}", prompt="x y", max_tokens=6) for i in (0, 1)
            ]
            runs: list[Coroutine[Any, Any, RequestResult]] = [
                _drain(cp, meta) if stream else cp.generate(meta) for meta in metas
            ]
            started = cp.clock.now()
            results = await asyncio.wait_for(asyncio.gather(*runs), 10.0)
            took = cp.clock.now() - started
            assert cp.get_status()["circuits"]["sim-0"] == "open"
        moved = next(r for r in results if r.attempts == 2)
        assert took < 1.5
        for r in results:
            assert r.status is RequestStatus.COMPLETED and r.instance_id == "sim-1"
            assert r.completion_tokens == len(r.text.split()) == 6
        assert moved.request_id in {"r0", "r1"}
        assert cp.get_instance_metrics("sim-0")["failed_calls"] == 0  # the probes failed

    run_virtual(main())


async def _drain(cp: ControlPlaneManager, meta: RequestMetadata) -> RequestResult:
    async for _ in cp.stream(meta):
        pass
    return await cp.wait_for_result(meta.request_id)


def test_an_ejection_leaves_a_stream_that_delivered_output() -> None:
    """A stream whose client has seen chunks is never restarted elsewhere: it stays on the
    ejected instance, and fails with the reason when the instance's trial after its
    cool-down fails too (here before its idle limit of 3 s)."""

    async def main() -> None:
        cp = _manager(FaultPlan.parse("hang=2@1"), engine_timeouts=HTTPTimeouts(idle_s=3.0))
        async with cp:
            await asyncio.sleep(1.05)
            seen: list[str] = []
            meta = RequestMetadata(
                request_id="s", prompt="x y", max_tokens=6, preferred_instance_id="sim-0"
            )
            with pytest.raises(EngineError, match="instance sim-0 was ejected: health probe"):
                async for chunk in cp.stream(meta):
                    seen.append(chunk.text)
            assert cp.get_status()["circuits"]["sim-0"] == "open"
            result = await cp.wait_for_result("s")
        assert len(seen) == 2
        assert result.status is RequestStatus.FAILED and result.instance_id == "sim-0"

    run_virtual(main())


def test_a_stream_that_delivered_output_stays_and_completes_when_its_instance_recovers() -> None:
    """Its engine hangs after two chunks from 1 s to 2 s: the probes eject the instance,
    but the stream, whose client has seen chunks, is never moved; it goes on when the
    engine does (before its idle limit of 30 s) and completes there."""

    async def main() -> None:
        plan = FaultPlan.parse("hang=2@1+1.0")
        cp = _manager(plan, engine_timeouts=HTTPTimeouts(idle_s=30.0))
        async with cp:
            await asyncio.sleep(1.05)
            seen: list[str] = []
            meta = RequestMetadata(
                request_id="s", prompt="x y", max_tokens=6, preferred_instance_id="sim-0"
            )
            async for chunk in cp.stream(meta):
                seen.append(chunk.text)
            result = await cp.wait_for_result("s")
            opened = cp.metrics.circuit_transitions.labels(instance_id="sim-0", state="open")
            assert opened._value.get() == 1  # it was ejected meanwhile
        assert len(seen) == 6
        assert result.status is RequestStatus.COMPLETED, result.error
        assert (result.instance_id, result.attempts, result.completion_tokens) == ("sim-0", 1, 6)

    run_virtual(main())


def test_move_on_eject_off_leaves_the_calls_on_the_ejected_instance() -> None:
    async def main() -> None:
        plan = FaultPlan.parse("hang@1")
        cp = _manager(plan, move_on_eject=False, routing_strategy="round_robin")
        async with cp:
            await asyncio.sleep(1.05)
            runs = [
                asyncio.create_task(
                    cp.generate(RequestMetadata(request_id=f"r{i}", prompt="x", max_tokens=4))
                )
                for i in (0, 1)
            ]
            await asyncio.sleep(5.0)
            assert cp.get_status()["circuits"]["sim-0"] == "open"
            assert [t.done() for t in runs].count(False) == 1  # still on the hung engine

    run_virtual(main())


@pytest.mark.parametrize("fault", ["error=500@p1", "crash@p1"])
def test_a_gray_failing_engine_stays_out_with_a_growing_cool_down(fault: str) -> None:
    """sim-0's requests all fail (a 500, or a refused connection) while its /health
    passes: it is ejected by the failures, its passing probes do not readmit it, and each
    trial request that fails re-opens it for longer (not every second, as when a probe
    readmitted it). Every request completes, on sim-1."""

    async def main() -> None:
        cp = _manager(FaultPlan.parse(fault), interval_s=0.5)
        async with cp:
            results = []
            for i in range(60):
                meta = RequestMetadata(request_id=f"r{i}", prompt="x", max_tokens=2)
                results.append(await cp.generate(meta))
                await asyncio.sleep(0.25)  # 15 s
            opens = cp.get_instance_metrics("sim-0")["circuit"]["transitions"]
            tried = cp.get_instance_metrics("sim-0")["failed_calls"]
        assert all(r.status is RequestStatus.COMPLETED for r in results)
        assert all(r.instance_id == "sim-1" for r in results)
        # two failures to open, then one trial per cool-down of 0.5, 1, 2, 4 s ... (capped
        # at 4 s): about 6 trials in 15 s, not one a second
        assert tried <= 8
        assert opens <= 2 * tried

    run_virtual(main())


def test_an_engine_failing_half_its_requests_is_ejected() -> None:
    """Never ten failures in a row (the threshold here), but half of them fail."""

    async def main() -> None:
        plan = FaultPlan.parse("error=500@p0.5; seed=2")
        cp = _manager(plan, failure_threshold=10, routing_strategy="round_robin")
        async with cp:
            for i in range(60):
                meta = RequestMetadata(request_id=f"r{i}", prompt="x", max_tokens=2)
                result = await cp.generate(meta)
                assert result.status is RequestStatus.COMPLETED
            circuit = cp.get_instance_metrics("sim-0")["circuit"]
        assert circuit["transitions"] >= 1
        assert circuit["state"] in ("open", "half-open")

    run_virtual(main())


# --- an engine that stalls while its probes pass ---------------------------------------------


def _stall_run(cp: ControlPlaneManager, n: int, gap_s: float) -> Coroutine[Any, Any, list[float]]:
    """Send ``n`` whole-answer requests ``gap_s`` apart; each must complete on sim-1.
    Returns how long each took."""

    async def one(i: int) -> float:
        await asyncio.sleep(i * gap_s)
        started = cp.clock.now()
        meta = RequestMetadata(request_id=f"r{i}", prompt="x y", max_tokens=4)
        result = await cp.generate(meta)
        assert result.status is RequestStatus.COMPLETED and result.instance_id == "sim-1"
        return cp.clock.now() - started

    async def run() -> list[float]:
        return list(await asyncio.gather(*(one(i) for i in range(n))))

    return run()


def test_an_engine_that_stalls_while_its_probes_pass_is_ejected_and_its_calls_moved() -> None:
    """Every request sim-0 takes hangs (``hang@p1``: its /health still answers, so the
    probes never eject it, and a whole answer's call has no token to time). Its token
    counters stand still with calls in flight: after ``stall_timeout_s`` it is ejected
    and the call is moved to sim-1, not left for the request's own limit. Its trial
    requests, after each cool-down, hang too and are moved the same way."""

    async def main() -> None:
        cp = _manager(
            FaultPlan.parse("hang@p1"), stall_timeout_s=3.0, routing_strategy="round_robin"
        )
        async with cp:
            took = await asyncio.wait_for(_stall_run(cp, 24, 0.5), 60.0)
            circuit = cp.get_instance_metrics("sim-0")["circuit"]
            text = cp.prometheus_metrics().decode()
        # each ejection 3 s after the engine's counters were last seen move, judged on
        # scrapes 1 s apart: at most two scrape intervals late
        assert max(took) < 3.0 + 2 * 1.0 + 0.1
        assert sum(t > 2.0 for t in took) >= 2  # the first call and at least one trial
        assert circuit["opened_by"] == "requests"
        assert circuit["last_failure"].startswith("stalled: its engine processed no token")
        stalls = float(
            text.split('sage_llm_instance_stalls_total{instance_id="sim-0"} ')[1].split()[0]
        )
        assert stalls >= 2

    run_virtual(main())


def test_without_stall_timeout_a_stalled_engine_keeps_its_call() -> None:
    async def main() -> None:
        cp = _manager(
            FaultPlan.parse("hang@p1"), stall_timeout_s=None, routing_strategy="round_robin"
        )
        async with cp:
            runs = [
                asyncio.create_task(
                    cp.generate(RequestMetadata(request_id=f"r{i}", prompt="x", max_tokens=4))
                )
                for i in (0, 1)
            ]
            await asyncio.sleep(30.0)
            assert cp.get_status()["circuits"]["sim-0"] == "closed"
            assert [t.done() for t in runs].count(False) == 1  # still on the stalled engine
            for task in runs:
                task.cancel()

    run_virtual(main())


async def _a_long_generation_is_not_stalled(cp: ControlPlaneManager) -> None:
    """Several seconds of decoding on sim-0, past a 1 s stall limit: it completes, and
    the instance's circuit never moves."""
    async with cp:
        meta = RequestMetadata(request_id="long", prompt="x y", max_tokens=400)
        result = await cp.generate(meta)
        assert result.status is RequestStatus.COMPLETED
        assert result.e2e_latency_ms > 3000
        assert cp.get_instance_metrics("sim-0")["circuit"]["transitions"] == 0


def test_an_engine_slower_than_the_stall_limit_is_not_stalled() -> None:
    run_virtual(_a_long_generation_is_not_stalled(_manager(FaultPlan(), n=1, stall_timeout_s=1.0)))


class _TokensCountedAsRequestsEnd(FaultyEngineClient):
    """llama.cpp's counters: a request's tokens counted when it ends (its slot's reset),
    its forward passes as they run (``llamacpp:n_decode_total``)."""

    async def stats(self) -> EngineStats:
        inner = await super().stats()
        return EngineStats(
            running=inner.running, source="llamacpp", counts_tokens=True,
            steps_total=inner.prompt_tokens_total + inner.generation_tokens_total,
        )  # fmt: skip


def test_an_engine_whose_tokens_count_as_requests_end_is_not_stalled_while_it_steps() -> None:
    """llama.cpp adds a request's generated tokens only when it ends: its decode steps
    show its progress meanwhile, and a long generation is not judged a stall."""

    async def main() -> None:
        settings = HealthSettings(interval_s=0.5, timeout_s=0.2, stall_timeout_s=1.0)
        cp = ControlPlaneManager(mode="simulated", health=settings, enable_pd_separation=False)
        (inst,) = make_instances(1)
        cp.register_instance(inst, _TokensCountedAsRequestsEnd(make_sim_engine(inst), FaultPlan()))
        await _a_long_generation_is_not_stalled(cp)

    run_virtual(main())


class _RestartedSmaller(FaultyEngineClient):
    """An engine restarted, between two probes, with a shorter context."""

    context: int | None = 4096

    async def context_length(self) -> int | None:
        return self.context


def test_a_known_context_is_asked_again_once_a_minute() -> None:
    """An engine restarted with a shorter context, faster than its probes eject it: the
    control plane learns the new context within about a minute (an answer without one
    leaves the known one)."""

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", health=HealthSettings(interval_s=0.5), enable_pd_separation=False
        )
        (inst,) = make_instances(1)
        engine = _RestartedSmaller(make_sim_engine(inst), FaultPlan())
        cp.register_instance(inst, engine)
        async with cp:
            await asyncio.sleep(2.0)
            assert cp.context_length(inst.model_name) == 4096
            engine.context = 512
            await asyncio.sleep(62.0)
            assert cp.context_length(inst.model_name) == 512
            engine.context = None  # a card without it for a moment: what was known stays
            await asyncio.sleep(62.0)
            assert cp.context_length(inst.model_name) == 512

    run_virtual(main())


class _NoTokenCounters(FaultyEngineClient):
    """An engine whose metrics have no token counters (a generic OpenAI server)."""

    async def stats(self) -> EngineStats:
        return EngineStats(running=1, source="unknown")


def test_an_engine_without_token_counters_is_never_judged_stalled() -> None:
    async def main() -> None:
        settings = HealthSettings(interval_s=0.5, timeout_s=0.2, stall_timeout_s=1.0)
        cp = ControlPlaneManager(mode="simulated", health=settings, enable_pd_separation=False)
        (inst,) = make_instances(1)
        cp.register_instance(
            inst, _NoTokenCounters(make_sim_engine(inst), FaultPlan.parse("hang@p1"))
        )
        async with cp:
            run = asyncio.create_task(
                cp.generate(RequestMetadata(request_id="r", prompt="x", max_tokens=4))
            )
            await asyncio.sleep(10.0)
            assert not run.done()
            assert cp.get_status()["circuits"]["sim-0"] == "closed"
            run.cancel()

    run_virtual(main())


def test_a_failed_call_whose_only_other_instance_is_ejected_fails_not_waits() -> None:
    """sim-0 answers every request with a 500 (its probes pass); sim-1 is down (its probes
    fail). A request failed on sim-0 has nowhere to go: it fails at once with sim-0's
    error. Before, it was queued again to wait for sim-1 until its own time limit."""

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated",
            health=HealthSettings(interval_s=0.5, timeout_s=0.2),
            enable_pd_separation=False,
        )
        for inst, spec in zip(make_instances(2), ("error=500@p1", "crash"), strict=True):
            cp.register_instance(
                inst, FaultyEngineClient(make_sim_engine(inst), FaultPlan.parse(spec))
            )
        async with cp:
            await asyncio.sleep(1.0)
            assert cp.get_status()["circuits"] == {"sim-0": "closed", "sim-1": "open"}
            started = cp.clock.now()
            meta = RequestMetadata(request_id="r", prompt="hi", max_tokens=2)
            with pytest.raises(EngineError, match="HTTP 500") as err:
                await cp.collect(meta, timeout_s=600.0)
            assert cp.clock.now() - started < 1.0
            assert err.value.instance_id == "sim-0"
            assert (await cp.get_request_status("r")) is RequestStatus.FAILED

    run_virtual(main())


@pytest.mark.parametrize("move_on_eject", [True, False])
def test_queued_requests_fail_once_the_fleet_fails_its_trial(move_on_eject: bool) -> None:
    """One instance, one slot, requests queued behind its running one: the engine crashes
    and stays down. Once its trial after the cool-down fails too, the queued requests fail
    with 503's reason and when to retry, rather than wait for their own limits (also when
    ejections do not move engine calls: that setting is about calls, not the queue)."""

    async def main() -> None:
        cp = _manager(FaultPlan.parse("crash@1+600"), n=1, bound=1, move_on_eject=move_on_eject)
        async with cp:
            rids = [
                await cp.submit_request(make_metadata(f"q{i}", max_tokens=2000)) for i in range(3)
            ]
            started = asyncio.get_running_loop().time()
            results = [await cp.wait_for_result(rid) for rid in rids]
            took = asyncio.get_running_loop().time() - started
        assert all(r.status is RequestStatus.FAILED for r in results)
        queued = [r for r in results if r.attempts == 0]
        assert queued, "some requests were still queued when the engine crashed"
        assert all("failed its trial after its cool-down" in (r.error or "") for r in queued)
        assert took < 30.0  # the breaker's cool-downs, not a request's 600 s limit

    run_virtual(main())


class _Blips:
    """An engine whose probes fail during ``windows`` (seconds from ``t0``)."""

    def __init__(self, engine: Any, windows: list[tuple[float, float]], t0: float) -> None:
        self._engine, self._windows, self._t0 = engine, windows, t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def health(self) -> bool:
        t = asyncio.get_running_loop().time() - self._t0
        if any(a <= t < b for a, b in self._windows):
            return False
        return bool(await self._engine.health())


def test_queued_requests_wait_through_two_short_ejections_whose_trials_pass() -> None:
    """Ejected twice within a short while, but each trial after the cool-down passes: the
    queued requests wait and complete (only a failed trial means the fleet is down)."""

    async def main() -> None:
        settings = HealthSettings(
            interval_s=0.5, timeout_s=0.2,
            breaker=BreakerSettings(failure_threshold=2, base_cooldown_s=0.5, max_cooldown_s=4.0),
        )  # fmt: skip
        cp = ControlPlaneManager(
            mode="simulated", health=settings, enable_pd_separation=False, seed=1
        )
        (inst,) = make_instances(1, max_concurrent_requests=1)
        t0 = asyncio.get_running_loop().time()
        cp.register_instance(inst, _Blips(make_sim_engine(inst), [(1.0, 1.9), (3.5, 4.4)], t0))
        async with cp:
            await asyncio.sleep(0.2)
            rids = [
                await cp.submit_request(make_metadata(f"q{i}", max_tokens=3000)) for i in range(4)
            ]
            results = [await cp.wait_for_result(rid) for rid in rids]
            opened = cp.metrics.circuit_transitions.labels(instance_id="sim-0", state="open")
            assert opened._value.get() == 2  # the two short ejections
        assert [r.status for r in results] == [RequestStatus.COMPLETED] * 4, [
            r.error for r in results
        ]

    run_virtual(main())


def test_an_instance_being_removed_is_still_probed_while_calls_run_on_it() -> None:
    """Removed while a call is stuck on its hung engine: its probes still eject it and the
    call is moved, instead of waiting for the request's own limit."""

    async def main() -> None:
        cp = _manager(FaultPlan.parse("hang@1"), routing_strategy="round_robin")
        async with cp:
            await asyncio.sleep(1.05)
            metas = [
                RequestMetadata(request_id=f"r{i}", prompt="x y", max_tokens=6) for i in (0, 1)
            ]
            runs = [asyncio.create_task(cp.generate(meta)) for meta in metas]
            await asyncio.sleep(0.01)
            cp.unregister_instance("sim-0")  # one call is on it
            assert cp.get_instance_metrics("sim-0")["removing"] is True
            started = cp.clock.now()
            results = await asyncio.wait_for(asyncio.gather(*runs), 10.0)
            assert cp.clock.now() - started < 1.5
            listed = [i.instance_id for i in cp.get_instances(removing=True)]
            assert listed == ["sim-1"]  # sim-0 gone with its last call
        for r in results:
            assert r.status is RequestStatus.COMPLETED and r.instance_id == "sim-1"

    run_virtual(main())


def test_a_stall_is_never_judged_before_its_limit() -> None:
    """A call that came just after a scrape that saw none in flight had been timed from
    that scrape, and ejected up to one stats interval before ``stall_timeout_s``."""

    async def main() -> None:
        cp = _manager(
            FaultPlan.parse("hang@p1"), stall_timeout_s=3.0, routing_strategy="round_robin"
        )
        async with cp:
            await asyncio.sleep(1.95)  # just after a scrape: the next is 1 s away
            took = await asyncio.wait_for(_stall_run(cp, 1, 0.0), 60.0)
        assert 3.0 <= took[0] < 3.0 + 2 * 1.0 + 0.1  # moved to sim-1: not early, not late

    run_virtual(main())


def test_a_call_after_an_idle_spell_is_timed_from_the_first_scrape_that_sees_it() -> None:
    """The engine's counters stood still through a long idle spell after its last call
    ended: the standstill of a new call is timed from the first scrape that sees it, not
    from a mark the earlier call left."""

    async def main() -> None:
        clock = VirtualClock()
        monitor = HealthMonitor(
            HealthSettings(stall_timeout_s=60.0),
            clock=lambda: clock,
            metrics=ControlPlaneMetrics(),
            on_change=lambda: None,
        )
        inst = make_instance()
        state = InstanceState(instance=inst, client=make_sim_engine(inst))
        monitor.attach(state)
        stats = EngineStats(prompt_tokens_total=100, generation_tokens_total=50, counts_tokens=True)
        state.in_flight = 1
        monitor.watch_progress(state, stats)  # a call in flight, the counters at 150
        await asyncio.sleep(1.0)
        state.in_flight = 0  # it ended
        monitor.watch_progress(state, stats)
        await asyncio.sleep(600.0)  # ten minutes idle, then a new call
        state.in_flight = 1
        seen = []
        for wait in (0.0, 59.0, 1.0):  # still at 150 a minute later: stalled, not before
            await asyncio.sleep(wait)
            monitor.watch_progress(state, stats)
            seen.append(state.breaker.state)
        assert seen == [CircuitState.CLOSED, CircuitState.CLOSED, CircuitState.OPEN]

    run_virtual(main())
