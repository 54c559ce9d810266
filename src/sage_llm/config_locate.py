"""Where a key sits in a TOML text, and problems reported with ``file:line`` and dotted key.

``tomllib`` gives values without positions, so :class:`KeyLocator` scans the text once and
records the line of every table header, array-of-tables element and key it defines::

    [services.llm_control_plane]             # ("services", "llm_control_plane")
    [[services.llm_control_plane.instances]] # (..., "instances", 0), the n-th one is index n
    port = 8000                              # (..., "instances", 0, "port")
    pd.enabled = true                        # dotted keys
    gateway = { host = "0.0.0.0" }           # inline tables and arrays, element by element

A path that was never written (a default, an implicit table) is placed at the line of its
nearest written ancestor. :class:`Problems` collects :class:`~sage_llm.errors.ConfigError`
values located this way, so a checker can report every problem of a file, not just the first.

"""

from __future__ import annotations

import ast
import bisect
import json
import re
import tomllib
from pathlib import Path
from typing import Any, Protocol

from sage_llm.errors import ConfigError

PathPart = str | int
KeyPath = tuple[PathPart, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")
_TOML_AT_END = re.compile(r"\s*\(at end of document\)\s*$")
_DECLARED_TWICE = re.compile(r"Cannot declare \((.*)\) twice")
_INLINE_TABLE = re.compile(r"Cannot mutate immutable namespace \((.*)\)")
_KEY_AT_LINE = re.compile(r"\s*([^=\s#\[][^=]*?)\s*=")
_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|(.))", re.DOTALL)
"""An escape of a TOML basic string: ``\\uXXXX``, ``\\UXXXXXXXX`` or one character."""
_ESCAPED_CHARS = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}


