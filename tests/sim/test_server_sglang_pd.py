"""SGLang's PD protocol over engine-sim: one body with ``bootstrap_host``/``bootstrap_port``/
``bootstrap_room`` goes to a prefill server and a decode server at once; the decode server
fetches the room's KV parameters from the prefill server, then decodes. Last, sglang-router
in PD mode drives two engine-sim processes (skipped when it is not installed)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest

from sage_llm.bench import procs
from sage_llm.bench.peers import PeerError, PeerInstall, ensure_peer, peers_dir
from sage_llm.bench.procs import counter_total, free_ports, start_engine_sims
from sage_llm.engines.metrics_scrape import parse_prometheus_text
from sage_llm.errors import EngineError, EngineTimeoutError, InvalidRequestError
from sage_llm.sim import server as sim_server
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.engine import SimEngine, SimEngineConfig
from sage_llm.sim.server import (
    BOOTSTRAP_PATH,
    Bootstrap,
    BootstrapRooms,
    HTTPKVReleaser,
    parse_bootstrap,
    start_engine_server,
)
from sage_llm.types import ExecutionInstanceType as Role
from tests.engines.fake_engine import FakeEngine

MODEL = "llama-3-8b"
PROMPT = " ".join(["word"] * 300)


# --- parsing and rooms ---------------------------------------------------------------------


def test_parse_bootstrap_reads_and_checks_the_fields() -> None:
    assert parse_bootstrap({"prompt": "x"}) is None
    assert parse_bootstrap({"bootstrap_room": None}) is None
    got = parse_bootstrap({"bootstrap_host": "10.0.0.1", "bootstrap_port": 8998,
                           "bootstrap_room": 2**63 - 1})  # fmt: skip
    assert got == Bootstrap("10.0.0.1", 8998, 2**63 - 1)
    assert parse_bootstrap({"bootstrap_room": 5}) == Bootstrap(None, None, 5)
    assert parse_bootstrap({"bootstrap_room": 2**64 - 1}) == Bootstrap(None, None, 2**64 - 1)
    for room in (-1, 2**64):  # a room is an unsigned 64-bit number, as SGLang's
        with pytest.raises(InvalidRequestError, match=r"in \[0, 2\^64\)") as caught:
            parse_bootstrap({"bootstrap_room": room})
        assert caught.value.param == "bootstrap_room"
    for bad in (
        {"bootstrap_room": [1, 2]},
        {"bootstrap_room": True},
        {"bootstrap_room": "7"},
        {"bootstrap_room": 1, "bootstrap_port": 0},
        {"bootstrap_room": 1, "bootstrap_host": 5},
    ):
        with pytest.raises(InvalidRequestError):
            parse_bootstrap(bad)


def test_rooms_pair_the_legs_whichever_comes_first() -> None:
    async def main() -> None:
        rooms = BootstrapRooms(ttl_s=30.0)
        rooms.publish(1, {"remote_request_id": "a"})  # prefill first
        assert await rooms.take(1, 5.0) == {"remote_request_id": "a"}
        waiter = asyncio.create_task(rooms.take(2, 5.0))  # decode first
        await asyncio.sleep(1.0)
        rooms.publish(2, {"remote_request_id": "b"})
        assert await waiter == {"remote_request_id": "b"}
        rooms.fail(3, "engine crashed")
        with pytest.raises(EngineError, match="engine crashed"):
            await rooms.take(3, 5.0)
        with pytest.raises(EngineTimeoutError, match="room 4"):
            await rooms.take(4, 2.0)
        assert len(rooms) == 1  # room 4 waits for its TTL
        await asyncio.sleep(30.0)
        assert len(rooms) == 0  # expired: a leg that comes now files a new room
        rooms.publish(4, {"remote_request_id": "late"})
        assert await rooms.take(4, 5.0) == {"remote_request_id": "late"}

    run_virtual(main())


def test_a_room_nobody_takes_expires_and_hands_its_kv_back() -> None:
    async def main() -> list[str]:
        released: list[str] = []
        rooms = BootstrapRooms(ttl_s=10.0, on_expire=lambda p: released.append(p["id"]))
        rooms.publish(9, {"id": "orphan"})
        rooms.fail(8, "aborted")
        await asyncio.sleep(11.0)
        assert len(rooms) == 0
        return released

    assert run_virtual(main()) == ["orphan"]


def test_a_room_taken_before_its_ttl_hands_nothing_back_at_it() -> None:
    """The decode leg that took a room owns its KV: the room's TTL then releases none."""

    async def main() -> list[str]:
        released: list[str] = []
        rooms = BootstrapRooms(ttl_s=10.0, on_expire=lambda p: released.append(p["id"]))
        rooms.publish(9, {"id": "taken"})
        assert await rooms.take(9, 1.0) == {"id": "taken"}
        await asyncio.sleep(11.0)
        return released

    assert run_virtual(main()) == []
    with pytest.raises(ValueError, match="ttl_s must be > 0"):
        BootstrapRooms(ttl_s=0)


