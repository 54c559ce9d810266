"""The TOML configuration: the seed's format, defaults, strict checks, secrets."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sage_llm.config import (
    AdmissionConfig,
    ConfigErrors,
    ControlPlaneConfig,
    GatewayConfig,
    HealthConfig,
    InstanceConfig,
    SageConfig,
    SimulationConfig,
    at_address,
    check_config,
    check_instance,
    check_manager_arguments,
    config_from_dict,
    host_key,
    instance_fields,
    load_config,
    parse_config,
    unknown_instance_keys,
)
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.errors import ConfigError
from sage_llm.gateway.settings import ResolvedGateway
from sage_llm.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    PrefillingConfig,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "configs"

SEED = """\
# config/services.toml
[services.llm_control_plane]
type = "ControlPlaneVLLMService"
scheduling_policy = "adaptive"     # adaptive, slo_aware, priority, fifo, cost_optimized
enable_pd_separation = true        # 启用 Prefilling/Decoding 分离
routing_strategy = "load_balanced" # load_balanced, affinity, locality, topology_aware

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

INSTANCE = {"instance_id": "a", "host": "localhost", "port": 8000, "model_name": "m"}


def problem(text: str, env: dict[str, str] | None = None) -> ConfigError:
    """The single ConfigError ``text`` raises."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "cfg.toml", env=env or {})
    assert not isinstance(info.value, ConfigErrors), str(info.value)
    return info.value


def problems(text: str) -> tuple[ConfigError, ...]:
    """The several problems ``text`` raises at once."""
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, "cfg.toml", env={})
    return info.value.errors


# -- the seed's format ---------------------------------------------------------------------


def test_seed_example_parses_exactly() -> None:
    cfg = parse_config(SEED, "services.toml", env={})
    cp = cfg.control_plane
    assert cp.type == "ControlPlaneVLLMService"
    assert (cp.scheduling_policy, cp.routing_strategy) == ("adaptive", "load_balanced")
    assert cp.enable_pd_separation is True
    assert [i.instance_id for i in cp.instances] == ["llm-prefill-1", "llm-decode-1"]
    types = [i.instance_type for i in cp.instances]
    assert types == [ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING]
    assert [i.tensor_parallel_size for i in cp.instances] == [4, 1]
    assert [i.port for i in cp.instances] == [8000, 8001]
    assert cfg.source == "services.toml"
    assert cfg.fleet() == cp.instances


def test_seed_instances_become_execution_instances() -> None:
    prefill, decode = parse_config(SEED, env={}).execution_instances()
    assert prefill.instance_id == "llm-prefill-1"
    assert prefill.base_url == "http://localhost:8000"
    assert prefill.model_name == "meta-llama/Llama-2-7b"
    assert prefill.instance_type is ExecutionInstanceType.PREFILLING
    assert prefill.tensor_parallel_size == 4
    assert decode.instance_type is ExecutionInstanceType.DECODING
    assert prefill.metadata == {"sim_gpu": "h100", "sim_model": "llama-2-7b", "sim_speed": 1.0}
    assert prefill.nvlink_peers == [] and prefill.metadata is not decode.metadata


def test_manager_kwargs_fit_control_plane_manager() -> None:
    cfg = parse_config(SEED, env={})
    kwargs = cfg.manager_kwargs()
    inspect.signature(ControlPlaneManager).bind(**kwargs)
    manager = ControlPlaneManager(**kwargs)
    assert manager.pd_config.enabled is True
    assert manager.max_queue_size == 10_000


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PREFILLING", ExecutionInstanceType.PREFILLING),
        ("prefilling", ExecutionInstanceType.PREFILLING),
        ("prefill", ExecutionInstanceType.PREFILLING),
        ("decode", ExecutionInstanceType.DECODING),
        ("Hybrid", ExecutionInstanceType.HYBRID),
    ],
)
def test_instance_type_spellings(text: str, expected: ExecutionInstanceType) -> None:
    general = {**INSTANCE, "instance_id": "g", "port": 8001}  # the fleet can serve
    cfg = config_from_dict({"instances": [{**INSTANCE, "instance_type": text}, general]})
    assert cfg.control_plane.instances[0].instance_type is expected


# -- dict forms ----------------------------------------------------------------------------


def test_bare_service_table_dict() -> None:
    cfg = config_from_dict(
        {
            "type": "ControlPlaneVLLMService",
            "scheduling_policy": "fifo",
            "routing_strategy": "round_robin",
            "instances": [INSTANCE, {**INSTANCE, "instance_id": "b", "port": 8001}],
            "gateway": {"port": 9000},
        },
        env={},
    )
    assert cfg.control_plane.scheduling_policy == "fifo"
    assert [i.instance_id for i in cfg.control_plane.instances] == ["a", "b"]
    assert cfg.gateway.port == 9000


def test_bare_service_table_dict_unknown_key_lists_every_top_level_key() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"sheduling_policy": "fifo"}, env={})
    assert info.value.key == "sheduling_policy"
    assert "did you mean 'scheduling_policy'" in info.value.message
    with pytest.raises(ConfigError) as info:
        config_from_dict({"servics": {"llm_control_plane": {}}}, env={})
    assert "did you mean 'services'" in info.value.message
    with pytest.raises(ConfigError) as info:
        config_from_dict({"foo": 1}, env={})
    valid = info.value.message.split("valid keys: ", 1)[1]
    assert valid.startswith("services, gateway, health, admission, simulation, type, ")
    assert "scheduling_policy" in valid and "instances" in valid


def test_document_dict_with_service_keys_at_top_level() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"services": {"llm_control_plane": {}}, "scheduling_policy": "fifo"})
    assert info.value.key == "scheduling_policy"
    assert "did you mean [services.llm_control_plane]?" in info.value.message


def test_dict_role_values_may_be_objects() -> None:
    cfg = config_from_dict(
        {
            "instances": [
                {
                    **INSTANCE,
                    "instance_type": ExecutionInstanceType.PREFILLING,
                    "prefilling_config": PrefillingConfig(chunk_size=64),
                },
                {**INSTANCE, "instance_id": "d", "port": 8001, "instance_type": "DECODING"},
            ]
        },
        env={},
    )
    inst, _ = cfg.control_plane.instances
    assert inst.instance_type is ExecutionInstanceType.PREFILLING
    assert inst.prefilling_config == PrefillingConfig(chunk_size=64)
    with pytest.raises(ConfigError) as info:
        config_from_dict(
            {"instances": [{**INSTANCE, "prefilling_config": PrefillingConfig(chunk_size=0)}]}
        )
    assert info.value.key == "instances[0].prefilling_config.chunk_size"


def test_document_dict_and_none_means_unset() -> None:
    cfg = config_from_dict(
        {"services": {"llm_control_plane": {"seed": None, "mode": "sim"}}, "gateway": {}}
    )
    assert cfg.control_plane.seed is None
    assert cfg.control_plane.mode == "simulated"


def test_to_dict_round_trips() -> None:
    on_sglang = SEED
    for role in ("PREFILLING", "DECODING"):
        typed = f'instance_type = "{role}"'
        on_sglang = on_sglang.replace(typed, typed + '\nengine = "sglang"')
    cfg = parse_config(
        on_sglang.replace(
            "tensor_parallel_size = 1", "tensor_parallel_size = 1\nmetadata = {r = 1}"
        )
        + '\n[gateway]\nport = 1234\ncors_origins = ["https://a"]\n[health]\ninterval_s = 2.0\n'
        + "[services.llm_control_plane.pd]\nconnector = 'sglang'\n",
        env={},
    )
    assert config_from_dict(cfg.to_dict(), env={}) == cfg
    assert cfg.to_dict()["services"]["llm_control_plane"]["instances"][0]["instance_type"] == (
        "PREFILLING"
    )
    # secrets from the environment: the *_env keys are written, the masked values are not
    env = {"KEYS": "k1,k2", "TOKEN": "t", "ENGINE_KEY": "e"}
    secret = parse_config(
        SEED.replace("tensor_parallel_size = 1", 'api_key_env = "ENGINE_KEY"')
        + '\n[gateway]\napi_keys_env = "KEYS"\nadmin_token_env = "TOKEN"\n',
        env=env,
    )
    out = secret.to_dict()
    assert "admin_token" not in out["gateway"] and "api_keys" not in out["gateway"]
    assert config_from_dict(out, env=env) == secret


# -- defaults ------------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = SageConfig.default()
    assert parse_config("", env={}) == cfg
    assert config_from_dict({}, env={}) == cfg
    cp = cfg.control_plane
    assert (cp.scheduling_policy, cp.routing_strategy, cp.mode) == (
        "adaptive",
        "load_balanced",
        "http",
    )
    assert (cp.enable_auto_scaling, cp.enable_monitoring, cp.enable_pd_separation) == (
        False,
        True,
        True,
    )
    assert (cp.max_queue_size, cp.max_retries, cp.default_max_tokens) == (10_000, 2, 128)
    assert (cp.result_retention, cp.result_ttl_s, cp.prefix_block_size) == (2_000, 600.0, 16)
    assert cp.seed is None and cp.instances == () and cp.pd == PDSeparationConfig()
    gw = cfg.gateway
    assert (gw.host, gw.port, gw.api_keys, gw.admin_token) == ("127.0.0.1", 8080, (), None)
    assert (gw.max_body_bytes, gw.max_prompt_tokens, gw.max_tokens_limit) == (1 << 20, 32768, None)
    assert (gw.request_timeout_s, gw.workers, gw.log_prompts, gw.tracing) == (
        600.0,
        1,
        False,
        False,
    )
    hc = cfg.health
    assert (hc.interval_s, hc.timeout_s, hc.failure_threshold, hc.recovery_threshold) == (
        5.0,
        2.0,
        3,
        1,
    )
    assert hc.first_token_timeout_s is None and hc.idle_timeout_s is None and hc.eject_on_errors
    assert cfg.admission.max_queue_size is None and not cfg.admission.reject_infeasible_slo
    sim = cfg.simulation
    assert (sim.instances, sim.model, sim.gpu, sim.speed, sim.seed) == (
        4,
        "llama-3-8b",
        "h100",
        1.0,
        0,
    )


def test_default_fleet_is_simulated() -> None:
    fleet = SageConfig.default().execution_instances()
    assert [i.instance_id for i in fleet] == ["sim-0", "sim-1", "sim-2", "sim-3"]
    assert {i.engine for i in fleet} == {"sim"}
    assert [i.metadata["sim_seed"] for i in fleet] == [0, 1, 2, 3]
    assert fleet[0].max_concurrent_requests == 64
    assert fleet[0].metadata["sim_model"] == "llama-3-8b"


def test_simulation_table_shapes_the_fleet() -> None:
    cfg = parse_config('[simulation]\ninstances = 2\ngpu = "a100-80g"\nseed = 10\nspeed = 2\n')
    fleet = cfg.fleet()
    assert len(fleet) == 2
    assert {(i.sim_gpu, i.sim_speed) for i in fleet} == {("a100-80g", 2.0)}
    assert [i.sim_seed for i in fleet] == [10, 11]


def test_sim_model_follows_model_name_when_known() -> None:
    known, unknown = config_from_dict(
        {
            "instances": [
                {**INSTANCE, "model_name": "meta-llama/Meta-Llama-3-70B-Instruct"},
                {**INSTANCE, "instance_id": "b", "port": 2, "sim_model": "", "model_name": "x"},
            ]
        }
    ).control_plane.instances
    assert known.sim_model == "llama-3-70b"
    assert unknown.sim_model == "llama-3-8b"
    explicit = InstanceConfig("c", "h", 1, "m", sim_model="qwen2.5-7b", sim_seed=5, sim_max_loras=4)
    assert explicit.to_instance().metadata["sim_seed"] == 5
    assert explicit.to_instance().metadata["sim_max_loras"] == 4
    assert explicit.to_instance().metadata["sim_model"] == "qwen2.5-7b"


def test_admission_and_health_settings_reach_the_control_plane() -> None:
    cfg = parse_config("[admission]\nmax_queue_size = 50\n[health]\ninterval_s = 1.5\n")
    assert cfg.control_plane.max_queue_size == 50
    assert cfg.manager_kwargs()["health_interval_s"] == 1.5
    cfg = parse_config("[services.llm_control_plane]\nhealth_interval_s = 9.0\n")
    assert cfg.health.interval_s == 9.0


def test_pd_table_and_enable_flag() -> None:
    cfg = parse_config(
        "[services.llm_control_plane]\nenable_pd_separation = false\n"
        '[services.llm_control_plane.pd]\nrouting_policy = "always"\nconnector = "SGLang"\n'
    )
    pd = cfg.control_plane.pd_config()
    assert (pd.enabled, pd.routing_policy, pd.connector) == (False, "always", "sglang")
    assert cfg.control_plane.pd_config() is not cfg.control_plane.pd_config()
    only_pd = parse_config("[services.llm_control_plane.pd]\nenabled = false\n")
    assert only_pd.control_plane.enable_pd_separation is False


def test_pd_config_follows_the_enable_flag_of_a_config_built_in_code() -> None:
    off = ControlPlaneConfig(enable_pd_separation=False)
    assert off.pd.enabled is True  # the table's default, which the flag overrides
    assert off.pd_config().enabled is False
    assert off.manager_kwargs()["pd_config"].enabled is False
    assert ControlPlaneConfig().pd_config().enabled is True


@pytest.mark.parametrize("mode", ["sim", "local", "SIM", " Local ", "simulated"])
def test_every_spelling_of_the_simulated_mode_means_simulated(mode: str) -> None:
    text = f'[services.llm_control_plane]\nmode = "{mode}"\n'
    assert parse_config(text, "cfg.toml", env={}).control_plane.mode == "simulated"
    assert ControlPlaneConfig(mode=mode).mode == "simulated"


def test_the_gateway_host_is_an_address_to_listen_on() -> None:
    """Not an engine's: no scheme to set (its URL hint was an instance's), and any form
    the system resolves is taken (``0``, ``127.1``)."""
    err = problem('[gateway]\nhost = "http://x"\n')
    assert err.key == "gateway.host"
    assert err.message.endswith("must be a host name or address to listen on, not a URL")
    assert parse_config('[gateway]\nhost = "127.1"\n').gateway.host == "127.1"
    assert parse_config('[gateway]\nhost = "*"\n').gateway.host == "*"  # every address
    assert parse_config('[gateway]\nhost = "a\u3002b"\n').gateway.host == "a\u3002b"
    err = problem('[gateway]\nhost = "a\u3002\u3002b"\n')  # an empty label, not the dot
    assert err.message.endswith("1-63 characters long, got 'a\u3002\u3002b'")  # as written
    link_local = 'host = "fe80::1%eth0"'  # an address to listen on (not a URL's) may have one
    assert parse_config(f"[gateway]\n{link_local}\n").gateway.host == "fe80::1%eth0"


def test_gateway_inside_the_service_table() -> None:
    cfg = parse_config("[services.llm_control_plane.gateway]\nport = 9999\n")
    assert cfg.gateway.port == 9999


def test_where_the_bind_address_is_written(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[gateway]\n\nhost = "localhost"\n')
    cfg = load_config(path)
    assert cfg.where("gateway.host") == f"{path}:3: gateway.host"
    assert cfg.where("gateway.port") == "gateway.port"  # not written: its default
    assert SageConfig.default().where("gateway.host") == "gateway.host"


def test_other_sage_services_are_left_alone() -> None:
    text = '[services.embedder]\ntype = "EmbeddingService"\nanything = 1\n' + SEED
    assert len(parse_config(text).control_plane.instances) == 2
    by_type = parse_config(
        '[services.my_llm]\ntype = "ControlPlaneVLLMService"\nscheduling_policy = "fifo"\n'
    )
    assert by_type.control_plane.scheduling_policy == "fifo"


def test_every_control_plane_service_table_is_checked() -> None:
    other = (
        '[services.embed_plane]\ntype = "ControlPlaneVLLMService"\nscheduling_policy = "fifoo"\n'
        "[services.embed_plane.health]\ninterval_s = -1\n"
    )
    errs = problems(SEED + other)  # serve runs llm_control_plane; the other is still checked
    assert [(e.key, e.detail) for e in errs] == [
        ("services.embed_plane.scheduling_policy", "unknown value 'fifoo' (did you mean 'fifo'?)"),
        ("services.embed_plane.health.interval_s", "must be > 0, got -1.0"),
    ]
    two = (
        '[services.a]\ntype = "ControlPlaneVLLMService"\n'
        '[services.b]\ntype = "ControlPlaneVLLMService"\nscheduling_policy = "bad"\n'
    )
    keys = [e.key for e in problems(two)]
    assert keys == ["services", "services.b.scheduling_policy"]
    whole = (  # the whole-file rules too, not only each table's own
        '[services.second]\ntype = "ControlPlaneVLLMService"\ndefault_max_tokens = 500\n'
        "max_queue_size = 7\n[services.second.gateway]\nport = 8001\nmax_tokens_limit = 100\n"
        "[services.second.admission]\nmax_queue_size = 5\n"
        '[[services.second.instances]]\ninstance_id = "a"\nhost = "127.0.0.1"\nport = 8001\n'
        'model_name = "m"\n'
    )
    assert [e.key for e in problems(SEED + whole)] == [
        "services.second.default_max_tokens",
        "services.second.max_queue_size",
        "services.second.instances[0].port",
    ]


def test_a_vllm_service_table_is_checked_with_vllm_services_keys() -> None:
    table = '[services.llm]\ntype = "VLLMService"\nmodel_id = "m"\nengine = "sim"\n'
    cfg = parse_config(table + SEED)  # not the control plane's table, and valid as it is
    assert len(cfg.control_plane.instances) == 2
    err = problem(table + "sampling = { temperature = 5 }\n")
    assert str(err) == "cfg.toml:5: services.llm.sampling.temperature: must be <= 2, got 5"
    err = problem(table.replace('model_id = "m"\n', ""))
    assert err.key == "services.llm.model_id"
    err = problem('[services.llm_control_plane]\ntype = "VLLMService"\n')
    assert "the control plane's type is ControlPlaneVLLMService" in err.message
    err = problem('[services.llm]\ntype = "VLLMService"\nscheduling_policy = "fifo"\n')
    assert err.key == "services.llm.type"
    assert 'for the control plane, type = "ControlPlaneVLLMService"' in err.message
    # its control plane's instances, at their lines (the index had been a quoted key)
    nested = (
        table + "use_control_plane = true\n[services.llm.control_plane]\n"
        '[[services.llm.control_plane.instances]]\ninstance_id = "a"\nhost = "h"\n'
        'port = 0\nmodel_name = "m"\n'
    )
    err = problem(nested)
    assert str(err) == (
        "cfg.toml:10: services.llm.control_plane.instances[0].port: must be >= 1, got 0"
    )
    # a quoted key with a dot in it: quoted, at its own line
    err = problem(table + '[services.llm.sampling]\ntemperature = 0.5\n"top.p" = 1\n')
    assert (err.location, err.key) == ("cfg.toml:7", 'services.llm.sampling."top.p"')


def test_example_configs_all_load() -> None:
    env = {"SAGE_API_KEYS": "k1, k2", "SAGE_ADMIN_TOKEN": "tok"}
    paths = sorted(EXAMPLES.glob("*.toml"))
    assert {p.name for p in paths} >= {"cluster.toml", "pd.toml", "simulated.toml"}
    for path in paths:
        assert check_config(path, env=env) == [], path
        cfg = load_config(path, env=env)
        assert cfg.fleet()
        ControlPlaneManager(**cfg.manager_kwargs())
    cluster = load_config(EXAMPLES / "cluster.toml", env=env)
    assert cluster.gateway.api_keys == ("k1", "k2")
    assert cluster.gateway.admin_token == "tok"
    pd = load_config(EXAMPLES / "pd.toml", env=env).control_plane.instances
    assert pd[0].prefilling_config is not None and pd[0].prefilling_config.chunk_size == 2048
    assert pd[1].decoding_config is not None and pd[1].decoding_config.max_num_seqs == 256
    simulated = load_config(EXAMPLES / "simulated.toml", env=env).control_plane
    assert simulated.mode == "simulated" and {i.engine for i in simulated.instances} == {"sim"}


# -- errors --------------------------------------------------------------------------------


def test_unknown_key_with_suggestion() -> None:
    err = problem(SEED.replace("scheduling_policy", "sheduling_policy"))
    assert err.location == "cfg.toml:4"
    assert err.key == "services.llm_control_plane.sheduling_policy"
    assert "did you mean 'scheduling_policy'" in err.message


def test_unknown_instance_key_and_section() -> None:
    err = problem(SEED.replace("tensor_parallel_size = 1", "tensor_parallel = 1"))
    assert (err.location, err.key) == (
        "cfg.toml:22",
        "services.llm_control_plane.instances[1].tensor_parallel",
    )
    assert "tensor_parallel_size" in err.message
    err = problem("[gatway]\nport = 1\n")
    assert (err.location, err.key) == ("cfg.toml:1", "gatway")
    assert "did you mean 'gateway'" in err.message
    # a word that is one part of a key: that key, not the nearest spelling (sim_model)
    for short, meant in (
        ("type", "instance_type"),
        ("engine_type", "engine"),
        ("model", "model_name"),
    ):
        err = problem(SEED.replace('instance_type = "DECODING"', f'{short} = "DECODING"'))
        assert f"did you mean {meant!r}" in err.message, err.message


def test_wrong_type() -> None:
    err = problem(SEED.replace("port = 8001", 'port = "8001"'))
    assert (err.location, err.key) == (
        "cfg.toml:19",
        "services.llm_control_plane.instances[1].port",
    )
    assert "must be an integer" in err.message


def test_bool_is_not_an_int_but_an_int_is_a_float() -> None:
    err = problem("[services.llm_control_plane]\nmax_retries = true\n")
    assert err.key == "services.llm_control_plane.max_retries"
    assert "must be an integer, got boolean true" in err.message
    assert parse_config("[health]\ntimeout_s = 3\n").health.timeout_s == 3.0
    assert "finite" in problem("[health]\ntimeout_s = inf\n").message


def test_a_boolean_is_not_a_number() -> None:
    err = problem("[services.llm_control_plane]\nstats_interval_s = true\n")
    assert (err.location, err.key) == ("cfg.toml:2", "services.llm_control_plane.stats_interval_s")
    assert "must be a number, got boolean true" in err.message


def test_a_value_at_an_inclusive_bound_is_accepted() -> None:
    cfg = parse_config(
        "[services.llm_control_plane]\nengine_stream_sample = 1.0\n\n[gateway]\nport = 65535\n"
    )
    assert cfg.gateway.port == 65535
    assert ControlPlaneManager(**cfg.manager_kwargs()).engine_stream_sample == 1.0
    instance = SEED.replace("port = 8000", "port = 65535")
    assert parse_config(instance).control_plane.instances[0].port == 65535


def test_bad_enum_values() -> None:
    err = problem(SEED.replace('"adaptive"', '"adaptiv"'))
    assert (err.location, err.key) == ("cfg.toml:4", "services.llm_control_plane.scheduling_policy")
    assert "did you mean 'adaptive'" in err.message
    err = problem(SEED.replace('"DECODING"', '"DECODER"'))
    assert (err.location, err.key) == (
        "cfg.toml:21",
        "services.llm_control_plane.instances[1].instance_type",
    )
    err = problem('[services.llm_control_plane]\nrouting_strategy = "nearest"\n')
    assert "topology_aware" in err.message
    err = problem('[services.llm_control_plane]\nengine_stream = "never"\n')
    assert (err.location, err.key) == ("cfg.toml:2", "services.llm_control_plane.engine_stream")
    assert "always" in err.message and "client" in err.message
    cfg = parse_config('[services.llm_control_plane]\nengine_stream = "Client"\n')
    assert ControlPlaneManager(**cfg.manager_kwargs()).engine_stream == "client"
    assert ControlPlaneManager(**parse_config("").manager_kwargs()).engine_stream == "sampled"
    for bad in ("0", "1.5"):
        err = problem(f"[services.llm_control_plane]\nengine_stream_sample = {bad}\n")
        key = "services.llm_control_plane.engine_stream_sample"
        assert (err.location, err.key) == ("cfg.toml:2", key)
    cfg = parse_config("[services.llm_control_plane]\nengine_stream_sample = 0.5\n")
    assert ControlPlaneManager(**cfg.manager_kwargs()).engine_stream_sample == 0.5
    err = problem("[services.llm_control_plane]\nengine_stream_sample_max_per_s = -1\n")
    key = "services.llm_control_plane.engine_stream_sample_max_per_s"
    assert (err.location, err.key) == ("cfg.toml:2", key)
    cfg = parse_config("[services.llm_control_plane]\nengine_stream_sample_max_per_s = 0\n")
    assert ControlPlaneManager(**cfg.manager_kwargs()).engine_stream_sample_max_per_s == 0
    default = ControlPlaneManager(**parse_config("").manager_kwargs())
    assert default.engine_stream_sample_max_per_s == 20.0
    assert (
        parse_config(
            '[services.llm_control_plane]\nrouting_strategy = "Power-Of-Two"\n'
        ).control_plane.routing_strategy
        == "power_of_two"
    )


def test_duplicate_instance_id() -> None:
    err = problem(SEED.replace('"llm-decode-1"', '"llm-prefill-1"'))
    assert (err.location, err.key) == (
        "cfg.toml:17",
        "services.llm_control_plane.instances[1].instance_id",
    )
    assert "duplicate instance id 'llm-prefill-1' (also instances[0])" in err.message


def test_duplicate_address_in_http_mode_only() -> None:
    same = SEED.replace("port = 8001", "port = 8000")
    err = problem(same)
    assert (err.location, err.key) == (
        "cfg.toml:19",
        "services.llm_control_plane.instances[1].port",
    )
    simulated = same.replace('type = "Control', 'mode = "simulated"\ntype = "Control')
    assert len(parse_config(simulated).control_plane.instances) == 2


def test_one_engine_under_two_names_is_a_duplicate_address() -> None:
    """Host names are case-blind, localhost is 127.0.0.1, and an engine at 0.0.0.0 is
    reached at 127.0.0.1 (as the gateway's own-address check reads it)."""
    seconds = ('host = "LocalHost"\nport = 8000', 'host = "127.0.0.1"\nport = 8000',
               'host = "0.0.0.0"\nport = 8000', 'host = "localhost."\nport = 8000',
               'host = "::ffff:127.0.0.1"\nport = 8000')  # fmt: skip
    for second in seconds:
        err = problem(SEED.replace('host = "localhost"\nport = 8001', second))
        assert err.key == "services.llm_control_plane.instances[1].port"
        assert "is also instances[0]'s address" in err.message


def test_an_ipv4_mapped_address_is_the_ipv4_address_it_reaches() -> None:
    """``::ffff:127.0.0.1`` reaches ``127.0.0.1``: as the gateway's own address it had
    passed the check, and each request came back to the gateway (a 502)."""
    assert host_key("::ffff:127.0.0.1") == host_key("[::FFFF:7f00:1]") == "127.0.0.1"
    assert at_address("::ffff:127.0.0.1", 8000, "127.0.0.1", 8000)
    assert at_address("::ffff:127.0.0.1", 8000, "0.0.0.0", 8000)
    assert not at_address("::ffff:127.0.0.1", 8000, "::", 8000)  # IPv6 only
    assert host_key("::1") == "::1" and host_key("::ffff:10.0.0.1") == "10.0.0.1"
    # a host name is compared as written: not taken for the wildcard's loopback
    assert not at_address("gpu-host", 8000, "0.0.0.0", 8000)
    assert at_address("gpu-host", 8000, "gpu-host", 8000)


def test_bad_latency_priors_in_metadata_are_reported_at_their_line() -> None:
    """They had passed the check and then crashed ``serve`` (a string) or divided by zero
    (a prefill rate of 0) when the instance was registered."""
    text = SEED.replace(
        "tensor_parallel_size = 4",
        'tensor_parallel_size = 4\nmetadata = { tpot_ms = "fast", prefill_tokens_per_s = 0 }',
    )
    errs = problems(text)
    assert {(e.location, e.key) for e in errs} == {
        ("cfg.toml:15", "services.llm_control_plane.instances[0].metadata.tpot_ms"),
        ("cfg.toml:15", "services.llm_control_plane.instances[0].metadata.prefill_tokens_per_s"),
    }
    good = SEED.replace(
        "tensor_parallel_size = 4", "tensor_parallel_size = 4\nmetadata = { ttft_base_ms = 0 }"
    )
    assert parse_config(good).control_plane.instances[0].metadata["ttft_base_ms"] == 0
    cp = ControlPlaneManager(mode="http")
    bad = ExecutionInstance("x", "127.0.0.1", 9000, "m", metadata={"tpot_ms": -5})
    with pytest.raises(ConfigError, match="must be > 0") as info:
        cp.register_instance(bad)
    assert (info.value.key, info.value.location) == ("metadata.tpot_ms", "instance 'x'")
    # an integer no float holds: a line, not an OverflowError's traceback
    huge = SEED.replace("tensor_parallel_size = 4", f"metadata = {{ tpot_ms = {10**400} }}")
    assert problem(huge).message.endswith("must be a finite number, got integer of 401 digits")
    with pytest.raises(ConfigError, match="integer of 401 digits"):
        check_instance(ExecutionInstance("y", "h", 1, "m", metadata={"ttft_base_ms": 10**400}))


def test_a_bad_bootstrap_port_in_metadata_is_reported_at_its_line() -> None:
    """The SGLang connector reads it for every PD request: a string had failed each of them
    with an internal error (and a traceback), a port out of range each with a 400."""
    text = SEED.replace(
        "tensor_parallel_size = 4",
        'tensor_parallel_size = 4\nmetadata = { bootstrap_port = "abc" }',
    )
    err = problem(text)
    assert (err.location, err.key) == (
        "cfg.toml:15",
        "services.llm_control_plane.instances[0].metadata.bootstrap_port",
    )
    assert err.message.endswith("must be a TCP port (an integer in 1..65535), got string 'abc'")
    good = SEED.replace("tensor_parallel_size = 4", "metadata = { bootstrap_port = 9000 }")
    assert parse_config(good).control_plane.instances[0].metadata["bootstrap_port"] == 9000
    for bad in (99999, 0, True, 80.0):
        instance = ExecutionInstance("y", "h", 1, "m", metadata={"bootstrap_port": bad})
        with pytest.raises(ConfigError, match="must be a TCP port") as info:
            check_instance(instance)
        assert info.value.key == "metadata.bootstrap_port"
    with pytest.raises(ValueError, match=r"metadata\.bootstrap_port"):
        InstanceConfig("z", "h", 1, "m", metadata={"bootstrap_port": -3})


def test_zero_is_accepted_where_it_means_something() -> None:
    """A gateway port of 0 binds any free port; a stall timeout of 0 turns the check off."""
    cfg = parse_config("[gateway]\nport = 0\n[health]\nstall_timeout_s = 0\n")
    assert (cfg.gateway.port, cfg.health.stall_timeout_s) == (0, 0.0)


def test_a_failure_rate_window_is_at_least_two_requests() -> None:
    assert parse_config("[health]\nfailure_rate_window = 2\n").health.failure_rate_window == 2
    err = problem("[health]\nfailure_rate_window = 1\n")
    assert (err.location, err.key) == ("cfg.toml:2", "health.failure_rate_window")
    assert "must be >= 2, got 1" in err.message


def test_two_problems_with_one_key_are_both_reported() -> None:
    entry = (
        '[[services.llm_control_plane.instances]]\ninstance_id = "ID"\nhost = "h"\n'
        'port = 70000\nmodel_name = "m"\n'
    )
    errs = problems(entry.replace("ID", "a") + entry.replace("ID", "b"))
    assert [
        (e.location, e.detail)
        for e in errs
        if e.key == "services.llm_control_plane.instances[1].port"
    ] == [
        ("cfg.toml:9", "must be <= 65535, got 70000"),
        ("cfg.toml:9", "h:70000 is also instances[0]'s address"),
    ]


@pytest.mark.parametrize("port", [1, 65535])
def test_a_bootstrap_port_at_either_end_of_the_range_is_accepted(port: int) -> None:
    instance = InstanceConfig("p0", "h", 1, "m", metadata={"bootstrap_port": port})
    assert instance.metadata["bootstrap_port"] == port
    check_instance(ExecutionInstance("p0", "h", 1, "m", metadata={"bootstrap_port": port}))
    with pytest.raises(ConfigError, match=r"TCP port \(an integer in 1\.\.65535\), got") as err:
        check_instance(ExecutionInstance("p0", "h", 1, "m", metadata={"bootstrap_port": 65536}))
    assert err.value.key == "metadata.bootstrap_port"


@pytest.mark.parametrize(
    ("line", "message"),
    [("port = 0", "must be >= 1, got 0"), ("port = 65536", "must be <= 65535, got 65536")],
)
def test_bad_port(line: str, message: str) -> None:
    err = problem(SEED.replace("port = 8000", line))
    assert (err.location, err.key) == (
        "cfg.toml:11",
        "services.llm_control_plane.instances[0].port",
    )
    assert message in err.message


@pytest.mark.parametrize(
    ("replacement", "key", "message"),
    [
        ("tensor_parallel_size = 0", "tensor_parallel_size", "must be >= 1"),
        ('host = "http://localhost"', "host", "not a URL"),
        ('host = ""', "host", "must not be empty"),
        ('host = "local\\u0007host"', "host", "must not contain control characters"),
        ('host = "[::1]"', "host", "write an IPv6 address without brackets: '::1'"),
        ('host = "127.0.0.1:8001"', "host", "without a port (set port separately)"),
        ('host = "fe80::1%eth0"', "host", "with a zone id"),
        ('host = "127.0.0.1#x"', "host", "without '#'"),  # the URL's port would be lost
        ('host = "127.0.0.1?x"', "host", "without '?'"),
        ('host = "user@h"', "host", "without '@'"),
        # characters no lookup takes (a name of them had loaded, and failed every probe)
        ("host = 'a<b>'", "host", "letters, digits, '-', '_' and dots, not '<'"),
        ("host = '%41'", "host", "not '%'"),
        ("host = '\"'", "host", "not '\"'"),
        # a URL holds a name in its NFKC form: checked (and refused) as the engine sees it
        ('host = "\uff11\uff12\uff17.\uff11"', "host", "must be written as '127.0.0.1'"),
        ('host = "127\u30021"', "host", "must be written as '127.0.0.1'"),  # IDNA's dot
        # no form to advise: why the form a URL holds is refused
        (
            'host = "a\u3002\u3002b"',
            "host",
            "got 'a..b' (written 'a\u3002\u3002b', which a URL holds as 'a..b')",
        ),
        ('host = "a\u05d0b"', "host", "IDNA can encode (Violation of BIDI requirement 2)"),
        ('host = "a\u202eb"', "host", "without '\\u202e' (IDNA takes no such character)"),
        # forms inet_aton reads but no engine URL can hold (the client refuses them)
        ('host = "127.1"', "host", "must be an IPv4 address written in full"),
        ('host = "2130706433"', "host", "(four numbers 0-255 without leading zeros"),
        ('host = "127.0.0.01"', "host", "got '127.0.0.01'"),
        ('host = "1.2.3.999"', "host", "must be an IPv4 address written in full"),
        ('host = "0x7f.1"', "host", "without leading zeros): '127.0.0.1', got '0x7f.1'"),
        ('host = "0177.0.0.1"', "host", "'127.0.0.1', got '0177.0.0.1'"),
        ('host = "0X7F.0.0.1"', "host", "'127.0.0.1', got '0X7F.0.0.1'"),
        ('machine_id = ""', "machine_id", "must not be empty"),  # every "" one machine
        ('rack_id = " "', "rack_id", "must not be empty"),
        ('nvlink_peers = ["p\\u001b"]', "nvlink_peers[0]", "must not contain control"),
        ('sim_model = "llama-3-8b "', "sim_model", "must not begin or end with white space"),
        ('engine = "trt"', "engine", "valid values: vllm, sglang, openai, sim"),
        ('sim_gpu = "tpu"', "sim_gpu", "unknown GPU"),
        ('scheme = "ftp"', "scheme", "unknown value"),
        ("nvlink_peers = [1]", "nvlink_peers[0]", "must be a string"),
        ("metadata = 3", "metadata", "must be a table"),
        ('engine_scheduling_policy = "sjf"', "engine_scheduling_policy", "unknown value"),
        (
            'engine = "sglang"\nengine_scheduling_policy = "priority"',
            "engine_scheduling_policy",
            "'priority' applies to vllm engines only (vLLM's --scheduling-policy; and "
            "simulated ones), not engine = 'sglang'",
        ),
        ('lora_adapters = [""]', "lora_adapters[0]", "must not be empty"),
        ('lora_adapters = "sql"', "lora_adapters", "must be an array"),
        ('lora_adapters = ["sql", "sql"]', "lora_adapters", "'sql' is named twice"),
        (
            'lora_adapters = ["meta-llama/Llama-2-7b"]',
            "lora_adapters",
            "'meta-llama/Llama-2-7b' is the instance's model_name, not one of its adapters",
        ),
    ],
)
def test_instance_value_errors(replacement: str, key: str, message: str) -> None:
    if replacement.startswith("host"):
        text = SEED.replace('host = "localhost"\nport = 8001', f"{replacement}\nport = 8001")
    else:
        text = SEED.replace("tensor_parallel_size = 1", replacement)
    err = problem(text)
    assert err.key == f"services.llm_control_plane.instances[1].{key}"
    assert message in err.message


def test_an_instances_lora_adapters_are_read() -> None:
    text = SEED.replace("tensor_parallel_size = 1", 'lora_adapters = ["sql", "chat-v2"]', 1)
    instances = parse_config(text, "cfg.toml", env={}).control_plane.instances
    assert [i.to_instance().lora_adapters for i in instances] == [[], ["sql", "chat-v2"]]


def test_names_with_white_space_at_an_end_are_refused() -> None:
    """A model served as ``"llama-3-8b "`` answered a request for ``llama-3-8b`` with a 404
    that listed it."""
    text = SEED.replace('"llm-decode-1"', '"llm-decode-1 "').replace(
        'model_name = "meta-llama/Llama-2-7b"\ninstance_type = "DECODING"',
        'model_name = " meta-llama/Llama-2-7b"\ninstance_type = "DECODING"',
    )
    assert {(e.key, e.detail.split(",")[0]) for e in problems(text)} == {
        (f"services.llm_control_plane.instances[1].{key}", "must not begin or end with white space")
        for key in ("instance_id", "model_name")
    }
    err = problem('[simulation]\nmodel = "llama-3-8b "\n')
    assert (err.key, err.location) == ("simulation.model", "cfg.toml:2")
    assert "must not begin or end with white space" in err.message


@pytest.mark.parametrize(
    ("text", "got"), [("gateway = 5\n", "integer 5"), ('health = "x"\n', "string 'x'")]
)
def test_a_section_that_is_no_table_says_what_it_is(text: str, got: str) -> None:
    assert problem(text).message.endswith(f"must be a table, got {got}")


def test_a_setting_given_in_two_places_must_agree() -> None:
    text = (
        "[services.llm_control_plane]\nhealth_interval_s = 9\nmax_queue_size = 5\n"
        "[health]\ninterval_s = 2\n[admission]\nmax_queue_size = 6\n"
    )
    assert [(e.key, e.location) for e in problems(text)] == [
        ("services.llm_control_plane.health_interval_s", "cfg.toml:2"),
        ("services.llm_control_plane.max_queue_size", "cfg.toml:3"),
    ]
    bad = text.replace("max_queue_size = 6", "max_queue_size = -1")  # its own problem only
    assert [e.key for e in problems(bad)][1:] == ["admission.max_queue_size"]
    ours_bad = text.replace("= 9", "= 0").replace("= 5", "= 0")  # the same, the other way
    assert [(e.key, e.detail) for e in problems(ours_bad)] == [
        ("services.llm_control_plane.health_interval_s", "must be > 0, got 0.0"),
        ("services.llm_control_plane.max_queue_size", "must be >= 1, got 0"),
    ]
    agree = text.replace("= 9", "= 2").replace("= 5", "= 6")
    config = parse_config(agree)
    assert (config.control_plane.health_interval_s, config.control_plane.max_queue_size) == (2, 6)


def test_a_sections_key_at_top_level_is_pointed_to_its_section() -> None:
    assert [str(e) for e in problems("port = 8080\nmax_queue_wait_s = 3\n")] == [
        "cfg.toml:1: port: unknown key (did you mean port under [gateway]?)",
        "cfg.toml:2: max_queue_wait_s: unknown key (did you mean max_queue_wait_s under "
        "[admission]?)",
    ]
    err = problem("[services.llm_control_plane]\nhealth_interval_s = inf\n")
    assert err.message.endswith("must be a finite number, got inf")


def test_a_document_nested_too_deeply_is_one_error_not_a_traceback() -> None:
    deep = "{a = " * 600 + "1" + "}" * 600
    err = problem(f"[services.llm_control_plane]\npolicy_params = {deep}\n")
    assert str(err) == "cfg.toml: tables or arrays nested too deeply to read"


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("[simulation]\ninstances = 50001\n", "simulation.instances", "must be <= 50000"),
        (
            "[services.llm_control_plane]\nprefix_index_capacity = 10000000000000\n",
            "services.llm_control_plane.prefix_index_capacity",
            "must be <= 16777216",
        ),
    ],
)
def test_sizes_that_could_not_be_served_are_refused(text: str, key: str, message: str) -> None:
    err = problem(text)
    assert (err.key, err.location) == (key, "cfg.toml:2")
    assert message in err.message


