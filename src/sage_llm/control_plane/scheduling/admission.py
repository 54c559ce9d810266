"""Admission checks shared by the policies and the manager.

* :func:`check_queue_bound` / :class:`QueueBound` — refuse when the queue is full, with a
  ``retry_after_s`` estimated from the fleet's throughput.
* :func:`best_predicted_e2e` / :func:`check_deadline_feasible` — can any instance finish
  the request before its deadline? (used by ``slo_aware``); :func:`least_e2e_floor` —
  what the predictions may refuse it by.
* :func:`eligible_instances` — instances that could ever run a request (healthy, accepting,
  same model, whole-request role, not excluded), free slot or not; :func:`pd_leg_instances`
  those that could run its legs when none runs it whole (a fleet of PD roles).

All are pure functions of a :class:`~sage_llm.control_plane.snapshot.ClusterSnapshot`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sage_llm.control_plane.scheduling.base import ADMIT, Admission
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo
from sage_llm.types import ExecutionInstanceType

TYPICAL_PROMPT_TOKENS = 512
TYPICAL_OUTPUT_TOKENS = 128
MIN_RETRY_AFTER_S = 0.1


def eligible_instances(req: RequestInfo, snap: ClusterSnapshot) -> tuple[InstanceView, ...]:
    """Instances that could run ``req`` as a whole request, now or once a slot frees."""
    return tuple(
        i
        for i in snap.instances
        if i.model == req.model
        and i.role.runs_whole_requests
        and i.healthy
        and i.accepting
        and i.instance_id not in req.excluded_instances
    )


def pd_leg_instances(
    req: RequestInfo, snap: ClusterSnapshot
) -> tuple[tuple[InstanceView, ...], tuple[InstanceView, ...]]:
    """The instances that could run ``req``'s prefill leg and its decode leg (healthy,
    accepting, same model, not excluded, a PREFILLING or DECODING role): what a fleet
    that runs no whole request of its model offers it under PD."""
    legs = [
        i
        for i in snap.instances
        if i.model == req.model
        and not i.role.runs_whole_requests
        and i.healthy
        and i.accepting
        and i.instance_id not in req.excluded_instances
    ]
    return (
        tuple(i for i in legs if i.role.runs_prefill),
        tuple(i for i in legs if i.role.runs_decode),
    )


def predicted_pd_e2e(prefill: InstanceView, decode: InstanceView, req: RequestInfo) -> float:
    """A disaggregated request's predicted e2e: its prefill leg's time to first token, then
    every output token at the decode instance's pace (the KV transfer left out)."""
    return prefill.predict_ttft_s(req.prompt_tokens) + max(1, req.max_tokens) * decode.est_tpot_s


def estimate_drain_s(
    requests: int,
    snap: ClusterSnapshot,
    *,
    prompt_tokens: int = TYPICAL_PROMPT_TOKENS,
    output_tokens: int = TYPICAL_OUTPUT_TOKENS,
) -> float | None:
    """Seconds for the fleet to start ``requests`` more requests of a typical size.

    Throughput is Σ max_concurrency / predicted e2e over healthy, accepting instances
    (the decode instances, after the fastest prefill, of a fleet of PD roles only); None
    when there is none.
    """
    rate = 0.0
    prefill_s: float | None = None
    for inst in snap.instances:
        if not (inst.healthy and inst.accepting):
            continue
        if inst.role.runs_whole_requests:
            rate += inst.max_concurrency / max(
                inst.predict_e2e_s(prompt_tokens, output_tokens), 1e-9
            )
        elif inst.role.runs_prefill:
            ttft = inst.predict_ttft_s(prompt_tokens)
            prefill_s = ttft if prefill_s is None else min(prefill_s, ttft)
    if rate <= 0.0 and prefill_s is not None:
        for inst in snap.instances:
            if inst.healthy and inst.accepting and inst.role is ExecutionInstanceType.DECODING:
                decode_s = prefill_s + max(1, output_tokens) * inst.est_tpot_s
                rate += inst.max_concurrency / max(decode_s, 1e-9)
    if rate <= 0.0:
        return None
    return max(MIN_RETRY_AFTER_S, requests / rate)


