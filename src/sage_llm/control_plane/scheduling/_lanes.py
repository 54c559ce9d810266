"""The lane heaps under the scheduling policies' queue (:mod:`._queue` has the design).

:class:`LaneQueue` and its entries live in this module of their own so that the
simulator's accelerator can compile them (``make sim-accel``; :mod:`sage_llm.sim.accel`):
the policies built on them (:class:`~._queue.QueuedPolicy` and its subclasses) stay
interpreted, as mypyc cannot compile classes that interpreted code subclasses. Nothing
here is subclassed.
"""

from __future__ import annotations

import heapq
import itertools

from sage_llm.control_plane.snapshot import ClusterSnapshot, RequestInfo
from sage_llm.errors import ConflictError
from sage_llm.types import ExecutionInstanceType

__all__ = ["LaneQueue", "QueueEntry", "serving_models"]

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


def serves(snap: ClusterSnapshot, model: str) -> bool:
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

    def model_counts(self) -> dict[str, int]:
        """How many requests are queued for each model."""
        counts: dict[str, int] = {}
        for (model, _lane), heap in self._heaps.items():
            counts[model] = counts.get(model, 0) + len(heap.items) - heap.dead
        return counts

    def head(self, model: str, lane: int) -> QueueEntry | None:
        """The first entry of ``model``'s requests in ``lane`` (lowest key, then push
        order), or None when it has none."""
        heap = self._heaps.get((model, lane))
        return None if heap is None else heap.items[0][2]

    def first_servable(self, model: str, lane: int, snap: ClusterSnapshot) -> QueueEntry | None:
        """The first entry of ``model``'s requests in ``lane`` that ``snap`` has an instance
        it may run on for (its ``excluded_instances`` read), or None."""
        heap = self._heaps.get((model, lane))
        if heap is None:
            return None
        top = heap.items[0][2]
        if not top.req.excluded_instances or snap.can_serve(top.req):
            return top
        return self._scan(heap, snap)

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
                ok = servable[model] = serves(snap, model)
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