def test_an_ipv6_address_is_a_host() -> None:
    text = SEED.replace('host = "localhost"\nport = 8001', 'host = "::1"\nport = 8001')
    [_, inst] = parse_config(text, "cfg.toml", env={}).control_plane.instances
    assert (inst.host, inst.to_instance().base_url) == ("::1", "http://[::1]:8001")


def test_simulator_name_errors_name_the_key_once() -> None:
    err = problem(SEED.replace("tensor_parallel_size = 1", 'sim_gpu = "tpu"'))
    assert str(err).startswith(
        "cfg.toml:22: services.llm_control_plane.instances[1].sim_gpu: unknown GPU 'tpu'; "
    )
    err = problem('[simulation]\nmodel = "gpt-9"\n')
    assert str(err).startswith("cfg.toml:2: simulation.model: unknown model 'gpt-9'; ")
    with pytest.raises(ConfigError) as info:
        check_instance(ExecutionInstance("i0", "h", 8000, "m", metadata={"sim_gpu": "tpu"}))
    assert str(info.value).startswith("instance 'i0': metadata.sim_gpu: unknown GPU 'tpu'; ")


def test_sim_keys_inside_an_instances_metadata_are_an_error() -> None:
    err = problem(SEED.replace("tensor_parallel_size = 1", 'metadata = { sim_gpu = "a100" }'))
    assert err.key == "services.llm_control_plane.instances[1].metadata.sim_gpu"  # the key itself
    assert err.message.endswith(
        "metadata.sim_gpu: give sim_gpu as a key of the instance, not in its metadata"
    )
    # said once (by the entry, and by the check that runs whatever else it lacks)
    once = problem(SEED.replace("tensor_parallel_size = 4", 'metadata = { sim_gpu = "a" }'))
    assert once.key == "services.llm_control_plane.instances[0].metadata.sim_gpu"
    # built in code, as a file's entry is checked
    with pytest.raises(ValueError, match=r"metadata\.sim_gpu"):
        InstanceConfig("a", "h", 1, "m", engine="sim", metadata={"sim_gpu": "a100"})
    # an entry that lacks a required key still has its metadata checked
    lacking = SEED.replace("tensor_parallel_size = 1", "metadata = { sim_speed = 2.0 }")
    lacking = lacking.replace('model_name = "meta-llama/Llama-2-7b"', "", 1)
    with pytest.raises(ConfigErrors) as info:
        parse_config(lacking, "cfg.toml", env={})
    messages = [str(e) for e in info.value.errors]
    assert any(m.endswith(".model_name: is required") for m in messages), messages
    wanted = "metadata.sim_speed: give sim_speed as a key of the instance, not in its metadata"
    assert any(m.endswith(wanted) for m in messages), messages