def check_queue_bound(queued: int, max_queue: int, snap: ClusterSnapshot) -> Admission:
    """Admit while ``queued < max_queue``; otherwise ``Admission(False, "queue full", …)``.

    ``retry_after_s`` estimates when a queue slot frees up (:func:`estimate_drain_s` of
    the excess); None when no instance is up. ``max_queue`` must be >= 1.
    """
    if max_queue < 1:
        raise ValueError(f"max_queue must be >= 1, got {max_queue}")
    if queued < max_queue:
        return ADMIT
    retry = estimate_drain_s(queued - max_queue + 1, snap)
    return Admission(
        False,
        reason=f"queue full ({queued} queued, bound {max_queue})",
        retry_after_s=retry,
        kind="queue_full",
    )


@dataclass(frozen=True, slots=True)
class QueueBound:
    """A bounded queue: ``QueueBound(1000).check(len(policy), snap)``."""

    max_queue: int

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")

    def check(self, queued: int, snap: ClusterSnapshot) -> Admission:
        """See :func:`check_queue_bound`."""
        return check_queue_bound(queued, self.max_queue, snap)


def best_predicted_e2e(
    req: RequestInfo, snap: ClusterSnapshot
) -> tuple[InstanceView, float] | None:
    """The eligible instance with the lowest predicted e2e for ``req`` and that e2e.

    None when no instance is eligible (:func:`eligible_instances`). A fleet that runs no
    whole request of ``req``'s model has its best PD pair predicted instead (the fastest
    prefill leg, the fastest decode instance, which is the one returned), for the
    request runs disaggregated there.
    """
    best: tuple[InstanceView, float] | None = None
    for inst in eligible_instances(req, snap):
        e2e = inst.predict_e2e_s(req.prompt_tokens, req.max_tokens)
        if best is None or e2e < best[1]:
            best = (inst, e2e)
    if best is None:
        prefills, decodes = pd_leg_instances(req, snap)
        if prefills and decodes:
            prefill = min(prefills, key=lambda i: i.predict_ttft_s(req.prompt_tokens))
            decode = min(decodes, key=lambda i: i.est_tpot_s)
            best = (decode, predicted_pd_e2e(prefill, decode, req))
    return best


def e2e_floor(inst: InstanceView, req: RequestInfo) -> float:
    """What a prediction may refuse ``req`` by on ``inst``: its predicted e2e when the TPOT
    is known at the batch the request would join (``InstanceView.tpot_known``), else its
    predicted time to first token alone. A TPOT learnt only in bigger batches (a burst's,
    ~3x a solo request's on vLLM) or still the prior is no bound from below, and a request
    refused for it never runs, so the estimate would never come down."""
    if inst.tpot_known:
        return inst.predict_e2e_s(req.prompt_tokens, req.max_tokens)
    return inst.predict_ttft_s(req.prompt_tokens)


def least_e2e_floor(req: RequestInfo, snap: ClusterSnapshot) -> float | None:
    """The least :func:`e2e_floor` of ``req`` over the instances that could run it (those
    of :func:`best_predicted_e2e`: on a fleet that runs no whole request of its model, the
    fastest prefill leg and a decode instance's known TPOT, none when not known)."""
    floors = [e2e_floor(i, req) for i in eligible_instances(req, snap)]
    if floors:
        return min(floors)
    prefills, decodes = pd_leg_instances(req, snap)
    if not (prefills and decodes):
        return None
    prefill = min(i.predict_ttft_s(req.prompt_tokens) for i in prefills)
    tokens = max(1, req.max_tokens)
    return prefill + min(tokens * i.est_tpot_s if i.tpot_known else 0.0 for i in decodes)


def check_deadline_feasible(req: RequestInfo, snap: ClusterSnapshot) -> Admission:
    """Reject when even the best instance's predicted finish is past the deadline.

    Admits requests without a deadline, and requests no instance is eligible for (they
    wait for one; other checks deal with unknown models), and requests that an instance
    whose TPOT is not known at the batch they would join might meet (:func:`e2e_floor`:
    its time to first token alone meets the deadline). The rejection has no
    ``retry_after_s``: retrying later only makes a fixed deadline harder to meet.
    """
    if req.deadline is None:
        return ADMIT
    best = best_predicted_e2e(req, snap)
    if best is None:
        return ADMIT
    inst, e2e = best
    remaining = req.deadline - snap.now
    if e2e <= remaining:
        return ADMIT
    floor = least_e2e_floor(req, snap)
    if floor is None or floor <= remaining:  # a TPOT not known there: it runs and tells it
        return ADMIT
    return Admission(
        False,
        reason=(
            f"deadline infeasible: best predicted e2e {e2e:.3f}s (instance "
            f"{inst.instance_id}) exceeds the {remaining:.3f}s left before the deadline"
        ),
        retry_after_s=None,
        kind="slo_infeasible",
    )
