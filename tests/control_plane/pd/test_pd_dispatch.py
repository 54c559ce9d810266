"""PD end to end in process: a manager over simulated PREFILLING / DECODING / GENERAL
engines, on virtual time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import TypeVar

import pytest

from sage_llm import ControlPlaneManager, RequestResult, RequestStatus
from sage_llm.control_plane.instances import batch_bucket
from sage_llm.engines.base import Chunk, EngineRequest, KVHandle
from sage_llm.engines.http import HTTPTimeouts
from sage_llm.errors import (
    EngineConnectionError,
    EngineError,
    EngineRequestRejectedError,
    InvalidRequestError,
    NoHealthyInstanceError,
    RequestCancelledError,
)
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.engine import KVTransferHub, SimEngine
from sage_llm.sim.factory import make_sim_engine
from sage_llm.tokens import count_tokens
from sage_llm.types import ExecutionInstanceType as Role
from sage_llm.types import PDSeparationConfig
from tests.engines.fake_engine import FakeEngine
from tests.engines.probes import ConcurrencyProbe, FaultyEngine
from tests.factories import MODEL, make_instance, make_metadata

LONG = "the quick brown fox jumps over the lazy dog " * 70
SHORT = "hello there"


class PrefillProbe(ConcurrencyProbe):
    """Also counts prefill legs in flight; fails them when ``fail`` is set."""

    def __init__(self, inner: SimEngine, *, fail: bool = False) -> None:
        super().__init__(inner)
        self.fail = fail
        self.error: Exception | None = None
        """Raised by each leg when set (beside ``fail``'s refused connection, a prefill
        leg's)."""
        self.prefills_in_flight = 0
        self.max_prefills_in_flight = 0
        self.prefill_ids: list[str] = []

    async def prefill(self, req: EngineRequest) -> KVHandle:
        self.prefill_ids.append(req.request_id)
        if self.fail:
            raise EngineConnectionError("connection refused", instance_id=self.instance_id)
        if self.error is not None:
            raise self.error
        self.prefills_in_flight += 1
        self.max_prefills_in_flight = max(self.max_prefills_in_flight, self.prefills_in_flight)
        try:
            return await self.inner.prefill(req)
        finally:
            self.prefills_in_flight -= 1

    async def generate(self, req: EngineRequest) -> AsyncGenerator[Chunk, None]:
        if self.error is not None:
            raise self.error
        async for chunk in super().generate(req):
            yield chunk


class Fleet:
    """A manager plus direct handles on its simulated engines."""

    def __init__(
        self,
        roles: Iterable[tuple[str, Role]],
        *,
        decider: str = "always",
        bound: int = 8,
        link_gbps: float = 50.0,
        probes: bool = False,
        failing_prefill: bool = False,
        **manager: object,
    ) -> None:
        cfg = manager.pop("pd_config", None) or PDSeparationConfig(routing_policy=decider)
        self.cp = ControlPlaneManager(mode="simulated", pd_config=cfg, **manager)  # type: ignore[arg-type]
        self.hub = KVTransferHub()
        self.engines: dict[str, SimEngine] = {}
        self.probes: dict[str, ConcurrencyProbe] = {}
        for n, (iid, role) in enumerate(roles):
            inst = make_instance(
                iid, port=8000 + n, instance_type=role, max_concurrent_requests=bound
            )
            engine = make_sim_engine(inst, kv_hub=self.hub, kv_link_gbps=link_gbps)
            self.engines[iid] = engine
            client: SimEngine | ConcurrencyProbe = engine
            if probes or (failing_prefill and role is Role.PREFILLING):
                probe = PrefillProbe(engine, fail=failing_prefill and role is Role.PREFILLING)
                self.probes[iid] = probe
                client = probe
            self.cp.register_instance(inst, client=client)

    def pinned_nowhere(self, rid: str) -> bool:
        return all(e.core.release_kv(rid) is False for e in self.engines.values())

    def active(self, iid: str) -> int:
        return int(self.cp.get_instance_metrics(iid)["active_requests"])


PD_PAIR = [("p0", Role.PREFILLING), ("d0", Role.DECODING)]


def test_pd_only_fleet_runs_every_request_disaggregated() -> None:
    async def main() -> None:
        fleet = Fleet(PD_PAIR, decider="threshold")
        async with fleet.cp as cp:
            metas = [
                make_metadata(f"r{i}", prompt=LONG if i % 2 else SHORT, max_tokens=5 + i)
                for i in range(12)
            ]
            results = await asyncio.gather(*(cp.generate(m) for m in metas))
            status = cp.get_status()["pd"]
        for meta, res in zip(metas, results, strict=True):
            assert res.status is RequestStatus.COMPLETED, res.error
            assert (res.prefill_instance_id, res.instance_id) == ("p0", "d0")
            assert res.completion_tokens == meta.max_tokens
            assert count_tokens(res.text) == meta.max_tokens
            assert res.prompt_tokens == count_tokens(str(meta.prompt))
            assert fleet.pinned_nowhere(meta.request_id)
        # Short prompts too: with no whole-request instance, the pair is the only path.
        assert status["disaggregated_requests"] == 12
        assert status["colocated_requests"] == 0
        assert status["decider"]["name"] == "threshold"
        assert fleet.active("p0") == fleet.active("d0") == 0

    run_virtual(main())


def test_the_pd_report_measures_both_legs() -> None:
    async def main() -> None:
        fleet = Fleet(PD_PAIR)
        async with fleet.cp as cp:
            metas = [make_metadata(f"r{i}", prompt=LONG, max_tokens=6) for i in range(6)]
            results = await asyncio.gather(*(cp.generate(m) for m in metas))
            report = cp.get_pd_metrics()
            status = cp.get_status()["pd"]
            decision = cp.get_scheduling_decision("r0")
            prefill, decode = cp.get_instance_report("p0"), cp.get_instance_report("d0")
            running = [asyncio.create_task(cp.generate(m)) for m in metas[:4]]
            await asyncio.sleep(0.001)
            active = cp.get_metrics().active_requests, cp.get_status()["running_requests"]
            live = cp.get_scheduling_decision("r0")  # running: placed on both legs' instances
            await asyncio.gather(*running)
        assert live is not None
        assert (live.prefill_instance_id, live.target_instance_id) == ("p0", "d0")
        assert live.reason == "prefill on p0, decode on d0"
        assert live.estimated_cost > live.estimated_latency_ms / 1000.0 * 2.0 / 3600.0
        assert active == (4, 4)  # each holds a slot on both instances, and counts once
        assert prefill.total_requests_processed == decode.total_requests_processed == 6
        assert prefill.metadata["prefilled_tokens"] == 6 * count_tokens(LONG)
        assert prefill.throughput_tokens_per_sec > 0 and prefill.avg_latency_ms > 0
        assert decision is not None
        assert (decision.prefill_instance_id, decision.target_instance_id) == ("p0", "d0")
        assert decision.reason == "prefill on p0, decode on d0"
        price = 2.0 / 3600.0  # both instances: one GPU at the default price
        assert decision.estimated_cost > decision.estimated_latency_ms / 1000.0 * price
        assert report is not None
        assert report.requests_routed_to_prefilling == report.requests_routed_to_decoding == 6
        assert report.requests_routed_to_hybrid == 0
        assert report.prefilling_latency_avg_ms == pytest.approx(status["avg_prefill_leg_ms"])
        assert 0 < report.prefilling_latency_avg_ms <= report.prefilling_latency_p99_ms
        assert report.inter_cluster_transfer_latency_avg_ms == pytest.approx(
            status["avg_handoff_ms"]
        )
        # the decode leg runs from the prefill's end to the request's end
        ends = [r.e2e_latency_ms - r.queue_wait_ms for r in results]
        assert 0 < report.decoding_latency_avg_ms < max(ends)
        assert report.prefilling_throughput_tokens_per_sec > 0
        assert report.prefilling_active_requests == report.decoding_active_requests == 0
        assert 0.0 <= report.kv_cache_hit_rate <= 1.0
        assert report.metadata["disaggregated_requests"] == 6

    run_virtual(main())


def test_ttft_includes_the_kv_transfer() -> None:
    async def main() -> None:
        fleet = Fleet(PD_PAIR, link_gbps=0.5)
        async with fleet.cp as cp:
            res = await cp.generate(make_metadata("r1", prompt=LONG, max_tokens=4))
            prefill_ms = cp.get_status()["pd"]["avg_prefill_leg_ms"]
        transfer_s = fleet.engines["d0"].core.transfer_time_s(count_tokens(LONG) - 1)
        assert transfer_s > 0.1
        assert res.ttft_ms is not None and prefill_ms > 0
        assert res.ttft_ms >= prefill_ms + transfer_s * 1000.0

    run_virtual(main())


def test_usage_is_right_streamed_and_not() -> None:
    async def main() -> None:
        fleet = Fleet(PD_PAIR)
        async with fleet.cp as cp:
            chunks = [c async for c in cp.stream(make_metadata("s1", prompt=LONG, max_tokens=6))]
            done = await cp.wait_for_result("s1")
            plain = await cp.generate(make_metadata("g1", prompt=LONG, max_tokens=6))
        usage = chunks[-1].usage
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (count_tokens(LONG), 6)
        for res in (done, plain):
            assert (res.prompt_tokens, res.completion_tokens) == (count_tokens(LONG), 6)
            assert res.prefill_instance_id == "p0"
        # The second request finds the prompt cached on the decode side: reported as cached.
        assert plain.cached_tokens is not None and plain.cached_tokens > 0

    run_virtual(main())


def test_cancel_between_the_legs_releases_the_prefill_kv() -> None:
    async def main() -> None:
        fleet = Fleet(PD_PAIR, link_gbps=0.01)  # seconds of transfer
        p0 = fleet.engines["p0"]
        async with fleet.cp as cp:
            rid = await cp.submit_request(make_metadata("c1", prompt=LONG, max_tokens=8))
            await asyncio.sleep(0.5)  # prefill done, the decode side still pulling
            assert p0.core.kv_usage > 0
            assert fleet.active("p0") == 0 and fleet.active("d0") == 1
            assert await cp.cancel_request(rid) is True
            res = await cp.wait_for_result(rid)
            assert res.status is RequestStatus.CANCELLED
            assert res.prefill_instance_id == "p0"
            assert fleet.pinned_nowhere(rid) and p0.core.kv_usage == 0.0
            assert fleet.active("p0") == fleet.active("d0") == 0
            # Cancelled while its prefill leg runs: that leg ends within its grace (its
            # KV is released) or is aborted; either way nothing stays pinned.
            rid = await cp.submit_request(make_metadata("c2", prompt=LONG, max_tokens=8))
            await asyncio.sleep(0.001)
            assert fleet.active("p0") == 1
            await cp.cancel_request(rid)
            res = await cp.wait_for_result(rid)
            assert res.status is RequestStatus.CANCELLED
            await asyncio.sleep(1.0)  # the leg's grace (0.25 s), then its release
            assert fleet.pinned_nowhere(rid) and p0.core.kv_usage == 0.0
            # it ended on the prefill instance (the decode one never ran it), as a request
            # that fails in its prefill leg does; the one cancelled later, on the decode one
            assert res.instance_id == "p0"
            text = cp.prometheus_metrics().decode()
            for iid in ("p0", "d0"):
                labels = f'instance_id="{iid}",model="{MODEL}",policy="fifo"'
                assert labels + ',status="cancelled"' in text

    run_virtual(main())


def test_load_is_accounted_per_phase_and_bounded_on_both_instances() -> None:
    async def main() -> None:
        fleet = Fleet(PD_PAIR, bound=3, probes=True, link_gbps=1.0)
        async with fleet.cp as cp:
            await cp.submit_request(make_metadata("one", prompt=LONG, max_tokens=200))
            await asyncio.sleep(0.001)  # dispatched: both instances carry it
            assert (fleet.active("p0"), fleet.active("d0")) == (1, 1)
            await asyncio.sleep(0.3)  # the prefill leg returned; the decode side has it
            assert (fleet.active("p0"), fleet.active("d0")) == (0, 1)
            await cp.wait_for_result("one")
            metas = [make_metadata(f"b{i}", prompt=LONG, max_tokens=10) for i in range(25)]
            results = await asyncio.gather(*(cp.generate(m) for m in metas))
        assert all(r.status is RequestStatus.COMPLETED for r in results)
        p0, d0 = fleet.probes["p0"], fleet.probes["d0"]
        assert isinstance(p0, PrefillProbe)
        assert 1 <= p0.max_prefills_in_flight <= 3
        assert 1 <= d0.max_in_flight <= 3
        assert len(p0.prefill_ids) == len(set(p0.prefill_ids)) == 26  # none ran twice
        assert all(fleet.pinned_nowhere(r.request_id) for r in results)

    run_virtual(main())


def test_the_decode_instance_learns_the_tpot_of_the_decode_batch_a_request_joined() -> None:
    """A disaggregated request's TPOT is learnt for the batch on its decode instance (the
    larger of that instance's in-flight counts at its start and at its end): x joins three
    requests decoding on d0 while p0 is idle and outlives them, so it ran in a batch of 4,
    not alone."""

    async def main() -> None:
        fleet = Fleet(PD_PAIR)
        async with fleet.cp as cp:
            for i in range(3):
                await cp.submit_request(make_metadata(f"b{i}", prompt=SHORT, max_tokens=60))
            await asyncio.sleep(0.3)  # their prefill legs are done: d0 alone carries them
            assert (fleet.active("p0"), fleet.active("d0")) == (0, 3)
            await cp.submit_request(make_metadata("x", prompt=SHORT, max_tokens=400))
            results = [await cp.wait_for_result(r) for r in ("b0", "b1", "b2", "x")]
            assert all(r.status is RequestStatus.COMPLETED for r in results)
            assert results[-1].prefill_instance_id == "p0"
            d0 = cp._registry.get("d0")
            assert d0.tpot_batch_samples[batch_bucket(1)] == 0  # x's too: not learnt alone
            assert d0.tpot_batch_samples[batch_bucket(4)] == 4

    run_virtual(main())


def test_mixed_fleet_follows_the_decider() -> None:
    async def main() -> None:
        cfg = PDSeparationConfig(
            routing_policy="threshold",
            prefilling_threshold_input_tokens=200,
            prefilling_threshold_ratio=0.0,
        )
        fleet = Fleet([("g0", Role.GENERAL), *PD_PAIR], pd_config=cfg)
        async with fleet.cp as cp:
            short = await cp.generate(make_metadata("short", prompt=SHORT, max_tokens=4))
            long = await cp.generate(make_metadata("long", prompt=LONG, max_tokens=4))
            status = cp.get_status()["pd"]
            json.dumps(cp.get_status())  # the admin API serves it as JSON
            assert cp.get_metrics().metadata["pd"]["disaggregated_requests"] == 1
        assert (short.instance_id, short.prefill_instance_id) == ("g0", None)
        assert (long.instance_id, long.prefill_instance_id) == ("d0", "p0")
        assert (status["colocated_requests"], status["disaggregated_requests"]) == (1, 1)

    run_virtual(main())


def test_general_only_fleets_never_disaggregate() -> None:
    async def main() -> None:
        fleet = Fleet([("g0", Role.GENERAL), ("g1", Role.GENERAL)], decider="always")
        async with fleet.cp as cp:
            results = [
                await cp.generate(make_metadata(f"r{i}", prompt=LONG, max_tokens=3))
                for i in range(4)
            ]
            status = cp.get_status()["pd"]
        assert all(r.prefill_instance_id is None and r.ok for r in results)
        assert status["disaggregated_requests"] == status["colocated_requests"] == 0

    run_virtual(main())


def test_prefill_failure_falls_back_to_colocated() -> None:
    async def main() -> None:
        roles = [("g0", Role.GENERAL), *PD_PAIR]
        fleet = Fleet(roles, failing_prefill=True)
        async with fleet.cp as cp:
            res = await cp.generate(make_metadata("f1", prompt=LONG, max_tokens=4))
            status = cp.get_status()["pd"]
            text = cp.prometheus_metrics().decode()
            report = cp.get_pd_metrics()
        assert report is not None  # dispatched to a pair, never reached its decode instance
        assert (report.requests_routed_to_prefilling, report.requests_routed_to_decoding) == (1, 0)
        assert report.requests_routed_to_hybrid == 1  # then retried colocated
        assert res.status is RequestStatus.COMPLETED
        assert (res.instance_id, res.prefill_instance_id, res.attempts) == ("g0", None, 2)
        assert status["colocated_fallbacks"] == 1
        assert "sage_llm_pd_fallbacks_total 1.0" in text
        assert 'sage_llm_pd_requests_total{path="disaggregated"} 1.0' in text

    run_virtual(main())


def test_prefill_failure_without_fallback_fails_with_the_prefill_error() -> None:
    async def main() -> None:
        cfg = PDSeparationConfig(routing_policy="always", fallback_to_colocated=False)
        fleet = Fleet(PD_PAIR, failing_prefill=True, pd_config=cfg, probes=True)
        async with fleet.cp as cp:
            res = await cp.generate(make_metadata("f2", prompt=LONG, max_tokens=4))
            # a refused connection ejects the instance at once, a PD leg's as a whole
            # request's (it took failure_threshold of them in a row)
            assert cp.get_status()["circuits"]["p0"] == "open"
        assert res.status is RequestStatus.FAILED
        assert res.error is not None and "prefill leg failed: connection refused" in res.error
        assert "engine p0" in res.error
        assert fleet.probes["d0"].started == 0  # the decode leg was never called
        assert (res.instance_id, res.prefill_instance_id) == ("p0", "p0")  # where it ended
        counted = [
            line
            for line in fleet.cp.prometheus_metrics().decode().splitlines()
            if line.startswith("sage_llm_requests_total{")
        ]
        assert counted == [
            'sage_llm_requests_total{instance_id="p0",model="llama-3-8b",policy="fifo",'
            'status="failed"} 1.0'
        ]
        assert fleet.active("p0") == fleet.active("d0") == 0

    run_virtual(main())


def _refuses_legs(iid: str) -> EngineRequestRejectedError:
    """What an engine without a KV connector answers a leg (engine-sim --instant's 400)."""
    return EngineRequestRejectedError(
        f"{iid}: rejected the request: does not apply kv_transfer_params (no PD legs)",
        instance_id=iid,
        status=400,
        param="kv_transfer_params",
    )


@pytest.mark.parametrize("leg", ["p0", "d0"])
@pytest.mark.parametrize("fallback", [True, False])
def test_an_engine_refusing_its_legs_own_field_is_its_failure(fallback: bool, leg: str) -> None:
    """An engine that cannot run PD legs (the prefill or the decode one) refused
    kv_transfer_params with a 400: the client got an invalid_request_error naming a field
    it never sent (and may not send), the colocated fallback (or retry) was skipped, and
    the instance never counted a failure."""

    async def main() -> None:
        cfg = PDSeparationConfig(routing_policy="always", fallback_to_colocated=fallback)
        roles = [("g0", Role.GENERAL), *PD_PAIR] if fallback else PD_PAIR  # else: no retry
        fleet = Fleet(roles, pd_config=cfg, probes=True)
        fleet.probes[leg].error = _refuses_legs(leg)  # type: ignore[attr-defined]
        async with fleet.cp as cp:
            res = await cp.generate(make_metadata("k1", prompt=LONG, max_tokens=4))
            failed_calls = cp.get_instance_metrics(leg)["failed_calls"]
            error: EngineError | None = None
            try:
                await cp.wait_for_result("k1", raise_failure=True)
            except EngineError as exc:
                error = exc
        assert failed_calls == 1
        if fallback:
            assert res.status is RequestStatus.COMPLETED and res.instance_id == "g0"
            assert error is None
        else:
            assert res.status is RequestStatus.FAILED
            assert res.error is not None and "kv_transfer_params" in res.error
            assert error is not None and error.http_status == 502
            assert not isinstance(error, InvalidRequestError)

    run_virtual(main())


@pytest.mark.parametrize("leg", ["p0", "d0"])
def test_an_engine_client_bug_in_either_leg_fails_the_request_and_frees_both_instances(
    leg: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client raising what no engine client should (a bug, not an engine error) in the
    prefill or the decode leg: the request ends FAILED with the bug named, both legs'
    slots come back, and the pair goes on serving."""

    async def main() -> None:
        fleet = Fleet(PD_PAIR, probes=True)
        fleet.probes[leg].error = RuntimeError("client bug")  # type: ignore[attr-defined]
        async with fleet.cp as cp:
            result = await cp.generate(make_metadata("b1", prompt=LONG, max_tokens=4))
            assert result.status is RequestStatus.FAILED
            assert result.error == "internal error: RuntimeError: client bug"
            with pytest.raises(EngineError, match="internal error: RuntimeError: client bug"):
                await cp.wait_for_result("b1", raise_failure=True)
            assert fleet.active("p0") == fleet.active("d0") == 0
            fleet.probes[leg].error = None  # type: ignore[attr-defined]
            after = await cp.generate(make_metadata("b2", prompt=LONG, max_tokens=4))
            assert after.status is RequestStatus.COMPLETED

    run_virtual(main())
    assert "request b1 failed inside the control plane" in caplog.text


def test_a_refusal_of_a_field_the_connector_did_not_set_stays_the_clients() -> None:
    """The vllm connector does not set bootstrap_room: a client's bad one, refused by the
    engine, is the client's 400 (counting it against the instance had let one client get
    the only prefill instance ejected)."""

    async def main() -> None:
        fleet = Fleet(PD_PAIR, probes=True)
        fleet.probes["p0"].error = EngineRequestRejectedError(  # type: ignore[attr-defined]
            "p0: rejected the request: bootstrap_room must be an integer in [0, 2^64)",
            instance_id="p0", status=400, param="bootstrap_room",
        )  # fmt: skip
        async with fleet.cp as cp:
            for k in range(4):
                res = await cp.generate(make_metadata(f"b{k}", prompt=LONG, max_tokens=4))
                assert res.status is RequestStatus.FAILED
            with pytest.raises(InvalidRequestError) as err:
                await cp.wait_for_result("b0", raise_failure=True)
            assert err.value.param == "bootstrap_room"
            assert cp.get_instance_metrics("p0")["failed_calls"] == 0
            assert cp.get_status()["circuits"]["p0"] == "closed"

    run_virtual(main())


def test_decode_failure_before_the_first_token_is_retried_on_another_pair() -> None:
    async def main() -> None:
        seen: set[str] = set()

        def first_time(rid: str) -> bool:  # the first decode leg of a request fails
            fresh = rid not in seen
            seen.add(rid)
            return fresh

        hub = KVTransferHub()
        cfg = PDSeparationConfig(routing_policy="always")
        cp = ControlPlaneManager(mode="simulated", pd_config=cfg)
        p0 = make_sim_engine(make_instance("p0", instance_type=Role.PREFILLING), kv_hub=hub)
        cp.register_instance(make_instance("p0", instance_type=Role.PREFILLING), client=p0)
        faulty: dict[str, FaultyEngine] = {}
        for n, iid in enumerate(("d0", "d1")):
            inst = make_instance(iid, port=8001 + n, instance_type=Role.DECODING)
            faulty[iid] = FaultyEngine(make_sim_engine(inst, kv_hub=hub), fail_before=first_time)
            cp.register_instance(inst, client=faulty[iid])
        async with cp:
            res = await cp.generate(make_metadata("x1", prompt=LONG, max_tokens=4))
        assert res.status is RequestStatus.COMPLETED
        assert res.attempts == 2
        failed_on = next(iid for iid, f in faulty.items() if f.failed_before == ["x1"])
        assert res.instance_id != failed_on and res.prefill_instance_id == "p0"
        assert p0.core.release_kv("x1") is False  # released after the failure, pulled after

    run_virtual(main())


def test_unservable_fleets_fail_clearly() -> None:
    async def main() -> None:
        off = Fleet(PD_PAIR, enable_pd_separation=False)
        async with off.cp as cp:
            with pytest.raises(NoHealthyInstanceError, match="PD disaggregation is disabled"):
                await cp.submit_request(make_metadata("a", prompt=LONG))
            assert cp.get_status()["pd"] == {"enabled": False}
        half = Fleet([("p0", Role.PREFILLING)])
        async with half.cp as cp:
            with pytest.raises(NoHealthyInstanceError, match="no decode-capable instance"):
                await cp.submit_request(make_metadata("b", prompt=LONG))
        # Queued requests fail with the reason when their decode side goes away.
        fleet = Fleet(PD_PAIR, bound=1)
        async with fleet.cp as cp:
            rids = [
                await cp.submit_request(make_metadata(f"q{i}", prompt=LONG, max_tokens=30))
                for i in range(3)
            ]
            await asyncio.sleep(0.001)
            cp.unregister_instance("d0")
            results = [await cp.wait_for_result(r) for r in rids]
        assert results[0].status is RequestStatus.COMPLETED
        for res in results[1:]:
            assert res.status is RequestStatus.FAILED
            assert res.error == "model 'llama-3-8b' has no decode-capable instance to pair with"

    run_virtual(main())


class HangingPrefill(PrefillProbe):
    """A prefill engine that hangs at its first prefill leg: its legs never end, and from
    then on its probes fail."""

    async def prefill(self, req: EngineRequest) -> KVHandle:
        self.prefill_ids.append(req.request_id)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def health(self) -> bool:
        return not self.prefill_ids


_Hung = TypeVar("_Hung", bound=ConcurrencyProbe)


async def _four_requests_with_one_hanging(
    roles: list[tuple[str, Role]], hung_id: str, hang: Callable[[SimEngine], _Hung]
) -> tuple[list[RequestResult], str, _Hung]:
    """Four disaggregated requests over ``roles``, ``hung_id``'s engine wrapped by
    ``hang`` (probes every 0.5 s, ejected after two failed): their results, the hung
    instance's circuit at the end, and its wrapper."""
    from sage_llm.control_plane.health import BreakerSettings, HealthSettings

    health = HealthSettings(
        interval_s=0.5, timeout_s=0.2, breaker=BreakerSettings(failure_threshold=2)
    )
    cp = ControlPlaneManager(
        mode="simulated", health=health, seed=0,
        pd_config=PDSeparationConfig(routing_policy="always"),
    )  # fmt: skip
    hub = KVTransferHub()
    hung: _Hung | None = None
    for n, (iid, role) in enumerate(roles):
        inst = make_instance(iid, port=8000 + n, instance_type=role)
        engine = make_sim_engine(inst, kv_hub=hub)
        if iid == hung_id:
            hung = hang(engine)
            cp.register_instance(inst, client=hung)
        else:
            cp.register_instance(inst, client=engine)
    assert hung is not None
    async with cp:
        metas = [make_metadata(f"r{i}", prompt=LONG, max_tokens=4) for i in range(4)]
        results = await asyncio.wait_for(asyncio.gather(*map(cp.generate, metas)), 30.0)
        circuit = cp.get_status()["circuits"][hung_id]
    return results, circuit, hung


def test_a_prefill_leg_on_an_ejected_instance_is_moved_to_another_pair() -> None:
    """p0 hangs in its prefill legs and fails its probes: once it is ejected, the legs
    stuck there are retried on p1 (nothing had reached their clients)."""

    async def main() -> None:
        roles = [("p0", Role.PREFILLING), ("p1", Role.PREFILLING), ("d0", Role.DECODING)]
        results, circuit, hung = await _four_requests_with_one_hanging(roles, "p0", HangingPrefill)
        assert circuit == "open"
        assert hung.prefill_ids  # some legs went there first
        assert all(r.status is RequestStatus.COMPLETED for r in results)
        assert all(r.prefill_instance_id == "p1" for r in results)
        assert {r.request_id for r in results if r.attempts == 2} == set(hung.prefill_ids)

    run_virtual(main())


class HangingDecode(ConcurrencyProbe):
    """A decode engine that hangs at its first decode leg (no token ever comes), and from
    then on fails its probes."""

    async def generate(self, req: EngineRequest) -> AsyncGenerator[Chunk, None]:
        self.request_ids.append(req.request_id)
        await asyncio.Event().wait()
        yield Chunk(text="unreachable")

    async def health(self) -> bool:
        return not self.request_ids


def test_a_decode_leg_on_an_ejected_instance_is_moved_to_another_pair() -> None:
    async def main() -> None:
        roles = [("p0", Role.PREFILLING), ("d0", Role.DECODING), ("d1", Role.DECODING)]
        results, circuit, hung = await _four_requests_with_one_hanging(roles, "d0", HangingDecode)
        assert circuit == "open"
        assert hung.request_ids  # some legs went there first
        assert all(r.status is RequestStatus.COMPLETED for r in results)
        assert all(r.instance_id == "d1" for r in results)
        assert {r.request_id for r in results if r.attempts == 2} == set(hung.request_ids)

    run_virtual(main())


class _Unhealthy(ConcurrencyProbe):
    """An engine whose health probes fail (its process gone, say)."""

    async def health(self) -> bool:
        return False


def test_a_pd_fleet_whose_decode_pool_is_down_refuses_new_requests_at_once() -> None:
    """The prefill instance is up, every decode instance ejected: a new request gets a 503
    with when to retry, as when every instance is down, rather than waiting in the queue;
    the models that can run a request leave it out (what ``/ready`` answers)."""

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", pd_config=PDSeparationConfig(routing_policy="always")
        )
        hub = KVTransferHub()
        for n, (iid, role) in enumerate([("p0", Role.PREFILLING), ("d0", Role.DECODING)]):
            inst = make_instance(iid, port=8000 + n, instance_type=role)
            engine = make_sim_engine(inst, kv_hub=hub)
            cp.register_instance(inst, client=_Unhealthy(engine) if iid == "d0" else engine)
        async with cp:
            await cp.check_health()  # the first probes: d0, never seen healthy, is ejected
            assert cp.servable_models() == []
            with pytest.raises(NoHealthyInstanceError) as err:
                await cp.submit_request(make_metadata("r", prompt=LONG, max_tokens=4))
            assert "no decode-capable instance of model" in err.value.message
            assert "(0 of 1)" in err.value.message
            assert err.value.retry_after_s is not None and err.value.retry_after_s > 0
            assert cp.get_status()["pending_requests"] == 0  # nothing was queued

    run_virtual(main())