def test_a_simulated_engine_that_cannot_start_is_refused_with_its_line() -> None:
    entry = SEED.replace(
        "tensor_parallel_size = 1",
        'tensor_parallel_size = 1\nengine = "sim"\nsim_model = "llama-3-70b"',
    )
    err = problem(entry)
    assert str(err).startswith("cfg.toml:16: services.llm_control_plane.instances[1]: ")
    assert "Llama-3-70B does not fit on 1 × H100" in err.message
    fits = entry.replace("tensor_parallel_size = 1", "tensor_parallel_size = 4")
    assert parse_config(fits, "cfg.toml", env={}).control_plane.instances[1].engine == "sim"
    err = problem(entry.replace("tensor_parallel_size = 1", "tensor_parallel_size = 3"))
    assert "does not divide Llama-3-70B's 64 attention heads" in err.message
    err = problem(entry.replace("tensor_parallel_size = 1", "pipeline_parallel_size = 81"))
    assert "pipeline-parallel size 81 is more than Llama-3-70B's 80 layers" in err.message
    # in mode = "simulated", every instance's engine is simulated: judged the same way
    simulated = entry.replace('engine = "sim"', "").replace(
        "[services.llm_control_plane]\n", '[services.llm_control_plane]\nmode = "simulated"\n'
    )
    err = problem(simulated)
    assert "instances[1]: its simulated engine cannot start" in str(err)
    # an engine that is not simulated is not judged by the simulator's GPUs
    assert parse_config(entry.replace('engine = "sim"', ""), "cfg.toml", env={}).source


