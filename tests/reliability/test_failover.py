"""Failure semantics end to end: real engine-sim processes killed mid-traffic, and
simulated engines with injected faults behind the control plane.

Each accepted request must end exactly once: completed, or failed with a reason — never
hung, never run twice.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from sage_llm import ControlPlaneManager, ExecutionInstance, RequestMetadata, RequestStatus
from sage_llm.bench.procs import start_engine_sims
from sage_llm.control_plane.health import BreakerSettings, HealthSettings
from sage_llm.engines.base import Chunk, EngineRequest
from sage_llm.engines.http import HTTPTimeouts
from sage_llm.errors import EngineError, NoHealthyInstanceError
from sage_llm.sim.clock import Clock, current_clock, run_virtual
from sage_llm.sim.engine import SimEngine
from sage_llm.sim.factory import make_sim_engine
from sage_llm.sim.faults import FaultPlan, FaultyEngineClient
from tests.factories import MODEL, make_instances

_HEALTH = HealthSettings(
    interval_s=0.5,
    timeout_s=0.5,
    breaker=BreakerSettings(failure_threshold=2, base_cooldown_s=0.5, max_cooldown_s=2.0),
)


async def test_killing_an_engine_process_mid_traffic_loses_nothing() -> None:
    async with await start_engine_sims(3, model=MODEL, speed=20.0) as fleet:
        cp = ControlPlaneManager(
            mode="http", scheduling_policy="fifo", enable_pd_separation=False,
            health=_HEALTH, max_retries=3, seed=0,
            engine_timeouts=HTTPTimeouts(connect_s=5.0, first_token_s=20.0, idle_s=10.0),
        )  # fmt: skip
        for i, proc in enumerate(fleet.engines):
            cp.register_instance(
                ExecutionInstance(
                    instance_id=f"e{i}",
                    host="127.0.0.1",
                    port=proc.port,
                    model_name=MODEL,
                    max_concurrent_requests=8,
                )
            )
        async with cp:
            metas = [
                RequestMetadata(request_id=f"r{i}", prompt=f"story {i} " * 8, max_tokens=24)
                for i in range(36)
            ]
            waits = []
            for i, meta in enumerate(metas):
                waits.append(asyncio.create_task(cp.generate(meta)))
                if i == 12:
                    os.killpg(fleet.engines[0].pid, signal.SIGKILL)
                await asyncio.sleep(0.02)
            results = await asyncio.wait_for(asyncio.gather(*waits), 60)
            for _ in range(200):  # the breaker opens on failed requests or the next probe
                if cp.get_status()["circuits"]["e0"] == "open":
                    break
                await asyncio.sleep(0.05)
            assert cp.get_status()["circuits"]["e0"] == "open"
            assert cp.get_status()["available_instances"] == 2
    assert len({r.request_id for r in results}) == 36
    for r in results:
        assert r.status in (RequestStatus.COMPLETED, RequestStatus.FAILED)
        if r.status is RequestStatus.FAILED:  # only mid-stream failures may fail
            assert r.error and "e0" in r.error
            assert r.instance_id == "e0"
        else:
            assert r.completion_tokens == 24
    completed = [r for r in results if r.status is RequestStatus.COMPLETED]
    assert len(completed) >= 30
    assert all(r.instance_id != "e0" for r in completed if r.attempts > 1)


def _fleet(plan: str, **kwargs: object) -> ControlPlaneManager:
    kwargs.setdefault("health", _HEALTH)
    cp = ControlPlaneManager(
        mode="simulated", scheduling_policy="fifo", enable_pd_separation=False,
        seed=3, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    for i, inst in enumerate(make_instances(2, max_concurrent_requests=4)):
        engine = make_sim_engine(inst)
        cp.register_instance(
            inst, FaultyEngineClient(engine, FaultPlan.parse(plan)) if i == 0 else engine
        )
    return cp


def _meta(i: int, max_tokens: int = 8) -> RequestMetadata:
    return RequestMetadata(request_id=f"r{i}", prompt="hello world", max_tokens=max_tokens)


def test_failure_before_first_token_retries_elsewhere() -> None:
    async def main() -> None:
        async with _fleet("error=503@p1") as cp:  # a per-request fault: its probes pass
            results = await asyncio.gather(*(cp.generate(_meta(i)) for i in range(8)))
        assert all(r.status is RequestStatus.COMPLETED for r in results)
        assert all(r.instance_id == "sim-1" for r in results)
        assert any(r.attempts == 2 for r in results)

    run_virtual(main())


def test_a_request_in_a_retrys_backoff_counts_as_queued() -> None:
    """Between a failed attempt and its retry the request waits: the status, the metrics
    and the queue-depth gauge count it as queued (they had said nothing was waiting)."""

    async def main() -> None:
        async with _fleet("error=503@p1") as cp:
            dispatcher = cp._dispatcher
            assert dispatcher is not None
            dispatcher.retry_backoff_s = 1.0  # a backoff of 0.5-1.5 s: long enough to look
            cp.drain_instance("sim-1")  # the first attempt goes to sim-0, which fails it
            task = asyncio.ensure_future(cp.generate(_meta(0)))
            await asyncio.sleep(0)
            cp.drain_instance("sim-1", False)
            await asyncio.sleep(0.2)  # failed on sim-0 (503), waiting out its backoff
            assert cp.get_status()["pending_requests"] == 1
            assert cp.get_metrics().queued_requests == 1
            assert "sage_llm_queue_depth 1.0" in cp.prometheus_metrics().decode()
            result = await task
            assert (result.status, result.attempts) == (RequestStatus.COMPLETED, 2)
            assert cp.get_status()["pending_requests"] == 0
            assert "sage_llm_queue_depth 0.0" in cp.prometheus_metrics().decode()
            # one cancelled in its backoff is queued no more, at once
            cp.drain_instance("sim-1")
            rid = await cp.submit_request(_meta(1))
            await asyncio.sleep(0)
            cp.drain_instance("sim-1", False)
            await asyncio.sleep(0.2)
            assert cp.get_status()["pending_requests"] == 1
            assert await cp.cancel_request(rid)
            assert cp.get_status()["pending_requests"] == 0
            assert cp.get_metrics().queued_requests == 0
            assert "sage_llm_queue_depth 0.0" in cp.prometheus_metrics().decode()

    run_virtual(main())


class _TopOfJitter(random.Random):
    """A jitter generator pinned at the top of its range: U[0.5, 1.5) draws 1.499."""

    def random(self) -> float:
        return 0.999


class _SleepLog:
    """A clock that notes the sleeps asked of it."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self._clock.now()

    def to_datetime(self, t: float) -> datetime:
        return self._clock.to_datetime(t)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await self._clock.sleep(seconds)


