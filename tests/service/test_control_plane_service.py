"""ControlPlaneVLLMService: payloads through a real control plane over simulated engines.

The service loop runs on virtual time (``loop_factory=VirtualEventLoop``): simulated
generation costs no real time and ordering results are exact.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sage_llm.errors import (
    ConfigError,
    ConfigErrors,
    ConflictError,
    ControlPlaneNotRunningError,
    DeadlineExceededError,
    EngineError,
    EngineRequestRejectedError,
    InstanceNotFoundError,
    InvalidRequestError,
    ModelNotFoundError,
    PolicyNotFoundError,
)
from sage_llm.service import ControlPlaneVLLMService, RequestDefaults
from sage_llm.sim.clock import VirtualEventLoop
from sage_llm.tokens import count_tokens
from tests.service.fleets import MODEL, sim_fleet

ENTRY_KEYS = {"generations", "usage", "request_id", "sage"}
GENERATION_KEYS = {"text", "token_ids", "logprobs", "finish_reason"}

SEED_TOML = """
[services.llm_control_plane]
type = "ControlPlaneVLLMService"
scheduling_policy = "adaptive"     # adaptive, slo_aware, priority, fifo, cost_optimized
enable_pd_separation = true
routing_strategy = "load_balanced" # load_balanced, affinity, locality, topology_aware
mode = "simulated"
enable_monitoring = false

[[services.llm_control_plane.instances]]
instance_id = "llm-prefill-1"
host = "localhost"
port = 8000
model_name = "meta-llama/Llama-2-7b"
instance_type = "PREFILLING"
tensor_parallel_size = 4

