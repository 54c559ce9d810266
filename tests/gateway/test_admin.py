"""The admin API: instances CRUD, drain, removal and policy switch during traffic."""

from __future__ import annotations

import asyncio
import json
from datetime import date, datetime, time
from typing import Any

import aiohttp
import pytest

from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.gateway.admin import instance_json, to_jsonable
from sage_llm.gateway.server import start_gateway
from sage_llm.types import (
    ExecutionInstanceType,
    PrefillingConfig,
    RequestPriority,
    RequestStatus,
)
from tests.factories import MODEL, make_instance, make_metadata
from tests.gateway.harness import FAST, completion_body, read_events, serve


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return await resp.json()


async def _first_event(resp: aiohttp.ClientResponse) -> Any:
    while True:
        line = await resp.content.readline()
        assert line
        if line.startswith(b"data: "):
            return json.loads(line[len(b"data: ") :])


def _held(rid: str) -> bool:
    return rid.startswith("held")


async def test_list_add_and_duplicate_instances() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        async with http.get(gw.url("/admin/instances")) as r:
            data = (await _json(r))["data"]
        assert [d["instance_id"] for d in data] == ["sim-0"]
        assert data[0]["instance_type"] == "general"
        assert data[0]["draining"] is False

        spec = {
            "instance_id": "sim-new",
            "host": "127.0.0.1",
            "port": 9000,
            "model_name": MODEL,
            "instance_type": "prefill",
            "max_concurrent_requests": 4,
            "metadata": {"sim_speed": FAST},
            "api_key": "engine-secret",
            "prefilling_config": {"target_batch_size": 8},
            "is_healthy": True,  # a live figure, as GET /admin/instances shows it
        }
        async with http.post(gw.url("/admin/instances"), json=spec) as r:
            assert r.status == 201
            added = await _json(r)
        assert added["instance_type"] == "prefilling"
        assert added["api_key"] == "***"
        (inst,) = [i for i in gw.manager.get_instances() if i.instance_id == "sim-new"]
        assert inst.instance_type is ExecutionInstanceType.PREFILLING
        assert inst.prefilling_config == PrefillingConfig(target_batch_size=8)
        assert inst.max_concurrent_requests == 4
        assert inst.api_key == "engine-secret"

        async with http.post(gw.url("/admin/instances"), json=spec) as r:
            assert r.status == 409
            assert (await _json(r))["error"]["type"] == "conflict_error"

        async with http.get(gw.url("/admin/instances")) as r:
            text = await r.text()
        assert "engine-secret" not in text

        # live flags sent back as false: health is measured, "not available" is drained
        for iid, flag in (("sim-unhealthy", "is_healthy"), ("sim-unavailable", "is_available")):
            body = {**spec, "instance_id": iid, "port": 9100 + len(iid), flag: False}
            async with http.post(gw.url("/admin/instances"), json=body) as r:
                assert r.status == 201
                answered = await _json(r)
            async with http.get(gw.url("/admin/instances")) as r:
                listed = [i for i in (await _json(r))["data"] if i["instance_id"] == iid]
            assert listed == [answered]  # the 201 shows it as the list does
        unhealthy = gw.manager.get_instance_metrics("sim-unhealthy")
        unavailable = gw.manager.get_instance_metrics("sim-unavailable")
        assert (unhealthy["is_healthy"], unhealthy["draining"]) == (True, False)
        assert unavailable["draining"] is True
        gw.manager.drain_instance("sim-unavailable", False)  # and it can be let in
        assert gw.manager.get_instance_metrics("sim-unavailable")["draining"] is False
        # an entry as GET lists it (draining and removing included) registers as listed
        async with http.get(gw.url("/admin/instances")) as r:
            (entry,) = [i for i in (await _json(r))["data"] if i["instance_id"] == "sim-0"]
        assert {"draining", "removing"} <= entry.keys()
        copy = {**entry, "instance_id": "sim-copy", "port": 9300, "draining": True}
        async with http.post(gw.url("/admin/instances"), json=copy) as r:
            assert r.status == 201, await r.text()
            assert (await _json(r))["draining"] is True
        async with http.post(gw.url("/admin/instances"), json={**copy, "removing": 1}) as r:
            assert r.status == 400
            assert (await _json(r))["error"]["param"] == "removing"


