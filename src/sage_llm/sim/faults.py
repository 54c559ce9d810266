"""Fault injection for simulated engines: crash, hang, slow down, 5xx, broken streams.

A :class:`FaultPlan` lists faults, each either *scheduled* (active from ``start_s`` after
the engine was armed, for ``duration_s`` or for ever) or *random* (each request is hit with
``probability``, drawn from the plan's seeded generator). :class:`FaultyEngineClient` wraps
any engine (normally a :class:`~sage_llm.sim.engine.SimEngine`) and applies the plan; it is
itself an EngineClient, so it plugs into a control plane in tests::

    plan = FaultPlan.parse("crash@2+3; error=503@p0.1; seed=7")
    cp.register_instance(instance, FaultyEngineClient(SimEngine("a", cfg), plan))

and into the engine server (``sage-llm engine-sim --faults SPEC``), where a crash makes the
process exit (``exit_process=True``) and errors reach the client over HTTP.

Fault kinds (``value`` in brackets):

* ``crash`` — calls fail with a connection error (in-process; :class:`InjectedCrash`) or
  the process exits (scheduled crashes under the engine server, ``exit_process=True``);
  the engine server drops the connection of a request a random crash hits, with no
  answer; health probes fail;
* ``hang`` [chunks before hanging, default 0] — the stream stops producing (for timeouts);
  health probes hang too;
* ``slow`` [factor, default 4] — every chunk takes ``factor`` times as long;
* ``error`` [HTTP status, default 503] — requests (and PD prefill legs) fail before any
  output with an :class:`~sage_llm.errors.EngineError` whose ``status`` is that status;
  the engine server answers them with exactly that status and a vLLM error body
  (``{"error": {"message", "type": <the status's phrase>, "param": null, "code"}}``);
  health probes fail while it is scheduled (the server's ``/health`` answers 503);
* ``truncate`` [chunks, default 1] — the stream ends after that many chunks without a
  finish reason: a connection dropped mid-answer. The engine server drops the connection
  there too: a streamed answer stops after those chunks without ``[DONE]`` or the end of
  its chunked body, and a non-streaming request (a streamed one too with ``truncate=0``)
  gets no response at all;
* ``malformed`` [chunks, default 1] — after that many chunks the stream breaks with an
  unreadable chunk.

Spec grammar (``;``-separated): ``KIND[=VALUE][@WHEN]`` with ``WHEN`` = ``T`` or ``T+D``
(scheduled, seconds) or ``pP`` (random, probability per request); no ``@``: scheduled from
0 for ever. ``seed=N`` seeds the random faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum

from sage_llm.engines.base import (
    Chunk,
    EngineClient,
    EngineRequest,
    EngineStats,
    KVHandle,
    LoadsAdapters,
    ReportsAdapters,
    ReportsContextLength,
)
from sage_llm.errors import ConfigError, EngineConnectionError, EngineError, EngineStreamError
from sage_llm.sim.clock import Clock, current_clock
from sage_llm.sim.server_metrics import ReportsQueueTime
from sage_llm.sim.server_requests import ReportsStopReason

_HANG_FOREVER_S = 3600.0


class InjectedCrash(EngineConnectionError):
    """A call failed by a ``crash`` fault: the engine server drops the client's connection
    for it, with no answer, as a crashed engine's connection drops."""


class FaultKind(Enum):
    """What a fault does (see the module docstring)."""

    CRASH = "crash"
    HANG = "hang"
    SLOW = "slow"
    ERROR = "error"
    TRUNCATE = "truncate"
    MALFORMED = "malformed"


