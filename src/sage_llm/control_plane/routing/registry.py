"""Routing strategies by name, as configuration refers to them.

A new strategy is one function in :mod:`~sage_llm.control_plane.routing.strategies` (with
its frozen ``Params`` dataclass) plus one line in :data:`STRATEGIES`. The table is an
immutable tuple; nothing registers at import or run time.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from sage_llm.config_fields import name_key
from sage_llm.control_plane.params import build_params
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
    wanted = name_key(name)
    for spec in STRATEGIES:
        if spec.name == wanted:
            return spec
    raise StrategyNotFoundError(
        f"unknown routing strategy {name!r}; valid names: {', '.join(ROUTING_NAMES)}",
        param="routing_strategy",
    )


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
    parsed = build_params(
        spec.params_type, params, owner=f"routing strategy {spec.name!r}", finite=True
    )
    return spec.build(parsed, rng=random.Random(seed), leg=leg)
