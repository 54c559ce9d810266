"""Build simulated engines for registered instances, and latency priors from their model.

An :class:`~sage_llm.types.ExecutionInstance` describes a real deployment; this module maps
it onto the simulator: its ``model_name`` (when the simulator knows it, else
``metadata["sim_model"]`` or Llama-3-8B), ``metadata["sim_gpu"]`` (default H100), its TP/PP
sizes and role, and ``metadata["sim_speed"]`` / ``metadata["sim_seed"]`` /
``metadata["sim_kv_link_gbps"]`` (the PD KV link, GB/s) / ``metadata["sim_max_loras"]``
(the LoRA adapters one batch may hold, vLLM's ``--max-loras``), and its
``engine_scheduling_policy`` (vLLM's ``--scheduling-policy``).

When a fitted profile of a real engine is packaged for the GPU × model
(:func:`fitted_profile`, e.g. ``cpu`` × ``tiny``, see :mod:`sage_llm.bench.fidelity`) and
the instance runs on one device (TP = PP = 1, as the profile was measured), its step model,
engine limits and front end stand in for the roofline defaults.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any

from sage_llm.bench.fidelity import FittedProfile, load_profile
from sage_llm.control_plane.instances import LatencyPriors
from sage_llm.errors import ConfigError, NotFoundError
from sage_llm.sim.clock import Clock
from sage_llm.sim.core import default_max_model_len
from sage_llm.sim.costmodel import FrontEndModel
from sage_llm.sim.engine import KVTransferHub, SimEngine, SimEngineConfig
from sage_llm.sim.specs import get_gpu, get_model
from sage_llm.types import ExecutionInstance, ExecutionInstanceType

log = logging.getLogger("sage_llm.sim.factory")

DEFAULT_SIM_MODEL = "llama-3-8b"
DEFAULT_SIM_GPU = "h100"


def _sim_model(instance: ExecutionInstance) -> str:
    explicit = instance.metadata.get("sim_model")
    if explicit:
        return str(explicit)
    try:
        return get_model(instance.model_name).name
    except ConfigError:
        return DEFAULT_SIM_MODEL


def fitted_profile(gpu: str, model: str, *, tp: int = 1, pp: int = 1) -> FittedProfile | None:
    """The packaged fitted profile of ``gpu`` × ``model`` (names or aliases), or None when
    there is none or the instance is parallel (the profiles are measured on one device)."""
    if tp != 1 or pp != 1:
        return None
    try:
        return load_profile(get_gpu(gpu).name, get_model(model).name)
    except (ConfigError, NotFoundError):
        return None


def _profile_for(instance: ExecutionInstance) -> FittedProfile | None:
    md = instance.metadata
    return fitted_profile(
        str(md.get("sim_gpu", DEFAULT_SIM_GPU)),
        _sim_model(instance),
        tp=instance.tensor_parallel_size,
        pp=instance.pipeline_parallel_size,
    )


UNCHUNKED_MIN_BATCHED_TOKENS = 8192
"""vLLM's least default token budget of a step without chunked prefill."""


def engine_settings(
    gpu: str, model: str, **params: Any
) -> tuple[SimEngineConfig, FrontEndModel | None]:
    """The settings of one simulated engine of ``model`` on ``gpu`` (``params`` are other
    :class:`SimEngineConfig` fields and win): from the packaged fitted profile when there is
    one for this GPU × model on one device, with its front end; else the roofline defaults
    and no front end. A profile's KV cache is the measured engine's count of blocks:
    ``gpu_memory_utilization`` does not change it (a warning is logged), ``num_gpu_blocks``
    does."""
    tp, pp = int(params.get("tp", 1)), int(params.get("pp", 1))
    if params.get("enable_chunked_prefill") is False and "max_num_batched_tokens" not in params:
        # as vLLM: without chunked prefill a step holds a whole prompt, so its default
        # budget is the context (at least its usual 8192)
        length = params.get("max_model_len") or default_max_model_len(model)
        params["max_num_batched_tokens"] = max(int(length), UNCHUNKED_MIN_BATCHED_TOKENS)
    profile = fitted_profile(gpu, model, tp=tp, pp=pp)
    if profile is None:
        return SimEngineConfig(model=model, gpu=gpu, **params), None
    front = None if profile.front_end.is_zero else profile.front_end
    config = profile.sim_config(**params)
    if "gpu_memory_utilization" in params and "num_gpu_blocks" not in params:
        # the profile's KV cache is the measured engine's blocks, not a share of memory
        log.warning(
            "gpu_memory_utilization %g is not applied: the fitted %s × %s profile fixes the "
            "KV cache at %d blocks of %d tokens (vLLM's CPU build ignores "
            "gpu_memory_utilization too); num_gpu_blocks (engine-sim: "
            "--num-gpu-blocks-override) sets it",
            params["gpu_memory_utilization"], profile.gpu, profile.model,
            config.num_gpu_blocks, config.block_size,
        )  # fmt: skip
    return config, front