_DEFAULT_VALUE = {
    FaultKind.CRASH: 0.0,
    FaultKind.HANG: 0.0,
    FaultKind.SLOW: 4.0,
    FaultKind.ERROR: 503.0,
    FaultKind.TRUNCATE: 1.0,
    FaultKind.MALFORMED: 1.0,
}


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault: scheduled (``start_s``/``duration_s``) or random (``probability``)."""

    kind: FaultKind
    start_s: float = 0.0
    duration_s: float | None = None
    probability: float | None = None
    value: float | None = None

    def __post_init__(self) -> None:
        times = (self.start_s, self.duration_s, self.probability, self.value)
        if any(t is not None and not math.isfinite(t) for t in times):
            raise ValueError("fault times, probability and value must be finite numbers")
        if self.start_s < 0 or (self.duration_s is not None and self.duration_s <= 0):
            raise ValueError("fault start must be >= 0 and duration > 0")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError("fault probability must be in [0, 1]")
        if self.kind is FaultKind.CRASH and self.value is not None:
            raise ValueError("crash takes no value (crash@T, crash@T+D or crash@pP)")
        if self.kind is FaultKind.SLOW and self.arg < 1.0:
            raise ValueError("slow factor must be >= 1")
        if self.kind is FaultKind.ERROR and not (
            400 <= self.arg < 600 and float(self.arg).is_integer()
        ):
            raise ValueError("error status must be an HTTP error status (400..599)")
        counts = (FaultKind.HANG, FaultKind.TRUNCATE, FaultKind.MALFORMED)
        if self.kind in counts and not (self.arg >= 0 and float(self.arg).is_integer()):
            raise ValueError(f"{self.kind.value} takes a whole number of chunks >= 0")

    @property
    def arg(self) -> float:
        return _DEFAULT_VALUE[self.kind] if self.value is None else self.value

    @property
    def scheduled(self) -> bool:
        return self.probability is None

    def active_at(self, elapsed_s: float) -> bool:
        """Whether a scheduled fault is active ``elapsed_s`` after arming."""
        if not self.scheduled or elapsed_s < self.start_s:
            return False
        return self.duration_s is None or elapsed_s < self.start_s + self.duration_s

    def remaining_s(self, elapsed_s: float) -> float:
        """Seconds this scheduled fault stays active (for ever: a large number)."""
        if self.duration_s is None:
            return _HANG_FOREVER_S
        return max(0.0, self.start_s + self.duration_s - elapsed_s)


def _parse_one(item: str) -> Fault:
    head, at, when = item.partition("@")
    name, equals, value = head.partition("=")
    start, plus, duration = when.partition("+")
    missing = None  # "hang@" for "hang@5" would hang the engine from the start
    if equals and not value.strip():
        missing = "a value after '='"
    elif at and not when.strip():
        missing = "a time after '@'"
    elif at and when.strip().startswith("p") and not when.strip()[1:].strip():
        missing = "a probability after '@p'"
    elif at and not start.strip():
        missing = "a start time before '+'"
    elif plus and not duration.strip():
        missing = "a duration after '+'"
    if missing is not None:
        raise ConfigError(
            f"bad fault {item.strip()!r}: {missing} is missing (KIND[=VALUE][@T, @T+D or @pP])"
        )
    try:
        kind = FaultKind(name.strip().lower())
    except ValueError:
        kinds = ", ".join(k.value for k in FaultKind)
        raise ConfigError(f"unknown fault {name.strip()!r} (one of: {kinds})") from None

    def number(text: str, what: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(
                f"bad fault {item.strip()!r}: {what} must be a number, got {text.strip()!r}"
            ) from None

    try:
        val = number(value, "the value after '='") if value.strip() else None
        when = when.strip()
        if not when:
            return Fault(kind, value=val)
        if when.startswith("p"):
            return Fault(
                kind, probability=number(when[1:], "the probability after '@p'"), value=val
            )
        start, _, dur = when.partition("+")
        return Fault(
            kind,
            number(start, "the time after '@'"),
            number(dur, "the duration after '+'") if dur else None,
            value=val,
        )
    except ValueError as exc:
        raise ConfigError(f"bad fault {item!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """Faults to inject and the seed of the random ones."""

    faults: tuple[Fault, ...] = ()
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> FaultPlan:
        """Parse a spec such as ``"crash@5; slow=3@1+2; error=500@p0.1; seed=4"``.
        Raises :class:`ConfigError` on a bad spec."""
        faults: list[Fault] = []
        seed = 0
        for raw in spec.split(";"):
            item = raw.strip()
            if not item:
                continue
            if item.startswith("seed="):
                try:
                    seed = int(item[5:])
                except ValueError:
                    raise ConfigError(f"bad fault seed {item!r}") from None
                if seed < 0:
                    raise ConfigError(f"bad fault seed {item!r}: must be >= 0")
                continue
            faults.append(_parse_one(item))
        return cls(tuple(faults), seed)

    def check_for_process(self) -> None:
        """Raise ``ValueError`` for what an engine process cannot do: a crash with a
        window (``crash@T+D``) exits the process at ``T``, and nothing brings it back after
        ``D`` (in-process, the window ends and the engine answers again)."""
        for fault in self.faults:
            if fault.kind is FaultKind.CRASH and fault.scheduled and fault.duration_s:
                raise ValueError(
                    f"crash@{fault.start_s:g}+{fault.duration_s:g}: the process exits at "
                    f"{fault.start_s:g} s and does not come back after the window; write "
                    f"crash@{fault.start_s:g} and restart it to bring it back"
                )

    def scheduled_at(self, elapsed_s: float) -> list[Fault]:
        return [f for f in self.faults if f.active_at(elapsed_s)]


@dataclass
class FaultStats:
    """How many times each fault kind was injected."""

    injected: dict[str, int] = field(default_factory=dict)

    def count(self, kind: FaultKind) -> None:
        self.injected[kind.value] = self.injected.get(kind.value, 0) + 1


class FaultyEngineClient:
    """An EngineClient that applies a :class:`FaultPlan` to the engine it wraps.

    Time counts from :meth:`arm` (called by the first use when not called before).
    ``exit_process=True`` (the engine server) turns a scheduled crash into the process
    exiting with status 1 at that time; in-process, a crash fails every call instead.
    """

    def __init__(
        self,
        inner: EngineClient,
        plan: FaultPlan,
        *,
        clock: Clock | None = None,
        exit_process: bool = False,
    ) -> None:
        self.inner = inner
        self.plan = plan
        self.stats_injected = FaultStats()
        self._clock = clock
        self._exit_process = exit_process
        self._rng = random.Random(plan.seed)
        self._armed_at: float | None = None
        self._exit_timer: asyncio.TimerHandle | None = None
        self._closed = asyncio.Event()
        """Set by :meth:`aclose`: a hang ends then (the engine is going away)."""

    @property
    def instance_id(self) -> str:
        return self.inner.instance_id

    @property
    def clock(self) -> Clock:
        if self._clock is None:
            self._clock = current_clock()
        return self._clock

    def arm(self) -> None:
        """Start the plan's time now (inside the running loop)."""
        if self._armed_at is not None:
            return
        self._armed_at = self.clock.now()
        if self._exit_process:
            crashes = [f for f in self.plan.faults if f.kind is FaultKind.CRASH and f.scheduled]
            if crashes:
                start = min(f.start_s for f in crashes)
                loop = asyncio.get_running_loop()
                self._exit_timer = loop.call_later(start, os._exit, 1)

    def elapsed_s(self) -> float:
        self.arm()
        assert self._armed_at is not None
        return self.clock.now() - self._armed_at

    def _scheduled(self, kind: FaultKind) -> Fault | None:
        for fault in self.plan.scheduled_at(self.elapsed_s()):
            if fault.kind is kind:
                return fault
        return None

    def _request_faults(self) -> list[Fault]:
        """Faults hitting one new request: scheduled ones now active, and random draws."""
        hit = self.plan.scheduled_at(self.elapsed_s())
        for fault in self.plan.faults:
            if fault.probability is not None and self._rng.random() < fault.probability:
                hit.append(fault)
        return hit

    def _injected_error(self, fault: Fault, what: str = "engine") -> EngineError:
        self.stats_injected.count(FaultKind.ERROR)
        status = int(fault.arg)
        return EngineError(
            f"{what} answered HTTP {status} (injected)", instance_id=self.instance_id,
            status=status, retryable=True,
        )  # fmt: skip

    def _crash_error(self, *, retryable: bool = True) -> EngineConnectionError:
        self.stats_injected.count(FaultKind.CRASH)
        return InjectedCrash(
            "connection refused (injected crash)", instance_id=self.instance_id,
            retryable=retryable,
        )  # fmt: skip

    # -- EngineClient ----------------------------------------------------------------------

    async def generate(self, req: EngineRequest) -> AsyncIterator[Chunk]:
        """The wrapped engine's stream with this request's faults applied."""
        faults = {f.kind: f for f in self._request_faults()}
        if FaultKind.CRASH in faults:
            raise self._crash_error()
        if (err := faults.get(FaultKind.ERROR)) is not None:
            raise self._injected_error(err)
        hang = faults.get(FaultKind.HANG)
        slow = faults.get(FaultKind.SLOW)
        cut = faults.get(FaultKind.TRUNCATE) or faults.get(FaultKind.MALFORMED)
        n = 0
        it = aiter(self.inner.generate(req))
        if slow is not None:
            self.stats_injected.count(FaultKind.SLOW)
            it = _stretched(it, slow.arg, self.clock)
        scheduled_hangs = any(f.kind is FaultKind.HANG and f.scheduled for f in self.plan.faults)
        waited: list[Fault] = []  # the scheduled hangs this stream has waited out
        try:
            while True:
                if hang is None and scheduled_hangs:  # one that began while it streamed
                    live = self._scheduled(FaultKind.HANG)  # freezes it too, as an engine
                    if live is not None and not any(live is w for w in waited):  # that hangs
                        hang = live
                if hang is not None and n >= int(hang.arg):
                    self.stats_injected.count(FaultKind.HANG)
                    wait = hang.remaining_s(self.elapsed_s()) if hang.scheduled else None
                    await self._hang(_HANG_FOREVER_S if wait is None else wait)
                    waited.append(hang)
                    hang = None
                if cut is not None and n >= int(cut.arg):
                    self.stats_injected.count(cut.kind)
                    if cut.kind is FaultKind.TRUNCATE:
                        return  # ends without a finish reason
                    raise EngineStreamError(
                        "malformed chunk in the engine stream (injected)",
                        instance_id=self.instance_id, retryable=n == 0,
                    )  # fmt: skip
                try:
                    chunk = await anext(it)
                except StopAsyncIteration:
                    return
                if self._scheduled(FaultKind.CRASH) is not None:
                    raise self._crash_error(retryable=n == 0)
                n += 1
                yield chunk
        finally:
            close = getattr(it, "aclose", None)
            if close is not None:
                await close()

    async def _hang(self, seconds: float) -> None:
        """Hang for ``seconds``, or until the engine is closed: then its streams end as a
        closing engine's do (it had kept a server's shutdown waiting out its timeout)."""
        sleeping = asyncio.ensure_future(self.clock.sleep(seconds))
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((sleeping, closing), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            closing.cancel()
        if self._closed.is_set():
            raise EngineConnectionError(
                "engine closed", instance_id=self.instance_id, retryable=False
            )

    async def prefill(self, req: EngineRequest) -> KVHandle:
        faults = {f.kind: f for f in self._request_faults()}
        if FaultKind.CRASH in faults:
            raise self._crash_error()
        if (err := faults.get(FaultKind.ERROR)) is not None:
            raise self._injected_error(err, "prefill leg")
        return await self.inner.prefill(req)

    def queue_time_s(self, request_id: str) -> float | None:
        """The wrapped engine's queue time of a finished request (None when it keeps none)."""
        inner = self.inner
        return inner.queue_time_s(request_id) if isinstance(inner, ReportsQueueTime) else None

    def stop_reason(self, request_id: str) -> str | int | None:
        """The stop string that ended a finished request on the wrapped engine, if any."""
        inner = self.inner
        return inner.stop_reason(request_id) if isinstance(inner, ReportsStopReason) else None

    async def health(self) -> bool:
        if self._scheduled(FaultKind.CRASH) is not None:
            raise self._crash_error()
        if (hang := self._scheduled(FaultKind.HANG)) is not None:
            try:
                await self._hang(hang.remaining_s(self.elapsed_s()))
            except EngineConnectionError:  # closed while it hung
                return False
        if self._scheduled(FaultKind.ERROR) is not None:
            return False
        return await self.inner.health()

    async def stats(self) -> EngineStats:
        if self._scheduled(FaultKind.CRASH) is not None:
            raise self._crash_error()
        return await self.inner.stats()

    async def context_length(self) -> int | None:
        """The wrapped engine's (None when it does not say)."""
        inner = self.inner
        return await inner.context_length() if isinstance(inner, ReportsContextLength) else None

    async def load_lora_adapter(self, name: str, path: str) -> None:
        if not isinstance(self.inner, LoadsAdapters):
            raise EngineError(f"{self.instance_id}: cannot load LoRA adapters at run time")
        await self.inner.load_lora_adapter(name, path)

    async def unload_lora_adapter(self, name: str) -> None:
        if not isinstance(self.inner, LoadsAdapters):
            raise EngineError(f"{self.instance_id}: cannot unload LoRA adapters at run time")
        await self.inner.unload_lora_adapter(name)

    async def lora_adapters(self) -> list[str] | None:
        """The wrapped engine's (None when it does not say)."""
        inner = self.inner
        return await inner.lora_adapters() if isinstance(inner, ReportsAdapters) else None

    async def aclose(self) -> None:
        self._closed.set()
        if self._exit_timer is not None:
            self._exit_timer.cancel()
        await self.inner.aclose()


async def _stretched(it: AsyncIterator[Chunk], factor: float, clock: Clock) -> AsyncIterator[Chunk]:
    """``it``'s chunks, each released ``factor`` times later (from the start) than the engine
    produced it: a reader task timestamps them as they come."""
    start = clock.now()
    queue: asyncio.Queue[tuple[float, Chunk] | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in it:
                queue.put_nowait((clock.now(), chunk))
            queue.put_nowait(None)
        except Exception as exc:  # handed to the reader
            queue.put_nowait(exc)

    task = asyncio.create_task(pump())
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            at, chunk = item
            await clock.sleep(start + factor * (at - start) - clock.now())
            yield chunk
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        close = getattr(it, "aclose", None)
        if close is not None:
            await close()
