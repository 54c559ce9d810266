"""Routing scorers: each rates every candidate in [0, 1], higher is better.

Scorers are pure functions of the request, the candidates and the snapshot; the pipeline
combines them as a weighted mean (``Σ weight·score / Σ weight``). Load-type scorers
normalise across the candidates (``x / max x``): on each load term an idle candidate
scores 1, the busiest 0 and the others in proportion, so equal candidates score alike (1
when all are idle, 0 when all are equally busy).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

from sage_llm.control_plane.routing.filters import LEGS, Leg, role_runs
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo


def clamp01(x: float) -> float:
    """``x`` limited to [0, 1]; NaN becomes 0."""
    if not x >= 0.0:  # also catches NaN
        return 0.0
    return 1.0 if x > 1.0 else x


def _relative(values: Sequence[float]) -> list[float]:
    """Each value divided by the largest (0 when all are 0), in [0, 1]."""
    top = max(values, default=0.0)
    if top <= 0.0:
        return [0.0] * len(values)
    return [clamp01(v / top) for v in values]


def _inverse_load(candidates: Sequence[InstanceView], *parts: Sequence[float]) -> dict[str, float]:
    """1 − the mean of the relative values of ``parts`` (each one value per candidate)."""
    rel = [_relative(p) for p in parts]
    n = len(parts)
    return {
        c.instance_id: clamp01(1.0 - sum(r[k] for r in rel) / n) for k, c in enumerate(candidates)
    }


class LeastOutstandingScorer:
    """Prefers the candidate with the least outstanding work: half utilisation
    (``in_flight / max_concurrency``), half token work (queued prefill tokens plus the
    decode tokens still expected), each relative to the busiest candidate."""

    name = "least_outstanding"

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        # _inverse_load(candidates, util, tokens) in comprehensions: this scorer runs for
        # every decision of most strategies (same arithmetic, same floats). A value r is
        # clamped as clamp01 does: 0.0 unless r >= 0.0 (NaN too), at most 1.0.
        util = [c.in_flight / max(c.max_concurrency, 1) for c in candidates]
        tokens = [float(c.queued_prefill_tokens + c.outstanding_decode_tokens) for c in candidates]
        top_u = max(util, default=0.0)
        top_t = max(tokens, default=0.0)
        if top_u > 0.0:
            rel_u = [0.0 if not (r := u / top_u) >= 0.0 else 1.0 if r > 1.0 else r for u in util]
        else:
            rel_u = [0.0] * len(util)
        if top_t > 0.0:
            rel_t = [0.0 if not (r := t / top_t) >= 0.0 else 1.0 if r > 1.0 else r for t in tokens]
        else:
            rel_t = [0.0] * len(tokens)
        return {
            c.instance_id: (0.0 if not (x := 1.0 - (0 + ru + rt) / 2) >= 0.0 else min(x, 1.0))
            for c, ru, rt in zip(candidates, rel_u, rel_t, strict=True)
        }


class QueueDepthScorer:
    """Prefers short queues: half the prompt tokens waiting for their first token, half the
    engine's own waiting-request count, each relative to the deepest candidate."""

    name = "queue_depth"

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        queued = [float(c.queued_prefill_tokens) for c in candidates]
        waiting = [float(c.engine_waiting) for c in candidates]
        return _inverse_load(candidates, queued, waiting)


class KVUsageScorer:
    """``1 − kv_usage``: prefers instances with room in their KV cache."""

    name = "kv_usage"

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        return {c.instance_id: clamp01(1.0 - clamp01(c.kv_usage)) for c in candidates}


class PrefixMatchScorer:
    """Fraction of the prompt's blocks the instance likely caches, from ``snap.prefix``.

    With ``load_slack`` set, only candidates whose load is at most the least loaded
    candidate's load plus the slack get the bonus (llm-d style): a hot prefix then spreads
    to other instances once its holder is busier than the rest, instead of piling up.
    """

    name = "prefix_match"

    def __init__(self, load_slack: float | None = None) -> None:
        if load_slack is not None and not 0.0 <= load_slack <= 1.0:
            raise ValueError(f"load_slack must be in [0, 1], got {load_slack!r}")
        self.load_slack = load_slack

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        total = len(req.block_hashes)
        if total == 0 or not candidates:
            return {c.instance_id: 0.0 for c in candidates}
        matched = snap.prefix.match(req.block_hashes)
        cap = math.inf
        if self.load_slack is not None:
            cap = min(c.load for c in candidates) + self.load_slack + 1e-12
        return {
            c.instance_id: clamp01(matched.get(c.instance_id, 0) / total) if c.load <= cap else 0.0
            for c in candidates
        }


