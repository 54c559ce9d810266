"""The request queue shared by the scheduling policies.

A :class:`LaneQueue` keeps queued requests in binary heaps, one per ``(model, lane)``. A
policy puts each request in a *lane* under a *static key* chosen at push time, such that
the head of every lane is that lane's best request at any later time (FIFO: one lane keyed
by arrival; priority: one lane per priority level keyed by arrival, because aging never
reorders requests of the same level; …). The policy then compares only the lane heads with
its time-dependent *rank*.

Costs, with ``n`` queued requests, ``m`` models and ``l`` lanes:

* ``push`` O(log n); ``remove`` O(1) plus amortised O(log n) (lazy deletion: the entry is
  marked dead and the heap is compacted once dead entries outnumber live ones);
* ``pop`` / ``peek`` O(m·l + instances) when the head of a lane is servable — the common
  case. A head whose request excludes the instances that are free (a retry) makes that lane
  be scanned until a servable request is found; the skipped ones are put back, so requests
  the fleet cannot serve stay queued without blocking anyone.

:class:`QueuedPolicy` implements the queue half of
:class:`~sage_llm.control_plane.scheduling.base.SchedulingPolicy` on top of it; a policy
subclass supplies ``_place`` (lane and key) and ``_rank`` (order at a given time).
:class:`LaneQueue` and :class:`QueueEntry` are defined in
:mod:`sage_llm.control_plane.scheduling._lanes` (which the simulator's accelerator
compiles) and re-exported here.
"""

from __future__ import annotations

from sage_llm.control_plane.scheduling._lanes import LaneQueue, QueueEntry, serves, serving_models
from sage_llm.control_plane.scheduling.base import ADMIT, Admission
from sage_llm.control_plane.snapshot import ClusterSnapshot, CompletionRecord, RequestInfo

__all__ = [
    "EPS",
    "LaneQueue",
    "QueueEntry",
    "QueuedPolicy",
    "Rank",
    "queue_order_only",
    "serves",
    "serving_models",
]

EPS = 1e-9
"""Tolerance for comparisons of waits against thresholds (float clock arithmetic)."""

Rank = tuple[float, ...]


