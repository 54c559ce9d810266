"""Command lines for vLLM and engine-sim, engines from plans, plan and launch files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sage_llm.control_plane.parallelism import PlannedInstance, plan_command
from sage_llm.control_plane.topology import InstanceTopology
from sage_llm.errors import ConfigError
from sage_llm.launch import (
    KV_TRANSFER_CONFIG,
    LaunchSettings,
    engine_sim_argv,
    engines_from_plan,
    load_launch_config,
    load_plan_file,
    planned_instances_from_dicts,
    vllm_argv,
)
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


def test_launch_settings_validation() -> None:
    with pytest.raises(ConfigError, match="unknown engine 'tgi'"):
        LaunchSettings(engine="tgi")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="base_port: must be a port"):
        LaunchSettings(base_port=0)
    with pytest.raises(ConfigError, match="health_timeout_s"):
        LaunchSettings(health_timeout_s=0)
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
        ({"role": "boss"}, r"instances\[0\].role: invalid instance_type"),
        ({"tp": 0}, r"instances\[0\].tp: must be an integer >= 1"),
        ({"gpu_ids": [-1]}, "GPU indices must be integers >= 0"),
        ({"gpus": [0]}, "unknown key"),
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
    assert data["plan"] == "2 × TP4"
    assert [(i.role, i.tp, i.gpu_ids) for i in instances] == [
        (GENERAL, 4, (0, 1, 2, 3)), (GENERAL, 4, (4, 5, 6, 7)),
    ]  # fmt: skip
    config = load_launch_config(path)
    assert config.settings.model == "Llama-3-70B" and config.settings.sim_gpu == "H100"
    assert len(config.instances) == 2
    (tmp_path / "bad.json").write_text(json.dumps({"model": "x"}))
    with pytest.raises(ConfigError, match="needs an 'instances' list"):
        load_plan_file(tmp_path / "bad.json")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(text)
    return path


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
            r"launch\.base_port: wrong type str",
        ),
        (
            "[launch]\nbase_port = 70000\n[[launch.instances]]\n",
            r"launch\.base_port: must be a port",
        ),
        ('[launch]\nplan_file = "p.json"\n[[launch.instances]]\n', "exactly one of"),
        ("[launch]\n", "exactly one of"),
        ("[other]\n", "one \\[launch\\] table"),
        ('[launch]\n[launch.plan]\ngpus = "8xH100"\nslo_ttft = "2s"\n', r"launch\.plan\.slo_tpot"),
        ("[launch\n", "cannot read launch file"),
    ],
)
def test_launch_file_errors_name_the_file_and_key(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError, match=message) as info:
        load_launch_config(path)
    assert str(path) in info.value.message
