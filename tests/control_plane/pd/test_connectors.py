"""PD connectors over in-process engines: the simulated engine (which speaks vLLM's PD
protocol) on virtual time, and the recording FakeEngine where a leg must fail on cue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from sage_llm import ControlPlaneManager
from sage_llm.bench.procs import counter_total, free_ports, scrape_metrics
from sage_llm.control_plane.pd.connectors import (
    PDLegError,
    PDLegs,
    SGLangConnector,
    SGLangConnectorParams,
    VLLMConnector,
    VLLMConnectorParams,
    build_connector,
    merge_usage,
)
from sage_llm.engines.base import Chunk, EngineClient, EngineRequest, KVHandle, Usage
from sage_llm.engines.http import HTTPEngineClient, make_session
from sage_llm.errors import ConfigError, EngineConnectionError, EngineError
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.engine import KVTransferHub, SimEngine, SimEngineConfig
from sage_llm.sim.server import start_engine_server
from sage_llm.tokens import count_tokens
from sage_llm.types import ExecutionInstanceType as Role
from sage_llm.types import PDSeparationConfig
from tests.engines.fake_engine import MODEL as FAKE_MODEL
from tests.engines.fake_engine import FakeEngine
from tests.engines.probes import ConcurrencyProbe
from tests.factories import make_instance

PROMPT = "the quick brown fox " * 150


def request(rid: str = "r1", max_tokens: int = 8, **kw: object) -> EngineRequest:
    return EngineRequest(rid, "llama-3-8b", prompt=PROMPT, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


class PrefillWatch:
    """Records the prefill leg's handle and signals that the leg ended."""

    def __init__(self) -> None:
        self.handles: list[KVHandle] = []
        self.done = asyncio.Event()

    def __call__(self, handle: KVHandle) -> None:
        self.handles.append(handle)
        self.done.set()


def legs(
    prefill: EngineClient,
    decode: EngineClient,
    watch: PrefillWatch | None = None,
    **inst: Any,
) -> PDLegs:
    return PDLegs(
        prefill,
        decode,
        replace(make_instance(prefill.instance_id, instance_type=Role.PREFILLING), **inst),
        make_instance(decode.instance_id, port=8001, instance_type=Role.DECODING),
        on_prefill_done=watch,
    )


def sim_pair(link_gbps: float = 50.0) -> tuple[SimEngine, SimEngine]:
    hub = KVTransferHub()
    p = SimEngine("p0", SimEngineConfig(role=Role.PREFILLING), kv_hub=hub)
    d = SimEngine("d0", SimEngineConfig(role=Role.DECODING, kv_link_gbps=link_gbps), kv_hub=hub)
    return p, d


def nothing_pinned(engine: SimEngine, rid: str) -> bool:
    return engine.core.release_kv(rid) is False and engine.core.kv_usage == 0.0


async def collect(it: AsyncIterator[Chunk]) -> list[Chunk]:
    return [c async for c in it]


# --------------------------------------------------------------------------- vLLM


def test_vllm_runs_the_legs_in_order_with_one_request_id() -> None:
    async def main() -> None:
        p, d = FakeEngine("p0"), FakeEngine("d0")
        watch = PrefillWatch()
        chunks = await collect(VLLMConnector().run(request(max_tokens=4), legs(p, d, watch)))
        assert [c.text for c in chunks] == [" w0", " w1", " w2", " w3"]
        assert [r.request_id for r in p.prefills] == ["r1"]
        assert [r.request_id for r in d.requests] == ["r1"]
        assert d.requests[0].max_tokens == 4
        params = d.requests[0].kv_transfer_params
        assert params is not None and params["do_remote_prefill"] is True
        assert params["remote_engine_id"] == "engine-p0"
        assert len(watch.handles) == 1
        assert watch.handles[0].params == params

    run_virtual(main())


def test_vllm_usage_takes_prompt_from_prefill_and_cached_from_decode() -> None:
    async def main() -> None:
        p, d = FakeEngine("p0", cached_tokens=7), FakeEngine("d0", cached_tokens=3)
        chunks = await collect(VLLMConnector().run(request(max_tokens=3), legs(p, d)))
        usage = chunks[-1].usage
        assert usage == Usage(count_tokens(PROMPT), 3, 3)
        assert all(c.usage is None for c in chunks[:-1])

    run_virtual(main())


class PromptCount(FakeEngine):
    """Says ``prompt_tokens`` as its prompt's count on either leg (the decode leg's own
    count differs from the prefill leg's: a decode engine counts what it was sent)."""

    def __init__(self, instance_id: str, prompt_tokens: int, **kw: Any) -> None:
        super().__init__(instance_id, **kw)
        self.prompt_tokens = prompt_tokens

    async def prefill(self, req: EngineRequest) -> KVHandle:
        return replace(await super().prefill(req), prompt_tokens=self.prompt_tokens)

    async def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        async for chunk in super().generate(req):
            if chunk.usage is not None:
                chunk = replace(chunk, usage=replace(chunk.usage, prompt_tokens=self.prompt_tokens))
            yield chunk