_DEFAULTED = (
    "engine", "instance_type", "max_concurrent_requests", "tensor_parallel_size", "metadata",
    "pipeline_parallel_size",
)  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ({"host": "h", "port": 1, "model_name": "m"}, "instance_id"),
        ({"instance_id": "x", "host": "h", "port": 0, "model_name": "m"}, "port"),
        ({"instance_id": "x", "host": "a<b>{}", "port": 1, "model_name": "m"}, "host"),
        ({"instance_id": "x", "host": "h", "port": "many", "model_name": "m"}, "port"),
        (
            {"instance_id": "x", "host": "h", "port": 1, "model_name": "m", "instance_type": "gpu"},
            "instance_type",
        ),
        (
            {"instance_id": "x", "host": "h", "port": 1, "model_name": "m", "colour": "red"},
            "colour",
        ),
        (
            {
                "instance_id": "x",
                "host": "h",
                "port": 1,
                "model_name": "m",
                "max_concurrent_requests": 0,
            },
            "max_concurrent_requests",
        ),
        # as a config file's instance entry: JSON types, no coercion; the same rules
        ({"instance_id": "x", "host": "h", "port": "80", "model_name": "m"}, "port"),
        (
            {"instance_id": "x", "host": "h", "port": 1, "model_name": "m", "engine": "tgi"},
            "engine",
        ),
        ({"instance_id": "x", "host": "h", "port": 70000, "model_name": "m"}, "port"),
        (
            {
                "instance_id": "x",
                "host": "h",
                "port": 1,
                "model_name": "m",
                "tensor_parallel_size": 0,
            },
            "tensor_parallel_size",
        ),
        (
            {"instance_id": "x", "host": "h", "port": 1, "model_name": "m", "is_healthy": 1},
            "is_healthy",
        ),
        (
            {
                "instance_id": "x",
                "host": "h",
                "port": 1,
                "model_name": "m",
                "prefilling_config": {"chunk_size": "big"},
            },
            "prefilling_config.chunk_size",
        ),
        (
            {
                "instance_id": "x",
                "host": "h",
                "port": 1,
                "model_name": "m",
                "instance_type": "decode",
                "prefilling_config": {"chunk_size": 10},
            },
            "prefilling_config",  # not allowed on a decode instance
        ),
        (
            {"instance_id": "x", "host": "h", "port": 1, "model_name": "m", "current_load": "x"},
            "current_load",
        ),
        # names that reach logs, metric labels and model lists: no control characters
        ({"instance_id": "x", "host": "h", "port": 1, "model_name": 'm"1\n'}, "model_name"),
        ({"instance_id": "x\u0010", "host": "h", "port": 1, "model_name": "m"}, "instance_id"),
        ({"instance_id": "x", "host": "h\u0010", "port": 1, "model_name": "m"}, "host"),
        # a live figure given as null: no type to check, refused as the figure it is not
        (
            {"instance_id": "x", "host": "h", "port": 1, "model_name": "m", "is_healthy": None},
            "is_healthy",
        ),
        (
            {"instance_id": "x", "host": "h", "port": 1, "model_name": "m", "current_load": None},
            "current_load",
        ),
        *(  # null for a field with a default: as the OpenAPI document says, not nullable
            ({"instance_id": "x", "host": "h", "port": 1, "model_name": "m", key: None}, key)
            for key in _DEFAULTED
        ),
    ],
)
async def test_bad_instance_specs_give_400(spec: dict[str, Any], param: str) -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url("/admin/instances"), json=spec) as r:
            assert r.status == 400
            error = (await _json(r))["error"]
        assert (error["param"], error["type"]) == (param, "invalid_request_error"), error
        assert [i.instance_id for i in gw.manager.get_instances()] == ["sim-0"]


