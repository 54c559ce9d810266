"""Start the engines of a plan: local processes (``local``) or Ray actors (``ray_backend``).

``plan_to_engines`` turns planned instances into command lines (``vllm serve``, vLLM's
API-server module, ``sage-llm engine-sim``); ``local`` starts them, waits for ``/health``,
registers them with a :class:`~sage_llm.control_plane.manager.ControlPlaneManager` and
stops them cleanly. The Ray backend is imported on demand (``sage_llm.launch.ray_backend``).
"""

from sage_llm.launch.local import (
    EngineProcess,
    LaunchedFleet,
    launch_engines,
    launch_from_config,
    wait_healthy,
)
from sage_llm.launch.plan_to_engines import (
    ENGINE_KINDS,
    KV_TRANSFER_CONFIG,
    EngineLaunch,
    LaunchConfig,
    LaunchSettings,
    engine_sim_argv,
    engines_from_plan,
    fleet_problem,
    load_launch_config,
    load_plan_file,
    planned_instances_from_dicts,
    vllm_argv,
)

__all__ = [
    "ENGINE_KINDS",
    "KV_TRANSFER_CONFIG",
    "EngineLaunch",
    "EngineProcess",
    "LaunchConfig",
    "LaunchSettings",
    "LaunchedFleet",
    "engine_sim_argv",
    "engines_from_plan",
    "fleet_problem",
    "launch_engines",
    "launch_from_config",
    "load_launch_config",
    "load_plan_file",
    "planned_instances_from_dicts",
    "vllm_argv",
    "wait_healthy",
]