@pytest.mark.parametrize("connector", [VLLMConnector(), SGLangConnector()], ids=["vllm", "sglang"])
def test_usage_prompt_tokens_come_from_the_prefill_leg(connector: Any) -> None:
    async def main() -> None:
        p, d = PromptCount("p0", 100), PromptCount("d0", 1, cached_tokens=3)
        chunks = await asyncio.wait_for(
            collect(connector.run(request(max_tokens=3), legs(p, d))), 5.0
        )
        assert chunks[-1].usage == Usage(100, 3, 3)

    run_virtual(main())


def test_merge_usage() -> None:
    chunk = Chunk("x", usage=Usage(5, 2, 1))
    merged = merge_usage(chunk, 9)
    assert merged.usage == Usage(9, 2, 1)
    assert merge_usage(chunk, 0) is chunk
    assert merge_usage(chunk, 5) is chunk
    plain = Chunk("y")
    assert merge_usage(plain, 9) is plain


def test_vllm_prefill_failure_is_returned_and_decode_never_called() -> None:
    async def main() -> None:
        boom = EngineConnectionError("connection refused", instance_id="p0")
        p, d = FakeEngine("p0", fail_with=boom), FakeEngine("d0")
        with pytest.raises(PDLegError) as err:
            await collect(VLLMConnector().run(request(), legs(p, d)))
        assert err.value.leg == "prefill"
        assert err.value.retryable is True
        assert err.value.instance_id == "p0"
        assert "prefill leg failed: connection refused" in err.value.message
        assert d.requests == []

    run_virtual(main())


def test_vllm_end_to_end_on_simulated_engines_releases_the_prefill_kv() -> None:
    async def main() -> None:
        p, d = sim_pair()
        chunks = await collect(VLLMConnector().run(request(max_tokens=6), legs(p, d)))
        assert sum(len(c.token_ids) for c in chunks) == 6
        assert chunks[-1].finish_reason == "length"
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == count_tokens(PROMPT)
        assert nothing_pinned(p, "r1")  # the decode side pulled it (KVTransferHub)
        await p.aclose()
        await d.aclose()

    run_virtual(main())


def _whole_prompt_request() -> EngineRequest:
    """A request for its prompt's logprobs (answered whole, as the dispatcher sends it)."""
    return request(max_tokens=4, stream=False, extra={"prompt_logprobs": 1})


def test_vllm_the_kv_a_request_for_its_prompts_logprobs_left_unread_is_released() -> None:
    """vLLM's decode engine computes the prompt of a request for its prompt's logprobs
    itself (so does the simulated one): the KV its prefill leg left is released once the
    decode leg is done, in the background (the request does not wait for it)."""

    async def main() -> None:
        p, d = sim_pair()
        connector = VLLMConnector()
        chunks = await collect(connector.run(_whole_prompt_request(), legs(p, d)))
        assert sum(len(c.token_ids) for c in chunks) == 4
        await connector.wait_released()
        assert connector.releases == 1
        assert nothing_pinned(p, "r1")
        await p.aclose()
        await d.aclose()

    run_virtual(main())


def test_vllm_the_kv_left_unread_is_released_by_a_pull_without_the_prompts_logprobs() -> None:
    async def main() -> None:
        p, d = sim_pair()
        prefill, decode = ConcurrencyProbe(p), ConcurrencyProbe(d)  # no release_kv on them
        connector = VLLMConnector()
        await collect(connector.run(_whole_prompt_request(), legs(prefill, decode)))
        await connector.wait_released()
        assert decode.request_ids == ["r1", "r1-kv-release"]
        assert connector.releases == 1
        assert nothing_pinned(p, "r1")  # the pull read the KV: it asked no prompt logprobs
        await p.aclose()
        await d.aclose()

    run_virtual(main())


async def _cancel_between_legs(
    connector: VLLMConnector, prefill: EngineClient, decode: EngineClient
) -> None:
    """Start a PD request, cancel it once the prefill leg returned (the decode side is
    still pulling the KV over its slow link), and wait for the cancellation to finish."""
    watch = PrefillWatch()
    task = asyncio.ensure_future(collect(connector.run(request(), legs(prefill, decode, watch))))
    await watch.done.wait()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await connector.wait_released()  # the release goes on after the request has ended


def test_vllm_cancel_between_legs_releases_the_prefill_kv() -> None:
    async def main() -> None:
        p, d = sim_pair(link_gbps=0.01)  # the transfer takes seconds
        connector = VLLMConnector()
        watch = PrefillWatch()
        task = asyncio.ensure_future(collect(connector.run(request(), legs(p, d, watch))))
        await watch.done.wait()
        await asyncio.sleep(0.01)
        assert p.core.kv_usage > 0  # pinned for the decode side
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await connector.wait_released()
        assert nothing_pinned(p, "r1")
        assert connector.releases == 1
        assert d.core.num_running == 0 and d.core.num_waiting == 0
        await p.aclose()
        await d.aclose()

    run_virtual(main())


