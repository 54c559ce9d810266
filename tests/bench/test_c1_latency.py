"""Tests for ``benchmarks/c1_latency.py``: a short run over real processes, its summary,
and its argument checks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.factories import load_benchmark, usage_error


@pytest.fixture(scope="module")
def c1() -> ModuleType:
    return load_benchmark("c1_latency")


def test_a_short_run_measures_every_target_in_every_mode(
    c1: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(c1, "LOG_DIR", tmp_path)
    warmups: list[int] = []
    measure = c1.client_process

    async def client(*args: Any, warmup: int, **kwargs: Any) -> Any:
        warmups.append(warmup)
        return await measure(*args, warmup=warmup, **kwargs)

    monkeypatch.setattr(c1, "client_process", client)
    results = asyncio.run(
        c1.run(
            modes=(False, True), rounds=1, requests=5, warmup=2, peers=[], after_c64=False,
            pin=None, baseline=None,
        )
    )  # fmt: skip
    assert set(results) == {(t, s) for t in ("direct", c1.SAGE) for s in (False, True)}
    assert warmups == [2] * 4  # every measured run after the warm-up asked for
    for (_, stream), runs in results.items():
        ((p50, ttft, split),) = runs
        assert p50 > 0
        assert (ttft is not None and 0 < ttft <= p50) if stream else ttft is None
        assert (split is not None and 0.0 <= split <= 1.0) if stream else split is None


def test_the_summary_gives_medians_and_the_latency_added_to_direct(c1: ModuleType) -> None:
    results = {
        ("direct", True): [(1.0, 0.5, 0.0), (3.0, 0.7, 0.1), (2.0, 0.6, 0.0)],
        ("proxy", True): [(2.5, 1.0, 0.5), (2.4, 1.1, 0.2), (9.0, 1.2, 0.9)],
        ("proxy", False): [(1.0, None, None)],
    }
    assert c1.summary(results) == [
        f"{'direct':38s} stream p50 2.000 ms  TTFT 0.600 ms  split 0%",
        f"{'proxy':38s} stream p50 2.500 ms  TTFT 1.100 ms  added 0.500 ms  split 50%",
        f"{'proxy':38s} plain  p50 1.000 ms",  # no direct run in that mode
    ]


def test_a_stream_is_split_when_its_end_came_well_after_its_first_piece(
    c1: ModuleType,
) -> None:
    ends = [0.50e-3, 0.90e-3, 0.65e-3, 1.00e-3]
    firsts = [0.45e-3, 0.55e-3, 0.55e-3, 0.80e-3]  # 0.05, 0.35, 0.10, 0.20 ms
    assert c1.split_share(ends, firsts) == 0.5
    assert c1.split_share([0.5e-3], []) is None  # not streamed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--pin", "0"], "expected ENGINE_CPU,PROXY_CPU"),
        (["--pin", "a,b"], "expected ENGINE_CPU,PROXY_CPU"),
        (["--rounds", "0"], "--rounds and --requests must be >= 1"),
        (["--baseline-src", "/nonexistent"], "no sage_llm package in it"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(
    c1: ModuleType, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in usage_error(c1.main, argv, capsys)