def test_a_kv_release_pull_goes_through_a_decode_instance_not_draining_when_there_is_one() -> None:
    async def main() -> None:
        roles = [("p0", Role.PREFILLING), ("d0", Role.DECODING), ("d1", Role.DECODING),
                 ("d2", Role.DECODING)]  # fmt: skip
        fleet = Fleet(roles)
        async with fleet.cp as cp:
            dispatcher = cp._dispatcher
            assert dispatcher is not None
            cp.drain_instance("d1")  # the operator takes it out: no new request for it
            spare = dispatcher._spare_decode(MODEL, "d0")
            assert spare is not None and spare.instance_id == "d2"
            cp.drain_instance("d2")  # only draining ones left: better than pinned KV
            spare = dispatcher._spare_decode(MODEL, "d0")
            assert spare is not None and spare.instance_id in ("d1", "d2")

    run_virtual(main())


def test_a_failed_colocated_retry_goes_back_to_a_free_pair() -> None:
    """Its prefill leg failed (so it was retried colocated) and the colocated retry failed
    too: with no whole-request instance left to it, it runs on another pair, not queued
    for ever beside an idle fleet."""
    failed: list[str] = []  # the first prefill leg, wherever it runs, fails

    class FirstPrefillFails(FakeEngine):
        async def prefill(self, req: EngineRequest) -> KVHandle:
            if not failed:
                failed.append(self.instance_id)
                raise EngineError("HTTP 503", instance_id=self.instance_id, status=503)
            return await super().prefill(req)

    busy = EngineError("g0: HTTP 503", instance_id="g0", status=503)
    engines: dict[str, FakeEngine] = {
        "p0": FirstPrefillFails("p0"),
        "p1": FirstPrefillFails("p1"),
        "d0": FakeEngine("d0"),
        "g0": FakeEngine("g0", fail_with=busy),
    }

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", engine_factory=lambda inst: engines[inst.instance_id],
            pd_config=PDSeparationConfig(routing_policy="always"),
        )  # fmt: skip
        roles = [("p0", Role.PREFILLING), ("p1", Role.PREFILLING), ("d0", Role.DECODING)]
        for n, (iid, role) in enumerate([*roles, ("g0", Role.GENERAL)]):
            cp.register_instance(make_instance(iid, port=8000 + n, instance_type=role))
        async with cp:
            res = await cp.wait_for_result(
                await cp.submit_request(make_metadata("r1", max_tokens=4)), timeout=60.0
            )
        assert res.status is RequestStatus.COMPLETED, res.error
        other = "p1" if failed == ["p0"] else "p0"
        assert (res.prefill_instance_id, res.instance_id, res.attempts) == (other, "d0", 3)
        assert len(engines["g0"].requests) == 1  # the colocated retry, which failed

    run_virtual(main())


