"""The routing pipeline: candidates → filters → weighted scorers → picker.

Every named strategy (:mod:`sage_llm.control_plane.routing.strategies`) is a
:class:`Pipeline` with its own filters, scorers, weights and picker; there is no other
routing code path.

Statefulness: a filter, scorer or picker that keeps state across decisions (the round-robin
cursor) implements :class:`RoutingObserver`; :meth:`Pipeline.route` calls
``on_routed(req, decision)`` on each such component after it decides. The hook is public
and must be idempotent for the same decision, so a caller that records a decision again
(for instance a PD orchestrator) does no harm.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import add

from sage_llm.control_plane.routing.base import (
    Describable,
    Filter,
    OneHotScorer,
    Picker,
    RoutingDecision,
    RoutingObserver,
    Scorer,
)
from sage_llm.control_plane.routing.filters import LEGS, CapacityFilter, Leg, leg_candidates
from sage_llm.control_plane.routing.pickers import MaxPicker
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.fastinit import field_filler

_fill_decision = field_filler(
    RoutingDecision, ("instance_id", "reason", "scores", "prefill_instance_id")
)
"""``RoutingDecision(instance_id, reason, scores, prefill_instance_id)``, faster (one is
made per decision)."""


class Pipeline:
    """A router made of filters, weighted scorers and a picker.

    ``route`` starts from the instances that can run ``leg`` of the request now
    (:func:`~sage_llm.control_plane.routing.filters.leg_candidates`; for the default
    ``"whole"`` that is ``snap.runnable(req)``), keeps those in ``allowed`` when given,
    applies the filters in order, and returns None as soon as none is left. Otherwise each
    candidate's combined score is ``Σ weight·score / Σ weight`` over the scorers (1.0 for
    all when there are none) and the picker chooses among them with ``rng``.
    """

    def __init__(
        self,
        name: str,
        filters: Sequence[Filter],
        scorers: Sequence[tuple[Scorer, float]],
        picker: Picker,
        rng: random.Random | None = None,
        *,
        leg: Leg = "whole",
        params: Mapping[str, object] | None = None,
    ) -> None:
        if not name:
            raise ValueError("a pipeline needs a name")
        if leg not in LEGS:
            raise ValueError(f"unknown leg {leg!r}; expected one of {', '.join(LEGS)}")
        for scorer, weight in scorers:
            if not (math.isfinite(weight) and weight >= 0.0):
                raise ValueError(f"weight of scorer {scorer.name!r} must be >= 0, got {weight!r}")
        self.name = name
        self.filters: tuple[Filter, ...] = tuple(filters)
        self.scorers: tuple[tuple[Scorer, float], ...] = tuple(
            (s, float(w)) for s, w in scorers if w > 0.0
        )
        self.picker = picker
        self.rng = rng if rng is not None else random.Random()
        self.leg: Leg = leg
        self.params: dict[str, object] = dict(params or {})
        self._total_weight = sum(w for _, w in self.scorers)
        components: list[object] = [*self.filters, *(s for s, _ in self.scorers), picker]
        self._observers = tuple(c for c in components if isinstance(c, RoutingObserver))
        # a lone one-hot scorer under the max picker names the winner itself: its one 1.0
        # is the only maximum, so the scores need not be checked, combined or searched
        self._one_hot: OneHotScorer | None = None
        if len(self.scorers) == 1 and type(picker) is MaxPicker:
            only = self.scorers[0][0]
            if isinstance(only, OneHotScorer):
                self._one_hot = only

    def candidates(
        self, req: RequestInfo, snap: ClusterSnapshot, allowed: frozenset[str] | None = None
    ) -> Sequence[InstanceView]:
        """The candidates left after the start set, ``allowed`` and every filter."""
        cands: Sequence[InstanceView] = leg_candidates(req, snap, self.leg)
        if allowed is not None:
            cands = [c for c in cands if c.instance_id in allowed]
        # leg_candidates keeps only healthy, accepting instances with a free slot (on a
        # plain ClusterSnapshot) and filters keep subsets, so a CapacityFilter here need
        # not check those again: the same candidates, in the same order.
        runnable = type(snap) is ClusterSnapshot
        for f in self.filters:
            if not cands:
                break
            if runnable and type(f) is CapacityFilter:
                cands = f.filter_runnable(cands)
            else:
                cands = f.filter(req, cands, snap)
        return cands

    def scores(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Combined scores, and each scorer's raw scores (in :attr:`scorers` order)."""
        ids = [c.instance_id for c in candidates]
        if not self.scorers:
            return dict.fromkeys(ids, 1.0), []
        total = self._total_weight
        if len(self.scorers) == 1:  # the same sums as below, without the accumulator
            scorer, weight = self.scorers[0]
            raw = scorer.score(req, candidates, snap)
            if weight == 1.0 and total == 1.0 and list(raw) == ids:
                # Weight 1: each combined score is (0.0 + 1.0·v) / 1.0 = v + 0.0 (which
                # only turns -0.0 into 0.0). Checked at C speed: every value in [0, 1] and
                # no NaN (a NaN makes the sum NaN); otherwise the loop below names it.
                values = raw.values()
                lo, hi, total_v = min(values), max(values), sum(values)
                if lo >= 0.0 and hi <= 1.0 and total_v == total_v:
                    return dict(zip(ids, map(add, values, repeat(0.0)), strict=True)), [raw]
            single: dict[str, float] = {}
            get = raw.get
            for iid in ids:
                value = get(iid)
                if value is None or not 0.0 <= value <= 1.0:
                    raise _bad_score(scorer, iid, value)
                v = (0.0 + weight * value) / total
                single[iid] = v if v < 1.0 else 1.0  # min(1.0, v)
            if len(single) == len(ids):  # (repeated ids would add up below)
                return single, [raw]
            ids = list(single)
            combined = dict.fromkeys(ids, 0.0)
            for iid in [c.instance_id for c in candidates]:
                combined[iid] += weight * raw[iid]
            return {iid: min(1.0, v / total) for iid, v in combined.items()}, [raw]
        combined = dict.fromkeys(ids, 0.0)
        per_scorer: list[dict[str, float]] = []
        for scorer, weight in self.scorers:
            raw = scorer.score(req, candidates, snap)
            for iid in ids:
                value = raw.get(iid)
                if value is None or not 0.0 <= value <= 1.0:
                    raise _bad_score(scorer, iid, value)
                combined[iid] += weight * value
            per_scorer.append(raw)
        return {iid: min(1.0, v / total) for iid, v in combined.items()}, per_scorer

    def route(
        self, req: RequestInfo, snap: ClusterSnapshot, allowed: frozenset[str] | None = None
    ) -> RoutingDecision | None:
        """Pick an instance for ``req``, or None when no candidate survives the filters."""
        picked = self._pick(req, snap, allowed)
        if picked is None:
            return None
        chosen, combined, per_scorer, n = picked
        decision = RoutingDecision(
            instance_id=chosen, reason=self._reason(chosen, per_scorer, n), scores=combined
        )
        self.on_routed(req, decision)
        return decision

    def route_id(
        self, req: RequestInfo, snap: ClusterSnapshot, allowed: frozenset[str] | None = None
    ) -> str | None:
        """The instance :meth:`route` picks (None where it returns None): the same
        candidates, scores and random draws, and the same state changes, without the
        decision's reason (stateful components are told of a decision without one, and
        only when there are such components is a decision built at all). For callers that
        need only the instance (the dispatcher, the cluster simulator)."""
        picked = self._pick(req, snap, allowed)
        if picked is None:
            return None
        if self._observers:
            self.on_routed(req, _fill_decision(picked[0], "", picked[1], None))
        return picked[0]

    def _pick(
        self, req: RequestInfo, snap: ClusterSnapshot, allowed: frozenset[str] | None
    ) -> tuple[str, dict[str, float], list[dict[str, float]], int] | None:
        """Filter, score and pick: the chosen id, the combined and per-scorer scores and
        the number of candidates; None when no candidate survives the filters."""
        cands = self.candidates(req, snap, allowed)
        if not cands:
            return None
        one_hot = self._one_hot
        if one_hot is not None:  # what scores and the picker give: winner 1.0, others 0.0
            chosen = one_hot.winner(req, cands)
            combined = {c.instance_id: 0.0 for c in cands}
            if chosen not in combined:
                name = self.scorers[0][0].name
                raise ValueError(f"scorer {name!r} chose {chosen!r}, not a candidate")
            combined[chosen] = 1.0
            return chosen, combined, [combined], len(cands)
        combined, per_scorer = self.scores(req, cands, snap)
        chosen = self.picker.pick(combined, self.rng)
        if chosen not in combined:
            raise ValueError(f"picker {self.picker.name!r} chose {chosen!r}, not a candidate")
        return chosen, combined, per_scorer, len(cands)

    def on_routed(self, req: RequestInfo, decision: RoutingDecision) -> None:
        """Tell stateful components about ``decision`` (idempotent; ``route`` calls it)."""
        for obs in self._observers:
            obs.on_routed(req, decision)

    def _reason(self, chosen: str, per_scorer: Sequence[Mapping[str, float]], n: int) -> str:
        """``"<name>: <top factor>=<its score> (<n> candidates)"``: the top factor is the
        scorer that contributed most to the chosen instance's combined score."""
        plural = "candidate" if n == 1 else "candidates"
        if not self.scorers:
            return f"{self.name}: {self.picker.name} ({n} {plural})"
        if len(self.scorers) == 1:
            return (
                f"{self.name}: {self.scorers[0][0].name}={per_scorer[0][chosen]:.2f} ({n} {plural})"
            )
        contributions = [w * per_scorer[k][chosen] for k, (_s, w) in enumerate(self.scorers)]
        k = contributions.index(max(contributions))  # the first one on ties
        top = self.scorers[k][0]
        return f"{self.name}: {top.name}={per_scorer[k][chosen]:.2f} ({n} {plural})"

    def describe(self) -> dict[str, object]:
        """Name, leg, filters, weighted scorers, picker, parameters and component state."""
        out: dict[str, object] = {
            "name": self.name,
            "leg": self.leg,
            "filters": [f.name for f in self.filters],
            "scorers": [{"name": s.name, "weight": w} for s, w in self.scorers],
            "picker": self.picker.name,
            "params": dict(self.params),
        }
        state = {
            getattr(obs, "name", type(obs).__name__): obs.describe()
            for obs in self._observers
            if isinstance(obs, Describable)
        }
        if state:
            out["state"] = state
        return out

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r})"


def _bad_score(scorer: Scorer, iid: str, value: float | None) -> ValueError:
    return ValueError(
        f"scorer {scorer.name!r} gave {value!r} for {iid!r}; "
        "scores must be in [0, 1] for every candidate"
    )