def test_the_simulation_seed_leaves_room_for_every_instances_seed() -> None:
    """The instances' seeds are seed + i: one past 64 bits had passed the check and then
    failed ``serve`` with a traceback about ``sim_seed``, a key the file did not have."""
    err = problem("[simulation]\nseed = 9223372036854775807\ninstances = 2\n")
    assert (err.location, err.key) == ("cfg.toml:2", "simulation.seed")
    assert "must be at most 9223372036854775806 with 2 instances" in err.message
    top = parse_config("[simulation]\nseed = 9223372036854775806\ninstances = 2\n")
    assert [i.sim_seed for i in top.simulation.fleet()] == [2**63 - 2, 2**63 - 1]


def test_the_simulation_table_needs_a_model_that_fits() -> None:
    err = problem('[simulation]\nmodel = "llama-3-70b"\n')
    assert err.key == "simulation"
    assert "does not fit on 1 × H100" in err.message and "tensor_parallel_size" in err.message
    fleet = parse_config('[simulation]\nmodel = "llama-3-70b"\ntensor_parallel_size = 4\n').fleet()
    assert {(i.tensor_parallel_size, i.gpu_count) for i in fleet} == {(4, 4)}


def test_missing_required_instance_key() -> None:
    err = problem(
        SEED.replace(
            'model_name = "meta-llama/Llama-2-7b"\ninstance_type = "DEC', 'instance_type = "DEC'
        )
    )
    assert (err.location, err.key) == (
        "cfg.toml:16",
        "services.llm_control_plane.instances[1].model_name",
    )
    assert err.message.endswith("is required")


def test_role_config_must_match_instance_type() -> None:
    text = SEED + "[services.llm_control_plane.instances.prefilling_config]\nchunk_size = 64\n"
    err = problem(text)
    assert (err.location, err.key) == (
        "cfg.toml:23",  # its table's header
        "services.llm_control_plane.instances[1].prefilling_config",  # the key refused
    )
    assert err.message.endswith("prefilling_config: is not allowed on a DECODING instance")


def test_a_role_config_conflict_is_reported_beside_the_entrys_other_problems() -> None:
    """One bad field had hidden it until the next run (the entry's own check never ran)."""
    bad_port = SEED.replace('host = "localhost"\nport = 8001', 'host = "localhost"\nport = "x"')
    text = bad_port + "[services.llm_control_plane.instances.prefilling_config]\nchunk_size = 64\n"
    assert [(e.location, e.key) for e in problems(text)] == [
        ("cfg.toml:19", "services.llm_control_plane.instances[1].port"),
        ("cfg.toml:23", "services.llm_control_plane.instances[1].prefilling_config"),
    ]


def test_pd_errors() -> None:
    err = problem("[services.llm_control_plane.pd]\nconector = 'vllm'\n")
    assert (err.location, err.key) == ("cfg.toml:2", "services.llm_control_plane.pd.conector")
    assert "did you mean 'connector'" in err.message
    err = problem("[services.llm_control_plane.pd]\nprefilling_min_instances = 9\n")
    assert err.key == "services.llm_control_plane.pd.prefilling_min_instances"
    err = problem(
        "[services.llm_control_plane]\nenable_pd_separation = true\npd = { enabled = false }\n"
    )
    assert (err.location, err.key) == ("cfg.toml:3", "services.llm_control_plane.pd.enabled")


@pytest.mark.parametrize("role", ["prefilling", "decoding"])
def test_pd_min_instances_equal_to_max_are_accepted(role: str) -> None:
    table = f"[services.llm_control_plane.pd]\n{role}_min_instances = 2\n"
    cfg = parse_config(f"{table}{role}_max_instances = 2\n", "cfg.toml", env={})
    pd = cfg.control_plane.pd
    assert (getattr(pd, f"{role}_min_instances"), getattr(pd, f"{role}_max_instances")) == (2, 2)
    err = problem(f"{table}{role}_max_instances = 1\n")
    assert err.key == f"services.llm_control_plane.pd.{role}_min_instances"
    assert err.message.endswith(f"is above {role}_max_instances (1)")


def test_pd_plugin_params_are_checked_with_their_lines() -> None:
    """The decider's, the pairing's and the connector's parameters (``pd.metadata``) are
    checked by the config, each at its line, as the control plane would build them: a
    file that passed the check had failed at start with the manager's names for them."""
    text = (
        '[services.llm_control_plane.pd]\nrouting_policy = "adaptive"\n'
        "[services.llm_control_plane.pd.metadata]\n"
        'kv_bytes_per_token = "big"\n'
        "decider_params = { hysteresis = -1, bogus = 3 }\n"
        "pairing_params = { top_k = 0 }\n"
        "connector_params = { release_timeout_s = -1 }\n"
    )
    prefix = "services.llm_control_plane.pd.metadata."
    found = [(e.location, (e.key or "").removeprefix(prefix)) for e in problems(text)]
    assert found == [
        ("cfg.toml:4", "kv_bytes_per_token"),  # once, not under both plugins that take it
        ("cfg.toml:5", "decider_params.hysteresis"),
        ("cfg.toml:5", "decider_params.bogus"),
        ("cfg.toml:6", "pairing_params.top_k"),
        ("cfg.toml:7", "connector_params.release_timeout_s"),
    ]
    err = problem("[services.llm_control_plane.pd.metadata]\npairing_params = 3\n")
    assert (err.location, err.key) == ("cfg.toml:2", prefix + "pairing_params")


def test_a_pd_setting_given_again_as_a_plugin_parameter_must_agree() -> None:
    text = (
        "[services.llm_control_plane.pd]\nprefilling_threshold_input_tokens = 512\n"
        "prefilling_threshold_ratio = 2.0\n"
        "metadata = { decider_params = { min_prompt_tokens = 100, min_ratio = 2 }, "
        "kv_bytes_per_token = 100, pairing_params = { kv_bytes_per_token = 200, top_k = 0 } }\n"
    )
    prefix = "services.llm_control_plane.pd.metadata."
    found = [((e.key or "").removeprefix(prefix), e.detail) for e in problems(text)]
    assert sorted(found) == [
        (
            "decider_params.min_prompt_tokens",
            "contradicts pd.prefilling_threshold_input_tokens (512); set one of them",
        ),
        (
            "pairing_params.kv_bytes_per_token",
            "contradicts pd.metadata.kv_bytes_per_token (100); set one of them",
        ),
        ("pairing_params.top_k", "must be >= 1"),  # the plugins are checked beside
    ]  # (min_ratio 2 agrees with 2.0)


def test_an_unknown_pd_key_does_not_hide_the_plugins_checks() -> None:
    text = (
        "[services.llm_control_plane.pd]\nbogus = 1\n"
        "metadata = { pairing_params = { top_k = 0 } }\n"
    )
    found = [(e.location, e.key) for e in problems(text)]
    assert found == [
        ("cfg.toml:2", "services.llm_control_plane.pd.bogus"),
        ("cfg.toml:3", "services.llm_control_plane.pd.metadata.pairing_params.top_k"),
    ]
    # a refused decider or connector: the parameters that depend on it are not judged
    # (against another one they would be misjudged), the others are
    text = (
        '[services.llm_control_plane.pd]\nrouting_policy = "nope"\nconnector = "vlm"\n'
        "metadata = { pairing_params = { top_k = 0 }, decider_params = { bogus = 1 }, "
        "connector_params = { bogus = 1 } }\n"
    )
    found = [(e.location, e.key) for e in problems(text)]
    assert found == [
        ("cfg.toml:2", "services.llm_control_plane.pd.routing_policy"),
        ("cfg.toml:3", "services.llm_control_plane.pd.connector"),
        ("cfg.toml:4", "services.llm_control_plane.pd.metadata.pairing_params.top_k"),
    ]
    # one they do not read (a count above its maximum) does not
    text = (
        "[services.llm_control_plane.pd]\nprefilling_min_instances = 9\n"
        'routing_policy = "adaptive"\n'
        "metadata = { kv_bytes_per_token = 0, decider_params = { hysteresis = -1 } }\n"
    )
    found = [(e.location, e.key) for e in problems(text)]
    assert found == [
        ("cfg.toml:2", "services.llm_control_plane.pd.prefilling_min_instances"),
        ("cfg.toml:4", "services.llm_control_plane.pd.metadata.kv_bytes_per_token"),
        ("cfg.toml:4", "services.llm_control_plane.pd.metadata.decider_params.hysteresis"),
    ]
    # a refused value the decider takes (not which decider it is) does not either
    text = (
        '[services.llm_control_plane.pd]\nrouting_policy = "adaptive"\n'
        "max_transfer_latency_ms = -5\n"
        'metadata = { decider_params = { slack = "x", hysteresis = 2.0 } }\n'
    )
    found = [(e.location, e.key) for e in problems(text)]
    assert found == [
        ("cfg.toml:3", "services.llm_control_plane.pd.max_transfer_latency_ms"),
        ("cfg.toml:4", "services.llm_control_plane.pd.metadata.decider_params.slack"),
        ("cfg.toml:4", "services.llm_control_plane.pd.metadata.decider_params.hysteresis"),
    ]


def test_a_pd_range_error_does_not_hide_an_unservable_model() -> None:
    text = (
        "[services.llm_control_plane]\nenable_pd_separation = true\n"
        "[services.llm_control_plane.pd]\nprefilling_min_instances = 6\n"
        '[[services.llm_control_plane.instances]]\ninstance_id = "p"\nhost = "h"\nport = 1\n'
        'model_name = "a"\ninstance_type = "PREFILLING"\n'
    )
    messages = [e.message for e in problems(text)]
    assert any("above prefilling_max_instances" in m for m in messages)
    assert any("model 'a' has no decode-capable instance" in m for m in messages)


def test_policy_and_routing_params_are_checked_by_the_plugins() -> None:
    err = problem(
        '[services.llm_control_plane]\nscheduling_policy = "priority"\n'
        "[services.llm_control_plane.policy_params]\nmax_wait_s = -1.0\n"
    )
    assert (err.location, err.key) == (
        "cfg.toml:4",
        "services.llm_control_plane.policy_params.max_wait_s",
    )
    err = problem("[services.llm_control_plane]\nrouting_params = { kv_wieght = 1 }\n")
    assert err.key == "services.llm_control_plane.routing_params.kv_wieght"
    assert err.location == "cfg.toml:2"


def test_every_bad_policy_param_is_reported_with_its_line() -> None:
    text = (
        '[services.llm_control_plane]\nscheduling_policy = "priority"\n'
        "[services.llm_control_plane.policy_params]\n"
        'aging_interval_s = "soon"\nmax_wait_s = -1.0\nagin = 1\n'
    )
    errors = problems(text)
    assert [(e.location, e.key) for e in errors] == [
        ("cfg.toml:4", "services.llm_control_plane.policy_params.aging_interval_s"),
        ("cfg.toml:5", "services.llm_control_plane.policy_params.max_wait_s"),
        ("cfg.toml:6", "services.llm_control_plane.policy_params.agin"),
    ]
    assert "must be a number" in errors[0].message
    assert "must be > 0" in errors[1].message


def test_fair_user_weights_come_from_a_table_and_reach_the_policy() -> None:
    cfg = parse_config(
        '[services.llm_control_plane]\nscheduling_policy = "fair"\n'
        "[services.llm_control_plane.policy_params.user_weights]\n"
        '"team-search" = 3\n"" = 0.5\n',
        "cfg.toml",
        env={},
    )
    manager = ControlPlaneManager(**cfg.manager_kwargs())
    params = manager.get_status()["policy"]["params"]
    assert params["user_weights"] == {"team-search": 3.0, "": 0.5}


@pytest.mark.parametrize("policy", ["fair", "adaptive"])
def test_a_bad_user_weight_is_reported_with_its_user_and_line(policy: str) -> None:
    err = problem(
        f'[services.llm_control_plane]\nscheduling_policy = "{policy}"\n'
        "policy_params = { user_weights = { alice = 2, bob = 0 } }\n"
    )
    assert (err.location, err.key) == (
        "cfg.toml:3",
        "services.llm_control_plane.policy_params.user_weights",
    )
    assert "'bob': must be a finite number > 0, got 0" in err.message
    err = problem(
        f'[services.llm_control_plane]\nscheduling_policy = "{policy}"\n'
        'policy_params = { user_weights = { "(none)" = 2 } }\n'
    )
    assert "'(none)': a name the metrics keep for requests naming no user" in err.message


def test_a_plugin_parameter_name_with_a_dot_is_shown_quoted() -> None:
    """``"aging.interval_s"`` is one (unknown) name, not ``aging`` and ``interval_s``."""
    err = problem('[services.llm_control_plane]\npolicy_params = { "aging.interval_s" = 1 }\n')
    assert (err.location, err.key) == (
        "cfg.toml:2",
        'services.llm_control_plane.policy_params."aging.interval_s"',
    )
    err = problem(
        "[services.llm_control_plane.pd]\n"
        'routing_policy = "adaptive"\nmetadata = { decider_params = { "a.b" = 1 } }\n'
    )
    assert (err.location, err.key) == (
        "cfg.toml:3",
        'services.llm_control_plane.pd.metadata.decider_params."a.b"',
    )


def test_a_fleet_that_could_never_serve_a_model_is_reported() -> None:
    prefill_only = SEED[
        : SEED.index('[[services.llm_control_plane.instances]]\ninstance_id = "llm-decode-1"')
    ]
    err = problem(prefill_only)
    assert err.key == "services.llm_control_plane.instances"
    assert "has no decode-capable instance to pair with" in err.message
    err = problem(SEED.replace("enable_pd_separation = true", "enable_pd_separation = false"))
    assert "PD disaggregation is disabled" in err.message


def test_section_given_twice() -> None:
    err = problem("[gateway]\nport = 1\n[services.llm_control_plane.gateway]\nport = 2\n")
    assert err.key == "services.llm_control_plane.gateway"
    assert "given twice" in err.message
    # both copies are checked: the one the loader would drop has its problems said too
    text = (
        '[services.llm_control_plane.gateway]\nhost = "bad host"\n'
        '[gateway]\nport = 70000\nfoo = 1\nadmin_token_env = "NOT_SET"\n'
    )
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, "cfg.toml", env={})
    assert [e.key for e in info.value.errors] == [
        "services.llm_control_plane.gateway",
        "services.llm_control_plane.gateway.host",
        "gateway.port",
        "gateway.foo",
        "gateway.admin_token_env",
    ]


