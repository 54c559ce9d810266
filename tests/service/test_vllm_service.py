"""VLLMService: SAGE's existing configs and payloads, unchanged, over one engine or the
control plane."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sage_llm.config import check_config
from sage_llm.errors import (
    ConfigError,
    ControlPlaneNotRunningError,
    InvalidRequestError,
    ModelNotFoundError,
)
from sage_llm.service import ControlPlaneVLLMService, VLLMService, register_vllm_service
from sage_llm.service.backends import vllm_installed
from sage_llm.sim.clock import VirtualEventLoop
from sage_llm.tokens import count_tokens
from tests.service.fleets import MODEL, sim_fleet

# A config as SAGE users write it for VLLMService today.
EXISTING_CONFIG: dict[str, Any] = {
    "model_id": MODEL,
    "embedding_model_id": None,
    "auto_download": False,
    "engine": {"dtype": "auto", "tensor_parallel_size": 1, "max_model_len": 4096},
    "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 24},
    "tags": ["chat"],
}
ENTRY_KEYS = {"generations", "usage", "request_id"}
GENERATION_KEYS = {"text", "token_ids", "logprobs", "finish_reason"}


def _sim(**extra: Any) -> VLLMService:
    config = {**EXISTING_CONFIG, "engine": {**EXISTING_CONFIG["engine"], "kind": "sim"}, **extra}
    return VLLMService(config, loop_factory=VirtualEventLoop)


@pytest.fixture
def sim_service() -> Iterator[VLLMService]:
    with _sim() as svc:
        yield svc


def _check_entry(entry: dict[str, Any], output_tokens: int, *, ids_known: bool = True) -> None:
    assert set(entry) == ENTRY_KEYS
    (gen,) = entry["generations"]
    assert set(gen) == GENERATION_KEYS
    assert gen["text"].strip()
    assert len(gen["token_ids"]) == (output_tokens if ids_known else 0)
    assert gen["logprobs"] is None
    assert gen["finish_reason"] == "length"
    assert entry["usage"]["output_tokens"] == output_tokens
    assert entry["usage"]["input_tokens"] > 0
    assert isinstance(entry["request_id"], str) and entry["request_id"]


def test_existing_payloads_work_unchanged(sim_service: VLLMService) -> None:
    (one,) = sim_service.process({"task": "generate", "inputs": "Hello, SAGE"})
    _check_entry(one, 24)  # sampling.max_tokens is the default
    batch = sim_service.process(
        {"task": "generate", "inputs": ["first", "second", "third"], "options": {"max_tokens": 5}}
    )
    assert len(batch) == 3
    for entry in batch:
        _check_entry(entry, 5)
    assert len({e["request_id"] for e in batch}) == 3
    (chat,) = sim_service.process(
        {"inputs": [{"role": "user", "content": "Hi"}], "options": {"max_tokens": 2}}
    )
    _check_entry(chat, 2)
    embedded = sim_service.process({"task": "embed", "inputs": ["a cat", "a dog"]})
    assert set(embedded) == {"model_id", "vectors", "dimension"}
    assert (embedded["model_id"], embedded["dimension"]) == (MODEL, 64)
    assert len(embedded["vectors"]) == 2
    assert sum(x * x for x in embedded["vectors"][0]) == pytest.approx(1.0)
    (model,) = sim_service.process({"task": "show_models"})
    assert model == {
        "model_id": MODEL, "path": None, "revision": None, "size_bytes": None, "size_mb": None,
        "last_used": None, "tags": ["chat"],
    }  # fmt: skip


def test_the_direct_methods_of_the_old_service(sim_service: VLLMService) -> None:
    (entry,) = sim_service.generate("Hi", max_tokens=3)
    _check_entry(entry, 3)
    assert sim_service.embed("x", normalize=False)["dimension"] == 64
    assert sim_service.show_models()[0]["model_id"] == MODEL


def test_weight_management_tasks_are_refused_clearly(sim_service: VLLMService) -> None:
    for task in ("download_model", "delete_model", "fine_tune"):
        with pytest.raises(InvalidRequestError, match="not supported by sage-llm") as err:
            sim_service.process({"task": task, "options": {"model_id": MODEL}})
        assert err.value.param == "task"
    with pytest.raises(InvalidRequestError, match="manage weights on the engine host"):
        sim_service.process({"task": "download_model", "inputs": MODEL})
    # SAGE's methods of the same names (fine_tune had been an AttributeError)
    calls: list[Callable[[], Any]] = [
        lambda: sim_service.download_model(MODEL),
        lambda: sim_service.delete_model(model_id=MODEL),
        lambda: sim_service.fine_tune({"dataset": "d"}),
    ]
    for call in calls:
        with pytest.raises(InvalidRequestError, match="not supported by sage-llm") as err:
            call()
        assert err.value.param == "task"


def test_malformed_payloads_and_unknown_tasks(sim_service: VLLMService) -> None:
    for payload, param in [
        ({"task": "translate", "inputs": "x"}, "task"),
        ({"task": "generate", "inputs": 3}, "inputs"),
        ({"task": "generate", "inputs": "x", "options": {"max_tokens": -1}}, "options.max_tokens"),
        ({"task": "embed", "inputs": [1, 2]}, "inputs"),
        ({"task": "show_models", "options": {"all": True}}, "options.all"),
    ]:
        with pytest.raises(InvalidRequestError) as err:
            sim_service.process(payload)
        assert err.value.param == param, payload


def test_engine_sim_string_and_register_helper() -> None:
    svc = VLLMService({"model_id": "qwen-7b", "engine": "sim"}, loop_factory=VirtualEventLoop)
    assert svc.config.backend == "sim"

    class _Env:
        def __init__(self) -> None:
            self.registered: list[tuple[Any, ...]] = []

        def register_service(self, name: str, cls: type[Any], *args: Any) -> str:
            self.registered.append((name, cls, args))
            return name

    env = _Env()
    assert register_vllm_service(env, "llm", {"model_id": "m"}) == "llm"
    assert env.registered == [("llm", VLLMService, ({"model_id": "m"},))]


def test_over_http_against_a_simulated_engine_server(
    engine_server: Callable[..., str],
) -> None:
    url = engine_server(model=MODEL)
    with VLLMService({**EXISTING_CONFIG, "base_url": url + "/v1"}) as svc:
        assert svc.config.backend == "http"
        batch = svc.process(
            {"task": "generate", "inputs": ["a", "b"], "options": {"max_tokens": 4}}
        )
        for entry in batch:  # an OpenAI-style answer carries no token ids
            _check_entry(entry, 4, ids_known=False)
        (chat,) = svc.process({"inputs": [{"role": "user", "content": "Hi"}],
                               "options": {"max_tokens": 3}})  # fmt: skip
        _check_entry(chat, 3, ids_known=False)
        assert [m["model_id"] for m in svc.process({"task": "show_models"})] == [MODEL]


def test_over_http_a_model_the_server_does_not_serve_is_model_not_found(
    engine_server: Callable[..., str],
) -> None:
    """The engine's 404 ("The model ... does not exist") had been a plain EngineError."""
    url = engine_server(model=MODEL)
    config = {**EXISTING_CONFIG, "model_id": "other-model", "base_url": url}
    for cp in (False, True):  # the same error through the control plane
        with VLLMService({**config, "use_control_plane": cp}) as svc:
            with pytest.raises(ModelNotFoundError, match="other-model") as err:
                svc.generate("hi", max_tokens=2)
            assert err.value.param is None  # the payload named no model
            with pytest.raises(ModelNotFoundError) as err:
                svc.generate(["a", "b"], max_tokens=2, model="other-model")
            assert err.value.param in ("inputs[0].options.model", "inputs[1].options.model")