[[services.llm_control_plane.instances]]
instance_id = "llm-decode-1"
host = "localhost"
port = 8001
model_name = "meta-llama/Llama-2-7b"
instance_type = "DECODING"
tensor_parallel_size = 1
"""


def _service(config: Any = None, **kwargs: Any) -> ControlPlaneVLLMService:
    return ControlPlaneVLLMService(
        sim_fleet() if config is None else config, loop_factory=VirtualEventLoop, **kwargs
    )


@pytest.fixture
def svc() -> Iterator[ControlPlaneVLLMService]:
    with _service() as service:
        yield service


def _generate(svc: ControlPlaneVLLMService, inputs: Any, **options: Any) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = svc.process(
        {"task": "generate", "inputs": inputs, "options": options}
    )
    return result


def test_generate_a_prompt_returns_the_vllm_service_shape(svc: ControlPlaneVLLMService) -> None:
    (entry,) = _generate(svc, "What is a control plane?", max_tokens=12, request_id="q1")
    assert set(entry) == ENTRY_KEYS
    (gen,) = entry["generations"]
    assert set(gen) == GENERATION_KEYS
    assert count_tokens(gen["text"]) == 12
    assert len(gen["token_ids"]) == 12
    assert gen["logprobs"] is None
    assert gen["finish_reason"] == "length"
    # a count of 0 asks for the sampled tokens' own logprobs (0 == False had dropped them)
    (counted,) = _generate(svc, "What is a control plane?", max_tokens=3, logprobs=0)
    assert counted["generations"][0]["logprobs"] is not None
    assert entry["usage"] == {
        "input_tokens": count_tokens("What is a control plane?"),
        "output_tokens": 12,
    }
    assert entry["request_id"] == "q1"
    info = entry["sage"]
    assert info["status"] == "completed"
    assert info["priority"] == "NORMAL"
    assert info["instance_id"] in {"sim-0", "sim-1"}
    assert info["e2e_latency_ms"] >= info["ttft_ms"] > 0


def test_n_samples_are_the_generations_of_their_input(svc: ControlPlaneVLLMService) -> None:
    """``n`` (it had been refused: "send a batch instead"): each sample a generation of
    the input's entry, in order, the usage counting them all; a batch's inputs each
    have theirs."""
    (entry,) = _generate(svc, "What is a control plane?", max_tokens=4, n=3, logprobs=1)
    gens = entry["generations"]
    assert len(gens) == 3 and len({g["text"] for g in gens}) == 3
    assert all(count_tokens(g["text"]) == 4 and len(g["token_ids"]) == 4 for g in gens)
    assert all(g["finish_reason"] == "length" and g["logprobs"] for g in gens)
    assert entry["usage"]["output_tokens"] == 12
    first, second = _generate(svc, ["One", {"prompt": "Two", "options": {"n": 1}}], n=2,
                              max_tokens=2)  # fmt: skip
    assert [len(first["generations"]), len(second["generations"])] == [2, 1]


def test_generate_a_chat_and_a_mixed_batch(svc: ControlPlaneVLLMService) -> None:
    chat = [{"role": "user", "content": "Hello there"}]
    (one,) = _generate(svc, chat, max_tokens=4)
    assert one["usage"]["output_tokens"] == 4
    batch = _generate(
        svc,
        ["a", chat, {"prompt": "b", "options": {"max_tokens": 2, "priority": "HIGH"}}],
        max_tokens=3,
        request_id="batch",
    )
    assert [e["request_id"] for e in batch] == ["batch-0", "batch-1", "batch-2"]
    assert [e["usage"]["output_tokens"] for e in batch] == [3, 3, 2]
    assert [e["sage"]["priority"] for e in batch] == ["NORMAL", "NORMAL", "HIGH"]


def test_a_batch_runs_concurrently_across_the_fleet(svc: ControlPlaneVLLMService) -> None:
    batch = _generate(svc, [f"question {i}" for i in range(8)], max_tokens=16)
    assert len(batch) == 8
    assert {e["sage"]["instance_id"] for e in batch} == {"sim-0", "sim-1"}
    assert all(e["sage"]["queue_wait_ms"] == 0 for e in batch)  # 2 x 4 slots: no queueing


def test_higher_priority_requests_are_served_first_when_capacity_is_short() -> None:
    with _service(sim_fleet(instances=1, bound=1)) as svc:
        order = ["LOW", "LOW", "LOW", "BACKGROUND", "CRITICAL", "HIGH"]
        items = [{"prompt": f"q{i}", "options": {"priority": p}} for i, p in enumerate(order)]
        batch = _generate(svc, items, max_tokens=8)
    # One slot, the whole batch queued at once: served strictly by priority.
    latency = [e["sage"]["e2e_latency_ms"] for e in batch]
    low = latency[:3]
    assert latency[4] < latency[5] < min(low) <= max(low) < latency[3]
    assert batch[4]["sage"]["queue_wait_ms"] == 0  # CRITICAL went first


def test_a_batch_larger_than_the_queue_is_refused_without_a_retry_hint() -> None:
    """It is queued whole before any of it runs: a retry would be refused the same way."""
    with _service(sim_fleet(instances=1, bound=1, max_queue_size=3)) as svc:
        with pytest.raises(InvalidRequestError) as err:
            svc.generate(["x"] * 10, max_tokens=4)
        assert err.value.param == "inputs" and "parts of at most 3" in str(err.value)
        with pytest.raises(InvalidRequestError, match="a batch of 4 inputs"):
            svc.generate(["x"] * 4, max_tokens=4)  # one more than the queue holds
        assert len(svc.generate(["x"] * 3, max_tokens=4)) == 3


def test_process_is_safe_from_eight_threads_at_once(svc: ControlPlaneVLLMService) -> None:
    barrier = threading.Barrier(8)

    def call(n: int) -> list[dict[str, Any]]:
        barrier.wait()
        return _generate(svc, [f"t{n} a", f"t{n} b"], max_tokens=5, request_id=f"t{n}")

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    ids = [e["request_id"] for batch in results for e in batch]
    assert len(ids) == 16 == len(set(ids))
    assert all(e["usage"]["output_tokens"] == 5 for batch in results for e in batch)
    metrics = svc.process({"task": "get_metrics"})
    assert metrics["completed_requests"] == 16
    assert metrics["failed_requests"] == 0


def test_aprocess_serves_asyncio_callers(svc: ControlPlaneVLLMService) -> None:
    async def main() -> list[Any]:
        calls = [
            svc.aprocess({"task": "generate", "inputs": f"q{i}", "options": {"max_tokens": 3}})
            for i in range(4)
        ]
        return list(await asyncio.gather(*calls))

    results = asyncio.run(main())
    assert [r[0]["usage"]["output_tokens"] for r in results] == [3, 3, 3, 3]


def test_a_cancelled_aprocess_frees_its_request_id_when_it_returns() -> None:
    """Reusing the id at once had raised ConflictError: the cancelled call had returned
    before its request was cancelled on the service loop."""

    def payload(max_tokens: int) -> dict[str, Any]:
        return {"inputs": "hi", "options": {"max_tokens": max_tokens, "request_id": "R1"}}

    async def main(service: ControlPlaneVLLMService) -> list[Any]:
        long = asyncio.ensure_future(service.aprocess(payload(3000)))
        while (await service.aprocess({"task": "get_metrics"}))["active_requests"] == 0:
            assert not long.done()
        long.cancel()
        with pytest.raises(asyncio.CancelledError):
            await long
        result: list[Any] = await service.aprocess(payload(2))
        return result

    with ControlPlaneVLLMService(sim_fleet(1)) as service:  # real time: the request runs long
        result = asyncio.run(main(service))
    assert result[0]["request_id"] == "R1"
    assert result[0]["sage"]["status"] == "completed"


def test_information_tasks(svc: ControlPlaneVLLMService) -> None:
    _generate(svc, "warm up", max_tokens=2)
    instances = svc.process({"task": "show_instances"})
    assert [i["instance_id"] for i in instances] == ["sim-0", "sim-1"]
    assert {i["model_name"] for i in instances} == {MODEL}
    assert sum(i["completed_requests"] for i in instances) == 1
    assert all(i["is_healthy"] and i["max_concurrent_requests"] == 4 for i in instances)
    assert svc.process({"task": "health_check"}) == {"sim-0": True, "sim-1": True}
    metrics = svc.process({"task": "get_metrics"})
    assert metrics["total_requests"] == 1
    assert metrics["status"]["scheduling_policy"] == "priority"
    assert isinstance(metrics["timestamp"], str)
    (model,) = svc.process({"task": "show_models"})
    assert model["model_id"] == MODEL


def test_set_policy_switches_the_scheduling_policy(svc: ControlPlaneVLLMService) -> None:
    assert svc.process({"task": "set_policy", "inputs": "fifo"}) == {
        "previous": "priority",
        "scheduling_policy": "fifo",
    }
    out = svc.process({"task": "set_policy", "options": {"policy": "slo_aware"}})
    assert out["scheduling_policy"] == "slo_aware"
    assert svc.process({"task": "get_metrics"})["status"]["scheduling_policy"] == "slo_aware"
    with pytest.raises(PolicyNotFoundError) as missing:
        svc.process({"task": "set_policy", "inputs": "fastest"})
    assert missing.value.param == "inputs"  # the payload's part, not the manager's argument
    with pytest.raises(PolicyNotFoundError) as missing:
        svc.process({"task": "set_policy", "options": {"policy": "fastest"}})
    assert missing.value.param == "options.policy"
    with pytest.raises(InvalidRequestError) as err:
        svc.process({"task": "set_policy"})
    assert err.value.param == "inputs"
    # a bad parameter is the payload's mistake: an InvalidRequestError naming it
    for params, where in (({"zzz": 1}, "zzz"), ({"infeasible_action": "explode"}, None)):
        payload = {"task": "set_policy", "inputs": "slo_aware", "options": {"params": params}}
        with pytest.raises(InvalidRequestError) as err:
            svc.process(payload)
        assert err.value.param == f"options.params.{where or next(iter(params))}"
    for options, param, message in (
        ({"parameters": {}}, "options.parameters", "unknown option 'parameters'"),
        ({"params": [1]}, "options.params", "params must be a dict"),
    ):
        payload = {"task": "set_policy", "inputs": "fifo", "options": options}
        with pytest.raises(InvalidRequestError, match=message) as err:
            svc.process(payload)
        assert err.value.param == param
    assert svc.process({"task": "get_metrics"})["status"]["scheduling_policy"] == "slo_aware"


def test_the_vllm_service_methods_work_on_the_control_plane_service(
    svc: ControlPlaneVLLMService,
) -> None:
    """Code written for VLLMService's ``generate``/``show_models`` runs unchanged."""
    [entry] = svc.generate("hello", max_tokens=3)
    assert entry["usage"]["output_tokens"] == 3
    assert [m["model_id"] for m in svc.show_models()] == [MODEL]
    with pytest.raises(InvalidRequestError, match="supports embeddings"):
        svc.embed(["a"])
    for task in (svc.download_model, svc.delete_model, svc.fine_tune):
        with pytest.raises(InvalidRequestError, match="not supported by sage-llm"):
            task(MODEL)