class SlowAnswer:
    """A prefill client whose leg ends on the engine (its KV pinned) and whose answer then
    takes until ``arrived`` is set to reach the connector."""

    def __init__(self, engine: SimEngine) -> None:
        self.engine = engine
        self.instance_id = engine.instance_id
        self.arrived = asyncio.Event()
        self.leg_ended = asyncio.Event()

    async def prefill(self, req: EngineRequest) -> KVHandle:
        handle = await self.engine.prefill(req)
        self.leg_ended.set()
        await self.arrived.wait()
        return handle

    def release_kv(self, request_id: str) -> bool:
        return self.engine.release_kv(request_id)


def test_vllm_cancelled_as_its_prefill_leg_ends_releases_the_kv_pinned_for_it() -> None:
    """The request is cancelled after the engine ended the leg, before its answer came:
    closing the connection would not free that KV; the leg gets its grace to answer, and
    its KV is released."""

    async def main() -> None:
        p, d = sim_pair()
        prefill = SlowAnswer(p)
        connector = VLLMConnector()
        pair = legs(prefill, d)  # type: ignore[arg-type]  # (no generate: never a decode leg)
        task = asyncio.ensure_future(collect(connector.run(request(), pair)))
        await prefill.leg_ended.wait()
        assert p.core.kv_usage > 0  # pinned for a decode side
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        prefill.arrived.set()  # the answer comes within the grace
        await connector.wait_released()
        assert nothing_pinned(p, "r1")
        assert connector.releases == 1
        assert d.core.num_running == 0 and d.core.num_waiting == 0  # no decode leg ran
        await p.aclose()
        await d.aclose()

    run_virtual(main())


def test_vllm_a_prefill_leg_not_ended_in_its_grace_is_aborted() -> None:
    async def main() -> None:
        p, d = sim_pair()
        prefill = SlowAnswer(p)
        connector = VLLMConnector(VLLMConnectorParams(cancel_grace_s=0.5))
        pair = legs(prefill, d)  # type: ignore[arg-type]  # (no generate: never a decode leg)
        task = asyncio.ensure_future(collect(connector.run(request(), pair)))
        await prefill.leg_ended.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        started = asyncio.get_running_loop().time()
        await connector.wait_released()  # the answer never comes: aborted at the grace
        assert asyncio.get_running_loop().time() - started == pytest.approx(0.5, abs=0.01)
        assert connector.releases == 0 and connector.release_failures == 0
        await p.aclose()
        await d.aclose()

    run_virtual(main())


class HeldPrefill:
    """A prefill client whose legs each answer when their gate (``gates[k]`` for the k-th
    leg) is set; it records its releases."""

    instance_id = "p0"

    def __init__(self) -> None:
        self.gates: list[asyncio.Event] = []
        self.released: list[str] = []

    async def prefill(self, req: EngineRequest) -> KVHandle:
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        params = {"do_remote_prefill": True, "remote_request_id": req.request_id}
        return KVHandle("p0", params, prompt_tokens=3)

    def release_kv(self, request_id: str) -> bool:
        self.released.append(request_id)
        return True


def test_vllm_a_cancelled_leg_releases_nothing_once_its_request_runs_there_again() -> None:
    """The request was cancelled during its leg and sent again (moved to another pair)
    to the same prefill instance under its id: the old leg's answer, coming in its grace,
    must not release the KV that id holds for a later leg, also after one later leg ended
    and another began."""

    async def main() -> None:
        prefill, decode = HeldPrefill(), FakeEngine("d0")
        connector = VLLMConnector()
        pair = legs(prefill, decode)  # type: ignore[arg-type]  # (no generate: never a decode leg)

        def run() -> asyncio.Future[list[Chunk]]:
            return asyncio.ensure_future(collect(connector.run(request(max_tokens=2), pair)))

        first = run()
        await asyncio.sleep(0.001)  # its leg has begun
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = run()
        await asyncio.sleep(0.001)
        prefill.gates[1].set()
        assert [c.text for c in await second] == [" w0", " w1"]
        third = run()
        await asyncio.sleep(0.001)
        assert len(prefill.gates) == 3
        prefill.gates[0].set()  # the first leg answers within its grace
        await asyncio.sleep(0.01)
        assert prefill.released == []  # the third leg's KV is its own
        prefill.gates[2].set()
        assert [c.text for c in await third] == [" w0", " w1"]
        await connector.wait_released()
        assert prefill.released == []
        assert connector._legs == {}  # nothing kept per request

    run_virtual(main())


def test_vllm_releases_by_pulling_when_the_prefill_client_cannot_release() -> None:
    async def main() -> None:
        p, d = sim_pair(link_gbps=1.0)
        prefill, decode = ConcurrencyProbe(p), ConcurrencyProbe(d)  # no release_kv on them
        connector = VLLMConnector()
        await _cancel_between_legs(connector, prefill, decode)
        assert decode.request_ids == ["r1", "r1-kv-release"]
        assert nothing_pinned(p, "r1")
        await p.aclose()
        await d.aclose()

    run_virtual(main())


