"""LoRA adapters: a request that names an adapter runs on the instances serving it.

An instance serves its ``model_name`` and the adapters of its ``lora_adapters`` and of its
engine's ``/v1/models`` (vLLM lists each ``--lora-modules`` adapter with ``parent`` set
to the base model); the engine is asked for the adapter by name.
"""

from __future__ import annotations

import asyncio

import pytest

from sage_llm import ControlPlaneManager, RequestStatus
from sage_llm.engines.base import EngineRequest, EngineStats
from sage_llm.errors import (
    EngineConnectionError,
    InstanceNotFoundError,
    InvalidRequestError,
    ModelNotFoundError,
    NoHealthyInstanceError,
)
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.server import start_engine_server
from sage_llm.tokens import count_tokens
from sage_llm.types import ExecutionInstanceType
from tests.engines.fake_engine import FakeEngine
from tests.factories import MODEL, make_instance, make_metadata


class _ListingEngine(FakeEngine):
    """A fake engine whose ``/v1/models`` lists ``listed`` as adapters of its model."""

    def __init__(self, instance_id: str, listed: list[str] | None) -> None:
        super().__init__(instance_id)
        self.listed = listed

    async def lora_adapters(self) -> list[str] | None:
        return None if self.listed is None else list(self.listed)


def _fleet(
    adapters: dict[str, list[str]], **kwargs: object
) -> tuple[ControlPlaneManager, dict[str, FakeEngine]]:
    """Instances ``i0``, ``i1``, … on fake engines, each serving the adapters given."""
    kwargs.setdefault("routing_strategy", "round_robin")
    kwargs.setdefault("scheduling_policy", "fifo")
    cp = ControlPlaneManager(mode="http", enable_monitoring=False, **kwargs)  # type: ignore[arg-type]
    engines: dict[str, FakeEngine] = {}
    for k, (iid, names) in enumerate(adapters.items()):
        engines[iid] = FakeEngine(iid)
        inst = make_instance(iid, port=9000 + k, lora_adapters=names)
        cp.register_instance(inst, client=engines[iid])
    return cp, engines


def _models_asked(engines: dict[str, FakeEngine]) -> dict[str, list[str]]:
    return {iid: [r.model for r in e.requests] for iid, e in engines.items()}


def test_a_request_for_an_adapter_runs_only_on_the_instances_serving_it() -> None:
    async def main() -> None:
        cp, engines = _fleet({"i0": [], "i1": ["sql"], "i2": ["sql", "chat"]})
        async with cp:
            for k in range(6):
                res = await cp.generate(make_metadata(f"a{k}", model_name="sql", max_tokens=2))
                assert res.status is RequestStatus.COMPLETED, res.error
                assert res.instance_id in ("i1", "i2")
            res = await cp.generate(make_metadata("c", model_name="chat", max_tokens=2))
            assert res.instance_id == "i2"
            for k in range(3):  # the base model: on every instance, by name
                res = await cp.generate(make_metadata(f"b{k}", model_name=MODEL, max_tokens=2))
                assert res.status is RequestStatus.COMPLETED, res.error
        asked = _models_asked(engines)
        assert asked["i0"] == [MODEL]
        assert sorted(asked["i1"] + asked["i2"]) == sorted(["sql"] * 6 + ["chat"] + [MODEL] * 2)
        assert asked["i2"].count("chat") == 1

    run_virtual(main())


def test_requests_for_an_adapter_are_counted_by_adapter_and_forgotten_with_the_model() -> None:
    async def main() -> None:
        cp, _ = _fleet({"i0": ["sql"]})
        async with cp:
            for k in range(2):
                await cp.generate(make_metadata(f"a{k}", model_name="sql", max_tokens=1))
            await cp.generate(make_metadata("b", model_name=MODEL, max_tokens=1))
            text = cp.prometheus_metrics().decode()
            series = (
                f'sage_llm_lora_requests_total{{adapter="sql",model="{MODEL}",status="completed"}}'
            )
            assert f"{series} 2.0" in text
            assert text.count("sage_llm_lora_requests_total{") == 1  # the model's not
            assert f'model="{MODEL}",policy="fifo",status="completed"}} 3.0' in text
            cp._metrics.forget_model(MODEL)
            assert "sage_llm_lora_requests_total{" not in cp.prometheus_metrics().decode()

    run_virtual(main())


