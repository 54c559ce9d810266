"""Service configuration: the shared control-plane model, and SAGE's VLLMService keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sage_llm.config import SageConfig, check_config, load_config
from sage_llm.errors import ConfigError, ConfigErrors
from sage_llm.service.config import (
    DEFAULT_ENGINE,
    DEFAULT_SAMPLING,
    VLLMServiceConfig,
    check_request_defaults,
    control_plane_service_config,
)
from sage_llm.service.payloads import RequestDefaults
from sage_llm.types import ExecutionInstanceType, RequestPriority

SEED_DICT: dict[str, Any] = {
    "scheduling_policy": "adaptive",
    "enable_pd_separation": True,
    "routing_strategy": "load_balanced",
    "instances": [
        {"instance_id": "llm-prefill-1", "host": "localhost", "port": 8000,
         "model_name": "meta-llama/Llama-2-7b", "instance_type": "PREFILLING",
         "tensor_parallel_size": 4},
        {"instance_id": "llm-decode-1", "host": "localhost", "port": 8001,
         "model_name": "meta-llama/Llama-2-7b", "instance_type": "DECODING"},
    ],
}  # fmt: skip


def test_the_seed_dict_reads_into_the_shared_model() -> None:
    parsed = control_plane_service_config(SEED_DICT)
    cp = parsed.sage.control_plane
    assert (cp.scheduling_policy, cp.routing_strategy, cp.enable_pd_separation) == (
        "adaptive", "load_balanced", True,
    )  # fmt: skip
    assert [i.instance_type for i in cp.instances] == [
        ExecutionInstanceType.PREFILLING,
        ExecutionInstanceType.DECODING,
    ]
    assert cp.instances[0].tensor_parallel_size == 4
    assert parsed.defaults == RequestDefaults()


def test_service_keys_become_request_defaults() -> None:
    parsed = control_plane_service_config(
        {"default_priority": "low", "default_slo_deadline_ms": 2000, "default_temperature": 0,
         "default_top_p": 0.9, "request_timeout_s": 30, "default_max_tokens": 64},
        defaults=RequestDefaults(max_tokens=256),
    )  # fmt: skip
    assert parsed.defaults == RequestDefaults(
        priority=RequestPriority.LOW, slo_deadline_ms=2000.0, max_tokens=256, temperature=0.0,
        top_p=0.9, timeout_s=30.0,
    )  # fmt: skip
    assert parsed.sage.control_plane.default_max_tokens == 64


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"default_priority": "soonish"}, "default_priority"),
        ({"default_slo_deadline_ms": 0}, "default_slo_deadline_ms"),
        ({"default_top_p": "high"}, "default_top_p"),
        ({"default_temperature": 5}, "default_temperature"),
        ({"default_priority": 7}, "default_priority"),
        ({"config_path": 3}, "config_path"),
    ],
)
def test_bad_service_keys_name_the_key(config: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        control_plane_service_config(config)
    assert err.value.key == key


def test_an_integer_priority_is_a_default_priority() -> None:
    parsed = control_plane_service_config({"default_priority": 0})
    assert parsed.defaults.priority is RequestPriority.CRITICAL


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("default_priority", "asap"),
        ("request_timeout_s", -5),
        ("request_timeout_s", "5"),
        ("default_temperature", "hot"),
        ("default_temperature", 5),
    ],
)
def test_request_defaults_beside_a_config_path_are_checked_as_in_a_file(
    tmp_path: Path, key: str, value: object
) -> None:
    path = tmp_path / "cp.toml"
    path.write_text('[services.llm_control_plane]\nscheduling_policy = "fifo"\n')
    with pytest.raises(ConfigError) as err:
        control_plane_service_config({"config_path": str(path), key: value})
    assert err.value.key == key


def test_a_simulated_engine_that_fits_with_tensor_parallelism_is_accepted() -> None:
    cfg = VLLMServiceConfig.from_dict(
        {"model_id": "llama-3-70b", "engine": {"kind": "sim", "tensor_parallel_size": 4}}
    )
    assert cfg.backend == "sim"


def test_config_path_sources_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "cp.toml"
    path.write_text('[services.llm_control_plane]\nscheduling_policy = "fifo"\n')
    for source in (path, str(path), {"config_path": str(path), "default_priority": "HIGH"}):
        assert control_plane_service_config(source).sage.control_plane.scheduling_policy == "fifo"
    assert control_plane_service_config(None).sage == SageConfig.default()
    sage = SageConfig.default()
    assert control_plane_service_config(sage).sage is sage
    path.write_text('[services.llm_control_plane]\nscheduling_policy = "fastest"\n')
    with pytest.raises(ConfigError, match=r"cp\.toml:2"):
        control_plane_service_config({"config_path": str(path)})


def test_vllm_service_config_accepts_sages_keys_and_fills_its_defaults() -> None:
    cfg = VLLMServiceConfig.from_dict(
        {"model_id": "m", "embedding_model_id": "e", "auto_download": True, "auto_reload": False,
         "engine": {"max_model_len": 2048}, "embedding_engine": {"dtype": "half"},
         "sampling": {"max_tokens": 64, "presence_penalty": 0.3}, "tags": ["a"],
         "type": "VLLMService", "base_url": "https://llm.example.com"}
    )  # fmt: skip
    assert cfg.backend == "http"
    assert (cfg.host, cfg.port, cfg.scheme) == ("llm.example.com", 443, "https")
    assert cfg.engine == {**DEFAULT_ENGINE, "max_model_len": 2048}
    assert cfg.embedding_engine == {**DEFAULT_ENGINE, "max_model_len": 2048, "dtype": "half"}
    assert cfg.sampling == {**DEFAULT_SAMPLING, "max_tokens": 64, "presence_penalty": 0.3}
    assert (cfg.embedding_model_id, cfg.auto_download, cfg.auto_reload, cfg.tags) == (
        "e", True, False, ("a",),
    )  # fmt: skip
    assert cfg.request_defaults() == RequestDefaults(
        max_tokens=64, temperature=0.7, top_p=0.95, extra={"presence_penalty": 0.3}
    )


def test_a_sampling_seed_of_0_is_sent_and_default_penalties_are_not() -> None:
    """``0 == 0.0``: seed 0 had been dropped with the default penalties of 0.0."""
    sampling = {"seed": 0, "top_k": 0, "min_tokens": 0, "repetition_penalty": 1.0}
    cfg = VLLMServiceConfig.from_dict({"model_id": "m", "sampling": sampling})
    assert cfg.request_defaults().extra == sampling  # not presence/frequency_penalty 0.0


def test_a_sampling_value_of_none_is_not_given() -> None:
    """``n = None`` had been refused (only n = 1), as a request's own option had."""
    cfg = VLLMServiceConfig.from_dict({"model_id": "m", "sampling": {"n": None, "seed": None}})
    assert cfg.request_defaults().extra == {}