def test_retry_backoffs_double_with_each_attempt_up_to_a_cap_of_2_s() -> None:
    """operations.md: a retry waits ``0.05 s × 2^(attempt-1) × U[0.5, 1.5)``, capped at
    2 s. A request failing before its first token on instance after instance (8 retries),
    its jitter pinned at the top of the range: each backoff doubles the last until 2 s."""

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", scheduling_policy="fifo", enable_pd_separation=False,
            seed=3, max_retries=8, health=HealthSettings(eject_on_errors=False),
        )  # fmt: skip
        for inst in make_instances(9):
            cp.register_instance(
                inst, FaultyEngineClient(make_sim_engine(inst), FaultPlan.parse("error=503@p1"))
            )
        async with cp:
            dispatcher = cp._dispatcher
            assert dispatcher is not None
            dispatcher._rng = _TopOfJitter()
            log = _SleepLog(dispatcher.clock)
            dispatcher.clock = log
            res = await cp.generate(_meta(0))
        assert (res.status, res.attempts) == (RequestStatus.FAILED, 9)
        expected = [0.05 * 1.499 * 2**k for k in range(5)] + [2.0] * 3  # 2.398 s: capped
        assert log.sleeps == pytest.approx(expected)

    run_virtual(main())


def test_failure_mid_stream_fails_with_reason_and_is_not_rerun() -> None:
    async def main() -> None:
        async with _fleet("malformed=2") as cp:
            cp.drain_instance("sim-1")
            res = await cp.generate(_meta(0))
            assert res.status is RequestStatus.FAILED
            assert res.error is not None and "malformed" in res.error
            assert res.attempts == 1
            chunks = []
            cp.drain_instance("sim-1", False)
            cp.drain_instance("sim-0")
            async for chunk in cp.stream(_meta(1)):
                chunks.append(chunk)
            assert chunks[-1].finish_reason is not None  # healthy instance: complete

    run_virtual(main())


def test_truncated_stream_is_a_failure_not_a_short_answer() -> None:
    async def main() -> None:
        async with _fleet("truncate=3") as cp:
            cp.drain_instance("sim-1")
            res = await cp.generate(_meta(0))
        assert res.status is RequestStatus.FAILED
        assert res.error is not None and "without a finish reason" in res.error

    run_virtual(main())


