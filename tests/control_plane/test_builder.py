"""build_manager: one config model for the gateway and the SAGE services."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest

from sage_llm.config import SageConfig, load_config, parse_config
from sage_llm.control_plane.builder import build_manager, uses_embedded_fleet
from sage_llm.sim.clock import run_virtual
from sage_llm.sim.instant import InstantEngine
from sage_llm.types import ExecutionInstanceType, RequestStatus
from tests.factories import make_metadata

ROOT = Path(__file__).resolve().parents[2]


def test_default_config_builds_the_embedded_simulated_fleet_that_serves() -> None:
    config = SageConfig.default()
    assert uses_embedded_fleet(config)

    async def main() -> None:
        cp = build_manager(config)
        async with cp:
            status = cp.get_status()
            result = await cp.generate(make_metadata("r1", model_name=None, max_tokens=5))
        assert status["registered_instances"] == config.simulation.instances
        # mode http (a real engine registered later is reached over HTTP), every one simulated
        assert status["mode"] == "http"
        assert status["simulated_instances"] == config.simulation.instances
        assert status["scheduling_policy"] == config.control_plane.scheduling_policy
        assert result.status is RequestStatus.COMPLETED
        assert result.completion_tokens == 5

    run_virtual(main())


def test_seed_config_registers_prefill_and_decode_instances() -> None:
    config = load_config(ROOT / "examples" / "configs" / "pd.toml")
    cp = build_manager(config)
    roles = {i.instance_type for i in cp.get_instances()}
    assert ExecutionInstanceType.PREFILLING in roles
    assert ExecutionInstanceType.DECODING in roles
    assert not uses_embedded_fleet(config)


def test_admission_and_health_sections_reach_the_manager() -> None:
    config = parse_config(
        """
[services.llm_control_plane]
type = "ControlPlaneVLLMService"
scheduling_policy = "priority"
routing_strategy = "round_robin"
mode = "simulated"

[[services.llm_control_plane.instances]]
instance_id = "a"
host = "127.0.0.1"
port = 9001
model_name = "llama-3-8b"

[admission]
max_queue_size = 7

[health]
interval_s = 2.5
stall_timeout_s = 12
"""
    )
    cp = build_manager(config)
    assert cp.max_queue_size == 7
    assert cp.health_interval_s == 2.5
    assert cp.health_settings.stall_timeout_s == 12.0
    off = replace(config, health=replace(config.health, stall_timeout_s=0.0))
    assert build_manager(off).health_settings.stall_timeout_s is None  # 0: off
    assert cp.get_status()["routing_strategy"] == "round_robin"
    assert cp.policy.name == "priority"


def test_seed_pd_settings_not_acted_on_are_logged_as_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = parse_config("[services.llm_control_plane.pd]\nenable_pd_tracing = true\n", "pd.toml")
    with caplog.at_level(logging.WARNING, logger="sage_llm.builder"):
        build_manager(cfg)
    assert [r.getMessage() for r in caplog.records] == [
        "pd.toml:2: services.llm_control_plane.pd.enable_pd_tracing: a seed setting this "
        "version accepts but does not act on (see docs/config.md)"
    ]


def test_admission_limits_and_engine_timeouts_reach_the_manager() -> None:
    config = parse_config(
        """
[admission]
max_queue_wait_s = 30
reject_infeasible_slo = true

[health]
interval_s = 4
connect_timeout_s = 2
first_token_timeout_s = 20
idle_timeout_s = 7
timeout_s = 3
"""
    )
    cp = build_manager(config)
    assert cp.max_queue_wait_s == 30.0
    assert cp.reject_infeasible_slo is True
    assert cp.health_interval_s == 4.0
    coded = replace(config, health=replace(config.health, interval_s=6.0))  # built in code
    assert build_manager(coded).health_interval_s == 6.0
    t = cp.engine_timeouts
    assert (t.connect_s, t.first_token_s, t.idle_s, t.health_s) == (2.0, 20.0, 7.0, 3.0)


def test_register_false_leaves_the_instances_to_the_caller() -> None:
    config = load_config(ROOT / "examples" / "configs" / "pd.toml")
    assert build_manager(config, register=False).get_instances() == []
    assert build_manager(SageConfig.default(), register=False).get_instances() == []


def test_engine_factory_and_keyword_overrides_reach_the_manager() -> None:
    config = SageConfig.default()
    cp = build_manager(config, engine_factory=lambda i: InstantEngine(i.instance_id))
    assert cp.get_status()["simulated_instances"] == 0  # the factory makes every client
    fifo = build_manager(config, scheduling_policy="fifo", max_queue_size=3)
    assert fifo.policy.name == "fifo" and fifo.max_queue_size == 3