def test_a_streamed_request_for_an_adapter_names_it_to_the_engine() -> None:
    async def main() -> None:
        cp, engines = _fleet({"i0": [], "i1": ["sql"]})
        async with cp:
            meta = make_metadata("s", model_name="sql", max_tokens=3)
            text = "".join([c.text async for c in cp.stream(meta)])
        assert text == " w0 w1 w2"
        assert _models_asked(engines) == {"i0": [], "i1": ["sql"]}
        assert meta.model_name == "sql"  # what the caller asked, not the base model

    run_virtual(main())


def test_an_unknown_name_is_refused_with_the_adapters_among_those_served() -> None:
    async def main() -> None:
        cp, _ = _fleet({"i0": ["sql"]})
        async with cp:
            with pytest.raises(ModelNotFoundError, match="served: llama-3-8b, sql") as info:
                await cp.generate(make_metadata("x", model_name="nope"))
            assert info.value.param == "model"

    run_virtual(main())


def test_an_adapter_whose_instances_all_drain_is_refused_while_the_model_is_served() -> None:
    async def main() -> None:
        cp, engines = _fleet({"i0": [], "i1": ["sql"]})
        async with cp:
            cp.drain_instance("i1")
            with pytest.raises(NoHealthyInstanceError) as info:
                await cp.generate(make_metadata("x", model_name="sql"))
            assert "LoRA adapter 'sql' of model 'llama-3-8b'" in info.value.message
            assert "draining" in info.value.message
            res = await cp.generate(make_metadata("b", model_name=MODEL, max_tokens=1))
            assert res.instance_id == "i0"  # the model itself is served
        assert engines["i1"].requests == []

    run_virtual(main())


def test_an_adapter_whose_instances_are_removed_is_no_longer_served() -> None:
    async def main() -> None:
        cp, _ = _fleet({"i0": [], "i1": ["sql"]})
        async with cp:
            cp.unregister_instance("i1")
            with pytest.raises(ModelNotFoundError, match="'sql'"):
                await cp.generate(make_metadata("x", model_name="sql"))

    run_virtual(main())


def test_a_model_name_is_the_model_even_where_an_instance_lists_it_as_an_adapter() -> None:
    async def main() -> None:
        cp, engines = _fleet({"i0": ["other"]})
        other = FakeEngine("o")
        cp.register_instance(make_instance("o", port=9100, model_name="other"), client=other)
        async with cp:
            res = await cp.generate(make_metadata("x", model_name="other", max_tokens=1))
            assert res.instance_id == "o"
        assert engines["i0"].requests == []
        assert cp.get_status()["lora_adapters"] == {}  # (a model's name: the model)

    run_virtual(main())


def test_an_adapters_prompt_blocks_are_its_own_in_the_prefix_index() -> None:
    """vLLM hashes an adapter's blocks apart from the base model's and from another
    adapter's: the prefix index records the same prompt once per adapter."""
    prompt = "A shared system prompt, long enough to fill several blocks of the cache. " * 6
    blocks = count_tokens(prompt) // 16

    async def main() -> None:
        cp, _ = _fleet({"i0": ["a", "b"]}, routing_strategy="locality")
        async with cp:
            names = ["a", "b", "a", MODEL]
            for k, name in enumerate(names):
                meta = make_metadata(f"p{k}", model_name=name, prompt=prompt, max_tokens=1)
                res = await cp.generate(meta)
                assert res.status is RequestStatus.COMPLETED, res.error
                seen = len(set(names[: k + 1]))
                assert cp.get_status()["prefix_index_entries"] == seen * blocks, name

    run_virtual(main())


def test_adapters_are_learnt_from_the_engine_and_forgotten_when_it_drops_them() -> None:
    async def main() -> None:
        cp = ControlPlaneManager(
            mode="http", routing_strategy="round_robin", scheduling_policy="fifo"
        )
        engine = _ListingEngine("i0", ["sql"])
        cp.register_instance(make_instance("i0", lora_adapters=["pinned"]), client=engine)
        async with cp:
            await asyncio.sleep(0.5)  # the stats loop's first turn asks at once
            [inst] = cp.get_instances()
            assert inst.lora_adapters == ["pinned", "sql"]
            res = await cp.generate(make_metadata("a", model_name="sql", max_tokens=1))
            assert res.status is RequestStatus.COMPLETED, res.error
            engine.listed = []  # unloaded: seen at the next asking, a minute on
            await asyncio.sleep(61.0)
            [inst] = cp.get_instances()
            assert inst.lora_adapters == ["pinned"]  # the configured one stays
            with pytest.raises(ModelNotFoundError):
                await cp.generate(make_metadata("b", model_name="sql", max_tokens=1))
            engine.listed = None  # an engine that does not say leaves what is known
            await asyncio.sleep(61.0)
            assert cp.get_instances()[0].lora_adapters == ["pinned"]
        assert [r.model for r in engine.requests] == ["sql"]

    run_virtual(main())


