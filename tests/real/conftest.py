"""The real-vLLM tier (``make test-real``): skipped unless ``SAGE_LLM_REAL=1``.

It needs the vLLM venv and the tiny model that ``scripts/setup-real-vllm.sh`` builds under
``.cache/real-vllm`` (or where ``SAGE_LLM_REAL_VENV`` / ``SAGE_LLM_REAL_MODEL`` point); every
test here is skipped, with the reason, when the switch is off or either is missing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sage_llm import ControlPlaneManager
from sage_llm.bench.fidelity_real import real_vllm_missing, real_vllm_paths
from sage_llm.gateway import start_gateway
from sage_llm.launch import EngineLaunch, LaunchedFleet, LaunchSettings, launch_engines

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def skip_reason() -> str | None:
    """Why the real tier cannot run here, or None when it can."""
    if os.environ.get("SAGE_LLM_REAL") != "1":
        return "real-vLLM tier: set SAGE_LLM_REAL=1 (make test-real) to run it"
    python, model = real_vllm_paths(ROOT)
    missing = real_vllm_missing(python, model)
    return f"real-vLLM tier: {missing}" if missing else None


def skip_tier(items: list[pytest.Item], here: Path, reason: str | None) -> None:
    """Mark every test collected under ``here`` skipped with ``reason`` (when not None)."""
    if reason is None:
        return
    marker = pytest.mark.skip(reason=reason)
    for item in items:
        if here in Path(str(item.path)).resolve().parents:
            item.add_marker(marker)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_tier(items, HERE, skip_reason())


@contextlib.asynccontextmanager
async def served_fleet(
    manager: ControlPlaneManager,
    engines: Sequence[EngineLaunch],
    settings: LaunchSettings,
    *,
    gateway_port: int = 0,
) -> AsyncIterator[tuple[LaunchedFleet, str]]:
    """``engines`` launched and registered with the running ``manager``, behind a gateway
    on ``gateway_port`` (a free one by default): the fleet and the gateway's base URL;
    everything is stopped on the way out, failed test or not."""
    fleet = await launch_engines(engines, manager=manager, settings=settings)
    async with fleet:
        runner, port = await start_gateway(manager, port=gateway_port)
        try:
            yield fleet, f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()
