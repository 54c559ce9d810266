"""Reading the simulated engine server's request bodies (vLLM's fields and refusals)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from sage_llm import tokens
from sage_llm.engines.base import EngineRequest
from sage_llm.errors import InvalidRequestError
from sage_llm.sim.server_requests import parse_request, truncated_request

PROMPT = "a b c d e f g h"
CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [({}, "max_tokens", "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)"),
     ({"max_tokens": 1}, "max_tokens", "max_tokens must be at least 1, got 0."),
     ({"echo": True, "max_tokens": 0}, None,
      "The decoder prompt (length {n}) plus the number of requested output tokens (at least 1) "
      "is longer than the maximum model length of {n}.")],
    ids=["plain", "one", "echo"],
)  # fmt: skip
def test_a_prompt_that_fills_the_context_is_refused(
    extra: dict[str, Any], param: str | None, words: str
) -> None:
    """As vLLM 0.32: a prompt of max_model_len tokens leaves no room (max_tokens cut to 0),
    even for an echo alone (max_tokens 0), which its engine refuses in its own words."""
    n = tokens.count_tokens(PROMPT)
    with pytest.raises(InvalidRequestError) as caught:
        parse_request({"prompt": PROMPT, **extra}, chat=False, model_name="m", max_model_len=n)
    assert caught.value.param == param
    assert caught.value.message.startswith(words.format(n=n))
    echo = parse_request(
        {"prompt": PROMPT, "echo": True, "max_tokens": 0},
        chat=False, model_name="m", max_model_len=n + 1,
    )  # fmt: skip
    assert (echo.prompt_tokens, echo.req.max_tokens) == (n, 0)  # one token less: served


def test_a_prompt_longer_than_the_context_is_refused_naming_input_tokens() -> None:
    """vLLM 0.32's words: a text prompt counted as its tokenizer cuts it (one token past
    the context, "at least"), a prompt of token ids in full."""
    n = tokens.count_tokens(PROMPT)
    with pytest.raises(InvalidRequestError) as caught:
        parse_request({"prompt": PROMPT}, chat=False, model_name="m", max_model_len=n - 3)
    assert caught.value.param == "input_tokens"
    assert caught.value.message == (
        f"This model's maximum context length is {n - 3} tokens. However, your prompt contains "
        f"at least {n - 2} input tokens, which exceeds this limit even without any output "
        f"tokens. Please reduce the length of the input prompt. "
        f"(parameter=input_tokens, value={n - 2})"
    )
    with pytest.raises(InvalidRequestError, match="contains 10 input tokens") as caught:
        parse_request({"prompt": list(range(10)), "max_tokens": 2}, chat=False, model_name="m",
                      max_model_len=5)  # fmt: skip
    assert caught.value.param == "input_tokens"


def test_a_prompt_and_max_tokens_past_the_context_are_served_cut() -> None:
    """vLLM 0.32 runs max_tokens cut to what the context holds after the prompt."""
    n = tokens.count_tokens(PROMPT)
    for field in ("max_tokens", "max_completion_tokens"):
        body = {"messages": CHAT, field: 100}
        got = parse_request(body, chat=True, model_name="m", max_model_len=100)
        assert got.req.max_tokens == 100 - got.prompt_tokens
    got = parse_request({"prompt": PROMPT, "max_tokens": n + 3}, chat=False, model_name="m",
                        max_model_len=n + 3)  # fmt: skip
    assert got.req.max_tokens == 3
    cut = parse_request(
        {"prompt": list(range(50)), "max_tokens": 2, "truncate_prompt_tokens": -1},
        chat=False, model_name="m", max_model_len=20,
    )  # fmt: skip
    assert (cut.prompt_tokens, cut.req.max_tokens) == (19, 1)  # -1: a token left for the answer


def test_a_chat_overflow_names_the_field_that_asked_for_the_tokens() -> None:
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(InvalidRequestError) as caught:
            parse_request(
                {"messages": CHAT, field: 10**6}, chat=True, model_name="m", max_model_len=100
            )
        assert caught.value.param == field
        assert caught.value.message == (
            f"{field}=1000000 cannot be greater than max_model_len=100. Please request fewer "
            f"output tokens. (parameter={field}, value=1000000)"
        )
    with pytest.raises(InvalidRequestError) as caught:  # the newer name wins over max_tokens
        parse_request(
            {"messages": CHAT, "max_tokens": 1, "max_completion_tokens": 10**6},
            chat=True, model_name="m", max_model_len=100,
        )  # fmt: skip
    assert caught.value.param == "max_completion_tokens"
    both = {"messages": CHAT, "max_tokens": 10**6, "max_completion_tokens": 5}
    assert parse_request(both, chat=True, model_name="m", max_model_len=100).req.max_tokens == 5


def test_more_than_four_stop_strings_are_refused_as_vllm_refuses_them() -> None:
    four = parse_request({"prompt": "hi", "stop": list("abcd")}, chat=False, model_name="m")
    assert four.req.stop == tuple("abcd")
    with pytest.raises(InvalidRequestError) as caught:
        parse_request({"messages": CHAT, "stop": list("abcde")}, chat=True, model_name="m")
    assert caught.value.param == "body.stop"  # as vLLM 0.32's validation handler names it
    assert "'List should have at most 4 items after validation, not 5'" in caught.value.message
    assert caught.value.message.startswith("2 validation errors:\n  {'type': 'string_type'")


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


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [({"echo": "yes"}, "echo", "echo must be a boolean"),
     ({"priority": "high"}, "priority", "priority must be an integer"),
     ({"kv_transfer_params": [1]}, "kv_transfer_params", "kv_transfer_params must be an object"),
     ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "must be -1 or an integer >= 1")],
    ids=["echo", "priority", "kv_transfer_params", "truncate"],
)  # fmt: skip
def test_a_field_of_the_wrong_type_is_refused_naming_it(
    extra: dict[str, Any], param: str, words: str
) -> None:
    with pytest.raises(InvalidRequestError, match=words) as caught:
        parse_request({"prompt": PROMPT, **extra}, chat=False, model_name="m")
    assert caught.value.param == param


def test_continue_final_message_must_be_a_boolean() -> None:
    body = {"messages": CHAT, "continue_final_message": "yes", "add_generation_prompt": False}
    with pytest.raises(InvalidRequestError, match="continue_final_message must be a boolean") as c:
        parse_request(body, chat=True, model_name="m")
    assert c.value.param == "continue_final_message"


def test_a_prompt_within_truncate_prompt_tokens_is_served_whole() -> None:
    """``truncate_prompt_tokens`` cuts only a longer prompt; -1 with no context known cuts
    nothing (there is no context to fit)."""
    n = tokens.count_tokens(PROMPT)
    for keep, context in ((n, 100), (n + 5, None), (-1, None)):
        got = parse_request(
            {"prompt": PROMPT, "max_tokens": 1, "truncate_prompt_tokens": keep},
            chat=False, model_name="m", max_model_len=context,
        )  # fmt: skip
        assert (got.req.prompt, got.prompt_tokens) == (PROMPT, n), keep
    req = EngineRequest("r", "m", prompt=PROMPT, max_tokens=1,
                        extra={"truncate_prompt_tokens": n})  # fmt: skip
    assert truncated_request(req, 100) is req  # an in-process engine's request: the same
    cut = truncated_request(replace(req, extra={"truncate_prompt_tokens": 2}), 100)
    assert (cut.prompt, tokens.count_tokens(str(cut.prompt))) == (tokens.last_tokens(PROMPT, 2), 2)
