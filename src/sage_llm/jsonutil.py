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
from typing import Any

import orjson


def is_number(value: object) -> bool:
    """Whether a parsed value (JSON, TOML, a dict) is a number: an int or a float, not a
    boolean (``True`` is an int to Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def loads(data: bytes | bytearray | str) -> Any:
    """Parse a JSON document; ``ValueError`` when it is not valid JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON of ``obj``; ``TypeError`` for what JSON cannot hold."""
    try:
        return orjson.dumps(obj)
    except TypeError:  # ASCII escapes: a lone surrogate (valid JSON text) is written too
        return json.dumps(obj, separators=(",", ":")).encode("ascii")
