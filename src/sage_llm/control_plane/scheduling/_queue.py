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
"""

from __future__ import annotations

import heapq
import itertools

from sage_llm.control_plane.scheduling.base import ADMIT, Admission
from sage_llm.control_plane.snapshot import ClusterSnapshot, CompletionRecord, RequestInfo
from sage_llm.errors import ConflictError
from sage_llm.types import ExecutionInstanceType

EPS = 1e-9
"""Tolerance for comparisons of waits against thresholds (float clock arithmetic)."""

Rank = tuple[float, ...]

_GENERAL = ExecutionInstanceType.GENERAL
_HYBRID = ExecutionInstanceType.HYBRID


class QueueEntry:
    """One queued request with the lane and key its policy gave it."""

    __slots__ = ("alive", "key", "lane", "req", "seq")

    def __init__(self, req: RequestInfo, lane: int, key: float, seq: int) -> None:
        self.req = req
        self.lane = lane
        self.key = key
        self.seq = seq
        """Push order; breaks every tie."""
        self.alive = True


class _Heap:
    __slots__ = ("dead", "items")

    def __init__(self) -> None:
        self.items: list[tuple[float, int, QueueEntry]] = []
        self.dead = 0


_COMPACT_MIN_DEAD = 64


def serving_models(snap: ClusterSnapshot) -> set[str]:
    """Models for which some instance could start a whole request now."""
    return {i.model for i in snap.instances if i.role.runs_whole_requests and i.has_capacity}


def _serves(snap: ClusterSnapshot, model: str) -> bool:
    """``model in serving_models(snap)``, stopping at the first instance that serves it."""
    for i in snap.instances:
        if (
            i.model == model
            and (i.role is _GENERAL or i.role is _HYBRID)
            and i.healthy
            and i.accepting
            and i.in_flight < i.max_concurrency
        ):
            return True
    return False


class LaneQueue:
    """Per-(model, lane) heaps with lazy deletion; see the module docstring."""

    def __init__(self) -> None:
        self._heaps: dict[tuple[str, int], _Heap] = {}
        self._entries: dict[str, QueueEntry] = {}
        self._lane_counts: dict[int, int] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def get(self, request_id: str) -> QueueEntry | None:
        return self._entries.get(request_id)

    def entries(self) -> list[QueueEntry]:
        """All queued entries, in no particular order."""
        return list(self._entries.values())

    def lane_counts(self) -> dict[int, int]:
        return {lane: n for lane, n in sorted(self._lane_counts.items()) if n}

    def push(self, req: RequestInfo, lane: int, key: float) -> QueueEntry:
        """Queue ``req``; a request id already queued is a :class:`ConflictError`."""
        if req.request_id in self._entries:
            raise ConflictError(f"request {req.request_id!r} is already queued")
        entry = QueueEntry(req, lane, key, next(self._seq))
        heap = self._heaps.get((req.model, lane))
        if heap is None:
            heap = self._heaps[(req.model, lane)] = _Heap()
        heapq.heappush(heap.items, (key, entry.seq, entry))
        self._entries[req.request_id] = entry
        self._lane_counts[lane] = self._lane_counts.get(lane, 0) + 1
        return entry

    def remove(self, request_id: str) -> RequestInfo | None:
        """Remove a queued request; None when it is not queued."""
        entry = self._entries.get(request_id)
        if entry is None:
            return None
        self.take(entry)
        return entry.req

    def take(self, entry: QueueEntry) -> RequestInfo:
        """Remove ``entry`` (which must be queued) and return its request."""
        del self._entries[entry.req.request_id]
        self._lane_counts[entry.lane] -= 1
        entry.alive = False
        hkey = (entry.req.model, entry.lane)
        heap = self._heaps[hkey]
        if heap.items[0][2] is entry:
            heapq.heappop(heap.items)
        else:
            heap.dead += 1
            if heap.dead >= _COMPACT_MIN_DEAD and heap.dead * 2 > len(heap.items):
                heap.items = [item for item in heap.items if item[2].alive]
                heapq.heapify(heap.items)
                heap.dead = 0
        self._clean_top(hkey, heap)
        return entry.req

    def _clean_top(self, hkey: tuple[str, int], heap: _Heap) -> None:
        # Invariant: a heap in self._heaps is non-empty and its top entry is alive.
        while heap.items and not heap.items[0][2].alive:
            heapq.heappop(heap.items)
            heap.dead -= 1
        if not heap.items:
            del self._heaps[hkey]

    def candidates(self, snap: ClusterSnapshot) -> list[QueueEntry]:
        """The best servable entry of every (model, lane), for models with capacity."""
        servable: dict[str, bool] = {}  # serving_models(snap), asked only for queued models
        out: list[QueueEntry] = []
        for (model, _lane), heap in self._heaps.items():
            ok = servable.get(model)
            if ok is None:
                ok = servable[model] = _serves(snap, model)
            if not ok:
                continue
            top = heap.items[0][2]
            if not top.req.excluded_instances or snap.can_serve(top.req):
                out.append(top)
                continue
            found = self._scan(heap, snap)
            if found is not None:
                out.append(found)
        return out

    @staticmethod
    def _scan(heap: _Heap, snap: ClusterSnapshot) -> QueueEntry | None:
        """Best servable entry below a non-servable head (heap left as it was, minus dead)."""
        skipped: list[tuple[float, int, QueueEntry]] = []
        found: QueueEntry | None = None
        while heap.items:
            item = heapq.heappop(heap.items)
            if not item[2].alive:
                heap.dead -= 1
                continue
            skipped.append(item)
            if snap.can_serve(item[2].req):
                found = item[2]
                break
        for item in skipped:
            heapq.heappush(heap.items, item)
        return found

    def clear(self) -> None:
        self._heaps.clear()
        self._entries.clear()
        self._lane_counts.clear()


class QueuedPolicy:
    """Queue half of a scheduling policy; subclasses define ``_place`` and ``_rank``.

    ``admit`` admits everything, ``constrain`` returns None and ``on_complete`` counts;
    subclasses override what they need.
    """

    name: str = ""

    def __init__(self) -> None:
        self._queue = LaneQueue()
        self._now: float | None = None
        self._completed = 0

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
        return {"queued": len(self._queue), "completed": self._completed}

    # -- SchedulingPolicy --------------------------------------------------------------

    def observe(self, snap: ClusterSnapshot) -> None:
        """Note the latest snapshot (its time; subclasses may keep more)."""
        self._now = snap.now

    def admit(self, req: RequestInfo, snap: ClusterSnapshot) -> Admission:
        self.observe(snap)
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
        self._completed += 1

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "params": self._params_dict(), "state": self._state()}
