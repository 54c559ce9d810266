"""The named routing strategies: each is a preset :class:`Pipeline`.

Every strategy is one function ``name(params=None, *, rng=None, leg="whole") -> Pipeline``
with a frozen ``Params`` dataclass; :mod:`sage_llm.control_plane.routing.registry` maps the
names used in configuration to them. ``docs/routing.md`` describes each preset.

Params validate themselves and raise :class:`~sage_llm.errors.ConfigError` naming the bad
key, since they usually come from a configuration file.
"""

from __future__ import annotations

import math
import random
import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from operator import attrgetter

from sage_llm.control_plane.routing.base import Router, RoutingDecision
from sage_llm.control_plane.routing.filters import CapacityFilter, Leg, LoadCapFilter
from sage_llm.control_plane.routing.pickers import MaxPicker, PowerOfTwoPicker, WeightedRandomPicker
from sage_llm.control_plane.routing.pipeline import Pipeline
from sage_llm.control_plane.routing.scorers import (
    KVUsageScorer,
    LatencyScorer,
    LeastOutstandingScorer,
    PreferredInstanceScorer,
    PrefixMatchScorer,
    QueueDepthScorer,
    SessionAffinityScorer,
    TopologyScorer,
)
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.errors import ConfigError

# --------------------------------------------------------------------------- validation


def _fraction(key: str, value: float, *, allow_zero: bool = True) -> None:
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (math.isfinite(value) and low_ok and value <= 1.0):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"must be in {bound}, got {value!r}", key=key)