def test_show_models_lists_the_model_the_service_serves_with_or_without_control_plane(
    engine_server: Callable[..., str],
) -> None:
    """Over HTTP it had listed every model of the server, beside the control plane's one."""
    url = engine_server(model="served-by-the-server")
    config = {**EXISTING_CONFIG, "model_id": "llama-3-8b", "base_url": url}
    with (
        VLLMService(config) as alone,
        VLLMService({**config, "use_control_plane": True}) as cp,
    ):
        for svc in (alone, cp):
            assert [m["model_id"] for m in svc.show_models()] == ["llama-3-8b"]


def test_use_control_plane_takes_the_same_payloads() -> None:
    config = {
        **EXISTING_CONFIG, "use_control_plane": True, "control_plane": sim_fleet(),
        "tags": ["chat"],
    }  # fmt: skip
    with VLLMService(config, loop_factory=VirtualEventLoop) as svc:
        # the service's tags, as without the control plane (they had been lost)
        assert [m["tags"] for m in svc.show_models()] == [["chat"]]
        assert isinstance(svc.control_plane_service, ControlPlaneVLLMService)
        batch = svc.process({"task": "generate", "inputs": ["a", "b", "c"]})
        assert [e["usage"]["output_tokens"] for e in batch] == [24, 24, 24]  # sampling default
        assert {e["sage"]["instance_id"] for e in batch} <= {"sim-0", "sim-1"}
        assert set(batch[0]) == ENTRY_KEYS | {"sage"}
        assert [m["model_id"] for m in svc.process({"task": "show_models"})] == [MODEL]
        assert len(svc.process({"task": "show_instances"})) == 2
        with pytest.raises(InvalidRequestError, match="not supported by sage-llm"):
            svc.process({"task": "fine_tune", "inputs": {}})


