"""The dispatcher's helpers (its behaviour is tested through the manager, test_manager.py)."""

from __future__ import annotations

from sage_llm.control_plane.dispatcher import internal_error


def test_an_internal_error_names_the_exception_without_its_payload() -> None:
    body = '{"prompt": "secret text \ud83d"}'
    try:
        body.encode("utf-8")
    except UnicodeEncodeError as exc:
        reason = internal_error(exc)
    assert reason.startswith("internal error: UnicodeEncodeError: 'utf-8' codec can't encode")
    assert "secret text" not in reason  # the repr would have held the whole request
    assert internal_error(RuntimeError("router bug")) == "internal error: RuntimeError: router bug"