def test_a_retry_of_an_adapters_request_stays_on_the_instances_serving_it() -> None:
    """A request whose first instance fails before its first token is retried on another
    instance serving its adapter, never on one that does not."""

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="http", routing_strategy="round_robin", scheduling_policy="fifo",
            enable_monitoring=False,
        )  # fmt: skip
        bad = FakeEngine("i1", fail_with=EngineConnectionError("down"))
        good, base = FakeEngine("i2"), FakeEngine("i0")
        cp.register_instance(make_instance("i0", port=9000), client=base)
        cp.register_instance(make_instance("i1", port=9001, lora_adapters=["sql"]), client=bad)
        cp.register_instance(make_instance("i2", port=9002, lora_adapters=["sql"]), client=good)
        async with cp:
            for k in range(4):
                res = await cp.generate(make_metadata(f"r{k}", model_name="sql", max_tokens=1))
                assert res.status is RequestStatus.COMPLETED, res.error
                assert res.instance_id == "i2"
        assert base.requests == []
        assert all(isinstance(r, EngineRequest) and r.model == "sql" for r in good.requests)

    run_virtual(main())


async def test_adapters_of_engines_over_http_are_learnt_and_kept_apart_in_their_caches() -> None:
    """Two simulated engines behind vLLM's API, one serving adapter ``sql``: the control
    plane learns it from that engine's ``/v1/models`` alone, sends every ``sql`` request
    there, and the engine's prefix cache shares no block between ``sql`` and the model."""
    prompt = "A shared system prompt, long enough to fill several blocks of the cache. " * 6
    engines = [SimEngine(f"e{k}", SimEngineConfig(speed=100.0), lora_adapters=["sql"][:k])
               for k in range(2)]  # fmt: skip
    servers = [
        await start_engine_server(engines[0], model_name=MODEL),
        await start_engine_server(engines[1], model_name=MODEL, lora_modules={"sql": "/l/sql"}),
    ]
    cp = ControlPlaneManager(
        mode="http", routing_strategy="round_robin", scheduling_policy="fifo",
        engine_stream="client",
    )  # fmt: skip
    for k, (_, port) in enumerate(servers):
        cp.register_instance(make_instance(f"e{k}", port=port))
    try:
        async with cp:
            for _ in range(200):
                if cp.get_status()["lora_adapters"]:
                    break
                await asyncio.sleep(0.02)
            assert cp.get_status()["lora_adapters"] == {"sql": MODEL}
            cached = []
            for k, name in enumerate(["sql", "sql", MODEL, "sql"]):
                meta = make_metadata(f"r{k}", model_name=name, prompt=prompt, max_tokens=1)
                res = await cp.generate(meta)
                assert res.status is RequestStatus.COMPLETED, res.error
                if name == "sql":
                    assert res.instance_id == "e1"
                cached.append((res.instance_id, res.cached_tokens))
    finally:
        for runner, _ in servers:
            await runner.cleanup()
        for engine in engines:
            await engine.aclose()
    assert cached[0] == ("e1", 0)
    assert (cached[1][1] or 0) > 0  # the adapter's own blocks
    assert cached[3][1] == cached[1][1]
    if cached[2][0] == "e1":  # the model's request on the adapter's engine: none of them
        assert cached[2][1] == 0