async def test_an_address_in_use_is_409() -> None:
    manager = ControlPlaneManager(mode="http")  # engines reached at their addresses
    manager.register_instance(make_instance("e0", port=8100))
    await manager.start()
    runner, port = await start_gateway(manager, None, environ={})
    try:
        url = f"http://127.0.0.1:{port}/admin/instances"
        spec = {"instance_id": "twin", "host": "127.0.0.1", "port": 8100, "model_name": MODEL}
        async with aiohttp.ClientSession() as http:
            async with http.post(url, json=spec) as r:
                assert r.status == 409
                assert (
                    "already the address of instance 'e0'" in (await _json(r))["error"]["message"]
                )
            # the same address written another way
            async with http.post(url, json={**spec, "host": "LocalHost"}) as r:
                assert r.status == 409
    finally:
        await runner.cleanup()
        await manager.stop()


async def test_an_instance_at_the_gateways_own_address_is_refused() -> None:
    """Its requests would come back to the gateway (each a 409 there, never ejected: the
    gateway's /health answers its probes); a config file's entry there is refused too."""
    manager = ControlPlaneManager(mode="http")
    await manager.start()
    runner, port = await start_gateway(manager, None, environ={})
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/admin/instances"
            for host in ("127.0.0.1", "LocalHost"):
                spec = {"instance_id": "self", "host": host, "port": port, "model_name": MODEL}
                async with http.post(url, json=spec) as r:
                    assert r.status == 400, await r.text()
                    error = (await _json(r))["error"]
                assert error["param"] == "port"
                assert "is the gateway's own address" in error["message"]
        assert manager.get_instances() == []
    finally:
        await runner.cleanup()
        await manager.stop()


async def test_the_gateways_own_address_is_free_for_a_simulated_instance() -> None:
    """Simulated mode: the address is nominal whoever makes the clients (engine_factory)."""
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        spec = {"instance_id": "x", "host": "127.0.0.1", "port": gw.port, "model_name": MODEL}
        async with http.post(gw.url("/admin/instances"), json=spec) as r:
            assert r.status == 201, await r.text()


async def test_a_simulated_instances_nominal_address_is_free_for_others() -> None:
    manager = ControlPlaneManager(mode="simulated")
    manager.register_instance(make_instance("sim-0", port=8100))
    await manager.start()
    runner, port = await start_gateway(manager, None, environ={})
    try:
        spec = {"instance_id": "twin", "host": "127.0.0.1", "port": 8100, "model_name": MODEL}
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/admin/instances"
            async with http.post(url, json=spec) as r:
                assert r.status == 201, await r.text()
    finally:
        await runner.cleanup()
        await manager.stop()


async def test_unknown_instances_are_404() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url("/admin/instances/nope/drain")) as r:
            assert r.status == 404
        async with http.delete(gw.url("/admin/instances/nope")) as r:
            assert r.status == 404
        async with http.post(gw.url("/admin/instances/sim-0/drain"), json={"drain": "yes"}) as r:
            assert r.status == 400
            assert (await _json(r))["error"]["param"] == "drain"


async def test_drain_lets_in_flight_requests_finish_and_refuses_new_ones() -> None:
    async with serve(1, hold=_held) as gw, aiohttp.ClientSession() as http:
        probe = gw.probes["sim-0"]
        headers = {"x-request-id": "held-1"}
        body = completion_body(stream=True)
        async with http.post(gw.url("/v1/completions"), json=body, headers=headers) as stream:
            await _first_event(stream)
            async with http.post(gw.url("/admin/instances/sim-0/drain")) as r:
                assert await _json(r) == {"instance_id": "sim-0", "draining": True}
            async with http.post(gw.url("/v1/completions"), json=completion_body()) as r:
                assert r.status == 503
            async with http.get(gw.url("/admin/instances")) as r:
                assert (await _json(r))["data"][0]["draining"] is True
            probe.gate.set()
            events = await read_events(stream)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert (await gw.manager.wait_for_result("held-1")).status is RequestStatus.COMPLETED
        async with http.post(gw.url("/admin/instances/sim-0/drain"), json={"drain": False}) as r:
            assert (await _json(r))["draining"] is False
        async with http.post(gw.url("/v1/completions"), json=completion_body()) as r:
            assert r.status == 200


