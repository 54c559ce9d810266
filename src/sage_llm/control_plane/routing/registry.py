"""Routing strategies by name, as configuration refers to them.

A new strategy is one function in :mod:`~sage_llm.control_plane.routing.strategies` (with
its frozen ``Params`` dataclass) plus one line in :data:`STRATEGIES`. The table is an
immutable tuple; nothing registers at import or run time.
"""

from __future__ import annotations

import dataclasses
import math
import random
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sage_llm.control_plane.routing import strategies as st
from sage_llm.control_plane.routing.filters import LEGS, Leg
from sage_llm.control_plane.routing.pipeline import Pipeline
from sage_llm.errors import ConfigError, StrategyNotFoundError

P = TypeVar("P")
P_contra = TypeVar("P_contra", contravariant=True)


class StrategyFactory(Protocol[P_contra]):
    """The shape of a strategy function."""

    def __call__(
        self,
        params: P_contra | None = None,
        *,
        rng: random.Random | None = None,
        leg: Leg = "whole",
    ) -> Pipeline: ...


@dataclass(frozen=True, slots=True)
class StrategySpec(Generic[P]):
    """A named strategy: its ``Params`` dataclass and the function that builds it."""

    name: str
    params_type: type[P]
    build: StrategyFactory[P]


STRATEGIES: tuple[StrategySpec[Any], ...] = (
    StrategySpec("load_balanced", st.LoadBalancedParams, st.load_balanced),
    StrategySpec("round_robin", st.RoundRobinParams, st.round_robin),
    StrategySpec("random", st.RandomParams, st.random_choice),
    StrategySpec("power_of_two", st.PowerOfTwoParams, st.power_of_two),
    StrategySpec("affinity", st.AffinityParams, st.affinity),
    StrategySpec("locality", st.LocalityParams, st.locality),
    StrategySpec("topology_aware", st.TopologyAwareParams, st.topology_aware),
)

ROUTING_NAMES: tuple[str, ...] = tuple(s.name for s in STRATEGIES)
"""Every routing strategy name, in documentation order."""


def get_strategy(name: str) -> StrategySpec[Any]:
    """The strategy called ``name`` (case-insensitive, ``-`` read as ``_``).

    Raises :class:`StrategyNotFoundError` listing the valid names.
    """
    wanted = str(name).strip().lower().replace("-", "_")
    for spec in STRATEGIES:
        if spec.name == wanted:
            return spec
    raise StrategyNotFoundError(
        f"unknown routing strategy {name!r}; valid names: {', '.join(ROUTING_NAMES)}",
        param="routing_strategy",
    )


def parse_params(spec: StrategySpec[P], raw: Mapping[str, Any] | None) -> P:
    """``raw`` (e.g. a TOML table) checked and converted into ``spec.params_type``.

    Raises :class:`ConfigError` with ``key`` set for an unknown key, a value of the wrong
    type, or a value out of range.
    """
    params_type = spec.params_type
    if raw is None:
        return params_type()
    if not isinstance(raw, Mapping):
        raise ConfigError(
            f"parameters of routing strategy {spec.name!r} must be a table, got {raw!r}",
            key=spec.name,
        )
    hints = typing.get_type_hints(params_type)
    known = [f.name for f in dataclasses.fields(params_type)]  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            valid = ", ".join(known) or "none"
            raise ConfigError(
                f"unknown parameter for routing strategy {spec.name!r}; valid: {valid}",
                key=str(key),
            )
        kwargs[key] = _coerce(key, hints[key], value)
    return params_type(**kwargs)


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """``value`` converted to the field's scalar type, or ConfigError."""
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"must be a number, got {value!r}", key=key)
        if not math.isfinite(value):
            raise ConfigError(f"must be finite, got {value!r}", key=key)
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"must be an integer, got {value!r}", key=key)
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}", key=key)
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"must be a string, got {value!r}", key=key)
        return value
    return value


def build_router(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    seed: int | None = None,
    leg: Leg = "whole",
) -> Pipeline:
    """The routing strategy ``name`` with ``params`` applied, as a fresh router.

    ``seed`` makes its random choices reproducible (None: seeded from the OS). ``leg``
    chooses what the candidates must be able to run (``"whole"`` requests by default; a PD
    orchestrator asks for ``"prefill"`` or ``"decode"``).

    Raises :class:`StrategyNotFoundError` for an unknown name and :class:`ConfigError`
    (with ``key``) for unknown or invalid parameters.
    """
    spec = get_strategy(name)
    if leg not in LEGS:
        raise ConfigError(f"unknown leg {leg!r}; expected one of {', '.join(LEGS)}", key="leg")
    parsed = parse_params(spec, params)
    return spec.build(parsed, rng=random.Random(seed), leg=leg)
