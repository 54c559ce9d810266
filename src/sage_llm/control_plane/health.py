"""Instance health: active probes, passive error tracking and a circuit breaker per instance.

Every registered instance has a :class:`CircuitBreaker`::

    CLOSED ──failure_threshold consecutive failures──▶ OPEN ──cool-down──▶ HALF_OPEN
      ▲                                                  ▲                    │
      └──────────── recovery_threshold successes ────────┼────────────────────┤
                                                         └──── one failure ───┘

A failure is a failed probe (``client.health()`` False, raising, or slower than
``timeout_s``) or, with ``eject_on_errors``, a request the engine failed (connection
refused, timeout, 5xx, broken stream — not 4xx answers, which are the request's fault).
Besides ``failure_threshold`` consecutive failures, a share of ``failure_rate`` failed
requests among the last ``rate_window`` opens the breaker (an engine failing part of its
requests). OPEN: the instance gets no traffic (its view is unhealthy) and probes go on.
The cool-down doubles with every re-open (``base_cooldown_s`` … ``max_cooldown_s``) and
goes back to its base once the breaker has stayed closed for ``max_cooldown_s``.
HALF_OPEN: ``recovery_threshold`` successes close the breaker, one failure opens it
again. A breaker that requests' failures opened (a refused or broken connection among
them) is closed only by trial requests, one at a time (the router sees a capacity of
one): its probes may pass while its requests fail (a gray failure). One that probes
opened is judged by probes: the probe loop probes right away, and no request goes there
until one has passed.

An engine that hangs while its probes pass is caught by its token counters: when the
engine's stats (scraped every ``stats_interval_s``) show no prompt or generated token
processed for ``stall_timeout_s`` while requests are in flight there, the breaker opens
as by a request's failure (:meth:`HealthMonitor.watch_progress`).

A request failing on a connection error (refused, reset) before any output opens the
breaker at once, so an instance that died under traffic is ejected by the first request
that notices; the probe loop readmits it after the cool-down if it answers again. A
stream broken after output counts as any other failure. With ``move_on_eject``, an
ejection moves the instance's engine calls that have delivered nothing elsewhere
(``Dispatcher.evict``).

:class:`HealthMonitor` runs, per instance, the probe loop and the stats loop (engine load
figures; advisory) and records breaker states in the metrics
(``sage_llm_instance_circuit_state`` 0 closed / 1 half-open / 2 open, and a transitions
counter).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, TypeVar

from sage_llm.control_plane.params import MAX_WINDOW
from sage_llm.engines.base import ReportsAdapters, ReportsContextLength
from sage_llm.errors import EngineConnectionError, EngineError, EngineTimeoutError

if TYPE_CHECKING:
    from sage_llm.config_schema import HealthConfig
    from sage_llm.control_plane.instances import InstanceState
    from sage_llm.control_plane.metrics import ControlPlaneMetrics
    from sage_llm.engines.base import EngineStats
    from sage_llm.sim.clock import Clock

log = logging.getLogger("sage_llm.health")

T = TypeVar("T")


class CircuitState(IntEnum):
    """Breaker states; the value is what the Prometheus gauge reports."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Thresholds and cool-down of a :class:`CircuitBreaker`."""

    failure_threshold: int = 3
    recovery_threshold: int = 1
    base_cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0
    failure_rate: float | None = 0.5
    """Open also when at least this share of the last ``rate_window`` requests failed,
    successes between them or not (None: only consecutive failures open it)."""
    rate_window: int = 20

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.recovery_threshold < 1:
            raise ValueError("failure_threshold and recovery_threshold must be at least 1")
        if not 0 < self.base_cooldown_s <= self.max_cooldown_s:
            raise ValueError("need 0 < base_cooldown_s <= max_cooldown_s")
        if self.failure_rate is not None and not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be in (0, 1]")
        if not 2 <= self.rate_window <= MAX_WINDOW:
            raise ValueError(f"rate_window must be in [2, {MAX_WINDOW:,}]")


