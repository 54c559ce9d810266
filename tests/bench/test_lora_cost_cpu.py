"""Tests for ``benchmarks/lora_cost_cpu.py`` without the real engine: it says what is
missing before it starts anything."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from tests.factories import load_benchmark, usage_error


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_benchmark("lora_cost_cpu")


def test_without_the_vllm_venv_it_says_how_to_get_it(
    script: ModuleType,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SAGE_LLM_REAL_CACHE", str(tmp_path / "none"))
    assert "run scripts/setup-real-vllm.sh" in usage_error(script.main, [], capsys)


def test_bad_counts_are_refused(script: ModuleType) -> None:
    with pytest.raises(SystemExit):
        script.main(["--requests", "1"])
