"""The clocks of ``sage_llm.sim.clock``: the process's real clock and the virtual one."""

from __future__ import annotations

import asyncio
from datetime import datetime
from types import SimpleNamespace

import pytest

from sage_llm.sim import clock as clock_module
from sage_llm.sim.clock import RealClock, VirtualClock, run_virtual


def test_the_real_clock_takes_a_wall_clock_adjustment_within_a_minute(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Timestamps follow the wall clock: an adjustment (NTP) shows from a minute on."""
    mono, adjusted = [1000.0], [0.0]
    fake_time = SimpleNamespace(
        monotonic=lambda: mono[0], time=lambda: 4_999_000.0 + mono[0] + adjusted[0]
    )
    monkeypatch.setattr(clock_module, "time", fake_time)  # the module's own view of time
    real = RealClock()
    assert real.to_datetime(1010.0) == datetime.fromtimestamp(5_000_010.0)
    adjusted[0] = 3600.0  # the wall clock set an hour on
    mono[0] += 30.0
    assert real.to_datetime(1030.0) == datetime.fromtimestamp(5_000_030.0)  # not yet read
    mono[0] += 31.0
    assert real.to_datetime(1061.0) == datetime.fromtimestamp(5_003_661.0)  # read again
    assert real.to_datetime(1062.0) == datetime.fromtimestamp(5_003_662.0)


def test_a_virtual_clock_needs_a_virtual_loop() -> None:
    async def outside() -> None:
        with pytest.raises(TypeError, match="VirtualClock needs a VirtualEventLoop"):
            VirtualClock()

    asyncio.run(outside())

    async def inside() -> float:
        await asyncio.sleep(5.0)
        return VirtualClock().now()

    assert run_virtual(inside()) == 5.0