async def test_removed_instance_finishes_in_flight_and_gets_no_new_requests() -> None:
    async with serve(2, hold=_held) as gw, aiohttp.ClientSession() as http:
        headers = {"x-request-id": "held-remove"}
        body = completion_body(stream=True)
        async with http.post(gw.url("/v1/completions"), json=body, headers=headers) as stream:
            await _first_event(stream)
            busy = gw.probe_running()
            other = next(p for p in gw.probes.values() if p is not busy)
            async with http.delete(gw.url(f"/admin/instances/{busy.instance_id}")) as r:
                assert r.status == 200
                assert (await _json(r))["removed"] is True
            async with http.delete(gw.url(f"/admin/instances/{busy.instance_id}")) as r:
                assert r.status == 409  # still finishing its request
                assert "already being removed" in (await _json(r))["error"]["message"]
            drain = gw.url(f"/admin/instances/{busy.instance_id}/drain")
            async with http.post(drain, json={"drain": False}) as r:
                assert r.status == 409  # not undrained back into the fleet
                assert "is being removed" in (await _json(r))["error"]["message"]
            async with http.get(gw.url("/admin/instances")) as r:  # listed until it is gone
                listed = {d["instance_id"]: d for d in (await _json(r))["data"]}
            assert listed[busy.instance_id]["removing"] is True
            assert listed[busy.instance_id]["draining"] is True
            assert listed[busy.instance_id]["active_requests"] == 1
            assert listed[other.instance_id]["removing"] is False
            async with http.get(gw.url("/admin/status")) as r:
                live = (await _json(r))["instances"]
            assert live[busy.instance_id]["removing"] is True
            async with http.get(gw.url("/metrics")) as r:
                text = await r.text()
            assert f'sage_llm_instance_draining{{instance_id="{busy.instance_id}"}} 1.0' in text
            for i in range(4):
                async with http.post(
                    gw.url("/v1/completions"),
                    json=completion_body(),
                    headers={"x-request-id": f"after-{i}"},
                ) as r:
                    assert r.status == 200
            busy.gate.set()
            events = await read_events(stream)
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert [q.request_id for q in busy.requests] == ["held-remove"]
        assert [q.request_id for q in other.requests] == [f"after-{i}" for i in range(4)]
        async with http.get(gw.url("/admin/instances")) as r:
            ids = [d["instance_id"] for d in (await _json(r))["data"]]
        assert ids == [other.instance_id]


async def test_set_policy_switches_with_requests_queued() -> None:
    async with serve(1, bound=1, hold=_held) as gw, aiohttp.ClientSession() as http:
        cp = gw.manager
        probe = gw.probes["sim-0"]
        first = asyncio.create_task(
            http.post(
                gw.url("/v1/completions"),
                json=completion_body(),
                headers={"x-request-id": "held-first"},
            )
        )
        await asyncio.wait_for(probe.started_event.wait(), 5)
        for name in ("low", "critical"):
            meta = make_metadata(f"queued-{name}", priority=RequestPriority[name.upper()])
            await cp.submit_request(meta)
        async with http.post(gw.url("/admin/set_policy"), json={"policy": "priority"}) as r:
            assert r.status == 200
            assert (await _json(r))["scheduling_policy"] == "priority"
        async with http.get(gw.url("/admin/status")) as r:
            status = await _json(r)
        assert status["scheduling_policy"] == "priority"
        assert status["pending_requests"] == 2
        probe.gate.set()
        resp = await first
        assert resp.status == 200
        resp.release()
        for name in ("low", "critical"):
            result = await cp.wait_for_result(f"queued-{name}")
            assert result.status is RequestStatus.COMPLETED
        order = [q.request_id for q in probe.requests]
        assert order == ["held-first", "queued-critical", "queued-low"]
        async with http.get(gw.url("/metrics")) as r:
            assert 'sage_llm_scheduling_policy{policy="priority"} 1.0' in await r.text()