def test_an_adapters_request_goes_where_the_engine_has_a_lora_slot_for_it() -> None:
    """An engine whose LoRA slots (``--max-loras``) hold other adapters (here another
    client's, as its stats said) would make a request for another one wait: while another
    instance has room for it (runs it, or has a slot free), it goes there; when none has,
    it is routed as any request."""

    async def main() -> None:
        cp, engines = _fleet({"i0": ["a", "b"], "i1": ["a", "b"], "i2": ["a", "b"]})
        states = {iid: cp._registry.get(iid) for iid in engines}
        busy_a = EngineStats(max_lora=1, lora_adapters=frozenset({"a"}))
        async with cp:
            for iid, slots in [("i0", 1), ("i1", 1), ("i2", 2)]:
                states[iid].last_stats = EngineStats(max_lora=slots)
                states[iid].lora_others = frozenset({"a"})  # another client's requests
            assert [states[i].lora_slots_left() for i in states] == [0, 0, 1]
            for k in range(4):  # b: only i2 has a slot for it
                res = await cp.generate(make_metadata(f"b{k}", model_name="b", max_tokens=1))
                assert res.instance_id == "i2"
            ran = set()
            for k in range(6):  # a: running on every one
                res = await cp.generate(make_metadata(f"a{k}", model_name="a", max_tokens=1))
                ran.add(res.instance_id)
            assert ran == {"i0", "i1", "i2"}
            states["i2"].last_stats = busy_a  # no room for b anywhere: spread as any request
            ran = set()
            for k in range(6):
                res = await cp.generate(make_metadata(f"c{k}", model_name="b", max_tokens=1))
                assert res.status is RequestStatus.COMPLETED, res.error
                ran.add(res.instance_id)
            assert ran == {"i0", "i1", "i2"}

    run_virtual(main())


def _held(cp: ControlPlaneManager, rid: str, model: str) -> asyncio.Task[object]:
    """A request that stays in flight until its engine's ``release`` is set."""
    return asyncio.create_task(cp.generate(make_metadata(rid, model_name=model, max_tokens=4)))


def test_the_adapters_of_calls_in_flight_hold_slots_before_the_engine_says_so() -> None:
    """The control plane knows which adapters its calls in flight are for as they start
    and end: a second adapter's request avoids the one-slot engine the first one's call
    holds, without waiting for the engine's next stats."""

    async def main() -> None:
        cp, engines = _fleet({"i0": ["a", "b"], "i1": ["a", "b"]})
        for engine in engines.values():
            engine.gate_after = 1
        states = {iid: cp._registry.get(iid) for iid in engines}
        async with cp:
            for state in states.values():
                state.last_stats = EngineStats(max_lora=1)  # and nothing running, it says
            first = _held(cp, "a0", "a")
            await asyncio.sleep(0.01)
            (holder,) = [iid for iid, st in states.items() if st.lora_in_flight == {"a": 1}]
            other = "i1" if holder == "i0" else "i0"
            second = _held(cp, "b0", "b")
            await asyncio.sleep(0.01)
            assert states[other].lora_in_flight == {"b": 1}
            assert [states[i].lora_slots_left() for i in (holder, other)] == [0, 0]
            live = cp.get_instance_metrics(holder)
            assert (live["max_lora"], live["lora_slots_left"]) == (1, 0)
            gauge = f'sage_llm_instance_lora_slots_free{{instance_id="{holder}"}} 0.0'
            assert gauge in cp.prometheus_metrics().decode()
            assert (live["lora_calls_in_flight"], live["lora_other_adapters"]) == ({"a": 1}, [])
            for engine in engines.values():
                engine.release.set()
            assert {(await t).status for t in (first, second)} == {RequestStatus.COMPLETED}  # type: ignore[attr-defined]
            assert all(not st.lora_in_flight for st in states.values())
            gauge = f'sage_llm_instance_lora_slots_free{{instance_id="{holder}"}} 1.0'
            assert gauge in cp.prometheus_metrics().decode()  # its call ended

    run_virtual(main())


def test_while_adapters_in_demand_outnumber_free_slots_a_running_adapter_stays_put() -> None:
    """Two engines of two LoRA slots each; ``a`` runs on i0. While b, c and d (asked for
    lately, running nowhere) outnumber the free slots that spreading ``a`` would leave, a
    request for ``a`` goes to i0; with only b in demand, it may take i1's free slot."""

    async def main() -> None:
        names = ["a", "b", "c", "d"]
        cp, engines = _fleet({"i0": names, "i1": names})
        states = {iid: cp._registry.get(iid) for iid in engines}
        async with cp:
            for state in states.values():
                state.last_stats = EngineStats(max_lora=2)
            states["i0"].lora_call_started("a")  # a call for a in flight on i0
            dispatcher = cp._require_dispatcher()
            for name in ("b", "c", "d"):
                dispatcher.lora_room.asked[name] = cp.clock.now()
            for k in range(4):  # free slots: 1 + 2; in demand: b, c, d
                res = await cp.generate(make_metadata(f"a{k}", model_name="a", max_tokens=1))
                assert res.instance_id == "i0"
            await asyncio.sleep(31.0)  # c and d are no longer in demand
            del dispatcher.lora_room.asked["b"]
            dispatcher.lora_room.asked["b"] = cp.clock.now()
            ran = set()
            for k in range(6):
                res = await cp.generate(make_metadata(f"s{k}", model_name="a", max_tokens=1))
                ran.add(res.instance_id)
            assert ran == {"i0", "i1"}  # round robin over both: spreading leaves b a slot
            assert list(dispatcher.lora_room.asked) == ["b", "a"]  # c and d forgotten
            states["i0"].lora_call_ended("a")

    run_virtual(main())