def format_key(path: KeyPath) -> str:
    """The dotted form of ``path``: ``services.llm_control_plane.instances[1].port``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        text = part if _BARE_KEY.fullmatch(part) else json.dumps(part)
        out += f".{text}" if out else text
    return out


class _Lines:
    """Line numbers (1-based) of key paths, found by a subclass's scan."""

    _lines: dict[KeyPath, int]

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path``, else that of its nearest written ancestor, else None."""
        for end in range(len(path), 0, -1):
            line = self._lines.get(path[:end])
            if line is not None:
                return line
        return None


class KeyLocator(_Lines):
    """Line numbers (1-based) of the keys a TOML text defines. The text must be valid TOML."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._lines: dict[KeyPath, int] = {}
        self._array_counts: dict[KeyPath, int] = {}
        self._scan()

    @property
    def line_count(self) -> int:
        """Number of lines in the text."""
        return len(self._line_starts)

    # -- scanning --------------------------------------------------------------------------

    def _record(self, path: KeyPath, pos: int) -> None:
        if path and path not in self._lines:
            self._lines[path] = bisect.bisect_right(self._line_starts, pos)

    def _peek(self, offset: int = 0) -> str:
        index = self._pos + offset
        return self._text[index] if index < len(self._text) else ""

    def _skip_space(self, newlines: bool) -> None:
        chars = " \t\r\n" if newlines else " \t\r"
        while True:
            char = self._peek()
            if char and char in chars:
                self._pos += 1
            elif char == "#":
                end = self._text.find("\n", self._pos)
                self._pos = len(self._text) if end < 0 else end
            else:
                return

    def _skip_line(self) -> None:
        end = self._text.find("\n", self._pos)
        self._pos = len(self._text) if end < 0 else end + 1

    def _scan(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip_space(newlines=True)
            if not self._peek():
                return
            start = self._pos
            if self._peek() == "[":
                table = self._header()
                self._skip_line()
                continue
            key = self._key()
            if not key or self._peek() != "=":
                self._skip_line()  # cannot happen in valid TOML; never loop forever
                continue
            self._pos += 1
            self._define(table, key, start)
            self._value(table + key)
            self._skip_line()

    def _header(self) -> KeyPath:
        start = self._pos
        is_array = self._peek(1) == "["
        self._pos += 2 if is_array else 1
        raw = self._key()
        resolved: KeyPath = ()
        for index, part in enumerate(raw):
            resolved = (*resolved, part)
            last = index == len(raw) - 1
            self._record(resolved, start)
            if resolved in self._array_counts and not (last and is_array):
                resolved = (*resolved, self._array_counts[resolved] - 1)
        if is_array:
            count = self._array_counts.get(resolved, 0)
            self._array_counts[resolved] = count + 1
            resolved = (*resolved, count)
            self._record(resolved, start)
        return resolved

    def _define(self, table: KeyPath, key: KeyPath, pos: int) -> None:
        for end in range(1, len(key) + 1):
            self._record(table + key[:end], pos)

    def _key(self) -> KeyPath:
        parts: list[str] = []
        while True:
            self._skip_space(newlines=False)
            char = self._peek()
            if char in ("'", '"'):
                parts.append(self._string())
            else:
                match = _BARE_KEY.match(self._text, self._pos)
                if match is None:
                    return tuple(parts)
                parts.append(match.group())
                self._pos = match.end()
            self._skip_space(newlines=False)
            if self._peek() != ".":
                return tuple(parts)
            self._pos += 1

    def _string(self) -> str:
        quote = self._peek()
        if self._text.startswith(quote * 3, self._pos):
            end = self._text.find(quote * 3, self._pos + 3)
            while end >= 0 and quote == '"' and _escaped(self._text, end):
                end = self._text.find(quote * 3, end + 1)
            end = len(self._text) if end < 0 else end + 3
            while self._text.startswith(quote, end):  # up to two quotes may close the string
                end += 1
            self._pos = end
            return ""
        start = self._pos
        self._pos += 1
        while self._peek() and self._peek() != quote:
            self._pos += 2 if quote == '"' and self._peek() == "\\" else 1
        self._pos += 1
        raw = self._text[start : self._pos]
        if quote == "'":
            return raw[1:-1]
        return _ESCAPE.sub(_unescape, raw[1:-1])

    def _value(self, path: KeyPath) -> None:
        self._skip_space(newlines=False)
        char = self._peek()
        if char in ("'", '"'):
            self._string()
        elif char == "[":
            self._array(path)
        elif char == "{":
            self._inline_table(path)
        else:
            while self._peek() and self._peek() not in ",]}\n#":
                self._pos += 1

    def _array(self, path: KeyPath) -> None:
        self._pos += 1
        index = 0
        while True:
            self._skip_space(newlines=True)
            char = self._peek()
            if char in ("]", ""):
                self._pos += 1
                return
            if char == ",":
                self._pos += 1
                index += 1
                continue
            self._record((*path, index), self._pos)
            before = self._pos
            self._value((*path, index))
            if self._pos == before:
                self._pos += 1

    def _inline_table(self, path: KeyPath) -> None:
        self._pos += 1
        while True:
            self._skip_space(newlines=True)
            char = self._peek()
            if char in ("}", ""):
                self._pos += 1
                return
            if char == ",":
                self._pos += 1
                continue
            start = self._pos
            key = self._key()
            if not key or self._peek() != "=":
                self._pos = max(self._pos, start + 1)
                continue
            self._pos += 1
            self._define(path, key, start)
            self._value(path + key)


class LinesOfKeys(Protocol):
    """What :class:`Problems` asks of a locator: the line a key path is written at."""

    def line_of(self, path: KeyPath) -> int | None: ...


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


class JsonKeyLocator(_Lines):
    """Line numbers (1-based) of the members and elements of a JSON text (a plan file):
    ``("instances", 1, "tp")`` is the line of the second instance's ``"tp"`` key. The text
    must be valid JSON; it is scanned once, without recursion."""

    def __init__(self, text: str) -> None:
        starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._lines: dict[KeyPath, int] = {}
        # open containers: [path, next key (objects) or index (arrays), expecting a key]
        stack: list[list[Any]] = []
        for match in _JSON_TOKEN.finditer(text):
            token, top = match.group(), stack[-1] if stack else None
            if token in "}]":
                stack.pop()
                continue
            if top is None:
                path: KeyPath = ()
            elif token == ",":
                top[1], top[2] = (top[1] + 1, False) if isinstance(top[1], int) else (None, True)
                continue
            elif token == ":":
                top[2] = False
                continue
            elif top[2]:  # an object's key
                top[1], top[2] = json.loads(token), False
                path = (*top[0], top[1])
                self._lines.setdefault(path, bisect.bisect_right(starts, match.start()))
                continue
            else:
                path = (*top[0], top[1])
                self._lines.setdefault(path, bisect.bisect_right(starts, match.start()))
            if token == "{":
                stack.append([path, None, True])
            elif token == "[":
                stack.append([path, 0, False])


def _unescape(match: re.Match[str]) -> str:
    """The character a TOML basic string's escape stands for (an invalid one as written:
    ``tomllib`` has refused the text then)."""
    code = match[1] or match[2]
    if code is not None:
        try:
            return chr(int(code, 16))
        except ValueError:  # beyond U+10FFFF
            return match[0]
    return _ESCAPED_CHARS.get(match[3], match[0])


def _escaped(text: str, index: int) -> bool:
    backslashes = 0
    while index - backslashes - 1 >= 0 and text[index - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


TOO_DEEP = "tables or arrays nested too deeply to read"
"""The error of a document nested deeper than the reader's recursion allows."""


def read_utf8(path: Path, what: str = "file") -> str:
    """The text of ``path``. :class:`ConfigError` located at ``path`` when it cannot be read
    (``cannot read <what>: <reason>``), at ``path:line`` when it is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what}: {exc.strerror or exc}", location=str(path)
        ) from None
    except ValueError:  # a path no system call takes: a NUL byte in it
        raise ConfigError(
            f"cannot read {what}: the path holds a NUL character", location=repr(str(path))
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:  # every file the project reads says it so
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        message = f"not valid UTF-8 (byte 0x{data[exc.start]:02x}, column {column})"
        raise ConfigError(message, location=f"{path}:{line}") from None


def read_toml(text: str, source: str) -> dict[str, Any]:
    """``text`` (from ``source``) parsed as TOML; :class:`ConfigError` located at
    ``source`` (and line) for a syntax error, nesting too deep to read, or an integer
    longer than Python reads (4,300 digits)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise syntax_error(exc, source, text) from None
    except RecursionError:
        raise ConfigError(TOO_DEEP, location=source) from None
    except ValueError:  # int() refuses a literal of over 4,300 digits
        raise ConfigError(
            "cannot be read: it holds an integer of more than 4,300 digits", location=source
        ) from None


def syntax_error(exc: tomllib.TOMLDecodeError, source: str, text: str) -> ConfigError:
    """A TOML syntax error in ``text`` as a :class:`ConfigError` located at ``source:line``
    (a table declared twice and a key given twice are said in the file's own words)."""
    message = str(exc)
    match = _TOML_POSITION.search(message)
    if match is None:
        line = text.count("\n") + 1
        why = f"invalid TOML: {_TOML_AT_END.sub('', message)} (at end of file)"
        return ConfigError(why, location=f"{source}:{line}")
    line = int(match.group(1))
    reason = message[: match.start()]
    why = f"invalid TOML: {reason} (column {match.group(2)})"
    twice, inline = _DECLARED_TWICE.fullmatch(reason), _INLINE_TABLE.fullmatch(reason)
    said = twice or inline
    names = None if said is None else _name_tuple(said.group(1))
    if names:
        whole = _written_whole(names, text, line)  # tomllib names the key being added
        if twice is not None and whole is None:
            why = (
                f"invalid TOML: table {format_key(names)} is declared twice; write its keys "
                "under one header"
            )
        else:
            why = (
                f"invalid TOML: {format_key(whole or names)} was written whole (an inline "
                "table or an array) and cannot be added to here; write all of it in one place"
            )
    elif reason == "Cannot overwrite a value":
        lines = text.splitlines()
        key = _KEY_AT_LINE.match(lines[line - 1]) if 0 < line <= len(lines) else None
        if key is not None:
            why = f"invalid TOML: {key.group(1)} is given a value twice; keep one"
    return ConfigError(why, location=f"{source}:{line}")


def _name_tuple(text: str) -> tuple[str, ...] | None:
    """A tuple of names as tomllib prints it (``'a', 'b'``), else None."""
    try:
        names = ast.literal_eval(f"({text})")
    except (ValueError, SyntaxError):
        return None
    ok = isinstance(names, tuple) and names and all(isinstance(n, str) for n in names)
    return names if ok else None


def _written_whole(names: tuple[str, ...], text: str, line: int) -> tuple[str, ...] | None:
    """Of the key path ``names`` that the TOML ``text`` could not take at ``line``, the
    part the lines before had written whole (an inline table: ``pd = {…}`` before
    ``[….pd.metadata]``), when it is shorter than ``names``; else None (``names`` itself
    was there already)."""
    lines = text.splitlines()[: line - 1]
    try:
        before = tomllib.loads("\n".join(lines))
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):
        return None
    headers = {_header_key(ln) for ln in lines if ln.lstrip().startswith("[[")}
    node: Any = before
    for depth, name in enumerate(names):
        if isinstance(node, list):
            if not (node and isinstance(node[-1], dict)) or names[:depth] not in headers:
                return names[:depth]  # an array written as a value: whole
            node = node[-1]  # an array of tables: its last one is being written
        if not isinstance(node, dict) or name not in node:
            return names[:depth] if depth and depth < len(names) else None
        node = node[name]
    return None


def _header_key(line: str) -> tuple[str, ...] | None:
    """The key path of an ``[[…]]`` header line (bare or quoted keys, which may hold
    ``]]``), else None."""
    try:
        parsed = tomllib.loads(line.strip())  # (a header line is a document of its own)
    except tomllib.TOMLDecodeError:
        return None
    path: list[str] = []
    node: Any = parsed
    while isinstance(node, dict) and len(node) == 1:
        key, node = next(iter(node.items()))
        path.append(key)
        if isinstance(node, list):
            node = node[-1] if node else None
    return tuple(path)


class Problems:
    """Collects located configuration problems.

    ``source`` names the input (a file path, ``<string>``, ``<dict>``); with a
    :class:`KeyLocator` (TOML) or :class:`JsonKeyLocator` each problem's location is
    ``source:line``.
    """

    def __init__(self, source: str, locator: LinesOfKeys | None = None) -> None:
        self.source = source
        self.locator = locator
        self.errors: list[ConfigError] = []
        self._paths: set[KeyPath] = set()
        self.nested = False
        """Whether the input is a file another one names (a VLLMService's control_plane
        file): the files it names in turn are not read."""

    def add(self, path: KeyPath, message: str) -> None:
        """Record ``message`` about the value at ``path`` (``()`` = the whole input); the
        same message about the same value once (a field's own check and its dataclass's
        may both find it)."""
        error = ConfigError(message, location=self.location(path), key=format_key(path) or None)
        if path in self._paths and any(
            e.key == error.key and e.message == error.message for e in self.errors
        ):
            return
        self._paths.add(path)
        self.errors.append(error)

    def location(self, path: KeyPath) -> str:
        """Where ``path`` is written: ``source:line`` (with a locator), else ``source``."""
        line = self.locator.line_of(path) if self.locator is not None else None
        return self.source if line is None else f"{self.source}:{line}"

    def where(self, path: KeyPath) -> str:
        """``path`` as an error names it: ``source:line: key``."""
        return f"{self.location(path)}: {format_key(path)}"

    def failed(self, path: KeyPath) -> bool:
        """Whether a problem was recorded about ``path`` itself."""
        return path in self._paths

    def failed_under(self, path: KeyPath) -> bool:
        """Whether a problem was recorded about ``path`` or a key inside it."""
        n = len(path)
        return any(p[:n] == path for p in self._paths)

    def sorted(self) -> list[ConfigError]:
        """The problems in file order (those without a line keep their order, last)."""

        def line(error: ConfigError) -> int:
            tail = (error.location or "").rsplit(":", 1)[-1]
            return int(tail) if tail.isascii() and tail.isdigit() else 1 << 30

        return sorted(self.errors, key=line)