async def test_set_policy_errors() -> None:
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        async with http.post(gw.url("/admin/set_policy"), json={"policy": "nope"}) as r:
            assert r.status == 404
            error = (await _json(r))["error"]
        assert error["param"] == "policy"  # the body's field, not the manager's argument
        body = {"policy": "priority", "params": {"no_such_param": 1}}
        async with http.post(gw.url("/admin/set_policy"), json=body) as r:
            assert r.status == 400
            error = (await _json(r))["error"]
        assert (error["type"], error["param"]) == ("invalid_request_error", "params.no_such_param")
        body = {"policy": "priority", "params": {"max_wait_s": "x", "aging_interval_s": -1}}
        async with http.post(gw.url("/admin/set_policy"), json=body) as r:
            assert r.status == 400
            error = (await _json(r))["error"]
        assert error["param"] == "params.max_wait_s"  # the first; the message has both
        assert error["message"] == (
            "max_wait_s: must be a number, got string 'x'; aging_interval_s: must be > 0, got -1.0"
        )
        body = {"policy": "priority", "params": {"max_wait_s": None}}
        async with http.post(gw.url("/admin/set_policy"), json=body) as r:
            assert r.status == 400
            error = (await _json(r))["error"]
        assert error["message"] == "max_wait_s: must be a number, got null"  # JSON's name
        async with http.post(gw.url("/admin/set_policy"), json={"name": "fifo"}) as r:
            assert r.status == 400
        assert gw.manager.get_status()["scheduling_policy"] == "fifo"
        async with http.post(gw.url("/admin/set_policy"), json={"policy": "Cost-Optimized"}) as r:
            assert r.status == 200  # names as config files read them
        assert gw.manager.get_status()["scheduling_policy"] == "cost_optimized"
        # inf, which switches aging off, as the docs write it in JSON (no engine sees it)
        raw = b'{"policy": "priority", "params": {"aging_interval_s": 1e999}}'
        async with http.post(gw.url("/admin/set_policy"), data=raw) as r:
            assert r.status == 200, await r.text()
            shown = (await _json(r))["policy"]["params"]
        assert shown["aging_interval_s"] is None  # JSON has no infinity: shown as null
        assert gw.manager.get_status()["policy"]["params"]["aging_interval_s"] == float("inf")


async def test_status_and_metrics_json() -> None:
    async with serve(2) as gw, aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.post(gw.url("/v1/completions"), json=completion_body()) as r:
                assert r.status == 200
        async with http.get(gw.url("/admin/status")) as r:
            status = await _json(r)
        assert status["running"] is True
        assert status["registered_instances"] == 2
        assert set(status["instances"]) == {"sim-0", "sim-1"}
        async with http.get(gw.url("/admin/metrics")) as r:
            metrics = await _json(r)
        assert metrics["completed_requests"] == 3
        assert metrics["total_requests"] == 3
        assert isinstance(metrics["timestamp"], str)
        completed = sum(m["completed_requests"] for m in metrics["instances"].values())
        assert completed == 3
        assert metrics["scheduling"]["metadata"]["decisions"] == 3
        assert metrics["scheduling"]["policy_name"] == gw.manager.policy.name
        pd = metrics["pd"]  # the gateway's default fleet has no PD instances
        assert pd is None or pd["requests_routed_to_prefilling"] == 0