def test_a_refused_option_is_named_as_the_payload_gives_it(
    svc: ControlPlaneVLLMService,
) -> None:
    """The control plane's field names (``temperature``) are the payload's options, and in a
    batch the input is named too, in ``param`` and the message (SAGE passes on only the
    message)."""
    with pytest.raises(InvalidRequestError) as err:
        _generate(svc, "x", temperature=1000)
    assert err.value.param == "options.temperature"
    batch = ["ok", "ok too", {"prompt": "b", "options": {"model": "gpt-9"}}]
    with pytest.raises(ModelNotFoundError) as found:
        _generate(svc, batch)
    assert found.value.param == "inputs[2].options.model"
    assert str(found.value).startswith("inputs[2]: ")


def test_set_policy_refuses_two_different_names(svc: ControlPlaneVLLMService) -> None:
    with pytest.raises(InvalidRequestError) as err:
        svc.process({"task": "set_policy", "inputs": "fifo", "options": {"policy": "priority"}})
    assert err.value.param == "options.policy"
    assert svc.process({"task": "get_metrics"})["status"]["scheduling_policy"] == "priority"


def test_the_fleet_changes_at_run_time(svc: ControlPlaneVLLMService) -> None:
    extra = {
        "instance_id": "sim-9", "host": "localhost", "port": 9009, "model_name": MODEL,
        "engine": "sim",  # as the embedded fleet's instances: an in-process simulated engine
    }  # fmt: skip
    entry = svc.process({"task": "register_instance", "inputs": extra})
    assert (entry["instance_id"], entry["port"], entry["model_name"]) == ("sim-9", 9009, MODEL)
    ids = [i["instance_id"] for i in svc.process({"task": "show_instances"})]
    assert ids == ["sim-0", "sim-1", "sim-9"]
    for iid in ("sim-0", "sim-1"):
        assert svc.process({"task": "drain_instance", "inputs": iid}) == {
            "instance_id": iid,
            "draining": True,
        }
    [out] = _generate(svc, "only the new one is taking requests", max_tokens=2)
    assert out["sage"]["instance_id"] == "sim-9"
    undrained = svc.process(
        {"task": "drain_instance", "inputs": "sim-0", "options": {"drain": False}}
    )
    assert undrained == {"instance_id": "sim-0", "draining": False}
    removed = svc.process({"task": "unregister_instance", "inputs": "sim-9"})
    assert removed == {"instance_id": "sim-9", "removed": True}
    ids = [i["instance_id"] for i in svc.process({"task": "show_instances"})]
    assert ids == ["sim-0", "sim-1"]


