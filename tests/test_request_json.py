"""Reading a request body as a JSON object (the gateway's and engine-sim's one reader)."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from sage_llm.errors import InvalidRequestError
from sage_llm.request_json import json_object, too_large_unsent


def test_an_object_is_returned_as_parsed() -> None:
    assert json_object(b'{"model": "m", "n": 2}') == {"model": "m", "n": 2}
    # what orjson leaves to the standard library is read the same way
    assert json_object(b'{"p": "cut \\ud83d", "x": 1e300}') == {"p": "cut \ud83d", "x": 1e300}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{nope", "request body is not valid JSON"),
        (b"", "request body must be a JSON object"),
        (b"[1, 2]", "request body must be a JSON object"),
        (b"null", "request body must be a JSON object"),
        (b'{"x": NaN}', "request body is not valid JSON: NaN is not a JSON number"),
        (  # an integer no float holds (its estimates had failed every queued request)
            b'{"max_tokens": 1' + b"0" * 400 + b"}",
            f"request body is not valid JSON: the number 1{'0' * 39}… is beyond a float's range",
        ),
        (b'{"x": -Infinity}', "request body is not valid JSON: -Infinity is not a JSON number"),
        (  # it would go on to the engine as null
            b'{"x": 1e400}',
            "request body is not valid JSON: the number 1e400 is beyond a float's range",
        ),
        (
            b"[" * 300 + b"]" * 300,
            "request body is not valid JSON: arrays and objects nested deeper than 200 levels",
        ),
    ],
)
def test_what_is_not_a_json_object_is_a_400_saying_why(raw: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        json_object(raw)
    assert str(err.value) == message


@pytest.mark.parametrize(
    ("length", "expect", "refused"),
    [
        (1024, "100-continue", False),
        (1025, "100-continue", True),
        (1025, None, False),
        # read as its value (int() refuses more than 4,300 digits: it had been a 500)
        ("0" * 5000 + "1024", "100-continue", False),
        ("0" * 5000 + "1025", "100-continue", True),
        ("0" * 5000 + "1025", None, False),
        ("1" + "0" * 5000, "100-continue", True),
    ],
)
def test_a_body_announced_above_the_size_limit_is_refused_unsent(
    length: int | str, expect: str | None, refused: bool
) -> None:
    headers = {"Content-Length": str(length)}
    if expect is not None:
        headers["Expect"] = expect
    request = make_mocked_request("POST", "/v1/completions", headers, client_max_size=1024)
    assert too_large_unsent(request) is refused
