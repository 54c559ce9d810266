"""SSE framing, OpenAI stream assembly and vLLM response objects."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sage_llm.engines.base import EngineRequest, Usage
from sage_llm.engines.sse import (
    ResponseFormat,
    SSEDecoder,
    StreamAssembler,
    chunks_from_completion,
    encode_event,
    error_from_body,
    error_param_from_body,
    parse_usage,
    usage_json,
)
from sage_llm.errors import EngineError, EngineRequestRejectedError, EngineStreamError

REQ = EngineRequest(request_id="r", model="m", prompt="a b c")


def test_decoder_handles_every_line_ending_and_split_points() -> None:
    stream = b'data: {"a":1}\r\n\r\n: comment\n\nevent: x\ndata: one\ndata: two\r\rdata:[DONE]\n\n'
    whole = SSEDecoder().feed(stream)
    assert [(e.event, e.data) for e in whole] == [
        ("message", '{"a":1}'),
        ("x", "one\ntwo"),
        ("message", "[DONE]"),
    ]
    for cut in range(len(stream) + 1):
        dec = SSEDecoder()
        events = dec.feed(stream[:cut]) + dec.feed(stream[cut:]) + dec.close()
        assert [e.data for e in events] == [e.data for e in whole]


_LINES = st.lists(
    st.one_of(
        st.just(""),  # ends an event
        st.builds(lambda v: f"data: {v}", st.text("ab {}:\u00e9", max_size=6)),
        st.builds(lambda v: f"data:{v}", st.text("ab :", max_size=4)),
        st.builds(lambda v: f"event: {v}", st.text("xy", max_size=3)),
        st.builds(lambda v: f"id: {v}", st.text("12", max_size=3)),
        st.just(": a comment"),
        st.just("retry: 10"),
    ),
    max_size=14,
)


def _decode(raw: bytes, cuts: list[int]) -> list[tuple[str, str, str | None]]:
    dec, events, at = SSEDecoder(), [], 0
    for cut in sorted(c % (len(raw) + 1) for c in cuts):
        events += dec.feed(raw[at:cut])
        at = cut
    events += dec.feed(raw[at:]) + dec.close()
    return [(e.data, e.event, e.id) for e in events]


@given(_LINES, st.lists(st.integers(min_value=0), max_size=3))
def test_decoder_gives_the_same_events_for_lf_and_crlf_streams(
    lines: list[str], cuts: list[int]
) -> None:
    """``\n``-only streams take a faster path than ``\r\n`` ones: the same events."""
    lf = "".join(f"{line}\n" for line in lines).encode()
    crlf = "".join(f"{line}\r\n" for line in lines).encode()
    assert _decode(lf, cuts) == _decode(crlf, cuts) == _decode(crlf, [])


def test_decoder_keeps_utf8_split_across_feeds() -> None:
    raw = "data: h\u00e9\u4e16\n\n".encode()
    dec = SSEDecoder()
    events = [e for i in range(len(raw)) for e in dec.feed(raw[i : i + 1])]
    assert [e.data for e in events] == ["h\u00e9\u4e16"]


def test_decoder_utf8_at_every_split_point_and_invalid_bytes() -> None:
    raw = "data: h\u00e9\u4e16\n\ndata: \U0001f600!\n\n".encode()
    for cut in range(len(raw) + 1):
        dec = SSEDecoder()
        events = dec.feed(raw[:cut]) + dec.feed(raw[cut:]) + dec.close()
        assert [e.data for e in events] == ["h\u00e9\u4e16", "\U0001f600!"]
    dec = SSEDecoder()
    events = dec.feed(b"data: a\xffb\n\n") + dec.feed(b"data: c\xe4\xb8")
    assert [e.data for e in events + dec.close()] == ["a\ufffdb", "c\ufffd"]


def test_close_dispatches_unterminated_event() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: tail") == []
    assert dec.pending
    assert [e.data for e in dec.close()] == ["tail"]


def test_encode_round_trips() -> None:
    payload = {"text": "line\nbreak", "n": 1}
    events = SSEDecoder().feed(encode_event(payload) + encode_event("x\ny", event="e"))
    assert json.loads(events[0].data) == payload
    assert (events[1].event, events[1].data) == ("e", "x\ny")


def test_assembler_holds_finish_chunk_until_usage() -> None:
    asm = StreamAssembler(REQ)
    first = asm.on_event(json.dumps({"choices": [{"index": 0, "text": "a"}]}))
    held = asm.on_event(
        json.dumps({"choices": [{"index": 0, "text": "b", "finish_reason": "stop"}]})
    )
    usage = asm.on_event(json.dumps({"choices": [], "usage": {"prompt_tokens": 3,
                                                             "completion_tokens": 2}}))  # fmt: skip
    assert [c.text for c in first] == ["a"] and held == [] and usage == []
    assert asm.on_event("[DONE]") == [] and asm.done
    (last,) = asm.finish()
    assert (last.text, last.finish_reason, last.usage) == ("b", "stop", Usage(3, 2, None))


def test_assembler_n_greater_than_one_ends_with_finish_and_usage() -> None:
    asm = StreamAssembler(REQ)
    out = []
    for index in (0, 1):
        choice = {"index": index, "text": f"t{index}", "finish_reason": "length"}
        out += asm.on_event(json.dumps({"choices": [choice]}))
    out += asm.on_event(json.dumps({"choices": [], "usage": {"completion_tokens": 2}}))
    out += asm.finish()
    assert [(c.index, c.finish_reason) for c in out] == [(0, "length"), (1, "length")]
    assert out[-1].usage == Usage(0, 2, None)  # no cached count said: unknown


def test_assembler_refuses_a_stream_that_leaves_a_choice_unfinished() -> None:
    """With n > 1 a stream that ended with one choice still open had been taken as whole
    (and its answer rebuilt in one piece said ``"length"`` for it)."""
    asm = StreamAssembler(REQ)
    for index, finish in ((0, None), (1, None), (0, None), (1, "length")):
        asm.on_event(json.dumps({"choices": [{"index": index, "text": "t",
                                              "finish_reason": finish}]}))  # fmt: skip
    asm.on_event("[DONE]")
    with pytest.raises(EngineStreamError, match="without a finish_reason for choice 0"):
        asm.finish()


def test_an_answer_in_one_piece_with_a_choice_unfinished_is_refused() -> None:
    """A choice without its finish_reason had become "length". (One with fewer choices
    than n asked for passes: an engine that ignores n, as llama.cpp's server does, is not
    broken, and counting it against the instance had ejected the fleet.)"""
    two = EngineRequest(request_id="r", model="m", prompt="p", max_tokens=4, extra={"n": 2})
    unfinished = {"choices": [{"index": 0, "text": "a", "finish_reason": None},
                              {"index": 1, "text": "b", "finish_reason": "stop"}]}  # fmt: skip
    with pytest.raises(EngineStreamError, match="unfinished"):
        chunks_from_completion(unfinished, two)
    one = {"choices": [{"index": 0, "text": "a", "finish_reason": "stop"}]}
    assert len(chunks_from_completion(one, two)) == 1


def test_assembler_errors() -> None:
    with pytest.raises(EngineStreamError):
        StreamAssembler(REQ).on_event('"just a string"')
    asm = StreamAssembler(REQ)
    asm.on_event(json.dumps({"choices": [{"text": "a"}]}))
    with pytest.raises(EngineError, match="boom") as info:
        asm.on_event(json.dumps({"object": "error", "message": "boom", "code": 400}))
    assert (info.value.status, info.value.retryable) == (400, False)
    with pytest.raises(EngineError, match="overloaded") as info:
        StreamAssembler(REQ).on_event(json.dumps({"error": {"message": "overloaded"}}))
    assert info.value.retryable  # nothing was produced yet
    for bad, what in (
        ("{not json", "malformed JSON"),
        ('{"choices": {"text": "a"}}', "not a list"),
        ('{"choices": ["a"]}', "not an object"),
    ):
        with pytest.raises(EngineStreamError, match=what):
            StreamAssembler(REQ).on_event(bad)


@pytest.mark.parametrize(
    "ids", [["a"], [None], [1.5], [True, 2], [{"x": 1}], "1 2", {"0": 1}], ids=repr
)
def test_malformed_token_ids_are_a_stream_error_naming_the_field(ids: object) -> None:
    choice = {"index": 0, "text": "hi", "token_ids": ids}
    with pytest.raises(EngineStreamError, match="'token_ids'") as info:
        StreamAssembler(REQ, "e0").on_event(json.dumps({"choices": [choice]}))
    assert str(info.value).startswith("e0: ") and info.value.instance_id == "e0"
    assert info.value.retryable  # nothing was produced before it
    whole = {"choices": [{**choice, "finish_reason": "stop"}]}
    with pytest.raises(EngineStreamError, match="'token_ids'") as info:
        chunks_from_completion(whole, REQ, "e0")
    assert str(info.value).startswith("e0: ") and info.value.instance_id == "e0"


def test_token_ids_are_kept_and_null_ones_are_empty() -> None:
    for ids, kept in (([7, 8], (7, 8)), ([], ()), (None, ())):
        choice = {"index": 0, "text": "hi", "token_ids": ids, "finish_reason": "stop"}
        asm = StreamAssembler(REQ)
        asm.on_event(json.dumps({"choices": [choice]}))
        (last,) = asm.finish()
        (whole,) = chunks_from_completion({"choices": [choice]}, REQ)
        assert last.token_ids == whole.token_ids == kept


def test_assembler_done_marker_and_events_without_choices() -> None:
    for done in ("[DONE]", " [DONE]\n"):
        asm = StreamAssembler(REQ)
        assert asm.on_event(done) == [] and asm.done
        assert asm.on_event('{"choices": [{"text": "late"}]}') == []  # nothing after it
    asm = StreamAssembler(REQ)
    assert asm.on_event('{"id": "x", "object": "text_completion"}') == []
    chat = asm.on_event('{"choices": [{"index": 0, "delta": {"content": "hi"}}]}')
    assert [(c.text, c.index) for c in chat] == [("hi", 0)]
    asm = StreamAssembler(REQ)
    odd = asm.on_event('{"choices": [{"index": true, "text": 5, "finish_reason": "stop"}]}')
    assert odd == []  # the finishing chunk is held for the usage
    (last,) = asm.finish()
    assert (last.text, last.index, last.finish_reason) == ("", 1, "stop")


def test_chunks_from_completion_requires_finish_reason() -> None:
    with pytest.raises(EngineStreamError):
        chunks_from_completion({"choices": [{"text": "x"}]}, REQ)
    (chunk,) = chunks_from_completion({"choices": [{"text": "x y", "finish_reason": "stop"}]}, REQ)
    assert chunk.usage == Usage(3, 2)


def test_error_from_body_shapes() -> None:
    assert error_from_body(b'{"error": {"message": "m1"}}') == "m1"
    assert error_from_body('{"detail": "m2"}') == "m2"
    assert error_from_body(b"plain") == "plain"
    assert error_from_body(b"") is None
    assert error_from_body(b'{"error": "overloaded"}') == "overloaded"  # a bare string
    assert error_from_body(b'["not", "an object"]') == '["not", "an object"]'  # JSON, as text


def test_an_error_body_that_is_not_an_object_names_no_field() -> None:
    assert error_param_from_body(b'[{"param": "n"}]') is None
    assert error_param_from_body(b'{"error": {"param": "n"}}') == "n"


def test_a_completion_that_is_not_one_is_the_engines_failure_naming_the_instance() -> None:
    with pytest.raises(EngineStreamError, match=r"^i1: completion is not a JSON object$"):
        chunks_from_completion(["x"], REQ, "i1")
    with pytest.raises(EngineStreamError, match=r"^i1: completion has no choices$"):
        chunks_from_completion({"id": "x", "choices": []}, REQ, "i1")
    with pytest.raises(EngineError, match=r"^i1: out of memory$") as info:
        chunks_from_completion({"error": {"message": "out of memory", "code": 507}}, REQ, "i1")
    assert (info.value.status, info.value.instance_id) == (507, "i1")


def test_usage_counts_written_as_whole_floats_are_read() -> None:
    usage = parse_usage({"prompt_tokens": 7.0, "completion_tokens": 3.0, "total_tokens": 10.0})
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 3)


def test_cached_tokens_the_engine_did_not_report_stay_unknown() -> None:
    """vLLM without --enable-prompt-tokens-details writes null details: not 0 cached."""
    counts = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    unsaid: list[dict[str, Any]] = [{"prompt_tokens_details": None}, {},
                                    {"prompt_tokens_details": {}},
                                    {"prompt_tokens_details": {"cached_tokens": "x"}}]  # fmt: skip
    for details in unsaid:
        usage = parse_usage({**counts, **details})
        assert usage is not None and usage.cached_tokens is None
        assert usage_json(usage) == {**counts, "prompt_tokens_details": None}
    said = parse_usage({**counts, "prompt_tokens_details": {"cached_tokens": 0}})
    assert said is not None and said.cached_tokens == 0
    assert usage_json(said)["prompt_tokens_details"] == {"cached_tokens": 0}


def test_response_format_matches_vllm_shapes() -> None:
    fmt = ResponseFormat(chat=True, request_id="q", model="m", created=5)
    assert fmt.role_chunk()["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final = fmt.chunk("", "stop")
    assert final["object"] == "chat.completion.chunk"
    assert final["choices"][0]["delta"] == {} and final["id"] == "chatcmpl-q"
    whole = ResponseFormat(chat=False, request_id="q", model="m", created=5).completion(
        "hi", "length", Usage(2, 1, 1)
    )
    assert whole["id"] == "cmpl-q" and whole["object"] == "text_completion"
    assert whole["usage"] == {
        "prompt_tokens": 2,
        "total_tokens": 3,
        "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 1},
    }


def test_the_engines_other_usage_fields_are_kept_and_given_back() -> None:
    details = {"completion_tokens_details": {"reasoning_tokens": 2}}
    for usage in (
        {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8, **details},
        {"prompt_tokens": 3, "completion_tokens": 5, **details},  # without total_tokens
        {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8,
         "prompt_tokens_details": {"cached_tokens": 1}, **details},
    ):  # fmt: skip
        parsed = parse_usage(usage)
        assert parsed is not None and parsed.extra == details
        assert usage_json(parsed)["completion_tokens_details"] == {"reasoning_tokens": 2}
    plain = parse_usage({"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8})
    assert plain is not None and plain.extra is None


def test_a_leading_byte_order_mark_is_dropped_once() -> None:
    """WHATWG: the first event of a stream that begins with a BOM is not lost."""
    dec = SSEDecoder()
    events = dec.feed('\ufeffdata: {"a":1}\n\n'.encode()) + dec.feed(b'data: {"b":2}\n\n')
    assert [e.data for e in events] == ['{"a":1}', '{"b":2}']
    split = SSEDecoder()  # a BOM split between reads; one inside the stream is kept
    rest = b"\xbfdata: x\n\n" + "data: \ufeffy\n\n".encode()
    events = split.feed(b"\xef\xbb") + split.feed(rest)
    assert [e.data for e in events] == ["x", "\ufeffy"]


def test_a_byte_order_mark_that_begins_a_later_read_is_kept() -> None:
    """Only the stream's first character may be a dropped BOM, not each read's."""
    dec = SSEDecoder()
    events = dec.feed(b"data: first\n\n") + dec.feed(b"data: ")
    events += dec.feed("\ufeffsecond\n\n".encode())
    assert [e.data for e in events] == ["first", "\ufeffsecond"]


def test_an_error_field_is_an_error_event_with_the_engines_message() -> None:
    """llama.cpp's server sends a stream's error as an ``error:`` field."""
    body = json.dumps(
        {"code": 400, "message": "the request exceeds the available context size",
         "type": "invalid_request_error"}
    )  # fmt: skip
    (event,) = SSEDecoder().feed(f"error: {body}\n\n".encode())
    assert (event.event, event.data) == ("error", body)
    with pytest.raises(EngineError, match="exceeds the available context size") as info:
        StreamAssembler(REQ).on_event(event.data, event.event)
    assert not isinstance(info.value, EngineRequestRejectedError)  # no field named
    with pytest.raises(EngineError, match="engine error in stream: out of memory"):
        StreamAssembler(REQ).on_event("out of memory", "error")  # not JSON: its text


def test_an_error_event_naming_a_field_before_any_token_is_the_requests_refusal() -> None:
    refusal = {"error": {"message": "max_tokens too large", "type": "BadRequestError",
                         "param": "max_tokens", "code": 400}}  # fmt: skip
    with pytest.raises(EngineRequestRejectedError, match="max_tokens too large") as refused:
        StreamAssembler(REQ, "e0").on_event(json.dumps(refusal))
    assert (refused.value.param, refused.value.status, refused.value.retryable) == (
        "max_tokens", 400, False
    )  # fmt: skip
    # vLLM says 400 of any failure inside a stream: without a field it is the engine's
    vague = {"error": {"message": "boom", "type": "BadRequestError", "code": 400}}
    with pytest.raises(EngineError) as failed:
        StreamAssembler(REQ).on_event(json.dumps(vague))
    assert type(failed.value) is EngineError
    asm = StreamAssembler(REQ)  # after a token it cannot be the request's refusal
    asm.on_event(json.dumps({"choices": [{"index": 0, "text": "x"}]}))
    with pytest.raises(EngineError) as late:
        asm.on_event(json.dumps(refusal))
    assert type(late.value) is EngineError