def test_register_instance_takes_simulator_keys_either_way(svc: ControlPlaneVLLMService) -> None:
    base = {"host": "localhost", "model_name": MODEL, "engine": "sim"}
    svc.process(
        {
            "task": "register_instance",
            "inputs": {**base, "instance_id": "s1", "port": 9011, "sim_gpu": "a100"},
        }
    )
    svc.process({"task": "register_instance",
                 "inputs": {**base, "instance_id": "s2", "port": 9012,
                            "metadata": {"sim_gpu": "h200"}}})  # fmt: skip
    shown = {i["instance_id"]: i for i in svc.process({"task": "show_instances"})}
    assert {"s1", "s2"} <= shown.keys()
    both = {**base, "instance_id": "s3", "port": 9013, "sim_gpu": "a100",
            "metadata": {"sim_gpu": "h100"}}  # fmt: skip
    with pytest.raises(InvalidRequestError) as err:
        svc.process({"task": "register_instance", "inputs": both})
    assert err.value.param == "inputs.sim_gpu"


@pytest.mark.parametrize(
    ("payload", "error", "param"),
    [
        ({"task": "register_instance", "inputs": "sim-9"}, InvalidRequestError, "inputs"),
        (
            {"task": "register_instance", "inputs": {"instance_id": "x", "hots": "h"}},
            InvalidRequestError,
            "inputs.hots",
        ),
        (
            {"task": "register_instance", "inputs": {"instance_id": "x", "host": "h"}},
            InvalidRequestError,
            "inputs.port",
        ),
        (
            {
                "task": "register_instance",
                "inputs": {"instance_id": "x", "host": "h", "port": 0, "model_name": MODEL},
            },
            ConfigError,
            "port",
        ),
        (
            {
                "task": "register_instance",
                "inputs": {"instance_id": "sim-0", "host": "h", "port": 1, "model_name": MODEL},
            },
            ConflictError,
            None,
        ),
        (
            {
                "task": "register_instance",
                "inputs": {
                    "instance_id": "x",
                    "host": "h",
                    "port": 1,
                    "model_name": MODEL,
                    "is_available": "false",
                },
            },
            ConfigError,
            "is_available",
        ),
        (
            {
                "task": "register_instance",
                "inputs": {"instance_id": "x", "host": "h", "port": 1, "model_name": MODEL},
                "options": {"port": 2},
            },
            InvalidRequestError,
            "options.port",
        ),
        ({"task": "drain_instance", "inputs": "sim-7"}, InstanceNotFoundError, None),
        (
            {"task": "drain_instance", "inputs": "sim-0", "options": {"drain": "no"}},
            InvalidRequestError,
            "options.drain",
        ),
        ({"task": "unregister_instance", "inputs": 3}, InvalidRequestError, "inputs"),
        (
            {"task": "unregister_instance", "inputs": "sim-0", "options": {"drain": True}},
            InvalidRequestError,
            "options.drain",
        ),
    ],
)
def test_fleet_changes_refuse_bad_arguments(
    svc: ControlPlaneVLLMService, payload: dict[str, Any], error: type[Exception], param: str | None
) -> None:
    with pytest.raises(error) as err:
        svc.process(payload)
    if param is not None:
        assert getattr(err.value, "param", None) == param
    ids = [i["instance_id"] for i in svc.process({"task": "show_instances"})]
    assert ids == ["sim-0", "sim-1"]