def test_vllm_a_release_names_the_prefill_engines_own_request_id() -> None:
    """The prefill engine keeps the KV under its own request id (``remote_request_id``,
    vLLM's ``cmpl-…`` one), not the control plane's."""
    released: list[str] = []

    class Releasing(FakeEngine):
        def release_kv(self, request_id: str) -> bool:
            released.append(request_id)
            return True

    async def main() -> None:
        p, d = Releasing("p0"), FakeEngine("d0")
        handle = await p.prefill(request())
        handle = replace(handle, params={**handle.params, "remote_request_id": "cmpl-r1-0-ab"})
        assert await VLLMConnector().release(request(), handle, legs(p, d)) is True
        assert released == ["cmpl-r1-0-ab"]

    run_virtual(main())


def test_vllm_without_release_by_pull_the_kv_waits_for_the_abort_timeout() -> None:
    async def main() -> None:
        p, d = sim_pair(link_gbps=1.0)
        connector = VLLMConnector(VLLMConnectorParams(release_by_pull=False))
        await _cancel_between_legs(connector, ConcurrencyProbe(p), ConcurrencyProbe(d))
        assert p.core.kv_usage > 0
        assert connector.releases == 0
        assert p.release_kv("r1") is True
        await p.aclose()
        await d.aclose()

    run_virtual(main())


def test_vllm_decode_failure_names_the_decode_leg_and_releases_the_kv() -> None:
    async def main() -> None:
        p, _ = sim_pair()
        d = FakeEngine("d0", fail_with=EngineError("HTTP 503", instance_id="d0", status=503))
        with pytest.raises(PDLegError) as err:
            await collect(VLLMConnector().run(request(), legs(p, d)))
        assert err.value.leg == "decode"
        assert err.value.status == 503
        assert nothing_pinned(p, "r1")
        await p.aclose()

    run_virtual(main())


def test_vllm_after_a_decode_failure_the_kv_is_pulled_through_a_spare_decode_instance() -> None:
    """The failed decode instance would fail the pull too (the prefill side's KV stayed
    pinned until its abort timeout): the pull goes through another decode instance."""

    async def main() -> None:
        hub = KVTransferHub()
        p = SimEngine("p0", SimEngineConfig(role=Role.PREFILLING), kv_hub=hub)
        d1 = SimEngine("d1", SimEngineConfig(role=Role.DECODING), kv_hub=hub)
        prefill, spare = ConcurrencyProbe(p), ConcurrencyProbe(d1)  # no release_kv
        broken = FakeEngine("d0", fail_with=EngineError("HTTP 500", instance_id="d0", status=500))
        connector = VLLMConnector()
        two = replace(legs(prefill, broken), spare_decode=lambda: spare)
        with pytest.raises(PDLegError):
            await collect(connector.run(request(), two))
        assert spare.request_ids == ["r1-kv-release"]
        assert nothing_pinned(p, "r1")
        assert (connector.releases, connector.release_failures) == (1, 0)
        # no spare: the failure is counted (and the KV waits for the abort timeout)
        alone = VLLMConnector()
        with pytest.raises(PDLegError):
            await collect(alone.run(request("r2"), legs(ConcurrencyProbe(p), broken)))
        assert (alone.releases, alone.describe()["kv_release_failures"]) == (0, 1)
        await p.aclose()
        await d1.aclose()

    run_virtual(main())


def test_vllm_a_release_after_a_decode_failure_outlives_the_requests_cancellation() -> None:
    """The decode leg failed and the release began; the request is then cancelled (moved
    off its ejected decode instance): the release goes on (it had been cut short, and the
    KV stayed pinned until the engine's abort timeout)."""

    async def main() -> None:
        hub = KVTransferHub()
        p = SimEngine("p0", SimEngineConfig(role=Role.PREFILLING), kv_hub=hub)
        d1 = SimEngine("d1", SimEngineConfig(role=Role.DECODING), kv_hub=hub)
        spare = ConcurrencyProbe(d1)
        broken = FakeEngine("d0", fail_with=EngineError("HTTP 500", instance_id="d0", status=500))
        connector = VLLMConnector()
        two = replace(legs(ConcurrencyProbe(p), broken), spare_decode=lambda: spare)
        task = asyncio.ensure_future(collect(connector.run(request(), two)))
        while not spare.request_ids:  # noqa: ASYNC110 - the release's pull has begun
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await connector.wait_released()
        assert spare.request_ids == ["r1-kv-release"]
        assert nothing_pinned(p, "r1")
        assert (connector.releases, connector.release_failures) == (1, 0)
        await p.aclose()
        await d1.aclose()

    run_virtual(main())