def sim_front_end_for(instance: ExecutionInstance) -> FrontEndModel | None:
    """The front end of ``instance``'s fitted profile, or None without one."""
    profile = _profile_for(instance)
    if profile is None or profile.front_end.is_zero:
        return None
    return profile.front_end


def sim_config_for(instance: ExecutionInstance, **overrides: Any) -> SimEngineConfig:
    """The simulator settings that stand in for ``instance`` (a fitted profile's step model
    and engine limits when one is packaged for its GPU × model)."""
    md = instance.metadata
    role = ExecutionInstanceType.parse(instance.instance_type)  # "PREFILLING" as registered
    if role is ExecutionInstanceType.HYBRID:
        role = ExecutionInstanceType.GENERAL
    seed = md.get("sim_seed")
    params: dict[str, Any] = {
        "model": _sim_model(instance),
        "gpu": str(md.get("sim_gpu", DEFAULT_SIM_GPU)),
        "tp": instance.tensor_parallel_size,
        "pp": instance.pipeline_parallel_size,
        "role": role,
        "speed": float(md.get("sim_speed", 1.0)),
        "seed": int(seed) if seed is not None else zlib.crc32(instance.instance_id.encode()),
        "kv_host": instance.host,
        "kv_port": instance.port,
        "scheduling_policy": instance.engine_scheduling_policy,
    }
    link = md.get("sim_kv_link_gbps")
    if link is not None:
        params["kv_link_gbps"] = float(link)
    max_loras = md.get("sim_max_loras")
    if max_loras is not None:
        params["max_loras"] = int(max_loras)
    params.update(overrides)
    profile = _profile_for(instance)
    if profile is not None:
        return profile.sim_config(**params)
    return SimEngineConfig(**params)


def make_sim_engine(
    instance: ExecutionInstance,
    *,
    clock: Clock | None = None,
    kv_hub: KVTransferHub | None = None,
    **overrides: Any,
) -> SimEngine:
    """An in-process simulated engine for ``instance`` (behind its fitted profile's front
    end, when it has one)."""
    return SimEngine(
        instance.instance_id,
        sim_config_for(instance, **overrides),
        clock=clock,
        kv_hub=kv_hub,
        front_end=sim_front_end_for(instance),
        lora_adapters=instance.lora_adapters,
    )


def sim_latency_priors(client: object) -> LatencyPriors | None:
    """Latency priors computed from a simulated engine's cost model (None for others); the
    front end's intake and output processing of one request add to the TTFT base."""
    if not isinstance(client, SimEngine):
        inner = getattr(client, "inner", None)
        if not isinstance(inner, SimEngine):
            return None
        client = inner
    cost = client.core.cost_model
    speed = client.speed
    front = client.front_end
    base = cost.step_time([(1, 0)], []) / speed
    prompt = 2048
    prefill_s = cost.step_time([(prompt, 0)], []) / speed
    tpot = cost.step_time([], [1024] * 8) / speed
    return LatencyPriors(
        ttft_base_s=base + front.intake_s + front.per_output_s,
        prefill_tokens_per_s=prompt / max(prefill_s - base, 1e-9),
        tpot_s=tpot,
    )
