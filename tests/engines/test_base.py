"""The engine-facing value types (``sage_llm.engines.base``)."""

from __future__ import annotations

from dataclasses import fields, replace

from sage_llm.engines.base import Chunk, Usage


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