def test_hung_engine_hits_first_token_timeout_and_retries() -> None:
    async def main() -> None:
        timeouts = HTTPTimeouts(first_token_s=1.0, idle_s=1.0)
        async with _fleet("hang", engine_timeouts=timeouts) as cp:
            results = await asyncio.gather(*(cp.generate(_meta(i)) for i in range(4)))
        assert all(r.status is RequestStatus.COMPLETED for r in results)
        assert all(r.instance_id == "sim-1" for r in results)

    run_virtual(main())


def test_hang_mid_stream_hits_idle_timeout() -> None:
    async def main() -> None:
        timeouts = HTTPTimeouts(first_token_s=5.0, idle_s=1.0)
        slow_probes = HealthSettings(interval_s=5.0, timeout_s=5.0)  # the idle limit comes first
        async with _fleet("hang=2", engine_timeouts=timeouts, health=slow_probes) as cp:
            cp.drain_instance("sim-1")
            res = await cp.generate(_meta(0, max_tokens=16))
        assert res.status is RequestStatus.FAILED
        assert res.error is not None and "no next token within 1 s" in res.error

    run_virtual(main())


def test_a_call_on_an_ejected_instance_that_no_other_can_take_fails_at_once() -> None:
    """The engine hangs (its probes too): once it is ejected, the call it holds fails with
    that reason, as no other instance can take it, rather than wait for its time limit."""

    async def main() -> None:
        async with _fleet("hang=2") as cp:
            cp.drain_instance("sim-1")
            loop = asyncio.get_running_loop()
            started = loop.time()
            res = await cp.generate(_meta(0, max_tokens=16))
            took = loop.time() - started
        assert res.status is RequestStatus.FAILED
        assert res.error is not None and "instance sim-0 was ejected" in res.error
        assert took < 5.0  # the probes' time (0.5 s each), not a request time limit

    run_virtual(main())


def test_a_stream_under_way_on_an_engine_that_froze_fails_after_its_trial() -> None:
    """The engine hangs mid-stream, its probes too, and no idle limit is set (the
    default): the stream, which cannot move (its client has output), ends with the
    ejection as its reason once the engine's trial after its cool-down has failed too,
    not at the request's time limit."""

    async def main() -> None:
        async with _fleet("hang=2") as cp:
            loop = asyncio.get_running_loop()
            started = loop.time()
            chunks = []
            with pytest.raises(EngineError, match="instance sim-0 was ejected") as info:
                async for chunk in cp.stream(_meta(0, max_tokens=16)):  # on sim-0 (first)
                    chunks.append(chunk)
            took = loop.time() - started
            assert info.value.instance_id == "sim-0"
            assert len(chunks) == 2  # what the engine sent before it froze
            res = await cp.wait_for_result("r0")
            assert (res.status, res.instance_id, res.attempts) == (
                RequestStatus.FAILED, "sim-0", 1,
            )  # fmt: skip
            assert took < 10.0  # two ejections and a cool-down, not a request time limit

    run_virtual(main())


class _BusyReasoner:
    """An engine that streams reasoning only (chunks with no text) every 0.1 s for 5 s,
    while its probes fail from 0.5 s on (busy): the stream goes on all along."""

    def __init__(self, inner: SimEngine) -> None:
        self.inner = inner
        self.instance_id = inner.instance_id
        self.started: float | None = None

    async def generate(self, req: Any) -> Any:
        clock = current_clock()
        yield Chunk(text="", fields={"role": "assistant"})
        for i in range(50):
            await clock.sleep(0.1)
            yield Chunk(text="", fields={"reasoning_content": f"r{i} "})
        yield Chunk(text="answer", finish_reason="stop")

    async def prefill(self, req: Any) -> Any:
        return await self.inner.prefill(req)

    async def health(self) -> bool:
        now = current_clock().now()
        self.started = now if self.started is None else self.started
        return now - self.started < 0.5

    async def stats(self) -> Any:
        return await self.inner.stats()

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_stream_that_goes_on_is_not_failed_however_often_its_instance_is_ejected() -> None:
    """Its chunks carry reasoning, no text: what tells it from a stopped stream is that
    chunks come, not that tokens are counted."""

    async def main() -> None:
        cp = ControlPlaneManager(mode="simulated", health=_HEALTH, enable_pd_separation=False)
        (inst,) = make_instances(1)
        cp.register_instance(inst, _BusyReasoner(make_sim_engine(inst)))
        async with cp:
            chunks = [c async for c in cp.stream(_meta(0, max_tokens=200))]
            assert cp.get_status()["circuits"]["sim-0"] == "open"  # ejected meanwhile
        assert len(chunks) == 52 and chunks[-1].finish_reason == "stop"
        assert cp.get_instance_metrics("sim-0")["circuit"]["transitions"] >= 3

    run_virtual(main())


