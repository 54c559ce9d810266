"""LoRA adapters on two real vLLM CPU engines (the tiny Llama), through the gateway.

Both engines serve adapter ``sql`` and the second also ``chat`` (``--lora-modules``;
each adapter made here with random weights, as vLLM loads a PEFT one). Nothing tells the
control plane of them: it learns them from the engines' ``/v1/models`` cards. A request
that names an adapter runs only where it is served, and is answered as the engine answers
it straight. The second engine also schedules by priority (``--scheduling-policy
priority``), and is sent each request's priority. With an engine's LoRA slots
(``--max-loras 2``) held, a request there for a third adapter waits, and the gateway
routes around that engine. Requests waiting for a sequence slot are taken by priority on
the second engine and by arrival on the first.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from sage_llm import ControlPlaneManager
from sage_llm.bench.fidelity import EngineShape
from sage_llm.bench.fidelity_real import (
    make_lora_adapters,
    real_vllm_paths,
    vllm_cpu_engines,
    vllm_cpu_settings,
)
from sage_llm.launch import LaunchedFleet
from tests.factories import free_ports
from tests.real.conftest import ROOT, served_fleet, skip_reason

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny"
_RANK = 8


class LoraFleet:
    def __init__(
        self, manager: ControlPlaneManager, fleet: LaunchedFleet, url: str, adapters: Path
    ) -> None:
        self.manager, self.fleet, self.url, self.adapters = manager, fleet, url, adapters

    def engine_url(self, k: int) -> str:
        inst = self.fleet.instances[k]
        return f"http://{inst.host}:{inst.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lora(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[LoraFleet]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    python, model_dir = real_vllm_paths(ROOT)
    adapters = tmp_path_factory.mktemp("loras")
    await make_lora_adapters(python, model_dir, adapters, ("sql", "chat", "code"), rank=_RANK)
    settings = vllm_cpu_settings(
        python, model_dir, base_port=free_ports(2),
        shape=EngineShape(max_num_seqs=8, max_num_batched_tokens=2048),
        log_dir=tmp_path_factory.mktemp("vllm-lora-logs"), served_model_name=MODEL,
        extra_args=("--enable-lora", "--max-lora-rank", str(_RANK), "--max-loras", "2",
                    "--lora-modules", f"sql={adapters / 'sql'}"),
    )  # fmt: skip
    settings = replace(settings, env={**settings.env, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    first, second = vllm_cpu_engines(settings, 2)
    # a second module, and requests run by their priority (sent by the gateway: it reads
    # the flag from the engine's command line)
    second = replace(
        second,
        argv=(*second.argv, f"chat={adapters / 'chat'}", "--scheduling-policy", "priority"),
    )
    manager = ControlPlaneManager(
        scheduling_policy="fifo", routing_strategy="round_robin", enable_pd_separation=False,
        stats_interval_s=0.25, health_interval_s=0.5,
    )  # fmt: skip
    async with manager, served_fleet(manager, [first, second], settings) as (fleet, url):
        yield LoraFleet(manager, fleet, url, adapters)


async def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        data: dict[str, Any] = await resp.json(content_type=None)
        assert resp.status == 200, data
        return data


async def _adapters_learnt(lora: LoraFleet) -> dict[str, list[str]]:
    for _ in range(200):
        seen = {i.instance_id: i.lora_adapters for i in lora.manager.get_instances()}
        if all(seen.values()):
            return seen
        await asyncio.sleep(0.05)
    return seen


async def test_adapters_are_learnt_from_the_engines_and_listed(lora: LoraFleet) -> None:
    first, second = (i.instance_id for i in lora.fleet.instances)
    assert await _adapters_learnt(lora) == {first: ["sql"], second: ["chat", "sql"]}
    async with aiohttp.ClientSession() as session, session.get(f"{lora.url}/v1/models") as resp:
        cards = {c["id"]: c for c in (await resp.json())["data"]}
    assert {name: c["parent"] for name, c in cards.items()} == {
        MODEL: None,
        "sql": MODEL,
        "chat": MODEL,
    }
    assert cards["chat"]["sage"]["instances"] == [second]
    assert sorted(cards["sql"]["sage"]["instances"]) == sorted([first, second])


async def test_an_adapter_is_answered_where_it_is_served_as_the_engine_answers(
    lora: LoraFleet,
) -> None:
    await _adapters_learnt(lora)
    second = lora.fleet.instances[1].instance_id
    body = {"prompt": "Hello there my friend", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    direct = await _post(f"{lora.engine_url(1)}/v1/completions", {**body, "model": "chat"})
    base = await _post(f"{lora.engine_url(1)}/v1/completions", {**body, "model": MODEL})
    assert direct["choices"][0]["text"] != base["choices"][0]["text"]  # the adapter counts
    served: list[str] = []
    for k in range(4):  # round robin: every one on the only instance serving it
        rid = f"chat-{k}"
        body_k = {**body, "model": "chat", "user": f"u{k}"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{lora.url}/v1/completions", json=body_k,
                         headers={"X-Request-Id": rid}) as resp,
        ):  # fmt: skip
            out = await resp.json()
            assert resp.status == 200, out
        assert out["model"] == "chat"
        assert out["choices"][0]["text"] == direct["choices"][0]["text"]
        result = await lora.manager.get_result(rid)
        assert result is not None
        served.append(result.instance_id or "")
    assert served == [second] * 4
    # the engine's LoRA slots (--max-loras; said once a LoRA request has run), which
    # routing reads to keep a request for an adapter off an engine whose slots other
    # adapters fill
    stats = await lora.manager.engine_stats(second)
    assert stats.max_lora == 2
    assert stats.lora_room("chat") and stats.lora_room("sql")
    streamed = ""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{lora.url}/v1/completions",
                     json={**body, "model": "chat", "stream": True}) as resp,
    ):  # fmt: skip
        assert resp.status == 200
        async for line in resp.content:
            text = line.decode().strip()
            if text.startswith("data: {"):
                streamed += json.loads(text[6:])["choices"][0]["text"]
    assert streamed == direct["choices"][0]["text"]


async def test_an_adapter_served_everywhere_is_spread_and_an_unknown_one_is_a_404(
    lora: LoraFleet,
) -> None:
    await _adapters_learnt(lora)
    for k in range(4):
        rid = f"sql-{k}"
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{lora.url}/v1/completions",
                         json={"model": "sql", "prompt": "SELECT", "max_tokens": 2},
                         headers={"X-Request-Id": rid}) as resp,
        ):  # fmt: skip
            assert resp.status == 200, await resp.text()
    ids = set()
    for k in range(4):
        result = await lora.manager.get_result(f"sql-{k}")
        assert result is not None
        ids.add(result.instance_id)
    assert ids == {i.instance_id for i in lora.fleet.instances}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{lora.url}/v1/completions",
                     json={"model": "nope", "prompt": "x", "max_tokens": 2}) as resp,
    ):  # fmt: skip
        error = (await resp.json())["error"]
    assert resp.status == 404 and error["param"] == "model"
    assert "chat" in error["message"] and "sql" in error["message"]


async def test_priorities_go_to_the_engine_that_schedules_by_them(lora: LoraFleet) -> None:
    """The launcher registers the engine started with ``--scheduling-policy priority`` so,
    the gateway sends it each request's priority, and every request runs."""
    first, second = lora.fleet.instances
    registered = {i.instance_id: i.engine_scheduling_policy for i in lora.manager.get_instances()}
    assert registered == {first.instance_id: "fcfs", second.instance_id: "priority"}
    body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
    await _adapters_learnt(lora)
    for k, (model, level) in enumerate(
        [("chat", "high"), ("chat", "background"), (MODEL, "critical"), (MODEL, "low")]
    ):
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{lora.url}/v1/completions", json={**body, "model": model},
                         headers={"x-sage-priority": level, "X-Request-Id": f"p{k}"}) as r,
        ):  # fmt: skip
            assert r.status == 200, await r.text()


