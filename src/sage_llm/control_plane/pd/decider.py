"""PD deciders: whether a request is worth disaggregating (prefill and decode on two
instances) or is better run colocated on one.

A decider is pure and synchronous: ``decide(req, snap) -> PDDecision``. It is asked only
for a model whose fleet is set up for PD, and it states a preference: when the preferred
path has no free slot at that moment and the other one has, the dispatcher takes the other
one (a model served only by PREFILLING and DECODING instances always disaggregates).

Deciders by name (:func:`build_decider`; parameters in a frozen ``Params`` dataclass):

* ``always`` / ``never``;
* ``threshold``: prompts of at least ``min_prompt_tokens`` tokens whose prompt/output ratio
  is at least ``min_ratio`` (0 = no ratio condition);
* ``prefix_aware``: disaggregate unless the instance that would run the request colocated
  already caches most of the prompt (fewer than ``min_uncached_tokens`` left to compute);
* ``adaptive``: predicts TTFT, TPOT and the largest inter-token gap on both paths from live
  load and picks the one with the better predicted SLO outcome (see
  :class:`AdaptiveDecider`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from sage_llm.config_fields import name_key
from sage_llm.control_plane.params import build_params
from sage_llm.control_plane.pd.orchestrator import LinkModel, prefill_gap_s, stall_s
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PDDecision:
    """The decider's answer: disaggregate or not, and why."""

    disaggregate: bool
    reason: str


@runtime_checkable
class Decider(Protocol):
    """Decides whether one request runs disaggregated."""

    name: str

    def decide(self, req: RequestInfo, snap: ClusterSnapshot) -> PDDecision: ...

    def describe(self) -> dict[str, object]: ...


# --------------------------------------------------------------------------- simple ones


@dataclass(frozen=True, slots=True)
class NoParams:
    """Nothing to set."""


class AlwaysDecider:
    """Disaggregates every request."""

    name = "always"

    def __init__(self, params: NoParams | None = None) -> None:
        self.params = params or NoParams()

    def decide(self, req: RequestInfo, snap: ClusterSnapshot) -> PDDecision:
        return PDDecision(True, "always")

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "params": {}}


class NeverDecider:
    """Runs every request colocated while a whole-request instance can take it."""

    name = "never"

    def __init__(self, params: NoParams | None = None) -> None:
        self.params = params or NoParams()

    def decide(self, req: RequestInfo, snap: ClusterSnapshot) -> PDDecision:
        return PDDecision(False, "never")

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "params": {}}


@dataclass(frozen=True, slots=True)
class ThresholdParams:
    """``min_prompt_tokens``: shortest prompt to disaggregate; ``min_ratio``: smallest
    prompt/max_tokens ratio (0 = any)."""

    min_prompt_tokens: int = 800
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.min_prompt_tokens < 0:
            raise ConfigError("must be >= 0", key="min_prompt_tokens")
        if not (math.isfinite(self.min_ratio) and self.min_ratio >= 0):
            raise ConfigError(
                f"must be a finite number >= 0, got {self.min_ratio!r}", key="min_ratio"
            )


class ThresholdDecider:
    """Long prompts (and, with ``min_ratio``, prompt-heavy requests) are disaggregated."""

    name = "threshold"

    def __init__(self, params: ThresholdParams | None = None) -> None:
        self.params = params or ThresholdParams()

    def decide(self, req: RequestInfo, snap: ClusterSnapshot) -> PDDecision:
        p = self.params
        if req.prompt_tokens < p.min_prompt_tokens:
            return PDDecision(False, f"prompt {req.prompt_tokens} < {p.min_prompt_tokens} tokens")
        ratio = req.prompt_tokens / max(req.max_tokens, 1)
        if p.min_ratio > 0 and ratio < p.min_ratio:
            return PDDecision(False, f"input/output ratio {ratio:.2f} < {p.min_ratio:g}")
        return PDDecision(
            True, f"prompt {req.prompt_tokens} >= {p.min_prompt_tokens} tokens, ratio {ratio:.2f}"
        )

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "params": asdict(self.params)}