def test_max_queue_wait_fails_old_queued_requests() -> None:
    async def main() -> None:
        async with _fleet("slow=50", max_queue_wait_s=0.5) as cp:
            cp.drain_instance("sim-1")
            results = await asyncio.gather(*(cp.generate(_meta(i, 64)) for i in range(8)))
        failed = [r for r in results if r.status is RequestStatus.FAILED]
        assert failed, "some requests waited longer than 0.5 s"
        assert all("queued longer than 0.5 s" in (r.error or "") for r in failed)
        assert all(r.attempts == 0 for r in failed)

    run_virtual(main())


def test_cancel_aborts_the_engine_request() -> None:
    async def main() -> None:
        async with _fleet("slow=20") as cp:
            cp.drain_instance("sim-1")
            stream = cp.stream(_meta(0, 64))
            first = await anext(stream)
            assert first.text
            await stream.aclose()  # type: ignore[attr-defined]
            await asyncio.sleep(0.1)
            assert cp.get_instance_metrics("sim-0")["active_requests"] == 0
            res = await cp.get_result("r0")
        assert res is not None and res.status is RequestStatus.CANCELLED

    run_virtual(main())


async def test_an_instance_serving_another_model_is_retried_around_and_ejected() -> None:
    """A registered instance whose engine answers 404 (it serves another model: a wrong
    ``model_name`` in the config) fails no request: each is retried on another instance,
    and the instance is ejected as a failing one would be."""
    from sage_llm.sim.server import start_engine_server

    servers = []
    for name in (MODEL, "another-model"):
        engine = make_sim_engine(make_instances(1, metadata={"sim_speed": 50.0})[0])
        servers.append(await start_engine_server(engine, model_name=name, shutdown_timeout=1.0))
    try:
        cp = ControlPlaneManager(
            mode="http", scheduling_policy="fifo", routing_strategy="round_robin",
            enable_pd_separation=False, health=_HEALTH, max_retries=2, seed=0,
        )  # fmt: skip
        for i, (_, port) in enumerate(servers):
            cp.register_instance(ExecutionInstance(f"e{i}", "127.0.0.1", port, MODEL))
        async with cp:
            results = [
                await cp.generate(RequestMetadata(request_id=f"r{i}", prompt="hi", max_tokens=4))
                for i in range(6)
            ]
            circuit = cp.get_status()["circuits"]["e1"]
        assert all(r.status is RequestStatus.COMPLETED for r in results), results
        assert {r.instance_id for r in results} == {"e0"}
        assert any(r.attempts == 2 for r in results)  # sent to e1 first, then retried
        assert circuit == "open"
    finally:
        for runner, _ in servers:
            await runner.cleanup()


@pytest.mark.parametrize("fault", ["truncate=3", "malformed=2", "hang=2"])
def test_a_whole_answer_whose_engine_failed_after_output_is_retried_from_the_start(
    fault: str,
) -> None:
    """The engine call of a request answered whole streamed (as an in-process engine's
    always does, an HTTP engine's when sampled), and it broke after some output that no
    one saw: the request is retried elsewhere, and its answer is the retry's alone."""

    async def main() -> None:
        timeouts = HTTPTimeouts(first_token_s=5.0, idle_s=1.0)
        async with _fleet(fault, engine_timeouts=timeouts) as cp:
            meta = _meta(0)
            meta.preferred_instance_id = "sim-0"
            res = await cp.generate(meta)
        assert res.status is RequestStatus.COMPLETED, res.error
        assert (res.instance_id, res.attempts) == ("sim-1", 2)
        assert res.completion_tokens == len(res.text.split()) == 8
        assert res.finish_reason == "length"

    run_virtual(main())


class _TooManyRequestsAfterOutput:
    """An engine that answers each request's first chunk, then fails it with a 429: a
    reason of the request's (too many requests), not the instance's."""

    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        async for chunk in self._engine.generate(req):
            yield chunk
            raise EngineError("too many requests", status=429, retryable=False)


