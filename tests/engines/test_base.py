"""The engine-facing value types (``sage_llm.engines.base``)."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest

from sage_llm.engines.base import Chunk, Usage, answered_whole, prompt_logprobs_asked


def test_with_usage_is_replace_of_usage_alone() -> None:
    chunk = Chunk(text="hi", token_ids=(1, 2), finish_reason="stop", usage=None,
                  logprobs={"content": []}, index=3, fields={"tool_calls": [{"index": 0}]},
                  extras={"stop_reason": "x"}, top={"system_fingerprint": "fp"})  # fmt: skip
    usage = Usage(5, 2, 1)
    assert chunk.with_usage(usage) == replace(chunk, usage=usage)
    assert chunk.with_top({"a": 1}) == replace(chunk, top={"a": 1})
    # every field is carried over: a field added to Chunk must be added there too
    assert [f.name for f in fields(Chunk)] == [
        "text", "token_ids", "finish_reason", "usage", "logprobs", "index", "fields", "extras",
        "top",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "chat", "asked"),
    [
        ({}, False, False),
        ({"prompt_logprobs": 0}, False, True),
        ({"prompt_logprobs": 0}, True, True),
        ({"prompt_logprobs": None}, False, False),
        ({"echo": True}, False, False),  # a completion's echo without logprobs: text only
        ({"echo": True, "logprobs": 0}, False, True),
        ({"echo": True}, True, True),  # a chat's top_logprobs is 0 when absent
        ({"echo": True, "top_logprobs": None}, True, False),
        ({"echo": False, "logprobs": 2}, False, False),
        ({"logprobs": True, "top_logprobs": 2}, True, False),  # the output's, not the prompt's
    ],
)
def test_prompt_logprobs_asked_reads_the_body_as_vllm_does(
    extra: dict[str, object], chat: bool, asked: bool
) -> None:
    assert prompt_logprobs_asked(extra, chat=chat) is asked
    if asked:  # and such a request is answered whole (a stream has no place for them, or
        assert answered_whole(extra)  # echoes otherwise)