def test_to_jsonable_handles_dataclasses_enums_and_datetimes() -> None:
    inst = make_instance("x", api_key="k", metadata={"when": datetime(2025, 1, 1)})
    out = instance_json(inst)
    assert out["instance_type"] == "general"
    assert out["api_key"] == "***"
    assert out["metadata"] == {"when": "2025-01-01T00:00:00"}
    assert to_jsonable((1, {2})) == [1, [2]]
    # a TOML file's local date and time (metadata = { d = 1979-05-27, t = 07:32:00 })
    assert to_jsonable({"d": date(1979, 5, 27), "t": time(7, 32)}) == {
        "d": "1979-05-27",
        "t": "07:32:00",
    }
    assert to_jsonable({"a": float("inf"), "b": float("nan"), "c": 1.5}) == {
        "a": None,
        "b": None,
        "c": 1.5,
    }
    json.dumps(out)


async def test_simulator_keys_may_be_given_as_a_config_file_has_them() -> None:
    base = {"host": "127.0.0.1", "model_name": MODEL, "engine": "sim"}
    async with serve(1) as gw, aiohttp.ClientSession() as http:
        spec = {**base, "instance_id": "x", "port": 9001, "sim_gpu": "a100"}
        async with http.post(gw.url("/admin/instances"), json=spec) as r:
            assert r.status == 201, await r.text()
        (added,) = [i for i in gw.manager.get_instances() if i.instance_id == "x"]
        assert added.metadata["sim_gpu"] == "a100"
        for spec, param in (
            ({**base, "instance_id": "y", "port": 9002, "sim_gpu": "tpu"}, "metadata.sim_gpu"),
            (
                {**base, "instance_id": "y", "port": 9002, "sim_gpu": "a100",
                 "metadata": {"sim_gpu": "h100"}},
                "sim_gpu",
            ),
        ):  # fmt: skip
            async with http.post(gw.url("/admin/instances"), json=spec) as r:
                assert r.status == 400
                assert (await _json(r))["error"]["param"] == param


async def test_lora_adapters_are_loaded_and_unloaded_over_the_admin_api() -> None:
    async with serve(2) as gw, aiohttp.ClientSession() as http:
        body = {"lora_name": "sql", "lora_path": "/loras/sql", "instances": ["sim-1"]}
        async with http.post(gw.url("/admin/lora_adapters"), json=body) as r:
            assert r.status == 200, await r.text()
            assert await _json(r) == {"lora_name": "sql", "loaded": ["sim-1"], "failed": {}}
        async with http.get(gw.url("/v1/models/sql")) as r:
            assert (await _json(r))["sage"]["instances"] == ["sim-1"]
        for k in range(3):
            async with http.post(gw.url("/v1/completions"),
                                 json={**completion_body(), "model": "sql"},
                                 headers={"X-Request-Id": f"sql-{k}"}) as r:  # fmt: skip
                assert r.status == 200 and (await _json(r))["model"] == "sql"
            result = await gw.manager.get_result(f"sql-{k}")
            assert result is not None and result.instance_id == "sim-1"
        async with http.post(gw.url("/admin/lora_adapters"), json=body) as r:  # refused by all
            error = (await _json(r))["error"]
        assert r.status == 502 and "has already been loaded" in error["message"]
        for bad, param in [({"lora_name": "x"}, "lora_path"),
                           ({**body, "instances": "sim-1"}, "instances"),
                           ({**body, "extra": 1}, "extra")]:  # fmt: skip
            async with http.post(gw.url("/admin/lora_adapters"), json=bad) as r:
                error = (await _json(r))["error"]
            assert (r.status, error["param"]) == (400, param), error
        async with http.delete(gw.url("/admin/lora_adapters/sql")) as r:
            assert await _json(r) == {"lora_name": "sql", "unloaded": ["sim-1"], "failed": {}}
        async with http.delete(gw.url("/admin/lora_adapters/sql")) as r:
            assert r.status == 404
        async with http.post(gw.url("/v1/completions"),
                             json={**completion_body(), "model": "sql"}) as r:  # fmt: skip
            assert r.status == 404
