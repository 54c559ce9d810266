"""Command lines for vLLM and engine-sim, engines from plans, plan and launch files."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from sage_llm.config import ConfigErrors
from sage_llm.control_plane.parallelism import PlannedInstance, plan_command
from sage_llm.control_plane.topology import InstanceTopology
from sage_llm.errors import ConfigError
from sage_llm.launch import (
    KV_TRANSFER_CONFIG,
    LaunchSettings,
    engine_sim_argv,
    engines_from_plan,
    fleet_problem,
    load_launch_config,
    load_plan_file,
    planned_instances_from_dicts,
    vllm_argv,
)
from sage_llm.launch.plan_to_engines import scheduling_policy_of
from sage_llm.types import ExecutionInstanceType

GENERAL = ExecutionInstanceType.GENERAL
PREFILL = ExecutionInstanceType.PREFILLING
DECODE = ExecutionInstanceType.DECODING
PY = sys.executable
FIXTURES = Path(__file__).parent.parent / "fixtures" / "topology"


def test_kv_transfer_config_is_the_nixl_kv_both_json() -> None:
    assert KV_TRANSFER_CONFIG == '{"kv_connector":"NixlConnector","kv_role":"kv_both"}'


def test_vllm_serve_argv() -> None:
    argv = vllm_argv(
        "meta-llama/Meta-Llama-3-70B-Instruct", served_model_name="llama-3-70b",
        host="0.0.0.0", port=8100, tp=4, pp=1,
    )  # fmt: skip
    assert argv == [
        "vllm", "serve", "meta-llama/Meta-Llama-3-70B-Instruct",
        "--host", "0.0.0.0", "--port", "8100", "--served-model-name", "llama-3-70b",
        "--tensor-parallel-size", "4", "--pipeline-parallel-size", "1",
    ]  # fmt: skip


def test_vllm_module_argv_for_the_cpu_build_with_pd_role_and_extra_args() -> None:
    argv = vllm_argv(
        "/models/tiny", served_model_name="tiny", host="127.0.0.1", port=8101, tp=1, pp=2,
        role=PREFILL, entry="vllm-module", python="/opt/py", extra_args=("--max-model-len", "512"),
    )  # fmt: skip
    assert argv == [
        "/opt/py", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny",
        "--host", "127.0.0.1", "--port", "8101", "--served-model-name", "tiny",
        "--tensor-parallel-size", "1", "--pipeline-parallel-size", "2",
        "--kv-transfer-config", '{"kv_connector":"NixlConnector","kv_role":"kv_both"}',
        "--max-model-len", "512",
    ]  # fmt: skip


def test_vllm_argv_expert_parallel_and_decode_role() -> None:
    argv = vllm_argv("m", served_model_name="m", host="h", port=1, tp=2, ep=2, role=DECODE)
    assert argv[-3:] == ["--enable-expert-parallel", "--kv-transfer-config", KV_TRANSFER_CONFIG]


def test_engine_sim_argv() -> None:
    argv = engine_sim_argv(
        "llama-3-8b", "h100", served_model_name="llama-3-8b", host="127.0.0.1", port=8100,
        tp=2, role=DECODE, seed=3, python="/opt/py",
    )  # fmt: skip
    assert argv == [
        "/opt/py", "-m", "sage_llm.cli", "engine-sim", "--model", "llama-3-8b", "--gpu", "h100",
        "--host", "127.0.0.1", "--port", "8100", "--served-model-name", "llama-3-8b",
        "--tp", "2", "--role", "decode", "--seed", "3",
    ]  # fmt: skip


def test_engine_sim_script_form_with_pp_and_speed() -> None:
    argv = engine_sim_argv(
        "tiny", "cpu", served_model_name="t", host="h", port=9, pp=2, role=PREFILL, speed=4.0,
        entry="script",
    )  # fmt: skip
    assert argv == [
        "sage-llm", "engine-sim", "--model", "tiny", "--gpu", "cpu", "--host", "h", "--port", "9",
        "--served-model-name", "t", "--tp", "1", "--pp", "2", "--role", "prefill", "--seed", "0",
        "--speed", "4",
    ]  # fmt: skip


PD_PLAN = [
    PlannedInstance(PREFILL, 2, 1, 1, (0, 1)),
    PlannedInstance(DECODE, 1, 1, 1, (2,)),
    PlannedInstance(DECODE, 1, 1, 1, (3,)),
    PlannedInstance(GENERAL, 4, 1, 1, (0, 1, 2, 3), node=1),
]


def test_engines_from_plan_for_vllm_pd() -> None:
    settings = LaunchSettings(
        engine="vllm", model="meta-llama/Meta-Llama-3-8B", served_model_name="llama3",
        host="0.0.0.0", base_port=9000, kv_base_port=5600, machine_id="gpu-1",
        env={"HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    engines = engines_from_plan(PD_PLAN, settings)
    assert [e.instance_id for e in engines] == [
        "gpu-1-prefill-0",
        "gpu-1-decode-0",
        "gpu-1-decode-1",
    ]
    assert [e.port for e in engines] == [9000, 9001, 9002]
    assert {e.host for e in engines} == {"127.0.0.1"}  # wildcard bind, reached locally
    assert [dict(e.env) for e in engines] == [
        {
            "HF_HUB_OFFLINE": "1",
            "CUDA_VISIBLE_DEVICES": "0,1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": "5600",
        },
        {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "2", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5602"},
        {"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "3", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5603"},
    ]
    assert engines[0].argv == tuple(
        vllm_argv(
            "meta-llama/Meta-Llama-3-8B", served_model_name="llama3", host="0.0.0.0",
            port=9000, tp=2, role=PREFILL,
        )
    )  # fmt: skip
    assert (
        engines[0]
        .shell()
        .startswith(
            "CUDA_VISIBLE_DEVICES=0,1 HF_HUB_OFFLINE=1 VLLM_NIXL_SIDE_CHANNEL_PORT=5600 vllm serve "
        )
    )
    assert '--kv-transfer-config \'{"kv_connector":"NixlConnector"' in engines[0].shell()
    other = engines_from_plan(PD_PLAN, LaunchSettings(engine="vllm", model="m", node=1))
    assert [(e.instance_id, e.tp, e.port) for e in other] == [("local-general-0", 4, 8100)]
    with pytest.raises(ConfigError, match="no instance on node 2"):
        engines_from_plan(PD_PLAN, LaunchSettings(node=2))


def test_engines_from_plan_for_engine_sim_and_the_instance_to_register() -> None:
    settings = LaunchSettings(engine="sim", model="llama-3-8b", sim_gpu="a100", base_port=8200)
    prefill, decode, _ = engines_from_plan(PD_PLAN, settings)
    assert prefill.argv == tuple(
        engine_sim_argv(
            "llama-3-8b", "a100", served_model_name="llama-3-8b", host="127.0.0.1", port=8200,
            tp=2, role=PREFILL, seed=0,
        )
    )  # fmt: skip
    assert "VLLM_NIXL_SIDE_CHANNEL_PORT" not in decode.env
    topo = InstanceTopology(
        machine_id="m1", nvlink_domain="m1/nv0", numa_node=0, nvlink_peers=["x"]
    )
    inst = prefill.to_instance(topo, max_concurrent_requests=64, gpu_memory_gb=80.0)
    assert (inst.instance_id, inst.host, inst.port, inst.model_name) == (
        "local-prefill-0", "127.0.0.1", 8200, "llama-3-8b",
    )  # fmt: skip
    assert inst.instance_type is PREFILL and inst.tensor_parallel_size == 2
    assert (inst.gpu_count, inst.gpu_memory_gb, inst.max_concurrent_requests) == (2, 80.0, 64)
    assert (inst.machine_id, inst.nvlink_domain, inst.numa_node) == ("m1", "m1/nv0", 0)
    assert inst.nvlink_peers == ["x"] and inst.engine == "vllm"
    assert inst.metadata["gpu_ids"] == [0, 1] and inst.metadata["sim_gpu"] == "a100"


def test_a_vllm_engine_started_to_schedule_by_priority_is_registered_so() -> None:
    """Its requests' priorities are then sent with them."""
    assert scheduling_policy_of(["--port", "1"]) == "fcfs"
    assert scheduling_policy_of(["--scheduling-policy", "priority"]) == "priority"
    assert scheduling_policy_of(["--scheduling-policy=priority"]) == "priority"
    assert (
        scheduling_policy_of(["--scheduling-policy", "priority", "--scheduling-policy", "fcfs"])
        == "fcfs"
    )
    assert scheduling_policy_of(["--scheduling-policy"]) == "fcfs"
    settings = LaunchSettings(
        engine="vllm", model="m", base_port=8300, extra_args=("--scheduling-policy", "priority")
    )
    [engine] = engines_from_plan(planned_instances_from_dicts([{"role": "general"}]), settings)
    assert engine.to_instance().engine_scheduling_policy == "priority"


