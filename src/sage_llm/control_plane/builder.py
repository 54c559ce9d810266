"""Build a ready-to-start ControlPlaneManager from a :class:`~sage_llm.config.SageConfig`.

Used by ``sage-llm serve`` and the SAGE services, so both read one config model. When the
config names no instances, the embedded default fleet of simulated engines is registered
(``[simulation]``), and :func:`uses_embedded_fleet` says so.
"""

from __future__ import annotations

import logging
from typing import Any

from sage_llm.config import SageConfig
from sage_llm.config_schema import INERT_NOTE
from sage_llm.control_plane.health import HealthSettings
from sage_llm.control_plane.manager import ControlPlaneManager, EngineFactory
from sage_llm.engines.http import HTTPTimeouts

log = logging.getLogger("sage_llm.builder")


def uses_embedded_fleet(config: SageConfig) -> bool:
    """True when the config has no instances and the simulated default fleet stands in."""
    return not config.control_plane.instances


def build_manager(
    config: SageConfig,
    *,
    engine_factory: EngineFactory | None = None,
    register: bool = True,
    **overrides: Any,
) -> ControlPlaneManager:
    """A manager with the configured policy, routing, PD, admission and health settings,
    and every configured instance (or the simulated fleet) registered, unless
    ``register`` is False (the caller registers its own: ``sage-llm launch``). Not
    started."""
    kwargs = config.manager_kwargs()
    if config.admission.max_queue_size is not None:
        kwargs["max_queue_size"] = config.admission.max_queue_size
    kwargs["health_interval_s"] = config.health.interval_s
    health = config.health
    kwargs["health"] = HealthSettings.from_config(
        health, stats_interval_s=float(kwargs.get("stats_interval_s", 1.0))
    )
    kwargs["engine_timeouts"] = HTTPTimeouts(
        connect_s=health.connect_timeout_s,
        first_token_s=health.first_token_timeout_s,
        idle_s=health.idle_timeout_s,
        health_s=health.timeout_s,
    )
    kwargs["max_queue_wait_s"] = config.admission.max_queue_wait_s
    kwargs["reject_infeasible_slo"] = config.admission.reject_infeasible_slo
    if engine_factory is not None:
        kwargs["engine_factory"] = engine_factory
    kwargs.update(overrides)
    manager = ControlPlaneManager(**kwargs)
    for key in config.inert_settings():
        log.warning("%s: %s", key, INERT_NOTE)
    if not register:
        return manager
    for instance in config.execution_instances():
        manager.register_instance(instance)
    if uses_embedded_fleet(config):
        sim = config.simulation
        log.debug(  # serve says so at INFO; a library user sees it with debug logs
            "no instances configured: using the embedded fleet of %d simulated %s engines "
            "serving %s (speed %.1fx)",
            sim.instances,
            sim.gpu,
            sim.model,
            sim.speed,
        )
    return manager