def test_unknown_service_table_without_type() -> None:
    err = problem("[services.llm_contol_plane]\nscheduling_policy = 'fifo'\n")
    assert (err.location, err.key) == ("cfg.toml:1", "services.llm_contol_plane")
    assert "did you mean 'llm_control_plane'" in err.message


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ("scheduling_policy = 'fifo'\n", "scheduling_policy", "[services.llm_control_plane]"),
        (
            "[[instances]]\ninstance_id = 'a'\nhost = 'h'\nport = 1\nmodel_name = 'm'\n",
            "instances",
            "[[services.llm_control_plane.instances]]",
        ),
        ("[pd]\nenabled = false\n", "pd", "[services.llm_control_plane.pd]"),
        (
            "policy_params = { max_wait_s = 1.0 }\n",
            "policy_params",
            "[services.llm_control_plane.policy_params]",
        ),
    ],
)
def test_service_keys_at_top_level_are_errors(text: str, key: str, hint: str) -> None:
    """A file that forgot its [services.llm_control_plane] header is not read as one."""
    err = problem(text)
    assert (err.location, err.key) == ("cfg.toml:1", key)
    assert str(err) == f"cfg.toml:1: {key}: unknown key (did you mean {hint}?)"


def test_forgotten_service_header_reports_every_key_and_line(tmp_path: Path) -> None:
    body = SEED.split("\n", 2)[2].replace("services.llm_control_plane.", "")  # no header
    text = "# cluster\n" + body + "\n[gateway]\nport = 9000\n"
    path = tmp_path / "forgot.toml"
    path.write_text(text, encoding="utf-8")
    errors = check_config(path, env={})
    assert [(e.location, e.key) for e in errors] == [
        (f"{path}:2", "type"),
        (f"{path}:3", "scheduling_policy"),
        (f"{path}:4", "enable_pd_separation"),
        (f"{path}:5", "routing_strategy"),
        (f"{path}:7", "instances"),
    ]
    assert errors[-1].message.endswith("(did you mean [[services.llm_control_plane.instances]]?)")
    with pytest.raises(ConfigErrors):
        load_config(path, env={})
    # a stray key next to the header is reported the same way
    err = problem("seed = 1\n[services.llm_control_plane]\nmode = 'simulated'\n")
    assert (err.location, err.key) == ("cfg.toml:1", "seed")
    assert "did you mean [services.llm_control_plane]?" in err.message


def test_unknown_top_level_key_lists_the_top_level_keys() -> None:
    err = problem("foo = 1\n")
    assert (err.location, err.key) == ("cfg.toml:1", "foo")
    valid = "services, gateway, health, admission, simulation"
    assert str(err) == f"cfg.toml:1: foo: unknown key (valid keys: {valid})"


def test_toml_syntax_error() -> None:
    err = problem(SEED.replace("port = 8001", "port = = 8001"))
    assert err.location == "cfg.toml:19"
    assert str(err) == "cfg.toml:19: invalid TOML: Invalid value (column 8)"


def test_dict_errors_name_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"instances": [{**INSTANCE, "port": -1}]}, source="sage-service")
    assert info.value.location == "sage-service"
    assert info.value.key == "instances[0].port"
    with pytest.raises(ConfigError):
        config_from_dict([], env={})  # type: ignore[arg-type]


def test_check_config_collects_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        SEED.replace("sheduling", "x")
        .replace('"load_balanced"', '"load_balance"')
        .replace("port = 8001", "port = 99999")
        .replace('"llm-decode-1"', '"llm-prefill-1"')
        + "\n[health]\nfailure_threshold = 0\nbogus = 1\n",
        encoding="utf-8",
    )
    errors = check_config(path)
    where = [(e.location, e.key) for e in errors]
    base = "services.llm_control_plane"
    assert where == [
        (f"{path}:6", f"{base}.routing_strategy"),
        (f"{path}:17", f"{base}.instances[1].instance_id"),
        (f"{path}:19", f"{base}.instances[1].port"),
        (f"{path}:25", "health.failure_threshold"),
        (f"{path}:26", "health.bogus"),
    ]
    with pytest.raises(ConfigErrors) as info:
        load_config(path)
    assert [str(e) for e in info.value.errors] == [str(e) for e in errors]
    lines = str(info.value).splitlines()
    assert lines[0] == "5 configuration problems:"
    assert lines[1:] == [str(e) for e in errors]
    assert (info.value.location, info.value.key) == (f"{path}:6", f"{base}.routing_strategy")


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    [err] = check_config(missing)
    assert err.location == str(missing) and "cannot read" in err.message
    with pytest.raises(ConfigError):
        load_config(missing)
    # a path no system call takes (a ValueError had escaped check_config, which never raises)
    [err] = check_config("a\x00b.toml")
    assert err.message == "'a\\x00b.toml': cannot read config file: the path holds a NUL character"
    with pytest.raises(ConfigError, match="NUL character"):
        load_config("a\x00b.toml")


def test_programmatic_values_get_a_files_type_checks() -> None:
    """Types and finiteness, as a file's values (a ValueError naming the field, where a
    wrong type went on to fail somewhere else, naming nothing)."""
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: GatewayConfig(port="x"), "port: must be an integer, got string 'x'"),  # type: ignore[arg-type]
        (lambda: ControlPlaneConfig(result_ttl_s=math.nan), "result_ttl_s: must be a finite"),
        (
            lambda: ControlPlaneConfig(max_retries=True),
            "max_retries: must be an integer, got boolean",
        ),
        (lambda: HealthConfig(timeout_s="2"), "timeout_s: must be a number, got string '2'"),  # type: ignore[arg-type]
        (lambda: SimulationConfig(instances="4"), "instances: must be an integer"),  # type: ignore[arg-type]
        (lambda: GatewayConfig(api_keys=("k", 3)), r"api_keys\[1\]: must be a string"),  # type: ignore[arg-type]
        (lambda: AdmissionConfig(max_queue_wait_s=10**400), "a float can hold"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
    assert HealthConfig(timeout_s=2).timeout_s == 2  # an integer is a fine float
    # read as a file's value is, and kept so: an exact "sim" check must not miss "SIM"
    cp = ControlPlaneConfig(scheduling_policy="FIFO", mode="SIMULATED", enable_pd_separation=False)
    assert (cp.scheduling_policy, cp.mode) == ("fifo", "simulated")
    with pytest.raises(ValueError, match="its simulated engine cannot start"):
        InstanceConfig("a", "h", 1, "m", engine="SIM", sim_model="llama-3-70b", sim_gpu="l40s")


def test_a_huge_integer_in_a_file_is_located_not_an_overflow(tmp_path: Path) -> None:
    path = tmp_path / "big.toml"
    big = "1" + "0" * 400
    path.write_text(
        "[services.llm_control_plane]\n"
        'scheduling_policy = "priority"\n'
        f"policy_params = {{ max_wait_s = {big} }}\n"
        f"[admission]\nmax_queue_wait_s = {big}\n"
    )
    assert [e.message for e in check_config(path)] == [
        f"{path}:3: services.llm_control_plane.policy_params.max_wait_s: must be a number a "
        "float can hold, got integer of 401 digits",
        f"{path}:5: admission.max_queue_wait_s: must be a number a float can hold, got integer "
        "of 401 digits",
    ]
    # an integer key's bound quotes such a number by its size, however long
    with pytest.raises(ConfigError, match=r"gateway.port: must be <= 65535, got integer of over"):
        config_from_dict({"gateway": {"port": 10**5000}})
    path.write_text("[gateway]\nport = 1" + "0" * 5000 + "\n")  # longer than Python reads
    assert [e.message for e in check_config(path)] == [
        f"{path}: cannot be read: it holds an integer of more than 4,300 digits"
    ]


def test_a_cors_origin_that_no_browser_sends_is_refused() -> None:
    """A browser's Origin is scheme://host[:port]: an entry with a trailing slash, a path
    or no scheme had been accepted, and never matched."""
    text = (
        '[gateway]\ncors_origins = ["https://a.example/", "https://ok.example:8443", '
        '"b.example", "*", "https://c.example/app"]\n'
    )
    found = [(e.key, e.detail) for e in problems(text)]
    assert [key for key, _ in found] == [
        "gateway.cors_origins[0]", "gateway.cors_origins[2]", "gateway.cors_origins[4]",
    ]  # fmt: skip
    assert all("must be an origin as browsers send it" in detail for _, detail in found)


def test_a_cors_origin_browsers_never_send_in_that_form_is_refused() -> None:
    """Browsers send scheme and host in lower case, the host in its ASCII form, an IPv6
    address compressed, an IPv4 address in full, and leave the default port out: such
    entries, and a port out of range, had been taken and never matched."""
    given = ["https://Chat.Example.com", "https://b.example:443", "https://c.example:99999",
             "http://d.example:8080", "https://bücher.example", "http://e.example:08080",
             "http://[0:0:0:0:0:0:0:1]", "http://f.example:", "http://faß.de",
             "http://a..b", "http://☃.net", "http://[::1", "http://127.1",
             "http://0x7F.0.0.1:8080", "https://0177.0.0.1", "http://127.0.0.1.",
             "http://1.2.3.999"]  # fmt: skip
    text = f"[gateway]\ncors_origins = {json.dumps(given, ensure_ascii=False)}\n"
    found = {e.key: e.detail for e in problems(text)}
    sent = {
        0: "https://chat.example.com",
        1: "https://b.example",
        4: "https://xn--bcher-kva.example",
        5: "http://e.example:8080",
        6: "http://[::1]",
        7: "http://f.example",
        8: "http://xn--fa-hia.de",  # UTS-46, as browsers send it (not fass.de)
        10: "http://xn--n3h.net",  # without IDNA 2008's stricter rules, as browsers
        12: "http://127.0.0.1",  # an IPv4 shorthand, in full
        13: "http://127.0.0.1:8080",
        14: "https://127.0.0.1",
        15: "http://127.0.0.1",  # a trailing dot after an address is dropped
    }
    for index, origin in sent.items():
        assert found.pop(f"gateway.cors_origins[{index}]").startswith(
            f"must be written as browsers send it: {origin!r}"
        )
    assert found == {
        "gateway.cors_origins[2]": "must have a port number 1-65535 after the host, got "
        "'https://c.example:99999'",
        "gateway.cors_origins[9]": "must have a host name or address a browser could send, "
        "got 'http://a..b'",
        "gateway.cors_origins[11]": "must have a host name or address a browser could send, "
        "got 'http://[::1'",  # (a traceback had ended config check)
        "gateway.cors_origins[16]": "must have a host name or address a browser could send, "
        "got 'http://1.2.3.999'",  # a host ending in a number is an address, or none
    }


@pytest.mark.parametrize("host", ["gpu-node-1..lan", ".lead", "a" * 64 + ".example"])
def test_a_host_name_no_lookup_could_take_is_refused(host: str) -> None:
    """An empty or over-long label had passed the check, then crashed serve (the gateway's
    host) or failed every health probe (an instance's)."""
    hint = "must be a host name whose dot-separated labels are 1-63 characters long"
    err = problem(f'[gateway]\nhost = "{host}"\n')
    assert err.key == "gateway.host" and hint in err.message
    err = problem(SEED.replace('host = "localhost"\nport = 8001', f'host = "{host}"\nport = 8001'))
    assert err.key == "services.llm_control_plane.instances[1].host" and hint in err.message
    assert parse_config('[gateway]\nhost = "gpu-node-1.lan."\n').gateway.host == "gpu-node-1.lan."


def test_our_service_type_in_another_case_under_another_name_is_an_error() -> None:
    """Read as another SAGE service's table, it had been skipped: check said OK, serve
    refused the file."""
    for kind, meant in (("controlplanevllmservice", "ControlPlaneVLLMService"),
                        ("vllmservice", "VLLMService")):  # fmt: skip
        err = problem(f'[services.x]\ntype = "{kind}"\nscheduling_policy = "fifo"\n')
        assert (err.location, err.key) == ("cfg.toml:2", "services.x.type")
        assert err.message.endswith(f"unknown value {kind!r} (did you mean {meant!r}?)")


def test_a_pd_instance_on_an_engine_the_connector_cannot_reach_is_refused() -> None:
    """The docs promised it: an SGLang connector over vLLM engines (or the reverse) fails
    every disaggregated request; simulated engines speak both."""
    text = SEED + "[services.llm_control_plane.pd]\nconnector = 'sglang'\n"
    found = [(e.key, e.detail) for e in problems(text)]
    assert [key for key, _ in found] == [
        "services.llm_control_plane.instances[0].engine",
        "services.llm_control_plane.instances[1].engine",
    ]
    assert "cannot take the 'sglang' PD connector's hand-off" in found[0][1]
    hybrid = text.replace('instance_type = "DECODING"', 'instance_type = "HYBRID"')
    assert "HYBRID instance on 'vllm'" in str(problems(hybrid)[1])  # it may take a leg too
    whole_only = "[services.llm_control_plane.pd]\nconnector = 'sglang'\n" + (
        '[[services.llm_control_plane.instances]]\ninstance_id = "g"\nhost = "h"\nport = 1\n'
        'model_name = "m"\n'
    )  # a model served whole: no connector to speak
    assert parse_config(whole_only, "cfg.toml", env={}).control_plane.instances
    fine = text.replace(
        'instance_type = "PREFILLING"', 'instance_type = "PREFILLING"\nengine = "sim"'
    )
    fine = fine.replace(
        'instance_type = "DECODING"', 'instance_type = "DECODING"\nengine = "sglang"'
    )
    assert parse_config(fine, "cfg.toml", env={}).control_plane.pd.connector == "sglang"


@pytest.mark.parametrize("role", ["GENERAL", "HYBRID"])
def test_a_general_or_hybrid_sglang_instance_of_a_pd_model_is_refused(role: str) -> None:
    """An SGLang server takes a leg only in its --disaggregation-mode: given one, it ran
    the whole request and its partner leg waited a minute for the hand-off."""
    text = SEED.replace(
        'instance_type = "PREFILLING"', 'instance_type = "PREFILLING"\nengine = "sglang"'
    )
    text = text.replace(
        'instance_type = "DECODING"', f'instance_type = "{role}"\nengine = "sglang"'
    )
    text += "[services.llm_control_plane.pd]\nconnector = 'sglang'\n"
    err = problem(text)
    assert err.key == "services.llm_control_plane.instances[1].engine"
    assert f"a {role} instance on 'sglang' cannot take a PD leg" in err.message


def test_decider_parameters_that_contradict_the_pd_settings_are_refused() -> None:
    """The decider's KV size, transfer limit or block size given again in decider_params
    with another value: two plugins of one fleet had priced hand-offs differently."""
    text = (
        "[services.llm_control_plane]\nprefix_block_size = 32\n"
        '[services.llm_control_plane.pd]\nrouting_policy = "adaptive"\n'
        "max_transfer_latency_ms = 50\n"
        "[services.llm_control_plane.pd.metadata]\nkv_bytes_per_token = 1024\n"
        "[services.llm_control_plane.pd.metadata.decider_params]\n"
        "kv_bytes_per_token = 2048\nmax_transfer_s = 2.0\n"
    )
    found = [(e.key or "", e.detail) for e in problems(text)]
    assert sorted(key.rsplit(".", 1)[1] for key, _ in found) == [
        "kv_bytes_per_token",
        "max_transfer_s",
    ]
    assert all("contradicts pd." in detail for _, detail in found)
    agreeing = text.replace("2048", "1024").replace("2.0", "0.05")
    assert parse_config(agreeing, "cfg.toml", env={}).control_plane.pd.max_transfer_latency_ms == 50
    block = text.replace('"adaptive"', '"prefix_aware"').replace(
        "kv_bytes_per_token = 2048\nmax_transfer_s = 2.0\n", "block_size = 64\n"
    )
    with pytest.raises(ConfigError, match=r"contradicts prefix_block_size \(32\)") as info:
        parse_config(block, "cfg.toml", env={})
    assert (info.value.key or "").endswith("decider_params.block_size")
    bad = block.replace("block_size = 64", 'block_size = "x"')  # said once, as bad
    assert problem(bad).detail == "must be an integer, got string 'x'"


def test_a_pd_dataclass_in_a_dict_is_read_and_checked_as_its_table() -> None:
    """PDSeparationConfig(enabled=False) had been read as PD on, its plugin parameters
    unchecked; it is the table of what it sets, as the dict form."""
    cfg = config_from_dict({"pd": PDSeparationConfig(enabled=False)})
    assert (cfg.control_plane.pd.enabled, cfg.control_plane.enable_pd_separation) == (
        False, False,
    )  # fmt: skip
    with pytest.raises(ConfigError, match="contradicts enable_pd_separation"):
        config_from_dict({"enable_pd_separation": True, "pd": PDSeparationConfig(enabled=False)})
    bad = PDSeparationConfig(metadata={"kv_bytes_per_token": 0, "decider_params": {"bogus": 1}})
    with pytest.raises(ConfigErrors) as info:
        config_from_dict({"pd": bad})
    assert [e.key for e in info.value.errors] == [
        "pd.metadata.kv_bytes_per_token", "pd.metadata.decider_params.bogus",
    ]  # fmt: skip


def test_an_integer_beyond_64_bits_is_refused_in_any_field() -> None:
    """Counts go into float arithmetic (an instance's price) and into the engines: a
    gpu_count of 310 digits had passed the check, then failed every request."""
    big = 10**309
    text = (
        f"[services.llm_control_plane]\ndefault_max_tokens = {big}\n"
        '[[services.llm_control_plane.instances]]\ninstance_id = "a"\nhost = "h"\n'
        f'port = 8000\nmodel_name = "m"\ngpu_count = {big}\n'
        f"tensor_parallel_size = {2**63}\n"
    )
    found = [(e.location, e.key, e.detail) for e in problems(text)]
    assert [f[:2] for f in found] == [
        ("cfg.toml:2", "services.llm_control_plane.default_max_tokens"),
        ("cfg.toml:8", "services.llm_control_plane.instances[0].gpu_count"),
        ("cfg.toml:9", "services.llm_control_plane.instances[0].tensor_parallel_size"),
    ]
    assert all("must be at most 9223372036854775807 (64 bits)" in f[2] for f in found)
    # the lowest 64-bit integer is one, and one below it is said as what it is
    low = parse_config(f"[simulation]\ninstances = 1\nseed = {-(2**63)}\n")
    assert low.simulation.seed == -(2**63)
    err = problem(f"[simulation]\ninstances = 1\nseed = {-(2**63) - 1}\n")
    assert err.message.endswith(
        "must be at least -9223372036854775808 (64 bits), got -9223372036854775809"
    )


def test_programmatic_values_are_checked() -> None:
    with pytest.raises(ValueError, match="port"):
        InstanceConfig("a", "h", 0, "m")
    for prior in ("x", -1):  # an instance's latency priors, as a file's are checked
        with pytest.raises(ValueError, match=r"metadata\.tpot_ms: must be"):
            InstanceConfig("a", "h", 1, "m", metadata={"tpot_ms": prior})
    with pytest.raises(ValueError, match="scheduling_policy"):
        ControlPlaneConfig(scheduling_policy="nope")
    with pytest.raises(ValueError, match="decoding_config"):
        InstanceConfig(
            "a",
            "h",
            1,
            "m",
            instance_type=ExecutionInstanceType.PREFILLING,
            decoding_config=DecodingConfig(),
        )


# -- instances built in Python -------------------------------------------------------------


def _instance(**kwargs: object) -> ExecutionInstance:
    fields: dict[str, object] = {"instance_id": "i0", "host": "h", "port": 8000, "model_name": "m"}
    return ExecutionInstance(**{**fields, **kwargs})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PREFILLING", ExecutionInstanceType.PREFILLING),
        ("prefill", ExecutionInstanceType.PREFILLING),
        ("Decoding", ExecutionInstanceType.DECODING),
        ("mixed", ExecutionInstanceType.HYBRID),
    ],
)
def test_check_instance_parses_a_role_string(text: str, expected: ExecutionInstanceType) -> None:
    inst = _instance(instance_type=text)
    assert check_instance(inst) is inst
    assert inst.instance_type is expected


