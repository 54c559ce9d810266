"""Reading frozen dataclasses from TOML tables: the typed checks behind ``sage_llm.config``.

:func:`read_dataclass` fills a dataclass from a table, field by field, driven by its type
hints and the :class:`Rule` each field carries (``opt(1, rule(ge=1))``): unknown keys (with a
"did you mean"), wrong types (an integer is a fine float, a boolean is not an integer), enum
values and ranges are all reported to a :class:`~sage_llm.config_locate.Problems`, located by
file, line and dotted key. A bad value leaves its field at the default so that checking goes
on and every problem of a file is found. A secret field's value never appears in a message,
a ``repr`` or :func:`to_plain`'s output. Tables built in code may hold an enum member where a
name is expected, and a dataclass object where a table is (its values are checked alike).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import enum
import json
import math
import re
import stat
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from sage_llm.config_locate import KeyPath, Problems
from sage_llm.errors import ConfigError

T = TypeVar("T")
ForeignRules = Mapping[type[Any], Mapping[str, "Rule"]]


@dataclasses.dataclass(frozen=True)
class Rule:
    """What a field's value must satisfy beyond its type (for a tuple: each element).

    ``norm`` rewrites a string before ``choices`` is checked; ``check`` returns an error
    message or None; a ``secret`` value is kept out of messages, ``repr`` and dumps.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    choices: tuple[str, ...] | None = None
    norm: Callable[[str], str] | None = None
    nonempty: bool = False
    secret: bool = False
    check: Callable[[str], str | None] | None = None


def rule(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    choices: Sequence[str] | None = None,
    norm: Callable[[str], str] | None = None,
    nonempty: bool = False,
    secret: bool = False,
    check: Callable[[str], str | None] | None = None,
) -> Rule:
    """A :class:`Rule`."""
    return Rule(
        ge, gt, le, tuple(choices) if choices is not None else None, norm, nonempty, secret, check
    )


def opt(default: Any, checks: Rule | None = None) -> Any:
    """A dataclass field with ``default`` and a :class:`Rule` (secrets left out of repr)."""
    checks = checks or Rule()
    return dataclasses.field(default=default, metadata={"rule": checks}, repr=not checks.secret)


def req(checks: Rule) -> Any:
    """A required dataclass field with a :class:`Rule`."""
    return dataclasses.field(metadata={"rule": checks}, repr=not checks.secret)


def suggest(word: str, valid: Sequence[str], what: str = "keys") -> str:
    """`` (did you mean 'x'?)`` for a close match, else `` (valid <what>: a, b)``. A word
    that is the first (or else the last) part of exactly one valid ``_``-joined key is
    matched to it (``model`` to ``model_name``, ``type`` to ``instance_type``), before
    spelling is looked at."""
    for parts in (
        [k for k in valid if k.startswith(f"{word}_")],
        [k for k in valid if k.endswith(f"_{word}")],
    ):
        if len(parts) == 1:
            return f" (did you mean {parts[0]!r}?)"
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (valid {what}: {', '.join(valid) or 'none'})"