@dataclass(frozen=True, slots=True)
class PrefixAwareParams:
    """``min_uncached_tokens``: disaggregate only when at least this many prompt tokens are
    not cached on the best colocated instance; ``block_size``: tokens per prefix block (the
    manager's ``prefix_block_size``)."""

    min_uncached_tokens: int = 512
    block_size: int = 16

    def __post_init__(self) -> None:
        if self.min_uncached_tokens < 0:
            raise ConfigError("must be >= 0", key="min_uncached_tokens")
        if self.block_size < 1:
            raise ConfigError("must be >= 1", key="block_size")


class PrefixAwareDecider:
    """Skips the prefill stage when the instance that would decode the request colocated
    (the whole-request instance caching most of its prompt, from ``snap.prefix``) has
    fewer than ``min_uncached_tokens`` tokens left to compute: a short local prefill then
    costs less than a KV hand-off."""

    name = "prefix_aware"

    def __init__(self, params: PrefixAwareParams | None = None) -> None:
        self.params = params or PrefixAwareParams()

    def decide(self, req: RequestInfo, snap: ClusterSnapshot) -> PDDecision:
        p = self.params
        local = snap.runnable(req)
        if not local:
            return PDDecision(True, "no colocated instance is free")
        matched = snap.prefix.match(req.block_hashes) if req.block_hashes else {}
        best = max(local, key=lambda i: (matched.get(i.instance_id, 0), -i.load))
        cached = min(req.prompt_tokens, matched.get(best.instance_id, 0) * p.block_size)
        uncached = req.prompt_tokens - cached
        if uncached < p.min_uncached_tokens:
            return PDDecision(
                False,
                f"{best.instance_id} caches {cached} of {req.prompt_tokens} prompt tokens "
                f"({uncached} < {p.min_uncached_tokens} left)",
            )
        return PDDecision(True, f"{uncached} uncached prompt tokens >= {p.min_uncached_tokens}")

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "params": asdict(self.params)}


# --------------------------------------------------------------------------- adaptive


@dataclass(frozen=True, slots=True)
class AdaptiveParams:
    """``ttft_slo_s`` / ``tpot_slo_s`` / ``itl_slo_s``: latency targets (None: not targeted;
    a request's own deadline is always taken into account); ``itl_slo_s`` bounds the
    *largest* inter-token gap; ``hysteresis``: disaggregate only when its predicted outcome
    is better by more than this fraction; ``slack``: keep a request colocated whenever its
    colocated badness is at most this (it meets every target with room to spare; 0: off);
    ``prefill_interference``: weight of the chunked-prefill penalty on colocated TPOT;
    ``max_batched_tokens``: prefill tokens one engine step carries at most (vLLM's
    ``max_num_batched_tokens``), which bounds a chunked-prefill stall;
    ``max_transfer_s``: never disaggregate when the KV transfer alone would take longer
    (None: no limit); ``top_k``: the disaggregated path is predicted over pairs of the best
    ``top_k`` + 1 candidates of each leg (one more than ``top_k``, so that each keeps
    ``top_k`` partners when an instance that may run either leg ranks on both sides: it
    cannot pair with itself); the link fields are those of
    :class:`~sage_llm.control_plane.pd.orchestrator.LinkModel`."""

    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    itl_slo_s: float | None = None
    hysteresis: float = 0.1
    slack: float = 0.8
    max_batched_tokens: int = 8192
    prefill_interference: float = 1.0
    max_transfer_s: float | None = None
    top_k: int = 3
    nvlink_gbps: float = 300.0
    machine_gbps: float = 25.0
    cross_rack_factor: float = 0.5
    kv_bytes_per_token: int = 131072

    def __post_init__(self) -> None:
        for key in ("ttft_slo_s", "tpot_slo_s", "itl_slo_s", "max_transfer_s"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ConfigError(f"must be a number > 0, got {value!r}", key=key)
        if not 0.0 <= self.hysteresis < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.hysteresis!r}", key="hysteresis")
        if not (math.isfinite(self.prefill_interference) and self.prefill_interference >= 0):
            raise ConfigError("must be a finite number >= 0", key="prefill_interference")
        if not (math.isfinite(self.slack) and 0.0 <= self.slack < 1.0):
            raise ConfigError(f"must be in [0, 1), got {self.slack!r}", key="slack")
        if self.top_k < 1:
            raise ConfigError("must be >= 1", key="top_k")
        if self.max_batched_tokens < 1:
            raise ConfigError("must be >= 1", key="max_batched_tokens")
        self.link_model()

    def link_model(self) -> LinkModel:
        return LinkModel(
            self.nvlink_gbps, self.machine_gbps, self.cross_rack_factor, self.kv_bytes_per_token
        )