def test_check_instance_normalises_as_the_loader_does() -> None:
    inst = _instance(engine="SGLang", scheme="HTTPS", decoding_config={"max_num_seqs": 8})
    check_instance(inst)
    assert (inst.engine, inst.scheme) == ("sglang", "https")
    assert inst.decoding_config == DecodingConfig(max_num_seqs=8)
    role = PrefillingConfig(chunk_size=64)
    inst = _instance(instance_type=ExecutionInstanceType.PREFILLING, prefilling_config=role)
    check_instance(inst)
    assert inst.prefilling_config is role


def test_check_instance_accepts_what_the_loader_builds() -> None:
    for inst in parse_config(SEED, env={}).execution_instances():
        check_instance(inst)
    for inst in SageConfig.default().execution_instances():
        check_instance(inst)
    check_instance(_instance(nvlink_peers=("i1",), gpu_memory_gb=80, metadata={"x": object()}))


@pytest.mark.parametrize(
    ("kwargs", "key", "message"),
    [
        ({"instance_type": "PREFILER"}, "instance_type", "invalid instance_type 'PREFILER'"),
        ({"instance_type": 1}, "instance_type", "must be a string, got integer 1"),
        ({"tensor_parallel_size": 0}, "tensor_parallel_size", "must be >= 1, got 0"),
        ({"pipeline_parallel_size": 0}, "pipeline_parallel_size", "must be >= 1, got 0"),
        ({"port": 70000}, "port", "must be <= 65535, got 70000"),
        ({"port": 0}, "port", "must be >= 1, got 0"),
        ({"port": "8000"}, "port", "must be an integer, got string '8000'"),
        ({"port": True}, "port", "must be an integer, got boolean true"),
        ({"host": ""}, "host", "must not be empty"),
        ({"host": "http://h"}, "host", "not a URL"),
        ({"model_name": ""}, "model_name", "must not be empty"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests", "must be >= 1, got 0"),
        ({"gpu_count": 0}, "gpu_count", "must be >= 1, got 0"),
        ({"network_bandwidth_gbps": 0.0}, "network_bandwidth_gbps", "must be > 0, got 0.0"),
        ({"engine": "trt"}, "engine", "unknown value 'trt'"),
        ({"scheme": "ftp"}, "scheme", "unknown value 'ftp'"),
        ({"nvlink_peers": [1]}, "nvlink_peers[0]", "must be a string, got integer 1"),
        (
            {"decoding_config": DecodingConfig(max_num_seqs=0)},
            "decoding_config.max_num_seqs",
            "must be >= 1",
        ),
        ({"decoding_config": 3}, "decoding_config", "must be a table, got integer 3"),
        ({"metadata": {"sim_gpu": "tpu"}}, "metadata.sim_gpu", "unknown GPU 'tpu'"),
        ({"metadata": {"sim_model": "gpt-9"}}, "metadata.sim_model", "unknown model 'gpt-9'"),
        ({"metadata": {"sim_speed": 0}}, "metadata.sim_speed", "must be > 0, got 0"),
        ({"metadata": {"sim_seed": "x"}}, "metadata.sim_seed", "must be an integer, got string"),
        ({"metadata": {"sim_max_loras": 0}}, "metadata.sim_max_loras", "must be >= 1, got 0"),
        # the latency priors, as a file's instance entry and registration check them
        ({"metadata": {"tpot_ms": -1}}, "metadata.tpot_ms", "must be > 0, got -1"),
        ({"metadata": {"ttft_base_ms": "x"}}, "metadata.ttft_base_ms", "must be a finite number"),
    ],
)
def test_check_instance_names_the_field_and_the_instance(
    kwargs: dict[str, object], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        check_instance(_instance(**kwargs))
    err = info.value
    assert not isinstance(err, ConfigErrors)
    assert (err.location, err.key, err.param) == ("instance 'i0'", key, key)
    assert str(err).startswith(f"instance 'i0': {key}: ")
    assert message in err.message


def test_check_instance_reports_every_problem_and_role_conflicts() -> None:
    with pytest.raises(ConfigErrors) as info:
        check_instance(_instance(tensor_parallel_size=0, port=70000, instance_type="nope"))
    assert [e.key for e in info.value.errors] == ["port", "tensor_parallel_size", "instance_type"]
    inst = _instance(instance_type="decode", prefilling_config=PrefillingConfig())
    with pytest.raises(ConfigError, match="prefilling_config: is not allowed on a DECODING") as err:
        check_instance(inst)
    assert err.value.key == "prefilling_config"
    role: object = inst.instance_type
    assert role == "decode"  # nothing is changed when the check fails
    with pytest.raises(ConfigError) as err:
        check_instance(_instance(api_key=""))
    assert err.value.key == "api_key"
    with pytest.raises(ConfigError, match="must be an ExecutionInstance, got dict"):
        check_instance({"instance_id": "i0"})  # type: ignore[arg-type]


def test_check_instance_without_an_id() -> None:
    with pytest.raises(ConfigError) as info:
        check_instance(ExecutionInstance("", "h", 8000, "m"))
    assert (info.value.location, info.value.key) == ("instance", "instance_id")


# -- secrets -------------------------------------------------------------------------------


def test_secrets_from_environment() -> None:
    text = (
        '[gateway]\napi_keys = ["file-key"]\napi_keys_env = "KEYS"\nadmin_token_env = "ADMIN"\n'
        + SEED.replace("tensor_parallel_size = 1", 'tensor_parallel_size = 1\napi_key_env = "UP"')
    )
    cfg = parse_config(text, env={"KEYS": "k1, k2,,file-key", "ADMIN": " tok ", "UP": "up-key"})
    assert cfg.gateway.api_keys == ("file-key", "k1", "k2")
    assert cfg.gateway.api_keys_read == ("k1", "k2")
    # a dump shows the file's own key (masked), not those of the environment
    assert cfg.to_dict()["gateway"]["api_keys"] == ["***"]
    assert "api_keys_read" not in cfg.to_dict(secrets=True)["gateway"]
    moved = dataclasses.replace(cfg, gateway=dataclasses.replace(cfg.gateway, port=9999))
    assert moved.to_dict()["gateway"]["api_keys"] == ["***"]
    err = problem('[gateway]\napi_keys_read = ["x"]\n')  # not a key of a file
    assert err.key == "gateway.api_keys_read" and "unknown key" in err.message
    assert cfg.gateway.admin_token == "tok"
    assert cfg.control_plane.instances[1].api_key == "up-key"
    assert cfg.execution_instances()[1].api_key == "up-key"


@pytest.mark.parametrize(
    ("text", "env", "key", "message"),
    [
        (
            '[gateway]\napi_keys_env = "KEYS"\n',
            {},
            "gateway.api_keys_env",
            "environment variable KEYS is not set",
        ),
        (
            '[gateway]\nadmin_token_env = "ADMIN"\n',
            {"ADMIN": "  "},
            "gateway.admin_token_env",
            "environment variable ADMIN is empty",
        ),
        (
            '[gateway]\napi_keys_env = "KEYS"\n',
            {"KEYS": " , ,"},
            "gateway.api_keys_env",
            "environment variable KEYS holds no API key",
        ),
        (
            '[gateway]\nadmin_token = "a"\nadmin_token_env = "ADMIN"\n',
            {"ADMIN": "b"},
            "gateway.admin_token_env",
            "not both",
        ),
        (
            '[gateway]\napi_keys_env = "1BAD"\n',
            {},
            "gateway.api_keys_env",
            "must be an environment variable name",
        ),
        (  # a dumped configuration's mask, not a secret (it had raised a traceback)
            '[gateway]\napi_keys_env = "KEYS"\n',
            {"KEYS": "k, ***"},
            "gateway.api_keys_env",
            'environment variable KEYS holds "***", the mask',
        ),
        (
            '[gateway]\nadmin_token_env = "ADMIN"\n',
            {"ADMIN": "***"},
            "gateway.admin_token_env",
            'environment variable ADMIN holds "***"',
        ),
        (  # a user's key would open the admin API
            '[gateway]\napi_keys = ["k1"]\nadmin_token = "k1"\n',
            {},
            "gateway.admin_token",
            "is also one of the API keys",
        ),
        (
            '[gateway]\napi_keys_env = "KEYS"\nadmin_token_env = "ADMIN"\n',
            {"KEYS": "k1,k2", "ADMIN": "k2"},
            "gateway.admin_token_env",
            "is also one of the API keys",
        ),
    ],
)
def test_secret_environment_errors(text: str, env: dict[str, str], key: str, message: str) -> None:
    err = problem(text, env)
    assert err.key == key
    assert message in err.message


def test_an_admin_token_in_the_file_equal_to_a_key_is_reported_at_its_own_line() -> None:
    """Not at admin_token_env, whose variable is not read beside it."""
    text = '[gateway]\napi_keys = ["k"]\nadmin_token = "k"\nadmin_token_env = "TOK"\n'
    with pytest.raises(ConfigErrors) as info:
        parse_config(text, "cfg.toml", env={"TOK": "z"})
    assert [(e.location, e.key, e.detail) for e in info.value.errors] == [
        (
            "cfg.toml:3",
            "gateway.admin_token",
            "is also one of the API keys: the admin token must be another",
        ),
        ("cfg.toml:4", "gateway.admin_token_env", "set admin_token or admin_token_env, not both"),
    ]


def test_instance_secret_environment_error() -> None:
    err = problem(
        SEED.replace(
            "tensor_parallel_size = 4", 'tensor_parallel_size = 4\napi_key_env = "UPSTREAM"'
        )
    )
    assert (err.location, err.key) == (
        "cfg.toml:15",
        "services.llm_control_plane.instances[0].api_key_env",
    )


def test_secrets_are_masked() -> None:
    text = '[gateway]\napi_keys = ["sk-one", "sk-two"]\nadmin_token = "adm-secret"\n' + (
        SEED.replace("tensor_parallel_size = 1", 'tensor_parallel_size = 1\napi_key = "up-sec"')
    )
    cfg = parse_config(text, env={})
    dumped = cfg.to_dict()
    assert dumped["gateway"]["api_keys"] == ["***", "***"]
    assert dumped["gateway"]["admin_token"] == "***"
    assert dumped["services"]["llm_control_plane"]["instances"][1]["api_key"] == "***"
    assert dumped["services"]["llm_control_plane"]["instances"][0]["api_key"] is None
    for secret in ("sk-one", "sk-two", "adm-secret", "up-sec"):
        assert secret not in repr(cfg) and secret not in str(dumped)
    assert cfg.gateway.api_keys == ("sk-one", "sk-two")
    # the masked dump is not taken for real secrets; secrets=True loads back as it was
    with pytest.raises(ConfigErrors) as info:
        config_from_dict(dumped, env={})
    keys = [str(e.key) for e in info.value.errors]
    assert sorted(keys) == [
        "gateway.admin_token",
        "gateway.api_keys[0]",
        "gateway.api_keys[1]",
        "services.llm_control_plane.instances[1].api_key",
    ], keys
    assert 'is "***", the mask a dumped configuration writes' in str(info.value)
    assert config_from_dict(cfg.to_dict(secrets=True), env={}) == cfg
    # file keys beside api_keys_env: the reloaded configuration has both
    with_env = text.replace("[gateway]\n", '[gateway]\napi_keys_env = "MORE"\n')
    both = parse_config(with_env, env={"MORE": "sk-env"})
    assert both.gateway.api_keys == ("sk-one", "sk-two", "sk-env")
    again = config_from_dict(both.to_dict(secrets=True), env={"MORE": "sk-env"})
    assert again == both


TENANTS = (
    '[gateway]\napi_keys = ["plain"]\n'
    '[[gateway.tenants]]\nuser = "team-a"\napi_key = "sk-a"\n'
    '[[gateway.tenants]]\nuser = "team-b"\napi_key_env = "TEAM_B_KEY"\n'
)


def test_tenants_bind_keys_to_users_from_the_file_or_the_environment() -> None:
    cfg = parse_config(TENANTS, env={"TEAM_B_KEY": " sk-b "})
    assert [(t.user, t.api_key) for t in cfg.gateway.tenants] == [
        ("team-a", "sk-a"),
        ("team-b", "sk-b"),
    ]
    assert cfg.gateway.api_keys == ("plain",)  # the tenants' keys are their own
    dumped = cfg.to_dict()
    assert dumped["gateway"]["tenants"] == [
        {"user": "team-a", "api_key": "***", "api_key_env": None, "api_key_file": None},
        {"user": "team-b", "api_key_env": "TEAM_B_KEY", "api_key_file": None},  # read again
    ]
    assert "sk-a" not in str(dumped) and "sk-b" not in str(dumped) and "sk-" not in repr(cfg)
    again = config_from_dict(cfg.to_dict(secrets=True), env={"TEAM_B_KEY": "sk-b"})
    assert again == cfg


@pytest.mark.parametrize(
    ("edit", "env", "where", "message"),
    [
        (("", ""), {}, "cfg.toml:8: gateway.tenants[1].api_key_env", "TEAM_B_KEY is not set"),
        (
            ('api_key = "sk-a"', 'api_key = "plain"'),
            {"TEAM_B_KEY": "k"},
            "cfg.toml:5: gateway.tenants[0].api_key",
            "is also one of api_keys: a tenant's key must be its own",
        ),
        (
            ("", ""),
            {"TEAM_B_KEY": "sk-a"},
            "cfg.toml:8: gateway.tenants[1].api_key_env",
            "is also the key of tenants[0]: a key is one tenant's",
        ),
        (
            ('user = "team-b"\n', 'user = "team-b"\napi_key = "x"\n'),
            {"TEAM_B_KEY": "k"},
            "cfg.toml:9: gateway.tenants[1].api_key_env",
            "set api_key or api_key_env, not both",
        ),
        (
            ('api_key = "sk-a"\n', ""),
            {"TEAM_B_KEY": "k"},
            "cfg.toml:3: gateway.tenants[0].api_key",
            "is required (or api_key_env, or api_key_file)",
        ),
        (
            ('user = "team-a"\n', 'user = ""\n'),
            {"TEAM_B_KEY": "k"},
            "cfg.toml:4: gateway.tenants[0].user",
            "must not be empty",
        ),
        (
            ('user = "team-a"\n', ""),
            {"TEAM_B_KEY": "k"},
            "cfg.toml:3: gateway.tenants[0].user",
            "is required",
        ),
        (
            ('user = "team-a"\n', 'user = "(other)"\n'),
            {"TEAM_B_KEY": "k"},
            "cfg.toml:4: gateway.tenants[0].user",
            "'(other)' is a user label the metrics keep",
        ),
    ],
)
def test_a_tenant_problem_is_reported_at_its_line(
    edit: tuple[str, str], env: dict[str, str], where: str, message: str
) -> None:
    err = problem(TENANTS.replace(*edit), env)
    assert f"{err.location}: {err.key}" == where
    assert message in err.message
    assert "sk-a" not in str(err)


def test_duplicates_among_instances_given_as_dataclasses_or_engine_names_in_any_case() -> None:
    a, b = InstanceConfig("a", "10.0.0.1", 8000, "m"), InstanceConfig("b", "10.0.0.1", 8000, "m")
    with pytest.raises(ConfigError, match=r"instances\[1\]\.port: 10\.0\.0\.1:8000 is also"):
        config_from_dict({"instances": [a, b]})
    twin = InstanceConfig("a", "10.0.0.2", 8000, "m")
    with pytest.raises(ConfigError, match="duplicate instance id 'a'"):
        config_from_dict({"instances": [a, twin]})
    # simulated engines may share a nominal address, whatever the case of "sim"
    sims = [
        {"instance_id": i, "host": "127.0.0.1", "port": 9000, "model_name": "llama-3-8b",
         "engine": "SIM"}
        for i in ("a", "b")
    ]  # fmt: skip
    assert len(config_from_dict({"instances": sims}).control_plane.instances) == 2
    # the gateway's own address, by the families it listens on
    assert at_address("::1", 8080, "::", 8080) and at_address("0:0:0:0:0:0:0:1", 8080, "::", 8080)
    assert not at_address("127.0.0.1", 8080, "::", 8080)  # asyncio binds :: for IPv6 alone
    assert at_address("127.0.0.2", 8080, "0.0.0.0", 8080)  # all of 127/8 is loopback
    assert at_address("::1", 8080, "localhost", 8080)  # localhost: both families
    assert not at_address("10.0.0.1", 8080, "0.0.0.0", 8080)
    # bind addresses as the listener reads them: * is every address, 0 is 0.0.0.0
    assert at_address("127.0.0.1", 8080, "*", 8080) and at_address("::1", 8080, "*", 8080)
    assert at_address("127.0.0.1", 8080, "0", 8080)
    # an engine at 0.0.0.0 is reached at the loopback address
    assert at_address("0.0.0.0", 8080, "127.0.0.1", 8080)
    # one IPv6 address written two ways is one address
    v6 = [InstanceConfig("a", "::1", 8001, "m"), InstanceConfig("b", "0:0:0:0:0:0:0:1", 8001, "m")]
    with pytest.raises(ConfigError, match="is also instances"):
        config_from_dict({"instances": v6})


def test_a_secret_that_no_client_could_send_is_refused_without_showing_it() -> None:
    """A key with white space around it never matched a client's; one with a control
    character broke every request's headers (its instance ejected at its first probe)."""
    text = '[gateway]\napi_keys = ["key1 ", "ok\\u0007"]\nadmin_token = "a\\nb"\n'
    found = [(e.key, e.detail) for e in problems(text)]
    assert found == [
        ("gateway.api_keys[0]", "must not begin or end with white space (a key is compared "
         "as written)"),
        ("gateway.api_keys[1]", "must not contain control characters (it goes in an HTTP "
         "header)"),
        ("gateway.admin_token", "must not contain control characters (it goes in an HTTP "
         "header)"),
    ]  # fmt: skip
    err = problem('[gateway]\napi_keys_env = "K"\n', env={"K": "a\x01b"})
    assert err.detail == "environment variable K holds control characters"
    entry = SEED.replace("tensor_parallel_size = 4", 'api_key_env = "K"')  # (a line, no crash)
    assert problem(entry, env={"K": "a\x01b"}).key.endswith("instances[0].api_key_env")  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="control characters"):
        check_instance(ExecutionInstance("x", "h", 1, "m", api_key="k\nX-Injected: 1"))


def test_secret_values_stay_out_of_error_messages() -> None:
    err = problem("[gateway]\nadmin_token = 987654321\n")
    assert err.key == "gateway.admin_token" and "987654321" not in str(err)
    err = problem('[gateway]\napi_keys = ["ok", 123456789]\n')
    assert err.key == "gateway.api_keys[1]" and "123456789" not in str(err)
    with pytest.raises(ValueError, match="api_keys") as info:
        GatewayConfig(api_keys=("",))
    assert "must not be empty" in str(info.value)


def test_configs_are_frozen() -> None:
    cfg = SageConfig.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.gateway.port = 1  # type: ignore[misc]


def test_a_default_max_tokens_above_the_gateways_limit_is_refused() -> None:
    text = (
        "[services.llm_control_plane]\ndefault_max_tokens = 20000\n"
        "[gateway]\nmax_tokens_limit = 100\n"
    )
    err = problem(text, {})
    assert err.key == "services.llm_control_plane.default_max_tokens"
    assert "20000 is above gateway.max_tokens_limit (100)" in err.message
    fine = text.replace("20000", "100")
    assert parse_config(fine).control_plane.default_max_tokens == 100
    assert err.location == "cfg.toml:2"
    # not written: the default (128) comes down to the limit, rather than be an error
    # about a key the file does not have
    implicit = "[gateway]\nmax_tokens_limit = 100\n"
    assert parse_config(implicit).control_plane.default_max_tokens == 100


def test_a_missing_secret_hides_no_other_problem() -> None:
    text = (
        "[services.llm_control_plane]\ndefault_max_tokens = 500\n"
        "[[services.llm_control_plane.instances]]\n"
        'instance_id = "a"\nhost = "localhost"\nport = 9000\nmodel_name = "m"\n'
        '[gateway]\nmax_tokens_limit = 100\nport = 9000\napi_keys_env = "UNSET_ZZ"\n'
    )
    assert [e.key for e in problems(text)] == [
        "services.llm_control_plane.default_max_tokens",
        "services.llm_control_plane.instances[0].port",
        "gateway.api_keys_env",
    ]


def test_every_missing_secret_is_reported_at_once() -> None:
    text = '[gateway]\napi_keys_env = "KEYS"\nadmin_token_env = "ADMIN"\n'
    assert [e.key for e in problems(text)] == ["gateway.api_keys_env", "gateway.admin_token_env"]


def test_a_file_not_in_utf8_is_reported_at_its_line_and_a_bom_is_read_past(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[gateway]\nport = 8080\nhost = "caf\xe9"\n')
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert info.value.location == f"{bad}:3"
    assert "not valid UTF-8 (byte 0xe9, column 12)" in info.value.message
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b"\xef\xbb\xbf[gateway]\nport = 8080\n")
    assert load_config(bom).gateway.port == 8080


def test_an_instance_at_the_gateways_own_address_is_refused() -> None:
    own = SEED.replace('host = "localhost"\nport = 8001', 'host = "127.0.0.1"\nport = 8090')
    err = problem(own + "\n[gateway]\nport = 8090\n")
    assert err.key == "services.llm_control_plane.instances[1].port"
    assert "the gateway's own address" in err.message
    parse_config(own + '\n[gateway]\nport = 8090\nhost = "10.0.0.5"\n')  # another host
    parse_config(own)  # the default port (8080) is not the instance's


def test_one_bad_instance_does_not_hide_the_others_problems() -> None:
    text = (
        "[gateway]\nport = 8001\n[services.llm_control_plane]\n"
        '[[services.llm_control_plane.instances]]\ninstance_id = "a"\nhost = "127.0.0.1"\n'
        'port = 99999\nmodel_name = "m"\n'
        '[[services.llm_control_plane.instances]]\ninstance_id = "b"\nhost = "127.0.0.1"\n'
        'port = 8001\nmodel_name = "m"\n'
        '[[services.llm_control_plane.instances]]\ninstance_id = "c"\nhost = "127.0.0.1"\n'
        'port = 8002\nmodel_name = "m"\nengine = "sim"\nsim_model = "llama-3-70b"\n'
        'sim_gpu = "l4"\n'
    )
    errs = problems(text)
    base = "services.llm_control_plane.instances"
    assert [e.key for e in errs] == [f"{base}[0].port", f"{base}[1].port", f"{base}[2].sim_gpu"]
    assert "the gateway's own address" in errs[1].detail
    # the default GPU in the bad name's place is not judged (70B "does not fit on 1 × H100")
    assert errs[2].detail.startswith("unknown GPU 'l4'")


def test_one_bad_instance_does_not_hide_the_other_models_servability_or_connector() -> None:
    """Only the models with an instance with problems of its own go unchecked: that
    instance might be the one that runs their requests."""
    prefill = (
        '[[services.llm_control_plane.instances]]\ninstance_id = "p"\nhost = "h"\nport = 1\n'
        'model_name = "m"\ninstance_type = "PREFILLING"\nengine = "openai"\n'
    )
    other = '[[services.llm_control_plane.instances]]\ninstance_id = "q"\nhost = "h2"\n'
    base = "services.llm_control_plane.instances"
    errs = problems(prefill + other + 'port = 70000\nmodel_name = "other"\n')
    assert [(e.location, e.key) for e in errs] == [
        ("cfg.toml:1", base),
        ("cfg.toml:7", f"{base}[0].engine"),
        ("cfg.toml:11", f"{base}[1].port"),
    ]
    assert "model 'm' has no decode-capable instance" in errs[0].message
    assert "cannot take the 'vllm' PD connector's hand-off" in errs[1].message
    # the bad instance serves 'm' as DECODING: 'm' might be served, not said otherwise
    decode = 'port = 70000\nmodel_name = "m"\ninstance_type = "DECODING"\n'
    errs = problems(prefill + other + decode)
    assert [e.key for e in errs] == [f"{base}[0].engine", f"{base}[1].port"]


def test_a_window_beyond_what_memory_holds_is_refused_by_the_check() -> None:
    """It passed the check and then failed the start with an OverflowError (a deque's
    length): each is refused at its line."""
    text = (
        "[health]\nfailure_rate_window = 10000000000\n"
        "[services.llm_control_plane]\npolicy_params = { window = 10000000000 }\n"
    )
    found = [(e.location, e.key) for e in problems(text)]
    assert found == [
        ("cfg.toml:2", "health.failure_rate_window"),
        ("cfg.toml:4", "services.llm_control_plane.policy_params.window"),
    ]


def test_a_bad_simulation_table_does_not_hide_the_checks_across_sections() -> None:
    text = (
        "[services.llm_control_plane]\nhealth_interval_s = 3.0\ndefault_max_tokens = 4096\n"
        "[gateway]\nmax_tokens_limit = 1024\n[health]\ninterval_s = 4.0\n"
        '[simulation]\nmodel = "llama-3-70b"\n'
    )
    keys = [e.key for e in problems(text)]
    assert keys == [
        "services.llm_control_plane.health_interval_s",
        "services.llm_control_plane.default_max_tokens",
        "simulation",
    ]


def test_a_refused_gateway_port_is_not_compared_with_the_instances() -> None:
    """It stands for the default (8080) after being refused: an instance there is not
    the gateway's own address."""
    text = (
        '[[services.llm_control_plane.instances]]\ninstance_id = "a"\nhost = "127.0.0.1"\n'
        'port = 8080\nmodel_name = "m"\n[gateway]\nport = 70000\n'
    )
    assert problem(text).key == "gateway.port"


def test_nested_pd_and_role_configs_built_in_code_are_checked_as_a_files() -> None:
    pd_tables: list[tuple[Any, str]] = [
        ({"kv_cache_memory_fraction": 5.0}, "pd.kv_cache_memory_fraction"),
        (PDSeparationConfig(prefilling_min_instances=-3), "pd.prefilling_min_instances"),
        ({"connector": "nope"}, "pd.connector"),
    ]
    for pd, key in pd_tables:
        with pytest.raises(ValueError, match=key):
            ControlPlaneConfig(pd=pd)
    role: Any = {"chunk_size": 0}
    with pytest.raises(ValueError, match=r"prefilling_config\.chunk_size"):
        InstanceConfig("a", "h", 1, "m", prefilling_config=role)
    sglang: Any = {"connector": "SGLang"}
    assert ControlPlaneConfig(pd=sglang).pd.connector == "sglang"  # as a file is read


def test_instance_fields_reads_sim_keys_and_listing() -> None:
    fields = instance_fields(
        {"instance_id": "a", "sim_gpu": "A100", "draining": True, "removing": False}
    )
    assert fields == {"instance_id": "a", "metadata": {"sim_gpu": "A100"}, "is_available": False}
    with pytest.raises(ConfigError, match="must be true or false") as info:
        instance_fields({"instance_id": "a", "draining": "yes"})
    assert info.value.key == "draining"


def test_unknown_instance_keys_leave_fields_sim_keys_and_listing() -> None:
    given = {"instance_id": "a", "sim_gpu": "A100", "draining": True, "gpus": 2, "colour": 1}
    assert unknown_instance_keys(given) == ["colour", "gpus"]
    assert unknown_instance_keys({"instance_id": "a", "is_healthy": True}) == []


SERVICE_HEAD = '[services.llm_control_plane]\ntype = "ControlPlaneVLLMService"\n'
ONE_INSTANCE = (
    '[[services.llm_control_plane.instances]]\ninstance_id = "a"\nhost = "localhost"\n'
    'port = 8000\nmodel_name = "m"\n'
)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("services = 5\n", "f.toml:1: services: must be a table, got integer 5"),
        (
            SERVICE_HEAD + "instances = 5\n",
            "f.toml:3: services.llm_control_plane.instances: must be an array, got integer 5",
        ),
        (
            SERVICE_HEAD + "enable_pd_separation = true\npd = 5\n" + ONE_INSTANCE,
            "f.toml:4: services.llm_control_plane.pd: must be a table, got integer 5",
        ),
        (
            SERVICE_HEAD
            + "enable_pd_separation = true\n[services.llm_control_plane.pd]\nmetadata = 5\n"
            + ONE_INSTANCE,
            "f.toml:5: services.llm_control_plane.pd.metadata: must be a table, got integer 5",
        ),
        (
            SERVICE_HEAD + ONE_INSTANCE + "api_key = 'k'\napi_key_env = 'K'\n",
            "f.toml:9: services.llm_control_plane.instances[0].api_key_env: "
            "set api_key or api_key_env, not both",
        ),
    ],
)
def test_a_file_whose_table_has_the_wrong_type_is_refused_at_its_line(
    text: str, where: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.toml")
    assert str(err.value) == where


def test_an_instance_entry_that_is_no_table_does_not_hide_the_others_problems() -> None:
    text = SERVICE_HEAD + (
        "instances = [5, {instance_id='a', host='localhost', port=8000, model_name='m'},"
        " {instance_id='a', host='localhost', port=8001, model_name='m'}]\n"
    )
    with pytest.raises(ConfigErrors) as err:
        parse_config(text, "f.toml")
    assert [str(e) for e in err.value.errors] == [
        "f.toml:3: services.llm_control_plane.instances[0]: must be a table, got integer 5",
        "f.toml:3: services.llm_control_plane.instances[2].instance_id: duplicate instance id "
        "'a' (also instances[1])",
    ]


def test_an_instance_metadata_that_is_no_table_is_named() -> None:
    with pytest.raises(ConfigError, match="metadata: must be a table, got integer 5") as err:
        check_instance(ExecutionInstance("a", "h", 1, "m", metadata=5))  # type: ignore[arg-type]
    assert err.value.key == "metadata"
    with pytest.raises(ConfigError, match="must be a table, got integer 5") as err:
        instance_fields({"instance_id": "a", "sim_gpu": "h100", "metadata": 5})
    assert err.value.key == "metadata"


def test_check_manager_arguments_names_the_arguments_it_was_not_given() -> None:
    with pytest.raises(TypeError, match=r"missing default_max_tokens, .*health_interval_s"):
        check_manager_arguments(scheduling_policy="fifo")


def _with_instance(host: str = "localhost", after: str = "", origin: str | None = None) -> str:
    if origin is not None:
        after = f'[services.llm_control_plane.gateway]\ncors_origins = ["{origin}"]\n'
    return SERVICE_HEAD + ONE_INSTANCE.replace('"localhost"', f'"{host}"') + after


@pytest.mark.parametrize(
    ("text", "key", "detail"),
    [
        (
            _with_instance(".".join(["a" * 60] * 5)),
            "instances[0].host",
            "must be a host name of at most 253 characters, got 304",
        ),
        (
            _with_instance(origin="http://h:0"),
            "gateway.cors_origins[0]",
            "must have a port number 1-65535 after the host, got 'http://h:0'",
        ),
        (
            _with_instance(origin="http://faß.de."),
            "gateway.cors_origins[0]",
            "must be written as browsers send it: 'http://xn--fa-hia.de.', got 'http://faß.de.'",
        ),
        (
            _with_instance(origin="http://" + "ß" * 70 + ".de"),
            "gateway.cors_origins[0]",
            "must have a host name or address a browser could send",
        ),
        (
            _with_instance().replace('VLLMService"', 'VLLMServic"'),
            "type",
            "unknown value 'ControlPlaneVLLMServic' (did you mean 'ControlPlaneVLLMService'?)",
        ),
    ],
)  # fmt: skip
def test_a_host_an_origin_or_a_service_type_no_one_could_use_is_named(
    text: str, key: str, detail: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "f.toml")
    assert err.value.key == f"services.llm_control_plane.{key}"
    assert detail in err.value.detail


def test_an_ipv4_shorthand_with_a_space_is_no_address() -> None:
    from sage_llm.config_schema import ipv4_shorthand

    assert ipv4_shorthand("127.1") == "127.0.0.1"
    assert ipv4_shorthand("127.1 x") is None  # (inet_aton reads up to the space)


def test_an_array_field_built_in_code_from_another_value_is_refused_naming_it() -> None:
    with pytest.raises(ValueError, match=r"^instances: must be an array, got integer 5$"):
        ControlPlaneConfig(instances=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^nvlink_peers: must be an array, got string 'b'$"):
        InstanceConfig("a", "h", 1, "m", nvlink_peers="b")  # type: ignore[arg-type]


def test_a_latency_prior_is_its_default_when_absent_and_refused_naming_its_key() -> None:
    from sage_llm.config_fields import LATENCY_PRIORS, latency_prior

    assert latency_prior({}, "tpot_ms") == LATENCY_PRIORS["tpot_ms"]
    assert latency_prior({"tpot_ms": 12}, "tpot_ms") == 12.0
    with pytest.raises(ConfigError, match="must be > 0, got -1") as err:
        latency_prior({"tpot_ms": -1}, "tpot_ms")
    assert err.value.key == "metadata.tpot_ms"


def test_secrets_from_files_are_read_beside_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``api_keys_file`` (keys a line, or separated by commas), ``admin_token_file`` and a
    tenant's ``api_key_file``: a relative path is the config file's directory's, and the
    loaded keys hold the whole path; a dump leaves the secrets read out, beside their key."""
    (tmp_path / "secrets").mkdir()
    (tmp_path / "keys.txt").write_text("\ufeffkx1\n\n kx2 , kx3\n")
    (tmp_path / "secrets" / "admin").write_text("tokadm7\n")
    team = tmp_path / "team-a.key"
    team.write_text("skteam8")
    cfg_file = tmp_path / "cluster.toml"
    cfg_file.write_text(
        '[gateway]\napi_keys = ["own"]\napi_keys_file = "keys.txt"\n'
        'admin_token_file = "secrets/admin"\n'
        f'[[gateway.tenants]]\nuser = "team-a"\napi_key_file = "{team}"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    gw = load_config(cfg_file, env={}).gateway
    assert gw.api_keys == ("own", "kx1", "kx2", "kx3")
    assert gw.api_keys_read == ("kx1", "kx2", "kx3")
    assert gw.admin_token == "tokadm7"
    assert [(t.user, t.api_key) for t in gw.tenants] == [("team-a", "skteam8")]
    assert gw.api_keys_file == str(tmp_path / "keys.txt")
    assert gw.admin_token_file == str(tmp_path / "secrets" / "admin")
    cfg = load_config(cfg_file, env={})
    dumped = cfg.to_dict()["gateway"]
    assert dumped["api_keys"] == ["***"]  # its own, masked; the file's are read again
    assert "admin_token" not in dumped and "api_key" not in dumped["tenants"][0]
    for secret in ("kx1", "kx2", "tokadm7", "skteam8"):
        assert secret not in str(cfg.to_dict()) and secret not in repr(cfg)
    assert config_from_dict(cfg.to_dict(secrets=True), env={}) == cfg
    # a dump with the secrets names the files, not the keys they held: loaded back after a
    # rotation, it has the new keys and not the old ones beside them
    (tmp_path / "keys.txt").write_text("kx4\n")
    again = config_from_dict(cfg.to_dict(secrets=True), env={}).gateway
    assert again.api_keys == ("own", "kx4") and again.api_keys_read == ("kx4",)


@pytest.mark.parametrize(
    ("files", "gateway", "key", "message"),
    [
        ({}, 'api_keys_file = "none.txt"', "api_keys_file", "none.txt does not exist"),
        ({"k": " \n,\n"}, 'api_keys_file = "k"', "api_keys_file", "holds no API key"),
        ({"k": ""}, 'api_keys_file = "k"', "api_keys_file", "is empty"),
        ({"k": "a\x01b"}, 'api_keys_file = "k"', "api_keys_file", "holds control characters"),
        ({"k": "ok\n***"}, 'api_keys_file = "k"', "api_keys_file", '"***", the mask'),
        ({"k": "x" * 70_000}, 'api_keys_file = "k"', "api_keys_file", "more than 64 KiB"),
        ({"t": "a\nb"}, 'admin_token_file = "t"', "admin_token_file", "more than one line"),
        ({"t": b"\xff\xfe"}, 'admin_token_file = "t"', "admin_token_file", "not UTF-8"),
        ({}, 'admin_token_file = "."', "admin_token_file", "is a directory"),
        (
            {"t": "tok"},
            'admin_token = "x"\nadmin_token_file = "t"',
            "admin_token_file",
            "set admin_token or admin_token_file, not both",
        ),
        (
            {"t": "tok"},
            'admin_token = "x"\nadmin_token_env = "E"\nadmin_token_file = "t"',
            "admin_token_env",
            "set only one of admin_token, admin_token_env and admin_token_file",
        ),
        (
            {"t": "same"},
            'api_keys = ["same"]\nadmin_token_file = "t"',
            "admin_token_file",
            "is also one of the API keys",
        ),
        (
            {"a": "sk"},
            '[[gateway.tenants]]\nuser = "u"\napi_key_env = "E"\napi_key_file = "a"',
            "tenants[0].api_key_file",
            "set api_key_env or api_key_file, not both",
        ),
        (
            {"a": "plain"},
            'api_keys = ["plain"]\n[[gateway.tenants]]\nuser = "u"\napi_key_file = "a"',
            "tenants[0].api_key_file",
            "is also one of api_keys",
        ),
        ({}, 'api_keys_file = "a\\u0001"', "api_keys_file", "holds control characters"),
        ({"k": "abc\x0cdef"}, 'api_keys_file = "k"', "api_keys_file", "holds control characters"),
        (
            {},
            'api_keys_file = "~no-such-user-of-sage/keys"',
            "api_keys_file",
            "cannot find the home directory '~no-such-user-of-sage'",
        ),
    ],
)
def test_a_secret_file_that_gives_no_secret_is_reported_at_its_key(
    tmp_path: Path, files: dict[str, str | bytes], gateway: str, key: str, message: str
) -> None:
    for name, content in files.items():
        target = tmp_path / name
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text(f"[gateway]\n{gateway}\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg_file, env={"E": "from-env"})
    errors = info.value.each()
    assert len(errors) == 1, errors
    assert errors[0].key == f"gateway.{key}"
    assert message in errors[0].message
    assert str(errors[0].location).startswith(f"{cfg_file}:")
    for secret in ("tok", "sk", "ok", "same"):
        assert f"'{secret}'" not in str(errors[0]) and f'"{secret}"' not in errors[0].detail


def test_a_secret_file_that_is_no_regular_file_is_refused_unread(tmp_path: Path) -> None:
    """A FIFO would hold its reader (a reload's, ``config check``) until something wrote
    to it."""
    os.mkfifo(tmp_path / "fifo")
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text('[gateway]\nadmin_token_file = "fifo"\n')
    with pytest.raises(ConfigError, match="fifo is not a regular file") as info:
        load_config(cfg_file, env={})
    assert info.value.key == "gateway.admin_token_file"


def test_keys_the_loader_read_are_not_read_again(tmp_path: Path) -> None:
    """The gateway takes the keys of a loaded configuration as loaded: a keys file rotated
    between the load and the gateway's start does not leave the old keys and the new
    accepted together. A file or variable named since is read."""
    (tmp_path / "keys").write_text("old")
    cfg_file = tmp_path / "cfg.toml"
    cfg_file.write_text('[gateway]\napi_keys_env = "E"\napi_keys_file = "keys"\n')
    gw = load_config(cfg_file, env={"E": "e1"}).gateway
    (tmp_path / "keys").write_text("new")
    assert ResolvedGateway.from_settings(gw, {"E": "e2"}).api_keys == ("e1", "old")
    (tmp_path / "other").write_text("o")
    moved = dataclasses.replace(gw, api_keys_file=str(tmp_path / "other"), api_keys_env="F")
    resolved = ResolvedGateway.from_settings(moved, {"F": "f"})
    assert resolved.api_keys == ("e1", "old", "f", "o")