def read_dataclass(
    cls: type[T],
    table: Mapping[str, Any],
    path: KeyPath,
    p: Problems,
    *,
    extra_keys: Sequence[str] = (),
    foreign: ForeignRules | None = None,
) -> T | None:
    """``cls`` built from ``table``; problems go to ``p``. Keys in ``extra_keys`` are allowed
    and skipped; ``foreign`` gives rules for dataclasses whose fields carry none. A bad value
    leaves the field at its default; None is returned only when ``cls`` cannot be built.
    Its own checks across fields are reported only when every field was valid: with a
    default in a bad value's place they would judge a value nobody wrote."""
    fields, hints = _fields_and_hints(cls)
    kwargs: dict[str, Any] = {}
    before = len(p.errors)
    for key, value in table.items():
        if key not in fields:
            if key not in extra_keys:
                p.add((*path, str(key)), f"unknown key{suggest(str(key), [*fields, *extra_keys])}")
            continue
        if value is None:
            continue  # "not set" (a dict may carry None; TOML cannot)
        checks = fields[key].metadata.get("rule") or (foreign or {}).get(cls, {}).get(key, Rule())
        converted = _convert(value, hints[key], checks, (*path, key), p, foreign)
        if converted is not _INVALID:
            kwargs[key] = converted
    missing = False
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            missing = True
            if table.get(name) is None:
                p.add((*path, name), "is required")
    if missing:
        return None
    try:
        return cls(**kwargs)
    except FieldValueError as exc:  # a check across fields, naming the one it refuses
        if len(p.errors) == before:
            p.add((*path, *exc.key.split(".")), exc.detail)
        return None
    except (ValueError, TypeError) as exc:
        if len(p.errors) == before:
            p.add(path, str(exc))
        return None


_Shape = tuple[dict[str, "dataclasses.Field[Any]"], dict[str, Any]]
_SHAPES: dict[type[Any], _Shape] = {}


def _fields_and_hints(cls: type[Any]) -> _Shape:
    """``cls``'s init fields by name and its resolved type hints (computed once per class)."""
    shape = _SHAPES.get(cls)
    if shape is None:
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not _derived(f)}
        shape = _SHAPES[cls] = (fields, typing.get_type_hints(cls))
    return shape


def read_params(build: Callable[[], object], path: KeyPath, p: Problems) -> None:
    """Run ``build`` (a plugin's own parameter check); its errors are located under ``path``
    (a dotted key of the error, ``metadata.pairing_params.top_k``, as the keys it names)."""
    try:
        build()
    except ConfigError as exc:
        for one in exc.each():
            p.add((*path, *key_parts(one.key)) if one.key else path, one.detail)
    except (ValueError, TypeError) as exc:
        p.add(path, str(exc))


_KEY_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|\[\d+\]|[^.\[\]"]+')


def key_parts(key: str) -> KeyPath:
    """A dotted key of an error, as :func:`~sage_llm.config_locate.format_key` writes it
    (``instances[1].port``, ``sampling."top.p"``), as a key path (``("instances", 1,
    "port")``): array indexes as the numbers they are, quoted parts unquoted."""
    parts: list[str | int] = []
    for token in _KEY_TOKEN.findall(key):
        if token.startswith('"'):
            parts.append(json.loads(token))
        elif token.startswith("["):
            parts.append(int(token[1:-1]))
        else:
            parts.append(token)
    return tuple(parts)


class _Invalid:
    pass


_INVALID = _Invalid()


def _kind(value: Any) -> str:
    if value is None:  # a JSON body's null (TOML has none)
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {int: "integer", float: "float", str: "string", list: "array", tuple: "array"}
    for typ, name in names.items():
        if isinstance(value, typ):
            return name
    return "table" if isinstance(value, Mapping) else type(value).__name__


def described(value: Any, *, secret: bool = False) -> str:
    """A value as a type error names it: ``string '800'``, ``boolean true``, ``table``
    (a secret's kind only)."""
    shown = ""
    if isinstance(value, bool):
        shown = f" {str(value).lower()}"
    elif not secret and isinstance(value, int) and value.bit_length() > 128:
        digits = len(str(abs(value))) if value.bit_length() < 10_000 else "over 3,000"
        shown = f" of {digits} digits"  # str() of a longer one is refused
    elif not secret and isinstance(value, str | int | float):
        text = repr(value)
        shown = f" {text[:40]}…" if len(text) > 40 else f" {text}"
    return f"{_kind(value)}{shown}"


def name_key(name: object) -> str:
    """A plugin's name as it is looked up (policies, routing strategies, PD deciders and
    the parameters that name one): case-insensitive, ``-`` read as ``_``
    (``Cost-Optimized`` is ``cost_optimized``)."""
    return str(name).strip().lower().replace("-", "_")


def shown_value(value: Any) -> str:
    """``repr(value)``, or for an integer too long to show so, its size (``integer of 401
    digits``: ``str`` of one past 4,300 digits is refused)."""
    long = isinstance(value, int) and value.bit_length() > 128
    return described(value) if long else repr(value)


def _wrong(value: Any, expected: str, checks: Rule, path: KeyPath, p: Problems) -> _Invalid:
    p.add(path, f"must be {expected}, got {described(value, secret=checks.secret)}")
    return _INVALID


def _convert(
    value: Any, hint: Any, checks: Rule, path: KeyPath, p: Problems, foreign: ForeignRules | None
) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):  # an object built in code: its values are checked
            value = {
                f.name: getattr(value, f.name)
                for f in dataclasses.fields(hint)
                if f.init and not _derived(f)
            }
        if not isinstance(value, Mapping):
            return _wrong(value, "a table", checks, path, p)
        built = read_dataclass(hint, value, path, p, foreign=foreign)
        return _INVALID if built is None else built
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        if isinstance(value, hint):
            return value
        numbered = issubclass(hint, enum.IntEnum) and isinstance(value, int)
        if not isinstance(value, str) and (not numbered or isinstance(value, bool)):
            expected = "a string or an integer" if issubclass(hint, enum.IntEnum) else "a string"
            return _wrong(value, expected, checks, path, p)
        try:
            return hint.parse(value)  # type: ignore[attr-defined]
        except ValueError as exc:
            p.add(path, str(exc))
            return _INVALID
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            return _wrong(value, "an array", checks, path, p)
        items = [_convert(v, args[0], checks, (*path, i), p, foreign) for i, v in enumerate(value)]
        if any(item is _INVALID for item in items):
            return _INVALID
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or hint is dict:
        if not isinstance(value, Mapping):
            return _wrong(value, "a table", checks, path, p)
        return copy.deepcopy(dict(value))
    if hint is Any:
        return value
    return _scalar(value, hint, checks, path, p)


