"""``slo_aware``: earliest deadline first on predicted completion.

Order (lower first):

1. requests without a deadline that have waited ``no_deadline_max_wait_s`` or more,
   oldest first (so they never starve; not demoted ones: they would push feasible
   requests past their deadlines);
2. requests with a deadline, least *slack* first, where
   ``slack = deadline - (now + best predicted e2e over the eligible instances)``;
3. requests without a deadline (and demoted ones), in arrival order.

Approximation: slack is computed once, at push, from the latest snapshot the policy saw
(normally the one given to ``admit`` just before): the heap key is
``deadline - best_predicted_e2e_at_push``, and ``slack(now) = key - now``. Later load
changes shift all predictions alike, so the order stays mostly deadline-driven; requests
whose service time differs a lot are ordered by their service time at push.

Admission: a request whose deadline even the best instance is predicted to miss is, by
``infeasible_action``, rejected (``Admission(False, reason)``), demoted (admitted with
``priority=BACKGROUND``; the policy queues it as a no-deadline request) or admitted as is.

``constrain`` restricts routing to the runnable instances predicted to meet the deadline,
when at least one is; otherwise (or without a deadline) it leaves the choice open.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from sage_llm.control_plane.scheduling._params import check_choice, check_positive
from sage_llm.control_plane.scheduling._queue import EPS, QueuedPolicy, QueueEntry, Rank
from sage_llm.control_plane.scheduling.admission import (
    best_predicted_e2e,
    check_deadline_feasible,
)
from sage_llm.control_plane.scheduling.base import ADMIT, Admission
from sage_llm.control_plane.snapshot import ClusterSnapshot, CompletionRecord, RequestInfo
from sage_llm.types import RequestPriority

INFEASIBLE_ACTIONS = ("reject", "demote", "admit")

_DEMOTED_KEPT = 4096
"""How many demoted ids beyond twice the queue :class:`SLOAwarePolicy` keeps."""

_DEADLINE_LANE = 0
_NO_DEADLINE_LANE = 1
_DEMOTED_LANE = 2


class SLOAwarePolicy(QueuedPolicy):
    """Least slack first; see the module docstring."""

    name = "slo_aware"

    @dataclass(frozen=True, slots=True)
    class Params:
        """``infeasible_action``: what ``admit`` does with a deadline no instance can meet
        (``reject``, ``demote`` or ``admit``). ``no_deadline_max_wait_s``: a request
        without a deadline that waited this long runs before deadline requests."""

        infeasible_action: Literal["reject", "demote", "admit"] = "demote"
        no_deadline_max_wait_s: float = 30.0

        def __post_init__(self) -> None:
            check_choice("infeasible_action", self.infeasible_action, INFEASIBLE_ACTIONS)
            check_positive("no_deadline_max_wait_s", self.no_deadline_max_wait_s)

    def __init__(self, params: SLOAwarePolicy.Params | None = None) -> None:
        super().__init__()
        self.params = params if params is not None else SLOAwarePolicy.Params()
        self._snap: ClusterSnapshot | None = None
        self._demoted: dict[str, None] = {}
        """Ids demoted at admission and not yet gone from the queue (insertion-ordered)."""
        self._counts = {"rejected": 0, "demoted": 0, "admitted_infeasible": 0}

    def observe(self, snap: ClusterSnapshot) -> None:
        super().observe(snap)
        self._snap = snap

    def admit(self, req: RequestInfo, snap: ClusterSnapshot) -> Admission:
        self.observe(snap)
        verdict = check_deadline_feasible(req, snap)
        if verdict.admitted:
            return verdict
        action = self.params.infeasible_action
        if action == "reject":
            self._counts["rejected"] += 1
            return verdict
        if action == "admit":
            self._counts["admitted_infeasible"] += 1
            return ADMIT
        self._counts["demoted"] += 1
        self._remember_demoted(req.request_id)
        return Admission(
            True,
            reason=f"demoted to BACKGROUND: {verdict.reason}",
            priority=RequestPriority.BACKGROUND,
        )

    def _remember_demoted(self, request_id: str) -> None:
        # Ids admitted but never pushed (or refused after admission) would pile up: the
        # oldest are let go once they are many (a running one's id goes at its end too)
        if len(self._demoted) > 2 * len(self._queue) + _DEMOTED_KEPT:
            for stale in list(self._demoted)[: len(self._demoted) // 2]:
                if stale not in self._queue:
                    del self._demoted[stale]
        self._demoted[request_id] = None

    def is_demoted(self, request_id: str) -> bool:
        """Whether ``request_id`` was demoted at admission and is still known here."""
        return request_id in self._demoted

    def _place(self, req: RequestInfo) -> tuple[int, float]:
        if req.demoted or req.request_id in self._demoted:
            return _DEMOTED_LANE, req.arrival
        if req.deadline is None:
            return _NO_DEADLINE_LANE, req.arrival
        best = None if self._snap is None else best_predicted_e2e(req, self._snap)
        service = 0.0 if best is None else best[1]
        return _DEADLINE_LANE, req.deadline - service

    def _rank(self, entry: QueueEntry, now: float) -> Rank:
        if entry.lane == _DEADLINE_LANE:
            return (1.0, entry.key, entry.seq)
        if entry.lane == _DEMOTED_LANE:  # never ahead of a deadline it could push past
            return (2.0, entry.key, entry.seq)
        if now - entry.req.arrival + EPS >= self.params.no_deadline_max_wait_s:
            return (0.0, entry.key, entry.seq)
        return (2.0, entry.key, entry.seq)

    def on_complete(self, record: CompletionRecord) -> None:
        """A request ended: forgotten as demoted only now (popped, it may come back, a
        retry's or a deferred one, and must go back to the demoted lane)."""
        super().on_complete(record)
        self._demoted.pop(record.request_id, None)

    def remove(self, request_id: str) -> RequestInfo | None:
        self._demoted.pop(request_id, None)
        return super().remove(request_id)

    def drain(self) -> list[RequestInfo]:
        self._demoted.clear()
        return super().drain()

    def slack_s(self, req: RequestInfo, snap: ClusterSnapshot) -> float | None:
        """Current slack of ``req`` (None without a deadline or eligible instance)."""
        if req.deadline is None:
            return None
        best = best_predicted_e2e(req, snap)
        return None if best is None else req.deadline - (snap.now + best[1])

    def constrain(self, req: RequestInfo, snap: ClusterSnapshot) -> frozenset[str] | None:
        if req.deadline is None:
            return None
        remaining = req.deadline - snap.now
        ok = frozenset(
            i.instance_id
            for i in snap.runnable(req)
            if i.predict_e2e_s(req.prompt_tokens, req.max_tokens) <= remaining
        )
        return ok or None

    def _params_dict(self) -> dict[str, object]:
        return asdict(self.params)

    def _state(self) -> dict[str, object]:
        state = super()._state()
        counts = self._queue.lane_counts()
        state["queued_with_deadline"] = counts.get(_DEADLINE_LANE, 0)
        state["queued_without_deadline"] = counts.get(_NO_DEADLINE_LANE, 0) + counts.get(
            _DEMOTED_LANE, 0
        )  # a demoted request is queued without its deadline
        state.update(self._counts)
        return state


SLOAwareParams = SLOAwarePolicy.Params