def test_unknown_tasks_and_malformed_payloads_raise_clear_errors(
    svc: ControlPlaneVLLMService,
) -> None:
    cases: list[tuple[Any, str]] = [
        ({"task": "summarize", "inputs": "x"}, "task"),
        ({"task": "generate"}, "inputs"),
        ({"task": "generate", "inputs": ["ok", 7]}, "inputs[1]"),
        ({"task": "generate", "inputs": "x", "options": {"priority": "asap"}}, "options.priority"),
        ({"task": "generate", "inputs": "x", "options": {"temprature": 0.5}}, "options.temprature"),
        ({"task": "show_instances", "options": {"verbose": True}}, "options.verbose"),
        ({"task": "download_model", "inputs": "meta-llama/Llama-2-7b"}, "task"),
        ("generate hello", "payload"),
    ]
    for payload, param in cases:
        with pytest.raises(InvalidRequestError) as err:
            svc.process(payload)
        assert err.value.param == param, payload
    for task in ("delete_model", "fine_tune"):  # as VLLMService answers them
        with pytest.raises(InvalidRequestError, match="manage weights on the engine host"):
            svc.process({"task": task, "options": {}})
    with pytest.raises(ModelNotFoundError):
        _generate(svc, "x", model="gpt-9")


def test_embed_without_an_embedding_engine_raises_a_clear_error(
    svc: ControlPlaneVLLMService,
) -> None:
    with pytest.raises(InvalidRequestError, match="supports embeddings") as err:
        svc.process({"task": "embed", "inputs": ["a", "b"]})
    assert err.value.param is None  # no model was given (it had named options.model)
    with pytest.raises(InvalidRequestError, match="supports embeddings") as err:
        svc.process({"task": "embed", "inputs": ["a"], "options": {"model": MODEL}})
    assert err.value.param == "options.model"


def test_a_timeout_raises_and_cancels_the_request(svc: ControlPlaneVLLMService) -> None:
    with pytest.raises(DeadlineExceededError, match=r"0\.05 s"):
        _generate(svc, "write a long essay", max_tokens=4000, timeout=0.05)
    metrics = svc.process({"task": "get_metrics"})
    assert metrics["cancelled_requests"] == 1
    assert metrics["active_requests"] == 0


def test_the_shortest_timeout_of_a_batchs_items_applies_to_the_whole_call(
    svc: ControlPlaneVLLMService,
) -> None:
    batch = [
        {"prompt": "write a long essay", "options": {"timeout": 20}},
        {"prompt": "write another", "options": {"timeout": 0.05}},
    ]
    with pytest.raises(DeadlineExceededError, match=r"0\.05 s"):
        _generate(svc, batch, max_tokens=4000)
    assert svc.process({"task": "get_metrics"})["cancelled_requests"] == 2