def test_an_adapter_loaded_at_run_time_is_served_at_once_and_unloaded_no_more() -> None:
    async def main() -> None:
        cp = ControlPlaneManager(mode="simulated", routing_strategy="round_robin",
                                 scheduling_policy="fifo")  # fmt: skip
        for k in range(3):
            cp.register_instance(make_instance(f"s{k}", port=9000 + k))
        async with cp:
            done = await cp.load_lora_adapter("sql", "/loras/sql", instances=["s0", "s2"])
            assert done == {"s0": None, "s2": None}
            ran = set()
            for k in range(4):
                res = await cp.generate(make_metadata(f"a{k}", model_name="sql", max_tokens=1))
                ran.add(res.instance_id)
            assert ran == {"s0", "s2"}
            again = await cp.load_lora_adapter("sql", "/loras/sql")  # every instance of it
            assert again["s1"] is None
            assert "has already been loaded" in (again["s0"] or "")
            assert cp.get_status()["lora_adapters"] == {"sql": MODEL}
            gone = await cp.unload_lora_adapter("sql")
            assert gone == {"s0": None, "s1": None, "s2": None}
            with pytest.raises(ModelNotFoundError):
                await cp.generate(make_metadata("b", model_name="sql", max_tokens=1))
            with pytest.raises(ModelNotFoundError, match="no instance serves LoRA adapter"):
                await cp.unload_lora_adapter("sql")

    run_virtual(main())


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "says"),
    [
        (("", "/p"), {}, InvalidRequestError, "lora_name must be a non-empty string"),
        (("x", ""), {}, InvalidRequestError, "lora_path must be a non-empty string"),
        ((" x", "/p"), {}, InvalidRequestError, "lora_name must not begin or end"),
        ((MODEL, "/p"), {}, InvalidRequestError, "is a model served here, not an adapter"),
        (("x", "/p"), {"instances": ["nope"]}, InstanceNotFoundError, "no instance 'nope'"),
        (("x", "/p"), {"instances": []}, InvalidRequestError, "instances must not be empty"),
        (("x", "/p"), {"model": "nope"}, ModelNotFoundError, "no instance serves model"),
    ],
)
def test_a_bad_adapter_to_load_is_refused_before_any_engine_is_asked(
    args: tuple[str, str], kwargs: dict[str, object], error: type[Exception], says: str
) -> None:
    async def main() -> None:
        cp, _ = _fleet({"i0": []})
        async with cp:
            with pytest.raises(error, match=says):
                await cp.load_lora_adapter(*args, **kwargs)  # type: ignore[arg-type]

    run_virtual(main())


def test_the_model_to_load_an_adapter_on_is_asked_when_several_are_served() -> None:
    async def main() -> None:
        cp, _ = _fleet({"i0": []})
        cp.register_instance(make_instance("o", port=9100, model_name="other"),
                             client=FakeEngine("o"))  # fmt: skip
        async with cp:
            with pytest.raises(InvalidRequestError, match="several models are served") as info:
                await cp.load_lora_adapter("x", "/p")
            assert info.value.param == "model"

    run_virtual(main())


def test_an_engine_that_cannot_load_adapters_is_said_so() -> None:
    async def main() -> None:
        cp, _ = _fleet({"i0": []})
        async with cp:
            done = await cp.load_lora_adapter("x", "/p")
        assert done == {"i0": "engine 'vllm' cannot load LoRA adapters at run time"}

    run_virtual(main())