def test_a_prefill_leg_past_the_first_token_limit_fails_the_prefill_instance() -> None:
    """The first-token limit runs out while the prefill leg is still running: the prefill
    instance failed (it had been counted against the decode one, which was ejected for a
    slow prefill engine, and the slow one kept its place)."""

    class SlowPrefill(FakeEngine):
        async def prefill(self, req: EngineRequest) -> KVHandle:
            await asyncio.sleep(60.0)
            return await super().prefill(req)

    engines: dict[str, FakeEngine] = {"p0": SlowPrefill("p0"), "d0": FakeEngine("d0")}

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", engine_factory=lambda inst: engines[inst.instance_id],
            pd_config=PDSeparationConfig(routing_policy="always"), engine_stream="always",
            engine_timeouts=HTTPTimeouts(first_token_s=2.0), max_retries=0,
        )  # fmt: skip
        cp.register_instance(make_instance("p0", instance_type=Role.PREFILLING))
        cp.register_instance(make_instance("d0", port=8001, instance_type=Role.DECODING))
        async with cp:
            res = await cp.generate(make_metadata("slow", max_tokens=4))
            p0, d0 = cp.get_instance_metrics("p0"), cp.get_instance_metrics("d0")
        assert res.status is RequestStatus.FAILED
        assert res.error is not None and "engine p0" in res.error and "prefill leg" in res.error
        assert (p0["failed_calls"], d0["failed_calls"]) == (1, 0)

    run_virtual(main())


