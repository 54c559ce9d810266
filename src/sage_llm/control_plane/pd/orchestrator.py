"""PD pair selection: which instance prefills a request and which one decodes it.

:class:`PDOrchestrator` scores the two legs with separate routers (per-role profiles), then
scores (prefill, decode) pairs over the best ``top_k`` + 1 of each side, with the cost of
moving the KV cache between them as part of the pair's score. Everything here is pure and
synchronous, like the routing pipeline it is built from.

Roles: a PREFILLING instance only takes prefill legs, a DECODING one only decode legs;
GENERAL and HYBRID instances may take either (and whole requests). The two legs of one
request always go to two different instances. With a target for the largest inter-token
gap (``PairingParams.itl_slo_s``), a prefill leg goes only where its prompt would not stall
running decodes past it, while such an instance is free.

Load is accounted per phase (:func:`with_pd_assignment`, and the dispatcher does the same on
the live registry):

* the **prefill** instance carries the request from dispatch until its leg returns (vLLM:
  the prefill response arrived; SGLang: the prefill stream ended), fails or is cancelled:
  ``in_flight`` + 1 and ``queued_prefill_tokens`` + the prompt tokens;
* the **decode** instance carries it from dispatch (it reserves a slot while the prefill
  runs) until the request ends: ``in_flight`` + 1 and ``outstanding_decode_tokens`` +
  ``max_tokens``. No prefill tokens are charged to it: its KV arrives over the link.

Both instances must have a free slot when the pair is chosen, so the concurrency bound
(``max_concurrent_requests``) holds on both.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from sage_llm.control_plane.routing.base import RoutingDecision, Scorer
from sage_llm.control_plane.routing.filters import CapacityFilter
from sage_llm.control_plane.routing.pickers import MaxPicker
from sage_llm.control_plane.routing.pipeline import Pipeline
from sage_llm.control_plane.routing.registry import build_router, get_strategy
from sage_llm.control_plane.routing.scorers import (
    KVUsageScorer,
    LeastOutstandingScorer,
    PrefixMatchScorer,
    QueueDepthScorer,
)
from sage_llm.control_plane.snapshot import (
    PAIR_VIEW_PREFIX,
    ClusterSnapshot,
    InstanceView,
    RequestInfo,
)
from sage_llm.errors import ConfigError, StrategyNotFoundError
from sage_llm.types import ExecutionInstanceType

LinkKind = Literal["nvlink", "machine", "rack", "network"]

PD_ROLES = frozenset(
    {ExecutionInstanceType.PREFILLING, ExecutionInstanceType.DECODING, ExecutionInstanceType.HYBRID}
)
"""Roles that mark a model's fleet as set up for PD (engines started with a KV connector).
A model served only by GENERAL instances is never disaggregated."""


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"must be a finite number > 0, got {value!r}", key=key)


@dataclass(frozen=True, slots=True)
class LinkModel:
    """How fast KV moves between two instances, in GB/s (gigabytes per second).

    NVLink peers (``nvlink_peers`` or a shared ``nvlink_domain``) get ``nvlink_gbps``; the
    same machine without NVLink ``machine_gbps`` (PCIe through the host); the same rack the
    smaller of the two instances' ``network_bandwidth_gbps``; anything else that times
    ``cross_rack_factor`` (an oversubscribed spine). Each closer kind is never slower than a
    farther one. ``kv_bytes_per_token`` is the model's KV size (2 × layers × KV heads ×
    head dim × dtype bytes: 128 KiB for Llama-3-8B, 320 KiB for Llama-3-70B in bf16).
    """

    nvlink_gbps: float = 300.0
    machine_gbps: float = 25.0
    cross_rack_factor: float = 0.5
    kv_bytes_per_token: int = 131072

    def __post_init__(self) -> None:
        _positive("nvlink_gbps", self.nvlink_gbps)
        _positive("machine_gbps", self.machine_gbps)
        if not 0.0 < self.cross_rack_factor <= 1.0:
            raise ConfigError(
                f"must be in (0, 1], got {self.cross_rack_factor!r}", key="cross_rack_factor"
            )
        if self.kv_bytes_per_token < 1:
            raise ConfigError("must be >= 1", key="kv_bytes_per_token")

    @staticmethod
    def kind(a: InstanceView, b: InstanceView) -> LinkKind:
        """The closest link between ``a`` and ``b``."""
        if a.nvlink_connected(b):
            return "nvlink"
        if a.same_machine(b):
            return "machine"
        if a.rack_id is not None and a.rack_id == b.rack_id:
            return "rack"
        return "network"

    def bandwidth_gbps(self, a: InstanceView, b: InstanceView) -> float:
        """GB/s between ``a`` and ``b`` (infinite for the same instance)."""
        if a.instance_id == b.instance_id:
            return math.inf
        rack = max(min(a.network_bandwidth_gbps, b.network_bandwidth_gbps), 1e-9)
        kind = self.kind(a, b)
        if kind == "network":
            return rack * self.cross_rack_factor
        if kind == "rack":
            return rack
        machine = max(self.machine_gbps, rack)
        return machine if kind == "machine" else max(self.nvlink_gbps, machine)

    def transfer_s(self, tokens: int, a: InstanceView, b: InstanceView) -> float:
        """Seconds to move the KV of ``tokens`` tokens from ``a`` to ``b``."""
        gbps = self.bandwidth_gbps(a, b)
        if math.isinf(gbps):
            return 0.0
        return max(0, tokens) * self.kv_bytes_per_token / (gbps * 1e9)


@dataclass(frozen=True, slots=True)
class PDPlan:
    """A chosen (prefill, decode) pair. ``scores`` holds the pair scores considered, keyed
    ``"<prefill>-><decode>"``; ``transfer_s`` is the predicted KV transfer time."""

    prefill_id: str
    decode_id: str
    reason: str
    scores: Mapping[str, float] = field(default_factory=dict)
    link: LinkKind = "network"
    transfer_s: float = 0.0


@dataclass(frozen=True, slots=True)
class PairingParams:
    """How pairs are scored.

    ``prefill_strategy`` / ``decode_strategy`` name a routing strategy (``build_router``
    with ``leg="prefill"``/``"decode"``) whose filters and scorers rate that leg; empty
    means the built-in profile: prefill favours prefix locality (``prefix_weight``) and a
    short prefill queue (``queue_weight``); decode favours KV headroom (``kv_weight``) and a
    small running batch (``batch_weight``). A pair's score is the weighted mean of its
    decode score, its prefill score, its transfer affinity (``transfer_weight``; prefill
    time over prefill plus KV transfer time, 1 for free transfers), its role fit
    (``role_weight``; dedicated PREFILLING/DECODING instances 1, HYBRID 0.5, GENERAL 0, so
    instances that also run whole requests are kept for those), its phase isolation
    (``isolation_weight``; the mean of both legs' :func:`phase_fit`, the prefill leg's times
    its prefill speed below, so a GENERAL/HYBRID leg does not stall running decodes with a
    prompt, nor decode behind one, and such instances settle into a prefill group and a
    decode group, whose queue holds prompts only while it starts them about as soon as any)
    and its prefill speed (``ttft_weight``: the fastest candidate's predicted TTFT over this
    one's, so a long prefill queue on a dedicated instance loses to an idle instance). The
    best ``top_k`` + 1 candidates of each leg are paired: one more than ``top_k``, so that
    each keeps ``top_k`` partners when an instance that may run either leg ranks on both
    sides (it cannot pair with itself).

    ``itl_slo_s`` is a target for the largest inter-token gap: with it, a prefill leg goes
    only to an instance where its prompt would not stall running decodes past the target
    (:func:`prefill_gap_s`, with chunks of at most ``max_batched_tokens``), while such an
    instance is free. :func:`~sage_llm.control_plane.pd.build_pd` sets it from the
    ``adaptive`` decider's ``itl_slo_s`` (and ``max_batched_tokens``) unless given here.

    With it, too, up to ``prefill_reserve`` GENERAL/HYBRID instances of a model are held
    for prefill legs (:meth:`PDOrchestrator.observe`) when a prompt that would stall
    decodes finds no free instance it would leave within the target: whole requests and
    decode legs keep off them while others are free, so their decodes drain and they
    can take such prompts. A hold ends ``reserve_hold_s`` after the last such prompt, and
    no instance is held while such prompts bring more prefill work than
    ``prefill_reserve`` instances can take.
    """

    prefill_strategy: str = ""
    decode_strategy: str = ""
    prefix_weight: float = 2.0
    queue_weight: float = 1.0
    kv_weight: float = 1.0
    batch_weight: float = 1.0
    transfer_weight: float = 1.0
    role_weight: float = 0.5
    isolation_weight: float = 2.0
    ttft_weight: float = 1.0
    top_k: int = 4
    kv_threshold: float = 0.95
    itl_slo_s: float | None = None
    max_batched_tokens: int = 8192
    prefill_reserve: int = 2
    reserve_hold_s: float = 5.0
    nvlink_gbps: float = 300.0
    machine_gbps: float = 25.0
    cross_rack_factor: float = 0.5
    kv_bytes_per_token: int = 131072

    def __post_init__(self) -> None:
        if self.itl_slo_s is not None and not (
            math.isfinite(self.itl_slo_s) and self.itl_slo_s > 0
        ):
            raise ConfigError(
                f"must be a finite number > 0, got {self.itl_slo_s!r}", key="itl_slo_s"
            )
        if self.max_batched_tokens < 1:
            raise ConfigError("must be >= 1", key="max_batched_tokens")
        if self.prefill_reserve < 0:
            raise ConfigError("must be >= 0", key="prefill_reserve")
        if not (math.isfinite(self.reserve_hold_s) and self.reserve_hold_s > 0):
            raise ConfigError(
                f"must be a finite number > 0, got {self.reserve_hold_s!r}", key="reserve_hold_s"
            )
        for key in (
            "prefix_weight", "queue_weight", "kv_weight", "batch_weight", "transfer_weight",
            "role_weight", "isolation_weight", "ttft_weight",
        ):  # fmt: skip
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"must be a finite number >= 0, got {value!r}", key=key)
        if self.prefix_weight + self.queue_weight <= 0 and not self.prefill_strategy:
            raise ConfigError("prefix_weight or queue_weight must be > 0", key="prefix_weight")
        if self.kv_weight + self.batch_weight <= 0 and not self.decode_strategy:
            raise ConfigError("kv_weight or batch_weight must be > 0", key="kv_weight")
        if self.top_k < 1:
            raise ConfigError("must be >= 1", key="top_k")
        if not 0.0 < self.kv_threshold <= 1.0:
            raise ConfigError(f"must be in (0, 1], got {self.kv_threshold!r}", key="kv_threshold")
        for key in ("prefill_strategy", "decode_strategy"):
            name = getattr(self, key)
            if name:
                try:
                    get_strategy(name)
                except StrategyNotFoundError as exc:
                    raise ConfigError(exc.message, key=key) from None
        self.link_model()  # validates the link fields

    def link_model(self) -> LinkModel:
        return LinkModel(
            self.nvlink_gbps, self.machine_gbps, self.cross_rack_factor, self.kv_bytes_per_token
        )


RESERVE_UTILIZATION = 0.7
"""The share of an instance's prefill rate the prefill reserve plans to use: the reserve
needs ``ceil(demand / (rate × this))`` instances for the stalling prompts' prefill work."""


def stall_s(v: InstanceView, prefill_tokens: int, max_batched_tokens: int = 8192) -> float:
    """The inter-token gap of decodes running on ``v`` in a step that also carries
    ``prefill_tokens`` of prompt (at most ``max_batched_tokens``): the roofline's smoothed
    maximum of a decode step (memory-bound) and the chunk's compute time at ``v``'s rate
    beside decodes (``est_chunk_tps``), ``hypot(tpot, chunk / rate)``."""
    chunk = min(max(prefill_tokens, 0), max_batched_tokens)
    rate = v.est_prefill_tps if v.est_chunk_tps is None else v.est_chunk_tps
    return math.hypot(v.est_tpot_s, chunk / max(rate, 1e-9))


def prefill_gap_s(v: InstanceView, prompt_tokens: int, max_batched_tokens: int = 8192) -> float:
    """The gap that computing a prompt of ``prompt_tokens`` on ``v`` inflicts on the decodes
    running there (0 when none run there): the prompt joins the prefill already queued."""
    if v.outstanding_decode_tokens <= 0:
        return 0.0
    return stall_s(v, v.queued_prefill_tokens + prompt_tokens, max_batched_tokens)


def _role_fit(role: ExecutionInstanceType, dedicated: ExecutionInstanceType) -> float:
    if role is dedicated:
        return 1.0
    return 0.5 if role is ExecutionInstanceType.HYBRID else 0.0


def isolation(prefill: InstanceView, decode: InstanceView, speed: float = 1.0) -> float:
    """Phase isolation of a pair, 0..1: the mean of each leg's :func:`phase_fit`, the
    prefill leg's times its relative ``speed`` (the fastest prefill candidate's predicted
    TTFT over its own), so that a prefill group's queue, as it grows, no longer holds the
    legs that an idle instance would start sooner."""
    return 0.5 * phase_fit(prefill, "prefill") * speed + 0.5 * phase_fit(decode, "decode")


def phase_fit(v: InstanceView, leg: Literal["prefill", "decode"]) -> float:
    """How well ``v`` keeps ``leg`` apart from the other phase: 1 for a dedicated instance
    or one already doing only that phase, 0.5 for an idle one, 0 for one doing the other
    phase (a prompt would stall its decodes, or a decode would wait behind its prompts).
    So GENERAL/HYBRID instances settle into a prefill group and a decode group."""
    dedicated = (
        ExecutionInstanceType.PREFILLING if leg == "prefill" else ExecutionInstanceType.DECODING
    )
    if v.role is dedicated:
        return 1.0
    prefill, decode = v.queued_prefill_tokens > 0, v.outstanding_decode_tokens > 0
    same, other = (prefill, decode) if leg == "prefill" else (decode, prefill)
    if other:
        return 0.0
    return 1.0 if same else 0.5


class PDOrchestrator:
    """Chooses the (prefill, decode) pair of a disaggregated request; see the module doc."""

    def __init__(self, params: PairingParams | None = None, *, seed: int | None = None) -> None:
        p = params or PairingParams()
        self.params = p
        self.links = p.link_model()
        self._rng = random.Random(seed)
        self.prefill_router = self._leg_router("prefill", p.prefill_strategy, seed)
        self.decode_router = self._leg_router("decode", p.decode_strategy, seed)
        # model -> instance id -> when a prompt last needed it held for prefill legs
        self._reserved: dict[str, dict[str, float]] = {}
        # model -> (time, prompt tokens) of the prompts that would stall decodes, over the
        # last reserve_hold_s
        self._stalling: dict[str, deque[tuple[float, int]]] = {}
        self.holds_started = 0
        """How many times an instance was taken into a prefill reserve."""

    def _leg_router(
        self, leg: Literal["prefill", "decode"], name: str, seed: int | None
    ) -> Pipeline:
        if name:
            return build_router(name, None, seed=seed, leg=leg)
        p = self.params
        scorers: list[tuple[Scorer, float]]
        if leg == "prefill":
            scorers = [(PrefixMatchScorer(), p.prefix_weight), (QueueDepthScorer(), p.queue_weight)]
        else:
            scorers = [(KVUsageScorer(), p.kv_weight), (LeastOutstandingScorer(), p.batch_weight)]
        return Pipeline(
            f"pd_{leg}",
            [CapacityFilter(p.kv_threshold)],
            scorers,
            MaxPicker(),
            random.Random(seed),
            leg=leg,
        )

    def _ranked(
        self,
        router: Pipeline,
        req: RequestInfo,
        snap: ClusterSnapshot,
        keep: Callable[[InstanceView], bool] | None = None,
    ) -> list[tuple[InstanceView, float]]:
        """The best ``top_k`` + 1 candidates of ``router``'s leg, with their scores; only
        those ``keep`` keeps, when it keeps any."""
        cands = list(router.candidates(req, snap))
        if keep is not None:
            kept = [c for c in cands if keep(c)]
            if kept:
                cands = kept
        if not cands:
            return []
        scores, _ = router.scores(req, cands, snap)
        self._rng.shuffle(cands)  # equal scores: a seeded random order
        cands.sort(key=lambda c: scores[c.instance_id], reverse=True)
        return [(c, scores[c.instance_id]) for c in cands[: self.params.top_k + 1]]

    @staticmethod
    def _prefill_ttfts(req: RequestInfo, prefills: list[InstanceView]) -> dict[str, float]:
        """Each prefill candidate's predicted TTFT for ``req``. A ``PREFILLING`` one whose
        prefill rate is still its prior (no long prompt ran there yet, however many short
        ones did) is predicted at the estimates of the fastest one whose rate is measured,
        on its own queue: its prior, slower than a measured rate, had lost it every pair,
        and prefill legs are its only requests, so it was never measured (a new or added
        prefill instance took none). A ``GENERAL``/``HYBRID`` one is measured by its other
        requests, and kept where phase isolation puts it."""
        measured = [pv for pv in prefills if pv.rate_measured]
        ref = max(measured, key=lambda pv: pv.est_prefill_tps, default=None)
        out: dict[str, float] = {}
        for pv in prefills:
            if pv.rate_measured or ref is None or pv.role is not ExecutionInstanceType.PREFILLING:
                out[pv.instance_id] = pv.predict_ttft_s(req.prompt_tokens)
            else:
                pending = pv.queued_prefill_tokens + req.prompt_tokens
                out[pv.instance_id] = ref.est_ttft_base_s + pending / max(ref.est_prefill_tps, 1e-9)
        return out

    def _no_stall(self, req: RequestInfo) -> Callable[[InstanceView], bool] | None:
        """With a gap target: whether ``req``'s prompt on an instance keeps the decodes
        running there within it."""
        target = self.params.itl_slo_s
        if target is None:
            return None
        tokens, most = req.prompt_tokens, self.params.max_batched_tokens
        return lambda v: prefill_gap_s(v, tokens, most) <= target

    def plan(self, req: RequestInfo, snap: ClusterSnapshot) -> PDPlan | None:
        """The best pair for ``req`` now, or None when no two different instances can take
        the two legs (both need a free slot)."""
        p = self.params
        held = self._reserved.get(req.model)
        decodes = self._ranked(
            self.decode_router, req, snap, (lambda v: v.instance_id not in held) if held else None
        )
        prefills = (
            self._ranked(self.prefill_router, req, snap, self._no_stall(req)) if decodes else []
        )
        total = 2.0 + p.transfer_weight + p.role_weight + p.isolation_weight + p.ttft_weight
        ttfts = self._prefill_ttfts(req, [pv for pv, _ in prefills])
        fastest = min(ttfts.values(), default=0.0)
        # what each prefill candidate brings to every pair it is in, computed once: its
        # predicted prefill time (the affinity's numerator), role fit, phase fit (times
        # its relative speed, as isolation() has it) and speed
        legs = []
        for pv, p_score in prefills:
            speed = fastest / max(ttfts[pv.instance_id], 1e-9)
            legs.append((
                pv,
                p_score,
                max(pv.predict_ttft_s(req.prompt_tokens), 1e-9),
                _role_fit(pv.role, ExecutionInstanceType.PREFILLING),
                phase_fit(pv, "prefill") * speed,
                p.ttft_weight * speed,
            ))  # fmt: skip
        transfer_s, tokens = self.links.transfer_s, req.prompt_tokens
        best: tuple[float, InstanceView, InstanceView] | None = None
        scores: dict[str, float] = {}
        for d, d_score in decodes:
            d_role = _role_fit(d.role, ExecutionInstanceType.DECODING)
            d_phase = phase_fit(d, "decode")
            for pv, p_score, prefill_s, p_role, p_phase, speed in legs:
                if pv.instance_id == d.instance_id:
                    continue
                role = (d_role + p_role) / 2.0
                # the transfer affinity, prefill time / (prefill time + KV transfer time),
                # in (0, 1], and isolation(pv, d, speed), with the prefill's parts above
                aff = prefill_s / (prefill_s + transfer_s(tokens, pv, d))
                iso = p.isolation_weight * (0.5 * p_phase + 0.5 * d_phase)
                value = (
                    d_score + p_score + p.transfer_weight * aff + p.role_weight * role + iso
                    + speed
                ) / total  # fmt: skip
                scores[f"{pv.instance_id}->{d.instance_id}"] = value
                if best is None or value > best[0]:
                    best = (value, pv, d)
        if best is None:
            return None
        value, pv, d = best
        link = self.links.kind(pv, d)
        transfer = self.links.transfer_s(req.prompt_tokens, pv, d)
        self.prefill_router.on_routed(req, RoutingDecision(pv.instance_id))
        self.decode_router.on_routed(req, RoutingDecision(d.instance_id))
        reason = (
            f"pair {pv.instance_id}->{d.instance_id}: score={value:.2f}, {link} link, "
            f"transfer≈{transfer * 1000:.1f} ms ({len(scores)} pairs)"
        )
        return PDPlan(pv.instance_id, d.instance_id, reason, scores, link, transfer)

    def plan_within(
        self,
        req: RequestInfo,
        snap: ClusterSnapshot,
        rooms: Iterable[frozenset[str] | None],
    ) -> PDPlan | None:
        """:meth:`plan` with both legs inside the first of ``rooms`` (sets of instance ids,
        None skipped) that holds a free pair, else over all of ``snap`` (a LoRA adapter's
        request: both legs where the adapter has room, when a pair is free there)."""
        for room in rooms:
            if room is None:
                continue
            others = frozenset(v.instance_id for v in snap if v.instance_id not in room)
            narrowed = replace(req, excluded_instances=req.excluded_instances | others)
            plan = self.plan(narrowed, snap)
            if plan is not None:
                return plan
        return self.plan(req, snap)

    def observe(self, req: RequestInfo, snap: ClusterSnapshot) -> None:
        """Keep the prefill reserve of ``req``'s model (see :class:`PairingParams`), as
        ``req`` is decided on ``snap``: holds past ``reserve_hold_s`` end, and a prompt
        that would stall the decodes of a free whole-request instance past the gap target
        renews the holds, and, when no free instance would take its prefill within the
        target, holds the GENERAL/HYBRID instance with the least decode work left (never
        the model's last one). The reserve is sized by the prefill work of such prompts
        over the last ``reserve_hold_s``: one instance more than that work needs at
        :data:`RESERVE_UTILIZATION` of the fastest instance's prefill rate, at most
        ``prefill_reserve``; when the work needs more than that, no instance is held (a
        reserve that cannot keep up only takes instances from whole requests). Called for
        every request of a PD model before it is decided, in the same order by the
        dispatcher and the cluster simulator."""
        p = self.params
        target = p.itl_slo_s
        if target is None or p.prefill_reserve == 0:
            return
        model, now = req.model, snap.now
        held = self._reserved.get(model)
        if held:
            for iid in [i for i, t in held.items() if now - t > p.reserve_hold_s]:
                del held[iid]
        views = snap.for_model(model)
        tokens = req.prompt_tokens
        within = self._no_stall(req)
        assert within is not None  # (a target is set)
        stalls = False
        fits = False
        for v in views:
            if not v.has_capacity:
                continue
            if within(v):
                fits = fits or v.role.runs_prefill
            elif v.role.runs_whole_requests:
                stalls = True
        if not stalls:
            return
        window = self._stalling.setdefault(model, deque())
        window.append((now, tokens))
        while now - window[0][0] > p.reserve_hold_s:
            window.popleft()
        held = self._reserved.setdefault(model, {})
        for iid in held:
            held[iid] = now
        flexible = [v for v in views if v.role.runs_whole_requests]
        cap = min(p.prefill_reserve, len(flexible) - 1)
        # the instances the stalling prompts' prefill work needs, at RESERVE_UTILIZATION
        # of the fastest one's prefill rate: a reserve too small for it would only take
        # instances from whole requests, so there is none then
        rate = max(v.est_prefill_tps for v in flexible) if flexible else 0.0
        demand = sum(t for _, t in window) / max(now - window[0][0], 1.0)
        needed = math.ceil(demand / max(rate * RESERVE_UTILIZATION, 1e-9))
        if needed > cap:
            held.clear()
            return
        if fits or len(held) >= min(cap, needed + 1):
            return
        free = [v for v in flexible if v.instance_id not in held]
        if free:
            pick = min(free, key=lambda v: (v.outstanding_decode_tokens, v.instance_id))
            held[pick.instance_id] = now
            self.holds_started += 1

    def reserved(self, model: str) -> frozenset[str]:
        """The instances of ``model`` held for prefill legs now."""
        return frozenset(self._reserved.get(model, ()))

    def whole_allowed(
        self, req: RequestInfo, snap: ClusterSnapshot, allowed: frozenset[str] | None
    ) -> frozenset[str] | None:
        """``allowed`` (None: every instance) without the instances held for prefill legs
        of ``req``'s model: where a whole request should go. A preference: the caller
        routes without it when none of these is free."""
        held = self._reserved.get(req.model)
        if not held:
            return allowed
        if allowed is None:
            return frozenset(v.instance_id for v in snap if v.instance_id not in held)
        return frozenset(i for i in allowed if i not in held)

    def describe(self) -> dict[str, object]:
        """Parameters, both leg routers and the instances held for prefill legs."""
        return {
            "params": asdict(self.params),
            "prefill_router": self.prefill_router.describe(),
            "decode_router": self.decode_router.describe(),
            "held_for_prefill": {m: sorted(h) for m, h in sorted(self._reserved.items()) if h},
            "prefill_reserve_holds": self.holds_started,
        }


def with_pd_assignment(snap: ClusterSnapshot, plan: PDPlan, req: RequestInfo) -> ClusterSnapshot:
    """The successor snapshot after ``req`` was started on ``plan``'s pair (per-phase load,
    as the module docstring describes)."""
    out: list[InstanceView] = []
    for inst in snap.instances:
        if inst.instance_id == plan.prefill_id:
            inst = replace(
                inst,
                in_flight=inst.in_flight + 1,
                queued_prefill_tokens=inst.queued_prefill_tokens + req.prompt_tokens,
            )
        elif inst.instance_id == plan.decode_id:
            inst = replace(
                inst,
                in_flight=inst.in_flight + 1,
                outstanding_decode_tokens=inst.outstanding_decode_tokens + req.max_tokens,
            )
        out.append(inst)
    return replace(snap, instances=tuple(out))


def predicted_e2e_s(snap: ClusterSnapshot, plan: PDPlan, req: RequestInfo) -> float | None:
    """``req``'s predicted end-to-end time on ``plan``'s pair, from ``snap`` (None when
    either instance is not in it): the prefill instance's TTFT, the KV transfer and a
    decode step, then ``max_tokens - 1`` decode steps."""
    p, d = snap.get(plan.prefill_id), snap.get(plan.decode_id)
    if p is None or d is None:
        return None
    ttft = p.predict_ttft_s(req.prompt_tokens) + plan.transfer_s + d.est_tpot_s
    return ttft + max(0, req.max_tokens - 1) * d.est_tpot_s


def uses_pd(roles: Iterable[ExecutionInstanceType]) -> bool:
    """Whether a model served by instances of ``roles`` is set up for PD."""
    return any(r in PD_ROLES for r in roles)


Member = tuple[str, ExecutionInstanceType]
"""A registered instance as fleet checks see it: (instance id, role)."""


def pair_exists(members: Iterable[Member]) -> bool:
    """Whether ``members`` are set up for PD and hold a prefill-capable instance and a
    different decode-capable one."""
    listed = list(members)
    if not uses_pd(role for _, role in listed):
        return False
    prefill = {iid for iid, role in listed if role.runs_prefill}
    decode = {iid for iid, role in listed if role.runs_decode}
    return bool(prefill) and bool(decode) and len(prefill | decode) > 1


def unservable_reason(model: str, members: Sequence[Member], *, pd_enabled: bool) -> str | None:
    """Why a fleet of ``members`` (the instances of ``model``) can never run a request for
    it, or None when it can (whole, or as a PD pair when ``pd_enabled``)."""
    if not members:
        return f"no instance serves model {model!r}"
    if any(role.runs_whole_requests for _, role in members):
        return None
    if not pd_enabled:
        return (
            f"model {model!r} is served only by PREFILLING/DECODING instances and PD "
            "disaggregation is disabled"
        )
    if pair_exists(members):
        return None
    only_prefill = all(role is ExecutionInstanceType.PREFILLING for _, role in members)
    missing = "decode" if only_prefill else "prefill"
    return f"model {model!r} has no {missing}-capable instance to pair with"


def servable_view(snap: ClusterSnapshot, pd_models: Sequence[str]) -> ClusterSnapshot:
    """``snap`` plus, for each of ``pd_models`` that has a free PREFILLING and a free
    DECODING instance but no whole-request instance with a free slot, one stand-in GENERAL
    view (id ``pd-pair:<model>``) with the pair's latency estimates (and how far they are
    known: ``rate_measured``, ``measured``, ``tpot_known``).

    Scheduling policies only pop requests for models some whole-request instance can start;
    the dispatcher shows them this view so requests for a PD-only fleet are popped too.
    """
    extra: list[InstanceView] = []
    for model in pd_models:
        views = [i for i in snap.instances if i.model == model and i.has_capacity]
        if any(i.role.runs_whole_requests for i in views):
            continue
        prefill = [i for i in views if i.role is ExecutionInstanceType.PREFILLING]
        decode = [i for i in views if i.role is ExecutionInstanceType.DECODING]
        if not prefill or not decode:
            continue
        p = max(prefill, key=lambda i: i.est_prefill_tps)
        d = min(decode, key=lambda i: i.est_tpot_s)
        extra.append(
            InstanceView(
                instance_id=PAIR_VIEW_PREFIX + model,
                model=model,
                max_concurrency=sum(i.free_slots for i in decode),
                queued_prefill_tokens=p.queued_prefill_tokens,
                est_ttft_base_s=p.est_ttft_base_s + d.est_tpot_s,
                est_prefill_tps=p.est_prefill_tps,
                est_tpot_s=d.est_tpot_s,
                est_chunk_tps=p.est_chunk_tps,
                rate_measured=p.rate_measured,
                measured=p.measured and d.measured,
                tpot_known=d.tpot_known,  # (a prior's, or a burst's, refuses nothing)
            )
        )
    if not extra:
        return snap
    return replace(snap, instances=(*snap.instances, *extra))
