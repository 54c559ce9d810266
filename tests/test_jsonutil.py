"""Fast JSON with the standard library's range."""

from __future__ import annotations

import json
import math

import pytest

from sage_llm import jsonutil


def test_round_trip_is_compact_utf8() -> None:
    obj = {"a": [1, 2.5, None, True], "text": "héllo\nworld"}
    raw = jsonutil.dumps(obj)
    assert b" " not in raw.replace(b"h\xc3\xa9llo", b"")
    assert jsonutil.loads(raw) == obj
    assert json.loads(raw) == obj


def test_big_integers_are_written_exactly_and_read_as_floats() -> None:
    big = 10**30
    assert jsonutil.dumps({"seed": big}) == b'{"seed":' + str(big).encode() + b"}"
    assert jsonutil.loads(jsonutil.dumps({"seed": big})) == {"seed": float(big)}


def test_nan_is_accepted_like_the_standard_library() -> None:
    assert math.isnan(jsonutil.loads(b'{"x": NaN}')["x"])


@pytest.mark.parametrize("raw", [b"{bad", b"", b"\xff\xfe"])
def test_invalid_documents_raise_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match=r"\w"):
        jsonutil.loads(raw)


def test_unserialisable_objects_raise_type_error() -> None:
    with pytest.raises(TypeError):
        jsonutil.dumps({"x": object()})


def test_a_lone_surrogate_goes_on_as_the_client_sent_it() -> None:
    body = jsonutil.loads(b'{"prompt": "emoji \\ud83d cut"}')  # a string cut inside an emoji
    assert body == {"prompt": "emoji \ud83d cut"}
    assert jsonutil.dumps(body) == b'{"prompt":"emoji \\ud83d cut"}'
    assert jsonutil.loads(jsonutil.dumps(body)) == body


def _nested(depth: int) -> bytes:
    return b'{"x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth", [jsonutil.MAX_DEPTH + 1, 1100, 5000])
def test_documents_nested_too_deep_are_refused_not_a_stack_overflow(depth: int) -> None:
    # orjson stops at 1,024 levels and the standard library then overflows the stack
    with pytest.raises(jsonutil.TooDeepError, match="deeper than 200 levels"):
        jsonutil.loads(_nested(depth))
    with pytest.raises(jsonutil.TooDeepError):
        jsonutil.loads(_nested(depth).decode())


def test_many_brackets_at_a_shallow_depth_are_read() -> None:
    assert jsonutil.loads(_nested(jsonutil.MAX_DEPTH))["x"] is not None  # the limit itself
    wide = b'{"x":[' + b",".join([b"[{}]"] * 1000) + b"]}"
    assert len(jsonutil.loads(wide)["x"]) == 1000
    doc = jsonutil.loads(_nested(jsonutil.MAX_DEPTH))
    assert jsonutil.loads(jsonutil.dumps(doc)) == doc  # and written back (orjson: 254 levels)


def test_pretty_json_writes_infinity_as_a_number_json_parsers_read() -> None:
    def strict(constant: str) -> None:  # Infinity and NaN are not JSON
        raise AssertionError(constant)

    text = jsonutil.dumps_pretty({"a": math.inf, "b": [-math.inf, math.nan], "c": "x"})
    assert json.loads(text, parse_constant=strict) == {
        "a": math.inf, "b": [-math.inf, None], "c": "x"
    }  # fmt: skip


def test_whole_takes_integers_and_floats_without_a_fraction_only() -> None:
    assert (jsonutil.whole(2), jsonutil.whole(2.0)) == (2, 2)
    assert jsonutil.whole(2.5) is None
    assert jsonutil.whole(True) is None
    assert jsonutil.whole("2") is None


def test_a_request_of_nested_objects_too_deep_is_refused() -> None:
    depth = jsonutil.MAX_DEPTH + 100
    objects = b'{"a":' * depth + b"1" + b"}" * depth  # no array at all
    with pytest.raises(jsonutil.TooDeepError):
        jsonutil.loads_request(objects)
    with pytest.raises(jsonutil.TooDeepError):
        jsonutil.loads(objects)


def test_the_limit_itself_is_read_with_more_brackets_beside_it() -> None:
    # 200 levels deep and 201 brackets: the walk runs, and finds no level past the limit
    doc = "[" + "[" * (jsonutil.MAX_DEPTH - 1) + "]" * (jsonutil.MAX_DEPTH - 1) + ",[]]"
    assert len(jsonutil.loads(doc)) == 2
    assert len(jsonutil.loads_request(doc.encode())) == 2


def test_a_string_of_brackets_is_read_as_the_string_it_is() -> None:
    text = "[" * (jsonutil.MAX_DEPTH + 5)
    assert jsonutil.loads(json.dumps(text).encode()) == text
    assert jsonutil.loads_request(json.dumps({"prompt": text}).encode()) == {"prompt": text}
    assert jsonutil.loads_request(json.dumps(text).encode()) == text


def test_a_request_the_standard_library_reads_keeps_its_integers() -> None:
    body = jsonutil.loads_request(b'{"prompt": "emoji \\ud83d cut", "max_tokens": 7}')
    assert body == {"prompt": "emoji \ud83d cut", "max_tokens": 7}
    assert type(body["max_tokens"]) is int
