"""Fault plans (parsing, schedules) and FaultyEngineClient over a real SimEngine, on
virtual time."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from sage_llm.engines.base import Chunk, EngineRequest
from sage_llm.errors import ConfigError, EngineConnectionError, EngineError, EngineStreamError
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.factory import make_sim_engine
from sage_llm.sim.faults import Fault, FaultKind, FaultPlan, FaultyEngineClient, InjectedCrash
from sage_llm.sim.server_metrics import ReportsQueueTime
from tests.engines.fake_engine import FakeEngine
from tests.factories import make_instance


def test_parse_spec() -> None:
    plan = FaultPlan.parse("crash@5; slow=3@1+2; error=500@p0.25; truncate; seed=4")
    assert plan.seed == 4
    crash, slow, error, trunc = plan.faults
    assert (crash.kind, crash.start_s, crash.duration_s) == (FaultKind.CRASH, 5.0, None)
    assert (slow.kind, slow.arg, slow.start_s, slow.duration_s) == (FaultKind.SLOW, 3.0, 1.0, 2.0)
    assert (error.kind, error.arg, error.probability) == (FaultKind.ERROR, 500.0, 0.25)
    assert trunc.scheduled and trunc.active_at(0.0)
    assert slow.active_at(2.5) and not slow.active_at(3.0) and not slow.active_at(0.5)
    assert plan.scheduled_at(6.0) == [crash, trunc]


@pytest.mark.parametrize(
    ("spec", "match"),
    [("explode", "unknown fault"), ("error=200", "bad fault"),
     ("crash@x", "bad fault 'crash@x': the time after '@' must be a number, got 'x'"),
     ("hang=abc", "the value after '=' must be a number, got 'abc'"),
     ("error=503@pq", "the probability after '@p' must be a number, got 'q'"),
     ("slow=2@1+x", "the duration after '\\+' must be a number, got 'x'"),
     ("seed=q", "bad fault seed"), ("slow=0.5", "bad fault"),
     ("hang=-1", "hang takes a whole number of chunks >= 0"),
     ("truncate=2.5", "truncate takes a whole number"), ("error=503.5", "HTTP error status"),
     ("crash=5", "crash takes no value"), ("slow=inf", "must be finite"),
     ("crash@nan", "must be finite"), ("crash@inf", "must be finite"),
     ("seed=-1", "must be >= 0"), ("hang@", "a time after '@' is missing"),
     ("crash@ ", "a time after '@' is missing"), ("error=@p1", "a value after '=' is missing"),
     ("hang@5+", "a duration after"), ("hang@ +3", "a start time before"),
     ("error@p", "a probability after '@p' is missing"),
     ("error=600", "HTTP error status"), ("crash=0@5", "crash takes no value"),
     ("crash@-1", "bad fault 'crash@-1': fault start must be >= 0")],
)  # fmt: skip
def test_bad_specs_raise_config_error(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FaultPlan.parse(spec)


def test_fault_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="probability"):
        Fault(FaultKind.CRASH, probability=2.0)
    # integer values, as a caller may give them
    assert Fault(FaultKind.ERROR, value=503).arg == 503
    assert Fault(FaultKind.TRUNCATE, value=2).arg == 2
    with pytest.raises(ValueError, match="whole number"):
        Fault(FaultKind.HANG, value=-1)


def _client(spec: str) -> FaultyEngineClient:
    return FaultyEngineClient(make_sim_engine(make_instance("e0")), FaultPlan.parse(spec))


def _req(rid: str = "r", max_tokens: int = 6) -> EngineRequest:
    return EngineRequest(request_id=rid, model="m", prompt="hello there", max_tokens=max_tokens)


async def _run(client: FaultyEngineClient, req: EngineRequest) -> list[Chunk]:
    return [c async for c in client.generate(req)]


def test_a_crash_with_a_window_is_refused_for_an_engine_process() -> None:
    """Over HTTP the process exits at T: ``crash@30+10`` ("down for 10 s") had killed it
    for good, unsaid."""
    with pytest.raises(ValueError, match=r"crash@1\+3: the process exits at 1 s"):
        FaultPlan.parse("crash@1+3").check_for_process()
    with pytest.raises(ValueError, match=r"crash@0\+5: the process exits at 0 s"):
        FaultPlan.parse("crash@0+5").check_for_process()
    for fine in ("crash@1", "crash@p0.1", "hang@1+3", "error=503@2+1"):
        FaultPlan.parse(fine).check_for_process()


def test_no_faults_passes_everything_through() -> None:
    async def main() -> None:
        client = _client("")
        chunks = await _run(client, _req())
        assert chunks[-1].finish_reason is not None
        assert await client.health()
        await client.aclose()

    run_virtual(main())


def test_scheduled_crash_fails_calls_then_recovers() -> None:
    async def main() -> None:
        client = _client("crash@1+2")
        client.arm()
        assert await client.health()
        await asyncio.sleep(1.5)
        with pytest.raises(EngineConnectionError, match="injected crash"):
            await _run(client, _req())
        with pytest.raises(EngineConnectionError):
            await client.health()
        with pytest.raises(EngineConnectionError):
            await client.stats()
        await asyncio.sleep(2.0)
        assert await client.health()
        assert (await _run(client, _req("r2")))[-1].finish_reason is not None
        assert client.stats_injected.injected["crash"] == 3

    run_virtual(main())


def test_error_truncate_and_malformed() -> None:
    async def main() -> None:
        err = _client("error=503")
        with pytest.raises(EngineError) as info:
            await _run(err, _req())
        assert info.value.status == 503 and info.value.retryable
        assert not await err.health()

        trunc = await _run(_client("truncate=2"), _req())
        assert len(trunc) == 2 and all(c.finish_reason is None for c in trunc)

        with pytest.raises(EngineStreamError, match="malformed") as broken:
            await _run(_client("malformed=2"), _req())
        assert not broken.value.retryable

    run_virtual(main())


def test_hang_and_slow_take_longer() -> None:
    async def main() -> None:
        base = _client("")
        t0 = asyncio.get_running_loop().time()
        await _run(base, _req())
        normal = asyncio.get_running_loop().time() - t0

        slow = _client("slow=3")
        t0 = asyncio.get_running_loop().time()
        await _run(slow, _req())
        assert asyncio.get_running_loop().time() - t0 == pytest.approx(3 * normal, rel=0.2)

        hang = _client("hang@0+5")
        t0 = asyncio.get_running_loop().time()
        chunks = await _run(hang, _req())
        assert chunks[-1].finish_reason is not None
        assert asyncio.get_running_loop().time() - t0 >= 5.0

    run_virtual(main())


def test_a_scheduled_hang_freezes_streams_already_under_way() -> None:
    """An engine that hangs stops the streams it is producing too, not only those that
    begin while it hangs (they had run on: a drill of a hung engine tested nothing)."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = _client("hang@1+10")
        client.arm()
        t0 = loop.time()
        times: list[float] = []
        reasons: list[str | None] = []
        async for chunk in client.generate(_req(max_tokens=400)):
            times.append(loop.time() - t0)
            reasons.append(chunk.finish_reason)
        assert reasons[-1] is not None and times[0] < 1.0  # it began before the hang
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) >= 9.0  # frozen through the window, once
        assert sum(g >= 1.0 for g in gaps) == 1

    run_virtual(main())


