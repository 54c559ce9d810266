"""A request body read as the JSON object every OpenAI-style endpoint takes.

The gateway and the simulated engine read request bodies the same way, and say the same
thing about one they cannot use.
"""

from __future__ import annotations

from typing import Any

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestPayloadError

from sage_llm import jsonutil
from sage_llm.errors import InvalidRequestError, UnsupportedMediaTypeError


async def read_raw(request: web.Request) -> bytes:
    """The body of ``request``. One it cannot read (a ``Content-Encoding`` it is not
    encoded in …) is an :class:`InvalidRequestError` giving the reason on one line, and the
    connection closes after its answer: aiohttp does not try to read the rest
    (``feed_eof``), which could not be read either."""
    if too_large_unsent(request):  # refused unread (one that sends its body at once is
        # read up to the limit: its answer must not come while it is still writing)
        leave_unread(request)
        raise web.HTTPRequestEntityTooLarge(
            max_size=request.client_max_size, actual_size=announced_length(request) or 0
        )
    encoding = request.headers.get("Content-Encoding")
    if encoding is not None and not _READABLE_ENCODINGS.issuperset(
        e.strip().lower() for e in encoding.split(",")
    ):  # aiohttp passes a body in an encoding it does not know on undecoded
        leave_unread(request)
        raise UnsupportedMediaTypeError(unsupported_encoding(encoding), param="content-encoding")
    try:
        return await request.read()
    except RequestPayloadError as exc:
        leave_unread(request)  # (the rest could not be read either)
        reason = " ".join(str(exc).split()).removeprefix("400, message: ")
        raise InvalidRequestError(f"request body cannot be read: {reason}") from None


_READABLE_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity", ""})
"""The ``Content-Encoding`` values a request body is read in (aiohttp decodes them)."""


def unsupported_encoding(encoding: str) -> str:
    """The message of a body in an encoding that is not read."""
    shown = " ".join(encoding.split())[:100]
    return (
        f"unsupported Content-Encoding: {shown} (request bodies are read in gzip, deflate or none)"
    )


LEFT_UNREAD = web.RequestKey("left_unread", bool)
"""Set on a request answered without its body read (its answer says ``Connection: close``)."""


def leave_unread(request: web.BaseRequest) -> None:
    """Answer ``request`` without reading its body: the connection closes after the answer
    (nothing after an unread body can be read; the answer says so) and aiohttp does not
    linger for the body."""
    request[LEFT_UNREAD] = True
    request.protocol.close()
    request.content.feed_eof()


def waits_to_send(request: web.BaseRequest) -> bool:
    """Whether ``request`` waits for a ``100 Continue`` before it sends its body."""
    return request.headers.get("Expect", "").lower() == "100-continue"


def too_large_unsent(request: web.BaseRequest) -> bool:
    """Whether ``request`` waits for a ``100 Continue`` before it sends a body its
    ``Content-Length`` already puts above the size limit (so it is answered 413 at once,
    without the 100 that would invite the upload)."""
    length, limit = announced_length(request), request.client_max_size
    return waits_to_send(request) and length is not None and bool(limit) and length > limit


_LENGTH_DIGITS = 20
"""The most digits a ``Content-Length`` is read with (aiohttp's parser refuses one above
2**64 - 1, 20 digits), its leading zeros dropped."""


def content_length_value(raw: str | None) -> int | None:
    """A ``Content-Length`` header's value (None without one, or with anything but
    digits): ``int()`` refuses more than 4,300 digits (leading zeros too: a
    ``ValueError``), so a longer value reads as ``10 ** _LENGTH_DIGITS``, above any size
    limit."""
    if raw is None or not raw.isascii() or not raw.isdigit():
        return None
    digits = raw.lstrip("0")
    return int(digits or "0") if len(digits) <= _LENGTH_DIGITS else 10**_LENGTH_DIGITS


def announced_length(request: web.BaseRequest) -> int | None:
    """``request``'s ``Content-Length`` as its value (:func:`content_length_value`;
    aiohttp's ``content_length`` reads it with ``int()``: a ``ValueError``, a 500, at
    4,300 digits). aiohttp's parser lets only digits through."""
    return content_length_value(request.headers.get(hdrs.CONTENT_LENGTH))


def json_object(raw: bytes, *, infinity: bool = False) -> dict[str, Any]:
    """``raw`` parsed as a JSON object; :class:`InvalidRequestError` (a 400) otherwise:
    "not valid JSON" (with the reason when it nests too deep) or "must be a JSON object"
    (an empty body included). A number no float holds (``1e999``) and ``Infinity`` are
    refused, or read as infinity with ``infinity`` (a body that goes to no engine: a
    policy parameter that ``inf`` switches off)."""
    try:
        if not raw:
            body = None
        else:
            body = jsonutil.loads(raw) if infinity else jsonutil.loads_request(raw)
    except (jsonutil.TooDeepError, jsonutil.NumberError) as exc:
        raise InvalidRequestError(f"request body is not valid JSON: {exc}") from None
    except ValueError:
        raise InvalidRequestError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequestError("request body must be a JSON object")
    return body