def test_an_sglang_prefill_leg_that_never_ends_does_not_hold_back_the_answer() -> None:
    """The decode leg's answer is whole: the request completes then, its prefill leg drained
    meanwhile (waiting for it had held the answer back twice drain_timeout_s, past the idle
    limit, which failed it); the stop aborts it."""
    engines = {"p0": FakeEngine("p0", gate_after=0), "d0": FakeEngine("d0")}

    async def main() -> None:
        cfg = PDSeparationConfig(
            routing_policy="always", connector="sglang",
            metadata={"connector_params": {"drain_timeout_s": 5.0}},
        )  # fmt: skip
        cp = ControlPlaneManager(
            mode="simulated", engine_factory=lambda inst: engines[inst.instance_id],
            pd_config=cfg, engine_stream="always", engine_timeouts=HTTPTimeouts(idle_s=2.0),
        )  # fmt: skip
        cp.register_instance(make_instance("p0", instance_type=Role.PREFILLING, engine="sglang"))
        cp.register_instance(
            make_instance("d0", port=8001, instance_type=Role.DECODING, engine="sglang")
        )
        loop = asyncio.get_running_loop()
        async with cp:
            start = loop.time()
            res = await cp.generate(make_metadata("s1", prompt=LONG, max_tokens=4))
            assert loop.time() == start
            assert engines["p0"].in_flight == 1  # its prefill leg is still being drained
        assert res.status is RequestStatus.COMPLETED, res.error
        assert (res.prompt_tokens, res.completion_tokens) == (count_tokens(LONG), 4)
        assert engines["p0"].aborted == ["s1"]

    run_virtual(main())