def _weight(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(f"must be a finite number >= 0, got {value!r}", key=key)


def _some_weight(**weights: float) -> None:
    for key, value in weights.items():
        _weight(key, value)
    if not any(v > 0.0 for v in weights.values()):
        names = ", ".join(weights)
        raise ConfigError(f"at least one of {names} must be > 0", key=next(iter(weights)))


# --------------------------------------------------------------------------- params


@dataclass(frozen=True, slots=True)
class LoadBalancedParams:
    """Weights of the load scorers, and the KV usage above which instances are avoided."""

    outstanding_weight: float = 1.0
    queue_weight: float = 1.0
    kv_weight: float = 0.5
    latency_weight: float = 0.0
    preferred_weight: float = 0.0
    kv_threshold: float = 0.95

    def __post_init__(self) -> None:
        _some_weight(
            outstanding_weight=self.outstanding_weight,
            queue_weight=self.queue_weight,
            kv_weight=self.kv_weight,
            latency_weight=self.latency_weight,
        )
        _weight("preferred_weight", self.preferred_weight)
        _fraction("kv_threshold", self.kv_threshold, allow_zero=False)


@dataclass(frozen=True, slots=True)
class RoundRobinParams:
    """KV usage above which an instance is skipped while others are below it."""

    kv_threshold: float = 0.95

    def __post_init__(self) -> None:
        _fraction("kv_threshold", self.kv_threshold, allow_zero=False)


@dataclass(frozen=True, slots=True)
class RandomParams:
    """Uniform choice among the runnable instances; nothing to set."""


@dataclass(frozen=True, slots=True)
class PowerOfTwoParams:
    """KV usage above which instances are avoided."""

    kv_threshold: float = 0.95

    def __post_init__(self) -> None:
        _fraction("kv_threshold", self.kv_threshold, allow_zero=False)


@dataclass(frozen=True, slots=True)
class AffinityParams:
    """``overload_threshold``: load (fraction of the concurrency bound) at or above which a
    sticky instance is bypassed for the least loaded one."""

    overload_threshold: float = 0.8
    kv_threshold: float = 0.95

    def __post_init__(self) -> None:
        _fraction("overload_threshold", self.overload_threshold, allow_zero=False)
        _fraction("kv_threshold", self.kv_threshold, allow_zero=False)


@dataclass(frozen=True, slots=True)
class LocalityParams:
    """``load_slack``: only instances within this load of the least loaded one get the prefix
    bonus. ``prefix_weight`` / ``load_weight`` / ``kv_weight``: scorer weights."""

    load_slack: float = 0.1
    prefix_weight: float = 3.0
    load_weight: float = 1.0
    kv_weight: float = 0.0
    kv_threshold: float = 0.95

    def __post_init__(self) -> None:
        _fraction("load_slack", self.load_slack)
        _some_weight(
            prefix_weight=self.prefix_weight,
            load_weight=self.load_weight,
            kv_weight=self.kv_weight,
        )
        _fraction("kv_threshold", self.kv_threshold, allow_zero=False)


@dataclass(frozen=True, slots=True)
class TopologyAwareParams:
    """Weights of closeness and load; ``load_slack`` drops candidates busier than the least
    loaded one by more than this; ``machine_score`` / ``rack_score`` rate same-machine and
    same-rack instances (an NVLink peer rates 1)."""

    topology_weight: float = 2.0
    load_weight: float = 1.0
    load_slack: float = 0.25
    machine_score: float = 0.6
    rack_score: float = 0.3
    kv_threshold: float = 0.95

    def __post_init__(self) -> None:
        _some_weight(topology_weight=self.topology_weight, load_weight=self.load_weight)
        _fraction("load_slack", self.load_slack)
        _fraction("machine_score", self.machine_score)
        _fraction("rack_score", self.rack_score)
        if self.rack_score > self.machine_score:  # the same machine is in the same rack
            raise ConfigError(
                f"must be at most machine_score ({self.machine_score}), got {self.rack_score}",
                key="rack_score",
            )
        _fraction("kv_threshold", self.kv_threshold, allow_zero=False)


# --------------------------------------------------------------------------- round robin


def natural_key(instance_id: str) -> tuple[str | int, ...]:
    """Sort key that orders ``sim-2`` before ``sim-10``."""
    return tuple(int(p) if n % 2 else p for n, p in enumerate(re.split(r"(\d+)", instance_id)))


_instance_id = attrgetter("instance_id")


class RoundRobinCursor:
    """Scores 1.0 the candidate after the last one routed to (per model), in
    :func:`natural_key` order of instance ids, wrapping around; 0 for the others.

    Candidates that are full or filtered out are simply absent, so they are skipped. The
    cursor moves in :meth:`on_routed`, which the pipeline calls after each decision. A
    :class:`~sage_llm.control_plane.routing.base.OneHotScorer`: alone under the max picker
    it names the winner (:meth:`winner`) and the pipeline skips the scores' search.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._last: dict[str, str] = {}
        self._keys: dict[str, tuple[str | int, ...]] = {}  # natural_key per instance id
        # per model: the candidates' ids, and their keys and ids in the round-robin order
        self._order: dict[
            str, tuple[tuple[str, ...], list[tuple[tuple[str | int, ...], str]], list[str]]
        ] = {}

    def _key(self, instance_id: str) -> tuple[str | int, ...]:
        key = self._keys.get(instance_id)
        if key is None:
            if len(self._keys) >= 4096:  # ids come and go: keep the memo bounded
                self._keys.clear()
            key = self._keys[instance_id] = natural_key(instance_id)
        return key

    def next_instance(self, model: str, candidates: Sequence[InstanceView]) -> str:
        """The candidate that comes next for ``model``: the first in the order of
        ``(natural_key(id), id)`` past the last one routed to, or else the first of all.
        The order is kept while the candidates stay the same (they do, from one decision
        to the next, unless an instance fills up, fails or leaves)."""
        ids = tuple(map(_instance_id, candidates))
        cached = self._order.get(model)
        if cached is None or cached[0] != ids:
            sort_key = self._key
            ordered = sorted((sort_key(i), i) for i in ids)
            if len(self._order) >= 4096:  # models come and go: keep the memo bounded
                self._order.clear()
            cached = self._order[model] = (ids, ordered, [i for _, i in ordered])
        _, keys, order = cached
        last = self._last.get(model)
        if last is not None:  # by (key, id): ids of one key ("gpu-01", "gpu-1") each have a turn
            at = bisect_right(keys, (self._key(last), last))
            if at < len(order):
                return order[at]
        return order[0]

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        out = {c.instance_id: 0.0 for c in candidates}
        if candidates:
            out[self.next_instance(req.model, candidates)] = 1.0
        return out

    def winner(self, req: RequestInfo, candidates: Sequence[InstanceView]) -> str:
        """The candidate :meth:`score` scores 1.0 (a :class:`OneHotScorer`)."""
        return self.next_instance(req.model, candidates)

    def on_routed(self, req: RequestInfo, decision: RoutingDecision) -> None:
        """Advance the model's cursor to the instance just chosen."""
        self._last[req.model] = decision.instance_id

    def describe(self) -> dict[str, object]:
        """The last instance routed to, per model."""
        return {"last": dict(self._last)}


# --------------------------------------------------------------------------- presets


def load_balanced(
    params: LoadBalancedParams | None = None,
    *,
    rng: random.Random | None = None,
    leg: Leg = "whole",
) -> Pipeline:
    """Least outstanding work, shortest queue and most free KV cache, best score wins.

    Successive decisions spread a batch because the dispatcher routes each request on the
    snapshot updated with the previous assignments (``ClusterSnapshot.with_assignment``).
    """
    p = params or LoadBalancedParams()
    return Pipeline(
        "load_balanced",
        [CapacityFilter(p.kv_threshold)],
        [
            (LeastOutstandingScorer(), p.outstanding_weight),
            (QueueDepthScorer(), p.queue_weight),
            (KVUsageScorer(), p.kv_weight),
            (LatencyScorer(), p.latency_weight),
            (PreferredInstanceScorer(), p.preferred_weight),
        ],
        MaxPicker(),
        rng,
        leg=leg,
        params=asdict(p),
    )


def round_robin(
    params: RoundRobinParams | None = None,
    *,
    rng: random.Random | None = None,
    leg: Leg = "whole",
) -> Pipeline:
    """Cycles over the candidates in instance-id order, skipping full ones."""
    p = params or RoundRobinParams()
    return Pipeline(
        "round_robin",
        [CapacityFilter(p.kv_threshold)],
        [(RoundRobinCursor(), 1.0)],
        MaxPicker(),
        rng,
        leg=leg,
        params=asdict(p),
    )


def random_choice(
    params: RandomParams | None = None,
    *,
    rng: random.Random | None = None,
    leg: Leg = "whole",
) -> Pipeline:
    """A uniformly random runnable instance (the baseline)."""
    p = params or RandomParams()
    return Pipeline("random", [], [], WeightedRandomPicker(), rng, leg=leg, params=asdict(p))


def power_of_two(
    params: PowerOfTwoParams | None = None,
    *,
    rng: random.Random | None = None,
    leg: Leg = "whole",
) -> Pipeline:
    """Two random candidates; the one with less outstanding work wins."""
    p = params or PowerOfTwoParams()
    return Pipeline(
        "power_of_two",
        [CapacityFilter(p.kv_threshold)],
        [(LeastOutstandingScorer(), 1.0)],
        PowerOfTwoPicker(),
        rng,
        leg=leg,
        params=asdict(p),
    )


AFFINITY_WEIGHT = 10.0
"""Weight of the sticky instance in ``affinity``; above the load weight (1) so it always
wins while it is eligible."""


def affinity(
    params: AffinityParams | None = None,
    *,
    rng: random.Random | None = None,
    leg: Leg = "whole",
) -> Pipeline:
    """Sticky per session (else user) by rendezvous hashing over every instance of the model;
    the least loaded instance when the sticky one is overloaded or cannot run the request."""
    p = params or AffinityParams()
    return Pipeline(
        "affinity",
        [CapacityFilter(p.kv_threshold)],
        [
            (SessionAffinityScorer(p.overload_threshold, ring_leg=leg), AFFINITY_WEIGHT),
            (LeastOutstandingScorer(), 1.0),
        ],
        MaxPicker(),
        rng,
        leg=leg,
        params=asdict(p),
    )


def locality(
    params: LocalityParams | None = None,
    *,
    rng: random.Random | None = None,
    leg: Leg = "whole",
) -> Pipeline:
    """Prefix-cache aware: the instance caching most of the prompt's prefix, as long as its
    load is within ``load_slack`` of the least loaded candidate; otherwise by load."""
    p = params or LocalityParams()
    return Pipeline(
        "locality",
        [CapacityFilter(p.kv_threshold)],
        [
            (PrefixMatchScorer(load_slack=p.load_slack), p.prefix_weight),
            (LeastOutstandingScorer(), p.load_weight),
            (KVUsageScorer(), p.kv_weight),
        ],
        MaxPicker(),
        rng,
        leg=leg,
        params=asdict(p),
    )


def topology_aware(
    params: TopologyAwareParams | None = None,
    *,
    rng: random.Random | None = None,
    leg: Leg = "whole",
) -> Pipeline:
    """Close to the request's previous (else preferred) instance: an NVLink peer first,
    then the same machine, the same rack, elsewhere; among candidates within
    ``load_slack`` of the least loaded."""
    p = params or TopologyAwareParams()
    return Pipeline(
        "topology_aware",
        [CapacityFilter(p.kv_threshold), LoadCapFilter(p.load_slack)],
        [
            (TopologyScorer(machine=p.machine_score, rack=p.rack_score), p.topology_weight),
            (LeastOutstandingScorer(), p.load_weight),
        ],
        MaxPicker(),
        rng,
        leg=leg,
        params=asdict(p),
    )


def router_wants(router: Router) -> tuple[bool, bool]:
    """Whether ``router`` may read the prefix index's holders (a :class:`PrefixMatchScorer`)
    and the session's sticky owner (a :class:`SessionAffinityScorer`). A router that is not
    a :class:`Pipeline` cannot be inspected: it may read both."""
    if not isinstance(router, Pipeline):
        return True, True
    scorers = [s for s, _ in router.scorers]
    return (
        any(isinstance(s, PrefixMatchScorer) for s in scorers),
        any(isinstance(s, SessionAffinityScorer) for s in scorers),
    )
