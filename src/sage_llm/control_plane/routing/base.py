"""Routing decides WHERE a request runs: filters → weighted scorers → picker.

Contract (every plugin in this package keeps it):

* Pure and synchronous: no I/O, no clocks (use ``snap.now``), must not block.
* ``Filter.filter`` returns a subset of its candidates (possibly empty).
* ``Scorer.score`` returns a score in [0, 1] for every candidate; higher is better.
* ``Picker.pick`` chooses one id from a non-empty mapping of combined scores, using only
  the ``random.Random`` it is given for randomness (deterministic under a seed).
* A :class:`Router` returns None when no candidate survives the filters.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    instance_id: str
    reason: str = ""
    scores: Mapping[str, float] = field(default_factory=dict)
    prefill_instance_id: str | None = None
    """Set for a PD decision: the prefill leg's instance (``instance_id`` is the decode one)."""


@runtime_checkable
class Filter(Protocol):
    name: str

    def filter(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> Sequence[InstanceView]: ...


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]: ...


@runtime_checkable
class Picker(Protocol):
    name: str

    def pick(self, scores: Mapping[str, float], rng: random.Random) -> str: ...


@runtime_checkable
class Router(Protocol):
    name: str

    def route(
        self, req: RequestInfo, snap: ClusterSnapshot, allowed: frozenset[str] | None = None
    ) -> RoutingDecision | None:
        """Pick an instance for ``req`` among ``snap.runnable(req)`` (restricted to
        ``allowed`` when given), or None when there is none."""
        ...

    def describe(self) -> dict[str, object]: ...


def route_id(
    router: Router, req: RequestInfo, snap: ClusterSnapshot, allowed: frozenset[str] | None = None
) -> str | None:
    """The instance ``router`` routes ``req`` to, or None: its ``route_id`` where it has one
    (a :class:`~sage_llm.control_plane.routing.pipeline.Pipeline`: no decision reason is
    written), else the id of its ``route`` decision."""
    by_id = getattr(router, "route_id", None)
    if by_id is not None:
        chosen: str | None = by_id(req, snap, allowed)
        return chosen
    decision = router.route(req, snap, allowed)
    return None if decision is None else decision.instance_id


# The protocols the pipeline checks components against at run time live here, not in
# pipeline.py: a module compiled by mypyc (``sage_llm.sim.accel``) cannot define a
# ``runtime_checkable`` protocol.


@runtime_checkable
class RoutingObserver(Protocol):
    """A pipeline component told of every decision its pipeline makes."""

    def on_routed(self, req: RequestInfo, decision: RoutingDecision) -> None: ...


@runtime_checkable
class OneHotScorer(Protocol):
    """A scorer that scores exactly one candidate 1.0 and every other 0.0, and can name
    that candidate without building the scores (the round-robin cursor). Alone in a
    pipeline with the max picker, it decides: the pipeline asks it for :meth:`winner`."""

    def winner(self, req: RequestInfo, candidates: Sequence[InstanceView]) -> str:
        """The candidate :meth:`Scorer.score` scores 1.0 (``candidates`` is not empty)."""
        ...


@runtime_checkable
class Describable(Protocol):
    """A pipeline component with state worth showing (``Pipeline.describe``)."""

    def describe(self) -> dict[str, object]: ...
