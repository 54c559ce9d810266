"""A plugin's parameters read from a table: one builder for every ``Params`` dataclass.

Scheduling policies, routing strategies, PD deciders, the PD pairing and the KV
connectors each take a frozen ``Params`` dataclass whose ``__post_init__`` checks its
ranges. :func:`build_params` makes one from a TOML table or a dict and reports every
problem of the table at once, each as a :class:`~sage_llm.errors.ConfigError` whose
``key`` is the parameter, so a config file points at each offending key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sage_llm.config_fields import as_float, described, int64_problem, name_key
from sage_llm.config_locate import format_key
from sage_llm.errors import ConfigError, raise_problems

__all__ = ["Gathered", "build_params"]

MAX_WINDOW = 1_000_000
"""The most outcomes a sliding window keeps (``health.failure_rate_window``, adaptive's
``window``): it is a deque's length, held in memory."""

OTHER_USERS = "(other)"
"""The metrics' ``user`` label of the requests of the users not tracked
(:meth:`~sage_llm.control_plane.metrics.ControlPlaneMetrics.track_users`)."""
NO_USER = "(none)"
"""The metrics' ``user`` label of the requests that name no user, when ``""`` is tracked."""
USER_LABELS = frozenset({OTHER_USERS, NO_USER})
"""The ``user`` labels no configured user may have (a tenant's, a ``user_weights`` key):
its series would mix with those."""

P = TypeVar("P")
T = TypeVar("T")


def build_params(
    params_cls: type[P], raw: Mapping[str, Any] | None, *, owner: str = "", finite: bool = False
) -> P:
    """``params_cls(**raw)``, with every problem of ``raw`` found, not only the first.

    The problems are, in ``raw``'s order: unknown keys, values of the wrong type, and each
    well-typed value's own range (``params_cls`` built with that key alone) when the whole
    table does not build; then a problem between keys (``params_cls`` built with all of
    them) when each key is fine alone. One problem raises its :class:`ConfigError`
    (``key`` set), several raise :class:`ConfigErrors`. A ``float`` field takes an
    integer, an ``X | None`` field takes None, a ``Literal`` field one of its values.

    ``owner`` names what the parameters are for in messages (``"routing strategy
    'affinity'"``); ``finite`` refuses infinite and NaN numbers for ``float`` fields.
    """
    if raw is None:
        return params_cls()
    for_owner = f" for {owner}" if owner else ""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"parameters{for_owner} must be a table, got {raw!r}")
    hints = typing.get_type_hints(params_cls)
    known = [f.name for f in dataclasses.fields(params_cls)]  # type: ignore[arg-type]
    problems: dict[str, ConfigError] = {}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            valid = ", ".join(known) or "none"
            problems[key] = ConfigError(
                f"unknown parameter{for_owner}; valid: {valid}",
                key=format_key((str(key),)),  # "a.b": one name, not a table's
            )
            continue
        try:
            kwargs[key] = _coerce(key, hints[key], value, finite=finite)
        except ConfigError as exc:
            problems[key] = exc
    if not problems:
        try:
            return params_cls(**kwargs)
        except (ConfigError, ValueError):
            pass
    # each well-typed key with the others at their defaults: its own range, or a limit
    alone = {
        k: p
        for k, v in kwargs.items()
        if (p := _alone(params_cls, k, v, {})) is not None and p is not _MASKED
    }
    # the keys fine alone, as given: each failing key is checked again beside them, so a
    # limit another key sets is shown as given ("below overload (0.2)", not its default's
    # 0.1), and a key that failed only against another's default is no problem
    good = {k: v for k, v in kwargs.items() if k not in alone}
    refused = list(problems)  # written, but of no use: a limit one of them sets is unknown
    # the problems among the keys that are fine alone, or with a default they leave: one
    # at a time (a check raises its first), each key found left out for the next
    between: dict[str, ConfigError] = {}
    remaining = dict(good)
    while (found := _between(params_cls, remaining, raw)) is not None:
        key = found.key or ""
        if key in between or key in problems:
            break
        between[key] = found
        if remaining.pop(key, None) is None:
            break
    # beside the keys in no such problem (nor named by one), when those hid a key's own
    involved = {g for k, p in between.items() for g in good if g == k or _names(p, g)}
    clean = {k: v for k, v in good.items() if k not in involved}
    for key in alone:
        problem = _alone(params_cls, key, kwargs[key], good)
        if problem is _MASKED:
            problem = _alone(params_cls, key, kwargs[key], clean)
            if problem is _MASKED:
                problem = alone[key]
        # (not judged against the default of a key that was refused)
        if problem is not None and not any(_names(problem, r) for r in refused):
            problems[key] = problem
    for key, found in between.items():
        problems.setdefault(key, found)
    raise_problems(
        [problems[key] for key in raw if key in problems]
        + [p for key, p in problems.items() if key not in raw]
    )
    return params_cls(**kwargs)  # (raises: with no problem found, it built above)