def test_a_packed_adapter_whose_engines_are_at_their_bound_goes_where_there_is_room() -> None:
    """While adapters in demand outnumber the free slots, ``a`` goes where it runs (i0);
    with i0 at its concurrency bound, to an engine with a free slot (i2), not to one whose
    slots other adapters hold (i1)."""

    async def main() -> None:
        names = ["a", "b", "c", "d", "x", "y"]
        cp = ControlPlaneManager(
            mode="http", enable_monitoring=False, scheduling_policy="fifo",
            routing_strategy="round_robin",
        )  # fmt: skip
        engines = {iid: FakeEngine(iid) for iid in ("i0", "i1", "i2")}
        for k, (iid, engine) in enumerate(engines.items()):
            bound = 1 if iid == "i0" else 100
            inst = make_instance(iid, port=9000 + k, lora_adapters=names,
                                 max_concurrent_requests=bound)  # fmt: skip
            cp.register_instance(inst, client=engine)
        engines["i0"].gate_after = 1
        states = {iid: cp._registry.get(iid) for iid in engines}
        async with cp:
            for state in states.values():
                state.last_stats = EngineStats(max_lora=2)
            states["i1"].lora_others = frozenset({"x", "y"})  # another client's: no room
            held = _held(cp, "a-held", "a")
            await asyncio.sleep(0.01)
            assert states["i0"].lora_in_flight == {"a": 1}  # i0 runs a, at its bound
            dispatcher = cp._require_dispatcher()
            for name in ("b", "c", "d"):
                dispatcher.lora_room.asked[name] = cp.clock.now()
            for k in range(4):  # free: i0 1, i2 2; in demand, running nowhere: b, c, d
                res = await cp.generate(make_metadata(f"a{k}", model_name="a", max_tokens=1))
                assert res.instance_id == "i2", k
            engines["i0"].release.set()
            assert (await held).status is RequestStatus.COMPLETED  # type: ignore[attr-defined]

    run_virtual(main())


def test_a_disaggregated_request_for_an_adapter_runs_both_legs_where_it_is_served() -> None:
    """Both PD legs read the adapter's weights (and the decode leg the KV its prefill made
    with them): each runs on an instance of its role that serves it."""
    prefill, decode = ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", enable_pd_separation=True, scheduling_policy="fifo",
            routing_strategy="round_robin",
        )  # fmt: skip
        for k, (iid, role, names) in enumerate([
            ("p0", prefill, []), ("p1", prefill, ["sql"]),
            ("d0", decode, ["sql"]), ("d1", decode, []),
        ]):  # fmt: skip
            cp.register_instance(
                make_instance(iid, port=9000 + k, instance_type=role, lora_adapters=names)
            )
        async with cp:
            for k in range(4):
                res = await cp.generate(make_metadata(f"a{k}", model_name="sql", max_tokens=4))
                assert res.status is RequestStatus.COMPLETED, res.error
                assert (res.prefill_instance_id, res.instance_id) == ("p1", "d0")
            cp.drain_instance("d0")
            with pytest.raises(NoHealthyInstanceError, match="LoRA adapter 'sql'"):
                await cp.generate(make_metadata("x", model_name="sql", max_tokens=4))

    run_virtual(main())


def test_a_disaggregated_adapters_legs_go_where_the_engines_have_lora_slots() -> None:
    """The PD pair of a request for an adapter is chosen among the engines with room for
    it (as a whole request's instance is): with the one-slot engines p0 and d0 busy with
    another adapter's calls, a request for ``b`` runs on p1 and d1; with no pair of free
    engines, on any pair."""
    prefill, decode = ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING

    async def main() -> None:
        cp = ControlPlaneManager(
            mode="simulated", enable_pd_separation=True, scheduling_policy="fifo",
            routing_strategy="round_robin", enable_monitoring=False,
        )  # fmt: skip
        roles = [("p0", prefill), ("p1", prefill), ("d0", decode), ("d1", decode)]
        for k, (iid, role) in enumerate(roles):
            cp.register_instance(
                make_instance(iid, port=9000 + k, instance_type=role, lora_adapters=["a", "b"])
            )
        states = {iid: cp._registry.get(iid) for iid, _ in roles}
        async with cp:
            for state in states.values():
                state.last_stats = EngineStats(max_lora=1)
            for iid in ("p0", "d0"):
                states[iid].lora_call_started("a")
            for k in range(3):
                res = await cp.generate(make_metadata(f"b{k}", model_name="b", max_tokens=4))
                assert res.status is RequestStatus.COMPLETED, res.error
                assert (res.prefill_instance_id, res.instance_id) == ("p1", "d1")
            states["p1"].lora_call_started("a")  # no prefill engine with room left
            res = await cp.generate(make_metadata("c", model_name="b", max_tokens=4))
            assert res.status is RequestStatus.COMPLETED, res.error
            for iid in ("p0", "d0", "p1"):
                states[iid].lora_call_ended("a")

    run_virtual(main())


