"""PD disaggregation over two real vLLM CPU engines (the tiny Llama) with NIXL moving the KV
in host memory: a prefill engine and a decode engine, started by :mod:`sage_llm.launch`,
registered with a PD control plane (the ``vllm`` connector), served through the gateway.

Every request goes PD (a fleet of prefill and decode instances only has no colocated path,
docs/pd.md). The answers are compared with the same request sent straight to the prefill
engine, and the decode engine's own counters show that it computed none of the prompt.
The tests share one fleet (starting vLLM takes about a minute) and run in file order; each
uses a prompt of its own (shorter than a KV block, so no engine finds it in its prefix
cache).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from sage_llm import ControlPlaneManager
from sage_llm.bench.fidelity import EngineShape
from sage_llm.bench.fidelity_real import real_vllm_paths, vllm_cpu_settings
from sage_llm.control_plane.health import HealthSettings
from sage_llm.engines.metrics_scrape import parse_prometheus_text
from sage_llm.launch import LaunchedFleet
from sage_llm.launch.plan_to_engines import engines_from_plan, planned_instances_from_dicts
from sage_llm.types import PDSeparationConfig, RequestResult, RequestStatus
from tests.factories import free_ports
from tests.real.conftest import served_fleet
from tests.real_pd.conftest import ROOT, nixl_dir, skip_reason

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny"
# vLLM's CPU build needs the KV buffer in host memory; the lease outlasts a starved decode
# engine's late pull on a loaded machine (docs/pd.md). The launcher adds them to its
# NixlConnector / kv_both --kv-transfer-config.
KV_TRANSFER = {"kv_buffer_device": "cpu", "kv_connector_extra_config": {"kv_lease_duration": 600}}
BY_SOURCE = "vllm:prompt_tokens_by_source_total"


@dataclass
class PDFleet:
    manager: ControlPlaneManager
    fleet: LaunchedFleet
    url: str

    @property
    def prefill(self) -> str:
        return self.fleet.instances[0].instance_id

    @property
    def decode(self) -> str:
        return self.fleet.instances[1].instance_id

    @property
    def prefill_url(self) -> str:
        return self.fleet.base_urls[0]

    @property
    def decode_url(self) -> str:
        return self.fleet.base_urls[1]


def _port(name: str, count: int) -> int:
    """The first of ``count`` ports: ``$name`` when set, else free ones."""
    given = os.environ.get(name)
    return int(given) if given else free_ports(count)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pd(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PDFleet]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    python, model_dir = real_vllm_paths(ROOT)
    base = _port("SAGE_LLM_REAL_PD_PORT", 3)  # prefill, decode, gateway
    settings = vllm_cpu_settings(
        python, model_dir, base_port=base, served_model_name=MODEL,
        shape=EngineShape(max_num_seqs=16, max_num_batched_tokens=2048),
        log_dir=tmp_path_factory.mktemp("vllm-pd-logs"),
    )  # fmt: skip
    settings = replace(
        settings,
        kv_transfer_config=KV_TRANSFER,
        kv_base_port=_port("SAGE_LLM_REAL_PD_KV_PORT", 2),
        env={**settings.env, "PYTHONPATH": str(nixl_dir()),
             "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1"},
    )  # fmt: skip
    engines = engines_from_plan(
        planned_instances_from_dicts([{"role": "prefill"}, {"role": "decode"}]), settings
    )
    manager = ControlPlaneManager(
        scheduling_policy="fifo", routing_strategy="load_balanced", enable_pd_separation=True,
        pd_config=PDSeparationConfig(
            routing_policy="threshold", prefilling_threshold_input_tokens=1,
            prefilling_threshold_ratio=0.0, connector="vllm", fallback_to_colocated=True,
        ),
        stats_interval_s=0.25, max_retries=2,
        # a loaded 2-core machine answers probes late (docs/pd.md)
        health=HealthSettings(interval_s=0.5, timeout_s=30.0, stats_interval_s=0.25,
                              stall_timeout_s=None),
    )  # fmt: skip
    gw_port = base + 2 if os.environ.get("SAGE_LLM_REAL_PD_PORT") else 0
    async with (
        manager,
        served_fleet(manager, engines, settings, gateway_port=gw_port) as (fleet, url),
    ):
        yield PDFleet(manager, fleet, url)


# -- helpers ---------------------------------------------------------------------------------


async def _post(
    url: str, path: str, body: dict[str, Any], rid: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"X-Request-Id": rid} if rid else {}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}{path}", json=body, headers=headers) as resp,
    ):
        data: dict[str, Any] = await resp.json(content_type=None)
        return resp.status, data


async def _ok(url: str, path: str, body: dict[str, Any], rid: str | None = None) -> dict[str, Any]:
    status, data = await _post(url, path, body, rid)
    assert status == 200, data
    return data


async def _stream(
    url: str, path: str, body: dict[str, Any], rid: str
) -> tuple[str, dict[str, Any], str | None]:
    """The streamed text, the usage chunk's usage and the last finish_reason."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    text: list[str] = []
    usage: dict[str, Any] = {}
    finish: str | None = None
    events: list[str] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}{path}", json=body, headers={"X-Request-Id": rid}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append(line.removeprefix("data:").strip())
    assert events[-1] == "[DONE]", events[-3:]
    for chunk in map(json.loads, events[:-1]):
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or ():
            text.append(choice.get("text") or (choice.get("delta") or {}).get("content") or "")
            finish = choice.get("finish_reason") or finish
    return "".join(text), usage, finish