class CircuitBreaker:
    """The breaker of one instance. Pure state machine: every call takes ``now``.

    Failures and successes are a probe's or, with ``request=True``, a request's; each kind
    counts its own consecutive failures (requests that began before an engine hung, and
    end well, do not undo its failed probes). Requests also fill a window of the last
    ``rate_window`` outcomes: a share of failures of at least ``failure_rate`` in it opens
    the breaker though successes came between them (an engine failing part of its
    requests). A breaker opened by requests is closed again only by requests (the trials
    of its half-open state), and takes them only once a probe has passed since its
    cool-down ended: an engine whose probes pass while its requests fail (a gray failure)
    stays out, with a cool-down that grows at each opening, and no client request is
    sent as a trial to an engine that does not even answer its probes. One opened by
    probes is judged by probes alone: half-open, it takes no request until a probe has
    passed.
    The cool-down goes back to its base once the breaker has stayed closed for
    ``max_cooldown_s``."""

    def __init__(self, settings: BreakerSettings | None = None) -> None:
        self.settings = settings or BreakerSettings()
        self.state = CircuitState.CLOSED
        self._probe_failures = 0
        self._request_failures = 0
        self.trial_successes = 0
        self.opens = 0  # openings since the breaker last stayed closed for max_cooldown_s
        self.trial_failed = False
        """Whether the last move was a failed trial: HALF_OPEN back to OPEN."""
        self.open_until = 0.0
        self.transitions = 0
        self.changed_at: float | None = None
        self.closed_at: float | None = None
        self.last_failure: str | None = None
        self.by_requests = False
        """Whether requests' failures opened it: then only a request's success closes it."""
        self.probe_passed = False
        """Whether a probe has passed since the breaker last went half-open (a breaker
        requests opened takes its trial requests only then)."""
        self._window: deque[bool] = deque(maxlen=self.settings.rate_window)
        self._window_failures = 0

    @property
    def consecutive_failures(self) -> int:
        """The longer of the two runs of failures (probes', requests')."""
        return max(self._probe_failures, self._request_failures)

    @property
    def routable(self) -> bool:
        """Whether the instance may get requests at all: closed, or half-open for a trial
        request (when requests opened it; probes judge the others)."""
        state = self.state
        return state is CircuitState.CLOSED or (
            state is CircuitState.HALF_OPEN and self.by_requests and self.probe_passed
        )

    def cooldown_s(self) -> float:
        """The cool-down of the current (or next) opening."""
        s = self.settings
        doublings = min(max(self.opens - 1, 0), 64)  # past the cap long before: no overflow
        return float(min(s.max_cooldown_s, s.base_cooldown_s * 2**doublings))

    def _move(self, state: CircuitState, now: float) -> CircuitState:
        before = self.state
        self.trial_failed = before is CircuitState.HALF_OPEN and state is CircuitState.OPEN
        self.state = state
        self.transitions += 1
        self.changed_at = now
        self.probe_passed = False
        if state is CircuitState.OPEN:
            closed_at = self.closed_at
            if (
                before is CircuitState.CLOSED
                and closed_at is not None
                and now - closed_at >= self.settings.max_cooldown_s
            ):
                # it had stayed closed a while: a new episode (a failed trial is not one,
                # however long ago the breaker was last closed)
                self.opens = 0
            self.opens += 1
            self.open_until = now + self.cooldown_s()
            self.trial_successes = 0
            self._clear_window()
        elif state is CircuitState.CLOSED:
            self.closed_at = now
            self.by_requests = False
            self._probe_failures = self._request_failures = 0
            self.trial_successes = 0
            self._clear_window()
        return state

    def _clear_window(self) -> None:
        self._window.clear()
        self._window_failures = 0

    def _note(self, ok: bool) -> None:
        """A request's outcome, into the window of the last ``rate_window``."""
        window = self._window
        if len(window) == window.maxlen and not window[0]:
            self._window_failures -= 1
        window.append(ok)
        if not ok:
            self._window_failures += 1

    def _failing_share(self) -> bool:
        """Whether the window is full and its share of failures reaches ``failure_rate``."""
        rate = self.settings.failure_rate
        window = self._window
        return (
            rate is not None
            and len(window) == window.maxlen
            and self._window_failures >= rate * len(window)
        )

    def poll(self, now: float) -> CircuitState | None:
        """Move OPEN → HALF_OPEN once the cool-down has passed; returns the new state."""
        if self.state is CircuitState.OPEN and now >= self.open_until:
            return self._move(CircuitState.HALF_OPEN, now)
        return None

    def record_success(self, now: float, *, request: bool = False) -> CircuitState | None:
        """A probe or (``request``) a request succeeded; returns the new state on a
        transition. A probe's success does not close a breaker requests opened, nor a
        request's one probes opened (a request begun before the engine hung may end well
        while its probes still time out)."""
        if request:
            self._request_failures = 0
            self._note(True)
        else:
            self._probe_failures = 0
            self.probe_passed = self.state is CircuitState.HALF_OPEN
        if self.state is CircuitState.HALF_OPEN and request == self.by_requests:
            self.trial_successes += 1
            if self.trial_successes >= self.settings.recovery_threshold:
                return self._move(CircuitState.CLOSED, now)
        return None

    def record_failure(
        self, now: float, reason: str = "", *, request: bool = False
    ) -> CircuitState | None:
        """A probe or (``request``) a request failed; returns the new state on a
        transition."""
        self.last_failure = reason or self.last_failure
        if request:
            self._request_failures += 1
            run = self._request_failures
            self._note(False)
        else:
            self._probe_failures += 1
            run = self._probe_failures
        if self.state is CircuitState.HALF_OPEN:
            self.by_requests = self.by_requests or request
            return self._move(CircuitState.OPEN, now)
        if self.state is CircuitState.CLOSED and request and self._failing_share():
            failed, window = self._window_failures, len(self._window)
            self.last_failure = f"{reason} ({failed} of its last {window} requests failed)"
            self.by_requests = True
            return self._move(CircuitState.OPEN, now)
        if self.state is CircuitState.CLOSED and run >= self.settings.failure_threshold:
            self.by_requests = request
            return self._move(CircuitState.OPEN, now)
        return None

    def force_open(self, now: float, reason: str, *, request: bool = False) -> CircuitState | None:
        """Open at once (a connection failure, or a failed first probe)."""
        self.last_failure = reason
        if self.state is CircuitState.OPEN:
            return None
        self.by_requests = request
        return self._move(CircuitState.OPEN, now)

    def describe(self, now: float) -> dict[str, Any]:
        """JSON-ready state for status endpoints."""
        return {
            "state": self.state.label,
            "opened_by": (
                None
                if self.state is CircuitState.CLOSED
                else "requests"
                if self.by_requests
                else "probes"
            ),
            "consecutive_failures": self.consecutive_failures,
            "transitions": self.transitions,
            "cooldown_remaining_s": (
                max(0.0, self.open_until - now) if self.state is CircuitState.OPEN else 0.0
            ),
            "last_failure": self.last_failure,
        }


