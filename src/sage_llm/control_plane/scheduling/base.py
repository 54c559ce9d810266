"""Scheduling policies decide WHEN (queue order) and IF (admission) a request runs.

Contract (every policy in this package keeps it):

* Pure and synchronous: no I/O, no awaiting, no reading clocks; time comes from
  ``snap.now`` / ``req.arrival``.
* ``push``/``pop``/``peek``/``remove``/``__len__`` behave like a queue (vLLM's
  ``RequestQueue`` shape). ``pop(snap)`` returns the request the policy wants to run next
  among those the fleet can start now (``snap.can_serve(req)``), or None. Requests the fleet
  cannot serve yet stay queued; they never block requests for other models.
* ``admit`` is called once before ``push``; a rejection carries a reason.
* ``constrain`` may restrict which instances the router considers for a request (the SLO-
  and cost-aware policies use it); None means "any".
* ``on_complete`` receives feedback for every request that ends.
* ``drain`` empties the queue in policy order (used when the policy is switched at run time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from sage_llm.control_plane.snapshot import ClusterSnapshot, CompletionRecord, RequestInfo
from sage_llm.types import RequestPriority


@dataclass(frozen=True, slots=True)
class Admission:
    """The verdict of ``admit``. ``priority`` set means: admit, demoted to this priority
    and without a deadline (the manager schedules the request so from then on, under any
    policy; its SLO still counts in ``slo_met``). ``kind`` says what a refusal is, for
    its error and ``sage_llm_requests_rejected_total{reason}``: ``"slo_infeasible"`` (a
    deadline no instance can meet: :class:`~sage_llm.errors.SLOInfeasibleError`, no retry
    hint), ``"over_budget"`` (no instance within the request's cost budget:
    :class:`~sage_llm.errors.OverBudgetError`, no retry hint), ``"queue_full"`` (the
    manager's queue bound), ``"user_queue_full"`` (a policy's bound on one user's queued
    requests: :class:`~sage_llm.errors.QueueFullError` too) or ``"policy"`` (any other:
    :class:`~sage_llm.errors.AdmissionError` with ``retry_after_s``)."""

    admitted: bool
    reason: str = ""
    retry_after_s: float | None = None
    priority: RequestPriority | None = None
    kind: Literal["policy", "slo_infeasible", "over_budget", "queue_full", "user_queue_full"] = (
        "policy"
    )


ADMIT = Admission(True)


@runtime_checkable
class SchedulingPolicy(Protocol):
    name: str

    def admit(self, req: RequestInfo, snap: ClusterSnapshot) -> Admission: ...

    def push(self, req: RequestInfo) -> None: ...

    def pop(self, snap: ClusterSnapshot) -> RequestInfo | None: ...

    def peek(self, snap: ClusterSnapshot) -> RequestInfo | None: ...

    def remove(self, request_id: str) -> RequestInfo | None: ...

    def __len__(self) -> int: ...

    def drain(self) -> list[RequestInfo]: ...

    def constrain(self, req: RequestInfo, snap: ClusterSnapshot) -> frozenset[str] | None: ...

    def on_complete(self, record: CompletionRecord) -> None: ...

    def describe(self) -> dict[str, object]:
        """Name, parameters and current state for status pages and metrics."""
        ...


def policy_label(policy: SchedulingPolicy) -> str:
    """The name metrics label ``policy``'s work with: the inner policy in charge for a
    policy that switches between others (``adaptive``'s ``current``), else its name.
    Cheap: called once per finished request."""
    current = getattr(policy, "current", None)
    return current if isinstance(current, str) else policy.name