def _scalar(value: Any, hint: Any, checks: Rule, path: KeyPath, p: Problems) -> Any:
    if hint is bool:
        return value if isinstance(value, bool) else _wrong(value, "true or false", checks, path, p)
    if hint is str:
        if not isinstance(value, str):
            return _wrong(value, "a string", checks, path, p)
        if checks.norm is not None:
            value = checks.norm(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        return _wrong(value, "an integer", checks, path, p)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return _wrong(value, "a number", checks, path, p)
        number = as_float(value)
        if number is None:
            p.add(path, f"must be a number a float can hold, got {described(value)}")
            return _INVALID
        if not math.isfinite(number):
            p.add(path, f"must be a finite number, got {value!r}")
            return _INVALID
        value = number
    problem = rule_problem(value, checks)
    if problem is not None:
        p.add(path, problem)
        return _INVALID
    return value


def as_float(value: int | float) -> float | None:
    """``value`` as a float; None for an integer beyond a float's range (``10**400``)."""
    try:
        return float(value)
    except OverflowError:
        return None


SECRET_MASK = "***"
"""What :func:`to_plain` writes in a secret's place; refused as a secret's value."""


def env_mask_problem(name: str, what: str = "") -> str:
    """Why environment variable ``name``, holding :data:`SECRET_MASK` (``what``: as one
    of its keys, say), gives no secret."""
    return (
        f'environment variable {name} holds "{SECRET_MASK}"{what}, the mask a dumped '
        "configuration writes in place of a secret: give the secret itself"
    )


def only_one(given: Sequence[str]) -> str:
    """Why the keys ``given`` (two or three ways to give one secret) cannot all be set."""
    if len(given) == 2:
        return f"set {given[0]} or {given[1]}, not both"
    return f"set only one of {', '.join(given[:-1])} and {given[-1]}"


SECRET_FILE_MAX_BYTES = 64 * 1024
"""The most a secret file (``api_keys_file``, ``admin_token_file``, a tenant's
``api_key_file``) may hold: more is not a file of keys."""


def secret_file_path(value: str, base: Path) -> Path:
    """Where a ``*_file`` key's ``value`` points: ``~`` expanded, a relative path taken from
    ``base`` (the directory of the configuration file that names it); :class:`ValueError`
    for a ``~user`` with no such user."""
    try:
        path = Path(value).expanduser()
    except RuntimeError:  # ~user of no user the system knows
        raise ValueError(f"cannot find the home directory {value.split('/', 1)[0]!r}") from None
    return path if path.is_absolute() else base / path


def _secret_file_text(path: Path) -> str:
    """The text of a secret file, stripped; :class:`ValueError` with the problem (naming
    the file, never quoting what it holds)."""
    try:
        mode = path.stat().st_mode  # a link is followed to its file
    except FileNotFoundError:
        raise ValueError(f"file {path} does not exist") from None
    except OSError as exc:
        raise ValueError(f"cannot read file {path}: {exc.strerror or exc}") from None
    except ValueError:  # a path no system call takes
        raise ValueError(
            f"cannot read file {str(path)!r}: the path holds a NUL character"
        ) from None
    if stat.S_ISDIR(mode):
        raise ValueError(f"{path} is a directory, not a file")
    if not stat.S_ISREG(mode):  # a FIFO or a device would hold its reader for ever
        raise ValueError(f"{path} is not a regular file")
    try:
        with path.open("rb") as handle:
            data = handle.read(SECRET_FILE_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read file {path}: {exc.strerror or exc}") from None
    if len(data) > SECRET_FILE_MAX_BYTES:
        raise ValueError(
            f"file {path} holds more than {SECRET_FILE_MAX_BYTES // 1024} KiB: not a file of "
            "secrets"
        )
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise ValueError(f"file {path} is not UTF-8 text") from None
    if not text.strip():
        raise ValueError(f"file {path} is empty")
    return text.strip()


def _file_secret_problem(path: Path, value: str) -> str | None:
    if value == SECRET_MASK:
        return (
            f'file {path} holds "{SECRET_MASK}", the mask a dumped configuration writes in '
            "place of a secret: give the secret itself"
        )
    if has_control_characters(value):
        return f"file {path} holds control characters (a key goes in an HTTP header)"
    return None


def read_secret_file(path: Path) -> str:
    """The one secret (an admin token, a tenant's key) file ``path`` holds, white space
    around it dropped; :class:`ValueError` when it holds none, more than one line, or what
    no HTTP header carries."""
    text = _secret_file_text(path)
    if "\n" in text or "\r" in text:
        raise ValueError(f"file {path} holds more than one line: it must hold the secret alone")
    if (problem := _file_secret_problem(path, text)) is not None:
        raise ValueError(problem)
    return text


def read_keys_file(path: Path) -> list[str]:
    """The API keys file ``path`` holds: one a line, or several on a line separated by
    commas (as ``api_keys_env``'s variable), blank lines skipped; :class:`ValueError` when
    it holds none or one no HTTP header carries."""
    text = _secret_file_text(path).replace("\r\n", "\n").replace("\r", "\n")
    # lines end at \n alone: any other character splitlines() takes for a line's end (a
    # form feed …) stays in its key, where the check below refuses it
    keys = [key.strip() for line in text.split("\n") for key in line.split(",")]
    keys = [key for key in keys if key]
    if not keys:
        raise ValueError(f"file {path} holds no API key (only commas and spaces)")
    for key in keys:
        if (problem := _file_secret_problem(path, key)) is not None:
            raise ValueError(problem)
    return keys


def secret_problem(value: str) -> str | None:
    """Why ``value`` cannot be a key a client or the gateway sends in an HTTP header, or
    None; the message never quotes it."""
    if value != value.strip():
        return "must not begin or end with white space (a key is compared as written)"
    if has_control_characters(value):
        return "must not contain control characters (it goes in an HTTP header)"
    return None


def name_problem(value: str) -> str | None:
    """Names shown in logs, metric labels and model lists: no control characters, and no
    white space at either end (a model served as ``"m "`` answered a request for ``m``
    with a 404 that listed it)."""
    if not value.isprintable():
        return f"must not contain control characters, got {value!r}"
    if value != value.strip():
        return f"must not begin or end with white space, got {value!r}"
    return None


def has_control_characters(text: str) -> bool:
    """Whether ``text`` holds an ASCII control character (one no HTTP header may carry)."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


INT64_MAX = 2**63 - 1
"""The largest integer a config field takes (a signed 64-bit one's)."""


def rule_problem(value: object, checks: Rule) -> str | None:
    """What is wrong with a (well-typed) ``value`` under ``checks``, or None."""
    if isinstance(value, str):
        if checks.nonempty and not value.strip():
            return "must not be empty"
        if checks.secret and value == SECRET_MASK:  # a dumped config loaded back
            return (
                f'is "{SECRET_MASK}", the mask a dumped configuration writes in place of a '
                "secret: give the secret itself (to_dict(secrets=True) keeps them)"
            )
        if checks.secret and (problem := secret_problem(value)) is not None:
            return problem
        if checks.choices is not None and value not in checks.choices:
            if checks.secret:
                return "is not one of the allowed values"
            return f"unknown value {value!r}{suggest(value, checks.choices, 'values')}"
        message = checks.check(value) if checks.check is not None else None
        return "is not valid" if message is not None and checks.secret else message
    if isinstance(value, int | float) and not isinstance(value, bool):
        for bound, word in ((checks.ge, ">="), (checks.gt, ">"), (checks.le, "<=")):
            if bound is None:
                continue
            broken = (
                value < bound if word == ">=" else value <= bound if word == ">" else value > bound
            )
            if broken:
                shown = int(bound) if float(bound).is_integer() else bound
                return f"must be {word} {shown}, got {shown_value(value)}"
    if isinstance(value, int) and not isinstance(value, bool):
        return int64_problem(value)
    return None


DERIVED = "derived"
"""The metadata key of a dataclass field derived when a file is read (not one of its
keys): read from no file, written in no dump, carried by ``dataclasses.replace``."""


def _derived(f: dataclasses.Field[Any]) -> bool:
    return bool(f.metadata.get(DERIVED))


def beyond_int64(value: object) -> TypeGuard[int | float]:
    """Whether ``value`` is a whole number no 64-bit integer holds: an integer out of
    range, or a whole float of 2**63 or more in size (JSON reads an integer past 64 bits
    as one, -2**63 - 1 as -2**63 among them)."""
    if isinstance(value, float):
        return value.is_integer() and abs(value) >= 2**63
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and not -INT64_MAX - 1 <= value <= INT64_MAX
    )


def int64_problem(value: int) -> str | None:
    """What is wrong with an integer beyond 64 bits, or None: counts and sizes go into
    float arithmetic (a price, a deadline, a transfer time) and into engines."""
    if value > INT64_MAX:
        return f"must be at most {INT64_MAX} (64 bits), got {shown_value(value)}"
    if value < -INT64_MAX - 1:
        return f"must be at least {-INT64_MAX - 1} (64 bits), got {shown_value(value)}"
    return None


class FieldValueError(ValueError):
    """A dataclass's own check (across its fields) refusing the value of field ``key``
    (dotted for a key inside it: ``metadata.sim_gpu``): a file's problem is then located
    at that key."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"{key}: {detail}")
        self.key = key
        self.detail = detail


def validate(obj: object, foreign: ForeignRules | None = None) -> None:
    """Raise ValueError naming the field when a field of dataclass ``obj`` has the wrong
    type, a number that is not finite, or breaks its :class:`Rule`: the checks a file's
    value gets, for objects built in code (a nested dataclass has been checked when it was
    built). A value the file loader would read is read the same way and stored back (a
    name in any case, ``"SIM"`` as ``"sim"``; a list for a tuple; an enum's name; a table
    for a nested dataclass), so that the object's own checks and its users see it as a
    loaded one's. ``foreign`` gives the rules of nested dataclasses that have none of their
    own (the seed's PD and role configs), as a file's reading applies them."""
    fields, hints = _fields_and_hints(type(obj))
    p = Problems("<code>")
    for name, f in fields.items():
        value = getattr(obj, name)
        hint = hints[name]
        if value is None and _optional(hint):
            continue
        if (
            isinstance(hint, type)
            and dataclasses.is_dataclass(hint)
            and isinstance(value, hint)
            and (foreign is None or hint not in foreign)  # else checked by its rules here
        ):
            continue
        converted = _convert(value, hint, f.metadata.get("rule") or Rule(), (name,), p, foreign)
        if p.errors:
            raise ValueError(f"{p.errors[0].key}: {p.errors[0].detail}")
        if converted is not value:
            object.__setattr__(obj, name, converted)


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (types.UnionType, typing.Union) and type(None) in (
        typing.get_args(hint)
    )


def to_plain(value: Any, mask: str | None = SECRET_MASK) -> Any:
    """``value`` (dataclasses, enums, tuples, mappings) as plain data, secrets replaced by
    ``mask`` (None: kept)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            if not f.init or _derived(f):  # not a key of a file
                continue
            item = getattr(value, f.name)
            checks = f.metadata.get("rule")
            if mask is not None and checks is not None and checks.secret and item:
                item = [mask] * len(item) if isinstance(item, tuple) else mask
            out[f.name] = to_plain(item, mask)
        return out
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, list | tuple):
        return [to_plain(v, mask) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_plain(v, mask) for k, v in value.items()}
    return value


LATENCY_PRIORS = {"tpot_ms": 20.0, "ttft_base_ms": 50.0, "prefill_tokens_per_s": 8000.0}
"""An instance's ``metadata`` entries the control plane starts its latency estimates from
(HTTP instances; simulated ones get their engine's), with their defaults."""


def latency_prior_problem(value: object, key: str) -> str | None:
    """What is wrong with ``value`` as the latency prior ``key``, or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"must be a finite number, got {described(value)}"
    number = as_float(value)  # an integer no float holds: too large to be a latency
    if number is None or not math.isfinite(number):
        return f"must be a finite number, got {shown_value(value)}"
    if key == "ttft_base_ms":
        return None if value >= 0 else f"must be >= 0, got {value!r}"
    return None if value > 0 else f"must be > 0, got {value!r}"


CHECKED_METADATA = frozenset({*LATENCY_PRIORS, "bootstrap_port"})
"""The ``metadata`` entries of an instance the control plane reads (checked wherever an
instance is: a config file, ``check_instance``, the admin API)."""


def metadata_problem(key: str, value: object) -> str | None:
    """What is wrong with ``value`` as the ``metadata`` entry ``key`` (one of
    :data:`CHECKED_METADATA`; another key: None)."""
    if key in LATENCY_PRIORS:
        return latency_prior_problem(value, key)
    port = isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536
    if key == "bootstrap_port" and not port:  # where SGLang decode legs fetch the KV from
        return f"must be a TCP port (an integer in 1..65535), got {described(value)}"
    return None


def latency_prior(metadata: Mapping[str, Any], key: str) -> float:
    """The latency prior ``key`` of an instance's ``metadata`` (its default when absent);
    :class:`~sage_llm.errors.ConfigError` naming ``metadata.<key>`` when it is not a
    finite number above 0 (``ttft_base_ms``: 0 or more)."""
    value = metadata.get(key, LATENCY_PRIORS[key])
    problem = latency_prior_problem(value, key)
    if problem is not None:
        raise ConfigError(problem, key=f"metadata.{key}")
    return float(value)
