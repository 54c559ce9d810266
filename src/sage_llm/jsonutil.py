"""Fast JSON for the request hot path: orjson, with the standard library as the fallback.

orjson is several times faster than :mod:`json` at both ends. What it refuses falls back
to :mod:`json`: documents with ``NaN``/``Infinity`` or a lone surrogate escape
(``"\\ud83d"``, a string cut inside an emoji) when reading, integers beyond 64 bits and
lone surrogates when writing (the fallback writes ASCII escapes, so such a string goes on
as the client sent it), so what is accepted is the same as with the standard library.
Two differences remain: orjson writes non-ASCII characters as UTF-8 instead of ``\\u``
escapes (and never adds spaces), and it reads an integer literal beyond 64 bits as a
float (no OpenAI request field holds such a number).
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson


def is_number(value: object) -> bool:
    """Whether a parsed value (JSON, TOML, a dict) is a number: an int or a float, not a
    boolean (``True`` is an int to Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def whole(value: Any) -> int | None:
    """``value`` as an integer when it is one, or a float with no fraction (``2.0``, which
    vLLM's request models read as 2); None otherwise (a boolean is not one)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


MAX_DEPTH = 200
"""How deep :func:`loads` lets arrays and objects nest. Deeper documents are refused:
:mod:`json` would overflow the interpreter's stack reading (or writing) one nested near
a thousand levels, and orjson writes at most 254."""


class TooDeepError(ValueError):
    """A JSON document nested deeper than :data:`MAX_DEPTH`."""

    def __init__(self) -> None:
        super().__init__(f"arrays and objects nested deeper than {MAX_DEPTH} levels")


def loads(data: bytes | bytearray | str) -> Any:
    """Parse a JSON document; ``ValueError`` when it is not valid JSON, and
    :class:`TooDeepError` (a ``ValueError``) when it nests deeper than
    :data:`MAX_DEPTH`."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        try:
            obj = json.loads(data)
        except RecursionError:
            raise TooDeepError from None
    # a document cannot nest deeper than it has brackets: most are not walked at all
    opens = data.count("[") + data.count("{") if isinstance(data, str) else (
        data.count(b"[") + data.count(b"{")
    )  # fmt: skip
    if opens > MAX_DEPTH and _deeper_than(obj, MAX_DEPTH):
        raise TooDeepError
    return obj


class NumberError(ValueError):
    """A request body's number that no float holds (``1e400``), or a ``NaN`` or
    ``Infinity``, which are not JSON."""


def loads_request(data: bytes) -> Any:
    """:func:`loads` for a request body, whose fields may go on to an engine as the client
    sent them: a number no float holds (``1e400``), or ``NaN``/``Infinity`` (not JSON), is
    refused (:class:`NumberError`), where writing it on would give ``null`` or a document
    that is not JSON. (An integer beyond 64 bits is read as a float, as by :func:`loads`.)"""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        obj = _strictly(data)
    opens = data.count(b"[") + data.count(b"{")
    if opens > MAX_DEPTH and _deeper_than(obj, MAX_DEPTH):
        raise TooDeepError
    return obj


def _strictly(data: bytes) -> Any:
    """``data`` read by :mod:`json`, refusing what :func:`loads_request` refuses."""
    try:
        return json.loads(
            data, parse_float=_finite, parse_int=_float_sized, parse_constant=_not_json
        )
    except RecursionError:
        raise TooDeepError from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NumberError(f"the number {text[:40]} is beyond a float's range")
    return value


def _float_sized(text: str) -> int:
    """An integer literal, refused beyond a float's range (as orjson reads it: it reads an
    integer beyond 64 bits as a float, and refuses one no float holds)."""
    if len(text.lstrip("-")) > 308 and not math.isfinite(float(text)):
        raise NumberError(f"the number {text[:40]}… is beyond a float's range")
    return int(text)


def _not_json(text: str) -> float:
    raise NumberError(f"{text} is not a JSON number")


def _deeper_than(obj: Any, limit: int) -> bool:
    """Whether ``obj``'s lists and dicts nest more than ``limit`` levels (no recursion)."""
    stack: list[tuple[Any, int]] = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in node if isinstance(child, list | dict))
    return False


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON of ``obj``; ``TypeError`` for what JSON cannot hold."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # ASCII escapes: a lone surrogate (valid JSON text) is written too
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


_INFINITY = "\x00infinity\x00"
"""What an infinite float stands as while :func:`dumps_pretty` writes a document."""


def dumps_pretty(obj: Any, *, indent: int = 2) -> str:
    """Indented JSON of ``obj`` for people and tools (``jq``): an infinite float is written
    ``1e999`` (``-1e999``), a number every JSON parser reads (as infinity, or the largest
    float), where :mod:`json` writes ``Infinity``, which is not JSON; a NaN is written
    ``null``; what JSON has no type for is written as its ``str``."""

    def marked(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            if math.isnan(value):
                return None  # no number stands for it
            return _INFINITY if value > 0 else "-" + _INFINITY
        if isinstance(value, dict):
            return {key: marked(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [marked(item) for item in value]
        return value

    text = json.dumps(marked(obj), indent=indent, default=str, allow_nan=False)
    mark = json.dumps(_INFINITY)
    return text.replace(f'"-{mark[1:]}', "-1e999").replace(mark, "1e999")