def _fake_pd_fleet(
    roles: list[tuple[str, Role]], connector: str = "vllm"
) -> tuple[ControlPlaneManager, dict[str, FakeEngine]]:
    engines = {iid: FakeEngine(iid) for iid, _ in roles}
    cp = ControlPlaneManager(
        mode="simulated", engine_factory=lambda inst: engines[inst.instance_id],
        pd_config=PDSeparationConfig(routing_policy="always", connector=connector),
    )  # fmt: skip
    for n, (iid, role) in enumerate(roles):
        cp.register_instance(make_instance(iid, port=8000 + n, instance_type=role))
    return cp, engines


def test_a_request_for_several_samples_runs_colocated_over_the_vllm_connector() -> None:
    """vLLM's prefill leg of an ``n`` > 1 request pins a KV copy per sample but hands the
    decode leg one: such a request runs on a whole-request instance, even where the
    decider disaggregates everything; n=1 still goes to the pair."""
    cp, engines = _fake_pd_fleet([("g0", Role.GENERAL), *PD_PAIR])

    async def main() -> tuple[RequestResult, RequestResult]:
        async with cp:
            many = await cp.generate(make_metadata("many", extra_body={"n": 2}, max_tokens=4))
            one = await cp.generate(make_metadata("one", extra_body={"n": 1}, max_tokens=4))
        return many, one

    many, one = run_virtual(main())
    assert (many.instance_id, many.prefill_instance_id) == ("g0", None), many.error
    assert one.instance_id == "d0" and one.prefill_instance_id is not None, one.error
    prefilled = [r.request_id for e in engines.values() for r in e.prefills]
    assert prefilled == ["one"]  # no prefill leg for the request of two samples
    assert [r.extra.get("n") for r in engines["g0"].requests] == [2]  # asked whole, as sent


