"""Reading the simulated engine server's request bodies (vLLM's fields and refusals)."""

from __future__ import annotations

from typing import Any

import pytest

from sage_llm import tokens
from sage_llm.errors import InvalidRequestError
from sage_llm.sim.server_requests import parse_request

PROMPT = "a b c d e f g h"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "extra", [{}, {"max_tokens": 1}, {"echo": True, "max_tokens": 0}], ids=["plain", "one", "echo"]
)
def test_a_prompt_that_fills_the_context_is_refused_at_the_prompt(extra: dict[str, Any]) -> None:
    """As vLLM: a prompt of max_model_len tokens leaves no room, even for an echo alone
    (max_tokens 0), and the 400 names the prompt, not max_tokens."""
    n = tokens.count_tokens(PROMPT)
    with pytest.raises(InvalidRequestError, match="maximum context length") as caught:
        parse_request({"prompt": PROMPT, **extra}, chat=False, model_name="m", max_model_len=n)
    assert caught.value.param == "prompt"
    assert f"your request has {n} input tokens" in caught.value.message
    echo = parse_request(
        {"prompt": PROMPT, "echo": True, "max_tokens": 0},
        chat=False, model_name="m", max_model_len=n + 1,
    )  # fmt: skip
    assert (echo.prompt_tokens, echo.req.max_tokens) == (n, 0)  # one token less: served


def test_a_chat_overflow_names_the_field_that_asked_for_the_tokens() -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(InvalidRequestError, match="maximum context length") as caught:
            parse_request(
                {"messages": CHAT, field: 10**6}, chat=True, model_name="m", max_model_len=100
            )
        assert caught.value.param == field
    with pytest.raises(InvalidRequestError) as caught:  # the newer name wins over max_tokens
        parse_request(
            {"messages": CHAT, "max_tokens": 1, "max_completion_tokens": 10**6},
            chat=True, model_name="m", max_model_len=100,
        )  # fmt: skip
    assert caught.value.param == "max_completion_tokens"


def test_top_p_outside_zero_to_one_is_refused() -> None:
    """vLLM's range for top_p is (0, 1]: 0 would keep no token."""
    for bad in (0, 0.0, -0.1, 1.5):
        with pytest.raises(InvalidRequestError) as caught:
            parse_request({"prompt": "hi", "top_p": bad}, chat=False, model_name="m")
        assert caught.value.param == "top_p", bad
    for fine in (1e-9, 0.5, 1):
        got = parse_request({"prompt": "hi", "top_p": fine}, chat=False, model_name="m")
        assert got.req.top_p == fine


def test_continuous_usage_stats_need_include_usage() -> None:
    """vLLM puts usage on every chunk only when the request asks for usage at all."""

    def parsed(**options: bool) -> tuple[bool, bool]:
        body = {"prompt": "hi", "stream": True, "stream_options": options}
        got = parse_request(body, chat=False, model_name="m")
        return got.include_usage, got.continuous_usage

    assert parsed(continuous_usage_stats=True) == (False, False)
    assert parsed(include_usage=False, continuous_usage_stats=True) == (False, False)
    assert parsed(include_usage=True, continuous_usage_stats=True) == (True, True)
    assert parsed(include_usage=True) == (True, False)
