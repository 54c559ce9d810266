"""Inputs to control-plane requests, and results to VLLMService entries."""

from __future__ import annotations

from sage_llm.service.payloads import RequestDefaults, parse_generate
from sage_llm.service.results import generation, generation_entry, to_metadata
from sage_llm.types import RequestPriority


def test_to_metadata_carries_the_options() -> None:
    (item,) = parse_generate(
        "Hi",
        {"priority": "HIGH", "slo_deadline_ms": 800, "max_tokens": 9, "temperature": 0.2,
         "top_p": 0.5, "stop": ["."], "user_id": "u1", "session_id": "s1", "seed": 3,
         "logprobs": 2, "tags": {"k": "v"}},
        RequestDefaults(),
    )  # fmt: skip
    meta = to_metadata(item, "req-1")
    assert (meta.request_id, meta.prompt, meta.messages) == ("req-1", "Hi", None)
    assert meta.priority is RequestPriority.HIGH
    assert (meta.slo_deadline_ms, meta.max_tokens, meta.temperature, meta.top_p) == (
        800.0, 9, 0.2, 0.5,
    )  # fmt: skip
    assert (meta.stop, meta.user_id, meta.session_id, meta.tags) == (["."], "u1", "s1", {"k": "v"})
    assert meta.extra_body == {"seed": 3, "logprobs": 2}


def test_chat_logprobs_use_the_chat_api_fields_and_unset_sampling_keeps_defaults() -> None:
    (item,) = parse_generate([{"role": "user", "content": "Hi"}], {"logprobs": 3},
                             RequestDefaults())  # fmt: skip
    meta = to_metadata(item, "r")
    assert meta.extra_body == {"logprobs": True, "top_logprobs": 3}
    assert (meta.temperature, meta.top_p, meta.stop) == (1.0, 1.0, None)


def test_generation_entry_has_exactly_the_vllm_service_shape() -> None:
    entry = generation_entry(
        request_id="r", generations=[generation("hi", None, None, "stop")],
        input_tokens=3, output_tokens=1,
    )  # fmt: skip
    assert entry == {
        "generations": [{"text": "hi", "token_ids": [], "logprobs": None, "finish_reason": "stop"}],
        "usage": {"input_tokens": 3, "output_tokens": 1},
        "request_id": "r",
    }
    two = generation_entry(
        request_id="r", generations=[generation("a", [1], None, "stop"),
                                     generation("b c", [2, 3], None, "length")],
        input_tokens=3, output_tokens=3,
    )  # fmt: skip
    assert [g["text"] for g in two["generations"]] == ["a", "b c"]  # one per sample (n)