_CHAT = [{"role": "user", "content": "Tell me about the control plane."}]


@pytest.mark.parametrize("connector", ["vllm", "sglang"])
def test_a_request_for_its_prompts_logprobs_runs_whole_where_it_can(connector: str) -> None:
    """vLLM's decode engine computes again every prompt token of a request that asks for
    its prompt's logprobs (``prompt_logprobs``, or ``echo`` with logprobs; chat's echo asks
    them unless ``top_logprobs`` is null): such requests run on a whole-request instance,
    even where the decider disaggregates everything; the others still go to the pair."""
    cp, engines = _fake_pd_fleet([("g0", Role.GENERAL), *PD_PAIR], connector)
    whole = {
        "plp": {"extra_body": {"prompt_logprobs": 1}},
        "echo-lp": {"extra_body": {"echo": True, "logprobs": 0}},
        "chat-echo": {"extra_body": {"echo": True}, "prompt": None, "messages": _CHAT},
        "chat-plp": {"extra_body": {"prompt_logprobs": 0}, "prompt": None, "messages": _CHAT},
    }
    split = {
        "echo": {"extra_body": {"echo": True}},
        "logprobs": {"extra_body": {"logprobs": 2}},
        "chat-echo-null": {"extra_body": {"echo": True, "top_logprobs": None}, "prompt": None,
                           "messages": _CHAT},
        "chat-lp": {"extra_body": {"logprobs": True, "top_logprobs": 2}, "prompt": None,
                    "messages": _CHAT},
    }  # fmt: skip

    async def main() -> dict[str, RequestResult]:
        async with cp:
            return {
                rid: await cp.generate(make_metadata(rid, max_tokens=4, **kw))  # type: ignore[arg-type]
                for rid, kw in {**whole, **split}.items()
            }

    results = run_virtual(main())
    ran = {rid: (r.prefill_instance_id is not None, r.instance_id) for rid, r in results.items()}
    assert ran == {**dict.fromkeys(whole, (False, "g0")), **dict.fromkeys(split, (True, "d0"))}
    if connector == "vllm":  # (sglang's prefill legs are generate calls too)
        assert sorted(r.request_id for r in engines["g0"].requests) == sorted(whole)
        prefilled = [r.request_id for e in engines.values() for r in e.prefills]
        assert sorted(prefilled) == sorted(split)  # no prefill leg for the others


def test_a_request_for_its_prompts_logprobs_runs_disaggregated_without_whole_instances() -> None:
    """In a fleet of prefill and decode instances only, a request for its prompt's logprobs
    runs on the pair all the same (vLLM's decode engine answers it right)."""
    cp, engines = _fake_pd_fleet(list(PD_PAIR))

    async def main() -> RequestResult:
        async with cp:
            meta = make_metadata("plp", max_tokens=4, extra_body={"prompt_logprobs": 1})
            return await cp.generate(meta)

    res = run_virtual(main())
    assert (res.prefill_instance_id, res.instance_id) == ("p0", "d0"), res.error
    assert res.status is RequestStatus.COMPLETED
    assert [r.request_id for r in engines["p0"].prefills] == ["plp"]


def test_a_request_for_several_samples_is_refused_by_a_vllm_pd_fleet_without_whole_instances() -> (
    None
):
    cp, engines = _fake_pd_fleet(list(PD_PAIR))

    async def main() -> None:
        async with cp:
            with pytest.raises(InvalidRequestError, match="cannot split a request") as info:
                await cp.submit_request(make_metadata("many", extra_body={"n": 3}))
            assert info.value.param == "n"
            assert "n=3" in str(info.value) and "'vllm'" in str(info.value)
            ok = await cp.generate(make_metadata("one", max_tokens=4))  # n=1: the pair
            assert (ok.prefill_instance_id, ok.instance_id) == ("p0", "d0"), ok.error

    run_virtual(main())
    assert [r.request_id for e in engines.values() for r in e.prefills] == ["one"]