def test_where_the_engine_is() -> None:
    def backend(**data: Any) -> str:
        return VLLMServiceConfig.from_dict({"model_id": "m", **data}).backend

    assert backend() == "vllm"
    assert backend(engine={"tensor_parallel_size": 2}) == "vllm"
    assert backend(engine="sim") == "sim"
    assert backend(engine={"kind": "sim"}) == "sim"
    assert backend(host="gpu-1", port=8000) == "http"
    assert backend(base_url="http://gpu-1:8000/v1/") == "http"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({}, "model_id"),
        ({"model_id": "m", "modle": "x"}, "modle"),
        ({"model_id": 5}, "model_id"),
        ({"model_id": "m", "base_url": "http://h:1", "api_key": "a\x01b"}, "api_key"),
        ({"model_id": "m", "base_url": "http://h:1", "api_key": " pad"}, "api_key"),
        ({"model_id": "  "}, "model_id"),
        ({"model_id": "m", "engine": "tpu"}, "engine"),
        ({"model_id": "m", "engine": 3}, "engine"),
        ({"model_id": "m", "engine": "sim", "base_url": "http://h:1"}, "engine"),
        ({"model_id": "m", "base_url": "h:8000"}, "base_url"),
        ({"model_id": "m", "base_url": "http://h:1/api"}, "base_url"),
        ({"model_id": "m", "base_url": "http://h:1", "port": 2}, "base_url"),
        ({"model_id": "m", "base_url": "http://h:99999"}, "base_url"),  # a raw ValueError
        ({"model_id": "m", "base_url": "http://h:abc"}, "base_url"),
        ({"model_id": "m", "base_url": "http://h:0"}, "base_url"),  # it had become port 80
        ({"model_id": "m", "base_url": "http://u:pw@h:1"}, "base_url"),  # dropped unsaid
        ({"model_id": "m", "base_url": "http://h:1?x=1"}, "base_url"),
        ({"model_id": "m", "base_url": "http://a..b:8000"}, "base_url"),  # UnicodeError per call
        ({"model_id": "m", "base_url": "http://[::1"}, "base_url"),  # a raw ValueError
        ({"model_id": "m", "host": "a..b", "port": 8000}, "host"),
        ({"model_id": "m", "sampling": {"max_tokens": 10**30}}, "sampling.max_tokens"),
        ({"model_id": "m", "port": 8000}, "host"),
        ({"model_id": "m", "host": "h", "port": 0}, "port"),
        ({"model_id": "m", "host": "h", "port": 8000, "scheme": "ftp"}, "scheme"),
        ({"model_id": "m", "base_url": 8000}, "base_url"),
        ({"model_id": "m", "embedding_model_id": ""}, "embedding_model_id"),
        ({"model_id": "m", "engine": "sim", "sim": {"gpu": ""}}, "sim.gpu"),
        ({"model_id": "m", "engine": "sim", "sim": {"model": 3}}, "sim.model"),
        ({"model_id": "m", "dialect": "tgi"}, "dialect"),
        ({"model_id": "m", "engine": "sim", "sim": {"sped": 2}}, "sim.sped"),
        ({"model_id": "m", "engine": "sim", "sim": {"seed": "x"}}, "sim.seed"),
        ({"model_id": "m", "engine": "sim", "sim": {"gpu": "rtx9999"}}, "sim.gpu"),
        ({"model_id": "m", "engine": "sim", "sim": {"speed": -1}}, "sim.speed"),
        (
            {"model_id": "m", "engine": "sim", "sim": {"embedding_dimension": 0}},
            "sim.embedding_dimension",
        ),
        ({"model_id": "m", "engine": "sim", "sim": {"model": "llama-3-70b"}}, "sim.model"),
        ({"model_id": "llama-3-70b", "engine": "sim"}, "model_id"),
        ({"model_id": "m", "use_control_plane": "yes"}, "use_control_plane"),
        ({"model_id": "m", "control_plane": 5}, "control_plane"),
        ({"model_id": "m", "tags": "chat"}, "tags"),
        ({"model_id": "m", "sampling": []}, "sampling"),
        ({"model_id": "m", "engine": "sim", "type": "ControlPlaneVLLMService"}, "type"),
        # given where nothing reads them (they had been kept and ignored)
        ({"model_id": "m", "base_url": "http://h:1", "sim": {"gpu": "a100"}}, "sim"),
        ({"model_id": "m", "engine": "sim", "dialect": "sglang"}, "dialect"),
        ({"model_id": "m", "engine": "sim", "scheme": "https"}, "scheme"),
        ({"model_id": "m", "engine": "sim", "api_key": "k"}, "api_key"),
        ({"model_id": "m", "base_url": "http://h:1", "scheme": "https"}, "scheme"),
        ({"model_id": " m", "base_url": "http://h:1"}, "model_id"),
        (
            {
                "model_id": "m",
                "engine": "sim",
                "use_control_plane": True,
                "control_plane": {"scheduling_policy": "x"},
            },
            "control_plane.scheduling_policy",
        ),
    ],
)
def test_bad_vllm_service_configs_name_the_key(data: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        VLLMServiceConfig.from_dict(data)
    assert err.value.key == key


def test_endpoint_keys_beside_a_bad_endpoint_are_not_said_to_lack_one() -> None:
    """A bad base_url had made dialect and api_key 'apply only to an endpoint, and none is
    given'."""
    data = {"model_id": "m", "base_url": "ftp://x:1", "api_key": "k", "dialect": "openai"}
    with pytest.raises(ConfigError) as err:
        VLLMServiceConfig.from_dict(data)
    assert {e.key for e in err.value.each()} == {"base_url"}


def test_every_problem_of_a_vllm_service_config_is_reported_at_once() -> None:
    """A bad tensor_parallel_size beside a sim.* problem, and a control_plane table's
    problems beside the rest, had come one pass after another."""
    data: dict[str, Any] = {
        "model_id": "llama-3-8b", "engine": {"kind": "sim", "tensor_parallel_size": 0},
        "sim": {"speed": 0}, "sampling": {"temperature": -1},
    }  # fmt: skip
    with pytest.raises(ConfigError) as err:
        VLLMServiceConfig.from_dict(data)
    keys = {e.key for e in err.value.each()}
    assert keys == {"sim.speed", "sampling.temperature", "engine.tensor_parallel_size"}
    data = {
        "model_id": "m", "engine": "sim", "sampling": {"temperature": 5},
        "use_control_plane": True,
        "control_plane": {"instances": [{"instance_id": "a", "host": "h", "port": 0,
                                         "model_name": "m"}]},
    }  # fmt: skip
    with pytest.raises(ConfigError) as err:
        VLLMServiceConfig.from_dict(data)
    keys = {e.key for e in err.value.each()}
    assert keys == {"sampling.temperature", "control_plane.instances[0].port"}


def test_a_simulated_engine_names_the_engine_arguments_it_does_not_read(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A vLLM table switched to the simulator is kept as written (it runs once switched
    back), and a warning says what is not read (max_model_len had gone unsaid)."""
    with caplog.at_level("WARNING", logger="sage_llm.service"):
        cfg = VLLMServiceConfig.from_dict(
            {"model_id": "m", "engine": {"kind": "sim", "max_model_len": 100, "dtype": "half",
                                         "tensor_parallel_size": 1}}
        )  # fmt: skip
    assert cfg.backend == "sim" and cfg.engine["max_model_len"] == 100
    assert "engine.dtype, engine.max_model_len not read" in caplog.text
    caplog.clear()
    VLLMServiceConfig.from_dict({"model_id": "m", "engine": {"kind": "sim"}})
    assert caplog.text == ""


def test_a_max_tokens_default_beyond_64_bits_is_refused_when_built() -> None:
    """It had failed every call, under the name of an option the caller never gave."""
    with pytest.raises(
        ConfigError, match=r"must be at most 9223372036854775807 \(64 bits\)"
    ) as err:
        control_plane_service_config(None, defaults=RequestDefaults(max_tokens=10**30))
    assert err.value.key == "request_defaults.max_tokens"


def test_unknown_vllm_service_keys_get_a_suggestion_or_the_valid_keys() -> None:
    """As a control plane's tables' unknown keys do (config.md)."""
    messages = []
    for data in (
        {"model_id": "m", "engine": "sim", "foo": 1},
        {"model_id": "m", "engine": "sim", "sim": {"gpuu": "h100"}},
        {"model_id": "m", "engine": "sim", "sampling": {"tempreature": 1}},
    ):
        with pytest.raises(ConfigError) as err:
            VLLMServiceConfig.from_dict(data).request_defaults()
        messages.append(str(err.value))
    assert messages[0].startswith("foo: unknown key (valid keys: type, model_id, ")
    assert messages[1] == "sim.gpuu: unknown key (did you mean 'gpu'?)"
    assert messages[2] == (
        "sampling.tempreature: unknown sampling key 'tempreature' (did you mean 'temperature'?)"
    )


def test_bad_sampling_values_name_the_key() -> None:
    for sampling, key in (
        ({"max_tokens": 0}, "sampling.max_tokens"),
        ({"temprature": 1}, "sampling.temprature"),
        ({"top_p": -1}, "sampling.top_p"),
        ({"top_p": 5}, "sampling.top_p"),
        ({"temperature": 5}, "sampling.temperature"),
        ({"n": 0}, "sampling.n"),
        ({"n": "2"}, "sampling.n"),
    ):
        with pytest.raises(ConfigError) as err:
            VLLMServiceConfig.from_dict({"model_id": "m", "sampling": sampling})
        assert err.value.key == key


def test_every_problem_of_a_vllm_service_config_is_raised_at_once() -> None:
    data = {
        "model_id": "m", "engine": "sim", "colour": 1, "speed": 2,
        "sim": {"gpu": "tpu", "speed": -1},
        "sampling": {"temperature": 3.0, "max_tokens": 0}, "tags": "chat",
    }  # fmt: skip
    with pytest.raises(ConfigErrors) as err:
        VLLMServiceConfig.from_dict(data)
    assert sorted(str(e.key) for e in err.value.errors) == [
        "colour", "sampling.max_tokens", "sampling.temperature", "sim.gpu", "sim.speed",
        "speed", "tags",
    ]  # fmt: skip
    assert "sampling.max_tokens: must be a positive integer, got 0" in str(err.value)


def test_request_defaults_in_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "services.toml"
    path.write_text(
        "[services.llm_control_plane]\n"
        'scheduling_policy = "priority"\n'
        'default_priority = "high"\n'
        "default_slo_deadline_ms = 1500\n"
        "default_temperature = 0.2\n"
        "default_top_p = 0.8\n"
        "request_timeout_s = 20\n",
        encoding="utf-8",
    )
    expected = RequestDefaults(
        priority=RequestPriority.HIGH, slo_deadline_ms=1500.0, temperature=0.2, top_p=0.8,
        timeout_s=20.0,
    )  # fmt: skip
    assert check_config(path) == []
    assert control_plane_service_config(path).defaults == expected
    assert control_plane_service_config({"config_path": str(path)}).defaults == expected
    # beside config_path the dict may still set request defaults, and they win
    parsed = control_plane_service_config({"config_path": str(path), "default_priority": "low"})
    assert parsed.defaults.priority is RequestPriority.LOW
    assert parsed.defaults.slo_deadline_ms == 1500.0
    assert parsed.sage.control_plane.scheduling_policy == "priority"
    # the control plane does not take them as arguments
    assert "default_priority" not in load_config(path).manager_kwargs()


def test_bad_request_defaults_in_a_toml_file_name_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "services.toml"
    path.write_text(
        '[services.llm_control_plane]\ndefault_priority = "soonish"\ndefault_top_p = 1.5\n',
        encoding="utf-8",
    )
    errors = check_config(path)
    base = "services.llm_control_plane"
    assert [(e.location, e.key) for e in errors] == [
        (f"{path}:2", f"{base}.default_priority"),
        (f"{path}:3", f"{base}.default_top_p"),
    ]
    assert "invalid priority 'soonish'" in errors[0].message
    with pytest.raises(ConfigError, match="move scheduling_policy there"):
        control_plane_service_config({"config_path": str(path), "scheduling_policy": "fifo"})
    # a key no file has either is a misspelling, not a misplaced key
    with pytest.raises(ConfigError, match=r"unknown key \(did you mean 'config_path'\?\)") as info:
        control_plane_service_config({"config_path": str(path), "confg_path": 1})
    assert info.value.key == "confg_path"


def test_a_vllm_services_control_plane_is_checked_beside_its_own_problems(
    tmp_path: Path,
) -> None:
    """One problem of the VLLMService table had left its control plane unchecked (a
    missing file too) until the next run."""
    (tmp_path / "cp_bad.toml").write_text(
        '[services.llm_control_plane]\nscheduling_policy = "fifoo"\n'
    )
    head = '[services.llm]\ntype = "VLLMService"\nmodel_id = "llama-3-8b"\nengine = "sim"\n'
    for control_plane, says in (
        ('"cp_bad.toml"', "cp_bad.toml:2: services.llm_control_plane.scheduling_policy"),
        ('"missing.toml"', "missing.toml: cannot read config file"),
        ('{ scheduling_policy = "fifoo" }', "unknown value 'fifoo'"),
    ):
        path = tmp_path / "v.toml"
        path.write_text(
            head + "sampling = { temperature = 3 }\nuse_control_plane = true\n"
            f"control_plane = {control_plane}\n"
        )
        errors = check_config(path)
        assert errors[0].key == "services.llm.sampling.temperature"
        assert any(says in str(e) for e in errors[1:]), [str(e) for e in errors]


def test_sampling_temperature_and_top_p_accept_their_upper_bound_and_nothing_above() -> None:
    for key, high in (("temperature", 2.0), ("top_p", 1.0)):
        cfg = VLLMServiceConfig.from_dict({"model_id": "m", "sampling": {key: high}})
        assert cfg.sampling[key] == high
        with pytest.raises(ConfigError, match=f"must be <= {high:g}") as err:
            VLLMServiceConfig.from_dict({"model_id": "m", "sampling": {key: high + 0.0001}})
        assert err.value.key == f"sampling.{key}"


@pytest.mark.parametrize("field", ["slo_deadline_ms", "top_p", "timeout_s"])
def test_a_request_default_that_must_be_positive_refuses_zero(field: str) -> None:
    zero: dict[str, Any] = {field: 0.0}
    above: dict[str, Any] = {field: 0.5}
    with pytest.raises(ConfigError, match=r"must be > 0, got 0\.0") as err:
        check_request_defaults(RequestDefaults(**zero))
    assert err.value.key == f"request_defaults.{field}"
    check_request_defaults(RequestDefaults(**above))  # just above: accepted


def test_a_vllm_service_config_of_another_type_or_a_secret_not_a_string_is_refused() -> None:
    with pytest.raises(ConfigError, match="the VLLMService config must be a dict, got list"):
        VLLMServiceConfig.from_dict([("model_id", "m")])  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        VLLMServiceConfig.from_dict({"model_id": "m", "base_url": "http://h:1", "api_key": 12345})
    assert err.value.key == "api_key"
    assert "must be a string" in str(err.value) and "12345" not in str(err.value)