def test_a_hang_ends_when_the_engine_is_closed() -> None:
    """Closing the engine (a server's shutdown) ends its hung streams as a closing engine's
    end, at once, rather than after the hang."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = _client("hang=1")
        stream = asyncio.ensure_future(_run(client, _req(max_tokens=50)))
        await asyncio.sleep(5.0)
        assert not stream.done()  # hung after its first chunk
        started = loop.time()
        await client.aclose()
        with pytest.raises(EngineConnectionError, match="engine closed"):
            await stream
        assert loop.time() - started < 1.0

    run_virtual(main())


def test_random_faults_are_seeded() -> None:
    async def outcomes(seed: int) -> list[bool]:
        client = _client(f"error=500@p0.5; seed={seed}")
        out = []
        for i in range(20):
            try:
                await _run(client, _req(f"r{i}", 2))
                out.append(True)
            except EngineError:
                out.append(False)
        return out

    async def main() -> None:
        a, b = await outcomes(3), await outcomes(3)
        assert a == b
        assert 0 < sum(a) < 20

    run_virtual(main())


def test_an_injected_error_carries_its_status_on_prefill_legs_too() -> None:
    async def main() -> None:
        client = _client("error=429")
        with pytest.raises(EngineError) as info:
            await client.prefill(_req())
        assert info.value.status == 429 and info.value.retryable
        assert "HTTP 429" in info.value.message

    run_virtual(main())


def test_the_wrapper_reports_the_engines_queue_times_and_stop_reasons() -> None:
    async def main() -> None:
        client = _client("seed=2")
        assert isinstance(client, ReportsQueueTime)
        chunks = await _run(client, _req("q"))
        assert chunks[-1].finish_reason == "length"
        assert client.queue_time_s("q") == 0.0
        assert client.stop_reason("q") is None
        assert client.queue_time_s("unknown") is None
        bare = FaultyEngineClient(FakeEngine(), FaultPlan.parse(""))
        assert bare.queue_time_s("q") is None and bare.stop_reason("q") is None
        await client.aclose()

    run_virtual(main())


def test_an_engine_process_exits_at_its_first_scheduled_crash() -> None:
    async def main() -> None:
        client = FaultyEngineClient(
            make_sim_engine(make_instance("e0")), FaultPlan.parse("crash@30; crash@2"),
            exit_process=True,
        )  # fmt: skip
        client.arm()
        timer = client._exit_timer
        assert timer is not None
        timer.cancel()  # (not to exit the test run)
        assert timer.when() - asyncio.get_running_loop().time() == pytest.approx(2.0)
        await client.aclose()

    run_virtual(main())


def test_a_slowed_stream_is_counted() -> None:
    async def main() -> None:
        client = _client("slow=2")
        await _run(client, _req())
        assert client.stats_injected.injected == {"slow": 1}

    run_virtual(main())


def test_a_crash_during_a_stream_is_not_retryable() -> None:
    """A crash before the first chunk may be retried elsewhere; after it, the client has
    part of an answer already."""

    async def main() -> None:
        client = _client("crash@1")
        client.arm()
        got: list[Chunk] = []
        with pytest.raises(EngineConnectionError, match="injected crash") as info:
            async for chunk in client.generate(_req(max_tokens=4000)):
                got.append(chunk)
        assert got and not info.value.retryable
        with pytest.raises(EngineConnectionError) as before:
            await _run(client, _req("r2"))
        assert before.value.retryable
        assert asyncio.get_running_loop().time() >= 1.0
        await client.aclose()

    run_virtual(main())


def test_each_kind_has_its_documented_default_value() -> None:
    """hang before 0 chunks, slow by 4, error 503, truncate and malformed after 1 chunk."""
    plan = FaultPlan.parse("hang; slow; error; truncate; malformed")
    assert [f.arg for f in plan.faults] == [0, 4, 503, 1, 1]

    async def main() -> None:
        assert len(await _run(_client("truncate"), _req())) == 1
        got: list[Chunk] = []
        with pytest.raises(EngineStreamError, match="malformed"):
            async for chunk in _client("malformed").generate(_req()):
                got.append(chunk)
        assert len(got) == 1
        hung = _client("hang")
        with pytest.raises(TimeoutError):  # no chunk at all
            await asyncio.wait_for(anext(aiter(hung.generate(_req()))), 10.0)
        await hung.aclose()

    run_virtual(main())


def test_a_scheduled_hang_ends_with_its_window_for_a_stream_begun_inside_it() -> None:
    """``hang@0+5`` hangs until 5 s after arming: a stream or a probe begun at 3 s waits
    2 s, not the window's whole length."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = _client("hang@0+5")
        client.arm()
        t0 = loop.time()
        await asyncio.sleep(3.0)

        async def first_chunk_at() -> float:
            times = [loop.time() - t0 async for _ in client.generate(_req())]
            return times[0]

        probe, first = await asyncio.gather(client.health(), first_chunk_at())
        assert probe and loop.time() - t0 < 5.5  # the probe waited out the window
        assert 5.0 <= first < 5.5  # the stream too, not 3 s + 5 s
        await client.aclose()

    run_virtual(main())