# --- two engine servers in this process ----------------------------------------------------


@pytest.fixture
async def pd_servers() -> AsyncIterator[tuple[SimEngine, SimEngine, int, int]]:
    p_port, d_port = free_ports(2)
    prefill = SimEngine("p0", SimEngineConfig(speed=100.0, role=Role.PREFILLING, kv_port=p_port))
    decode = SimEngine("d0", SimEngineConfig(speed=100.0, role=Role.DECODING, kv_port=d_port))
    p_runner, _ = await start_engine_server(prefill, model_name=MODEL, port=p_port)
    d_runner, _ = await start_engine_server(decode, model_name=MODEL, port=d_port)
    try:
        yield prefill, decode, p_port, d_port
    finally:
        for engine in (prefill, decode):
            await engine.aclose()
        for runner in (p_runner, d_runner):
            await runner.cleanup()


def _body(room: int, port: int | None, *, stream: bool, max_tokens: int = 8) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "stream": stream,
        "bootstrap_host": "127.0.0.1", "bootstrap_port": port, "bootstrap_room": room,
    }  # fmt: skip
    if stream:  # stream_options only with stream, as vLLM and OpenAI accept them
        body["stream_options"] = {"include_usage": True}
    return body


async def _post(http: aiohttp.ClientSession, port: int, body: dict[str, Any]) -> Any:
    async with http.post(f"http://127.0.0.1:{port}/v1/completions", json=body) as resp:
        if body.get("stream") and resp.status == 200:
            events = [line[6:] for line in (await resp.text()).splitlines()
                      if line.startswith("data: ")]  # fmt: skip
            assert events[-1] == "[DONE]"
            return resp.status, [json.loads(e) for e in events[:-1]]
        return resp.status, await resp.json()


async def test_one_body_to_both_servers_runs_prefill_there_and_decode_here(
    pd_servers: tuple[SimEngine, SimEngine, int, int],
) -> None:
    prefill, decode, p_port, d_port = pd_servers
    async with aiohttp.ClientSession() as http:
        # decode first: it waits for the room; then the prefill leg arrives
        d_task = asyncio.create_task(_post(http, d_port, _body(11, p_port, stream=True)))
        await asyncio.sleep(0.05)
        p_status, p_events = await _post(http, p_port, _body(11, p_port, stream=True))
        d_status, d_events = await d_task
    assert (p_status, d_status) == (200, 200)
    # the prefill server computed the prompt and one token
    assert p_events[-1]["usage"]["completion_tokens"] == 1
    assert p_events[-1]["usage"]["prompt_tokens"] == 300
    # the decode server produced the whole output over the transferred KV
    assert d_events[-1]["usage"]["completion_tokens"] == 8
    assert "".join(e["choices"][0]["text"] for e in d_events if e["choices"])
    releaser = decode.remote_releaser
    assert isinstance(releaser, HTTPKVReleaser)
    await releaser.aclose()  # waits for the KV release sent to the prefill server
    assert (releaser.sent, releaser.failed) == (1, 0)
    assert prefill.core.kv_usage == 0.0


async def test_non_streamed_legs_and_a_decode_leg_that_cannot_find_its_prefill(
    pd_servers: tuple[SimEngine, SimEngine, int, int],
) -> None:
    _, _, p_port, d_port = pd_servers
    async with aiohttp.ClientSession() as http:
        both = await asyncio.gather(
            _post(http, p_port, _body(12, p_port, stream=False, max_tokens=5)),
            _post(http, d_port, _body(12, p_port, stream=False, max_tokens=5)),
        )
        assert [status for status, _ in both] == [200, 200]
        assert both[0][1]["usage"]["completion_tokens"] == 1
        assert both[1][1]["usage"]["completion_tokens"] == 5
        # no bootstrap port: a clear 400 instead of running the request whole
        status, err = await _post(http, d_port, _body(13, None, stream=False))
        assert status == 400
        assert "bootstrap_port" in err["error"]["message"]
        # the bootstrap endpoint gives up on a room that never comes
        url = f"http://127.0.0.1:{p_port}{BOOTSTRAP_PATH.format(room=14)}"
        async with http.get(url, params={"timeout_s": "0.05"}) as resp:
            assert resp.status == 504
        async with http.get(url, params={"timeout_s": "nope"}) as resp:
            assert resp.status == 400
        # a room of digits int() refuses ("²" is isdigit()): the documented 400, not a 500
        bad = f"http://127.0.0.1:{p_port}{BOOTSTRAP_PATH.format(room='%C2%B2')}"
        async with http.get(bad, params={"timeout_s": "0.05"}) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["param"] == "room"