def test_a_failed_request_raises_engine_error_with_the_reason(dead_port: int) -> None:
    config = {
        "max_retries": 0,
        "enable_monitoring": False,
        "instances": [
            {"instance_id": "gone", "host": "127.0.0.1", "port": dead_port, "model_name": MODEL}
        ],
    }
    with ControlPlaneVLLMService(config) as svc, pytest.raises(EngineError) as err:
        _generate(svc, "hello", max_tokens=4)
    assert "failed" in str(err.value)
    assert err.value.instance_id == "gone"


def test_process_before_setup_and_after_cleanup_is_refused() -> None:
    svc = _service()
    with pytest.raises(ControlPlaneNotRunningError, match="setup"):
        _generate(svc, "x")
    with pytest.raises(ControlPlaneNotRunningError, match="setup"):  # (nothing left unrun)
        svc.process({"task": "embed", "inputs": "x"})
    svc.setup()
    svc.setup()  # idempotent
    running_after_setup = svc.is_running
    svc.stop()
    svc.cleanup()  # idempotent
    assert (running_after_setup, svc.is_running) == (True, False)
    with pytest.raises(ControlPlaneNotRunningError):
        svc.process({"task": "health_check"})
    svc.start()  # SAGE's start() sets up again
    try:
        assert _generate(svc, "again", max_tokens=1)[0]["usage"]["output_tokens"] == 1
    finally:
        svc.cleanup()


def test_the_seed_toml_configures_the_service(tmp_path: Path) -> None:
    path = tmp_path / "services.toml"
    path.write_text(SEED_TOML)
    for svc in (
        ControlPlaneVLLMService.from_toml(path, loop_factory=VirtualEventLoop),
        ControlPlaneVLLMService({"config_path": str(path)}, loop_factory=VirtualEventLoop),
    ):
        cp = svc.config.control_plane
        assert (cp.scheduling_policy, cp.routing_strategy) == ("adaptive", "load_balanced")
        assert [i.instance_id for i in cp.instances] == ["llm-prefill-1", "llm-decode-1"]
        with svc:
            (entry,) = _generate(svc, "Explain prefill and decode. " * 4, max_tokens=6)
        assert entry["sage"]["prefill_instance_id"] == "llm-prefill-1"
        assert entry["sage"]["instance_id"] == "llm-decode-1"
        assert entry["usage"]["output_tokens"] == 6


def test_the_seed_dict_and_its_request_defaults() -> None:
    config = {
        "scheduling_policy": "slo_aware",
        "enable_pd_separation": False,
        "routing_strategy": "round_robin",
        "default_priority": "HIGH",
        "default_slo_deadline_ms": 60000,
        "default_max_tokens": 7,
        "default_temperature": 0.5,
        "enable_monitoring": False,
        "instances": [
            {"instance_id": f"llm-{i}", "host": "localhost", "port": 8000 + i,
             "model_name": "meta-llama/Llama-2-7b", "engine": "sim", "tensor_parallel_size": 2}
            for i in range(3)
        ],
    }  # fmt: skip
    with _service(config) as svc:
        batch = _generate(svc, ["a", "b", "c"])
    assert [e["usage"]["output_tokens"] for e in batch] == [7, 7, 7]
    assert {e["sage"]["priority"] for e in batch} == {"HIGH"}
    assert {e["sage"]["slo_met"] for e in batch} == {True}
    assert sorted(e["sage"]["instance_id"] for e in batch) == ["llm-0", "llm-1", "llm-2"]


def test_bad_configs_raise_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean"):
        ControlPlaneVLLMService({"scheduling_polcy": "fifo"})
    with pytest.raises(ConfigError) as err:
        ControlPlaneVLLMService({"default_priority": "whenever"})
    assert err.value.key == "default_priority"
    with pytest.raises(ConfigError, match="move scheduling_policy there"):
        ControlPlaneVLLMService(
            {"config_path": str(tmp_path / "x.toml"), "scheduling_policy": "fifo"}
        )
    with pytest.raises(ConfigError, match="cannot read"):
        ControlPlaneVLLMService({"config_path": str(tmp_path / "missing.toml")})
    with pytest.raises(ConfigError, match="must be a dict"):
        ControlPlaneVLLMService(42)  # type: ignore[arg-type]


