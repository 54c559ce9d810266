"""VLLMService engines: HTTP endpoints (generation, embeddings, models, failures) and sim."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from sage_llm.errors import (
    ConflictError,
    DeadlineExceededError,
    EngineConnectionError,
    InvalidRequestError,
    ModelNotFoundError,
)
from sage_llm.service import ControlPlaneVLLMService, VLLMService
from sage_llm.service.backends import EngineBackend, make_backend, service_instance
from sage_llm.service.config import VLLMServiceConfig
from sage_llm.service.payloads import RequestDefaults, parse_generate
from sage_llm.sim.clock import VirtualEventLoop, run_virtual
from sage_llm.types import ExecutionInstanceType
from tests.service.fleets import MODEL


def test_service_instance_describes_the_engine() -> None:
    cfg = VLLMServiceConfig.from_dict(
        {"model_id": MODEL, "host": "10.0.0.5", "port": 8001, "dialect": "sglang",
         "api_key": "k", "engine": {"tensor_parallel_size": 2}}
    )  # fmt: skip
    inst = service_instance(cfg)
    assert (inst.host, inst.port, inst.engine) == ("10.0.0.5", 8001, "sglang")
    assert inst.model_name == MODEL
    assert (inst.tensor_parallel_size, inst.api_key) == (2, "k")
    assert inst.instance_type is ExecutionInstanceType.GENERAL
    sim_cfg = VLLMServiceConfig.from_dict(
        {"model_id": MODEL, "engine": "sim", "sim": {"speed": 3, "gpu": "a100"}}
    )
    sim = service_instance(sim_cfg)
    assert sim.engine == "sim"
    assert sim.metadata == {"sim_gpu": "a100", "sim_speed": 3.0}
    assert isinstance(make_backend(sim_cfg), EngineBackend)


def test_embeddings_and_models_over_http(embeddings_server: str) -> None:
    config = {"model_id": "e5-small", "base_url": embeddings_server}
    with VLLMService(config) as svc:
        out = svc.process(
            {"task": "embed", "inputs": ["abc", "de"], "options": {"normalize": False}}
        )
        assert out == {"model_id": "e5-small", "vectors": [[3.0, 0.0], [2.0, 1.0]], "dimension": 2}
        unit = svc.process({"task": "embed", "inputs": "abcd"})
        assert unit["vectors"] == [[1.0, 0.0]]
        assert [m["model_id"] for m in svc.process({"task": "show_models"})] == ["e5-small"]


def test_embedding_model_id_is_the_default_embedding_model(embeddings_server: str) -> None:
    config = {"model_id": "chat", "embedding_model_id": "e5-small", "base_url": embeddings_server}
    with VLLMService(config) as svc:
        assert svc.process({"task": "embed", "inputs": "x"})["model_id"] == "e5-small"
        out = svc.process({"task": "embed", "inputs": "x", "options": {"model": "other"}})
        assert out["model_id"] == "other"


def test_an_unreachable_engine_raises_a_connection_error(dead_port: int) -> None:
    with VLLMService({"model_id": MODEL, "host": "127.0.0.1", "port": dead_port}) as svc:
        with pytest.raises(EngineConnectionError, match="Cannot connect"):
            svc.process({"inputs": "hello"})
        with pytest.raises(EngineConnectionError):
            svc.process({"task": "embed", "inputs": "hello"})


def test_model_mismatch_and_timeouts(engine_server: Callable[..., str]) -> None:
    url = engine_server(model=MODEL, speed=1.0)
    with VLLMService({"model_id": MODEL, "base_url": url}) as svc:
        with pytest.raises(ModelNotFoundError, match="serves 'llama-3-8b', not 'gpt-9'"):
            svc.process({"inputs": "x", "options": {"model": "gpt-9"}})
        with pytest.raises(DeadlineExceededError, match="generate did not finish"):
            svc.process({"inputs": "x", "options": {"max_tokens": 4000, "timeout": 0.05}})
        (entry,) = svc.process({"inputs": "still serving", "options": {"max_tokens": 2}})
        assert entry["usage"]["output_tokens"] == 2


def test_embed_waits_no_longer_than_the_services_request_timeout(embeddings_server: str) -> None:
    """``request_timeout_s`` is the default ``timeout`` of an ``embed`` call as of a
    ``generate`` one, in both services (an engine that never answers held the call)."""
    port = int(embeddings_server.rsplit(":", 1)[1])
    instance = {"instance_id": "e", "host": "127.0.0.1", "port": port, "model_name": "e5-small"}
    services: list[VLLMService | ControlPlaneVLLMService] = [
        VLLMService(
            {"model_id": "e5-small", "base_url": embeddings_server, "request_timeout_s": 0.2}
        ),
        ControlPlaneVLLMService(
            {"request_timeout_s": 0.2, "enable_pd_separation": False, "instances": [instance]}
        ),
    ]
    for service in services:
        with service as svc:
            assert svc.process({"task": "embed", "inputs": "ok"})["dimension"] == 2
            with pytest.raises(DeadlineExceededError, match=r"0\.2 s"):
                svc.process({"task": "embed", "inputs": ["a", "hang"]})


def test_an_engine_without_embeddings_is_the_clients_error_on_both_services(
    engine_server: Callable[..., str],
) -> None:
    """An engine that answers /v1/embeddings 404 (engine-sim has none) refuses the request
    as the client's error, on VLLMService's HTTP path as through the control plane."""
    with VLLMService({"model_id": MODEL, "base_url": engine_server()}) as svc:
        with pytest.raises(
            InvalidRequestError, match="not served by an engine that supports"
        ) as err:
            svc.process({"task": "embed", "inputs": "x", "options": {"model": MODEL}})
        assert err.value.param == "options.model"  # the payload's part, as a generation's
        with pytest.raises(
            InvalidRequestError, match="not served by an engine that supports"
        ) as err:
            svc.process({"task": "embed", "inputs": "x"})
        assert err.value.param is None  # no model given (it had named options.model)


def test_engine_refusals_and_id_clashes_name_the_payloads_part_as_the_control_plane_does() -> None:
    """VLLMService's errors are those of ControlPlaneVLLMService: a refused field is named
    as the option it came from (``options.max_tokens``, in a batch ``inputs[1].…``), and a
    request id already running is a ConflictError."""

    async def main() -> None:
        cfg = VLLMServiceConfig.from_dict({"model_id": MODEL, "engine": "sim"})
        backend = EngineBackend(cfg)
        await backend.start()
        try:
            big = parse_generate(["a"], {"max_tokens": 10**6}, RequestDefaults())
            with pytest.raises(InvalidRequestError) as one:
                await backend.generate(big, ["r1"])
            assert one.value.param == "options.max_tokens"
            two = parse_generate(["a", {"prompt": "b", "options": {"max_tokens": 10**6}}],
                                 {"max_tokens": 2}, RequestDefaults())  # fmt: skip
            with pytest.raises(InvalidRequestError) as batch:
                await backend.generate(two, ["b-0", "b-1"])
            assert batch.value.param == "inputs[1].options.max_tokens"
            assert str(batch.value).startswith("inputs[1]: ")
            other = parse_generate(["a"], {"model": "zzz"}, RequestDefaults())
            with pytest.raises(ModelNotFoundError) as model:
                await backend.generate(other, ["m1"])
            assert model.value.param == "options.model"
            slow = parse_generate(["a"], {"max_tokens": 200}, RequestDefaults())
            first = asyncio.ensure_future(backend.generate(slow, ["dup"]))
            await asyncio.sleep(0.01)
            with pytest.raises(ConflictError, match="request 'dup' is already in progress"):
                await backend.generate(slow, ["dup"])
            assert len(await first) == 1  # the first one runs on
            assert len(await backend.generate(slow, ["dup"])) == 1  # and its id is free again
        finally:
            await backend.aclose()

    run_virtual(main())


def test_a_logprobs_count_of_0_returns_the_sampled_tokens_logprobs() -> None:
    """0 asks for the sampled tokens' own logprobs (0 == False would drop them)."""
    with VLLMService({"model_id": MODEL, "engine": "sim"}, loop_factory=VirtualEventLoop) as svc:
        for count in (0, 1):
            (entry,) = svc.generate("Hello there", max_tokens=3, logprobs=count)
            assert len(entry["generations"][0]["logprobs"]) == 3, count
        (entry,) = svc.generate("Hello there", max_tokens=3)
        assert entry["generations"][0]["logprobs"] is None


def test_the_shortest_timeout_of_a_batchs_items_applies_to_the_whole_call() -> None:
    """As on the control plane (a longer item's timeout had let the call run on)."""
    with VLLMService({"model_id": MODEL, "engine": "sim"}, loop_factory=VirtualEventLoop) as svc:
        batch = [
            {"prompt": "write a long essay", "options": {"timeout": 20}},
            {"prompt": "write another", "options": {"timeout": 0.05}},
        ]
        with pytest.raises(DeadlineExceededError, match=r"within the 0\.05 s timeout"):
            svc.generate(batch, max_tokens=4000)


def test_a_batch_item_failing_fast_cancels_the_others_and_frees_their_ids() -> None:
    with VLLMService({"model_id": MODEL, "engine": "sim"}, loop_factory=VirtualEventLoop) as svc:
        batch = [
            {"prompt": "write a long essay", "options": {"request_id": "r2", "max_tokens": 4000}},
            {"prompt": "bad", "options": {"model": "other/model"}},
        ]
        with pytest.raises(ModelNotFoundError):
            svc.generate(batch)
        (entry,) = svc.generate("hi", max_tokens=2, request_id="r2")  # not a ConflictError
        assert entry["request_id"] == "r2"