def test_a_slowed_simulation_and_a_pipelined_instance_to_register() -> None:
    """A ``sim_speed`` below 1 reaches the engine as ``--speed`` as one above does; an
    instance of tp x pp GPUs counts them all, and its device is its first GPU."""
    plan = [PlannedInstance(GENERAL, 2, 2, 1, (2, 3, 4, 5))]
    settings = LaunchSettings(engine="sim", model="llama-3-8b", sim_gpu="a100", sim_speed=0.5)
    (engine,) = engines_from_plan(plan, settings)
    assert engine.argv[-2:] == ("--speed", "0.5")
    inst = engine.to_instance()
    assert (inst.tensor_parallel_size, inst.pipeline_parallel_size) == (2, 2)
    assert (inst.gpu_count, inst.gpu_device_id) == (4, 2)
    assert inst.metadata["gpu_ids"] == [2, 3, 4, 5]


def test_launch_settings_validation() -> None:
    with pytest.raises(ConfigError, match="unknown engine 'tgi'"):
        LaunchSettings(engine="tgi")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="base_port: must be a port"):
        LaunchSettings(base_port=0)
    with pytest.raises(ConfigError, match="health_timeout_s"):
        LaunchSettings(health_timeout_s=0)
    with pytest.raises(ConfigError, match=r"^base_port: must be an integer, got '8100'$"):
        LaunchSettings(base_port="8100")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^kv_base_port: must be an integer, got True$"):
        LaunchSettings(kv_base_port=True)
    with pytest.raises(ConfigError, match=r"^health_poll_s: must be a number, got '1'$"):
        LaunchSettings(health_poll_s="1")  # type: ignore[arg-type]
    # every field of the wrong type, or out of range, is named, with what it got
    for given, said in [
        ({"log_dir": 5}, "log_dir: must be a path, got 5"),
        ({"host": 5}, "host: must be a string, got 5"),
        ({"extra_args": None}, "extra_args: must be a list of strings, got None"),
        ({"env": None}, "env: must be a mapping of names to values, got None"),
        ({"max_concurrent_requests": 0}, "max_concurrent_requests: must be >= 1, got 0"),
        ({"node": -1}, "node: must be >= 0, got -1"),
        ({"stop_grace_s": math.nan}, "stop_grace_s: must be a finite number, got nan"),
        ({"extra_args": ["--enforce-eager", None]}, "extra_args[1]: must be a string, got None"),
        ({"env": {"A": 5}}, "env.A: must be a string, got 5"),
        ({"python": ""}, "python: must not be empty"),
        ({"gpu_memory_gb": -5.0}, "gpu_memory_gb: must be >= 0, got -5.0"),
        ({"sim_entry": "binary"}, "sim_entry: must be 'module' or 'script'"),
        ({"model": ""}, "model: must not be empty"),
        (
            {"kv_transfer_config": 5},
            "kv_transfer_config: must be a table of names to values, got 5",
        ),
        (
            {"kv_transfer_config": {1: "x"}},
            "kv_transfer_config: must be named by a non-empty string, got 1",
        ),
    ]:
        with pytest.raises(ConfigError, match=f"^{re.escape(said)}$"):
            LaunchSettings(**given)  # type: ignore[arg-type]
    assert LaunchSettings(extra_args=(a for a in ["--x"])).extra_args == ("--x",)  # type: ignore[arg-type]
    assert LaunchSettings(host="10.0.0.5").reachable_host == "10.0.0.5"
    assert LaunchSettings(host="0.0.0.0", advertise_host="node7").reachable_host == "node7"


def test_planned_instances_from_dicts_checks_every_field() -> None:
    got = planned_instances_from_dicts([{"role": "prefill", "tp": 2, "gpu_ids": [4, 5]}, {}])
    assert got == [
        PlannedInstance(PREFILL, 2, 1, 1, (4, 5)),
        PlannedInstance(GENERAL, 1, 1, 1, (0,)),
    ]
    bad_specs: list[tuple[dict[str, object], str]] = [
        ({"tp": 2, "gpu_ids": [0]}, r"instances\[0\].gpu_ids: lists 1 GPUs but tp × pp = 2"),
        ({"role": "boss"}, r"instances\[0\].role: unknown role 'boss' \(expected general, "),
        ({"tp": 0}, r"instances\[0\].tp: must be >= 1, got 0"),
        ({"tp": "2"}, r"instances\[0\].tp: must be an integer, got string '2'"),
        ({"gpu_ids": [-1]}, r"instances\[0\].gpu_ids\[0\]: must be >= 0, got -1"),
        ({"gpu_ids": []}, r"instances\[0\].gpu_ids: must be a non-empty list of GPU indices"),
        ({"tp": 2, "gpu_ids": [1, 1]}, r"gpu_ids: lists a GPU more than once: \[1, 1\]"),
        ({"gpus": [0]}, r"instances\[0\].gpus: unknown key \(did you mean 'gpu_ids'\?\)"),
    ]
    for bad, message in bad_specs:
        with pytest.raises(ConfigError, match=message):
            planned_instances_from_dicts([bad])
    with pytest.raises(ConfigError, match="no instances"):
        planned_instances_from_dicts([])