async def test_an_adapter_loaded_through_the_admin_api_is_served_at_once(
    lora: LoraFleet,
) -> None:
    """``POST /admin/lora_adapters`` loads it on the engine named (vLLM's
    ``/v1/load_lora_adapter``, the engines started with
    ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), which serves it from the next request on;
    ``DELETE`` unloads it, and its name is unknown again."""
    first = lora.fleet.instances[0].instance_id
    path = str(lora.adapters / "code")
    async with aiohttp.ClientSession() as session:
        load = {"lora_name": "code", "lora_path": path, "instances": [first]}
        async with session.post(f"{lora.url}/admin/lora_adapters", json=load) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["loaded"] == [first]
    body = {"model": "code", "prompt": "Hello there my friend", "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    direct = await _post(f"{lora.engine_url(0)}/v1/completions", body)
    for k in range(2):
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{lora.url}/v1/completions", json=body,
                         headers={"X-Request-Id": f"code-{k}"}) as resp,
        ):  # fmt: skip
            out = await resp.json()
            assert resp.status == 200, out
        assert out["choices"][0]["text"] == direct["choices"][0]["text"]
        result = await lora.manager.get_result(f"code-{k}")
        assert result is not None and result.instance_id == first
    async with aiohttp.ClientSession() as session:
        async with session.delete(f"{lora.url}/admin/lora_adapters/code") as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["unloaded"] == [first]
        async with session.post(f"{lora.url}/v1/completions", json=body) as resp:
            assert resp.status == 404


async def _engine_lora(lora: LoraFleet, k: int) -> tuple[int, frozenset[str]]:
    """The first engine's ``max_lora`` and its running and waiting requests' adapters, as
    its ``/metrics`` say now."""
    stats = await lora.manager.engine_stats(lora.fleet.instances[k].instance_id)
    return stats.max_lora, stats.lora_adapters