def test_no_config_is_the_embedded_simulated_fleet() -> None:
    svc = ControlPlaneVLLMService(loop_factory=VirtualEventLoop)
    assert svc.config.control_plane.instances == ()
    assert len(svc.config.fleet()) == svc.config.simulation.instances


def test_an_engines_refusal_is_an_invalid_request_naming_the_option_and_the_input(
    svc: ControlPlaneVLLMService,
) -> None:
    with pytest.raises(InvalidRequestError) as err:  # as VLLMService raises it
        _generate(svc, "hi", max_tokens=10**8)
    assert isinstance(err.value, EngineRequestRejectedError)
    assert err.value.param == "options.max_tokens"
    assert "cannot be greater than max_model_len" in err.value.message
    huge = {"prompt": "c", "options": {"max_tokens": 10**8}}
    with pytest.raises(InvalidRequestError) as err:
        _generate(svc, ["a", "b", huge], max_tokens=2)
    assert err.value.param == "inputs[2].options.max_tokens"
    assert err.value.message.startswith("inputs[2]: ")
    metrics = svc.process({"task": "get_metrics"})
    assert metrics["active_requests"] == metrics["queued_requests"] == 0  # none left behind


def test_health_check_probes_the_instances_now() -> None:
    with socket.socket() as mute:  # takes connections, never answers: a probe times out
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        hung = {
            "enable_pd_separation": False,
            "health": {"timeout_s": 0.2},
            "instances": [
                {"instance_id": "hung", "host": "127.0.0.1", "port": mute.getsockname()[1],
                 "model_name": MODEL}
            ],
        }  # fmt: skip
        with ControlPlaneVLLMService(hung) as svc:  # asked before the health loop's probe ends
            assert svc.process({"task": "health_check"}) == {"hung": False}
            (shown,) = svc.process({"task": "show_instances"})
            assert shown["is_healthy"] is False  # the probe's outcome counts: ejected


def test_request_defaults_of_another_type_or_bad_values_are_a_config_error() -> None:
    with pytest.raises(ConfigError) as err:
        ControlPlaneVLLMService({}, request_defaults={"priority": "asap"})  # type: ignore[arg-type]
    assert err.value.key == "request_defaults"
    assert "must be a sage_llm.service.RequestDefaults, got dict" in str(err.value)
    # values no request's options could hold: refused here, not by every request after
    bad = RequestDefaults(
        priority="LOW",  # type: ignore[arg-type]
        max_tokens=-5, temperature=9.0, timeout_s=-1.0, extra={"bogus": 1, "n": 0},
    )  # fmt: skip
    with pytest.raises(ConfigErrors) as errs:
        ControlPlaneVLLMService(None, request_defaults=bad)
    assert sorted(str(e.key) for e in errs.value.errors) == [
        "request_defaults.extra.bogus", "request_defaults.extra.n",
        "request_defaults.max_tokens",
        "request_defaults.priority", "request_defaults.temperature",
        "request_defaults.timeout_s",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="must be a mapping, got array") as err:
        ControlPlaneVLLMService(None, request_defaults=RequestDefaults(extra=[("seed", 1)]))  # type: ignore[arg-type]
    assert err.value.key == "request_defaults.extra"


def test_tasks_take_their_own_options_at_the_top_level_and_no_inputs_when_they_have_none() -> None:
    with _service() as svc:
        moved = svc.process({"task": "drain_instance", "inputs": "sim-0", "drain": True})
        assert moved == {"instance_id": "sim-0", "draining": True}
        svc.process({"task": "set_policy", "inputs": "priority", "params": {"max_wait_s": 5.0}})
        for task in ("show_instances", "health_check", "get_metrics", "show_models"):
            with pytest.raises(InvalidRequestError, match=f"task '{task}' takes no inputs") as err:
                svc.process({"task": task, "inputs": "sim-0"})
            assert err.value.param == "inputs"


def test_setup_twice_starts_one_loop_thread_that_cleanup_stops() -> None:
    before = set(threading.enumerate())
    svc = _service()
    try:
        svc.setup()
        svc.setup()  # idempotent: no second thread
        started = [t for t in threading.enumerate() if t not in before]
        assert [t.name for t in started] == [f"sage-llm-{svc.name}"]
    finally:
        svc.cleanup()
    assert [t.name for t in threading.enumerate() if t not in before and t.is_alive()] == []
