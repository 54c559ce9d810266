"""Service configurations shared by the service tests."""

from __future__ import annotations

from typing import Any

MODEL = "llama-3-8b"


def sim_fleet(instances: int = 2, bound: int = 4, **service: Any) -> dict[str, Any]:
    """A ControlPlaneVLLMService config: the embedded simulated fleet, no background
    monitoring (so a virtual-time service loop idles instead of jumping through timers)."""
    return {
        "scheduling_policy": "priority",
        "enable_monitoring": False,
        "simulation": {"instances": instances, "max_concurrent_requests": bound},
        **service,
    }