def test_vllm_a_leg_cancelled_off_a_down_decode_instance_pulls_through_a_spare() -> None:
    """Moved off an ejected (hung) instance, the leg is cancelled, not failed: the pull
    must not go through that instance (it waited the whole release_timeout_s there, holding
    the request's retry, and the KV stayed pinned)."""

    async def main() -> None:
        hub = KVTransferHub()
        p = SimEngine("p0", SimEngineConfig(role=Role.PREFILLING), kv_hub=hub)
        d1 = SimEngine("d1", SimEngineConfig(role=Role.DECODING), kv_hub=hub)
        hung = FakeEngine("d0", gate_after=0)  # never answers
        spare = ConcurrencyProbe(d1)
        connector = VLLMConnector()
        watch = PrefillWatch()
        two = replace(
            legs(ConcurrencyProbe(p), hung, watch),
            spare_decode=lambda: spare,
            decode_down=lambda: True,  # ejected
        )
        task = asyncio.ensure_future(collect(connector.run(request(), two)))
        await hung.gated.wait()
        started = asyncio.get_running_loop().time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await connector.wait_released()
        assert asyncio.get_running_loop().time() - started < 1.0
        assert [r.request_id for r in hung.requests] == ["r1"]  # no pull through it
        assert spare.request_ids == ["r1-kv-release"]
        assert nothing_pinned(p, "r1")
        assert (connector.releases, connector.release_failures) == (1, 0)
        await p.aclose()
        await d1.aclose()

    run_virtual(main())


