"""Validation helpers for the policies' frozen ``Params`` dataclasses.

Each check raises :class:`~sage_llm.errors.ConfigError` with ``key`` set to the parameter
name, so a bad value in a config file points at the offending key.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from sage_llm.config_fields import shown_value
from sage_llm.control_plane.params import OTHER_USERS
from sage_llm.errors import ConfigError


def check_positive(key: str, value: float, *, allow_inf: bool = True) -> None:
    """``value`` must be a number > 0 (``inf`` allowed unless ``allow_inf`` is False)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"must be a number, got {value!r}", key=key)
    if value <= 0:
        raise ConfigError(f"must be > 0, got {value!r}", key=key)
    if not allow_inf and math.isinf(value):
        raise ConfigError("must be finite", key=key)


def check_non_negative(key: str, value: float) -> None:
    """``value`` must be a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"must be a number, got {value!r}", key=key)
    if value < 0 or math.isinf(value):
        raise ConfigError(f"must be a finite number >= 0, got {value!r}", key=key)


def check_fraction(key: str, value: float) -> None:
    """``value`` must be a number in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ConfigError(f"must be a number, got {value!r}", key=key)
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"must be in [0, 1], got {value!r}", key=key)


def check_count(key: str, value: int, *, minimum: int = 1, maximum: int | None = None) -> None:
    """``value`` must be an integer >= ``minimum`` (and <= ``maximum``, when given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, got {value!r}", key=key)
    if value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value!r}", key=key)
    if maximum is not None and value > maximum:
        raise ConfigError(f"must be <= {maximum}, got {shown_value(value)}", key=key)


def check_choice(key: str, value: object, choices: Collection[str]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"must be one of {valid}, got {value!r}", key=key)


def _reserved_for(name: str) -> str:
    return "the users they do not track" if name == OTHER_USERS else "requests naming no user"


def check_weights(key: str, value: object, reserved: Collection[str] = ()) -> dict[str, float]:
    """``value`` must be a table of names (none of ``reserved``) to numbers > 0 (finite);
    returned as a dict. Its problems are said together, each with its name, under
    ``key``."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"must be a table of names to numbers, got {value!r}", key=key)
    out: dict[str, float] = {}
    problems: list[str] = []
    for name, weight in value.items():
        if not isinstance(name, str):
            problems.append(f"{name!r}: names are strings")
        elif name in reserved:
            problems.append(f"{name!r}: a name the metrics keep for {_reserved_for(name)}")
        elif isinstance(weight, bool) or not isinstance(weight, int | float):
            problems.append(f"{name!r}: must be a number, got {weight!r}")
        elif not weight > 0 or math.isinf(weight):
            problems.append(f"{name!r}: must be a finite number > 0, got {weight!r}")
        else:
            out[name] = float(weight)
    if problems:
        raise ConfigError("; ".join(problems), key=key)
    return out