def test_plan_json_from_plan_command_loads_back(tmp_path: Path) -> None:
    text = plan_command("llama-3-70b", "8xH100", "2s", "50ms", as_json=True)
    path = tmp_path / "plan.json"
    path.write_text(text)
    data, instances = load_plan_file(path)
    assert [i.to_dict() for i in instances] == data["instances"]  # read back as written
    assert data["plan"] == "2 × TP4"
    assert [(i.role, i.tp, i.gpu_ids) for i in instances] == [
        (GENERAL, 4, (0, 1, 2, 3)), (GENERAL, 4, (4, 5, 6, 7)),
    ]  # fmt: skip
    config = load_launch_config(path)
    assert config.settings.model == "Llama-3-70B" and config.settings.sim_gpu == "H100"
    assert len(config.instances) == 2
    # served under the name the plan was asked for (clients send it), not the spec's
    assert data["served_model_name"] == config.settings.name == "llama-3-70b"
    engines = engines_from_plan(config.instances, config.settings)
    argv = list(engines[0].argv)
    assert argv[argv.index("--served-model-name") + 1] == "llama-3-70b"
    (tmp_path / "bad.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(ConfigError, match="needs an 'instances' list"):
        load_plan_file(tmp_path / "bad.json")
    (tmp_path / "comma.json").write_text('{"instances": [\n  {"role": "general", "tp": 1,}]}\n')
    with pytest.raises(ConfigError) as syntax:  # at its line, as a TOML file's error is
        load_plan_file(tmp_path / "comma.json")
    assert str(syntax.value).startswith(f"{tmp_path / 'comma.json'}:2: invalid JSON: ")
    (tmp_path / "deep.json").write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(ConfigError, match="nested too deeply to read"):
        load_plan_file(tmp_path / "deep.json")
    # what its simulated engines would be is checked before any starts
    for change, message in (
        ({"model": "gpt-4"}, "unknown model 'gpt-4'"),
        ({"gpu": "TPU"}, "unknown GPU 'TPU'"),
        ({"model": None}, "the plan names no model"),
        ({"served_model_name": 5}, "served_model_name: must be a non-empty string, got integer 5"),
        ({"served_model_name": ""}, "served_model_name: must be a non-empty string"),
        ({"served_model_name": "m "}, "served_model_name: must not begin or end with white"),
    ):
        (tmp_path / "changed.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(ConfigError, match=message):
            load_launch_config(tmp_path / "changed.json")


def test_launch_env_names_and_nul_characters_are_refused_at_their_key() -> None:
    """They had passed config check, then failed the engine's start with a ValueError
    traceback."""
    for values, key in (
        ({"env": {"A=B": "c"}}, "env"),
        ({"env": {"": "c"}}, "env"),
        ({"env": {"A": "x\0y"}}, "env.A"),
        ({"extra_args": ["--x\0"]}, "extra_args.0"),
        ({"extra_args": (a for a in ["--y\0"])}, "extra_args.0"),
        ({"extra_args": "--x"}, "extra_args"),
        # a flag the launcher sets: the engine had listened where nothing waited for it
        ({"extra_args": ["--port", "20425"]}, "extra_args.0"),
        ({"extra_args": ["--max-num-seqs", "8", "--host=0.0.0.0"]}, "extra_args.2"),
        ({"engine": "vllm", "extra_args": ["--tensor_parallel_size", "4"]}, "extra_args.0"),
        # a variable the launcher sets: it had been replaced without a word
        ({"env": {"CUDA_VISIBLE_DEVICES": "7"}}, "env.CUDA_VISIBLE_DEVICES"),
        (
            {"engine": "vllm", "env": {"VLLM_NIXL_SIDE_CHANNEL_PORT": "1"}},
            "env.VLLM_NIXL_SIDE_CHANNEL_PORT",
        ),
    ):
        with pytest.raises(ConfigError) as info:
            LaunchSettings(**values)
        assert info.value.key == key


def test_a_launch_files_process_problems_are_reported_with_its_others(tmp_path: Path) -> None:
    """Each at its key, beside another field's problem (one at a time, behind it, before)."""
    path = tmp_path / "l.toml"
    path.write_text(
        '[launch]\nenv = { "A=B" = "1", GOOD = "x\\u0000y" }\nextra_args = ["--x\\u0000"]\n'
        "stop_grace_s = -1\n[[launch.instances]]\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_launch_config(path)
    assert [e.key for e in info.value.errors] == [
        "launch.env", "launch.env.GOOD", "launch.extra_args[0]", "launch.stop_grace_s",
    ]  # fmt: skip


def test_a_launch_files_kv_transfer_config_is_added_to_its_pd_engines(tmp_path: Path) -> None:
    """vLLM's CPU build keeps the KV it hands over in host memory only when told
    (``kv_buffer_device = "cpu"``): the launcher had no way to say it but a second
    ``--kv-transfer-config`` in ``extra_args``, which whole-request engines got too."""
    path = tmp_path / "l.toml"
    path.write_text(
        '[launch]\nengine = "vllm-module"\nmodel = "/models/tiny"\n'
        'kv_transfer_config = { kv_buffer_device = "cpu", '
        "kv_connector_extra_config = { kv_lease_duration = 600 } }\n"
        '[[launch.instances]]\nrole = "prefill"\n[[launch.instances]]\nrole = "decode"\n'
        '[[launch.instances]]\nrole = "general"\n'
    )
    config = load_launch_config(path)
    engines = engines_from_plan(config.instances, config.settings)
    flags = [e.argv[e.argv.index("--kv-transfer-config") + 1] for e in engines[:2]]
    assert [json.loads(f) for f in flags] == 2 * [
        {
            "kv_connector": "NixlConnector",
            "kv_role": "kv_both",
            "kv_buffer_device": "cpu",
            "kv_connector_extra_config": {"kv_lease_duration": 600},
        }
    ]
    assert "--kv-transfer-config" not in engines[2].argv  # a whole-request engine: none
    # the plain call and an empty table: the launcher's own
    assert vllm_argv("m", served_model_name="m", host="h", port=1, role=DECODE,
                     kv_transfer_config={})[-1] == KV_TRANSFER_CONFIG  # fmt: skip


@pytest.mark.parametrize(
    ("table", "key", "words"),
    [
        ('kv_transfer_config = "cpu"', "launch.kv_transfer_config", "must be a table"),
        ('kv_transfer_config = { kv_role = "kv_producer" }',
         "launch.kv_transfer_config.kv_role", "the launcher sets kv_role itself"),
        ('kv_transfer_config = { kv_connector = "LMCacheConnectorV1" }',
         "launch.kv_transfer_config.kv_connector", "the launcher sets kv_connector itself"),
        ("kv_transfer_config = { when = 1979-05-27 }",
         "launch.kv_transfer_config.when", "a value JSON can hold"),
        ("kv_transfer_config = { x = nan }", "launch.kv_transfer_config.x",
         "a value JSON can hold"),
    ],
)  # fmt: skip
def test_a_bad_kv_transfer_config_is_refused_at_its_key_and_line(
    tmp_path: Path, table: str, key: str, words: str
) -> None:
    path = tmp_path / "l.toml"
    path.write_text(f'[launch]\nengine = "vllm"\nmodel = "m"\n{table}\n[[launch.instances]]\n')
    with pytest.raises((ConfigError, ConfigErrors)) as info:
        load_launch_config(path)
    errors = info.value.errors if isinstance(info.value, ConfigErrors) else [info.value]
    assert [(e.key, e.location) for e in errors] == [(key, f"{path}:4")]
    assert words in str(errors[0])


def test_kv_transfer_config_from_code_is_checked_and_frozen() -> None:
    settings = LaunchSettings(engine="vllm", kv_transfer_config={"kv_buffer_device": "cpu"})
    with pytest.raises(TypeError):
        settings.kv_transfer_config["x"] = 1  # type: ignore[index]
    with pytest.raises(ConfigError) as info:
        LaunchSettings(engine="vllm", kv_transfer_config={"k": object()})
    assert info.value.key == "kv_transfer_config.k"
    with pytest.raises(ConfigError) as info:
        vllm_argv("m", served_model_name="m", host="h", port=1, role=PREFILL,
                  kv_transfer_config={"kv_role": "kv_consumer"})  # fmt: skip
    assert info.value.key == "kv_transfer_config.kv_role"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


def test_flags_the_launcher_does_not_set_on_an_engine_may_be_given() -> None:
    """vLLM's --seed and a whole-request --kv-transfer-config (KV offloading) are not the
    launcher's there (they had been refused as if they were)."""
    LaunchSettings(engine="vllm", extra_args=("--seed", "42", "--kv-transfer-config", "{}"))
    with pytest.raises(ConfigError):
        LaunchSettings(engine="sim", extra_args=("--seed", "42"))


def test_launch_names_with_white_space_at_an_end_are_refused_at_their_key(
    tmp_path: Path,
) -> None:
    """They had passed config check, then failed the launch after its engines started."""
    path = tmp_path / "l.toml"
    path.write_text(
        '[launch]\nmodel = "llama-3-8b "\nserved_model_name = "m "\nsim_model = " x"\n'
        "[[launch.instances]]\n"
    )
    with pytest.raises(ConfigErrors) as info:
        load_launch_config(path)
    assert [(e.key, e.location) for e in info.value.errors] == [
        ("launch.model", f"{path}:2"),
        ("launch.served_model_name", f"{path}:3"),
        ("launch.sim_model", f"{path}:4"),
    ]


def test_launch_file_with_explicit_instances(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [launch]
        engine = "vllm-module"
        model = "/models/tiny"
        served_model_name = "tiny"
        gpu = "cpu"
        base_port = 8300
        log_dir = "logs"
        extra_args = ["--max-model-len", "512", "--dtype", "bfloat16"]
        env = { HF_HUB_OFFLINE = "1", VLLM_CPU_KVCACHE_SPACE = "1" }
        [[launch.instances]]
        role = "general"
        gpu_ids = [0]
        """,
    )
    config = load_launch_config(path)
    s = config.settings
    assert (s.engine, s.model, s.name, s.sim_gpu, s.base_port) == (
        "vllm-module", "/models/tiny", "tiny", "cpu", 8300,
    )  # fmt: skip
    assert s.log_dir == tmp_path / "logs"
    (engine,) = engines_from_plan(config.instances, s)
    assert engine.argv[1:5] == (
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/tiny",
    )
    assert engine.argv[-4:] == ("--max-model-len", "512", "--dtype", "bfloat16")
    assert engine.env["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_launch_file_that_plans_with_a_topology(tmp_path: Path) -> None:
    (tmp_path / "topo.txt").write_text((FIXTURES / "a100-pcie-4gpu-nv12-pair-mlx5.txt").read_text())
    path = write(
        tmp_path,
        """
        [launch]
        engine = "sim"
        model = "llama-3-8b"
        topology_file = "topo.txt"
        [launch.plan]
        gpus = "2xA100"
        slo_ttft = "2s"
        slo_tpot = "50ms"
        allow_pd = false
        """,
    )
    config = load_launch_config(path)
    assert config.plan is not None and config.topology is not None
    assert config.plan.candidate.kind == "colocated"
    assert {g for i in config.instances for g in i.gpu_ids} == {0, 1}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('[launch]\nmodel = "m"\nbogus = 1\n[[launch.instances]]\n', r"launch\.bogus: unknown key"),
        (
            '[launch]\nbase_port = "80"\n[[launch.instances]]\n',
            r":2: launch\.base_port: must be an integer, got string '80'$",
        ),
        (
            "[launch]\nbase_port = 70000\n[[launch.instances]]\n",
            r":2: launch\.base_port: must be <= 65535, got 70000$",
        ),
        (
            '[launch]\nplan_file = "p.json"\n[[launch.instances]]\n',
            ":1: launch: give exactly one of",
        ),
        ("[launch]\n", "exactly one of"),
        ("[other]\n", "one \\[launch\\] table"),
        (
            '[launch]\n[launch.plan]\ngpus = "8xH100"\nslo_tpot = 50\n',
            r":4: launch\.plan\.slo_tpot: must be a duration with its unit such as \"2s\" or "
            r"\"50ms\", got 50$",
        ),
        (
            '[launch]\nengine = "vllm"\n[[launch.instances]]\n',
            r":1: launch\.model: is required with engine = 'vllm'",
        ),
        ("[launch\n", r":1: invalid TOML: .*\(column 8\)"),
        (
            "[launch]\nsim_speed = true\n[[launch.instances]]\n",
            r":2: launch\.sim_speed: must be a number, got boolean true$",
        ),
        (
            '[launch]\nengine = "tgi"\n[[launch.instances]]\n',
            r":2: launch\.engine: unknown value 'tgi' \(valid values: vllm, vllm-module, sim\)",
        ),
        (
            "[launch]\nenv = { A = 1 }\n[[launch.instances]]\n",
            r":2: launch\.env\.A: must be a string, got integer 1$",
        ),
        (
            "[launch]\n[[launch.instances]]\n[[launch.instances]]\ntp = 0\n",
            r":4: launch\.instances\[1\]\.tp: must be >= 1, got 0$",
        ),
        (
            '[launch]\n[launch.plan]\ngpus = "8xH100"\nslo_ttft = "2"\nslo_tpot = "50ms"\n',
            r":4: launch\.plan\.slo_ttft: expected a duration such as 2s or 50ms, got '2'",
        ),
        (
            '[launch]\n[launch.plan]\ngpus = "1xH100"\nprompt_p90 = 8000\noutput_p90 = 500\n',
            r":5: launch\.plan\.output_p90: one p90 request \(8500 tokens: ",
        ),
        (
            '[launch]\n[launch.plan]\ngpus = "1xH100"\nprompt_len = 9000\n',
            r":4: launch\.plan\.prompt_len: one p90 request \(9256 tokens: ",
        ),
        (
            "[launch]\nbase_port = 65535\n[[launch.instances]]\n[[launch.instances]]\n",
            r":2: launch\.base_port: 2 engines need ports 65535-65536, past 65535",
        ),
        (
            "[launch]\ninstances = 5\n",
            r":2: launch\.instances: must be an array of tables, got integer 5$",
        ),
        (
            "[launch]\ninstances = true\n",
            r":2: launch\.instances: must be an array of tables, got boolean true$",
        ),
        (
            "[launch]\ninstances = 1979-05-27\n",
            r":2: launch\.instances: must be an array of tables, got date$",
        ),
        (
            "[launch]\ninstances = [1, {}]\n",
            r":2: launch\.instances\[0\]: must be a table, got integer 1$",
        ),
        (
            "[launch]\ninstances = [[1]]\n",
            r":2: launch\.instances\[0\]: must be a table, got array$",
        ),
        ("[launch]\nplan = [1]\n", r":2: launch\.plan: must be a table, got array$"),
        ("launch = 5\n", r":1: launch: must be a table, got integer 5$"),
        ("", r"\.toml: a launch file has one \[launch\] table$"),
        (
            "[launch]\ntopology_file = 5\n[[launch.instances]]\n",
            r":2: launch\.topology_file: must be a string, got integer 5$",
        ),
        ("[launch]\nplan_file = 5\n", r":2: launch\.plan_file: must be a string, got integer 5$"),
        (
            '[launch]\ngpu = "nope"\n[launch.plan]\ngpus = 8\nslo_ttft = "2s"\nslo_tpot = "50ms"\n',
            r":2: launch\.gpu: unknown GPU 'nope'; built-in GPUs: H100, ",
        ),
        (
            '[launch]\n[launch.plan]\ngpus = true\nslo_ttft = "2s"\nslo_tpot = "50ms"\n',
            r":3: launch\.plan\.gpus: must be COUNTxGPU such as 8xH100, or a GPU count, got "
            r"boolean true$",
        ),
        (
            '[launch]\n[launch.plan]\ngpus = "8xFOO"\nslo_ttft = "2s"\nslo_tpot = "50ms"\n',
            r":3: launch\.plan\.gpus: unknown GPU 'FOO'; built-in GPUs: H100, ",
        ),
        (
            '[launch]\n[launch.plan]\ngpus = "8xH100"\nbogus = 1\n',
            r":4: launch\.plan\.bogus: unknown key \(did you mean 'gpus'\?\)$",
        ),
    ],
)
def test_launch_file_errors_name_the_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as info:
        load_launch_config(path)
    assert str(path) in info.value.message


def test_every_problem_of_a_launch_file_is_reported_with_its_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[launch]\nbase_port = "80"\nhost = 1\nhots = 2\n[[launch.instances]]\nrole = "boss"\n',
    )
    with pytest.raises(ConfigErrors) as info:
        load_launch_config(path)
    assert [str(e) for e in info.value.errors] == [
        f"{path}:2: launch.base_port: must be an integer, got string '80'",
        f"{path}:3: launch.host: must be a string, got integer 1",
        f"{path}:4: launch.hots: unknown key (did you mean 'host'?)",
        f"{path}:6: launch.instances[0].role: unknown role 'boss' "
        "(expected general, prefill or decode; or prefilling, decoding, hybrid, as plans "
        "write them)",
    ]


def test_files_that_are_not_utf8_text_are_a_clear_error(tmp_path: Path) -> None:
    for name in ("fleet.toml", "plan.json"):
        path = tmp_path / name
        path.write_bytes(b"[launch]\nmodel = '\xff\xfe'\n")
        with pytest.raises(ConfigError, match=r":2: not valid UTF-8 \(byte 0xff, column 10\)"):
            load_launch_config(path)
    (tmp_path / "topo.txt").write_bytes(b"\x80GPU0\n")
    path = write(tmp_path, '[launch]\ntopology_file = "topo.txt"\n[[launch.instances]]\n')
    message = r":2: launch\.topology_file: .*topo\.txt:1: not valid UTF-8 \(byte 0x80, column 1\)"
    with pytest.raises(ConfigError, match=message):
        load_launch_config(path)


def test_instances_that_share_a_gpu_are_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(
        tmp_path,
        "[launch]\n[[launch.instances]]\ngpu_ids = [0]\n"
        "[[launch.instances]]\ntp = 2\ngpu_ids = [1, 0]\n"
        "[[launch.instances]]\ngpu_ids = [0]\nnode = 1\n",
    )
    with caplog.at_level("WARNING", logger="sage_llm.launch"):
        config = load_launch_config(path)
    assert len(config.instances) == 3
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:6: launch.instances[1].gpu_ids: GPU 0 is also in launch.instances[0] "
        "(node 0): the two engines would share it"
    ]


def test_engine_ports_must_all_fit_below_65536() -> None:
    plan = [PlannedInstance(GENERAL, 1, 1, 1, (k,)) for k in range(3)]
    assert [e.port for e in engines_from_plan(plan, LaunchSettings(base_port=65533))] == [
        65533, 65534, 65535,
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="base_port: 3 engines need ports 65534-65536, past"):
        engines_from_plan(plan, LaunchSettings(base_port=65534))
    with pytest.raises(ConfigError, match="kv_base_port: the PD engines need NIXL side-channel"):
        engines_from_plan(PD_PLAN, LaunchSettings(engine="vllm", model="m", kv_base_port=65534))


def test_a_plan_file_takes_overrides_of_its_settings(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(plan_command("llama-3-8b", "2xH100", "2s", "50ms", as_json=True))
    config = load_launch_config(path, overrides={"base_port": 18500, "log_dir": tmp_path / "l"})
    s = config.settings
    assert (s.model, s.sim_gpu, s.base_port, s.log_dir) == (
        "Llama-3-8B", "H100", 18500, tmp_path / "l",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="base_port: must be a port"):
        load_launch_config(path, overrides={"base_port": 0})
    with pytest.raises(ConfigError, match=r"^overrides: not LaunchSettings fields: bogus, gpu$"):
        load_launch_config(path, overrides={"gpu": "H100", "bogus": 1})
    given = LaunchSettings(model="llama-3-8b", sim_gpu="H100", base_port=18700)
    both = load_launch_config(path, given, overrides={"base_port": 18600}).settings
    assert (both.base_port, both.sim_gpu) == (18600, "H100")  # the overrides win
    toml = write(tmp_path, "[launch]\n[[launch.instances]]\n")
    with pytest.raises(ConfigError, match="overrides apply to a plan file") as info:
        load_launch_config(toml, overrides={"base_port": 18600})
    assert info.value.location == str(toml)


def test_a_plan_file_json_refuses_to_read_is_a_located_error(tmp_path: Path) -> None:
    """A number of more digits than Python's JSON reader takes: said, not a traceback."""
    path = tmp_path / "plan.json"
    path.write_text('{"instances": [], "n": ' + "1" * 5000 + "}")
    with pytest.raises(ConfigError, match=": cannot read plan: Exceeds the limit") as info:
        load_launch_config(path)
    assert info.value.location == str(path)


def test_simulated_settings_of_another_model_than_the_plans_are_refused(tmp_path: Path) -> None:
    """A plan's shapes were chosen for its model and GPU: settings simulating another (the
    LaunchSettings defaults among them) had started Llama-3-8B engines for a 70B plan."""
    path = tmp_path / "plan.json"
    path.write_text(plan_command("llama-3-70b", "8xH100", "2s", "50ms", as_json=True))
    with pytest.raises(ConfigError, match="the plan is for the model 'Llama-3-70B'") as info:
        load_launch_config(path, LaunchSettings(base_port=18820))
    assert str(path) in str(info.value)
    with pytest.raises(ConfigError, match="the plan is for the GPU 'H100'"):
        load_launch_config(path, LaunchSettings(model="llama-3-70b", sim_gpu="a100"))
    same = load_launch_config(path, LaunchSettings(model="llama-3-70b", base_port=18820))
    assert same.settings.base_port == 18820
    vllm = LaunchSettings(engine="vllm", model="/models/llama-3-70b", base_port=18820)
    assert load_launch_config(path, vllm).settings.model == "/models/llama-3-70b"  # a path


def test_a_launch_file_whose_node_could_never_serve_is_a_located_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[launch]\nbase_port = 23100\n"
        '[[launch.instances]]\nrole = "prefill"\ngpu_ids = [0]\n'
        '[[launch.instances]]\nrole = "decode"\ngpu_ids = [1]\nnode = 1\n',
    )
    with pytest.raises(ConfigError) as info:
        load_launch_config(path)
    assert str(info.value) == (
        f"{path}:3: launch.instances: node 0 would start only 1 prefill instance: model "
        "'llama-3-8b' has no decode-capable instance to pair with, so its gateway could never "
        "serve a request"
    )
    path.write_text(path.read_text().replace("node = 1", "node = 0"))
    assert len(load_launch_config(path).instances) == 2


def test_fleet_problem_counts_the_instances_already_serving_the_model() -> None:
    prefill_only = engines_from_plan(PD_PLAN[:1], LaunchSettings(model="m"))
    assert fleet_problem(prefill_only) == (
        "node 0 would start only 1 prefill instance: model 'm' has no decode-capable instance "
        "to pair with, so its gateway could never serve a request"
    )
    assert fleet_problem(prefill_only, others=[("elsewhere", DECODE)]) is None
    pd = engines_from_plan(PD_PLAN, LaunchSettings(model="m"))
    assert fleet_problem(pd) is None
    assert "PD disaggregation is disabled" in (fleet_problem(pd, pd_enabled=False) or "")
    general = engines_from_plan(PD_PLAN, LaunchSettings(model="m", node=1))
    assert fleet_problem(general, pd_enabled=False) is None
    assert fleet_problem([]) is None  # a node with no engine of the plan starts none


def test_a_plan_file_split_by_role_across_nodes_is_refused_for_each_node(tmp_path: Path) -> None:
    path = tmp_path / "split.json"
    instances = [
        {"role": role, "gpu_ids": [0], "node": node}
        for node, role in ((0, "prefilling"), (1, "decoding"))
    ]
    path.write_text(json.dumps({"model": "llama-3-8b", "gpu": "L40S", "instances": instances}))
    with pytest.raises(ConfigError, match=rf"^{path}: node 0 would start only 1 prefill "):
        load_launch_config(path)
    with pytest.raises(ConfigError, match=r"node 1 would start only 1 decode instance: .* no pre"):
        load_launch_config(path, overrides={"node": 1})
    with pytest.raises(ConfigError, match=rf"^{path}: node: the plan has no instance on node 2 "):
        load_launch_config(path, overrides={"node": 2})


def test_a_multi_node_pd_plan_launches_a_servable_fleet_on_each_node(tmp_path: Path) -> None:
    path = tmp_path / "pd2node.json"
    text = plan_command(
        "llama-3-8b", "2x4xL40S", "1.5s", "60ms", prompt_len=2000, output_len=150, as_json=True
    )
    path.write_text(text)
    assert json.loads(path.read_text())["plan"].startswith("PD ")
    for node in (0, 1):
        config = load_launch_config(path, overrides={"node": node})
        roles = {e.role for e in engines_from_plan(config.instances, config.settings)}
        assert roles == {PREFILL, DECODE}


def test_the_launch_gpu_must_be_the_gpu_the_plan_is_for(tmp_path: Path) -> None:
    plan = '[launch.plan]\ngpus = "2xH100"\nslo_ttft = "2s"\nslo_tpot = "50ms"\n'
    path = write(tmp_path, f'[launch]\nmodel = "llama-3-8b"\ngpu = "l40s"\n{plan}')
    with pytest.raises(ConfigError) as info:
        load_launch_config(path)
    assert str(info.value) == f"{path}:3: launch.gpu: 'l40s' conflicts with launch.plan.gpus (H100)"
    path.write_text(f'[launch]\nmodel = "nosuch"\ngpu = "l40s"\n{plan}')  # reported together
    with pytest.raises(ConfigErrors) as many:
        load_launch_config(path)
    assert [f"{e.location}: {e.key}" for e in many.value.errors] == [
        f"{path}:2: launch.model", f"{path}:3: launch.gpu",
    ]  # fmt: skip
    path.write_text(f'[launch]\ngpu = "h100"\n{plan}')
    assert load_launch_config(path).settings.sim_gpu == "h100"
    path.write_text(f"[launch]\n{plan.replace('2xH100', '2xL40S')}")  # no gpu: the plan's
    assert load_launch_config(path).settings.sim_gpu == "L40S"
    (tmp_path / "plan.json").write_text(plan_command("llama-3-8b", "2xH100", as_json=True))
    path.write_text('[launch]\ngpu = "a100"\nplan_file = "plan.json"\n')
    with pytest.raises(ConfigError, match=r":2: launch\.gpu: 'a100' conflicts with plan\.json's"):
        load_launch_config(path)


def test_simulated_engines_need_a_known_model_and_gpu_at_config_time(tmp_path: Path) -> None:
    path = write(tmp_path, '[launch]\nmodel = "gpt-4"\ngpu = "tpu"\n[[launch.instances]]\n')
    with pytest.raises(ConfigErrors) as info:
        load_launch_config(path)
    assert [str(e).split(";")[0] for e in info.value.errors] == [
        f"{path}:2: launch.model: unknown model 'gpt-4'",
        f"{path}:3: launch.gpu: unknown GPU 'tpu'",
    ]
    path.write_text('[launch]\nmodel = "gpt-4"\nsim_model = "nope"\n[[launch.instances]]\n')
    with pytest.raises(ConfigError, match=r":3: launch\.sim_model: unknown model 'nope'"):
        load_launch_config(path)
    path.write_text('[launch]\nengine = "vllm"\nmodel = "org/any-model"\n[[launch.instances]]\n')
    assert load_launch_config(path).settings.model == "org/any-model"  # vLLM loads it
    # a plan of it needs a built-in shape: the message says which key gives it
    path.write_text('[launch]\nengine = "vllm"\nmodel = "org/any-model"\n[launch.plan]\ngpus = 2\n')
    with pytest.raises(ConfigError, match=r":3: launch\.model: unknown model .* set sim_model to"):
        load_launch_config(path)


def test_nixl_side_channel_ports_may_not_overlap_the_engines_ports(tmp_path: Path) -> None:
    body = (
        '[launch]\nengine = "vllm"\nmodel = "m"\nbase_port = 23320\nkv_base_port = {kv}\n'
        '[[launch.instances]]\nrole = "prefill"\ntp = 2\ngpu_ids = [0, 1]\n'
        '[[launch.instances]]\nrole = "decode"\ntp = 2\ngpu_ids = [2, 3]\n'
    )
    with pytest.raises(ConfigError, match=r"side-channel ports 23321-23324 overlap the engines' "
                       r"HTTP ports 23320-23321 \(port 23321\)"):  # fmt: skip
        load_launch_config(write(tmp_path, body.format(kv=23321)))
    config = load_launch_config(write(tmp_path, body.format(kv=5600)))
    engines = engines_from_plan(config.instances, config.settings)
    assert [list(e.side_channel_ports) for e in engines] == [[5600, 5601], [5602, 5603]]
    # a pipeline-parallel PD instance is reported beside the overlap, not hidden behind it
    staged = body.replace("tp = 2\ngpu_ids = [2, 3]", "pp = 2\ngpu_ids = [2, 3]")
    problems = _problems(write(tmp_path, staged.format(kv=23321)))
    assert len(problems) == 2, problems
    assert "overlap the engines' HTTP ports" in problems[0]
    assert problems[1].endswith("launch.instances[1].pp: a decode instance runs with pp = 1: "
                                "pipeline parallelism is not among what vLLM's NixlConnector "
                                "supports")  # fmt: skip


def test_a_pipeline_parallel_pd_engine_has_a_side_channel_port_per_gpu_rank() -> None:
    """tp=1, pp=2: two ranks, so two NIXL ports each, the next instance's after them."""
    plan = [
        PlannedInstance(PREFILL, 1, 2, 1, (0, 1)),
        PlannedInstance(DECODE, 1, 2, 1, (2, 3)),
    ]
    engines = engines_from_plan(plan, LaunchSettings(engine="vllm", kv_base_port=5600))
    assert [e.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for e in engines] == ["5600", "5602"]
    assert [list(e.side_channel_ports) for e in engines] == [[5600, 5601], [5602, 5603]]


def test_a_plan_tables_problems_are_reported_beside_the_launch_tables(tmp_path: Path) -> None:
    body = '[launch]\nbase_port = "x"\n[launch.plan]\ngpus = "8xH100"\nslo_ttft = 2\n'
    with pytest.raises(ConfigErrors) as info:
        load_launch_config(write(tmp_path, body))
    assert [e.key for e in info.value.errors] == ["launch.base_port", "launch.plan.slo_ttft"]


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_launch_config(path)
    return [str(e) for e in info.value.each()]


@pytest.mark.parametrize(
    ("share", "starts"),
    [
        ('"--gpu-memory-utilization", "0.95"', True),
        ('"--gpu-memory-utilization=0.92"', False),
        ('"--num-gpu-blocks-override", "1000"', True),  # its KV size given: no share
        ('"--gpu-memory-utilization", "1.5"', True),  # the engine refuses that itself
        ('"--gpu-memory-utilization", "lots"', True),  # so too a share that is no number
    ],
)
def test_the_memory_share_the_engines_are_given_is_the_one_checked(
    tmp_path: Path, share: str, starts: bool
) -> None:
    """Llama-3-70B on one H200 needs a share of 0.94: the engines' own
    --gpu-memory-utilization, not vLLM's default 0.9, says whether it starts."""
    path = write(
        tmp_path,
        f'[launch]\nengine = "sim"\nmodel = "llama-3-70b"\ngpu = "h200"\n'
        f"extra_args = [{share}]\n[[launch.instances]]\ntp = 1\n",
    )
    if starts:
        load_launch_config(path)
        return
    assert _problems(path) == [
        f"{path}:7: launch.instances[0].tp: its simulated engine cannot start: 0.92 of each "
        "H200's 141 GiB is 129.7 GiB, but Llama-3-70B on 1 × H200 needs 131.4 GiB per GPU "
        "(its weights and one KV block), a share of at least 0.94"
    ]


def test_what_would_stop_an_engine_once_started_is_said_before(tmp_path: Path) -> None:
    sim = write(
        tmp_path,
        '[launch]\nengine = "sim"\nmodel = "llama-3-70b"\ngpu = "l40s"\n'
        "[[launch.instances]]\ntp = 1\n[[launch.instances]]\ntp = 8\n",
    )
    assert _problems(sim) == [
        f"{sim}:6: launch.instances[0].tp: its simulated engine cannot start: Llama-3-70B "
        "does not fit on 1 × L40S (weights 131.4 GiB)"
    ]
    topo = (
        Path(__file__).parent.parent / "fixtures" / "topology" / "a100-pcie-4gpu-nv12-pair-mlx5.txt"
    )
    vllm = write(
        tmp_path,
        f'[launch]\nengine = "vllm"\nmodel = "m"\ntopology_file = "{topo}"\n'
        '[[launch.instances]]\nrole = "prefill"\ntp = 2\npp = 2\ngpu_ids = [0, 1, 2, 3]\n'
        '[[launch.instances]]\nrole = "decode"\ntp = 2\ngpu_ids = [6, 7]\n',
    )
    assert _problems(vllm) == [
        f"{vllm}:8: launch.instances[0].pp: a prefill instance runs with pp = 1: pipeline "
        "parallelism is not among what vLLM's NixlConnector supports",
        f"{vllm}:13: launch.instances[1].gpu_ids: GPU(s) 6, 7 are not in topology_file "
        "(its GPUs: 0, 1, 2, 3)",
    ]


def test_ep_is_1_or_tp_and_hosts_are_not_empty(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[launch]\nhost = " "\nadvertise_host = ""\n[[launch.instances]]\ntp = 2\nep = 4\n',
    )
    assert _problems(path) == [
        f"{path}:2: launch.host: must not be empty",
        f"{path}:3: launch.advertise_host: must not be empty",
        f"{path}:6: launch.instances[0].ep: must be 1 or tp (2), got 4: vLLM's expert "
        "parallelism spans the instance's tensor-parallel group (EP = TP)",
    ]
    with pytest.raises(ConfigError, match="host: must not be empty"):
        LaunchSettings(host="")


def test_instances_without_gpu_ids_take_the_lowest_free_ones() -> None:
    got = planned_instances_from_dicts([{"tp": 2}, {"gpu_ids": [4]}, {"tp": 2}, {"node": 1}])
    assert [(i.gpu_ids, i.node) for i in got] == [((0, 1), 0), ((4,), 0), ((2, 3), 0), ((0,), 1)]
    # GPUs a later instance lists are not given to an earlier one
    got = planned_instances_from_dicts([{"tp": 2}, {"tp": 2, "gpu_ids": [0, 1]}])
    assert [i.gpu_ids for i in got] == [(2, 3), (0, 1)]


def test_a_topology_file_without_gpus_is_refused(tmp_path: Path) -> None:
    (tmp_path / "topo.json").write_text('{"gpus": [], "nics": []}')
    path = write(tmp_path, '[launch]\ntopology_file = "topo.json"\n[[launch.instances]]\n')
    assert _problems(path) == [f"{path}:2: launch.topology_file: topo.json lists no GPUs"]


def _line_with(path: Path, needle: str) -> int:
    return next(n for n, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_a_plan_files_problems_are_located_at_their_lines(tmp_path: Path) -> None:
    tp_0, tpu = '"tp": 0', '"TPU"'
    text = plan_command("llama-3-8b", "2xH100", as_json=True)
    data = json.loads(text)
    data["instances"][1]["tp"] = 0
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(data, indent=2))
    with pytest.raises(ConfigError) as info:
        load_plan_file(path)
    assert (info.value.location, info.value.key) == (
        f"{path}:{_line_with(path, tp_0)}",
        "instances[1].tp",
    )
    data["instances"][1]["tp"] = 1
    path.write_text(json.dumps({**data, "gpu": "TPU"}, indent=2))
    with pytest.raises(ConfigError) as info:
        load_launch_config(path)
    assert (info.value.location, info.value.key) == (f"{path}:{_line_with(path, tpu)}", "gpu")
    # a launch file's plan_file: the plan's own location is in the message
    launch = write(tmp_path, '[launch]\nplan_file = "plan.json"\n')
    path.write_text(json.dumps(data | {"instances": [{"tp": "x"}]}, indent=2))
    bad = _line_with(path, '"x"')
    assert _problems(launch) == [
        f"{launch}:2: launch.plan_file: {path}:{bad}: instances[0].tp: must be an integer, "
        "got string 'x'"
    ]


def test_a_launch_files_plan_file_gives_its_model_to_simulated_engines(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text(plan_command("llama-3-70b", "8xH100", as_json=True))
    path = write(tmp_path, '[launch]\nengine = "sim"\nplan_file = "plan.json"\n')
    config = load_launch_config(path)  # no model: the plan's, under the name it was planned
    assert (config.settings.model, config.settings.name) == ("Llama-3-70B", "llama-3-70b")
    engines = engines_from_plan(config.instances, config.settings)
    argv = list(engines[0].argv)
    assert argv[argv.index("--model") + 1] == "Llama-3-70B"
    for key in ("model", "sim_model"):  # another model is a conflict, not silently used
        path = write(tmp_path, f'[launch]\n{key} = "llama-3-8b"\nplan_file = "plan.json"\n')
        assert _problems(path) == [
            f"{path}:2: launch.{key}: 'llama-3-8b' conflicts with plan.json's model (Llama-3-70B)"
        ]


def test_a_plan_files_simulated_shapes_are_checked_before_any_engine_starts(
    tmp_path: Path,
) -> None:
    data = json.loads(plan_command("llama-3-8b", "4xH100", as_json=True))
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**data, "model": "Llama-3-70B"}, indent=2))
    tp_line = _line_with(path, '"tp"')
    assert _problems(path) == [  # once for the four instances of one shape
        f"{path}:{tp_line}: instances[0].tp: its simulated engine cannot start: Llama-3-70B "
        "does not fit on 1 × H100 (weights 131.4 GiB)"
    ]


def test_simulated_engines_are_given_the_extra_args() -> None:
    settings = LaunchSettings(extra_args=("--gpu-memory-utilization", "0.8"))
    (engine,) = engines_from_plan([PlannedInstance(GENERAL, 1, 1, 1, (0,))], settings)
    assert engine.argv[-2:] == ("--gpu-memory-utilization", "0.8")


def test_only_pd_engines_get_a_nixl_side_channel_and_the_planned_gpus() -> None:
    settings = LaunchSettings(engine="vllm", model="m")
    plan = [PlannedInstance(GENERAL, 1, 1, 1, (0,)), *PD_PLAN[:2]]
    engines = engines_from_plan(plan, settings)
    assert [dict(e.env) for e in engines] == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "0,1", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5600"},
        {"CUDA_VISIBLE_DEVICES": "2", "VLLM_NIXL_SIDE_CHANNEL_PORT": "5602"},
    ]
    assert [len(e.side_channel_ports) for e in engines] == [0, 2, 1]