@dataclass(frozen=True, slots=True)
class PathPrediction:
    """Predicted latencies of one path, and its badness (below 1: every target met).
    ``gap_s`` is the largest inter-token gap predicted on the path (its own decode, or the
    running decodes that this request's prefill would stall)."""

    ttft_s: float
    tpot_s: float
    e2e_s: float
    badness: float
    where: str
    gap_s: float = 0.0


class AdaptiveDecider:
    """Compares the two paths on predicted latency from live load.

    * colocated, on the best whole-request instance: TTFT = its ``predict_ttft_s``; TPOT =
      its TPOT estimate plus a chunked-prefill penalty: the prefill work queued on it
      (``queued_prefill_tokens`` at its prefill rate) is interleaved with the running
      decodes and spread over this request's output tokens, times ``prefill_interference``;
      largest gap = a decode step, or, when decodes run there, the stall this prompt's
      chunk inflicts on them (:meth:`prefill_gap_s`);
    * disaggregated, over the best pairs: TTFT = the prefill instance's ``predict_ttft_s``
      + the KV transfer (prompt tokens × KV bytes per token / link bandwidth) + one decode
      step; TPOT = the decode instance's TPOT (with the same penalty, which is zero on a
      DECODING instance: no prefill is queued there); largest gap = the larger of the
      decode instance's stall behind its own queued prefill and the stall the prefill leg
      inflicts on decodes running on the prefill instance. Legs that would break the gap
      target rank last among the candidates.

    A path's badness is the largest ratio of prediction to target over the TTFT, TPOT and
    largest-gap targets and the request's own deadline (end to end); without any target it
    is the predicted end-to-end time. A prompt that would on its own stall decodes beyond
    the gap target goes to a pair whose badness is at most ``slack``: colocated, it would
    leave a whole-request instance decoding and unfit to prefill the next such prompt.
    Otherwise a request whose colocated badness is at most ``slack`` stays colocated (it
    meets every target with room to spare), and otherwise it is
    disaggregated when that path's badness is below the colocated one's by more than
    ``hysteresis``: a dead band that keeps near-ties on the cheaper colocated path and
    stops decisions flapping as load moves.

    ``held_for_prefill`` (a model's instances held for prefill legs, which whole requests
    keep off: :meth:`~sage_llm.control_plane.pd.orchestrator.PDOrchestrator.reserved`,
    which :func:`~sage_llm.control_plane.pd.build_pd` sets) leaves those instances out of
    the colocated prediction while another whole-request instance is free, and out of the
    disaggregated prediction's decode legs while another decode instance is free (as the
    orchestrator pairs them).
    """

    name = "adaptive"

    def __init__(
        self,
        params: AdaptiveParams | None = None,
        *,
        held_for_prefill: Callable[[str], frozenset[str]] | None = None,
    ) -> None:
        self.params = params or AdaptiveParams()
        self.links = self.params.link_model()
        self.held_for_prefill = held_for_prefill

    def _tpot(self, v: InstanceView, req: RequestInfo) -> float:
        backlog_s = v.queued_prefill_tokens / max(v.est_prefill_tps, 1e-9)
        penalty = self.params.prefill_interference * backlog_s / max(1, req.max_tokens - 1)
        return v.est_tpot_s + penalty

    def stall_s(self, v: InstanceView, prefill_tokens: int) -> float:
        """:func:`~sage_llm.control_plane.pd.orchestrator.stall_s` with chunks of at most
        ``max_batched_tokens``."""
        return stall_s(v, prefill_tokens, self.params.max_batched_tokens)

    def prefill_gap_s(self, v: InstanceView, req: RequestInfo) -> float:
        """The gap that computing ``req``'s prompt on ``v`` inflicts on the decodes running
        there (0 when none run there): :func:`~sage_llm.control_plane.pd.orchestrator.
        prefill_gap_s`."""
        return prefill_gap_s(v, req.prompt_tokens, self.params.max_batched_tokens)

    def _breaks_gap(self, gap_s: float) -> bool:
        return self.params.itl_slo_s is not None and gap_s > self.params.itl_slo_s

    def _badness(
        self, req: RequestInfo, snap: ClusterSnapshot, ttft: float, tpot: float, gap: float = 0.0
    ) -> float:
        p = self.params
        e2e = ttft + max(0, req.max_tokens - 1) * tpot
        ratios: list[float] = []
        if p.ttft_slo_s is not None:
            ratios.append(ttft / p.ttft_slo_s)
        if p.tpot_slo_s is not None and req.max_tokens > 1:
            ratios.append(tpot / p.tpot_slo_s)
        if p.itl_slo_s is not None and req.max_tokens > 1:
            ratios.append(gap / p.itl_slo_s)
        if req.deadline is not None:
            ratios.append(e2e / max(req.deadline - snap.now, 1e-9))
        return max(ratios) if ratios else e2e

    def _predict(
        self,
        req: RequestInfo,
        snap: ClusterSnapshot,
        ttft: float,
        tpot: float,
        where: str,
        gap: float = 0.0,
    ) -> PathPrediction:
        e2e = ttft + max(0, req.max_tokens - 1) * tpot
        badness = self._badness(req, snap, ttft, tpot, gap)
        return PathPrediction(ttft, tpot, e2e, badness, where, gap)

    def colocated(self, req: RequestInfo, snap: ClusterSnapshot) -> PathPrediction | None:
        """The best colocated prediction, or None when no whole-request instance is free.
        Its gap is the larger of a decode step and the stall its own prefill inflicts on
        the decodes already running there."""
        runnable = snap.runnable(req)
        if self.held_for_prefill is not None and (held := self.held_for_prefill(req.model)):
            # where the request will go: not where instances are held for prefill legs
            runnable = tuple(v for v in runnable if v.instance_id not in held) or runnable
        preds = [
            self._predict(
                req, snap, v.predict_ttft_s(req.prompt_tokens), self._tpot(v, req),
                v.instance_id, max(v.est_tpot_s, self.prefill_gap_s(v, req)),
            )
            for v in runnable
        ]  # fmt: skip
        return min(preds, key=lambda x: x.badness, default=None)

    def disaggregated(self, req: RequestInfo, snap: ClusterSnapshot) -> PathPrediction | None:
        """The best disaggregated prediction, or None when no pair is free. Its decode leg
        is predicted where the orchestrator would put it: off the instances held for
        prefill legs while another is free."""
        free = [
            i
            for i in snap.for_model(req.model)
            if i.has_capacity and i.instance_id not in req.excluded_instances
        ]
        k = self.params.top_k
        # candidates that would break the gap target rank last, then by TTFT / TPOT
        prefills = sorted(
            (i for i in free if i.role.runs_prefill),
            key=lambda i: (
                self._breaks_gap(self.prefill_gap_s(i, req)),
                i.predict_ttft_s(req.prompt_tokens),
            ),
        )[: k + 1]
        decode_cands = [i for i in free if i.role.runs_decode]
        if self.held_for_prefill is not None and (held := self.held_for_prefill(req.model)):
            # where the decode leg will go: the orchestrator keeps it off held instances
            # while another is free
            decode_cands = [i for i in decode_cands if i.instance_id not in held] or decode_cands
        decodes = sorted(
            decode_cands,
            key=lambda i: (
                self._breaks_gap(self.stall_s(i, i.queued_prefill_tokens)),
                self._tpot(i, req),
            ),
        )
        best: PathPrediction | None = None
        for d in decodes[: k + 1]:
            for pv in prefills:
                if pv.instance_id == d.instance_id:
                    continue
                transfer = self.links.transfer_s(req.prompt_tokens, pv, d)
                if self.params.max_transfer_s is not None and transfer > self.params.max_transfer_s:
                    continue
                tpot = self._tpot(d, req)
                ttft = pv.predict_ttft_s(req.prompt_tokens) + transfer + d.est_tpot_s
                # the decode leg stalls behind prefill queued on d (none on a DECODING
                # instance); the prefill leg stalls decodes running on pv
                gap = max(self.stall_s(d, d.queued_prefill_tokens), self.prefill_gap_s(pv, req))
                where = f"{pv.instance_id}->{d.instance_id}"
                pred = self._predict(req, snap, ttft, tpot, where, gap)
                if best is None or pred.badness < best.badness:
                    best = pred
        return best

    def decide(self, req: RequestInfo, snap: ClusterSnapshot) -> PDDecision:
        colo = self.colocated(req, snap)
        disagg = self.disaggregated(req, snap)
        if disagg is None:
            return PDDecision(False, "no free pair within the transfer limit")
        if colo is None:
            return PDDecision(True, "no colocated instance is free")
        summary = (
            f"colocated {colo.where} ttft={colo.ttft_s * 1000:.0f}ms "
            f"tpot={colo.tpot_s * 1000:.1f}ms gap={colo.gap_s * 1000:.0f}ms vs disaggregated "
            f"{disagg.where} ttft={disagg.ttft_s * 1000:.0f}ms "
            f"tpot={disagg.tpot_s * 1000:.1f}ms gap={disagg.gap_s * 1000:.0f}ms"
        )
        slack = self.params.slack
        if self._stalling_prompt(req, snap, colo) and disagg.badness <= slack:
            return PDDecision(True, f"a prompt that stalls decodes, a pair with slack: {summary}")
        if self._has_targets(req) and colo.badness <= slack:
            return PDDecision(False, f"colocated meets every target with slack: {summary}")
        if disagg.badness < colo.badness * (1.0 - self.params.hysteresis):
            return PDDecision(True, f"disaggregated predicted better: {summary}")
        return PDDecision(False, f"colocated predicted as good: {summary}")

    def _stalling_prompt(
        self, req: RequestInfo, snap: ClusterSnapshot, colo: PathPrediction
    ) -> bool:
        """Whether ``req``'s prompt alone would stall decodes on the colocated instance
        beyond the gap target. Run there, it would leave that instance decoding, and so
        unfit to prefill other such prompts until it finishes."""
        view = snap.get(colo.where)
        return view is not None and self._breaks_gap(self.stall_s(view, req.prompt_tokens))

    def _has_targets(self, req: RequestInfo) -> bool:
        p = self.params
        targets = (p.ttft_slo_s, p.tpot_slo_s, p.itl_slo_s, req.deadline)
        return any(t is not None for t in targets)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "params": asdict(self.params)}


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True, slots=True)
class DeciderSpec:
    """A named decider: its ``Params`` dataclass and its constructor."""

    name: str
    params_type: type[Any]
    build: Callable[[Any], Decider]


