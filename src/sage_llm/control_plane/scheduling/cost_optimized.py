"""``cost_optimized``: run each request on the cheapest instance that still does the job.

Queue order is FIFO (``order="fifo"``) or priority with aging (``order="priority"``, with
the ``priority`` policy's ``aging_interval_s`` / ``max_wait_s``). The policy acts in
``constrain``: among the runnable instances it keeps the cheapest, by
``InstanceView.predict_cost`` (price per GPU-hour × GPUs × predicted e2e time), that

1. meets the request's deadline (when it has one) and costs at most ``cost_budget``
   (when set);
2. failing that, costs at most ``cost_budget`` (the deadline will likely be missed);
3. failing that, the cheapest of all (over budget; see ``over_budget_action``).

Every instance within ``cost_tolerance`` (relative) of that cheapest cost stays allowed,
so the router still spreads load over equally cheap instances.

Admission: with ``over_budget_action="reject"``, a request with a ``cost_budget`` below
the cheapest cost any instance of its model could offer (predicted with that instance's
queue empty) is rejected, unless an instance whose TPOT is not known at the batch the
request would join might do (its prefill alone within the budget: it is admitted, and its
result tells the TPOT; see ``admission.e2e_floor``);
with ``"cheapest"`` (default) it is admitted and runs on the cheapest instance. A
request admitted when it fitted and over budget by dispatch time (load rose) also runs on
the cheapest instance: ``constrain`` cannot refuse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal

from sage_llm.control_plane.scheduling._params import (
    check_choice,
    check_non_negative,
    check_positive,
)
from sage_llm.control_plane.scheduling._queue import QueuedPolicy, QueueEntry, Rank
from sage_llm.control_plane.scheduling.admission import eligible_instances, pd_leg_instances
from sage_llm.control_plane.scheduling.base import ADMIT, Admission
from sage_llm.control_plane.scheduling.priority import priority_rank
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo

ORDERS = ("fifo", "priority")
OVER_BUDGET_ACTIONS = ("reject", "cheapest")


def best_case_cost(inst: InstanceView, req: RequestInfo, *, floor: bool = False) -> float:
    """Cost of ``req`` on ``inst`` if nothing were queued there. With ``floor``, what a
    prediction may refuse it by: its prefill alone where the TPOT is not known at the batch
    the request would join (``InstanceView.tpot_known``; see ``admission.e2e_floor``)."""
    idle = replace(inst, queued_prefill_tokens=0)
    if floor and not inst.tpot_known:
        return idle.cost_per_second * idle.predict_ttft_s(req.prompt_tokens)
    return idle.predict_cost(req.prompt_tokens, req.max_tokens)


def cheapest_costs(req: RequestInfo, snap: ClusterSnapshot, *, floor: bool = False) -> list[float]:
    """:func:`best_case_cost` of ``req`` on each eligible instance; on a fleet that runs no
    whole request of its model, the cheapest PD pair's (each leg's time at its instance's
    price, nothing queued), as the request runs disaggregated there (with ``floor``, a
    decode instance's TPOT not known counts nothing)."""
    costs = [best_case_cost(i, req, floor=floor) for i in eligible_instances(req, snap)]
    if costs:
        return costs
    prefills, decodes = pd_leg_instances(req, snap)
    if not (prefills and decodes):
        return []
    prefill = min(
        i.cost_per_second * replace(i, queued_prefill_tokens=0).predict_ttft_s(req.prompt_tokens)
        for i in prefills
    )
    decode = min(
        i.cost_per_second * max(1, req.max_tokens) * i.est_tpot_s
        if i.tpot_known or not floor
        else 0.0
        for i in decodes
    )
    return [prefill + decode]


class CostOptimizedPolicy(QueuedPolicy):
    """Cheapest feasible instance per request; see the module docstring."""

    name = "cost_optimized"

    @dataclass(frozen=True, slots=True)
    class Params:
        """``order``: queue order, ``fifo`` or ``priority``. ``cost_tolerance``: instances
        within this relative margin of the cheapest stay allowed (0.05 = 5 %).
        ``over_budget_action``: ``reject`` at admission when no instance could be within
        the budget, or ``cheapest`` to run it on the cheapest instance anyway.
        ``aging_interval_s`` / ``max_wait_s``: as in ``priority`` (``order="priority"``)."""

        order: Literal["fifo", "priority"] = "fifo"
        cost_tolerance: float = 0.05
        over_budget_action: Literal["reject", "cheapest"] = "cheapest"
        aging_interval_s: float = 5.0
        max_wait_s: float = 60.0

        def __post_init__(self) -> None:
            check_choice("order", self.order, ORDERS)
            check_non_negative("cost_tolerance", self.cost_tolerance)
            check_choice("over_budget_action", self.over_budget_action, OVER_BUDGET_ACTIONS)
            check_positive("aging_interval_s", self.aging_interval_s)
            check_positive("max_wait_s", self.max_wait_s)

    def __init__(self, params: CostOptimizedPolicy.Params | None = None) -> None:
        super().__init__()
        self.params = params if params is not None else CostOptimizedPolicy.Params()
        self._counts = {"cheapest_feasible": 0, "missed_slo": 0, "over_budget": 0, "rejected": 0}

    def _place(self, req: RequestInfo) -> tuple[int, float]:
        if self.params.order == "priority":
            return int(req.priority), req.arrival
        return 0, req.arrival

    def _rank(self, entry: QueueEntry, now: float) -> Rank:
        if self.params.order == "priority":
            p = self.params
            return priority_rank(entry, now, p.aging_interval_s, p.max_wait_s)
        return (entry.key, entry.seq)

    def admit(self, req: RequestInfo, snap: ClusterSnapshot) -> Admission:
        self.observe(snap)
        if self.params.over_budget_action != "reject" or req.cost_budget is None:
            return ADMIT
        costs = cheapest_costs(req, snap)
        if not costs or min(costs) <= req.cost_budget:
            return ADMIT
        if min(cheapest_costs(req, snap, floor=True)) <= req.cost_budget:
            return ADMIT  # a TPOT not known there: it runs and tells it
        self._counts["rejected"] += 1
        return Admission(
            False,
            reason=(
                f"over budget: the cheapest instance of {req.model} would cost "
                f"{min(costs):.6g}, above the request's cost_budget {req.cost_budget:.6g}"
            ),
            kind="over_budget",
        )

    def constrain(self, req: RequestInfo, snap: ClusterSnapshot) -> frozenset[str] | None:
        cands = snap.runnable(req)
        if not cands:
            return None
        costs = {i.instance_id: i.predict_cost(req.prompt_tokens, req.max_tokens) for i in cands}
        budget = req.cost_budget
        within = [i for i in cands if budget is None or costs[i.instance_id] <= budget]
        if req.deadline is None:
            feasible = within
        else:
            remaining = req.deadline - snap.now
            feasible = [
                i for i in within if i.predict_e2e_s(req.prompt_tokens, req.max_tokens) <= remaining
            ]
        if feasible:
            pool, outcome = feasible, "cheapest_feasible"
        elif within:
            pool, outcome = within, "missed_slo"
        else:
            pool, outcome = list(cands), "over_budget"
        self._counts[outcome] += 1
        tolerance = 1.0 + self.params.cost_tolerance
        limit = min(costs[i.instance_id] for i in pool) * tolerance + 1e-12
        # an instance whose estimates are still its priors, or the mean of a few requests
        # (one slow one puts it far off), is priced by them, which a ranking by price would
        # never correct: when its GPUs cost no more than the cheapest's, one request at a
        # time goes there to learn (a dearer one would be chosen only for being faster,
        # which is what it is not known to be). So does an idle one whose TPOT is not
        # known at batch 1 (learnt only in a burst, ~3x a solo request's on vLLM: a twin
        # had got no light traffic after one). "The cheapest" are those of the lowest
        # predicted cost, not the lowest price per hour: a slower GPU cheaper per hour
        # in the fleet had shut a new twin of the cheapest out (0 of 200 requests)
        cheapest = [i for i in pool if costs[i.instance_id] <= limit]
        rate = max(i.cost_per_second for i in cheapest) * tolerance + 1e-12
        return frozenset(
            i.instance_id
            for i in pool
            if costs[i.instance_id] <= limit
            or (
                (not i.measured or not i.tpot_known)
                and i.in_flight == 0
                and i.cost_per_second <= rate
            )
        )

    def _params_dict(self) -> dict[str, object]:
        return asdict(self.params)

    def _state(self) -> dict[str, object]:
        state = super()._state()
        state.update(self._counts)
        return state


CostOptimizedParams = CostOptimizedPolicy.Params