@dataclass(frozen=True, slots=True)
class HealthSettings:
    """Probe cadence, probe timeout, breaker settings and whether request errors count."""

    interval_s: float = 5.0
    timeout_s: float = 2.0
    stats_interval_s: float = 1.0
    eject_on_errors: bool = True
    move_on_eject: bool = True
    """Whether an ejection moves the instance's engine calls that have delivered nothing
    to other instances (see :meth:`Dispatcher.evict`)."""
    breaker: BreakerSettings = BreakerSettings()
    stall_timeout_s: float | None = 60.0
    """An instance with engine calls in flight whose engine has processed no token
    (its prompt and generation token counters both stood still) for this long is ejected
    as stalled: an engine that hangs while its probes pass. Judged on the stats the
    stats loop scrapes, so only for engines that report the counters
    (:attr:`~sage_llm.engines.base.EngineStats.counts_tokens`); None: never."""

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.timeout_s <= 0 or self.stats_interval_s <= 0:
            raise ValueError("health intervals and timeouts must be positive")
        if self.stall_timeout_s is not None and not self.stall_timeout_s > 0:
            raise ValueError("stall_timeout_s must be positive or None")

    @classmethod
    def from_config(cls, config: HealthConfig, *, stats_interval_s: float = 1.0) -> HealthSettings:
        """Settings from a ``[health]`` table."""
        base = min(1.0, config.interval_s)
        return cls(
            interval_s=config.interval_s,
            timeout_s=config.timeout_s,
            stats_interval_s=stats_interval_s,
            eject_on_errors=config.eject_on_errors,
            move_on_eject=config.move_on_eject,
            stall_timeout_s=config.stall_timeout_s or None,  # 0: off
            breaker=BreakerSettings(
                failure_threshold=config.failure_threshold,
                recovery_threshold=config.recovery_threshold,
                failure_rate=config.failure_rate_threshold,
                rate_window=config.failure_rate_window,
                base_cooldown_s=base,
                max_cooldown_s=max(base, 30.0),
            ),
        )


INSTANCE_FAULT_STATUSES = frozenset({401, 403, 404})
"""Engine answers that are the instance's fault, not the request's: it refuses the
credentials it was registered with (401, 403), or does not serve the model or the route
the control plane sends it requests for (404: a wrong ``model_name`` or engine). A
404 to a generation request without an error object (no such route for the engine's
model) is the request's fault instead: the client refused, the instance kept."""


