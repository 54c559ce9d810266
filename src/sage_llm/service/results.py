"""From parsed inputs to control-plane requests, and from results to VLLMService entries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sage_llm.service.payloads import PromptInput
from sage_llm.types import RequestMetadata

__all__ = ["generation", "generation_entry", "to_metadata"]


def to_metadata(item: PromptInput, request_id: str) -> RequestMetadata:
    """The control-plane request of one input."""
    opts = item.options
    extra = dict(opts.extra)
    if opts.logprobs is not None:
        if item.messages is not None:
            extra.update(logprobs=True, top_logprobs=opts.logprobs)
        else:
            extra["logprobs"] = opts.logprobs
    meta = RequestMetadata(
        request_id=request_id,
        prompt=item.prompt,
        messages=item.messages,
        user_id=opts.user_id,
        priority=opts.priority,
        slo_deadline_ms=opts.slo_deadline_ms,
        max_tokens=opts.max_tokens,
        model_name=opts.model,
        preferred_instance_id=opts.preferred_instance_id,
        cost_budget=opts.cost_budget,
        tags=dict(opts.tags),
        stop=list(opts.stop) or None,
        session_id=opts.session_id,
        extra_body=extra,
    )
    if opts.temperature is not None:
        meta.temperature = opts.temperature
    if opts.top_p is not None:
        meta.top_p = opts.top_p
    return meta


def generation(
    text: str, token_ids: Sequence[int] | None, logprobs: Any, finish_reason: str | None
) -> dict[str, Any]:
    """One generation (sample) of a VLLMService ``generate`` entry."""
    return {
        "text": text,
        "token_ids": list(token_ids or ()),
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }


def generation_entry(
    *,
    request_id: str,
    generations: Sequence[dict[str, Any]],
    input_tokens: int,
    output_tokens: int,
) -> dict[str, Any]:
    """One entry of a VLLMService ``generate`` result: its input's generations (one per
    sample, ``n``), in order, and the usage of them all."""
    return {
        "generations": list(generations),
        "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        "request_id": request_id,
    }
