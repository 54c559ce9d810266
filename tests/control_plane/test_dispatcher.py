"""The dispatcher's helpers (its behaviour is tested through the manager, test_manager.py)."""

from __future__ import annotations

import pytest

from sage_llm.control_plane.dispatcher import (
    STOPPED,
    failure_error,
    internal_error,
    is_context_refusal,
)
from sage_llm.errors import (
    ControlPlaneNotRunningError,
    DeadlineExceededError,
    EngineError,
    EngineRequestRejectedError,
    InvalidRequestError,
    RequestCancelledError,
)
from sage_llm.types import RequestResult, RequestStatus


def test_an_internal_error_names_the_exception_without_its_payload() -> None:
    body = '{"prompt": "secret text \ud83d"}'
    try:
        body.encode("utf-8")
    except UnicodeEncodeError as exc:
        reason = internal_error(exc)
    assert reason.startswith("internal error: UnicodeEncodeError: 'utf-8' codec can't encode")
    assert "secret text" not in reason  # the repr would have held the whole request
    assert internal_error(RuntimeError("router bug")) == "internal error: RuntimeError: router bug"


def test_failure_error_gives_each_ending_its_type() -> None:
    done = RequestResult("a", RequestStatus.COMPLETED, text="x")
    assert failure_error(done, None) is None
    failed = RequestResult("b", RequestStatus.FAILED, error="engine exploded", instance_id="i1")
    generic = failure_error(failed, None)
    assert type(generic) is EngineError and generic.message == "engine exploded"
    assert (generic.instance_id, generic.retryable) == ("i1", False)
    refused = failure_error(failed, InvalidRequestError("too long", param="max_tokens"))
    assert isinstance(refused, EngineRequestRejectedError)
    assert isinstance(refused, InvalidRequestError)
    assert (refused.param, refused.http_status) == ("max_tokens", 400)
    late = failure_error(failed, DeadlineExceededError("late"))
    assert type(late) is DeadlineExceededError
    cancelled = RequestResult("c", RequestStatus.CANCELLED)
    assert failure_error(cancelled, None) is None  # a consumer that left: nothing to raise
    assert isinstance(failure_error(cancelled, None, cancelled=True), RequestCancelledError)
    stopped = RequestResult("d", RequestStatus.CANCELLED, error=STOPPED)
    error = failure_error(stopped, None, cancelled=True)
    assert isinstance(error, ControlPlaneNotRunningError)
    assert "'d' was cancelled: control plane stopped" in str(error)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        # vLLM to 0.10 (and SGLang)
        ("This model's maximum context length is 2048 tokens. However, you requested 2100 "
         "tokens (100 in the messages, 2000 in the completion).", True),
        # vLLM 0.11+: max_tokens past the context, a prompt past it, one that fills it
        ("max_tokens=600 cannot be greater than max_model_len=512. Please request fewer "
         "output tokens.", True),
        ("The decoder prompt (length 600) is longer than the maximum model length of 512.",
         True),
        ("max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", True),
        # llama.cpp's llama-server (a slot's context)
        ("request (701 tokens) exceeds the available context size (512 tokens), try "
         "increasing it", True),
        # the request's own faults
        ("max_tokens must be at least 1, got -5.", False),
        ("top_k must be 0 (disable), or at least 1, got -5.", False),
    ],
)  # fmt: skip
def test_context_refusals_are_told_in_each_engines_words(message: str, expected: bool) -> None:
    assert is_context_refusal(f"engine v: rejected the request (HTTP 400): {message}") is expected