def test_a_service_over_the_control_plane_not_set_up_says_so_by_its_own_name() -> None:
    """The error names the service the caller made (``VLLMService``), not the
    ``ControlPlaneVLLMService`` it runs on, with or without a runtime's name for it."""
    config = {**EXISTING_CONFIG, "engine": "sim", "use_control_plane": True}
    svc = VLLMService(config)
    for payload in ({"task": "generate", "inputs": "hi"}, {"task": "embed", "inputs": "hi"}):
        with pytest.raises(ControlPlaneNotRunningError, match=r"^VLLMService is not set up"):
            svc.process(payload)
        with pytest.raises(ControlPlaneNotRunningError, match=r"^VLLMService is not set up"):
            asyncio.run(svc.aprocess(payload))
    svc.ctx = type("Ctx", (), {"name": "llm", "logger": None})()  # as a runtime names it
    with pytest.raises(ControlPlaneNotRunningError, match=r"^llm is not set up"):
        svc.process({"task": "show_models"})


def test_use_control_plane_without_a_table_wraps_the_one_engine() -> None:
    config = {**EXISTING_CONFIG, "engine": "sim", "use_control_plane": True}
    with VLLMService(config, loop_factory=VirtualEventLoop) as svc:
        (entry,) = svc.process({"inputs": "Hi", "options": {"max_tokens": 2}})
        assert entry["sage"]["instance_id"] == "vllm-0"
    with pytest.raises(ConfigError, match="use_control_plane needs engines"):
        VLLMService({**EXISTING_CONFIG, "use_control_plane": True})


def test_the_sim_concurrency_bound_reaches_the_control_planes_instance() -> None:
    config = {**EXISTING_CONFIG, "engine": "sim", "sim": {"max_concurrent_requests": 2},
              "use_control_plane": True}  # fmt: skip
    with VLLMService(config, loop_factory=VirtualEventLoop) as svc:
        inner = svc.control_plane_service
        assert inner is not None
        (inst,) = inner.process({"task": "show_instances"})
        assert (inst["instance_id"], inst["max_concurrent_requests"]) == ("vllm-0", 2)


def test_a_control_plane_table_without_instances_wraps_the_services_own_engine() -> None:
    """It had served the embedded simulated fleet (another model, made-up text) in place
    of the engine the service names."""
    table = {"scheduling_policy": "priority"}
    config = {**EXISTING_CONFIG, "engine": "sim", "use_control_plane": True,
              "control_plane": table}  # fmt: skip
    with VLLMService(config, loop_factory=VirtualEventLoop) as svc:
        (entry,) = svc.process({"inputs": "Hi", "options": {"max_tokens": 2}})
        assert entry["sage"]["instance_id"] == "vllm-0"
        inner = svc.control_plane_service
        assert inner is not None and inner.config.control_plane.scheduling_policy == "priority"
    with pytest.raises(ConfigError, match="use_control_plane needs engines"):
        VLLMService({**EXISTING_CONFIG, "use_control_plane": True, "control_plane": table})
    empty = {**config, "control_plane": {"instances": []}}  # an empty list: none either
    with VLLMService(empty, loop_factory=VirtualEventLoop) as svc:
        (entry,) = svc.process({"inputs": "Hi", "options": {"max_tokens": 2}})
        assert entry["sage"]["instance_id"] == "vllm-0"
    # a whole document is passed on as it is (wrapping it had made it invalid)
    document = {"services": {"llm_control_plane": {"scheduling_policy": "fifo", "instances": [
        {"instance_id": "a", "host": "127.0.0.1", "port": 20201, "model_name":
         EXISTING_CONFIG["model_id"], "engine": "sim"}]}}}  # fmt: skip
    whole = {**config, "control_plane": document}
    with VLLMService(whole, loop_factory=VirtualEventLoop) as svc:
        (entry,) = svc.process({"inputs": "Hi", "options": {"max_tokens": 2}})
        assert entry["sage"]["instance_id"] == "a"