def test_a_plan_file_is_checked_against_the_launch_file_once_per_problem(tmp_path: Path) -> None:
    """A launch file's ``plan_file``: a name the launch file gives that is unknown is said
    at its key (not also as a conflict); a plan without a model leaves the launch file's;
    a shape the plan's instances share is said once."""
    plan = tmp_path / "plan.json"
    launch = tmp_path / "fleet.toml"

    def problems(plan_data: Mapping[str, object], launch_keys: str) -> list[str]:
        plan.write_text(json.dumps(plan_data))
        launch.write_text(f'[launch]\n{launch_keys}plan_file = "plan.json"\n')
        try:
            load_launch_config(launch)
        except ConfigError as exc:
            return [str(e).removeprefix(f"{launch}:") for e in exc.each()]
        return []

    one = {"instances": [{}], "gpu": "H100"}
    assert problems(one, "") == []  # no model in the plan: the launch file's (its default)
    assert load_launch_config(launch).settings.model == LaunchSettings().model
    with_model = {**one, "model": "llama-3-8b"}
    assert problems(with_model, 'model = "zzz"\n') == [
        "2: launch.model: unknown model 'zzz'; built-in models: Llama-2-7B, Llama-2-13B, "
        "Llama-2-70B, Llama-3-8B, Llama-3-70B, Llama-3.1-8B, Llama-3.1-70B, Qwen2.5-7B, "
        "Qwen2.5-72B, Mixtral-8x7B, tiny"
    ]
    other_gpu = {**with_model, "gpu": "FOO9"}
    said = problems(other_gpu, 'gpu = "foo9"\n')  # unknown, but the plan's own name
    assert said == ["2: launch.gpu: unknown GPU 'foo9'; built-in GPUs: H100, H200, A100-80G, "
                    "L40S, cpu"]  # fmt: skip
    assert problems(other_gpu, 'gpu = "bar"\n')[1:] == [
        "2: launch.gpu: 'bar' conflicts with plan.json's gpu (FOO9)"
    ]
    two = {"instances": [{"tp": 1}, {"tp": 1}], "model": "llama-3-70b", "gpu": "H100"}
    assert problems(two, "") == [
        "2: launch.plan_file: instances[0].tp: its simulated engine cannot start: Llama-3-70B "
        "does not fit on 1 × H100 (weights 131.4 GiB)"
    ]
