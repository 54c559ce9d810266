"""``adaptive``: switches among the other five policies from what it observes.

Signals, computed in ``pop`` and :meth:`AdaptivePolicy.tick` (which the control plane calls
every ``eval_interval_s``, so the rule also sees a queue that has emptied and traffic that
has stopped) at most once per ``eval_interval_s`` of ``snap.now``:

* ``load`` — waiting requests / fleet capacity (Σ ``max_concurrency`` of the snapshot's
  views: a half-open instance's is 1),
  where *waiting* is the queued requests beyond the snapshot's free slots (those of the
  healthy, accepting whole-request instances): the requests about to start on free slots,
  the one being popped among them, do not wait. A request waits about ``load`` times a
  request's own running time before it starts, so ``overload`` [0.1] is where the order of
  the queue starts to matter, and ``load`` is 0 whenever every queued request has a slot,
  however small the fleet;
* ``attainment`` — share of the last ``window`` completions with a deadline that met it
  (None until ``min_samples`` such completions);
* ``deadline_share`` / ``priority_share`` / ``cost_share`` — among the last ``window``
  pushed requests, the share with a deadline / with a priority other than NORMAL / with a
  cost budget;
* ``top_user_share`` / ``users`` — among the same requests, the share of the user who sent
  the most (``user_id``; those without one count as one anonymous user), and how many
  users sent them.

Rule, first match wins (``t`` = ``slo_target``, ``m`` = ``slo_margin``):

1. ``slo_aware`` when ``deadline_share`` reaches its threshold and either attainment is
   below ``t - m`` (once in ``slo_aware`` it stays until attainment reaches ``t + m``) or
   ``load >= overload`` (it stays while ``load > light_load``): requests that carry
   deadlines are best ordered by them once they wait.
2. ``priority`` when ``priority_share`` reaches its threshold and ``load >= overload``;
   once in ``priority`` it stays while ``load > light_load``.
3. ``fair`` when at least two users sent the recent requests, one of them
   ``top_user_share >= user_share`` of them, and ``load >= overload``; once in ``fair``
   it stays while ``load > light_load``: one user's flood would hold back the others'
   requests in arrival order. (Its ``fair`` shares by ``user_weights``, as ``fair``'s
   own parameter.)
4. ``cost_optimized`` when ``cost_share`` reaches its threshold and ``load <= light_load``;
   once in it, it stays while ``load < overload``.
5. ``fifo`` when ``load <= light_load`` (light load, SLOs fine or not deadline-driven).
6. otherwise keep the current policy.

Hysteresis: besides the bands above, a switch happens only when the rule has named the
same new policy at every evaluation for ``min_dwell_s`` and at least ``min_dwell_s`` have
passed since the last switch. A switch drains the old inner policy and pushes everything
into the new one, so no queued request is lost.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Literal

from sage_llm.control_plane.params import MAX_WINDOW, USER_LABELS
from sage_llm.control_plane.scheduling._params import (
    check_choice,
    check_count,
    check_fraction,
    check_non_negative,
    check_positive,
    check_weights,
)
from sage_llm.control_plane.scheduling._queue import EPS, QueuedPolicy
from sage_llm.control_plane.scheduling.base import Admission
from sage_llm.control_plane.scheduling.cost_optimized import CostOptimizedPolicy
from sage_llm.control_plane.scheduling.fair import ANONYMOUS, FairSharePolicy
from sage_llm.control_plane.scheduling.fifo import FIFOPolicy
from sage_llm.control_plane.scheduling.priority import PriorityPolicy
from sage_llm.control_plane.scheduling.slo_aware import SLOAwarePolicy
from sage_llm.control_plane.snapshot import (
    PAIR_VIEW_PREFIX,
    ClusterSnapshot,
    CompletionRecord,
    RequestInfo,
)
from sage_llm.errors import ConfigError
from sage_llm.types import ExecutionInstanceType, RequestPriority

INNER_POLICIES = ("fifo", "priority", "slo_aware", "cost_optimized", "fair")


@dataclass(frozen=True, slots=True)
class Signals:
    """What the switch rule saw at one evaluation."""

    now: float
    queued: int
    free_slots: int
    """Slots free on healthy, accepting instances that run whole requests."""
    waiting: int
    """Queued requests beyond ``free_slots``: those that cannot start now."""
    capacity: int
    load: float
    """``waiting / capacity`` (inf when requests wait on a fleet without slots)."""
    attainment: float | None
    slo_samples: int
    deadline_share: float
    priority_share: float
    cost_share: float
    running: int = 0
    """Requests (and PD legs) running on the fleet's instances."""
    top_user_share: float = 0.0
    """The share of the recent requests sent by the user who sent the most."""
    users: int = 0
    """How many users sent the recent requests."""


