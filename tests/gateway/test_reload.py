"""``POST /admin/reload``: keys, tenants, the admin token and request limits changed in the
config file reach a running gateway; a file with a problem changes nothing."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sage_llm.config import load_config
from sage_llm.config_schema import GatewayConfig, TenantConfig
from sage_llm.control_plane.scheduling.fair import FairSharePolicy
from sage_llm.gateway.settings import GatewaySettings, LiveSettings, ResolvedGateway
from tests.factories import MODEL
from tests.gateway.harness import Gateway, completion_body, serve

_INSTANCE = """
[services.llm_control_plane]
scheduling_policy = "fair"

[[services.llm_control_plane.instances]]
instance_id = "sim-0"
host = "127.0.0.1"
port = 9100
model_name = "{model}"
"""


def _write(path: Path, gateway: str) -> None:
    path.write_text(_INSTANCE.format(model=MODEL) + "\n[gateway]\n" + gateway)


def _reader(path: Path, env: dict[str, str] | None = None) -> Any:
    def read() -> GatewaySettings:
        return load_config(path, env=env or {}).gateway

    return read


_FIRST = """
api_keys = ["old-key"]
admin_token = "admin-1"

[[gateway.tenants]]
user = "team-a"
api_key = "sk-a"
"""

_SECOND = """
api_keys = ["new-key"]
admin_token = "admin-2"
max_tokens_limit = 8