class _PrefillFake(FakeEngine):
    """A prefill-role fake engine that notes the KV it is told to unpin."""

    config = SimpleNamespace(role=Role.PREFILLING)

    def __init__(self, *, fail_with: EngineError | None = None) -> None:
        super().__init__(fail_with=fail_with)
        self.released: list[str] = []

    def release_kv(self, request_id: str) -> bool:
        self.released.append(request_id)
        return True


class _QuickRooms(BootstrapRooms):
    """Rooms that expire at once, and say when one has."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(ttl_s=0.01, **kwargs)
        self.expired = asyncio.Event()

    def _expire(self, room: int, fut: asyncio.Future[Any]) -> None:
        super()._expire(room, fut)
        self.expired.set()


def _leg(room: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "x", "max_tokens": 4, "bootstrap_room": room}


async def test_a_room_no_decode_leg_takes_releases_its_prefill_kv(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As documented (``BOOTSTRAP_WAIT_S``): a filed room that waits past its time to be
    fetched has its KV released, so an abandoned leg does not hold the prefill cache."""
    made: list[_QuickRooms] = []

    def rooms(**kwargs: Any) -> _QuickRooms:
        made.append(_QuickRooms(**kwargs))
        return made[-1]

    monkeypatch.setattr(sim_server, "BootstrapRooms", rooms)
    engine = _PrefillFake()
    runner, port = await start_engine_server(engine, model_name=MODEL, shutdown_timeout=1.0)
    try:
        async with aiohttp.ClientSession() as http:
            status, out = await _post(http, port, _leg(21))
        assert status == 200 and out["usage"]["completion_tokens"] == 1
        await asyncio.wait_for(made[0].expired.wait(), timeout=10)
        assert engine.released == [engine.prefills[0].request_id]
    finally:
        await runner.cleanup()


async def test_a_non_streamed_prefill_leg_is_a_finished_request_in_the_metrics() -> None:
    """Its one token is timed and the leg counted as a finished request (``length``), as
    a streamed leg is."""
    runner, port = await start_engine_server(_PrefillFake(), model_name=MODEL)
    try:
        async with aiohttp.ClientSession() as http:
            status, _ = await _post(http, port, _leg(23))
            assert status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                samples = parse_prometheus_text(await resp.text())
    finally:
        await runner.cleanup()
    assert counter_total(samples, "vllm:time_to_first_token_seconds_count") == 1.0
    ended = {labels["finished_reason"]: n for labels, n in samples["vllm:request_success_total"]}
    assert ended == {"abort": 0.0, "length": 1.0, "stop": 0.0}


async def test_a_failed_prefill_leg_fails_its_rooms_decode_leg_at_once() -> None:
    """A prefill leg that fails files its error under its room: the decode side's
    bootstrap fetch answers the failure, not a wait for a leg that will never come."""
    engine = _PrefillFake(fail_with=EngineError("engine crashed", status=503))
    runner, port = await start_engine_server(engine, model_name=MODEL, shutdown_timeout=1.0)
    try:
        async with aiohttp.ClientSession() as http:
            status, _ = await _post(http, port, _leg(22))
            assert status == 503
            url = f"http://127.0.0.1:{port}{BOOTSTRAP_PATH.format(room=22)}"
            async with http.get(url, params={"timeout_s": "5"}) as resp:
                assert resp.status == 502
                assert "engine crashed" in (await resp.json())["error"]["message"]
    finally:
        await runner.cleanup()


async def test_a_prefill_leg_its_client_left_fails_its_rooms_decode_leg() -> None:
    """A prefill leg aborted (its client gone) files that under its room: the decode leg
    that fetches the room fails with the reason at once, rather than wait for the leg."""
    engine = _PrefillFake()
    engine.gate_after = 0  # the prefill is held until its client goes
    runner, port = await start_engine_server(engine, model_name=MODEL, shutdown_timeout=1.0)
    try:
        async with aiohttp.ClientSession() as http:
            leg = asyncio.create_task(
                http.post(f"http://127.0.0.1:{port}/v1/completions", json=_leg(24))
            )
            await asyncio.wait_for(engine.gated.wait(), timeout=10)
            leg.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leg
            url = f"http://127.0.0.1:{port}{BOOTSTRAP_PATH.format(room=24)}"
            async with http.get(url, params={"timeout_s": "10"}) as resp:
                assert resp.status == 502
                message = (await resp.json())["error"]["message"]
        assert message == "prefill leg of bootstrap room 24 failed: the prefill leg was aborted"
    finally:
        engine.release.set()
        await runner.cleanup()


