"""Event-loop choice for the long-running commands."""

from __future__ import annotations

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