DECIDERS: tuple[DeciderSpec, ...] = (
    DeciderSpec("always", NoParams, AlwaysDecider),
    DeciderSpec("never", NoParams, NeverDecider),
    DeciderSpec("threshold", ThresholdParams, ThresholdDecider),
    DeciderSpec("prefix_aware", PrefixAwareParams, PrefixAwareDecider),
    DeciderSpec("adaptive", AdaptiveParams, AdaptiveDecider),
)

DECIDER_NAMES: tuple[str, ...] = tuple(s.name for s in DECIDERS)


def get_decider(name: str) -> DeciderSpec:
    """The decider called ``name`` (case-insensitive, ``-`` read as ``_``); ConfigError
    listing the valid names otherwise."""
    wanted = name_key(name)
    for spec in DECIDERS:
        if spec.name == wanted:
            return spec
    raise ConfigError(
        f"unknown PD decider {name!r}; valid names: {', '.join(DECIDER_NAMES)}",
        key="routing_policy",
    )


def build_decider(name: str, params: Mapping[str, Any] | None = None) -> Decider:
    """The decider ``name`` with ``params`` applied. ConfigError for an unknown name or a
    bad parameter."""
    spec = get_decider(name)
    return spec.build(build_params(spec.params_type, params, owner=f"PD decider {spec.name!r}"))
