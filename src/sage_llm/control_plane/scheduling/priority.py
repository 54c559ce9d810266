"""``priority``: strict priority with aging and a hard wait bound.

Order at time ``now`` (lower first):

1. requests that have waited ``max_wait_s`` or more, oldest first — nothing waits much
   longer than ``max_wait_s`` while the fleet keeps popping;
2. then by *effective* priority ``max(0, priority - floor(wait / aging_interval_s))``:
   a request gains one level (CRITICAL=0 … BACKGROUND=4) per ``aging_interval_s`` waited,
   so with the defaults a BACKGROUND request competes as CRITICAL after 20 s;
3. ties by arrival, then push order.

Each priority level is one heap lane keyed by arrival: aging never reorders two requests
of the same level, so only the five lane heads are compared per pop.

Starvation bound: with one pop per tick and arrivals not above that rate, a request is
popped at most ``max_wait_s`` after its arrival (rounded up to the tick), whatever the
priorities of the other arrivals. Aging usually serves it sooner: a BACKGROUND request
reaches CRITICAL after ``4·aging_interval_s`` and then only older requests go first.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from sage_llm.control_plane.scheduling._params import check_positive
from sage_llm.control_plane.scheduling._queue import EPS, QueuedPolicy, QueueEntry, Rank
from sage_llm.control_plane.snapshot import RequestInfo
from sage_llm.types import RequestPriority


def effective_priority(priority: int, wait_s: float, aging_interval_s: float) -> int:
    """``priority`` lowered by one level per ``aging_interval_s`` waited (never below 0)."""
    if wait_s <= 0 or math.isinf(aging_interval_s):
        return priority
    levels = (wait_s + EPS) / aging_interval_s  # inf for a tiny interval: no int of it
    return 0 if levels >= priority else priority - math.floor(levels)


def priority_rank(
    entry: QueueEntry, now: float, aging_interval_s: float, max_wait_s: float
) -> Rank:
    """Rank of an entry queued in lane ``int(priority)`` with key ``arrival``."""
    wait = now - entry.req.arrival
    if wait + EPS >= max_wait_s:
        return (0.0, 0.0, entry.req.arrival, entry.seq)
    eff = effective_priority(entry.lane, wait, aging_interval_s)
    return (1.0, float(eff), entry.req.arrival, entry.seq)


class PriorityPolicy(QueuedPolicy):
    """Strict priority (lower value first) with aging; see the module docstring."""

    name = "priority"

    @dataclass(frozen=True, slots=True)
    class Params:
        """``aging_interval_s``: seconds of waiting that raise a request by one level
        (``inf`` disables aging). ``max_wait_s``: a request waiting at least this long
        runs before every request that waited less, oldest first (``inf`` disables)."""

        aging_interval_s: float = 5.0
        max_wait_s: float = 60.0

        def __post_init__(self) -> None:
            check_positive("aging_interval_s", self.aging_interval_s)
            check_positive("max_wait_s", self.max_wait_s)

    def __init__(self, params: PriorityPolicy.Params | None = None) -> None:
        super().__init__()
        self.params = params if params is not None else PriorityPolicy.Params()

    def _place(self, req: RequestInfo) -> tuple[int, float]:
        return int(req.priority), req.arrival

    def _rank(self, entry: QueueEntry, now: float) -> Rank:
        return priority_rank(entry, now, self.params.aging_interval_s, self.params.max_wait_s)

    def _params_dict(self) -> dict[str, object]:
        return asdict(self.params)

    def _state(self) -> dict[str, object]:
        state = super()._state()
        counts = self._queue.lane_counts()
        state["queued_by_priority"] = {RequestPriority(k).name: v for k, v in counts.items()}
        return state


PriorityParams = PriorityPolicy.Params
