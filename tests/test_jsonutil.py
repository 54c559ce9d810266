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