def rendezvous_weight(key: str, instance_id: str) -> int:
    """The stable (process-independent) rendezvous-hash weight of ``instance_id`` for ``key``."""
    digest = hashlib.blake2b(
        key.encode("utf-8") + b"\x00" + instance_id.encode("utf-8"), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big")


def rendezvous_owner(key: str, instance_ids: Iterable[str]) -> str | None:
    """The instance ``key`` sticks to among ``instance_ids`` (highest rendezvous weight), or
    None when there are none. Adding an instance moves only the keys it now owns (about
    1/n of them); removing one moves only the keys it owned."""
    best: tuple[int, str] | None = None
    for iid in instance_ids:
        cand = (rendezvous_weight(key, iid), iid)
        if best is None or cand > best:
            best = cand
    return None if best is None else best[1]


class SessionAffinityScorer:
    """1.0 for the instance the request's sticky key (session id, else user id) maps to,
    0 elsewhere; 0 everywhere when the request has no sticky key.

    The key is mapped by rendezvous hashing over the ring: every instance of the request's
    model whose role runs ``ring_leg`` — healthy or not, full or not — so that an instance
    coming and going does not reshuffle other keys. When the sticky instance is not a
    candidate, or its load is at or above ``overload_threshold``, the bonus goes to the
    key's next choice: the candidate under the threshold that ranks highest for the key
    (a stable second instance, so that the session's turns stay together, and its prefix
    cached, while its own instance is away); with none, nobody gets it.
    """

    name = "session_affinity"

    def __init__(self, overload_threshold: float = 0.8, ring_leg: Leg = "whole") -> None:
        if not 0.0 < overload_threshold <= 1.0:
            raise ValueError(f"overload_threshold must be in (0, 1], got {overload_threshold!r}")
        if ring_leg not in LEGS:
            raise ValueError(f"unknown ring_leg {ring_leg!r}; expected one of {', '.join(LEGS)}")
        self.overload_threshold = overload_threshold
        self.ring_leg: Leg = ring_leg

    def sticky_instance(self, req: RequestInfo, snap: ClusterSnapshot) -> str | None:
        """The instance ``req`` sticks to, whatever its state, or None without a key."""
        key = req.sticky_key
        if key is None:
            return None
        ring = (
            i.instance_id
            for i in snap.instances
            if i.model == req.model and role_runs(self.ring_leg, i.role)
        )
        return rendezvous_owner(key, ring)

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        out = {c.instance_id: 0.0 for c in candidates}
        sticky = self.sticky_instance(req, snap)
        if sticky is None:
            return out
        limit = self.overload_threshold
        if sticky in out:
            view = next(c for c in candidates if c.instance_id == sticky)
            if view.load < limit:
                out[sticky] = 1.0
                return out
        key = req.sticky_key
        assert key is not None  # (a sticky instance was found for it)
        second = rendezvous_owner(
            key, (c.instance_id for c in candidates if c.instance_id != sticky and c.load < limit)
        )
        if second is not None:
            out[second] = 1.0
        return out


class TopologyScorer:
    """Closeness to the request's reference instance (``previous_instance_id``, else
    ``preferred_instance_id``): the instance itself or an NVLink peer ``nvlink``, same
    machine ``machine`` (a quarter of the way to ``nvlink`` on the same NUMA node), same
    rack ``rack``, anything else 0. All 0 without a reference."""

    name = "topology"

    def __init__(self, nvlink: float = 1.0, machine: float = 0.6, rack: float = 0.3) -> None:
        for label, value in (("nvlink", nvlink), ("machine", machine), ("rack", rack)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} score must be in [0, 1], got {value!r}")
        self.nvlink = nvlink
        self.machine = machine
        self.rack = rack

    @staticmethod
    def reference(req: RequestInfo, snap: ClusterSnapshot) -> InstanceView | None:
        """The instance the request should stay close to, if it is in the snapshot."""
        for iid in (req.previous_instance_id, req.preferred_instance_id):
            if iid is not None:
                view = snap.get(iid)
                if view is not None:
                    return view
        return None

    def closeness(self, ref: InstanceView, other: InstanceView) -> float:
        """The score of ``other`` relative to ``ref``."""
        if other.instance_id == ref.instance_id or other.nvlink_connected(ref):
            return self.nvlink
        if other.same_machine(ref):
            if other.numa_node is not None and other.numa_node == ref.numa_node:
                # its NUMA node too: a quarter of the way to NVLink (breaks ties on a machine)
                return self.machine + 0.25 * (self.nvlink - self.machine)
            return self.machine
        if other.rack_id is not None and other.rack_id == ref.rack_id:
            return self.rack
        return 0.0

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        ref = self.reference(req, snap)
        if ref is None:
            return {c.instance_id: 0.0 for c in candidates}
        return {c.instance_id: self.closeness(ref, c) for c in candidates}


class PreferredInstanceScorer:
    """1.0 for ``req.preferred_instance_id``, 0 elsewhere."""

    name = "preferred_instance"

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        pref = req.preferred_instance_id
        return {c.instance_id: 1.0 if c.instance_id == pref else 0.0 for c in candidates}


class LatencyScorer:
    """Prefers the lowest predicted time to first token: ``min ttft / ttft``."""

    name = "latency"

    def score(
        self, req: RequestInfo, candidates: Sequence[InstanceView], snap: ClusterSnapshot
    ) -> dict[str, float]:
        ttft = [_positive(c.predict_ttft_s(req.prompt_tokens)) for c in candidates]
        best = min(ttft, default=math.inf)
        return {c.instance_id: clamp01(best / t) for c, t in zip(candidates, ttft, strict=True)}


def _positive(t: float) -> float:
    """``t`` as a positive finite time, or +inf when it is not a number."""
    if math.isnan(t):
        return math.inf
    return max(t, 1e-12)
