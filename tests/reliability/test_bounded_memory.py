"""Every structure that grows with traffic has a bound: push past each cap, check it holds.

Prefix index (capacity in blocks, a few MB at the default), finished-request records (count
and TTL), per-instance metric series (removed on unregister, breaker series included), the
model label (bounded by the registered models: unknown models are refused before any metric
is labelled).
"""

from __future__ import annotations

import asyncio
import random
import tracemalloc

import pytest

from sage_llm import ControlPlaneManager, RequestMetadata, RequestStatus
from sage_llm.control_plane.manager import REMOVED_COUNTS_KEEP_S
from sage_llm.control_plane.records import FinishedRecords
from sage_llm.control_plane.routing.prefix_index import PrefixIndex
from sage_llm.errors import ModelNotFoundError, RequestNotFoundError
from sage_llm.sim.clock import run_virtual
from sage_llm.types import RequestResult
from tests.factories import make_instances


def _manager(**kwargs: object) -> ControlPlaneManager:
    cp = ControlPlaneManager(mode="simulated", enable_pd_separation=False, **kwargs)  # type: ignore[arg-type]
    for inst in make_instances(2, max_concurrent_requests=16):
        cp.register_instance(inst)
    return cp


def _meta(i: int) -> RequestMetadata:
    prompt = f"distinct prompt number {i} " + "filler words to span blocks " * 8
    return RequestMetadata(request_id=f"r{i}", prompt=prompt, max_tokens=2)


def test_prefix_index_and_finished_records_stay_bounded() -> None:
    async def main() -> None:
        cp = _manager(
            prefix_index_capacity=50, result_retention=20, result_ttl_s=1000.0,
            routing_strategy="locality",  # a router that reads the index: it is kept
        )  # fmt: skip
        async with cp:
            for i in range(120):
                res = await cp.generate(_meta(i))
                assert res.status is RequestStatus.COMPLETED
            assert 0 < cp.get_status()["prefix_index_entries"] <= 50
            assert len(cp._finished) <= 20
            assert await cp.get_result("r119") is not None
            with pytest.raises(RequestNotFoundError):  # evicted, not kept for ever
                await cp.get_result("r0")

    run_virtual(main())


def test_default_caps_of_a_manager() -> None:
    cp = ControlPlaneManager(mode="simulated")
    assert cp._prefix.capacity_blocks == 32_768
    assert cp._finished._capacity == 2_000


def test_default_finished_records_bound_holds() -> None:
    records = FinishedRecords()
    for i in range(2_500):
        records.add(RequestResult(request_id=f"r{i}", status=RequestStatus.COMPLETED), now=0.0)
    assert len(records) == 2_000
    assert "r499" not in records and "r500" in records


def test_default_prefix_index_at_capacity_is_a_few_megabytes() -> None:
    """Distinct blocks (the soak's worst case) fill the default bound and no further."""
    rng = random.Random(0)
    tracemalloc.start()
    try:
        index = PrefixIndex()
        for i in range(15_000):
            index.insert(f"sim-{i % 4}", [rng.getrandbits(64) for _ in range(3)])
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert index.blocks == index.capacity_blocks == 32_768
    assert index.evictions == 15_000 * 3 - 32_768
    assert used < 8 * 2**20  # about 4.6 MB on CPython 3.11


def test_finished_records_expire_after_their_ttl() -> None:
    async def main() -> None:
        cp = _manager(result_retention=1000, result_ttl_s=5.0)
        async with cp:
            for i in range(10):
                await cp.generate(_meta(i))
            await asyncio.sleep(6.0)
            await cp.generate(_meta(99))
            cp._finished.expire(cp.clock.now())
            assert len(cp._finished) == 1

    run_virtual(main())


def test_instance_metric_series_are_removed_on_unregister() -> None:
    """Gauges go with the instance; its counters stay REMOVED_COUNTS_KEEP_S, so that a
    scrape sees the requests that ended as it went, then go too."""

    async def main() -> None:
        cp = _manager()
        async with cp:
            results = await asyncio.gather(*(cp.generate(_meta(i)) for i in range(8)))
            assert {r.instance_id for r in results} == {"sim-0", "sim-1"}
            text = cp.prometheus_metrics().decode()
            assert 'sage_llm_requests_total{instance_id="sim-1"' in text
            cp.unregister_instance("sim-1")
            text = cp.prometheus_metrics().decode()
            assert 'sage_llm_instance_in_flight{instance_id="sim-1"' not in text
            assert 'sage_llm_instance_healthy{instance_id="sim-1"' not in text
            assert 'sage_llm_requests_total{instance_id="sim-1"' in text
            await asyncio.sleep(REMOVED_COUNTS_KEEP_S + 1)
            text = cp.prometheus_metrics().decode()
            assert 'instance_id="sim-1"' not in text  # gauges, breaker and request series all gone
            assert 'sage_llm_requests_total{instance_id="sim-0"' in text

    run_virtual(main())