async def _answer_once(status: int, body: bytes) -> tuple[asyncio.Server, int]:
    """A server that answers every request with ``status`` and ``body``."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("status", "answer", "words"),
    [(None, b"", "bootstrap server {url} failed: ClientConnectorError"),
     (200, b"not json", "bootstrap server {url} failed: JSONDecodeError"),
     (404, b'{"error": {"message": "no such room"}}',
      "bootstrap room 31 at {url}: HTTP 404: no such room"),
     (200, b'{"kv_transfer_params": 5}',
      "bootstrap room 31 at {url}: HTTP 200: {'kv_transfer_params': 5}"),
     (500, b"[1]", "bootstrap room 31 at {url}: HTTP 500: [1]")],
    ids=["unreachable", "not-json", "error", "no-params", "not-an-object"],
)  # fmt: skip
async def test_a_decode_leg_whose_bootstrap_fetch_fails_is_a_502_naming_it(
    status: int | None, answer: bytes, words: str
) -> None:
    """The decode server's fetch of its room from the prefill server: unreachable, an
    answer that is not JSON, an error or no parameters fail the leg with a 502 that says
    where and what (the request ends failed, with no output)."""
    server: asyncio.Server | None = None
    if status is None:
        (port,) = free_ports(1)  # nothing listens there
    else:
        server, port = await _answer_once(status, answer)
    decode = FakeEngine("d0")
    decode.config = SimpleNamespace(role=Role.DECODING)  # type: ignore[attr-defined]
    runner, d_port = await start_engine_server(decode, model_name=MODEL, shutdown_timeout=1.0)
    try:
        async with aiohttp.ClientSession() as http:
            got, err = await _post(http, d_port, _body(31, port, stream=False))
    finally:
        await runner.cleanup()
        if server is not None:
            server.close()
            await server.wait_closed()
    assert got == 502
    url = f"http://127.0.0.1:{port}{BOOTSTRAP_PATH.format(room=31)}"
    assert err["error"]["message"].startswith(words.replace("{url}", url))
    assert decode.requests == []  # nothing decoded


# --- sglang-router in PD mode over engine-sim processes -----------------------------------


async def _installed_sglang_router() -> PeerInstall:
    """sglang-router from the peers cache; skip (never install here) when it is absent."""
    if not (peers_dir() / "sglang-router" / "bin").is_dir():
        pytest.skip("sglang-router is not installed (make bench-peers installs it)")
    try:
        return await ensure_peer("sglang-router")
    except PeerError as exc:
        pytest.skip(f"sglang-router is not usable: {exc.message}")


@pytest.mark.slow
async def test_sglang_router_pd_mode_disaggregates_over_engine_sim() -> None:
    install = await _installed_sglang_router()

    n, max_tokens = 12, 6
    async with await start_engine_sims(
        2, model=MODEL, speed=50.0, role=["prefill", "decode"]
    ) as fleet:
        pd: tuple[Sequence[str], Sequence[str]] = (
            fleet.urls_for("prefill"),
            fleet.urls_for("decode"),
        )
        async with await procs.start_peer_router("sglang-router", pd=pd, install=install) as router:
            assert router.pd
            async with aiohttp.ClientSession() as http:

                async def one(i: int) -> Any:
                    body = {"model": MODEL, "prompt": f"{PROMPT} {i}", "max_tokens": max_tokens,
                            "stream": i % 2 == 0}  # fmt: skip
                    async with http.post(f"{router.url}/v1/completions", json=body) as resp:
                        assert resp.status == 200, await resp.text()
                        return await resp.read()

                await asyncio.gather(*(one(i) for i in range(n)))
        metrics = await fleet.metrics()
    prefill, decode = metrics[pd[0][0]], metrics[pd[1][0]]
    # each request ran once per leg: one token on the prefill engine, the rest on decode
    assert counter_total(prefill, "vllm:request_success_total") == n
    assert counter_total(prefill, "vllm:generation_tokens_total") == n
    assert counter_total(decode, "vllm:request_success_total") == n
    assert counter_total(decode, "vllm:generation_tokens_total") == n * max_tokens