def test_a_whole_answer_that_failed_after_output_for_its_own_reason_is_not_retried() -> None:
    """After output that reached no one, a whole answer is retried only for a reason of
    the instance's (one that counts against its health): a 429 fails it where it ran."""

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", scheduling_policy="fifo", enable_pd_separation=False,
            health=_HEALTH, seed=3,
        )  # fmt: skip
        faulty, sound = make_instances(2, max_concurrent_requests=4)
        cp.register_instance(faulty, _TooManyRequestsAfterOutput(make_sim_engine(faulty)))
        cp.register_instance(sound)
        async with cp:
            meta = _meta(0)
            meta.preferred_instance_id = "sim-0"
            res = await cp.generate(meta)
        assert (res.status, res.instance_id, res.attempts) == (RequestStatus.FAILED, "sim-0", 1)
        assert res.error and "HTTP 429" in res.error

    run_virtual(main())


def test_a_stream_whose_engine_failed_after_output_is_not_retried() -> None:
    async def main() -> None:
        async with _fleet("truncate=3") as cp:
            meta = _meta(0)
            meta.preferred_instance_id = "sim-0"
            seen = []
            with pytest.raises(EngineError, match="without a finish reason"):
                async for chunk in cp.stream(meta):
                    seen.append(chunk.text)
            res = await cp.wait_for_result("r0")
        assert len(seen) == 3
        assert (res.status, res.instance_id, res.attempts) == (RequestStatus.FAILED, "sim-0", 1)

    run_virtual(main())


def test_draining_the_last_instance_fails_the_queued_requests_with_a_503_reason() -> None:
    """Draining takes no new request: requests queued for a model whose every instance is
    draining would wait for an operator; they fail at once (503), as new ones are refused."""

    async def main() -> None:
        async with _fleet("slow=50") as cp:
            cp.drain_instance("sim-1")
            running = [asyncio.create_task(cp.generate(_meta(i, 64))) for i in range(6)]
            await asyncio.sleep(0.01)  # four run on sim-0, two are queued
            assert cp.get_status()["pending_requests"] == 2
            cp.drain_instance("sim-0")
            results = await asyncio.gather(*running)
            with pytest.raises(NoHealthyInstanceError, match="draining"):
                await cp.generate(_meta(9))
            refused = cp.prometheus_metrics().decode()
            assert 'sage_llm_requests_rejected_total{model="llama-3-8b",reason="draining"} 1.0' in (
                refused
            )
            failed = [r for r in results if r.status is RequestStatus.FAILED]
            assert len(failed) == 2 and all(r.attempts == 0 for r in failed)
            assert all(r.error and "every instance serving model" in r.error for r in failed)
            assert sum(r.status is RequestStatus.COMPLETED for r in results) == 4

    run_virtual(main())


class _SlowProbes:
    """An engine whose health probes hang for a while (busy, say) while it works on."""

    def __init__(self, engine: SimEngine, slow: tuple[float, float]) -> None:
        self._engine, self._slow = engine, slow

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def health(self) -> bool:
        start, end = self._slow
        if start <= asyncio.get_running_loop().time() < end:
            await asyncio.sleep(5)
        return await self._engine.health()


@pytest.mark.parametrize(("slow_until", "tokens"), [(3.0, 400), (5.0, 2000)])
def test_a_call_stays_on_an_instance_ejected_for_a_moment(slow_until: float, tokens: int) -> None:
    """Its probes time out for a while, so it is ejected; the call it held, which no other
    instance could take, completes: its trial after the cool-down passes (until 3.0), or it
    fails but the call has had tokens meanwhile (until 5.0: the engine works on)."""

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", scheduling_policy="fifo", enable_pd_separation=False,
            health=_HEALTH, seed=1,
        )  # fmt: skip
        (inst,) = make_instances(1, max_concurrent_requests=4)
        now = asyncio.get_running_loop().time()
        slow = (now + 1.2, now + slow_until)
        cp.register_instance(inst, _SlowProbes(make_sim_engine(inst), slow))
        async with cp:
            await asyncio.sleep(0.3)
            res = await cp.generate(_meta(0, max_tokens=tokens))
            opened = cp.metrics.circuit_transitions.labels(
                instance_id=inst.instance_id, state="open"
            )
            assert opened._value.get() >= 1  # it was ejected meanwhile
        assert res.status is RequestStatus.COMPLETED and res.completion_tokens == tokens

    run_virtual(main())