_DEMOTED_KEPT = 4096
"""How many demoted requests' own mix :class:`AdaptivePolicy` keeps until they are pushed
(a request refused after its admission never is)."""


def _mix_of(req: RequestInfo) -> tuple[bool, bool, bool]:
    """Whether ``req`` has a deadline, a priority other than NORMAL, a cost budget."""
    return (
        req.deadline is not None,
        req.priority != RequestPriority.NORMAL,
        req.cost_budget is not None,
    )


MIN_EVAL_INTERVAL_S = 0.001
"""The shortest ``eval_interval_s``: the control plane's tick runs at it, and 1e-9 had
kept an idle control plane busy on a whole core (and a simulation from ending)."""


class AdaptivePolicy:
    """Runs one of fifo / priority / slo_aware / cost_optimized / fair; see the module
    docstring."""

    name = "adaptive"

    @dataclass(frozen=True, slots=True)
    class Params:
        """Thresholds of the switch rule (module docstring); ``user_weights`` and
        ``max_queued_per_user``: those of its ``fair`` (as ``fair``'s parameters of those
        names)."""

        initial: Literal["fifo", "priority", "slo_aware", "cost_optimized", "fair"] = "fifo"
        eval_interval_s: float = 1.0
        min_dwell_s: float = 2.0
        window: int = 200
        min_samples: int = 20
        slo_target: float = 0.95
        slo_margin: float = 0.02
        light_load: float = 0.05
        overload: float = 0.1
        deadline_share: float = 0.3
        priority_share: float = 0.2
        cost_share: float = 0.2
        user_share: float = 0.6
        user_weights: dict[str, float] = field(default_factory=dict)
        max_queued_per_user: int | None = None

        def __post_init__(self) -> None:
            if self.max_queued_per_user is not None:
                check_count("max_queued_per_user", self.max_queued_per_user)
            check_choice("initial", self.initial, INNER_POLICIES)
            check_positive("eval_interval_s", self.eval_interval_s, allow_inf=False)
            if self.eval_interval_s < MIN_EVAL_INTERVAL_S:  # its tick would spin a core
                raise ConfigError(
                    f"must be >= {MIN_EVAL_INTERVAL_S} s (the control plane ticks at it), "
                    f"got {self.eval_interval_s!r}",
                    key="eval_interval_s",
                )
            check_non_negative("min_dwell_s", self.min_dwell_s)
            check_count("window", self.window, maximum=MAX_WINDOW)  # a deque's bound
            check_count("min_samples", self.min_samples)
            if self.min_samples > self.window:
                raise ConfigError(
                    f"must be <= window ({self.window}), got {self.min_samples}", key="min_samples"
                )
            for key in ("slo_target", "slo_margin", "deadline_share", "priority_share"):
                check_fraction(key, getattr(self, key))
            check_fraction("cost_share", self.cost_share)
            check_fraction("user_share", self.user_share)
            weights = check_weights("user_weights", self.user_weights, USER_LABELS)
            object.__setattr__(self, "user_weights", weights)  # (a copy: it stays as built)
            check_non_negative("light_load", self.light_load)
            check_positive("overload", self.overload, allow_inf=False)
            if self.light_load >= self.overload:
                raise ConfigError(
                    f"must be below overload ({self.overload}), got {self.light_load}",
                    key="light_load",
                )

    def __init__(self, params: AdaptivePolicy.Params | None = None) -> None:
        self.params = p = params if params is not None else AdaptivePolicy.Params()
        self._inner: dict[str, QueuedPolicy] = {
            "fifo": FIFOPolicy(),
            "priority": PriorityPolicy(),
            "slo_aware": SLOAwarePolicy(),
            "cost_optimized": CostOptimizedPolicy(),
            "fair": FairSharePolicy(
                FairSharePolicy.Params(
                    user_weights=p.user_weights, max_queued_per_user=p.max_queued_per_user
                )
            ),
        }
        self._current: str = p.initial
        self._reason = f"initial policy {p.initial}; no load observed yet"
        self._switches = 0
        self._ended = 0  # requests that ended under it, whichever inner policy ran them
        self._since: float | None = None
        self._last_eval: float | None = None
        self._pending: tuple[str, float] | None = None
        self._signals: Signals | None = None
        self._slo: deque[bool] = deque(maxlen=p.window)
        self._slo_met = 0
        self._mix: deque[tuple[str, tuple[bool, bool, bool], str]] = deque(maxlen=p.window)
        self._mix_ids: dict[str, None] = {}
        """The ids in ``_mix``: a request pushed again while in the window is not counted
        again."""
        self._mix_counts = [0, 0, 0]
        self._user_counts: dict[str, int] = {}
        """Requests in ``_mix`` by user (only users with some: at most ``window``)."""
        self._demoted_mix: dict[str, tuple[bool, bool, bool]] = {}
        """The mix of requests the inner policy demoted at admission, until pushed."""
        self._history: deque[dict[str, object]] = deque(maxlen=16)

    @property
    def current(self) -> str:
        """Name of the inner policy in charge."""
        return self._current

    @property
    def _policy(self) -> QueuedPolicy:
        return self._inner[self._current]

    # -- SchedulingPolicy, delegated ---------------------------------------------------

    def admit(self, req: RequestInfo, snap: ClusterSnapshot) -> Admission:
        verdict = self._policy.admit(req, snap)
        if verdict.priority is not None:  # demoted: counted in the mix as it came
            if len(self._demoted_mix) >= _DEMOTED_KEPT:
                del self._demoted_mix[next(iter(self._demoted_mix))]
            self._demoted_mix[req.request_id] = _mix_of(req)
        return verdict

    def push(self, req: RequestInfo) -> None:
        self._policy.push(req)
        rid = req.request_id
        if rid in self._mix_ids:  # pushed again (a retry, a request put back): counted
            return
        mix = self._demoted_mix.pop(rid, None) or _mix_of(req)
        users = self._user_counts
        if len(self._mix) == self._mix.maxlen:
            old_id, old, old_user = self._mix[0]
            self._mix_ids.pop(old_id, None)
            for n in range(3):
                self._mix_counts[n] -= old[n]
            if users[old_user] == 1:
                del users[old_user]
            else:
                users[old_user] -= 1
        user = req.user_id or ANONYMOUS
        self._mix.append((rid, mix, user))
        self._mix_ids[rid] = None
        for n in range(3):
            self._mix_counts[n] += mix[n]
        users[user] = users.get(user, 0) + 1

    def pop(self, snap: ClusterSnapshot) -> RequestInfo | None:
        self._maybe_switch(snap)
        return self._policy.pop(snap)

    def peek(self, snap: ClusterSnapshot) -> RequestInfo | None:
        return self._policy.peek(snap)

    def remove(self, request_id: str) -> RequestInfo | None:
        return self._policy.remove(request_id)

    def __len__(self) -> int:
        return len(self._policy)

    def drain(self) -> list[RequestInfo]:
        return self._policy.drain()

    def constrain(self, req: RequestInfo, snap: ClusterSnapshot) -> frozenset[str] | None:
        return self._policy.constrain(req, snap)

    def on_complete(self, record: CompletionRecord) -> None:
        self._ended += 1
        self._mix_ids.pop(record.request_id, None)  # its id may come again as a new request
        if record.slo_met is not None:
            if len(self._slo) == self._slo.maxlen:
                self._slo_met -= self._slo[0]
            self._slo.append(record.slo_met)
            self._slo_met += record.slo_met
        self._policy.on_complete(record)

    # -- the switch rule ---------------------------------------------------------------

    @property
    def tick_interval_s(self) -> float:
        """How often the control plane calls :meth:`tick`."""
        return self.params.eval_interval_s

    def tick(self, snap: ClusterSnapshot) -> None:
        """Evaluate the switch rule on ``snap`` (as ``pop`` does): the control plane calls
        this every :attr:`tick_interval_s`, so that the policy in use, its reason and its
        signals follow the fleet also while nothing is taken from the queue."""
        self._maybe_switch(snap)

    def signals(self, snap: ClusterSnapshot) -> Signals:
        """The rule's inputs now (pure; does not evaluate the rule)."""
        queued = len(self)
        capacity = running = 0
        free_for: dict[str, int] = {}  # by model: a free slot runs only its model's requests
        decode_free: dict[str, int] = {}
        prefill_free: set[str] = set()
        for i in snap.instances:
            if i.instance_id.startswith(PAIR_VIEW_PREFIX):
                continue  # the dispatcher's stand-in for a free pair: no instance of its own
            capacity += i.max_concurrency
            running += i.in_flight
            if not (i.healthy and i.accepting):
                continue
            if i.role.runs_whole_requests:
                free_for[i.model] = free_for.get(i.model, 0) + i.free_slots
            elif i.role is ExecutionInstanceType.DECODING:
                decode_free[i.model] = decode_free.get(i.model, 0) + i.free_slots
            elif i.has_capacity:
                prefill_free.add(i.model)
        for model, slots in decode_free.items():  # a PD-only model: its free pairs' slots
            if not free_for.get(model) and model in prefill_free:
                free_for[model] = slots
        free = sum(free_for.values())
        counts = self._policy.queue.model_counts()
        waiting = sum(max(0, n - free_for.get(model, 0)) for model, n in counts.items())
        if capacity > 0:
            load = waiting / capacity
        else:
            load = math.inf if waiting else 0.0
        samples = len(self._slo)
        attainment = self._slo_met / samples if samples >= self.params.min_samples else None
        arrivals = max(1, len(self._mix))
        d, pr, c = (n / arrivals for n in self._mix_counts)
        users = self._user_counts
        top = max(users.values(), default=0) / arrivals
        return Signals(
            snap.now, queued, free, waiting, capacity, load, attainment, samples, d, pr, c,
            running, top, len(users),
        )  # fmt: skip

    def _maybe_switch(self, snap: ClusterSnapshot) -> None:
        now = snap.now
        p = self.params
        if self._since is None:
            self._since = now
        if self._last_eval is not None and now - self._last_eval + EPS < p.eval_interval_s:
            return
        self._last_eval = now
        sig = self._signals = self.signals(snap)
        target, why = self.desired(sig)
        if target == self._current:
            self._pending = None
            self._reason = why  # the rule's words now, with today's numbers
            return
        if self._pending is None or self._pending[0] != target:
            self._pending = (target, now)
        held = now - self._pending[1] + EPS >= p.min_dwell_s
        dwelt = now - self._since + EPS >= p.min_dwell_s
        if held and dwelt:
            self._switch(target, why, snap)
        else:
            self._reason = (
                f"keeping {self._current} until the rule has named {target} for "
                f"min_dwell_s ({p.min_dwell_s:g} s): {why}"
            )

    def desired(self, sig: Signals) -> tuple[str, str]:
        """(policy the rule names for ``sig``, a sentence saying why, with the numbers)."""
        p, cur = self.params, self._current
        att = sig.attainment
        load = (
            f"queue at {sig.load:.2f}x fleet capacity ({sig.waiting} waiting / "
            f"{sig.capacity} slots; {sig.queued} queued, {sig.free_slots} slots free)"
        )
        if sig.queued == 0 and sig.running == 0:
            # idle: the windows (attainment, the request mix) are the past's, not the
            # fleet's now; the next requests are admitted as arrival order admits them
            return "fifo", "idle: nothing queued or running; arrival order is fair and cheapest"
        if sig.deadline_share >= p.deadline_share:
            low, high = p.slo_target - p.slo_margin, min(1.0, p.slo_target + p.slo_margin)
            deadlines = f"{sig.deadline_share:.0%} of recent requests carry a deadline"
            if att is not None and att < low:
                return "slo_aware", (
                    f"SLO attainment {att:.1%} over the last {sig.slo_samples} deadline "
                    f"completions is below target {p.slo_target:.1%} "
                    f"(switch below {low:.1%}, back above {high:.1%}) and {deadlines}"
                )
            if att is not None and cur == "slo_aware" and att < high:
                return "slo_aware", (
                    f"SLO attainment {att:.1%} over the last {sig.slo_samples} deadline "
                    f"completions has not reached {high:.1%} (target {p.slo_target:.1%} + "
                    f"margin): staying in slo_aware (entered below {low:.1%}) and {deadlines}"
                )
            if self._loaded(sig.load, holding=cur == "slo_aware"):
                return (
                    "slo_aware",
                    f"{self._band('requests queue', load, sig.load)} and {deadlines}",
                )
        overloaded = self._loaded(sig.load, holding=cur == "priority")
        if sig.priority_share >= p.priority_share and overloaded:
            return "priority", (
                f"{self._band('overload', load, sig.load)} and {sig.priority_share:.0%} of "
                f"recent requests have a non-NORMAL priority"
            )
        flooded = sig.users >= 2 and sig.top_user_share >= p.user_share
        if flooded and self._loaded(sig.load, holding=cur == "fair"):
            return "fair", (
                f"{self._band('requests queue', load, sig.load)} and one user sent "
                f"{sig.top_user_share:.0%} of the recent requests (of {sig.users} users)"
            )
        light = sig.load < p.overload if cur == "cost_optimized" else sig.load <= p.light_load
        if sig.cost_share >= p.cost_share and light:
            if sig.load <= p.light_load:
                band = f"light load: {load} <= {p.light_load}"
            else:  # inside the band: held
                band = (
                    f"{load}, below overload {p.overload}: staying in cost_optimized "
                    f"(entered at <= {p.light_load})"
                )
            return "cost_optimized", (
                f"{band} and {sig.cost_share:.0%} of recent requests carry a cost budget"
            )
        if sig.load <= p.light_load:
            att_text = "n/a" if att is None else f"{att:.1%}"
            return "fifo", (
                f"light load: {load} <= {p.light_load}, SLO attainment {att_text}; "
                f"arrival order is fair and cheapest to run"
            )
        return cur, f"no rule applies ({load}); keeping {cur}"

    def _loaded(self, load: float, *, holding: bool) -> bool:
        """Whether requests queue enough for a queue-ordering policy: ``load >= overload``
        to switch to one, ``load > light_load`` to stay in it (``holding``)."""
        p = self.params
        return load > p.light_load if holding else load >= p.overload

    def _band(self, entering: str, load: str, value: float) -> str:
        """Why a queue-ordering policy is named at load ``value``: it queues (``>=
        overload``: ``entering`` says so), or, below that, the current one stays while
        ``> light_load``."""
        p = self.params
        if value >= p.overload:
            return f"{entering}: {load} >= {p.overload}"
        return (
            f"{load}, above light_load {p.light_load}: staying in {self._current} "
            f"(entered at >= {p.overload})"
        )

    def _switch(self, target: str, why: str, snap: ClusterSnapshot) -> None:
        old, new = self._policy, self._inner[target]
        if isinstance(old, FairSharePolicy):  # its running requests end under another now
            old.forget_running()
        new.observe(snap)
        # pushed in the order they came to it (not in the old rule's), so that the new
        # rule breaks its ties as it would have (fifo: submission order)
        came = {e.req.request_id: e.seq for e in old.queue.entries()}
        moved = sorted(old.drain(), key=lambda req: came[req.request_id])
        for req in moved:
            new.push(req)
        self._history.append(
            {"at": snap.now, "from": self._current, "to": target, "moved": len(moved)}
        )
        self._current = target
        self._reason = why
        self._switches += 1
        self._since = snap.now
        self._pending = None

    def describe(self) -> dict[str, object]:
        """Name, params, and ``current`` / ``reason`` / ``switches`` / ``since``."""
        head: dict[str, object] = {
            "current": self._current,
            "reason": self._reason,
            "switches": self._switches,
            "since": self._since if self._switches else None,  # no switch yet: none
        }
        state: dict[str, object] = {**head, "queued": len(self), "ended": self._ended}
        state["signals"] = None if self._signals is None else asdict(self._signals)
        state["pending"] = None if self._pending is None else list(self._pending)
        state["history"] = list(self._history)
        state["inner"] = self._policy.describe()
        return {"name": self.name, "params": asdict(self.params), **head, "state": state}


AdaptiveParams = AdaptivePolicy.Params