def test_a_request_ending_as_its_instance_is_removed_is_counted_in_metrics() -> None:
    async def main() -> None:
        cp = _manager()
        async with cp:
            meta = RequestMetadata(request_id="last", prompt="hello", max_tokens=40)
            await cp.submit_request(meta)
            for _ in range(100):
                if await cp.get_request_status("last") is RequestStatus.RUNNING:
                    break
                await asyncio.sleep(0.001)
            instance = cp._require_dispatcher().records["last"].instance_id
            assert instance is not None
            cp.unregister_instance(instance)  # drains: the request goes on
            assert (await cp.wait_for_result("last")).instance_id == instance
            text = cp.prometheus_metrics().decode()
            assert f'instance_id="{instance}",model=' in text
            assert f'sage_llm_instance_in_flight{{instance_id="{instance}"' not in text

    run_virtual(main())


def test_an_instance_registered_again_keeps_its_counters() -> None:
    async def main() -> None:
        cp = _manager()
        async with cp:
            await asyncio.gather(*(cp.generate(_meta(i)) for i in range(8)))
            inst = next(s.instance for s in cp._registry if s.instance_id == "sim-1")
            cp.unregister_instance("sim-1")
            cp.register_instance(inst)
            await asyncio.sleep(REMOVED_COUNTS_KEEP_S + 1)
            text = cp.prometheus_metrics().decode()
            assert 'sage_llm_requests_total{instance_id="sim-1"' in text

    run_virtual(main())


def test_unknown_models_never_become_metric_labels() -> None:
    async def main() -> None:
        cp = _manager()
        async with cp:
            for i in range(20):
                with pytest.raises(ModelNotFoundError):
                    await cp.submit_request(
                        RequestMetadata(request_id=f"x{i}", prompt="hi", model_name=f"m-{i}")
                    )
            text = cp.prometheus_metrics().decode()
            assert 'model="m-' not in text

    run_virtual(main())


def test_a_model_no_instance_serves_any_more_loses_its_series_later() -> None:
    async def main() -> None:
        cp = ControlPlaneManager(mode="simulated", enable_pd_separation=False)
        inst, other = make_instances(2, max_concurrent_requests=4)
        other.model_name = "other-model"
        cp.register_instance(inst)
        cp.register_instance(other)
        async with cp:
            meta = _meta(0)
            meta.model_name = inst.model_name
            await cp.generate(meta)
            await cp.generate(
                RequestMetadata(request_id="o", prompt="hi", max_tokens=2, model_name="other-model")
            )
            text = cp.prometheus_metrics().decode()
            assert 'sage_llm_e2e_request_latency_seconds_count{model="other-model"}' in text
            cp.unregister_instance(other.instance_id)
            text = cp.prometheus_metrics().decode()  # its last requests still counted
            assert 'sage_llm_e2e_request_latency_seconds_count{model="other-model"}' in text
            await asyncio.sleep(REMOVED_COUNTS_KEEP_S + 1)
            text = cp.prometheus_metrics().decode()
            assert 'model="other-model"' not in text
            assert (
                f'sage_llm_e2e_request_latency_seconds_count{{model="{inst.model_name}"}}' in text
            )

    run_virtual(main())


async def _registered_again_with_another_model(cp: ControlPlaneManager) -> str:
    """Run requests on both instances, then remove ``sim-1`` and register its id again
    with ``other-model``; returns the model it served before."""
    await asyncio.gather(*(cp.generate(_meta(i)) for i in range(8)))
    inst = next(s.instance for s in cp._registry if s.instance_id == "sim-1")
    old_model = inst.model_name
    cp.unregister_instance("sim-1")
    inst.model_name = "other-model"
    cp.register_instance(inst)
    return old_model


def test_stop_keeps_the_counters_of_an_id_registered_again_with_another_model() -> None:
    """stop() drops the series removed instances left; not those of an id registered
    again (with another model) since, which go on counting across a restart."""

    async def main() -> None:
        cp = _manager()
        async with cp:
            old_model = await _registered_again_with_another_model(cp)
            other = RequestMetadata(request_id="o1", prompt="hi", max_tokens=2)
            other.model_name = "other-model"
            await cp.generate(other)
        text = cp.prometheus_metrics().decode()
        assert f'instance_id="sim-1",model="{old_model}"' not in text
        assert 'instance_id="sim-1",model="other-model",policy="fifo",status="completed"} 1.0' in (
            text
        )

    run_virtual(main())


def test_another_model_registered_under_an_id_keeps_its_old_models_requests_a_while() -> None:
    """The old model's requests of an instance id registered again with another model stay
    REMOVED_COUNTS_KEEP_S, as any removed instance's (scrapes see its last requests), and
    then go; its new model's, and its breaker's, stay with it."""

    async def main() -> None:
        cp = _manager()
        async with cp:
            old_model = await _registered_again_with_another_model(cp)
            text = cp.prometheus_metrics().decode()
            assert f'instance_id="sim-1",model="{old_model}"' in text  # still counted
            await cp.generate(
                RequestMetadata(request_id="o", prompt="hi", max_tokens=2, model_name="other-model")
            )
            await asyncio.sleep(REMOVED_COUNTS_KEEP_S + 1)
            text = cp.prometheus_metrics().decode()
            assert f'instance_id="sim-1",model="{old_model}"' not in text
            assert f'instance_id="sim-0",model="{old_model}"' in text  # still served there
            assert 'instance_id="sim-1",model="other-model"' in text
            assert 'sage_llm_instance_healthy{instance_id="sim-1"}' in text

    run_virtual(main())
