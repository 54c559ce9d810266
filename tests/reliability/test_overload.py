"""Overload and shutdown: 429 with Retry-After when the queue is full, SLO admission,
and a graceful stop that refuses new work but finishes what is in flight."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from sage_llm import ControlPlaneManager, RequestMetadata, RequestStatus
from sage_llm.errors import ControlPlaneNotRunningError, QueueFullError, SLOInfeasibleError
from sage_llm.sim.clock import run_virtual
from tests.factories import make_instances
from tests.gateway.harness import completion_body, serve


async def test_full_queue_is_429_with_retry_after_through_the_gateway() -> None:
    async with (
        serve(1, bound=1, max_queue_size=2, speed=0.5) as gw,
        aiohttp.ClientSession() as http,
    ):

        async def post() -> tuple[int, str | None]:
            body = completion_body(max_tokens=32)
            async with http.post(gw.url("/v1/completions"), json=body) as r:
                await r.read()
                return r.status, r.headers.get("Retry-After")

        answers = await asyncio.gather(*(post() for _ in range(8)))
    statuses = sorted(s for s, _ in answers)
    assert statuses.count(200) in (2, 3)  # up to one running and two queued
    assert statuses.count(429) >= 5
    assert all(s == 429 for s in statuses if s != 200)
    assert all(ra is not None and int(ra) >= 1 for s, ra in answers if s == 429)


async def test_an_infeasible_deadline_is_429_without_retry_after_and_counted_as_such() -> None:
    async with (
        serve(1, reject_infeasible_slo=True) as gw,
        aiohttp.ClientSession() as http,
    ):
        body = completion_body(max_tokens=500, slo_deadline_ms=1)
        async with http.post(gw.url("/v1/completions"), json=body) as r:
            assert r.status == 429
            assert (await r.json())["error"]["type"] == "slo_infeasible"
            assert "Retry-After" not in r.headers  # it would be as infeasible later
        async with http.get(gw.url("/metrics")) as r:
            text = await r.text()
        assert 'sage_llm_requests_rejected_total{model="' in text
        assert 'reason="slo_infeasible"' in text


def _manager(**kwargs: object) -> ControlPlaneManager:
    cp = ControlPlaneManager(mode="simulated", enable_pd_separation=False, **kwargs)  # type: ignore[arg-type]
    for inst in make_instances(1, max_concurrent_requests=2):
        cp.register_instance(inst)
    return cp


def test_queue_bound_and_infeasible_slo_are_refused_at_admission() -> None:
    async def main() -> None:
        async with _manager(max_queue_size=1, reject_infeasible_slo=True) as cp:
            impossible = RequestMetadata(
                request_id="slo", prompt="hi " * 100, max_tokens=500, slo_deadline_ms=1
            )
            with pytest.raises(SLOInfeasibleError):
                await cp.submit_request(impossible)
            for i in range(3):
                await cp.submit_request(
                    RequestMetadata(request_id=f"r{i}", prompt="hello", max_tokens=64)
                )
                await asyncio.sleep(0)  # let the dispatcher start what fits
            with pytest.raises(QueueFullError) as info:
                await cp.submit_request(
                    RequestMetadata(request_id="over", prompt="hello", max_tokens=4)
                )
            assert info.value.http_status == 429

    run_virtual(main())


def test_graceful_stop_refuses_new_work_and_finishes_in_flight() -> None:
    async def main() -> None:
        cp = _manager()
        await cp.start()
        rids = [
            await cp.submit_request(
                RequestMetadata(request_id=f"r{i}", prompt="hello", max_tokens=32)
            )
            for i in range(4)
        ]
        stopping = asyncio.create_task(cp.stop(drain_timeout_s=30.0))
        await asyncio.sleep(0)
        with pytest.raises(ControlPlaneNotRunningError):
            await cp.submit_request(
                RequestMetadata(request_id="late", prompt="hello", max_tokens=4)
            )
        await stopping
        results = [cp._finished.get(r, cp.clock.now()) for r in rids]
        assert all(r is not None and r.status is RequestStatus.COMPLETED for r in results)

    run_virtual(main())