async def test_a_third_adapter_waits_for_a_slot_and_the_gateway_routes_around_the_engine(
    lora: LoraFleet,
) -> None:
    """vLLM holds requests for at most ``--max-loras`` (here 2) adapters in one batch: with
    the first engine's two slots held by another client's long ``sql`` and ``chat``
    requests (sent to it straight), a request for a third adapter, ``code``, waits there
    until one of them ends, as the simulator schedules it (``sage_llm.sim.core``). The
    gateway reads the held slots from the engine's stats and sends its ``code`` requests to
    the second engine meanwhile."""
    first, second = (i.instance_id for i in lora.fleet.instances)
    long = {"prompt": "Once upon a time", "max_tokens": 500, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    short = {"model": "code", "prompt": "Hello", "max_tokens": 2, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        for name, on in (("chat", [first]), ("code", [first, second])):
            load = {"lora_name": name, "lora_path": str(lora.adapters / name), "instances": on}
            async with session.post(f"{lora.url}/admin/lora_adapters", json=load) as resp:
                assert resp.status == 200, await resp.text()
    loop = asyncio.get_running_loop()
    ends: dict[str, float] = {}

    async def straight(name: str, body: dict[str, Any]) -> None:
        await _post(f"{lora.engine_url(0)}/v1/completions", body)
        ends[name] = loop.time()

    held = [
        asyncio.create_task(straight(name, {**long, "model": name})) for name in ("sql", "chat")
    ]
    try:
        for _ in range(200):  # the engine says both run; the gateway's stats say so too
            if (await _engine_lora(lora, 0))[1] == {"sql", "chat"} and lora.manager._registry.get(
                first
            ).lora_others == {"sql", "chat"}:
                break
            await asyncio.sleep(0.05)
        else:
            said = await _engine_lora(lora, 0)
            failed = [t.exception() for t in held if t.done()]
            raise AssertionError(f"the long requests never ran together: {said} {failed}")
        assert not ends, "the long requests ended before the test could use them"
        for k in range(2):
            rid = f"slot-{k}"
            async with (
                aiohttp.ClientSession() as session,
                session.post(f"{lora.url}/v1/completions", json=short,
                             headers={"X-Request-Id": rid}) as resp,
            ):  # fmt: skip
                assert resp.status == 200, await resp.text()
            result = await lora.manager.get_result(rid)
            assert result is not None and result.instance_id == second
        assert not ends, "the long requests ended before the gateway's requests"
        waited = asyncio.create_task(straight("code", short))  # on the first engine itself
        done, _ = await asyncio.wait([*held, waited], return_when=asyncio.FIRST_COMPLETED)
        assert waited not in done, "a third adapter's request ran with two slots held"
        await asyncio.gather(waited, *held)
        assert ends["code"] >= min(ends["sql"], ends["chat"])
    finally:
        for task in held:
            task.cancel()
        async with aiohttp.ClientSession() as session:
            unload: list[tuple[str, dict[str, Any]]] = [
                ("chat", {"instances": [first]}),
                ("code", {}),  # from every instance serving it
            ]
            for name, body in unload:
                async with session.delete(
                    f"{lora.url}/admin/lora_adapters/{name}", json=body
                ) as resp:
                    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize(("k", "first"), [(0, "background"), (1, "critical")])
async def test_an_engine_takes_its_waiting_requests_by_priority_only_under_that_policy(
    lora: LoraFleet, k: int, first: str
) -> None:
    """Both engines run at most 8 sequences: 8 long requests fill them, ending one at a
    time, while a BACKGROUND request (priority 4) and then a CRITICAL one (0) wait. The
    engine started with ``--scheduling-policy priority`` (the second) takes the critical
    one into the first free slot; the first engine (``fcfs``) takes them by arrival, the
    priority sent ignored, as the simulated engines schedule them
    (``sage_llm.sim.core``)."""
    url = f"{lora.engine_url(k)}/v1/completions"
    loop = asyncio.get_running_loop()
    ends: dict[str, float] = {}

    async def send(name: str, max_tokens: int, priority: int) -> None:
        body = {"model": MODEL, "prompt": f"Story {name}:", "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "priority": priority}  # fmt: skip
        await _post(url, body)
        ends[name] = loop.time()

    fill = [asyncio.create_task(send(f"long-{j}", 120 + 40 * j, 4)) for j in range(8)]
    iid = lora.fleet.instances[k].instance_id
    for _ in range(300):  # until the engine says all 8 run
        if (await lora.manager.engine_stats(iid)).running == 8:
            break
        await asyncio.sleep(0.02)
    assert not ends, "a long request ended before the others started"
    waiting = [asyncio.create_task(send("background", 2, 4))]
    await asyncio.sleep(0.1)
    waiting.append(asyncio.create_task(send("critical", 2, 0)))
    await asyncio.gather(*fill, *waiting)
    assert ends["background"] > ends["long-0"]  # they did wait for a slot
    order = sorted(("background", "critical"), key=ends.__getitem__)
    assert order[0] == first, ends