def test_vllm_a_release_that_times_out_says_so(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        p, _ = sim_pair()
        hung = FakeEngine("d0", gate_after=0)
        connector = VLLMConnector(VLLMConnectorParams(release_timeout_s=2.0))
        watch = PrefillWatch()
        task = asyncio.ensure_future(
            collect(connector.run(request(), legs(ConcurrencyProbe(p), hung, watch)))
        )
        await hung.gated.wait()
        loop = asyncio.get_running_loop()
        started = loop.time()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the request ends at once (a deadline's 504 is not held by the release) ...
        assert loop.time() - started < 0.01 and connector.release_failures == 0
        await connector.wait_released()  # ... which goes on, bounded by release_timeout_s
        assert loop.time() - started == pytest.approx(2.0, abs=0.01)
        assert connector.release_failures == 1
        await p.aclose()

    run_virtual(main())
    assert "no answer within release_timeout_s (2 s)" in caplog.text


def test_vllm_a_release_cancelled_midway_is_counted_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The KV stays pinned: that is a failed release, not a silent one."""

    async def main() -> None:
        p, _ = sim_pair()
        hung = FakeEngine("d0", gate_after=0)
        connector = VLLMConnector()
        releasing = asyncio.ensure_future(
            connector.release(request(), KVHandle("p0", {}), legs(ConcurrencyProbe(p), hung))
        )
        await hung.gated.wait()
        releasing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await releasing
        assert (connector.releases, connector.release_failures) == (0, 1)
        await p.aclose()

    run_virtual(main())
    assert "the release was cancelled before it ended" in caplog.text


class BuggyDecode:
    """A decode client with a bug: every stream it opens raises what no engine client
    should (not a sage-llm error)."""

    def __init__(self, instance_id: str = "d0") -> None:
        self.instance_id = instance_id
        self.request_ids: list[str] = []

    async def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        self.request_ids.append(req.request_id)
        if req.request_id:  # always
            raise RuntimeError("client bug")
        yield Chunk("")


def test_vllm_a_decode_clients_bug_releases_the_kv_through_a_spare_decode_instance(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the decode leg's client fails the request; the KV the prefill side holds
    is still released (a bug in a plugin must not leave resources held): the pull goes
    through a spare decode instance, and without one the failed release is counted and
    said, naming the bug."""

    async def main() -> None:
        hub = KVTransferHub()
        p = SimEngine("p0", SimEngineConfig(role=Role.PREFILLING), kv_hub=hub)
        d1 = SimEngine("d1", SimEngineConfig(role=Role.DECODING), kv_hub=hub)
        prefill, spare, buggy = ConcurrencyProbe(p), ConcurrencyProbe(d1), BuggyDecode()
        connector = VLLMConnector()
        two = replace(legs(prefill, buggy), spare_decode=lambda: spare)  # type: ignore[arg-type]
        with pytest.raises(RuntimeError, match="client bug"):
            await collect(connector.run(request(), two))
        assert buggy.request_ids == ["r1"]  # the pull did not go through it again
        assert spare.request_ids == ["r1-kv-release"]
        assert nothing_pinned(p, "r1")
        assert (connector.releases, connector.release_failures) == (1, 0)
        # no spare: the release fails through the same client, counted and said
        alone = VLLMConnector()
        with pytest.raises(RuntimeError, match="client bug"):
            await collect(alone.run(request("r2"), legs(ConcurrencyProbe(p), buggy)))  # type: ignore[arg-type]
        assert (alone.releases, alone.release_failures) == (0, 1)
        await p.aclose()
        await d1.aclose()

    run_virtual(main())
    assert "request r2: could not release KV on p0" in caplog.text
    assert "RuntimeError: client bug" in caplog.text


def test_vllm_a_prefill_clients_bug_in_its_release_is_a_failed_release(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A prefill client whose release_kv raises a bug: the release is counted as failed
    and said, not raised at the request (whose answer is out, or whose failure stands)."""

    class BuggyRelease(ConcurrencyProbe):
        def release_kv(self, request_id: str) -> bool:
            raise KeyError(request_id)

    async def main() -> None:
        p, d = sim_pair()
        connector = VLLMConnector()
        prefill = BuggyRelease(p)
        released = await connector.release(request(), KVHandle("p0", {}), legs(prefill, d))
        assert released is False
        assert (connector.releases, connector.release_failures) == (0, 1)
        await p.aclose()
        await d.aclose()

    run_virtual(main())
    assert "request r1: could not release KV on p0" in caplog.text
    assert "KeyError: 'r1'" in caplog.text


def test_vllm_an_awaitable_release_kv_is_awaited() -> None:
    """A prefill client whose release_kv is a coroutine: its answer, not the coroutine,
    says whether the KV was released."""

    class AsyncRelease(ConcurrencyProbe):
        def __init__(self, inner: EngineClient, answer: bool) -> None:
            super().__init__(inner)
            self.answer = answer
            self.released: list[str] = []

        async def release_kv(self, request_id: str) -> bool:
            await asyncio.sleep(0)
            self.released.append(request_id)
            return self.answer

    async def main() -> None:
        p, d = sim_pair()
        connector = VLLMConnector()
        handle = KVHandle("p0", {"remote_request_id": "cmpl-r1"})
        done = AsyncRelease(p, True)
        assert await connector.release(request(), handle, legs(done, d)) is True
        assert done.released == ["cmpl-r1"] and connector.releases == 1
        gone = AsyncRelease(p, False)  # nothing held under that id any more
        assert await connector.release(request(), handle, legs(gone, d)) is False
        assert (connector.releases, connector.release_failures) == (1, 0)
        await p.aclose()
        await d.aclose()

    run_virtual(main())


# --------------------------------------------------------------------------- SGLang


def test_sglang_sends_one_body_with_bootstrap_fields_to_both_legs() -> None:
    async def main() -> None:
        p, d = FakeEngine("p0"), FakeEngine("d0")
        connector = SGLangConnector(seed=7)
        two = legs(p, d, host="10.0.0.5", metadata={"bootstrap_port": 9000})
        chunks = await collect(connector.run(request(max_tokens=3), two))
        assert len(chunks) == 3
        body_p, body_d = p.requests[0], d.requests[0]
        assert body_p == body_d
        assert body_p.extra["bootstrap_host"] == "10.0.0.5"
        assert body_p.extra["bootstrap_port"] == 9000
        room = body_p.extra["bootstrap_room"]
        assert isinstance(room, int) and 0 <= room <= 2**63 - 1
        assert p.finished == ["r1"] and d.finished == ["r1"]
        again = SGLangConnector(seed=7).bootstrap(two.prefill_instance)
        assert again["bootstrap_room"] == room
        assert connector.bootstrap(two.prefill_instance)["bootstrap_room"] != room
        default = SGLangConnector().bootstrap(make_instance("p9"))
        assert default["bootstrap_port"] == 8998

    run_virtual(main())


def test_sglang_runs_the_legs_concurrently_and_drains_the_prefill() -> None:
    async def main() -> None:
        p, d = FakeEngine("p0", gate_after=0, cached_tokens=5), FakeEngine("d0", cached_tokens=2)
        watch = PrefillWatch()
        it = SGLangConnector().run(request(max_tokens=3), legs(p, d, watch))
        first = await anext(it)
        assert first.text == " w0"
        assert p.in_flight == 1 and p.gated.is_set()  # the prefill leg is still open
        assert not watch.done.is_set()
        p.release.set()
        rest = [c async for c in it]
        assert rest[-1].usage == Usage(count_tokens(PROMPT), 3, 2)
        assert p.finished == ["r1"]
        assert watch.handles[0].prompt_tokens == count_tokens(PROMPT)

    run_virtual(main())


def test_sglang_a_prefill_leg_that_never_ends_does_not_hold_back_the_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The decode leg ended while the prefill leg's response went on: the last chunk, with
    the decode leg's own usage, and the end go out at once (they had waited twice
    drain_timeout_s); the prefill leg is drained meanwhile and aborted drain_timeout_s
    later, once, saying why."""

    async def main() -> None:
        p, d = FakeEngine("p0", gate_after=0), FakeEngine("d0", cached_tokens=2)
        watch = PrefillWatch()
        connector = SGLangConnector(SGLangConnectorParams(drain_timeout_s=5.0))
        loop = asyncio.get_running_loop()
        start = loop.time()
        chunks = await collect(connector.run(request(max_tokens=3), legs(p, d, watch)))
        assert loop.time() == start  # nothing waited for the prefill leg
        assert chunks[-1].usage == Usage(count_tokens(PROMPT), 3, 2)
        assert d.finished == ["r1"]
        assert p.in_flight == 1 and p.aborted == []  # drained, not aborted yet
        await p.aborted_event.wait()
        assert loop.time() - start == pytest.approx(5.0)
        assert p.aborted == ["r1"] and not watch.done.is_set()
        await connector.wait_released()

    with caplog.at_level("WARNING", logger="sage_llm.pd"):
        run_virtual(main())
    [record] = [r for r in caplog.records if r.name == "sage_llm.pd"]
    assert record.getMessage() == (
        "request r1: prefill leg on p0 did not end cleanly after its decode leg: "
        "no end within drain_timeout_s (5 s); aborted"
    )


def test_sglang_a_prefill_leg_failing_after_its_answer_went_out_is_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The decode leg ended (the answer is out, whole) while the prefill leg went on; that
    leg then fails: the request stays answered, and the failure is logged, named."""

    async def main() -> None:
        err = EngineError("HTTP 500 from p0", instance_id="p0", status=500)
        p = FakeEngine("p0", gate_after=0, fail_with=err, fail_after=0)
        d = FakeEngine("d0")
        connector = SGLangConnector()
        chunks = await collect(connector.run(request(max_tokens=3), legs(p, d)))
        assert [c.text for c in chunks] == [" w0", " w1", " w2"]
        assert chunks[-1].finish_reason == "length"
        p.release.set()
        await p.aborted_event.wait()  # the prefill leg failed
        await connector.wait_released()
        assert p.aborted == ["r1"] and p.in_flight == 0

    with caplog.at_level("WARNING", logger="sage_llm.pd"):
        run_virtual(main())
    [record] = [r for r in caplog.records if r.name == "sage_llm.pd"]
    assert record.getMessage() == (
        "request r1: prefill leg on p0 did not end cleanly after its decode leg: "
        "prefill leg failed: HTTP 500 from p0"
    )


def test_sglang_stop_aborts_the_prefill_legs_still_draining() -> None:
    async def main() -> None:
        p, d = FakeEngine("p0", gate_after=0), FakeEngine("d0")
        connector = SGLangConnector()
        await collect(connector.run(request(max_tokens=3), legs(p, d)))
        assert p.in_flight == 1
        loop = asyncio.get_running_loop()
        start = loop.time()
        await connector.wait_released()
        assert loop.time() == start and p.aborted == ["r1"]

    run_virtual(main())


def test_sglang_prefill_failure_cancels_the_decode_leg() -> None:
    async def main() -> None:
        p = FakeEngine("p0", fail_with=EngineError("boom", instance_id="p0", status=500))
        d = FakeEngine("d0", gate_after=1)
        with pytest.raises(PDLegError) as err:
            await collect(SGLangConnector().run(request(), legs(p, d)))
        assert err.value.leg == "prefill"
        assert d.aborted == ["r1"]

    run_virtual(main())


def test_sglang_decode_failure_aborts_the_prefill_leg() -> None:
    async def main() -> None:
        p = FakeEngine("p0", gate_after=0)
        d = FakeEngine("d0", fail_with=EngineConnectionError("reset", instance_id="d0"))
        with pytest.raises(PDLegError) as err:  # (not aborted, the prefill leg never ends)
            await asyncio.wait_for(collect(SGLangConnector().run(request(), legs(p, d))), 5.0)
        assert err.value.leg == "decode"
        assert p.aborted == ["r1"]

    run_virtual(main())


def test_sglang_cancellation_aborts_both_legs() -> None:
    async def main() -> None:
        p, d = FakeEngine("p0", gate_after=0), FakeEngine("d0", gate_after=1)
        task = asyncio.ensure_future(collect(SGLangConnector().run(request(), legs(p, d))))
        await d.gated.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(5.0):  # (not aborted, the prefill leg never ends)
                await task
        assert p.aborted == ["r1"] and d.aborted == ["r1"]

    run_virtual(main())


async def test_sglang_bootstrap_fields_go_over_http() -> None:
    p, d = FakeEngine("p0"), FakeEngine("d0")
    runners = []
    clients: list[HTTPEngineClient] = []
    session = make_session()
    try:
        for engine in (p, d):
            runner, port = await start_engine_server(engine, model_name=FAKE_MODEL)
            runners.append(runner)
            inst = make_instance(engine.instance_id, port=port, model_name=FAKE_MODEL)
            clients.append(HTTPEngineClient(inst, session, dialect="sglang"))
        req = EngineRequest("r1", FAKE_MODEL, prompt="hi there", max_tokens=2)
        two = PDLegs(clients[0], clients[1], clients[0].instance, clients[1].instance)
        chunks = await collect(SGLangConnector(seed=1).run(req, two))
        assert "".join(c.text for c in chunks) == " w0 w1"
        for engine in (p, d):
            extra = engine.requests[0].extra
            assert extra["bootstrap_host"] == "127.0.0.1"
            assert extra["bootstrap_port"] == 8998
            assert isinstance(extra["bootstrap_room"], int)
        assert p.requests[0].extra["bootstrap_room"] == d.requests[0].extra["bootstrap_room"]
    finally:
        await session.close()
        for runner in runners:
            await runner.cleanup()


SIM_MODEL = "llama-3-8b"


async def test_sglang_connector_disaggregates_over_engine_sim_servers() -> None:
    """The SGLang connector against engine-sim in PD roles (which serves SGLang's bootstrap
    on its HTTP port): one token on the prefill server, the output on the decode server."""
    p_port, d_port = free_ports(2)
    prefill = SimEngine("p0", SimEngineConfig(speed=100.0, role=Role.PREFILLING, kv_port=p_port))
    decode = SimEngine("d0", SimEngineConfig(speed=100.0, role=Role.DECODING, kv_port=d_port))
    runners = [
        (await start_engine_server(prefill, model_name=SIM_MODEL, port=p_port))[0],
        (await start_engine_server(decode, model_name=SIM_MODEL, port=d_port))[0],
    ]
    session = make_session()
    try:
        p_inst = make_instance("p0", port=p_port, model_name=SIM_MODEL,
                               instance_type=Role.PREFILLING,
                               metadata={"bootstrap_port": p_port})  # fmt: skip
        d_inst = make_instance("d0", port=d_port, model_name=SIM_MODEL, instance_type=Role.DECODING)
        pc = HTTPEngineClient(p_inst, session, dialect="sglang")
        dc = HTTPEngineClient(d_inst, session, dialect="sglang")
        req = EngineRequest("r1", SIM_MODEL, prompt=" ".join(["word"] * 400), max_tokens=5)
        chunks = await collect(SGLangConnector(seed=1).run(req, PDLegs(pc, dc, p_inst, d_inst)))
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 5
        generated = [
            counter_total(
                await scrape_metrics(f"http://127.0.0.1:{port}"),
                "vllm:generation_tokens_total",
            )
            for port in (p_port, d_port)
        ]
        assert generated == [1, 5]  # the prefill server ran only the prefill leg
    finally:
        await session.close()
        for engine in (prefill, decode):
            await engine.aclose()
        for runner in runners:
            await runner.cleanup()


def test_build_connector() -> None:
    assert isinstance(build_connector("vLLM"), VLLMConnector)
    sg = build_connector("sglang", {"bootstrap_port": 9100}, seed=1)
    assert isinstance(sg, SGLangConnector) and sg.params == SGLangConnectorParams(9100)
    # what get_status()["pd"]["connector"] shows
    assert sg.describe() == {"name": "sglang", "bootstrap_port": 9100, "drain_timeout_s": 30.0}
    with pytest.raises(ConfigError, match="unknown PD connector"):
        build_connector("mooncake")
    with pytest.raises(ConfigError, match="unknown parameter"):
        build_connector("vllm", {"timeout": 3})
    with pytest.raises(ConfigError):
        build_connector("sglang", {"bootstrap_port": 0})


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.0, -1.0])
@pytest.mark.parametrize(
    ("params", "key"),
    [
        (VLLMConnectorParams, "release_timeout_s"),
        (VLLMConnectorParams, "cancel_grace_s"),
        (SGLangConnectorParams, "drain_timeout_s"),
    ],
)
def test_connector_timeouts_must_be_finite_and_positive(
    params: type[VLLMConnectorParams | SGLangConnectorParams], key: str, value: float
) -> None:
    fields: dict[str, Any] = {key: value}
    with pytest.raises(ConfigError, match="must be a finite number > 0") as err:
        params(**fields)
    assert err.value.key == key


def test_an_unknown_connector_in_code_is_said_at_its_own_key() -> None:
    """It had been said at pd_config.metadata.connector_params.connector."""
    with pytest.raises(ConfigError) as err:
        ControlPlaneManager(pd_config=PDSeparationConfig(connector="nixl"))
    assert err.value.key == "pd_config.connector"
    with pytest.raises(ConfigError) as err:
        ControlPlaneManager(
            pd_config=PDSeparationConfig(metadata={"connector_params": {"timeout": 3}})
        )
    assert err.value.key == "pd_config.metadata.connector_params.timeout"
    with pytest.raises(ConfigError) as err:  # a stray parameter named connector: its own
        ControlPlaneManager(
            pd_config=PDSeparationConfig(metadata={"connector_params": {"connector": "vllm"}})
        )
    assert err.value.key == "pd_config.metadata.connector_params.connector"


def test_vllm_release_pull_asks_for_one_token_whatever_the_request_left_to_the_engine() -> None:
    async def main() -> None:
        decode = FakeEngine("d0")
        extra = {"n": 2, "min_tokens": 9, "prompt_logprobs": 1, "echo": True, "seed": 4}
        req = request(max_tokens=128, extra=extra).with_changes(send_max_tokens=False)
        handle = KVHandle("p0", {"remote_request_id": "r1"}, 10, 0, Chunk(text=" w0"))
        assert await VLLMConnector._pull(req, handle, decode)
        [pull] = decode.requests
        assert (pull.request_id, pull.max_tokens, pull.send_max_tokens) == (
            "r1-kv-release",
            1,
            True,
        )
        assert pull.extra == {"seed": 4}  # one token, one sample, no prompt logprobs

    run_virtual(main())
