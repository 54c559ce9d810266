"""Simulated engines for instances and for engine-sim: packaged fitted profiles win over the
roofline defaults when one exists for the GPU × model."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from sage_llm.bench.fidelity import load_profile
from sage_llm.errors import ConfigError
from sage_llm.sim.costmodel import LinearStepModel, RooflineCostModel
from sage_llm.sim.factory import (
    engine_settings,
    fitted_profile,
    make_sim_engine,
    sim_config_for,
    sim_front_end_for,
    sim_latency_priors,
)
from sage_llm.types import ExecutionInstance, ExecutionInstanceType
from tests.factories import make_instance


def instance(gpu: str, model: str) -> ExecutionInstance:
    return make_instance(
        "i0", port=8100, model_name=model, metadata={"sim_gpu": gpu, "sim_model": model}
    )


def test_fitted_profile_is_found_by_alias_and_only_for_one_device() -> None:
    profile = fitted_profile("CPU", "tiny")
    assert profile is not None and (profile.gpu, profile.model) == ("cpu", "tiny")
    assert fitted_profile("cpu", "tiny", tp=2) is None
    assert fitted_profile("h100", "llama-3-8b") is None
    assert fitted_profile("no-such-gpu", "tiny") is None


def test_engine_settings_use_the_fitted_profile_and_its_front_end() -> None:
    packaged = load_profile("cpu", "tiny")
    config, front = engine_settings("cpu", "tiny", seed=3, kv_port=9000)
    assert config.cost_model == packaged.cost_model()
    assert config.max_num_seqs == packaged.shape.max_num_seqs
    assert config.num_gpu_blocks == packaged.shape.num_gpu_blocks
    assert (config.seed, config.kv_port) == (3, 9000)
    assert front == (None if packaged.front_end.is_zero else packaged.front_end)
    config, _ = engine_settings("cpu", "tiny", max_num_seqs=4)
    assert config.max_num_seqs == 4  # explicit settings win


def test_engine_settings_say_a_profile_fixes_the_kv_cache_whatever_the_memory_share(
    caplog: pytest.LogCaptureFixture,
) -> None:
    packaged = load_profile("cpu", "tiny")
    with caplog.at_level(logging.WARNING, logger="sage_llm.sim.factory"):
        config, _ = engine_settings("cpu", "tiny", gpu_memory_utilization=0.5)
    assert config.num_gpu_blocks == packaged.shape.num_gpu_blocks  # the measured engine's
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(
        "gpu_memory_utilization 0.5 is not applied: the fitted cpu × tiny profile fixes the "
        f"KV cache at {packaged.shape.num_gpu_blocks} blocks"
    )
    assert "--num-gpu-blocks-override" in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sage_llm.sim.factory"):
        config, _ = engine_settings("cpu", "tiny", gpu_memory_utilization=0.5, num_gpu_blocks=3)
        engine_settings("cpu", "tiny")
        engine_settings("h100", "llama-3-8b", gpu_memory_utilization=0.5)  # no profile
    assert config.num_gpu_blocks == 3
    assert not caplog.records


def test_engine_settings_without_a_profile_are_the_roofline_defaults() -> None:
    config, front = engine_settings("h100", "llama-3-8b", tp=2)
    assert front is None
    assert config.cost_model is None
    assert isinstance(config.build_cost_model(), RooflineCostModel)
    assert (config.tp, config.max_num_seqs) == (2, 256)
    config, front = engine_settings("cpu", "tiny", tp=2)
    assert front is None and config.cost_model is None


def test_instances_on_a_profiled_gpu_and_model_get_the_fitted_engine() -> None:
    packaged = load_profile("cpu", "tiny")
    inst = instance("cpu", "tiny")
    config = sim_config_for(inst)
    assert isinstance(config.cost_model, LinearStepModel)
    assert config.cost_model == packaged.cost_model()
    assert config.kv_port == 8100
    engine = make_sim_engine(inst)
    assert engine.front_end == packaged.front_end
    assert sim_front_end_for(inst) == (None if packaged.front_end.is_zero else packaged.front_end)
    priors = sim_latency_priors(engine)
    assert priors is not None
    step = packaged.cost_model().step_time([(1, 0)], [])
    front = packaged.front_end
    assert priors.ttft_base_s == step + front.intake_s + front.per_output_s


def test_other_instances_keep_the_roofline_and_no_front_end() -> None:
    inst = instance("h100", "llama-3-8b")
    assert sim_config_for(inst).cost_model is None
    assert sim_front_end_for(inst) is None
    assert make_sim_engine(inst).front_end.is_zero


def test_an_instances_engine_scheduling_policy_is_its_simulated_engines() -> None:
    inst = instance("h100", "llama-3-8b")
    assert sim_config_for(inst).scheduling_policy == "fcfs"
    inst.engine_scheduling_policy = "priority"
    assert make_sim_engine(inst).config.scheduling_policy == "priority"


def test_an_instances_sim_max_loras_is_its_engines_max_loras() -> None:
    inst = instance("h100", "llama-3-8b")
    assert sim_config_for(inst).max_loras == 1  # vLLM's default
    inst.metadata["sim_max_loras"] = 4
    inst.lora_adapters.append("sql")
    engine = make_sim_engine(inst)
    assert engine.config.max_loras == 4
    assert engine.served_adapters == {"sql"}


def test_engine_settings_refuse_a_tensor_parallel_size_that_splits_no_heads() -> None:
    with pytest.raises(ConfigError, match="32 attention heads") as err:
        engine_settings("h100", "llama-3-8b", tp=3)
    assert err.value.key == "tp"


@pytest.mark.parametrize("tp", ["3", "64"])
def test_engine_sim_refuses_an_impossible_tp_at_start_up(tp: str) -> None:
    argv = [sys.executable, "-m", "sage_llm.cli", "engine-sim", "--port", "18651", "--tp", tp]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: --tp: ") and "32 attention heads" in line
    assert "engine-sim:" not in proc.stdout  # refused before serving


def test_a_role_given_as_a_string_is_read_as_register_instance_reads_it() -> None:
    inst = ExecutionInstance("p0", "h", 8000, "llama-3-8b", instance_type="PREFILLING")  # type: ignore[arg-type]
    engine = make_sim_engine(inst)
    assert engine.config.role is ExecutionInstanceType.PREFILLING


def test_engine_sim_names_the_memory_share_that_leaves_no_room_for_the_model() -> None:
    argv = [sys.executable, "-m", "sage_llm.cli", "engine-sim", "--port", "22001"]
    argv += ["--gpu-memory-utilization", "0.01"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: --gpu-memory-utilization: 0.01 of each H100's 80 GiB")
    assert "engine-sim:" not in proc.stdout  # refused before serving
