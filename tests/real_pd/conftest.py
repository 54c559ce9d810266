"""The real-vLLM PD tier (``make test-real-pd``): skipped unless ``SAGE_LLM_REAL_PD=1``.

Besides the vLLM venv and the tiny model of the real tier (``scripts/setup-real-vllm.sh``)
it needs NIXL, which ``scripts/setup-real-vllm.sh --nixl`` installs into
``.cache/real-vllm/nixl`` (``SAGE_LLM_REAL_NIXL`` points elsewhere); every test here is
skipped, with the reason, when the switch is off or any of them is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sage_llm.bench.fidelity_real import real_vllm_missing, real_vllm_paths
from tests.real.conftest import skip_tier

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def nixl_dir() -> Path:
    """The directory NIXL was installed into (``pip install --target``)."""
    cache = Path(os.environ.get("SAGE_LLM_REAL_CACHE") or ROOT / ".cache" / "real-vllm")
    return Path(os.environ.get("SAGE_LLM_REAL_NIXL") or cache / "nixl")


def skip_reason() -> str | None:
    """Why the real PD tier cannot run here, or None when it can."""
    if os.environ.get("SAGE_LLM_REAL_PD") != "1":
        return "real-vLLM PD tier: set SAGE_LLM_REAL_PD=1 (make test-real-pd) to run it"
    python, model = real_vllm_paths(ROOT)
    missing = real_vllm_missing(python, model)
    if missing:
        return f"real-vLLM PD tier: {missing}"
    if not (nixl_dir() / ".sage-llm-ready").is_file():
        return f"real-vLLM PD tier: no NIXL at {nixl_dir()}; run scripts/setup-real-vllm.sh --nixl"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_tier(items, HERE, skip_reason())