def counts_against_health(exc: EngineError) -> bool:
    """Whether an engine error says something about the instance (not the request): no
    HTTP status (connection, timeout, broken stream), a 5xx, or one of
    :data:`INSTANCE_FAULT_STATUSES`."""
    status = exc.status
    return status is None or status >= 500 or status in INSTANCE_FAULT_STATUSES


class HealthMonitor:
    """Runs probe and stats loops per instance and owns the breaker transitions."""

    def __init__(
        self,
        settings: HealthSettings,
        *,
        clock: Callable[[], Clock],
        metrics: ControlPlaneMetrics,
        on_change: Callable[[], None],
        on_eject: Callable[[InstanceState, str], None] | None = None,
    ) -> None:
        """``clock`` returns the clock to read (resolved late: the manager's clock depends
        on the loop it runs on); ``on_change`` is called after every breaker transition,
        and ``on_eject`` with the instance and the reason when a breaker opens (whatever
        ``move_on_eject`` says: what an ejection does is the caller's)."""
        self.settings = settings
        self._clock = clock
        self.metrics = metrics
        self._on_change = on_change
        self._on_eject = on_eject
        self._probe_now: dict[str, asyncio.Event] = {}

    @property
    def clock(self) -> Clock:
        return self._clock()

    def attach(self, state: InstanceState) -> None:
        """Give a newly registered instance its breaker (closed)."""
        state.breaker = CircuitBreaker(self.settings.breaker)
        self._publish(state)

    def start(self, state: InstanceState) -> list[asyncio.Task[None]]:
        """Start the probe and stats loops of ``state``; the caller cancels the tasks."""
        iid = state.instance_id
        self._probe_now[iid] = asyncio.Event()
        return [
            asyncio.create_task(self._stats_loop(state), name=f"stats-{iid}"),
            asyncio.create_task(self._probe_loop(state), name=f"health-{iid}"),
        ]

    def forget(self, instance_id: str) -> None:
        self._probe_now.pop(instance_id, None)

    # -- passive tracking (called by the dispatcher) ----------------------------------------

    def on_request_success(self, state: InstanceState) -> None:
        state.consecutive_failures = 0
        self._apply(state, state.breaker.record_success(self.clock.now(), request=True))

    def on_request_failure(self, state: InstanceState, exc: EngineError) -> None:
        state.consecutive_failures += 1
        if not self.settings.eject_on_errors or not counts_against_health(exc):
            return
        now = self.clock.now()
        if isinstance(exc, EngineConnectionError) and exc.retryable:
            # refused or broken connection before any output: eject now. A trial request
            # readmits it after the cool-down (a probe that passes may be a gray
            # failure's: an engine that drops its answers while /health answers); a dead
            # engine fails its probes, which keep it open. A stream broken after output
            # counts as any failure: one client's dropped stream does not eject it
            breaker = state.breaker
            moved = breaker.force_open(now, exc.message, request=True)
            self._apply(state, moved, why=exc.message)
            self._apply(state, breaker.record_failure(now, exc.message, request=True))
        else:
            moved = state.breaker.record_failure(now, exc.message, request=True)
            self._apply(state, moved, why=exc.message)

    def probe_soon(self, instance_id: str) -> None:
        """Wake the probe loop of ``instance_id`` now."""
        event = self._probe_now.get(instance_id)
        if event is not None:
            event.set()

    # -- active probes ---------------------------------------------------------------------

    async def ask(self, state: InstanceState) -> tuple[bool, str]:
        """Ask the instance's engine whether it is healthy, within ``timeout_s``: (healthy,
        why not). Nothing is applied to its breaker (:meth:`probe` does that)."""
        ok = False
        why = "health probe failed"
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                ok = bool(await state.client.health())
            if not ok:  # the client's reason, when it keeps one (the HTTP client does)
                why = f"health probe failed: {getattr(state.client, 'health_error', None)}"
                why = why.removesuffix(": None")
        except TimeoutError:
            why = f"health probe timed out after {self.settings.timeout_s:g} s"
        except Exception as exc:  # any failure to answer is unhealthy
            why = f"health probe failed: {exc!r}"
        return ok, why

    async def probe(self, state: InstanceState) -> bool:
        """One probe; applies its outcome to the breaker. True when healthy."""
        ok, why = await self.ask(state)
        now = self.clock.now()
        first = state.last_health_check is None
        state.last_health_check = now
        breaker = state.breaker
        if ok:
            self._apply(state, breaker.record_success(now))
            if state.healthy != breaker.routable:  # a trial request may go there now
                self._publish(state)
                self._on_change()
        elif first:  # never seen healthy: out at once, not after failure_threshold probes
            self._apply(state, breaker.force_open(now, why), why=f"{why} (its first probe)")
            self._apply(state, breaker.record_failure(now, why))
        else:
            self._apply(state, breaker.record_failure(now, why), why=why)
        return ok

    async def _probe_loop(self, state: InstanceState) -> None:
        """Probe at once (an instance is not trusted before its first answer), then every
        ``interval_s``; while the circuit is open, when its cool-down ends (an ejection by
        a request's failure wakes the loop to wait for that, not for the next interval)."""
        event = self._probe_now[state.instance_id]
        wait = 0.0
        while not state.removed or state.in_flight:  # a removed one: its calls' end
            if wait > 0:
                woken = False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await event.wait()
                        woken = True
                event.clear()
                breaker = state.breaker
                if woken and breaker.state is CircuitState.OPEN:
                    wait = max(0.0, breaker.open_until - self.clock.now())
                    continue  # ejected meanwhile: probe when its cool-down ends
            event.clear()
            self._apply(state, state.breaker.poll(self.clock.now()))
            await self.probe(state)
            if state.breaker.state is CircuitState.HALF_OPEN:
                await asyncio.sleep(min(self.settings.interval_s, 0.1))
            breaker = state.breaker
            wait = self.settings.interval_s
            if breaker.state is CircuitState.OPEN:
                wait = min(wait, max(0.0, breaker.open_until - self.clock.now()))
            elif breaker.state is CircuitState.HALF_OPEN and not breaker.by_requests:
                wait = 0.0  # else the trial requests decide; the probes go on at interval_s

    async def _stats_loop(self, state: InstanceState) -> None:
        while not state.removed or state.in_flight:  # a removed one: its calls' end
            if state.breaker.routable:  # (again once a minute: a restart may change it)
                await self._ask_context_length(state)
            if state.breaker.routable:
                await self.read_stats(state)
            await asyncio.sleep(self.settings.stats_interval_s)

    async def read_stats(self, state: InstanceState) -> None:
        """Read ``state``'s engine stats once (advisory: a failure is logged at debug
        level), as the stats loop does every ``stats_interval_s``: its ``last_stats``, the
        adapters of another client's requests (:attr:`InstanceState.lora_others`), the
        KV-usage and LoRA-slot gauges, and the progress watch."""
        ours = set(state.lora_in_flight)  # the adapters of calls in flight here
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                stats = await state.client.stats()
        except Exception as exc:  # stats are advisory; health decides
            log.debug("stats of %s failed: %r", state.instance_id, exc)
            return
        state.note_stats(stats, ours)
        if stats.max_lora or state.lora_in_flight:
            self.metrics.set_lora_slots(state.instance_id, state.lora_slots_left())
        if state.breaker.routable:  # not ejected while the stats were read
            self.metrics.instance_kv_usage.labels(instance_id=state.instance_id).set(stats.kv_usage)
        self.watch_progress(state, stats)

    async def _ask_context_length(self, state: InstanceState) -> None:
        """Ask the engine its ``max_model_len`` (engines that can say,
        :class:`~sage_llm.engines.base.ReportsContextLength`) and the LoRA adapters it
        serves (:class:`~sage_llm.engines.base.ReportsAdapters`), at most once a minute."""
        now = self.clock.now()
        if now - state.context_asked_at < 60.0:
            return
        state.context_asked_at = now
        client = state.client
        if isinstance(client, ReportsContextLength):  # protocol checks: once a minute
            said = await self._advisory(state, "context length", client.context_length)
            if said is not None:  # (a card missing for a moment leaves what was known)
                state.context_length = said
        if isinstance(client, ReportsAdapters):
            listed = await self._advisory(state, "LoRA adapters", client.lora_adapters)
            if listed is not None:  # (an engine that does not say leaves what was known)
                adapters = frozenset(state.instance.lora_adapters).union(listed)
                if adapters != state.adapters:
                    log.info(
                        "instance %s serves LoRA adapters: %s",
                        state.instance_id,
                        ", ".join(sorted(adapters)) or "none",
                    )
                    state.adapters = adapters

    async def _advisory(
        self, state: InstanceState, what: str, ask: Callable[[], Awaitable[T]]
    ) -> T | None:
        """``ask()``'s answer, or None when it fails or takes longer than a probe may
        (advisory, as the stats are: logged at debug level)."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                return await ask()
        except Exception as exc:
            log.debug("%s of %s unknown: %r", what, state.instance_id, exc)
            return None

    def watch_progress(self, state: InstanceState, stats: EngineStats) -> None:
        """Eject ``state`` as stalled when its engine has processed no token for
        ``stall_timeout_s`` while engine calls were in flight on it (see
        :attr:`HealthSettings.stall_timeout_s`). The standstill is timed from the first
        scrape that saw calls in flight with the counters where they stand (never from one
        that saw none: a call that came after it would have been judged early), so it is
        judged at most two ``stats_interval_s`` late (one to see the counters stop, one to
        see the limit pass)."""
        limit = self.settings.stall_timeout_s
        if limit is None or not stats.counts_tokens:
            return
        now = self.clock.now()
        done = stats.prompt_tokens_total + stats.generation_tokens_total + stats.steps_total
        mark = state.progress
        if state.in_flight <= 0:
            state.progress = None  # timed from the first scrape that sees a call
            return
        if mark is None or mark[0] != done:
            state.progress = (done, now)
            return
        if now - mark[1] < limit:
            return
        state.progress = None  # timed afresh from the next scrape
        why = (
            f"stalled: its engine processed no token in {now - mark[1]:.0f} s with "
            f"{state.in_flight} request(s) in flight"
        )
        self.metrics.instance_stalls.labels(instance_id=state.instance_id).inc()
        # as a request's failure: a trial request, not a probe (they pass), readmits it
        self._apply(state, state.breaker.force_open(now, why, request=True), why=why)

    # -- transitions -----------------------------------------------------------------------

    def _apply(self, state: InstanceState, moved: CircuitState | None, why: str = "") -> None:
        if moved is None:
            return
        if moved is CircuitState.OPEN:
            log.warning(
                "instance %s ejected (circuit open for %.1f s): %s",
                state.instance_id,
                state.breaker.open_until - self.clock.now(),
                why or "failures",
            )
            self.probe_soon(state.instance_id)  # its probe loop waits out the cool-down
            state.context_length, state.context_asked_at = None, -math.inf  # it may restart
            with contextlib.suppress(KeyError):  # unknown until its stats are read again
                self.metrics.instance_kv_usage.remove(state.instance_id)
            if self._on_eject is not None:
                self._on_eject(state, why or "failures")
        elif moved is CircuitState.CLOSED:  # back: good news, not a warning
            log.info("instance %s circuit is now %s", state.instance_id, moved.label)
        else:
            log.warning("instance %s circuit is now %s", state.instance_id, moved.label)
        self.metrics.circuit_transitions.labels(
            instance_id=state.instance_id, state=moved.label
        ).inc()
        self._publish(state)
        self._on_change()

    def _publish(self, state: InstanceState) -> None:
        breaker = state.breaker
        state.healthy = breaker.routable
        iid = state.instance_id
        self.metrics.instance_healthy.labels(instance_id=iid).set(1.0 if breaker.routable else 0.0)
        self.metrics.circuit_state.labels(instance_id=iid).set(float(breaker.state.value))


async def with_stream_timeouts(
    stream: AsyncIterator[T],
    *,
    first_token_s: float | None,
    idle_s: float | None,
    instance_id: str,
) -> AsyncIterator[T]:
    """Yield ``stream``'s items (chunks, or lists of them from ``generate_batches``),
    raising :class:`EngineTimeoutError` when the first item takes longer than
    ``first_token_s`` or a later one longer than ``idle_s`` (None: no limit). Works for
    every EngineClient, HTTP or in-process."""
    it = aiter(stream)
    limit = first_token_s
    first = True
    try:
        while True:
            try:
                if limit is None:
                    item = await anext(it)
                else:
                    async with asyncio.timeout(limit):
                        item = await anext(it)
            except StopAsyncIteration:
                return
            except TimeoutError:
                what = "first token" if first else "next token"
                raise EngineTimeoutError(
                    f"no {what} within {limit:g} s",
                    instance_id=instance_id,
                    retryable=first,
                ) from None
            first = False
            limit = idle_s
            yield item
    finally:
        close = getattr(it, "aclose", None)
        if close is not None:
            await close()
