"""Build simulated engines for registered instances, and latency priors from their model.

An :class:`~sage_llm.types.ExecutionInstance` describes a real deployment; this module maps
it onto the simulator: its ``model_name`` (when the simulator knows it, else
``metadata["sim_model"]`` or Llama-3-8B), ``metadata["sim_gpu"]`` (default H100), its TP/PP
sizes and role, and ``metadata["sim_speed"]`` / ``metadata["sim_seed"]`` /
``metadata["sim_kv_link_gbps"]`` (the PD KV link, GB/s).
"""

from __future__ import annotations

import zlib
from typing import Any

from sage_llm.control_plane.instances import LatencyPriors
from sage_llm.errors import ConfigError
from sage_llm.sim.clock import Clock
from sage_llm.sim.engine import KVTransferHub, SimEngine, SimEngineConfig
from sage_llm.sim.specs import get_model
from sage_llm.types import ExecutionInstance, ExecutionInstanceType

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


def sim_config_for(instance: ExecutionInstance, **overrides: Any) -> SimEngineConfig:
    """The simulator settings that stand in for ``instance``."""
    md = instance.metadata
    role = instance.instance_type
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
    }
    link = md.get("sim_kv_link_gbps")
    if link is not None:
        params["kv_link_gbps"] = float(link)
    params.update(overrides)
    return SimEngineConfig(**params)


def make_sim_engine(
    instance: ExecutionInstance,
    *,
    clock: Clock | None = None,
    kv_hub: KVTransferHub | None = None,
    **overrides: Any,
) -> SimEngine:
    """An in-process simulated engine for ``instance``."""
    return SimEngine(
        instance.instance_id, sim_config_for(instance, **overrides), clock=clock, kv_hub=kv_hub
    )


def sim_latency_priors(client: object) -> LatencyPriors | None:
    """Latency priors computed from a simulated engine's cost model (None for others)."""
    if not isinstance(client, SimEngine):
        inner = getattr(client, "inner", None)
        if not isinstance(inner, SimEngine):
            return None
        client = inner
    cost = client.core.cost_model
    speed = client.speed
    base = cost.step_time([(1, 0)], []) / speed
    prompt = 2048
    prefill_s = cost.step_time([(prompt, 0)], []) / speed
    tpot = cost.step_time([], [1024] * 8) / speed
    return LatencyPriors(
        ttft_base_s=base,
        prefill_tokens_per_s=prompt / max(prefill_s - base, 1e-9),
        tpot_s=tpot,
    )