def test_a_request_for_several_samples_waits_for_its_draining_whole_instance() -> None:
    """The only whole-request instance drains when an ``n`` > 1 request arrives over the
    vllm connector: the request is accepted (drains are undone), and runs there once the
    instance is back, never on the pair."""
    cp, engines = _fake_pd_fleet([("g0", Role.GENERAL), *PD_PAIR])

    async def main() -> RequestResult:
        async with cp:
            cp.drain_instance("g0")
            await cp.submit_request(make_metadata("many", extra_body={"n": 2}, max_tokens=4))
            await asyncio.sleep(0.5)
            assert await cp.get_request_status("many") is RequestStatus.QUEUED
            cp.drain_instance("g0", draining=False)
            return await cp.wait_for_result("many")

    res = run_virtual(main())
    assert (res.instance_id, res.prefill_instance_id) == ("g0", None), res.error
    assert [r.request_id for e in engines.values() for r in e.prefills] == []


def test_a_queued_request_for_several_samples_fails_when_its_last_whole_instance_goes() -> None:
    """An ``n`` > 1 request queued for a draining whole-request instance (the vllm
    connector cannot split it) fails with the submit's reason once that instance is
    unregistered, rather than wait for one that will not come; n=1 still runs on the
    pair."""
    cp, engines = _fake_pd_fleet([("g0", Role.GENERAL), *PD_PAIR])

    async def main() -> None:
        async with cp:
            cp.drain_instance("g0")
            meta = make_metadata("many", extra_body={"n": 2}, max_tokens=4)
            many = asyncio.create_task(cp.collect(meta))
            await asyncio.sleep(0.5)
            assert await cp.get_request_status("many") is RequestStatus.QUEUED
            cp.unregister_instance("g0")
            with pytest.raises(NoHealthyInstanceError, match="n=2 cannot run on model"):
                await asyncio.wait_for(many, 1.0)  # (a 503 over HTTP)
            assert await cp.get_request_status("many") is RequestStatus.FAILED
            ok = await cp.generate(make_metadata("one", max_tokens=4))
            assert (ok.prefill_instance_id, ok.instance_id) == ("p0", "d0"), ok.error

    run_virtual(main())
    assert engines["g0"].requests == []


@pytest.mark.parametrize("other", [False, True])
def test_a_request_for_several_samples_is_retried_only_on_another_whole_instance(
    other: bool,
) -> None:
    """Its whole-request instance fails before the first token: the ``n`` > 1 request (the
    vllm connector cannot split it) is retried on another whole-request instance, or, with
    only the pair left, fails with the engine's error rather than wait for good."""
    cp, engines = _fake_pd_fleet([("g0", Role.GENERAL), *PD_PAIR])
    g0 = engines["g0"]  # held at its first token, then refused: before any output
    g0.gate_after = g0.fail_after = 0
    g0.fail_with = EngineConnectionError("connection refused", instance_id="g0")

    async def main() -> RequestResult:
        async with cp:
            await cp.submit_request(make_metadata("many", extra_body={"n": 2}, max_tokens=4))
            await g0.gated.wait()  # on g0, the only whole-request instance yet
            if other:
                engines["g1"] = FakeEngine("g1")
                cp.register_instance(make_instance("g1", port=8009, instance_type=Role.GENERAL))
            g0.release.set()
            return await asyncio.wait_for(cp.wait_for_result("many"), 60.0)

    res = run_virtual(main())
    if other:
        assert (res.status, res.instance_id) == (RequestStatus.COMPLETED, "g1"), res.error
    else:
        assert res.status is RequestStatus.FAILED
        assert res.error == "engine g0 failed: connection refused"
    assert [r.request_id for e in engines.values() for r in e.prefills] == []


def test_a_request_for_several_samples_is_split_by_the_sglang_connector() -> None:
    cp, engines = _fake_pd_fleet(list(PD_PAIR), connector="sglang")

    async def main() -> RequestResult:
        async with cp:
            return await cp.generate(make_metadata("many", extra_body={"n": 2}, max_tokens=4))

    res = run_virtual(main())
    assert (res.prefill_instance_id, res.instance_id) == ("p0", "d0"), res.error
    for iid in ("p0", "d0"):  # both legs are the whole request, its n included
        assert [r.extra.get("n") for r in engines[iid].requests] == [2]


def _sglang_fleet(engines: dict[str, FakeEngine]) -> ControlPlaneManager:
    """g0 (GENERAL), p0, d0 over ``engines``, the sglang connector, every call streamed."""
    cp = ControlPlaneManager(
        mode="simulated", engine_factory=lambda inst: engines[inst.instance_id],
        pd_config=PDSeparationConfig(routing_policy="always", connector="sglang"),
        engine_stream="always",
    )  # fmt: skip
    for n, (iid, role) in enumerate([("g0", Role.GENERAL), *PD_PAIR]):
        cp.register_instance(make_instance(iid, port=8000 + n, instance_type=role, engine="sglang"))
    return cp


@pytest.mark.parametrize("cancel", [False, True])
def test_an_sglang_request_ending_in_its_prefill_leg_after_output_ends_on_the_decode_instance(
    cancel: bool,
) -> None:
    """SGLang runs both legs at once: the decode leg has streamed output to the client when
    the prefill leg fails (or the client cancels while it still runs). The request ran on
    the decode instance, where that output came from (it had been put on the prefill
    instance); a failure is not retried (its output is out, though a whole-request
    instance is free)."""
    reset = EngineConnectionError("connection reset", instance_id="p0", retryable=True)
    engines = {
        "g0": FakeEngine("g0"),
        "p0": FakeEngine("p0", gate_after=0, fail_with=reset, fail_after=0),
        "d0": FakeEngine("d0", gate_after=3),
    }
    cp = _sglang_fleet(engines)

    async def main() -> RequestResult:
        texts: list[str] = []

        async def consume() -> None:
            async for chunk in cp.stream(make_metadata("s1", max_tokens=8)):
                texts.append(chunk.text)

        async with cp:
            consumer = asyncio.create_task(consume())
            await engines["d0"].gated.wait()  # three tokens out, its prefill leg held
            await asyncio.sleep(0.01)  # they reach the client
            assert texts == [" w0", " w1", " w2"]
            if cancel:
                assert await cp.cancel_request("s1") is True
            else:
                engines["p0"].release.set()  # the prefill leg fails
            with pytest.raises(RequestCancelledError if cancel else EngineError):
                await asyncio.wait_for(consumer, 5.0)
            return await cp.wait_for_result("s1")

    res = run_virtual(main())
    status = RequestStatus.CANCELLED if cancel else RequestStatus.FAILED
    assert (res.status, res.attempts) == (status, 1)
    assert (res.prefill_instance_id, res.instance_id) == ("p0", "d0")
    assert engines["g0"].requests == []  # not retried colocated


def test_both_instances_carry_no_load_once_their_pd_requests_end() -> None:
    """The prefill instance gives back its queued prefill tokens, the decode instance its
    outstanding decode tokens (left there, they had made both look busy for good)."""

    async def main() -> None:
        fleet = Fleet(PD_PAIR)
        async with fleet.cp as cp:
            metas = [make_metadata(f"r{i}", prompt=LONG, max_tokens=4 + i) for i in range(4)]
            results = await asyncio.gather(*(cp.generate(m) for m in metas))
            assert all(r.status is RequestStatus.COMPLETED for r in results)
            p0, d0 = cp._registry.get("p0"), cp._registry.get("d0")
            assert (p0.queued_prefill_tokens, p0.outstanding_decode_tokens) == (0, 0)
            assert (d0.queued_prefill_tokens, d0.outstanding_decode_tokens) == (0, 0)

    run_virtual(main())