class Gathered:
    """The configuration problems of several plugins built one after the other, each
    under the key it was given by (``policy_params.max_wait_s``), raised at once by
    :meth:`raise_any`, so a caller hears of every bad table, not only the first."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []

    def built(self, build: Callable[[], T], key: str | Callable[[str | None], str]) -> T | None:
        """``build()``; None when it raised :class:`ConfigError`, whose problems are kept
        with their keys under ``key`` (a prefix, or a function of the problem's key)."""
        try:
            return build()
        except ConfigError as exc:
            for one in exc.each():
                if isinstance(key, str):
                    self.errors.append(one.under(key))
                else:
                    self.errors.append(
                        ConfigError(one.detail, location=one.location, key=key(one.key))
                    )
            return None

    def raise_any(self) -> None:
        """Raise what was gathered (see :func:`~sage_llm.errors.raise_problems`)."""
        raise_problems(self.errors)


def _names(problem: ConfigError, key: str) -> bool:
    """Whether ``problem``'s words name the parameter ``key`` (a limit it sets)."""
    return re.search(rf"\b{re.escape(str(key))}\b", problem.detail) is not None


def _builds(params_cls: type[Any], values: Mapping[str, Any], without: str) -> bool:
    """Whether ``params_cls`` builds from ``values`` less the key ``without``."""
    try:
        params_cls(**{k: v for k, v in values.items() if k != without})
    except (ConfigError, ValueError):
        return False
    return True


def _alone(
    params_cls: type[Any], key: str, value: Any, others: Mapping[str, Any]
) -> ConfigError | None:
    """The problem of ``key = value`` beside ``others`` (the rest at their defaults), or
    :data:`_MASKED` when another key's problem was raised first (a check raises its
    first: ``key``'s is then unknown)."""
    try:
        params_cls(**{**others, key: value})
    except ConfigError as exc:
        return exc if exc.key == key else _MASKED
    except ValueError as exc:
        return ConfigError(str(exc), key=key)
    return None


_MASKED = ConfigError("(a problem of another key came first)")
"""What :func:`_alone` answers when a problem among ``others`` came before ``key``'s."""


def _between(
    params_cls: type[Any], good: Mapping[str, Any], raw: Mapping[str, Any]
) -> ConfigError | None:
    """The problem of building with ``good`` (keys each fine alone), if any. One filed under
    a key the table does not give (a default that a given key conflicts with) is filed
    under the given key it conflicts with instead (the first whose leaving out clears it),
    saying so."""
    try:
        params_cls(**good)
    except ConfigError as exc:
        if exc.key is None or exc.key in raw:
            return exc
        given = next((k for k in good if _builds(params_cls, good, k)), None)
        if given is None:
            return exc
        default = getattr(params_cls(), exc.key, None)
        return ConfigError(
            f"conflicts with {exc.key} at its default ({default}): {exc.key} {exc.detail}",
            key=given,
        )
    except ValueError as exc:
        return ConfigError(str(exc))
    return None


def _coerce(key: str, hint: Any, value: Any, *, finite: bool) -> Any:
    """``value`` as the field's type (``hint``), or ConfigError."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args:
            if value is None:
                return None
            rest = [a for a in args if a is not type(None)]
            hint = rest[0] if len(rest) == 1 else hint
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        if isinstance(value, str):  # read as policy and strategy names are (name_key)
            for choice in choices:
                if isinstance(choice, str) and name_key(choice) == name_key(value):
                    return choice
        raise ConfigError(
            f"must be one of {', '.join(map(repr, choices))}, got {described(value)}", key=key
        )
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"must be a number, got {described(value)}", key=key)
        number = as_float(value)
        if number is None:
            raise ConfigError(f"must be a number a float can hold, got {described(value)}", key=key)
        if finite and not math.isfinite(number):
            raise ConfigError(f"must be finite, got {value!r}", key=key)
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {described(value)}", key=key)
        if (problem := int64_problem(value)) is not None:
            raise ConfigError(problem, key=key)
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {described(value)}", key=key)
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"must be a string, got {described(value)}", key=key)
        return value
    return value