async def _by_source(url: str) -> dict[str, float]:
    """The engine's prompt tokens by where their KV came from (vLLM 0.32's counter:
    ``local_compute``, ``local_cache_hit``, ``external_kv_transfer``)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        samples = parse_prometheus_text(await resp.text())
    return {labels["source"]: value for labels, value in samples.get(BY_SOURCE, [])}


async def _until(probe: Any, ok: Any, timeout_s: float = 30.0) -> Any:
    """Poll ``await probe()`` until ``ok(value)`` or the time is up; the last value (an
    engine updates its counters after its answer)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = await probe()
        if ok(value) or loop.time() > deadline:
            return value
        await asyncio.sleep(0.1)


async def _running(url: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        samples = parse_prometheus_text(await resp.text())
    return sum(v for _, v in samples.get("vllm:num_requests_running", []))


async def _result(fleet: PDFleet, rid: str, timeout_s: float = 30.0) -> RequestResult:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        result = await fleet.manager.get_result(rid)
        if result is not None:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"no result recorded for {rid}")


async def _gateway_pd_requests(fleet: PDFleet) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(f"{fleet.url}/metrics") as resp:
        samples = parse_prometheus_text(await resp.text())
    return {labels["path"]: v for labels, v in samples.get("sage_llm_pd_requests_total", [])}


def _usage(usage: dict[str, Any]) -> tuple[int, int, int]:
    return usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]


async def _check_pd(
    fleet: PDFleet, path: str, body: dict[str, Any], text_of: Any, rid: str
) -> None:
    """``body`` through the gateway, non-streamed then streamed, answers as the prefill
    engine alone does, and each went PD: the decode engine took the prompt's KV from the
    prefill engine and computed none of it."""
    direct = await _ok(fleet.prefill_url, path, body)
    want_text, want_usage = text_of(direct), _usage(direct["usage"])
    prompt = direct["usage"]["prompt_tokens"]
    assert prompt > 0 and direct["usage"]["completion_tokens"] == body["max_tokens"]
    for stream in (False, True):
        before = await _by_source(fleet.decode_url)
        paths_before = await _gateway_pd_requests(fleet)
        r = f"{rid}-{'stream' if stream else 'plain'}"
        if stream:
            got_text, usage, finish = await _stream(fleet.url, path, body, r)
            assert finish == "length"
        else:
            answer = await _ok(fleet.url, path, body, r)
            got_text, usage = text_of(answer), answer["usage"]
        assert got_text == want_text, (stream, got_text, want_text)
        assert _usage(usage) == want_usage, (stream, usage, direct["usage"])
        result = await _result(fleet, r)
        assert result.status is RequestStatus.COMPLETED, result
        assert (result.prefill_instance_id, result.instance_id) == (fleet.prefill, fleet.decode)
        assert (result.prompt_tokens, result.completion_tokens) == want_usage[:2]
        after = await _until(
            lambda: _by_source(fleet.decode_url),
            lambda c, b=before: (
                c.get("external_kv_transfer", 0) >= b.get("external_kv_transfer", 0) + prompt
            ),
        )
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert delta == {"external_kv_transfer": prompt, "local_compute": 0,
                         "local_cache_hit": 0}, (stream, delta)  # fmt: skip
        paths = await _gateway_pd_requests(fleet)
        assert paths.get("disaggregated", 0) == paths_before.get("disaggregated", 0) + 1
        assert paths.get("colocated", 0) == paths_before.get("colocated", 0) == 0


def _completion_text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["text"])


def _chat_text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["message"]["content"])


# -- tests -------------------------------------------------------------------------------------


async def test_completion_through_pd_answers_as_one_engine(pd: PDFleet) -> None:
    body = {"model": MODEL, "prompt": "The quick brown fox jumps over the lazy dog again",
            "max_tokens": 12, "temperature": 0.0, "ignore_eos": True}  # fmt: skip
    await _check_pd(pd, "/v1/completions", body, _completion_text, "pd-completion")


async def test_chat_through_pd_answers_as_one_engine(pd: PDFleet) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about rivers."}],
            "max_tokens": 10, "temperature": 0.0, "ignore_eos": True}  # fmt: skip
    await _check_pd(pd, "/v1/chat/completions", body, _chat_text, "pd-chat")