def test_use_control_plane_embeds_as_the_simulated_engine_does() -> None:
    config = {**EXISTING_CONFIG, "engine": "sim"}
    with (
        VLLMService(config, loop_factory=VirtualEventLoop) as alone,
        VLLMService({**config, "use_control_plane": True}, loop_factory=VirtualEventLoop) as cp,
    ):
        assert cp.embed(["hello world", "x"]) == alone.embed(["hello world", "x"])
        for svc in (alone, cp):  # an unknown model is refused, as a generation's is
            model = svc.config.model_id
            assert svc.embed("x", model=model)["model_id"] == model
            with pytest.raises(ModelNotFoundError) as err:
                svc.embed("x", model="other")
            assert err.value.param == "options.model"  # the payload's part


def test_from_toml_reads_a_vllm_service_table(tmp_path: Path) -> None:
    path = tmp_path / "services.toml"
    table = '[services.{name}]\ntype = "VLLMService"\nmodel_id = "{name}"\nengine = "sim"\n'
    path.write_text(table.format(name="llm") + '[services.other]\ntype = "Other"\n')
    assert VLLMService.from_toml(path).config.model_id == "llm"
    for build in (ControlPlaneVLLMService.from_toml, lambda p: ControlPlaneVLLMService(str(p))):
        with pytest.raises(ConfigError, match=r"no control-plane service table .* llm \(VLLM"):
            build(path)  # not the embedded simulated fleet in the endpoint's place
    path.write_text(table.format(name="a") + table.format(name="b"))
    assert VLLMService.from_toml(path, "b").config.model_id == "b"
    with pytest.raises(ConfigError, match=r"several tables have it \(\[services\.a\]"):
        VLLMService.from_toml(path)
    with pytest.raises(ConfigError, match=r"\[services\.c\] is not one of them"):
        VLLMService.from_toml(path, "c")
    path.write_text('[services.other]\ntype = "Other"\n')
    for name in (None, "other"):
        with pytest.raises(ConfigError, match=r'type = "VLLMService"\): no \[services\.\*\] table'):
            VLLMService.from_toml(path, name)
    path.write_text(table.format(name="a") + "sampling = { top_p = 3 }\n")
    with pytest.raises(ConfigError, match=r"services\.toml:5: services\.a\.sampling\.top_p"):
        VLLMService.from_toml(path)