class QueuedPolicy:
    """Queue half of a scheduling policy; subclasses define ``_place`` and ``_rank``.

    ``admit`` admits everything, ``constrain`` returns None and ``on_complete`` counts;
    subclasses override what they need.
    """

    name: str = ""

    def __init__(self) -> None:
        self._queue = LaneQueue()
        self._now: float | None = None
        self._ended = 0  # requests that ended under it: completed, failed or cancelled

    # -- to be provided by subclasses -------------------------------------------------

    def _place(self, req: RequestInfo) -> tuple[int, float]:
        """(lane, static key) for a request being pushed."""
        raise NotImplementedError

    def _rank(self, entry: QueueEntry, now: float) -> Rank:
        """Order at time ``now``: lower runs first. Must end with ``entry.seq``."""
        raise NotImplementedError

    def _params_dict(self) -> dict[str, object]:
        raise NotImplementedError

    def _state(self) -> dict[str, object]:
        return {"queued": len(self._queue), "ended": self._ended}

    # -- SchedulingPolicy --------------------------------------------------------------

    def observe(self, snap: ClusterSnapshot) -> None:
        """Note the latest snapshot (its time; subclasses may keep more)."""
        self._now = snap.now

    def admit(self, req: RequestInfo, snap: ClusterSnapshot) -> Admission:
        self.observe(snap)
        return ADMIT

    def admit_at(self, now: float) -> Admission:
        """What this class's :meth:`admit` answers, from the snapshot's time alone: a
        caller that knows neither ``admit`` nor ``observe`` is overridden (see
        :func:`admits_all`) may call this without taking a snapshot."""
        self._now = now
        return ADMIT

    def push(self, req: RequestInfo) -> None:
        lane, key = self._place(req)
        self._queue.push(req, lane, key)

    def pop(self, snap: ClusterSnapshot) -> RequestInfo | None:
        entry = self._select(snap)
        return None if entry is None else self._queue.take(entry)

    def peek(self, snap: ClusterSnapshot) -> RequestInfo | None:
        entry = self._select(snap)
        return None if entry is None else entry.req

    def _select(self, snap: ClusterSnapshot) -> QueueEntry | None:
        self.observe(snap)
        cands = self._queue.candidates(snap)
        if len(cands) < 2:  # (one lane: its head; nothing to rank)
            return cands[0] if cands else None
        now = snap.now
        return min(cands, key=lambda e: self._rank(e, now))

    def remove(self, request_id: str) -> RequestInfo | None:
        return self._queue.remove(request_id)

    def __len__(self) -> int:
        return len(self._queue._entries)  # len(self._queue), one call less (asked often)

    @property
    def queue(self) -> LaneQueue:
        """The lane queue itself (``len(policy)`` is ``len(policy.queue)`` here; a caller
        that asks very often may ask the queue, compiled with the simulator's
        accelerator, when a policy's ``__len__`` is this class's own)."""
        return self._queue

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._queue

    def drain(self) -> list[RequestInfo]:
        """Empty the queue; requests in policy order at the latest time seen."""
        entries = self._queue.entries()
        now = self._now
        if now is None:
            now = max((e.req.arrival for e in entries), default=0.0)
        entries.sort(key=lambda e: self._rank(e, now))
        self._queue.clear()
        return [e.req for e in entries]

    def constrain(self, req: RequestInfo, snap: ClusterSnapshot) -> frozenset[str] | None:
        return None

    def on_complete(self, record: CompletionRecord) -> None:
        self.count_completion()

    def count_completion(self) -> None:
        """All that this class's :meth:`on_complete` does with a record: count it. A
        caller that knows a policy's ``on_complete`` is this one (not overridden; see
        :func:`counting_only`) may call this instead, without building the record."""
        self._ended += 1

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "params": self._params_dict(), "state": self._state()}


def counting_only(policy: object) -> QueuedPolicy | None:
    """``policy`` when its ``on_complete`` is :class:`QueuedPolicy`'s own, which only counts
    (so :meth:`QueuedPolicy.count_completion` may stand for it, without a completion
    record); None for any other policy."""
    if isinstance(policy, QueuedPolicy) and type(policy).on_complete is QueuedPolicy.on_complete:
        return policy
    return None


def admits_all(policy: object) -> QueuedPolicy | None:
    """``policy`` when its ``admit`` and ``observe`` are :class:`QueuedPolicy`'s own (it
    admits every request and notes only the time, so :meth:`QueuedPolicy.admit_at` may
    stand for ``admit``); None for any other policy."""
    if (
        isinstance(policy, QueuedPolicy)
        and type(policy).admit is QueuedPolicy.admit
        and type(policy).observe is QueuedPolicy.observe
    ):
        return policy
    return None


def queue_order_only(policy: object) -> QueuedPolicy | None:
    """``policy`` when its queue half (``push``, ``pop``, ``_select``, ``observe``) is
    :class:`QueuedPolicy`'s own, so that a request pushed onto its empty queue is popped
    straight back, untouched, by a pass that finds a free whole-request instance of its
    model (:func:`serves`): a caller may then skip the queue for it (see
    :meth:`~sage_llm.control_plane.dispatcher.Dispatcher.start_here`). None for any other
    policy (``slo_aware`` and ``adaptive`` keep state of their own in those methods)."""
    if isinstance(policy, QueuedPolicy):
        cls = type(policy)
        if (
            cls.push is QueuedPolicy.push
            and cls.pop is QueuedPolicy.pop
            and cls._select is QueuedPolicy._select
            and cls.observe is QueuedPolicy.observe
        ):
            return policy
    return None