[[gateway.tenants]]
user = "team-b"
api_key = "sk-b"
"""


def _fresh() -> aiohttp.ClientSession:
    """A session whose every request has a connection of its own: the lean front serves a
    generation request only on a connection that has not gone to the aiohttp app (which
    an admin request's does, for good)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def _post(gw: Gateway, key: str, *, stream: bool = False, **fields: Any) -> int:
    async with (
        _fresh() as http,
        http.post(
            gw.url("/v1/completions"),
            json=completion_body(stream=stream, **fields),
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        await r.read()
        return r.status


async def _reload(gw: Gateway, token: str) -> tuple[int, Any]:
    async with (
        _fresh() as http,
        http.post(gw.url("/admin/reload"), headers={"Authorization": f"Bearer {token}"}) as r,
    ):
        return r.status, await r.json()


async def _first_line(gw: Gateway, head: bytes, then: bytes = b"", between: Any = None) -> bytes:
    """The first line of the answer to ``head`` sent on a connection of its own (then, after
    ``between`` is awaited, ``then``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(head)
        await writer.drain()
        if between is not None:
            await between()
        if then:
            writer.write(then)
            await writer.drain()
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("lean", [True, False])
async def test_a_reload_puts_the_files_keys_tenants_token_and_limits_in_use(
    tmp_path: Path, lean: bool
) -> None:
    path = tmp_path / "cluster.toml"
    _write(path, f"lean_server = {str(lean).lower()}\n" + _FIRST)
    first = load_config(path, env={}).gateway
    async with (
        serve(1, settings=first, reload_from=_reader(path), scheduling_policy="fair") as gw,
        _fresh() as http,
    ):
        assert await _post(gw, "old-key") == 200
        assert await _post(gw, "sk-a") == 200
        assert await _post(gw, "new-key") == 401

        _write(path, f"lean_server = {str(lean).lower()}\n" + _SECOND)
        status, body = await _reload(gw, "admin-1")
        assert status == 200, body
        assert body == {
            "reloaded": True,
            "applied": ["api_keys", "tenants", "admin_token", "max_tokens_limit"],
            "restart_required": [],
            "tenants_added": ["team-b"],
            "tenants_removed": ["team-a"],
            "warnings": [],
        }
        assert "new-key" not in str(body) and "sk-b" not in str(body)  # no secret shown

        for stream in (False, True):
            assert await _post(gw, "old-key", stream=stream) == 401
            assert await _post(gw, "sk-a", stream=stream) == 401
            assert await _post(gw, "new-key", stream=stream) == 200
            assert await _post(gw, "sk-b", stream=stream, user="else") == 200
            assert await _post(gw, "new-key", stream=stream, max_tokens=9) == 400
        assert await _post(gw, "new-key", user="team-b") == 403  # now a tenant's user
        policy = gw.manager.policy
        assert isinstance(policy, FairSharePolicy)
        assert "team-b" in policy.counters() and "else" not in policy.counters()

        async with http.get(
            gw.url("/admin/status"), headers={"Authorization": "Bearer admin-1"}
        ) as r:
            assert r.status == 403  # the old token opens nothing
        status, body = await _reload(gw, "admin-2")
        assert status == 200 and body["applied"] == []  # the same file: nothing changed
        async with http.get(
            gw.url("/admin/status"), headers={"Authorization": "Bearer admin-2"}
        ) as r:
            last = (await r.json())["gateway"]["last_reload"]
        assert (last["outcome"], last["applied"]) == ("applied", [])
        async with http.get(gw.url("/metrics")) as r:
            exposition = await r.text()
        assert 'sage_llm_gateway_reloads_total{outcome="applied"} 2.0' in exposition
        # the new tenant has series of its own, as one configured at the start has
        assert 'sage_llm_user_requests_total{status="completed",user="team-b"} 2.0' in exposition


async def test_a_file_with_a_problem_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    _write(path, _FIRST)
    first = load_config(path, env={}).gateway
    async with (
        serve(1, settings=first, reload_from=_reader(path)) as gw,
        _fresh() as http,
    ):
        _write(
            path, 'max_body_bytes = "big"\n' + _SECOND + '[[gateway.tenants]]\nuser = "(other)"\n'
        )
        status, body = await _reload(gw, "admin-1")
        assert status == 400
        error = body["error"]
        assert error["type"] == "invalid_config"
        message = error["message"]
        assert f"{path}:" in message  # every problem with its file and line
        assert "gateway.max_body_bytes" in message and "gateway.tenants[1]" in message
        assert await _post(gw, "old-key") == 200  # the settings before stay
        assert await _post(gw, "sk-a") == 200
        assert await _post(gw, "new-key") == 401
        status, _ = await _reload(gw, "admin-1")  # the old token still opens it
        assert status == 400

        path.unlink()  # a file gone is a problem of its own
        status, body = await _reload(gw, "admin-1")
        assert status == 400 and str(path) in body["error"]["message"]
        async with http.get(gw.url("/metrics")) as r:
            exposition = await r.text()
        assert 'sage_llm_gateway_reloads_total{outcome="failed"} 3.0' in exposition
        assert 'sage_llm_gateway_reloads_total{outcome="applied"} 0.0' in exposition
        async with http.get(
            gw.url("/admin/status"), headers={"Authorization": "Bearer admin-1"}
        ) as r:
            said = (await r.json())["gateway"]
        assert said["reloadable"] is True
        last = said["last_reload"]
        assert last["outcome"] == "failed" and str(path) in last["error"]


async def test_a_variable_a_reload_reads_is_checked_as_at_the_start(tmp_path: Path) -> None:
    """``*_env`` keys are read again on a reload; one that is unset now is an error."""
    path = tmp_path / "cluster.toml"
    _write(path, 'api_keys_env = "KEYS"\n')
    env = {"KEYS": "k1,k2"}
    first = load_config(path, env=env).gateway
    async with (
        serve(1, settings=first, reload_from=_reader(path, env), environ=env) as gw,
    ):
        assert await _post(gw, "k2") == 200
        env["KEYS"] = "k3"
        status, body = await _reload(gw, "unused")  # loopback: no admin token set
        assert (status, body["applied"]) == (200, ["api_keys"])
        assert await _post(gw, "k2") == 401
        assert await _post(gw, "k3") == 200
        del env["KEYS"]
        status, body = await _reload(gw, "unused")
        assert status == 400
        assert "environment variable KEYS is not set" in body["error"]["message"]
        assert await _post(gw, "k3") == 200


async def test_settings_read_at_the_start_are_reported_not_applied(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    _write(path, "max_body_bytes = 4096\n")
    first = load_config(path, env={}).gateway
    async with (
        serve(1, settings=first, reload_from=_reader(path)) as gw,
        _fresh() as http,
    ):
        _write(path, 'max_body_bytes = 8192\nport = 9999\nhost = "127.0.0.2"\n')
        status, body = await _reload(gw, "-")
        assert status == 200
        assert body["applied"] == []
        assert body["restart_required"] == ["max_body_bytes", "host", "port"]
        big = completion_body(prompt="x" * 5000)
        async with http.post(gw.url("/v1/completions"), json=big) as r:
            assert r.status == 413  # the limit the gateway started with


async def test_a_request_authorized_before_a_reload_finishes(tmp_path: Path) -> None:
    """A request in flight when its key is revoked is not cut: it was accepted."""
    path = tmp_path / "cluster.toml"
    _write(path, _FIRST)
    first = load_config(path, env={}).gateway
    async with (
        serve(
            1,
            settings=first,
            reload_from=_reader(path),
            hold=lambda rid: rid.startswith("held"),
        ) as gw,
    ):
        probe = gw.probes["sim-0"]
        sent = asyncio.create_task(_held_post(gw, "sk-a"))
        await asyncio.wait_for(probe.started_event.wait(), 5)
        _write(path, _SECOND)
        status, _ = await _reload(gw, "admin-1")
        assert status == 200
        probe.gate.set()
        assert await asyncio.wait_for(sent, 5) == 200
        assert await _post(gw, "sk-a") == 401


async def _held_post(gw: Gateway, key: str) -> int:
    async with (
        _fresh() as http,
        http.post(
            gw.url("/v1/completions"),
            json=completion_body(stream=True),
            headers={"Authorization": f"Bearer {key}", "x-request-id": "held-1"},
        ) as r,
    ):
        await r.read()
        return r.status


async def test_without_a_file_or_with_a_body_a_reload_is_refused() -> None:
    async with serve(1) as gw, _fresh() as http:
        async with http.get(gw.url("/admin/status")) as r:
            assert (await r.json())["gateway"] == {"reloadable": False, "last_reload": None}
        async with http.post(gw.url("/admin/reload")) as r:
            assert r.status == 409
            assert "not started from a config file" in (await r.json())["error"]["message"]
        async with http.post(gw.url("/admin/reload"), json={"now": True}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["param"] == "now"


def _resolved(**fields: Any) -> ResolvedGateway:
    return ResolvedGateway.from_settings(GatewayConfig(**fields), {})


def test_live_settings_report_what_changed_by_the_files_names() -> None:
    live = LiveSettings(
        _resolved(api_keys=("k",), tenants=(TenantConfig("a", api_key="sk-a"),), port=8000)
    )
    before = live.current
    # a tenant's key changed, a tenant added: the plain keys are the same
    outcome = live.reload(
        _resolved(
            api_keys=("k",),
            tenants=(TenantConfig("a", api_key="sk-a2"), TenantConfig("b", api_key="sk-b")),
            port=9000,
            log_prompts=True,
        )
    )
    assert outcome.applied == ("tenants", "log_prompts")
    assert outcome.restart_required == ("port",)
    assert (outcome.tenants_added, outcome.tenants_removed) == (("b",), ())
    now = live.current
    assert now.tenant_keys == (("sk-a2", "a"), ("sk-b", "b"))
    assert now.api_keys == ("k", "sk-a2", "sk-b")
    assert now.log_prompts is True
    assert now.port == 8000  # read once, at the start
    assert before.tenant_keys == (("sk-a", "a"),)  # a request's snapshot is not changed


async def test_secret_files_rotated_in_place_are_read_again(tmp_path: Path) -> None:
    """Keys kept in files of their own (a mounted secret): the config file is unchanged,
    the files are rewritten, and the reload reads them again."""
    (tmp_path / "keys").write_text("k-1\n")
    (tmp_path / "admin").write_text("adm-1\n")
    (tmp_path / "team").write_text("t-1\n")
    path = tmp_path / "cluster.toml"
    _write(
        path,
        'api_keys_file = "keys"\nadmin_token_file = "admin"\n'
        '[[gateway.tenants]]\nuser = "team"\napi_key_file = "team"\n',
    )
    first = load_config(path, env={}).gateway
    async with (
        serve(1, settings=first, reload_from=_reader(path)) as gw,
    ):
        assert [await _post(gw, key) for key in ("k-1", "t-1", "k-2")] == [200, 200, 401]
        (tmp_path / "keys").write_text("k-2\nk-3\n")
        (tmp_path / "admin").write_text("adm-2")
        (tmp_path / "team").write_text("t-2")
        status, body = await _reload(gw, "adm-1")
        assert (status, body["applied"]) == (200, ["api_keys", "tenants", "admin_token"])
        assert body["tenants_added"] == body["tenants_removed"] == []
        statuses = [await _post(gw, key) for key in ("k-1", "t-1", "k-2", "k-3", "t-2")]
        assert statuses == [401, 401, 200, 200, 200]
        (tmp_path / "team").write_text("")  # emptied mid-rotation: refused, nothing changes
        status, body = await _reload(gw, "adm-2")
        assert status == 400 and "gateway.tenants[0].api_key_file" in body["error"]["message"]
        assert await _post(gw, "t-2") == 200


@pytest.mark.parametrize("lean", [True, False])
async def test_an_expect_100_continue_is_answered_by_the_keys_in_use(
    tmp_path: Path, lean: bool
) -> None:
    """A request that waits for ``100 Continue`` is refused at once with a key a reload
    took away, and invited with the key it brought."""
    path = tmp_path / "cluster.toml"
    _write(path, f"lean_server = {str(lean).lower()}\n" + _FIRST)
    first = load_config(path, env={}).gateway
    async with serve(1, settings=first, reload_from=_reader(path)) as gw:
        _write(path, f"lean_server = {str(lean).lower()}\n" + _SECOND)
        assert (await _reload(gw, "admin-1"))[0] == 200
        body = json.dumps(completion_body()).encode()

        def head(key: str) -> bytes:
            return (
                b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n"
                b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
                b"Authorization: Bearer %s\r\nContent-Length: %d\r\n\r\n"
                % (key.encode(), len(body))
            )

        assert (await _first_line(gw, head("old-key"))).startswith(b"HTTP/1.1 401")
        assert (await _first_line(gw, head("new-key"))).startswith(b"HTTP/1.1 100")


async def test_a_request_keeps_the_limits_it_was_authorized_with(tmp_path: Path) -> None:
    """A reload while a request's body arrives (after its head was authorized) does not
    change the limits it is held to: it was accepted under the settings before."""
    path = tmp_path / "cluster.toml"
    _write(path, "lean_server = false\n" + _FIRST)
    first = load_config(path, env={}).gateway
    async with serve(1, settings=first, reload_from=_reader(path)) as gw:
        body = json.dumps(completion_body(max_tokens=9)).encode()
        head = (
            b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sk-a\r\nTransfer-Encoding: chunked\r\n\r\n"
        )

        async def reload_now() -> None:
            await asyncio.sleep(0.1)  # (the head is read and authorized by then)
            _write(path, "lean_server = false\n" + _SECOND)  # max_tokens_limit = 8, sk-a gone
            assert (await _reload(gw, "admin-1"))[0] == 200

        chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        line = await _first_line(gw, head, chunk, reload_now)
        assert line.startswith(b"HTTP/1.1 200"), line
        assert await _post(gw, "sk-a") == 401  # the next one is checked by the new keys


async def test_what_the_answer_says_of_order_start_only_keys_and_an_open_gateway(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cluster.toml"
    two = (
        'api_keys = ["k1", "k2"]\n'
        '[[gateway.tenants]]\nuser = "a"\napi_key = "ka"\n'
        '[[gateway.tenants]]\nuser = "b"\napi_key = "kb"\n'
    )
    _write(path, two)
    first = load_config(path, env={}).gateway
    async with serve(1, settings=first, reload_from=_reader(path)) as gw:
        swapped = (
            'api_keys = ["k2", "k1"]\nworkers = 4\nshutdown_timeout_s = 5.0\n'
            '[[gateway.tenants]]\nuser = "b"\napi_key = "kb"\n'
            '[[gateway.tenants]]\nuser = "a"\napi_key = "ka"\n'
        )
        _write(path, swapped)
        status, body = await _reload(gw, "-")
        assert status == 200
        assert body["applied"] == []  # the same keys and tenants, in another order
        assert body["restart_required"] == ["shutdown_timeout_s"]  # (workers: never used)
        assert body["warnings"] == []
        _write(path, "")  # no key left: said, and applied (the operator's choice)
        status, body = await _reload(gw, "-")
        assert body["applied"] == ["api_keys", "tenants"]
        assert body["warnings"] == [
            "the gateway has no API key now: anyone who can reach it may use the OpenAI routes"
        ]
        assert await _post(gw, "anything") == 200


async def test_reloads_run_one_at_a_time_the_last_asked_for_wins(tmp_path: Path) -> None:
    """Two reloads at once: the second reads the file after the first has applied what it
    read, so a slow first read never puts an older file back; requests are served while a
    file is read (in a thread)."""
    path = tmp_path / "cluster.toml"
    _write(path, 'api_keys = ["v0"]\n')
    first = load_config(path, env={}).gateway
    reads = 0
    gate, reading = threading.Event(), threading.Event()

    def slow_then_fast() -> GatewaySettings:
        nonlocal reads
        reads += 1
        table = load_config(path, env={}).gateway
        # the first read holds what it read until the second is asked for (a read on the
        # event loop would hold the loop, and the test with it: it would never be let go)
        reading.set()
        if reads == 1 and not gate.wait(5):
            raise RuntimeError("the file was read on the event loop")
        return table

    async with serve(1, settings=first, reload_from=slow_then_fast) as gw:
        _write(path, 'api_keys = ["v1"]\n')
        one = asyncio.create_task(_reload(gw, "-"))
        assert await asyncio.to_thread(reading.wait, 5)
        assert await _post(gw, "v0") == 200  # served while the file is read
        _write(path, 'api_keys = ["v2"]\n')
        two = asyncio.create_task(_reload(gw, "-"))
        await asyncio.sleep(0.2)
        gate.set()
        assert [(await one)[0], (await two)[0]] == [200, 200]
        assert [await _post(gw, key) for key in ("v1", "v2")] == [401, 200]


async def test_a_reload_that_fails_unexpectedly_is_counted_and_lets_the_next_run(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cluster.toml"
    _write(path, 'api_keys = ["k"]\n')
    first = load_config(path, env={}).gateway
    calls = 0

    def flaky() -> GatewaySettings:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the disk went away")
        return load_config(path, env={}).gateway

    async with serve(1, settings=first, reload_from=flaky) as gw:
        assert (await _reload(gw, "-"))[0] == 500
        _write(path, 'api_keys = ["k2"]\n')
        assert (await _reload(gw, "-"))[0] == 200
        assert await _post(gw, "k2") == 200
        async with _fresh() as http, http.get(gw.url("/metrics")) as r:
            exposition = await r.text()
        assert 'sage_llm_gateway_reloads_total{outcome="failed"} 1.0' in exposition
        assert 'sage_llm_gateway_reloads_total{outcome="applied"} 1.0' in exposition


async def test_a_reload_whose_client_leaves_still_ends(tmp_path: Path) -> None:
    """Begun, a reload is applied and counted though its client went away."""
    path = tmp_path / "cluster.toml"
    _write(path, 'api_keys = ["k"]\n')
    first = load_config(path, env={}).gateway
    gate, reading = threading.Event(), threading.Event()

    def slow() -> GatewaySettings:
        table = load_config(path, env={}).gateway
        reading.set()
        gate.wait(5)
        return table

    async with serve(1, settings=first, reload_from=slow) as gw:
        _write(path, 'api_keys = ["k2"]\n')
        asked = asyncio.create_task(_reload(gw, "-"))
        assert await asyncio.to_thread(reading.wait, 5)
        asked.cancel()  # the client goes away
        with pytest.raises(asyncio.CancelledError):
            await asked
        gate.set()
        for _ in range(100):
            if await _post(gw, "k2") == 200:
                break
            await asyncio.sleep(0.02)
        assert await _post(gw, "k") == 401