def test_a_control_plane_tables_config_path_is_read_beside_the_file_that_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It had been read from the working directory, and a missing file's error had not
    named the file tried."""
    path = tmp_path / "services.toml"
    path.write_text(
        '[services.llm]\ntype = "VLLMService"\nmodel_id = "llama-3-8b"\nengine = "sim"\n'
        'use_control_plane = true\ncontrol_plane = { config_path = "plane.toml" }\n'
    )
    monkeypatch.chdir("/")  # not where the files are
    problems = [str(e) for e in check_config(path)]
    assert problems == [
        f"{path}:6: services.llm.control_plane.config_path: {tmp_path / 'plane.toml'}: "
        "cannot read config file: No such file or directory"
    ]
    with pytest.raises(ConfigError, match=f"{tmp_path / 'plane.toml'}: cannot read"):
        VLLMService.from_toml(path)
    (tmp_path / "plane.toml").write_text(
        '[services.llm_control_plane]\nscheduling_policy = "fifo"\n'
        "[services.llm_control_plane.simulation]\ninstances = 1\n"
    )
    assert check_config(path) == []
    delegate = VLLMService.from_toml(path).control_plane_service
    assert delegate is not None
    assert delegate.config.control_plane.scheduling_policy == "fifo"
    # beside config_path only request defaults; a file naming itself is read once
    text = path.read_text()
    path.write_text(text.replace('"plane.toml" }', '"plane.toml", routing_strategy = "affinity" }'))
    assert [e.key for e in check_config(path)] == ["services.llm.control_plane.config_path"]
    path.write_text(
        text.replace("plane.toml", "services.toml")
        + '[services.llm_control_plane]\ntype = "ControlPlaneVLLMService"\nmode = "simulated"\n'
    )
    assert check_config(path) == []
    assert VLLMService.from_toml(path, "llm").control_plane_service is not None


def test_a_control_plane_file_is_read_beside_the_file_that_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "services.toml"
    path.write_text(
        '[services.llm]\ntype = "VLLMService"\nmodel_id = "llama-3-8b"\nengine = "sim"\n'
        'use_control_plane = true\ncontrol_plane = "plane.toml"\n'
    )
    (tmp_path / "plane.toml").write_text(
        '[services.llm_control_plane]\nscheduling_policy = "nope"\n'
    )
    monkeypatch.chdir("/")  # not where the files are
    problems = [str(e) for e in check_config(path)]
    assert problems == [
        f"{path}:6: services.llm.control_plane: {tmp_path / 'plane.toml'}:2: "
        "services.llm_control_plane.scheduling_policy: unknown value 'nope' (valid values: "
        "fifo, priority, slo_aware, cost_optimized, adaptive, fair)"
    ]
    (tmp_path / "plane.toml").write_text(
        '[services.llm_control_plane]\nscheduling_policy = "fifo"\n'
    )
    assert check_config(path) == []
    svc = VLLMService.from_toml(path)
    delegate = svc.control_plane_service
    assert delegate is not None
    assert delegate.config.control_plane.scheduling_policy == "fifo"
    # a file that names itself (its own control-plane table) is read once, not for ever
    path.write_text(
        '[services.llm]\ntype = "VLLMService"\nmodel_id = "llama-3-8b"\nengine = "sim"\n'
        'use_control_plane = true\ncontrol_plane = "services.toml"\n'
        '[services.llm_control_plane]\ntype = "ControlPlaneVLLMService"\nmode = "simulated"\n'
    )
    assert check_config(path) == []
    assert VLLMService.from_toml(path, "llm").control_plane_service is not None
    # a control plane without use_control_plane would be ignored: refused
    with pytest.raises(ConfigError, match=r"^control_plane: is given but use_control_plane"):
        VLLMService({"model_id": "llama-3-8b", "engine": "sim", "control_plane": {}})


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed: the in-process path is used")
def test_without_vllm_or_an_endpoint_the_error_says_what_to_install() -> None:
    with pytest.raises(ConfigError, match=r"install the vllm extra .*endpoint.*engine = \"sim\""):
        VLLMService(EXISTING_CONFIG)


def test_process_needs_setup() -> None:
    svc = _sim()
    for payload in ({"inputs": "x"}, {"task": "embed", "inputs": "x"}):  # (nothing left unrun)
        with pytest.raises(ControlPlaneNotRunningError, match="setup"):
            svc.process(payload)
    svc.start()
    svc.start()
    try:
        assert svc.process({"inputs": "x", "options": {"max_tokens": 1}})[0]["usage"] == {
            "input_tokens": 1,
            "output_tokens": 1,
        }
    finally:
        svc.stop()
        svc.cleanup()


def test_show_models_takes_no_inputs_and_embed_its_options_at_the_top_level(
    sim_service: VLLMService,
) -> None:
    with pytest.raises(InvalidRequestError, match="show_models takes no inputs") as err:
        sim_service.process({"task": "show_models", "inputs": "anything"})
    assert err.value.param == "inputs"
    top = sim_service.process({"task": "embed", "inputs": "x", "normalize": False})
    assert top == sim_service.process(
        {"task": "embed", "inputs": "x", "options": {"normalize": False}}
    )


def test_cleanup_with_use_control_plane_stops_the_control_plane_and_its_thread() -> None:
    before = set(threading.enumerate())
    config = {**EXISTING_CONFIG, "engine": "sim", "use_control_plane": True}
    svc = VLLMService(config, loop_factory=VirtualEventLoop)
    svc.setup()
    inner = svc.control_plane_service
    assert inner is not None
    svc.generate("hi", max_tokens=2)
    running = inner.is_running
    svc.cleanup()
    assert (running, inner.is_running) == (True, False)
    left = [t.name for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not [name for name in left if name.startswith("sage-llm-")]


def test_the_model_name_option_of_generate_selects_the_model() -> None:
    config = {**EXISTING_CONFIG, "engine": "sim"}
    for cp in (False, True):
        with VLLMService({**config, "use_control_plane": cp}, loop_factory=VirtualEventLoop) as svc:
            (entry,) = svc.generate("hi", max_tokens=2, model_name=MODEL)
            assert entry["usage"]["output_tokens"] == 2
            with pytest.raises(ModelNotFoundError, match="no/such-model") as err:
                svc.generate("hi", max_tokens=2, model_name="no/such-model")
            assert err.value.param == "options.model"


def test_the_model_name_option_of_embed_selects_the_model() -> None:
    config = {**EXISTING_CONFIG, "engine": "sim"}
    for cp in (False, True):
        with VLLMService({**config, "use_control_plane": cp}, loop_factory=VirtualEventLoop) as svc:
            assert svc.embed("x", model_name=MODEL)["model_id"] == MODEL
            with pytest.raises(ModelNotFoundError, match="no/such-model") as err:
                svc.embed("x", model_name="no/such-model")
            assert err.value.param == "options.model"


@pytest.mark.parametrize("use_control_plane", [False, True])
def test_aprocess_takes_the_payloads_process_takes(use_control_plane: bool) -> None:
    config = {**EXISTING_CONFIG, "engine": "sim", "use_control_plane": use_control_plane}
    svc = VLLMService(config, loop_factory=VirtualEventLoop)
    for payload in ({"inputs": "x"}, {"task": "embed", "inputs": "x"}):
        with pytest.raises(ControlPlaneNotRunningError, match="setup"):
            asyncio.run(svc.aprocess(payload))

    async def main() -> tuple[Any, ...]:
        return (
            await svc.aprocess({"inputs": "Hello", "options": {"max_tokens": 3}}),
            await svc.aprocess({"task": "embed", "inputs": ["a", "b"]}),
            await svc.aprocess({"task": "show_models"}),
        )

    with svc:
        (entry,), embedded, models = asyncio.run(main())
        with pytest.raises(InvalidRequestError, match="unknown task 'summarize'") as err:
            asyncio.run(svc.aprocess({"task": "summarize", "inputs": "x"}))
    assert err.value.param == "task"
    assert entry["usage"]["output_tokens"] == 3
    assert entry["generations"][0]["finish_reason"] == "length"
    assert (embedded["model_id"], len(embedded["vectors"])) == (MODEL, 2)
    assert [(m["model_id"], m["tags"]) for m in models] == [(MODEL, ["chat"])]


def test_use_control_plane_gives_its_instance_the_services_sim_table_and_api_key() -> None:
    def tokens(use_control_plane: bool, seed: int) -> list[int]:
        sim = {"model": MODEL, "seed": seed, "gpu": "a100"}
        config = {**EXISTING_CONFIG, "engine": "sim", "use_control_plane": use_control_plane}
        with VLLMService({**config, "sim": sim}, loop_factory=VirtualEventLoop) as svc:
            (entry,) = svc.generate("hello", max_tokens=5, temperature=1.0, request_id="r1")
        ids: list[int] = entry["generations"][0]["token_ids"]
        return ids

    seeded = tokens(False, 7)
    assert tokens(True, 7) == seeded != tokens(True, 8)  # the same engine either way
    config = {**EXISTING_CONFIG, "base_url": "http://127.0.0.1:27400", "api_key": "sk-test"}
    inner = VLLMService({**config, "use_control_plane": True}).control_plane_service
    assert inner is not None
    (instance,) = inner.config.control_plane.instances
    assert (instance.host, instance.port, instance.api_key) == ("127.0.0.1", 27400, "sk-test")


def test_n_samples_over_a_simulated_engine_are_the_generations_of_their_input() -> None:
    """The engine backend (``engine = "sim"``) had kept choice 0's chunks only and, with
    the usage on another choice's last chunk, counted the output tokens itself."""
    with VLLMService({"model_id": "qwen-7b", "engine": "sim"},
                     loop_factory=VirtualEventLoop) as svc:  # fmt: skip
        (entry,) = svc.process({"inputs": "Hello there", "options": {"max_tokens": 3, "n": 2}})
    gens = entry["generations"]
    assert len(gens) == 2 and gens[0]["text"] != gens[1]["text"]
    assert all(len(g["token_ids"]) == 3 for g in gens)
    assert entry["usage"] == {"input_tokens": count_tokens("Hello there"), "output_tokens": 6}
