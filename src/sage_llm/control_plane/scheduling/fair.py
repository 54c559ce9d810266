"""``fair``: each user gets an equal share of the fleet's work while it waits for it.

A virtual token counter per user (the VTC rule of Sheng et al., "Fairness in Serving Large
Language Models", OSDI 2024), keyed by ``RequestInfo.user_id`` (the OpenAI ``user`` field;
requests without one share one anonymous user):

* a request starts when its user's counter is the lowest among the users with a request
  the fleet can start now (at equal counters, the user served least recently); within a
  user, the most urgent priority first, then the oldest;
* as it starts, its user's counter grows by the work it will cost:
  ``prompt_weight × prompt tokens + output_weight × expected output tokens``; the expected
  output is the smaller of its ``max_tokens`` and the mean output of the user's recent
  completed requests, and when the request ends the counter is corrected to the tokens it
  really generated; a user with a weight (``user_weights``) is charged that work divided
  by its weight, so a user of weight 2 gets twice the share of a user of weight 1 (the
  users not named weigh 1);
* a user who comes (or whose queue was empty) joins at the lowest counter of the users
  waiting with a request for the same model, when the fleet could start one at the last
  decision (else, or when none waits, at the counter of the user whose request for that
  model started last), never below its own, and after them at an equal counter: time away
  earns no credit to flood the fleet with later, work done recently still counts, and a
  stream of newcomers cannot keep a waiting user waiting. Levels are per model: a smaller
  or busier model's users lag a bigger one's, and that lag is no newcomer's credit. A
  user waiting only on a model with no free instance does not set that level, and joins
  so too when it sends another request (its parked request earns it no credit for its
  others).

So a user who sends more than its share waits behind the others, and a light user's
requests start ahead of a heavy user's backlog. Under light load, with no queue, it is
first come, first served. It orders only what the control plane queues: requests wait in
the control plane only while every instance is at its concurrency bound
(``max_concurrent_requests``), so set that bound near what an engine runs at once, or an
engine's own first-come-first-served queue decides instead. Priorities order a user's own
requests only: a user's urgent request goes before its other ones, never before another
user's turn. Deadlines are not read.

A request put back in the queue (no instance could take it after all, or a failed attempt
to be retried) has its charge given back, and its user its place (it is not a user
joining); it is charged again when it starts again.

Costs: ``push`` and ``pop`` O(log n) (amortized), whatever the number of users waiting:
each model keeps a heap of its lanes' heads (one lane per user and priority level) in the
order they start, re-ranked when a user's counter moves, stale entries dropped lazily. A
lane whose head may run only on instances without room (``excluded_instances``: a
retry's, a LoRA adapter's) is looked past, offering its first request that may run: a
decision costs O(k log n) with k such lanes ranked first. Memory: a user is
forgotten once it has nothing queued or running and its counter is no higher than where a
user joins the model of its latest request (it would be lifted there anyway, if it came
back to that model).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field

from sage_llm.control_plane.params import USER_LABELS
from sage_llm.control_plane.scheduling._lanes import serves
from sage_llm.control_plane.scheduling._params import check_count, check_positive, check_weights
from sage_llm.control_plane.scheduling._queue import QueuedPolicy, QueueEntry, Rank
from sage_llm.control_plane.scheduling.admission import TYPICAL_PROMPT_TOKENS, estimate_drain_s
from sage_llm.control_plane.scheduling.base import ADMIT, Admission
from sage_llm.control_plane.snapshot import ClusterSnapshot, CompletionRecord, RequestInfo
from sage_llm.types import RequestPriority, RequestStatus

ANONYMOUS = ""
"""The user of the requests that name none."""

_LEVELS = len(RequestPriority)
"""Queue lanes per user: one per priority level (lane ``user's lane × _LEVELS + level``)."""

TOP_USERS = 10
"""The users with the most requests queued (then running) that the status shows."""

_Top = tuple[float, float, int, float, int, int, int]
"""A lane head's place: its user's counter and turn, its level, arrival and push order
(:meth:`FairSharePolicy._rank`), then its queue lane and the tick it was put in at."""

_Rank = tuple[float, float, int, float, int]
"""A request's place among those to start (:meth:`FairSharePolicy._rank`)."""

_OUTPUT_ALPHA = 0.2
"""EWMA weight of a request's output tokens in its user's expected output."""


class _Flow:
    """One user's share: its counter, its lane in the queue, and what it has in flight."""

    __slots__ = (
        "by_level", "counter", "expected_output", "lane", "model", "running", "served",
        "weight",
    )  # fmt: skip

    def __init__(self, counter: float, lane: int, served: int, weight: float = 1.0) -> None:
        self.counter = counter
        self.model = ""
        """The model of the user's latest request (where it would join again)."""
        self.weight = weight
        """Its share against a user of weight 1: what it is charged is divided by it."""
        self.lane = lane
        self.by_level = [0] * _LEVELS
        """Its queued requests by priority level (:attr:`queued` in all)."""
        self.running = 0
        self.served = served
        """When its last request started, or it joined (the policy's count of starts)."""
        self.expected_output: float | None = None
        """The mean output tokens of the user's recent completed requests (None: none)."""

    @property
    def queued(self) -> int:
        """Its queued requests."""
        return sum(self.by_level)


class _Start:
    """A request started and not ended: what it was charged, and its user's turn before."""

    __slots__ = ("before", "charge", "expected", "flow", "number")

    def __init__(self, flow: _Flow, charge: float, expected: float, number: int) -> None:
        self.flow = flow
        self.charge = charge
        self.expected = expected
        self.number = number
        """The policy's count of starts at this one."""
        self.before = flow.served
        """Its user's ``served`` before this start."""


class FairSharePolicy(QueuedPolicy):
    """Per-user fair share by virtual token counters; see the module docstring."""

    name = "fair"

    @dataclass(frozen=True, slots=True)
    class Params:
        """``prompt_weight`` and ``output_weight``: what one prompt token and one output
        token count towards a user's share (an output token costs a decode step's share,
        a prompt token a fraction of a prefill's: 1 and 2 as in the VTC paper).
        ``default_output_tokens``: the output a user's first request is expected to
        generate (at most its ``max_tokens``), until requests of that user have ended.
        ``user_weights``: a user's share against the others' (user id to a number > 0;
        ``""`` is the requests that name no user); the users not named weigh 1.
        ``max_queued_per_user``: a user with this many requests queued as urgent as its
        next one or more has that one refused (429, ``Retry-After``) until one starts, so
        that one user's flood cannot fill the control plane's whole queue (None: no bound
        but the queue's own); its batch work never bars its urgent request (so up to this
        many at each priority level)."""

        prompt_weight: float = 1.0
        output_weight: float = 2.0
        default_output_tokens: float = 256.0
        user_weights: dict[str, float] = field(default_factory=dict)
        max_queued_per_user: int | None = None

        def __post_init__(self) -> None:
            if self.max_queued_per_user is not None:
                check_count("max_queued_per_user", self.max_queued_per_user)
            check_positive("prompt_weight", self.prompt_weight)
            check_positive("output_weight", self.output_weight)
            check_positive("default_output_tokens", self.default_output_tokens)
            weights = check_weights("user_weights", self.user_weights, USER_LABELS)
            object.__setattr__(self, "user_weights", weights)  # (a copy: it stays as built)

    def __init__(self, params: FairSharePolicy.Params | None = None) -> None:
        super().__init__()
        self.params = params if params is not None else FairSharePolicy.Params()
        self._flows: dict[str, _Flow] = {}
        self._by_lane: dict[int, _Flow] = {}
        self._free_lanes: list[int] = []
        self._next_lane = 0
        self._started: dict[str, _Start] = {}
        """Requests started and not ended, by id."""
        self._last = _Flow(0.0, -1, -1)
        """The user whose request started last (its counter as it is now, the charge and
        any correction since included): where a user joins a model that never ran one."""
        self._last_of: dict[str, _Flow] = {}
        """By model, the user whose request for it started last: where a user joins it
        when none waits."""
        self._startable: set[str] = set()
        """The models the fleet could start a request of at the last decision."""
        self._unstartable: dict[str, set[int]] = {}
        """By model, the queue lanes ranked first at the last decision none of whose
        requests could start then (each excluded from the instances with room)."""
        self._tops: dict[str, list[_Top]] = {}
        """By model, a heap of the heads of its queue lanes in the order they start in
        (:meth:`_rank`'s), with lazy deletion: an item is current while its lane's
        ``_versions`` entry is its tick."""
        self._versions: dict[tuple[str, int], int] = {}
        """(model, queue lane) with requests queued -> the tick of its current item."""
        self._keys: dict[int, set[tuple[str, int]]] = {}
        """A user's lane -> its (model, queue lane) pairs with requests queued."""
        self._tick = 0
        self._compact_at: dict[str, int] = {}
        self._sweep_at = 64
        self._starts = 0
        self._just_removed: tuple[str, _Flow] | None = None
        """The request removed last and its user's share, while nothing was pushed or
        started since: pushed straight back (its data changed, as the dispatcher does to
        let it run where it was kept off), its user does not join again."""

    # -- the queue ---------------------------------------------------------------------

    def _level(self, model: str) -> float:
        """Where a user joins ``model``: when the fleet could start a request of it at the
        last decision, the lowest counter of the users waiting with one, else that of the
        user whose request for it started last (else the last started user's). Counters
        are compared among the users of one model: those of a smaller or busier model lag
        a bigger one's, and a newcomer joining at theirs would get that lag as credit."""
        if model in self._startable:
            found = self._walk(model, lambda item: item[5] not in self._unstartable.get(model, ()))
            if found is not None:
                return found[0][0]
        return self._last_of.get(model, self._last).counter

    def _walk(
        self, model: str, take: Callable[[_Top], tuple[_Rank, QueueEntry] | bool | None]
    ) -> tuple[_Rank, QueueEntry | None] | None:
        """Go down ``model``'s heap in rank order (its current items) until ``take`` says
        so: a rank and entry, the best so far (the walk ends at an item that does not
        rank below it), True (this item's head), or False/None (go on). The heap is left
        as it was, less stale items."""
        heap = self._tops.get(model)
        if not heap:
            return None
        versions = self._versions
        skipped: list[_Top] = []
        best: tuple[_Rank, QueueEntry | None] | None = None
        try:
            while heap:
                item = heap[0]
                if versions.get((model, item[5])) != item[6]:
                    heapq.heappop(heap)
                    continue
                rank = item[:5]
                if best is not None and rank >= best[0]:
                    break
                got = take(item)
                if got is True:
                    return rank, self._queue.head(model, item[5])
                if isinstance(got, tuple) and (best is None or got[0] < best[0]):
                    best = got
                skipped.append(heapq.heappop(heap))
            return best
        finally:
            for item in skipped:
                heapq.heappush(heap, item)

    # -- the heads of the lanes, in order (pop in O(log n) whatever the users) -----------

    def _top(self, model: str) -> _Top | None:
        """The current first item of ``model``'s heap (stale ones dropped), or None."""
        heap = self._tops.get(model)
        if heap is None:
            return None
        versions = self._versions
        while heap:
            top = heap[0]
            if versions.get((model, top[5])) == top[6]:
                return top
            heapq.heappop(heap)
        del self._tops[model]
        return None

    def _refresh(self, model: str, qlane: int, flow: _Flow) -> None:
        """Put the current head of ``model``'s ``qlane`` (``flow``'s) in its heap at its
        rank, the item it had (if any) gone stale."""
        key = (model, qlane)
        head = self._queue.head(model, qlane)
        self._tick += 1
        if head is None:
            self._versions.pop(key, None)
            keys = self._keys.get(flow.lane)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._keys[flow.lane]
            return
        self._versions[key] = self._tick
        self._keys.setdefault(flow.lane, set()).add(key)
        heap = self._tops.setdefault(model, [])
        heapq.heappush(
            heap,
            (flow.counter, float(flow.served), qlane % _LEVELS, head.req.arrival, head.seq,
             qlane, self._tick),
        )  # fmt: skip
        if len(heap) >= self._compact_at.get(model, 64):
            versions = self._versions
            heap[:] = [t for t in heap if versions.get((model, t[5])) == t[6]]
            heapq.heapify(heap)
            self._compact_at[model] = max(64, 4 * len(heap))

    def _refresh_user(self, flow: _Flow) -> None:
        """``flow``'s counter or turn changed: re-rank each of its lanes' heads."""
        keys = self._keys.get(flow.lane)
        if keys:
            for model, qlane in list(keys):
                self._refresh(model, qlane, flow)

    def _flow(self, user: str) -> _Flow:
        flow = self._flows.get(user)
        if flow is None:
            if len(self._flows) >= self._sweep_at:
                self._sweep()
            lane = self._free_lanes.pop() if self._free_lanes else self._new_lane()
            weight = self.params.user_weights.get(user, 1.0)
            flow = self._flows[user] = _Flow(float("-inf"), lane, self._starts, weight)
            self._by_lane[lane] = flow
        return flow

    def _new_lane(self) -> int:
        lane = self._next_lane
        self._next_lane += 1
        return lane

    def _place(self, req: RequestInfo) -> tuple[int, float]:
        lane = self._flows[req.user_id or ANONYMOUS].lane
        return lane * _LEVELS + int(req.priority), req.arrival

    def _rank(self, entry: QueueEntry, now: float) -> Rank:
        flow = self._by_lane[entry.lane // _LEVELS]
        level = entry.lane % _LEVELS
        return (flow.counter, float(flow.served), float(level), entry.req.arrival, entry.seq)

    def admit(self, req: RequestInfo, snap: ClusterSnapshot) -> Admission:
        """Everything, but a request of a user that has ``max_queued_per_user`` queued."""
        self.observe(snap)
        cap = self.params.max_queued_per_user
        if cap is None:
            return ADMIT
        user = req.user_id or ANONYMOUS
        flow = self._flows.get(user)
        if flow is None or flow.queued < cap:
            return ADMIT
        # those as urgent as it or more: a user's batch work never bars its urgent request
        level = int(req.priority)
        queued = sum(flow.by_level[: level + 1])
        if queued < cap:
            return ADMIT
        who = f"user {user!r}" if user else "the requests that name no user"
        what = "" if queued == flow.queued else f" at priority {req.priority.name} or above"
        return Admission(
            False,
            reason=f"{who} has {queued} requests queued{what} (max_queued_per_user {cap})",
            retry_after_s=estimate_drain_s(self._starts_before(flow) + 1, snap),
            kind="user_queue_full",
        )

    def _starts_before(self, flow: _Flow) -> int:
        """About how many requests start before ``flow``'s next one (which frees a place
        in its bound): those the waiting users below its counter start until they pass
        it, each charged a typical prompt and its user's expected output."""
        p = self.params
        ahead = 0
        for other in self._flows.values():
            if not other.queued or other is flow or other.counter >= flow.counter:
                continue
            output = (
                p.default_output_tokens if other.expected_output is None else other.expected_output
            )
            charge = (
                p.prompt_weight * TYPICAL_PROMPT_TOKENS + p.output_weight * output
            ) / other.weight
            ahead += min(other.queued, 1 + int((flow.counter - other.counter) / charge))
        return ahead

    def push(self, req: RequestInfo) -> None:
        start = self._started.pop(req.request_id, None)
        moved = start is not None  # its user's counter or turn: every lane re-ranked
        if start is not None:  # started, then put back: not served after all
            flow = start.flow
            self._give_back(start)
        else:
            flow = self._flow(req.user_id or ANONYMOUS)
            flow.model = req.model
            # it joins, or had nothing the fleet could start (a request parked on a model
            # without a free instance): no credit for the time it was away
            if self._just_removed == (req.request_id, flow):
                pass  # back in the queue at once: it never left
            elif req.model not in self._startable or not self._waits_on(flow, req.model):
                flow.counter = max(flow.counter, self._level(req.model))
                flow.served = self._starts  # after those waiting at its counter
                moved = True
        self._just_removed = None
        super().push(req)
        flow.by_level[req.priority] += 1
        qlane = flow.lane * _LEVELS + int(req.priority)
        if moved:
            self._keys.setdefault(flow.lane, set()).add((req.model, qlane))
            self._refresh_user(flow)
        else:
            self._refresh(req.model, qlane, flow)

    def _waits_on(self, flow: _Flow, model: str) -> bool:
        """Whether ``flow``'s user has requests for ``model`` queued."""
        return any(m == model for m, _ in self._keys.get(flow.lane, ()))

    def _give_back(self, start: _Start) -> None:
        """Undo ``start``: its charge, and its user's turn (a later start of the same user,
        put back after it, then restores what this one's came after)."""
        flow = start.flow
        flow.counter -= start.charge
        flow.running -= 1
        if flow.served == start.number:
            flow.served = start.before
        else:
            for later in self._started.values():
                if later.flow is flow and later.before == start.number:
                    later.before = start.before
                    break

    def _select(self, snap: ClusterSnapshot) -> QueueEntry | None:
        """The first request the fleet can start now: per model it can start one of, its
        heap's first lane whose head may run on an instance with room; a lane whose head
        may not (``excluded_instances``: a retry's, a LoRA adapter's, a long prompt's)
        offers its first request that may, at its own place. The first over the models."""
        self.observe(snap)
        best: tuple[_Rank, QueueEntry | None] | None = None
        startable: set[str] = set()
        unstartable: dict[str, set[int]] = {}
        for model in list(self._tops):
            if self._top(model) is None or not serves(snap, model):
                continue
            stuck: set[int] = set()

            def take(
                item: _Top, model: str = model, stuck: set[int] = stuck
            ) -> tuple[_Rank, QueueEntry] | bool | None:
                head = self._queue.head(model, item[5])
                if head is None or not head.req.excluded_instances or snap.can_serve(head.req):
                    return True
                entry = self._queue.first_servable(model, item[5], snap)
                if entry is None:
                    stuck.add(item[5])
                    return None
                return (item[0], item[1], item[2], entry.req.arrival, entry.seq), entry

            found = self._walk(model, take)
            if stuck:
                unstartable[model] = stuck
            if found is None:
                continue
            startable.add(model)
            if best is None or found[0] < best[0]:
                best = found
        self._startable = startable
        self._unstartable = unstartable
        return None if best is None else best[1]

    def pop(self, snap: ClusterSnapshot) -> RequestInfo | None:
        req = super().pop(snap)
        if req is None:
            return None
        self._just_removed = None
        flow = self._flows[req.user_id or ANONYMOUS]
        flow.by_level[req.priority] -= 1
        p = self.params
        expected = p.default_output_tokens if flow.expected_output is None else flow.expected_output
        expected = min(float(req.max_tokens), expected)
        charge = (p.prompt_weight * req.prompt_tokens + p.output_weight * expected) / flow.weight
        self._started[req.request_id] = _Start(flow, charge, expected, self._starts)
        flow.counter += charge
        flow.served = self._starts
        self._starts += 1
        self._last = self._last_of[req.model] = flow
        flow.running += 1
        self._refresh_user(flow)
        return req

    def remove(self, request_id: str) -> RequestInfo | None:
        req = super().remove(request_id)
        if req is not None:
            flow = self._flows[req.user_id or ANONYMOUS]
            flow.by_level[req.priority] -= 1
            self._refresh(req.model, flow.lane * _LEVELS + int(req.priority), flow)
            self._just_removed = (request_id, flow)
        return req

    def drain(self) -> list[RequestInfo]:
        out = super().drain()
        for flow in self._flows.values():
            flow.by_level = [0] * _LEVELS
        self._startable.clear()
        self._tops.clear()
        self._versions.clear()
        self._keys.clear()
        self._just_removed = None
        return out

    def on_complete(self, record: CompletionRecord) -> None:
        self.count_completion()
        start = self._started.pop(record.request_id, None)
        if start is None:  # ended while queued, or started under another policy
            return
        flow = start.flow
        tokens = float(record.completion_tokens)
        flow.counter += self.params.output_weight * (tokens - start.expected) / flow.weight
        flow.running -= 1
        if flow.queued:
            self._refresh_user(flow)
        if record.status is RequestStatus.COMPLETED:  # (a cancelled one says little)
            if flow.expected_output is None:
                flow.expected_output = tokens
            else:
                flow.expected_output += _OUTPUT_ALPHA * (tokens - flow.expected_output)

    def forget_running(self) -> None:
        """Forget the requests started and not ended: they will end under another policy
        (``adaptive`` calls this as it switches away), so their charges stand as made,
        uncorrected."""
        for start in self._started.values():
            start.flow.running -= 1
        self._started.clear()

    def _sweep(self) -> None:
        """Forget the users with nothing queued or running whose counter is no higher than
        where a user joins their latest request's model (they would be lifted there); the
        next sweep comes when the users kept have doubled."""
        levels: dict[str, float] = {}
        for user, flow in list(self._flows.items()):
            if flow.queued or flow.running:
                continue
            level = levels.get(flow.model)
            if level is None:
                level = levels[flow.model] = self._level(flow.model)
            if flow.counter <= level:
                del self._flows[user]
                del self._by_lane[flow.lane]
                self._free_lanes.append(flow.lane)
        self._sweep_at = max(64, 2 * len(self._flows))

    # -- status ------------------------------------------------------------------------

    def _params_dict(self) -> dict[str, object]:
        return asdict(self.params)

    def _state(self) -> dict[str, object]:
        state = super()._state()
        state["users"] = len(self._flows)
        state["users_waiting"] = sum(1 for f in self._flows.values() if f.queued)
        busiest = heapq.nlargest(
            TOP_USERS,
            ((user, f) for user, f in self._flows.items() if f.queued or f.running),
            key=lambda item: (item[1].queued, item[1].running),
        )
        state["top_users"] = [
            {
                "user": user,
                "queued": f.queued,
                "running": f.running,
                "counter": round(f.counter, 3),
                "weight": f.weight,
            }
            for user, f in busiest
        ]
        return state

    def counters(self) -> dict[str, float]:
        """Each user's counter (``""``: the anonymous user), for tests and status pages."""
        return {user: flow.counter for user, flow in self._flows.items()}


FairShareParams = FairSharePolicy.Params


def weighted_users(policy: object) -> tuple[str, ...]:
    """The users ``policy``'s parameters weigh (``user_weights`` of ``fair`` and
    ``adaptive``; none for another policy)."""
    weights = getattr(getattr(policy, "params", None), "user_weights", None)
    return tuple(weights) if isinstance(weights, Mapping) else ()