def test_a_crash_fails_prefill_legs_too() -> None:
    """A crashed engine fails every call with a connection error: a PD prefill leg too."""

    async def main() -> None:
        client = _client("crash")
        with pytest.raises(InjectedCrash, match="injected crash") as info:
            await client.prefill(_req())
        assert info.value.retryable
        await client.aclose()

    run_virtual(main())


def test_a_health_check_that_hangs_ends_unhealthy_when_the_engine_is_closed() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        client = _client("hang@0+100")
        check = asyncio.ensure_future(client.health())
        await asyncio.sleep(5.0)
        assert not check.done()  # the hung engine does not answer
        started = loop.time()
        await client.aclose()
        assert await check is False
        assert loop.time() - started < 1.0

    run_virtual(main())


def test_a_slowed_stream_whose_engine_fails_ends_with_the_engines_error() -> None:
    """``slow`` passes on the chunks the engine made before it failed, then its error (not
    a stream that ends as if complete, nor one left waiting)."""

    async def main() -> None:
        engine = FakeEngine(fail_with=EngineError("lost", retryable=False), fail_after=2)
        client = FaultyEngineClient(engine, FaultPlan.parse("slow=3"))
        got: list[Chunk] = []
        with pytest.raises(EngineError, match=r"^lost$"):
            async for chunk in client.generate(_req(max_tokens=5)):
                got.append(chunk)
        assert [c.text for c in got] == [" w0", " w1"]
        await client.aclose()

    run_virtual(main())
