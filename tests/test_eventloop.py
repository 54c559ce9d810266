"""Event-loop choice for the long-running commands."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from sage_llm import eventloop


async def _answer() -> int:
    return 42


def test_asyncio_is_always_available() -> None:
    assert eventloop.resolve_loop("asyncio") == "asyncio"
    assert eventloop.run(_answer(), "asyncio") == 42


def test_auto_picks_uvloop_only_when_installed() -> None:
    expected = "uvloop" if eventloop.uvloop_available() else "asyncio"
    assert eventloop.resolve_loop("auto") == expected
    assert eventloop.run(_answer(), "auto") == 42


def test_unknown_loop_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        eventloop.resolve_loop("trio")


def test_uvloop_asked_for_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(eventloop, "uvloop_available", lambda: False)
    with pytest.raises(ValueError, match="not installed"):
        eventloop.resolve_loop("uvloop")
    assert eventloop.resolve_loop("auto") == "asyncio"


@pytest.fixture
def collector_settings() -> Iterator[None]:
    """Restores the collector's thresholds and unfreezes what a test froze."""
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


@pytest.mark.usefixtures("collector_settings")
def test_serving_collector_freezes_start_up_and_raises_the_young_threshold() -> None:
    _, older, oldest = gc.get_threshold()
    eventloop.tune_collector_for_serving()
    assert gc.get_threshold() == (eventloop.SERVING_GC_THRESHOLD, older, oldest)
    assert gc.get_freeze_count() > 0
    eventloop.tune_collector_for_serving(1000)
    assert gc.get_threshold()[0] == 1000
    with pytest.raises(ValueError, match="at least 1"):
        eventloop.tune_collector_for_serving(0)