async def test_two_samples_are_refused_naming_n_without_a_whole_request_instance(
    pd: PDFleet,
) -> None:
    body = {"model": MODEL, "prompt": "Two samples of this", "max_tokens": 4, "n": 2}
    status, data = await _post(pd.url, "/v1/completions", body)
    assert status == 400, data
    assert data["error"]["param"] == "n", data
    assert "n=2" in data["error"]["message"]
    running = [await _running(u) for u in (pd.prefill_url, pd.decode_url)]
    assert running == [0, 0]  # nothing was sent to either engine


async def test_a_client_leaving_mid_decode_cancels_and_the_engines_stay_healthy(
    pd: PDFleet,
) -> None:
    rid = "pd-cancel"
    body = {"model": MODEL, "prompt": "Count slowly to a thousand", "max_tokens": 480,
            "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip
    chunks = 0
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{pd.url}/v1/completions", json=body, headers={"X-Request-Id": rid}) as resp,
    ):
        assert resp.status == 200
        async for raw in resp.content:
            if raw.startswith(b"data:") and b'"text"' in raw:
                chunks += 1
                if chunks == 3:  # decoding on the decode engine: leave
                    resp.close()
                    break
    assert chunks == 3
    result = await _result(pd, rid)
    assert result.status is RequestStatus.CANCELLED, result
    assert (result.prefill_instance_id, result.instance_id) == (pd.prefill, pd.decode)
    assert result.completion_tokens < 480
    # the decode engine aborted the decode too
    assert await _until(lambda: _running(pd.decode_url), lambda n: n == 0) == 0
    after = await _ok(
        pd.url, "/v1/completions",
        {"model": MODEL, "prompt": "Still served after that", "max_tokens": 6,
         "temperature": 0.0, "ignore_eos": True}, rid="pd-after-cancel",
    )  # fmt: skip
    assert after["usage"]["completion_tokens"] == 6
    last = await _result(pd, "pd-after-cancel")
    assert last.status is RequestStatus.COMPLETED
    assert (last.prefill_instance_id, last.instance_id) == (pd.prefill, pd.decode)
    for iid in (pd.prefill, pd.decode):
        assert pd.manager.get_instance_metrics(iid)["is_healthy"] is True
    status = pd.manager.get_status()["pd"]
    assert status["connector"]["kv_release_failures"] == 0, status
    assert status["colocated_fallbacks"] == 0, status


async def test_a_request_for_its_prompts_logprobs_is_answered_right_by_the_pair(
    pd: PDFleet,
) -> None:
    """A request for its prompt's logprobs (``prompt_logprobs``; ``echo`` with logprobs)
    through the pair answers as the engine alone does, and the decode engine computed
    every prompt token itself: vLLM reads no KV for such a prompt, which is why the
    control plane runs these colocated where it can (this fleet has no whole-request
    instance). The KV the prefill leg left unread is then released by a pull, which the
    decode engine counts as a transfer."""
    bodies = {
        "pd-plp": {"prompt": "Weigh every word of this prompt", "prompt_logprobs": 1},
        "pd-echo": {"prompt": "Echo each word of this line", "echo": True, "logprobs": 1},
    }
    for rid, fields in bodies.items():
        body = {"model": MODEL, "max_tokens": 3, "temperature": 0.0, "ignore_eos": True,
                **fields}  # fmt: skip
        direct = await _ok(pd.prefill_url, "/v1/completions", body)
        before = await _by_source(pd.decode_url)
        released = pd.manager.get_status()["pd"]["connector"]["kv_releases"]
        got = await _ok(pd.url, "/v1/completions", body, rid)
        for key in ("text", "logprobs", "prompt_logprobs"):
            assert got["choices"][0].get(key) == direct["choices"][0].get(key), (rid, key)
        assert got["usage"] == direct["usage"], rid
        result = await _result(pd, rid)
        assert (result.prefill_instance_id, result.instance_id) == (pd.prefill, pd.decode)
        prompt = direct["usage"]["prompt_tokens"]
        after = await _until(
            lambda: _by_source(pd.decode_url),
            lambda c, b=before, n=prompt: (
                c.get("local_compute", 0) >= b.get("local_compute", 0) + n
                and c.get("external_kv_transfer", 0) >= b.get("external_kv_transfer", 0) + n
            ),
        )
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert delta == {"external_kv_transfer": prompt, "local_compute": prompt,
                         "local_cache_hit": 0}, (rid, delta)  # fmt: skip

        async def connector_status() -> dict[str, Any]:
            return dict(pd.manager.get_status()["pd"]["connector"])

        status = await _until(connector_status, lambda c, n=released: c["kv_releases"] > n)
        assert (status["kv_releases"], status["kv_release_failures"]) == (released + 1, 0)
