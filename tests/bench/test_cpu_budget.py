"""Tests for ``benchmarks/cpu_budget.py``: the ``--split N`` target (N gateway processes
sharing the client's requests) measured end to end over real processes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest

from sage_llm.bench.procs import start_engine_sims
from tests.factories import load_benchmark


@pytest.fixture(scope="module")
def budget() -> ModuleType:
    return load_benchmark("cpu_budget")


MEASURED = 400
"""Requests measured in the split target's run: about 60 ms of gateway CPU, so that the
CPU read in 10 ms clock ticks is not 0 (40 requests were, on a fast machine)."""


def test_split_target_spreads_requests_over_its_processes(
    budget: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget, "LOG_DIR", tmp_path)

    async def main() -> tuple[dict[str, Any], Any, list[int]]:
        async with await start_engine_sims(2, speed=1000.0, log_dir=tmp_path) as fleet:
            async with budget._split(fleet.urls, 1) as none:
                assert none == {}
            async with budget._split(fleet.urls, 2) as several:
                ((name, target),) = several.items()
                row = await budget.measure_one(
                    name, target, stream=False, engine_pgids=[e.pid for e in fleet.engines],
                    concurrency=4, requests=MEASURED,
                )  # fmt: skip
                served = [await _completed(url) for url in target.urls]
            return several, row, served

    several, row, served = asyncio.run(main())
    assert list(several) == [budget.split_name(2)]
    assert row.target == budget.split_name(2) and row.errors == 0 and row.requests == MEASURED
    # both processes' CPU, read in clock ticks (10 ms): enough requests to take some
    assert row.proxy_ms is not None and row.proxy_ms > 0
    assert row.req_per_s > 0
    # warm-ups (200 + 5 + 5 per URL) and the measured ones, spread over the two gateways
    assert sum(served) == 200 + MEASURED + 2 * 5 * 2
    assert min(served) >= (200 + MEASURED) // 4  # each took a fair share (two slots of four)


async def _completed(url: str) -> int:
    """Requests a gateway reports completed (``/admin/metrics``)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/admin/metrics") as r:
        assert r.status == 200
        body = await r.json()
    return int(body["completed_requests"])
