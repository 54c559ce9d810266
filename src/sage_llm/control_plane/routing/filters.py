"""Routing filters: each narrows the candidate list before scoring.

A filter returns a subset of its candidates, in their original order, possibly empty (the
pipeline then returns no decision). Filters are pure and stateless.

The candidate list a pipeline starts from (:func:`leg_candidates`) already excludes
unhealthy, draining and full instances and instances of other models; the filters here
repeat some of those checks explicitly so they stay correct when candidates come from
elsewhere (a PD orchestrator composing its own legs, a test).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.types import ExecutionInstanceType

Leg = Literal["whole", "prefill", "decode", "any"]
"""Which part of a request an instance must be able to run:

* ``whole``: the whole request (GENERAL, HYBRID);
* ``prefill``: a PD prefill leg (every role but DECODING);
* ``decode``: a PD decode leg (every role but PREFILLING);
* ``any``: no role restriction.
"""

LEGS: tuple[Leg, ...] = ("whole", "prefill", "decode", "any")

_GENERAL = ExecutionInstanceType.GENERAL
_HYBRID = ExecutionInstanceType.HYBRID
_PREFILLING = ExecutionInstanceType.PREFILLING
_DECODING = ExecutionInstanceType.DECODING


def role_runs(leg: Leg | ExecutionInstanceType, role: ExecutionInstanceType) -> bool:
    """Whether an instance of ``role`` can run ``leg`` (or has exactly that role, when
    ``leg`` is an :class:`ExecutionInstanceType`)."""
    if isinstance(leg, ExecutionInstanceType):
        return role is leg
    if leg == "whole":
        return role.runs_whole_requests
    if leg == "prefill":
        return role.runs_prefill
    if leg == "decode":
        return role.runs_decode
    if leg == "any":
        return True
    raise ValueError(f"unknown leg {leg!r}; expected one of {', '.join(LEGS)}")


def leg_candidates(req: RequestInfo, snap: ClusterSnapshot, leg: Leg) -> list[InstanceView]:
    """Instances that could start ``leg`` of ``req`` right now: same model, a role that runs
    the leg, healthy, accepting, a free slot, and not in ``req.excluded_instances``.

    For ``leg="whole"`` this is exactly :meth:`ClusterSnapshot.runnable`.
    """
    if leg == "whole":
        if type(snap) is not ClusterSnapshot:
            return list(snap.runnable(req))
        # ClusterSnapshot.runnable, inlined (this runs for every routing decision)
        model, excluded = req.model, req.excluded_instances
        return [
            i
            for i in snap.instances
            if i.model == model
            and (i.role is _GENERAL or i.role is _HYBRID)
            and i.healthy
            and i.accepting
            and i.in_flight < i.max_concurrency
            and (not excluded or i.instance_id not in excluded)
        ]
    if leg == "prefill" or leg == "decode":
        # role_runs and has_capacity, inlined (this runs for both legs of a PD decision):
        # a prefill leg runs on every role but DECODING, a decode leg on all but PREFILLING
        model, excluded = req.model, req.excluded_instances
        other = _DECODING if leg == "prefill" else _PREFILLING
        return [
            i
            for i in snap.instances
            if i.model == model
            and i.role is not other
            and i.healthy
            and i.accepting
            and i.in_flight < i.max_concurrency
            and (not excluded or i.instance_id not in excluded)
        ]
    return [
        i
        for i in snap.instances
        if i.model == req.model
        and role_runs(leg, i.role)
        and i.has_capacity
        and i.instance_id not in req.excluded_instances
    ]


class HealthyFilter:
    """Keeps healthy instances that accept work."""

    name = "healthy"

    def filter(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> Sequence[InstanceView]:
        return [c for c in candidates if c.healthy and c.accepting]


class ModelFilter:
    """Keeps instances that serve the request's model."""

    name = "model"

    def filter(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> Sequence[InstanceView]:
        return [c for c in candidates if c.serves(req.model)]


class RoleFilter:
    """Keeps instances whose role can run ``leg`` (see :data:`Leg`), or, given an
    :class:`ExecutionInstanceType`, instances of exactly that role."""

    name = "role"

    def __init__(self, leg: Leg | ExecutionInstanceType = "whole") -> None:
        if not isinstance(leg, ExecutionInstanceType) and leg not in LEGS:
            raise ValueError(f"unknown leg {leg!r}; expected one of {', '.join(LEGS)}")
        self.leg = leg

    def filter(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> Sequence[InstanceView]:
        return [c for c in candidates if role_runs(self.leg, c.role)]


class CapacityFilter:
    """Keeps instances with a free slot, and drops those whose KV cache usage is at or above
    ``kv_threshold`` as long as at least one candidate is below it (a nearly full KV cache
    means preemptions; it is still better than nothing)."""

    name = "capacity"

    def __init__(self, kv_threshold: float = 0.95) -> None:
        if not 0.0 < kv_threshold <= 1.0:
            raise ValueError(f"kv_threshold must be in (0, 1], got {kv_threshold!r}")
        self.kv_threshold = kv_threshold

    def filter(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> Sequence[InstanceView]:
        free = [
            c for c in candidates if c.healthy and c.accepting and c.in_flight < c.max_concurrency
        ]
        return self.filter_runnable(free)

    def filter_runnable(self, candidates: Sequence[InstanceView]) -> Sequence[InstanceView]:
        """:meth:`filter` of candidates already known to be healthy, accepting and with a
        free slot (what :func:`leg_candidates` returns): only the KV-usage part runs."""
        threshold = self.kv_threshold
        for c in candidates:
            if not c.kv_usage < threshold:
                return [c for c in candidates if c.kv_usage < threshold] or candidates
        return candidates


class LoadCapFilter:
    """Drops instances whose load exceeds the least loaded candidate's load plus ``slack``
    (load = :attr:`InstanceView.load`, the fraction of the concurrency bound in use).

    Used to keep a soft preference (topology, prefix) from piling work onto one instance.
    """

    name = "load_cap"

    def __init__(self, slack: float = 0.25) -> None:
        if not 0.0 <= slack <= 1.0:
            raise ValueError(f"slack must be in [0, 1], got {slack!r}")
        self.slack = slack

    def filter(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> Sequence[InstanceView]:
        if not candidates:
            return []
        cap = min(c.load for c in candidates) + self.slack
        return [c for c in candidates if c.load <= cap + 1e-12]
