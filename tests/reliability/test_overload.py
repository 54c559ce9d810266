"""Overload and shutdown: 429 with Retry-After when the queue is full, SLO admission,
and a graceful stop that refuses new work but finishes what is in flight."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import aiohttp
import openai
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
            assert r.headers["x-should-retry"] == "false"  # read by the OpenAI SDKs
        client = openai.AsyncOpenAI(base_url=gw.url("/v1"), api_key="k", max_retries=2)
        with pytest.raises(openai.RateLimitError):
            await client.completions.create(
                model=body["model"], prompt="hi", max_tokens=500,
                extra_headers={"x-sage-slo-ms": "1"},
            )  # fmt: skip
        await client.close()
        async with http.get(gw.url("/metrics")) as r:
            text = await r.text()
        rejected = [
            line for line in text.splitlines()
            if line.startswith("sage_llm_requests_rejected_total{") and "slo_infeasible" in line
        ]  # fmt: skip
        assert len(rejected) == 1 and rejected[0].endswith(" 2.0")  # no retry by the SDK


def _one_slot(**settings: object) -> ControlPlaneManager:
    cp = ControlPlaneManager(mode="simulated", enable_pd_separation=False, **settings)  # type: ignore[arg-type]
    for inst in make_instances(1, max_concurrent_requests=1):
        cp.register_instance(inst)
    return cp


TIGHT = RequestMetadata(request_id="tight", prompt="z " * 50, max_tokens=64, slo_deadline_ms=3000)
"""A deadline the instance meets alone (about 0.5 s of work)."""


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


@pytest.mark.parametrize("switch", [(), ("slo_aware",), ("fifo", "slo_aware")])
def test_a_demoted_request_stays_without_its_deadline_across_policy_switches(
    switch: tuple[str, ...],
) -> None:
    """A request demoted at admission runs after the feasible ones, also once the queue has
    moved to another policy and back (it had gone first again, with its missed deadline)."""

    async def main() -> None:
        async with _one_slot(scheduling_policy="slo_aware") as cp:
            # a solo request first: the TPOT a deadline is judged by is then known (one
            # not known yet refuses nothing beyond the time to first token)
            await cp.generate(RequestMetadata(request_id="solo", prompt="x", max_tokens=8))
            await cp.submit_request(RequestMetadata(request_id="hog", prompt="x", max_tokens=200))
            await asyncio.sleep(0.01)
            demoted = replace(TIGHT, request_id="demoted", slo_deadline_ms=300)
            await cp.submit_request(demoted)
            assert cp.get_status()["policy"]["state"]["demoted"] == 1
            for k in range(4):
                await cp.submit_request(
                    replace(TIGHT, request_id=f"d{k}", slo_deadline_ms=20_000 + 1000 * k)
                )
            for name in switch:
                cp.update_policy(name)
            results = [await cp.wait_for_result(r) for r in ("demoted", "d0", "d1", "d2", "d3")]
            order = [r.request_id for r in sorted(results, key=lambda r: r.queue_wait_ms)]
            assert order == ["d0", "d1", "d2", "d3", "demoted"]
            assert [r.slo_met for r in results] == [False, True, True, True, True]

    run_virtual(main())
