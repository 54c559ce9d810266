"""The opt-in compiled simulator (``sage_llm.sim.accel``): what it lists, and no stale build."""

from __future__ import annotations

import importlib

import pytest

from sage_llm.sim import accel


def test_every_listed_module_exists_and_imports() -> None:
    for name in accel.MODULES:
        assert accel._source(name).is_file(), name
        importlib.import_module(name)
    assert set(accel.compiled_modules()) <= set(accel.MODULES)


def test_a_compiled_build_is_not_stale() -> None:
    # Pure Python (the default): nothing is compiled, nothing can be stale. With
    # `make sim-accel`, every compiled module must be built from its current source.
    state = accel.status()
    assert state["stale"] == []
    assert set(state["compiled"]) <= set(accel.MODULES)


def test_unknown_command_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert accel.main(["bogus"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sim-accel: unknown command") and err.count("\n") == 1