def test_sglangs_names_of_an_adapter_are_the_adapter() -> None:
    """SGLang's clients name an adapter as ``MODEL:ADAPTER``, or give the model with
    ``lora_path`` set to the adapter: both run as a request for the adapter (on the
    instances serving it, the engine asked for it by name, ``lora_path`` not passed on as
    the client gave it). A ``lora_path`` no instance serves is passed on as it is."""

    async def main() -> None:
        cp, engines = _fleet({"i0": [], "i1": ["sql"]})
        async with cp:
            for k, meta in enumerate(
                [
                    make_metadata("c0", model_name=f"{MODEL}:sql", max_tokens=2),
                    make_metadata(
                        "p0", model_name=MODEL, max_tokens=2, extra_body={"lora_path": "sql"}
                    ),
                ]
            ):
                res = await cp.generate(meta)
                assert res.status is RequestStatus.COMPLETED, (k, res.error)
                assert res.instance_id == "i1"
            sent = engines["i1"].requests
            assert [r.model for r in sent] == ["sql", "sql"]
            assert "lora_path" not in sent[1].extra
            res = await cp.generate(
                make_metadata("x0", model_name=MODEL, max_tokens=2, extra_body={"lora_path": "/x"})
            )
            assert res.status is RequestStatus.COMPLETED
            (passed,) = [r for e in engines.values() for r in e.requests if r.request_id == "x0"]
            assert (passed.model, passed.extra["lora_path"]) == (MODEL, "/x")
            res = await cp.generate(  # not a name at all: passed on too
                make_metadata(
                    "y0", model_name=MODEL, max_tokens=2, extra_body={"lora_path": ["sql"]}
                )
            )
            assert res.status is RequestStatus.COMPLETED
            with pytest.raises(ModelNotFoundError):  # not an adapter of that model
                await cp.generate(make_metadata("n0", model_name=f"{MODEL}:chat", max_tokens=2))

    run_virtual(main())


def test_the_free_lora_slots_gauge_follows_the_engines_stats() -> None:
    """Simulated engines serving adapters say how many LoRA slots they have
    (``sim_max_loras``): the stats loop sets each one's gauge of free slots."""

    async def main() -> None:
        cp = ControlPlaneManager(mode="simulated", scheduling_policy="fifo")
        for k in range(2):
            inst = make_instance(f"s{k}", port=9000 + k, lora_adapters=["sql"],
                                 metadata={"sim_max_loras": 3})  # fmt: skip
            cp.register_instance(inst)
        async with cp:
            await asyncio.sleep(2.5)  # a stats scrape or two
            text = cp.prometheus_metrics().decode()
            for k in range(2):
                assert f'sage_llm_instance_lora_slots_free{{instance_id="s{k}"}} 3.0' in text
            assert cp.get_instance_metrics("s0")["max_lora"] == 3

    run_virtual(main())


def test_an_instance_that_loads_an_adapter_has_its_stats_read_again_at_once() -> None:
    """Its LoRA slots changed: the answer to the load comes after its stats are read, so
    the next request's routing (and the slots gauge) see them without waiting for the
    stats loop."""

    async def main() -> None:
        cp = ControlPlaneManager(mode="simulated", scheduling_policy="fifo",
                                 stats_interval_s=3600.0)  # fmt: skip
        cp.register_instance(make_instance("s0", metadata={"sim_max_loras": 2}))
        async with cp:
            await asyncio.sleep(0.1)  # the first scrape: no adapter, no slots said
            assert cp.get_instance_metrics("s0")["max_lora"] is None
            await cp.load_lora_adapter("sql", "/loras/sql")
            assert cp.get_instance_metrics("s0")["max_lora"] == 2
            text = cp.prometheus_metrics().decode()
            assert 'sage_llm_instance_lora_slots_free{instance_id="s0"} 2.0' in text

    run_virtual(main())
