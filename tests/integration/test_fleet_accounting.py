"""A manager over 4 simulated engines, on virtual time, completes 1,000 mixed requests.

Every request is accounted for (completed + failed + cancelled = submitted), no instance
ever exceeds its concurrency bound, and no request runs twice.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections import Counter

import pytest

from sage_llm import ControlPlaneManager, ExecutionInstance, RequestPriority, RequestStatus
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.factory import make_sim_engine
from sage_llm.tokens import count_tokens
from tests.engines.probes import ConcurrencyProbe, FaultyEngine
from tests.factories import make_instances, make_metadata

N_REQUESTS = 1000
BOUND = 12
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "engines",
    "batch",
    "tokens",
]


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 400)))


async def _run_fleet(policy: str, routing: str, seed: int) -> None:
    rng = random.Random(seed)
    probes: dict[str, ConcurrencyProbe] = {}

    def factory(inst: ExecutionInstance) -> ConcurrencyProbe:
        engine = make_sim_engine(inst)
        if inst.instance_id == "sim-3":
            probe: ConcurrencyProbe = FaultyEngine(
                engine,
                fail_before=lambda rid: zlib.crc32(f"{seed}{rid}b".encode()) % 100 < 10,
                fail_mid=lambda rid: zlib.crc32(f"{seed}{rid}m".encode()) % 100 < 5,
            )
        else:
            probe = ConcurrencyProbe(engine)
        probes[inst.instance_id] = probe
        return probe

    cp = ControlPlaneManager(
        scheduling_policy=policy,
        routing_strategy=routing,
        engine_factory=factory,
        seed=seed,
    )
    for inst in make_instances(4, max_concurrent_requests=BOUND):
        cp.register_instance(inst)

    submitted: list[str] = []
    cancelled_ids: set[str] = set()
    async with cp:
        cancel_tasks: list[asyncio.Task[bool]] = []
        for i in range(N_REQUESTS):
            await asyncio.sleep(rng.expovariate(40.0))
            priority = rng.choice(list(RequestPriority))
            meta = make_metadata(
                f"req-{i}",
                prompt=_prompt(rng),
                max_tokens=rng.randint(4, 48),
                priority=priority,
                slo_deadline_ms=rng.choice([None, 2_000.0, 10_000.0]),
                user_id=f"user-{rng.randint(0, 30)}",
            )
            rid = await cp.submit_request(meta)
            submitted.append(rid)
            if rng.random() < 0.05:
                cancelled_ids.add(rid)

                async def cancel_later(r: str = rid, delay: float = rng.uniform(0, 2)) -> bool:
                    await asyncio.sleep(delay)
                    return await cp.cancel_request(r)

                cancel_tasks.append(asyncio.create_task(cancel_later()))
        results = [await cp.wait_for_result(rid) for rid in submitted]
        await asyncio.gather(*cancel_tasks)
        statuses = [await cp.get_request_status(rid) for rid in submitted]
        metrics = cp.get_metrics()

    counts = Counter(r.status for r in results)
    assert len(results) == N_REQUESTS
    assert (
        counts[RequestStatus.COMPLETED] + counts[RequestStatus.FAILED]
        + counts[RequestStatus.CANCELLED]
        == N_REQUESTS
    )  # fmt: skip
    assert statuses == [r.status for r in results]
    assert metrics.completed_requests == counts[RequestStatus.COMPLETED]
    assert metrics.failed_requests == counts[RequestStatus.FAILED]
    assert counts[RequestStatus.COMPLETED] > 800

    for probe in probes.values():
        assert probe.max_in_flight <= BOUND
        assert probe.in_flight == 0

    faulty = probes["sim-3"]
    assert isinstance(faulty, FaultyEngine)
    starts = Counter(rid for p in probes.values() for rid in p.request_ids)
    # a request may start again after a failure (after output too: it was submitted, not
    # streamed, so that output had reached no one), or when sim-3's ejection moved it,
    # each start one of its attempts; it runs to its end once at most
    by_id = {r.request_id: r for r in results}
    for rid, n in starts.items():
        assert n <= by_id[rid].attempts, f"{rid} started {n} times"
    ends = Counter(rid for p in probes.values() for rid in p.finished)
    assert max(ends.values()) == 1
    assert ends.keys() >= {r.request_id for r in results if r.status is RequestStatus.COMPLETED}
    for rid in faulty.failed_mid:
        res = by_id[rid]
        if res.status is RequestStatus.COMPLETED:  # from the start, elsewhere
            assert res.instance_id != "sim-3" and res.attempts >= 2
        elif res.status is RequestStatus.FAILED:  # no retry left
            assert res.error is not None and "mid-stream" in res.error
    if faulty.failed_mid:
        assert any(by_id[rid].status is RequestStatus.COMPLETED for rid in faulty.failed_mid)
    for res in results:
        if res.status is RequestStatus.COMPLETED:
            assert res.finish_reason is not None
            assert res.completion_tokens >= 1
            assert count_tokens(res.text) == res.completion_tokens
            assert res.instance_id is not None
            assert res.ttft_ms is not None
            assert res.e2e_latency_ms >= res.ttft_ms
        elif res.status is RequestStatus.CANCELLED:
            assert res.request_id in cancelled_ids
        else:
            assert res.error


@pytest.mark.parametrize(
    ("policy", "routing"),
    [
        ("fifo", "load_balanced"),
        ("priority", "round_robin"),
        ("slo_aware", "power_of_two"),
        ("cost_optimized", "locality"),
        ("adaptive", "affinity"),
    ],
)
def test_thousand_mixed_requests_are_all_accounted_for(policy: str, routing: str) -> None:
    run_virtual(_run_fleet(policy, routing, seed=7))