def test_the_prefill_instance_learns_its_rate_over_the_tokens_it_had_to_prefill() -> None:
    """The same prompt again is found in its prefix cache: those legs' few uncached tokens
    leave the rate learnt from the first one as it was (counted whole, the cache hits had
    made the instance look about four times faster than it is)."""

    async def main() -> None:
        fleet = Fleet(PD_PAIR)
        async with fleet.cp as cp:
            first = await cp.generate(make_metadata("r0", prompt=LONG, max_tokens=4))
            rate = cp.get_instance_metrics("p0")["est_prefill_tokens_per_s"]
            assert first.cached_tokens == 0 and rate > 0
            for i in range(1, 4):
                res = await cp.generate(make_metadata(f"r{i}", prompt=LONG, max_tokens=4))
                assert (res.cached_tokens or 0) > 0.9 * res.prompt_tokens
            assert cp.get_instance_metrics("p0")["est_prefill_tokens_per_s"] == pytest.approx(rate)

    run_virtual(main())


def test_a_decode_leg_failure_retried_on_a_general_instance_is_no_colocated_fallback() -> None:
    """Only a failed prefill leg falls back to colocated; a decode leg that fails before its
    first token is retried as any failure (here on the only other instance, a GENERAL
    one), not counted as a fallback."""

    async def main() -> None:
        seen: set[str] = set()

        def first_time(rid: str) -> bool:
            fresh = rid not in seen
            seen.add(rid)
            return fresh

        hub = KVTransferHub()
        cp = ControlPlaneManager(
            mode="simulated", pd_config=PDSeparationConfig(routing_policy="always")
        )
        for n, (iid, role) in enumerate([("g0", Role.GENERAL), *PD_PAIR]):
            inst = make_instance(iid, port=8000 + n, instance_type=role)
            engine = make_sim_engine(inst, kv_hub=hub)
            client = FaultyEngine(engine, fail_before=first_time) if iid == "d0" else engine
            cp.register_instance(inst, client=client)
        async with cp:
            res = await cp.generate(make_metadata("x1", prompt=LONG, max_tokens=4))
            status = cp.get_status()["pd"]
        assert (res.status, res.attempts) == (RequestStatus.COMPLETED, 2)
        assert (res.prefill_instance_id, res.instance_id) == ("p0", "g0")
        assert status["colocated_fallbacks"] == 0

    run_virtual(main())


def test_the_pd_report_times_each_routing_decision() -> None:
    async def main() -> None:
        fleet = Fleet(PD_PAIR)
        async with fleet.cp as cp:
            for i in range(3):
                await cp.generate(make_metadata(f"r{i}", prompt=LONG, max_tokens=4))
            report = cp.get_pd_metrics()
        assert report is not None and report.requests_routed_to_prefilling == 3
        assert report.avg_routing_decision_time_us > 0

    run_virtual(main())


def test_the_decode_legs_cost_per_token_leaves_out_the_prefill_legs_cost() -> None:
    async def main() -> None:
        fleet = Fleet(PD_PAIR)
        async with fleet.cp as cp:
            res = await cp.generate(make_metadata("r0", prompt=LONG, max_tokens=4))
            report = cp.get_pd_metrics()
        assert report is not None and res.prompt_tokens == count_tokens(LONG)
        prefill_cost = report.prefilling_cost_per_token * res.prompt_tokens
        assert 0 < prefill_cost < res.cost
        assert report.decoding_cost_per_token == pytest.approx((res.cost - prefill_cost) / 4)

    run_virtual(main())


def test_only_a_streamed_decode_leg_is_timed_as_a_hand_off() -> None:
    """A decode leg asked for its answer in one piece shows its first token only at its end:
    that is no hand-off time (it had counted the whole decode)."""

    async def main() -> None:
        fleet = Fleet(PD_PAIR, engine_stream="client")
        async with fleet.cp as cp:
            await cp.generate(make_metadata("whole", prompt=LONG, max_tokens=40))
            assert [c async for c in cp.stream(make_metadata("s", prompt=LONG, max_tokens=40))]
            report = cp.get_pd_metrics()
        assert report is not None
        assert report.metadata["decode_leg_samples"] == 2
        assert report.metadata["handoff_samples"] == 1

    run_virtual(main())


def test_a_stop_before_started_pd_tasks_first_run_frees_both_legs_slots() -> None:
    """PD requests started (each holding a prefill and a decode slot) whose tasks had not
    run yet when the control plane stopped end cancelled, and give both slots back."""

    async def main() -> None:
        fleet = Fleet(PD_PAIR)
        cp = fleet.cp
        await cp.start()
        rids = [
            await cp.submit_request(make_metadata(f"s{i}", prompt=LONG, max_tokens=4))
            for i in range(3)
        ]
        cp._require_dispatcher().dispatch_ready()
        assert fleet.active("p0") == fleet.active("d0") == 3
        await cp.stop()
        assert fleet.active("p0") == fleet.active("d0") == 0
        results = [await cp.get_result(r) for r in rids]
        assert all(r is not None and r.status is RequestStatus.CANCELLED for r in results)
        assert all(fleet.pinned_nowhere(r) for r in rids)

    run_virtual(main())


def test_the_prefill_reserve_shows_in_status_and_metrics() -> None:
    """Three HYBRID instances decoding short requests, then a long prompt that would stall
    their decodes past the adaptive decider's 25 ms gap target: one instance is held for
    prefill legs, and status and /metrics say which."""
    cfg = PDSeparationConfig(
        routing_policy="adaptive", metadata={"decider_params": {"itl_slo_s": 0.025}}
    )
    roles = [(f"h{i}", Role.HYBRID) for i in range(3)]

    async def main() -> None:
        async with Fleet(roles, pd_config=cfg).cp as cp:
            chats = [
                asyncio.create_task(
                    cp.generate(make_metadata(f"c{i}", prompt=SHORT, max_tokens=64))
                )
                for i in range(3)
            ]
            await asyncio.sleep(0.05)  # all three decoding
            # ~2,500 tokens: 52 ms beside their decodes at these engines' ~49k tokens/s
            long = await cp.generate(make_metadata("long", prompt=LONG * 4, max_tokens=4))
            status = cp.get_status()["pd"]["pairing"]
            text = cp.prometheus_metrics().decode()
            results = [await c for c in chats]
        assert all(r.status is RequestStatus.COMPLETED for r in [*results, long])
        assert status["prefill_reserve_holds"] == 1
        (held,) = status["held_for_prefill"][MODEL]
        assert f'sage_llm_instance_prefill_reserved{{instance_id="{held}"}} 1.0' in text
        others = {"h0", "h1", "h2"} - {held}
        for iid in others:
            assert f'sage_llm_instance_prefill_reserved{{instance_id="{iid}"}} 0.0' in text
        assert "sage_llm_pd_prefill_reserve_holds_total 1.0" in text

    run_virtual(main())
