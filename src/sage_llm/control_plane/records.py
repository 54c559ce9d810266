"""Per-request bookkeeping: status, timings, output, and bounded retention of finished ones."""

from __future__ import annotations

import asyncio
import copy
import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from sage_llm.control_plane.snapshot import RequestInfo
from sage_llm.engines.base import Chunk, EngineRequest
from sage_llm.errors import EngineError, SageLLMError
from sage_llm.types import (
    ChoiceResult,
    ExecutionInstance,
    RequestMetadata,
    RequestResult,
    RequestStatus,
)


class StreamEnd:
    """Sentinel put on a stream queue when the request ended (result is on the record)."""


STREAM_END = StreamEnd()


class ChunkChannel:
    """A request's chunks on their way to the one task relaying them: appended by the
    dispatcher, taken all at once by the reader (``asyncio.Queue`` without its per-item
    getter bookkeeping: one wake-up per batch, not per chunk)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Chunk | StreamEnd] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Chunk | StreamEnd) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def take(self) -> list[Chunk | StreamEnd]:
        """Everything put since the last take (at least one item), in order."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None
        items, self._items = self._items, []
        return items


class ChoiceOutput(Protocol):
    """Where one choice's output is gathered: a :class:`RequestRecord` (its choice 0) or
    a :class:`ChoiceParts`."""

    text_parts: list[str]
    token_ids: list[int]
    logprobs: list[object]
    finish_reason: str | None


def add_output(into: ChoiceOutput, chunk: Chunk) -> None:
    """Add ``chunk``'s text, token ids, logprobs and finish reason to a choice's output."""
    if chunk.text:
        into.text_parts.append(chunk.text)
    if chunk.token_ids:
        into.token_ids.extend(chunk.token_ids)
    if chunk.logprobs is not None:
        into.logprobs.append(chunk.logprobs)
    if chunk.finish_reason is not None:
        into.finish_reason = chunk.finish_reason


class ChoiceParts:
    """The output of one more sample of a request for several (``n`` > 1), as its chunks
    come (:attr:`RequestRecord.other_choices`)."""

    __slots__ = ("finish_reason", "logprobs", "text_parts", "token_ids")

    def __init__(self) -> None:
        self.text_parts: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[object] = []
        self.finish_reason: str | None = None


def choice_parts(by_index: dict[int, ChoiceParts], index: int) -> ChoiceParts:
    """Where choice ``index``'s output is gathered in ``by_index`` (made when first asked)."""
    parts = by_index.get(index)
    if parts is None:
        parts = by_index[index] = ChoiceParts()
    return parts


def choice_result(output: ChoiceOutput, index: int) -> ChoiceResult:
    """Choice ``index`` of a result, from the output gathered for it."""
    return ChoiceResult(
        index, "".join(output.text_parts), output.finish_reason,
        list(output.token_ids) or None, list(output.logprobs) or None,
    )  # fmt: skip


@dataclass(slots=True)
class RequestRecord:
    """Everything the control plane tracks about one accepted request (slotted: one is
    made per request, and its fields are read and written all along the request's way)."""

    meta: RequestMetadata
    info: RequestInfo
    engine_request: EngineRequest
    future: asyncio.Future[RequestResult]
    status: RequestStatus = RequestStatus.QUEUED
    stream: ChunkChannel | None = None
    relayed: bool = False
    """Whether a consumer takes the chunks as they come (a stream): its output, once there
    is some, has been seen, and the request is not retried elsewhere after it."""
    chunks: list[Chunk] | None = None
    """The engine's chunks, kept for :meth:`ControlPlaneManager.collect` (no queue, no
    wake-up per chunk)."""
    waiter: asyncio.Future[RequestResult] | None = None
    """Set with the result at the end, like ``future``: the one :meth:`ControlPlaneManager.collect`
    awaits (its own, so cancelling the caller touches no other waiter)."""
    task: asyncio.Task[None] | None = None
    instance_id: str | None = None
    prefill_instance_id: str | None = None
    attempts: int = 0
    kept_off: frozenset[str] = frozenset()
    """Instances in ``info.excluded_instances`` only because their context cannot hold the
    whole answer (never tried): taken back when no other instance can run it."""
    cancel_requested: bool = False
    cancel_reason: str | None = None
    """Why it is cancelled, when not by its caller (a time limit that passed): its error."""
    evicted: EngineError | None = None
    """Why its engine call is being moved off its instance (the instance was ejected while
    the call had delivered nothing): the error it is retried elsewhere with."""
    stranded: tuple[str, int, int] | None = None
    """The instance its call stayed on when that was ejected and could not move, with the
    instance's breaker transitions and the call's :attr:`pieces` then: if the instance
    fails its next trial (ejected again without having closed) and the call has had
    nothing from the engine since, the call fails."""
    pieces: int = 0
    """Chunks its engine calls have yielded, whatever they carried (text, reasoning, tool
    calls, usage): how :meth:`Dispatcher.evict` tells a call that goes on from one that
    stopped."""
    queued_at: float = 0.0
    """When its current (or last) wait in the queue began: its arrival, or a retry's
    requeueing after its backoff."""
    queued_s: float = 0.0
    """The time its ended waits in the queue took (:attr:`queued_at` to being scheduled)."""
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    pending_tokens_at_dispatch: int = 0
    batch_at_start: int = 0
    """Its (decode) instance's in-flight count once it started there, itself included:
    with the count when it ends, the batch its TPOT is learnt for (``observe_tpot``)."""
    predicted_e2e_s: float | None = None
    predicted_prefill_s: float | None = None
    """A disaggregated request's predicted prefill leg (its prefill instance's estimate)."""
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[object] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int | None = 0
    finish_reason: str | None = None
    other_choices: dict[int, ChoiceParts] | None = None
    """The output of the samples after the first of a request for several (``n`` > 1),
    by index (the fields above hold choice 0's)."""
    error: str | None = None
    exception: BaseException | None = None
    """The engine error that failed the request (re-raised by ``stream``)."""
    result: RequestResult | None = None

    @property
    def adapter(self) -> str | None:
        """The LoRA adapter the request is for (the engine is asked for it by name, not
        for its model); None for the model itself."""
        named = self.engine_request.model
        return None if named == self.info.model else named

    @property
    def request_id(self) -> str:
        return self.info.request_id

    @property
    def produced_output(self) -> bool:
        return self.first_token_at is not None

    @property
    def delivered(self) -> bool:
        """Whether some of its output has reached its consumer (a stream's chunks); a whole
        answer is delivered only at its end, so a failure before that may be retried."""
        return self.relayed and self.first_token_at is not None

    def discard_output(self) -> None:
        """Forget the output of an engine call that failed before its consumer saw any
        (it is retried elsewhere from the start)."""
        self.first_token_at = None
        self.text_parts.clear()
        self.token_ids.clear()
        self.logprobs.clear()
        self.completion_tokens = self.prompt_tokens = self.cached_tokens = 0
        self.finish_reason = None
        self.other_choices = None
        if self.chunks is not None:
            self.chunks.clear()

    def queue_wait_s(self, now: float) -> float:
        """The time it has waited in the queue by ``now``: its ended waits, and the one going
        on while it is queued (not its time on an engine that failed it, nor a backoff)."""
        waited = self.queued_s
        if self.status is RequestStatus.QUEUED:
            waited += max(0.0, now - self.queued_at)
        return waited


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request ran, as the instances were when it did (kept with its result, so
    that its scheduling decision reads the same after the fleet changes)."""

    instance: ExecutionInstance
    prefill_instance: ExecutionInstance | None = None
    predicted_prefill_s: float | None = None


Placed = ExecutionInstance | Placement | None
"""Where a finished request ran: its instance, a :class:`Placement` when it was
disaggregated, None when it never ran."""


class FinishedRecords:
    """Finished results kept for ``get_request_status``/``wait_for_result``: at most
    ``capacity`` of them, each for at most ``ttl_s`` seconds."""

    def __init__(self, capacity: int = 2_000, ttl_s: float = 600.0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._items: OrderedDict[str, tuple[float, RequestResult, Placed]] = OrderedDict()
        self._failures: dict[str, SageLLMError] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._items

    def add(
        self,
        result: RequestResult,
        now: float,
        placement: Placed = None,
        failure: SageLLMError | None = None,
    ) -> None:
        """Keep ``result``, finished at ``now``, with where it ran (:data:`Placed`) and,
        for a failed request, the error its waiters raise (one never raised: it holds no
        traceback, and so no frames)."""
        rid = result.request_id
        self._items[rid] = (now, result, placement)
        self._items.move_to_end(rid)
        if failure is not None:
            self._failures[rid] = failure
        else:
            self._failures.pop(rid, None)
        self.expire(now)

    def failure(self, request_id: str) -> SageLLMError | None:
        """A fresh copy of the error a kept failed request raises (None: it did not fail,
        or is no longer kept)."""
        kept = self._failures.get(request_id)
        return None if kept is None else copy.copy(kept)

    def get(self, request_id: str, now: float) -> RequestResult | None:
        item = self.get_timed(request_id, now)
        return item[1] if item else None

    def get_timed(self, request_id: str, now: float) -> tuple[float, RequestResult, Placed] | None:
        """``(when it finished, result, where it was placed)``, or None."""
        self.expire(now)
        return self._items.get(request_id)

    def expire(self, now: float) -> None:
        failures = self._failures
        while len(self._items) > self._capacity:
            failures.pop(self._items.popitem(last=False)[0], None)
        while self._items:
            first_key = next(iter(self._items))
            if now - self._items[first_key][0] <= self._ttl_s:
                break
            del self._items[first_key]
            failures.pop(first_key, None)


def _digest(key: str) -> str:
    """A fixed-size stand-in for a long key (32 hex digits: its 128-bit BLAKE2b digest)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class LastInstances:
    """The instance that last completed a request of each session (``session_id``, else
    ``user_id``): the previous instance of a session's next request, which
    ``topology_aware`` routes close to. At most ``capacity`` sessions, the least recently
    served forgotten first. A key longer than :data:`LONG_KEY` characters, or not ASCII,
    is kept as a digest of itself (32 ASCII characters), so that the map's memory is
    bounded whatever clients send as their session or user id (up to the body's size)."""

    LONG_KEY = 64

    def __init__(self, capacity: int = 65_536) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._items: OrderedDict[str, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> str | None:
        if len(key) > self.LONG_KEY or not key.isascii():
            key = _digest(key)
        return self._items.get(key)

    def note(self, key: str, instance_id: str) -> None:
        if len(key) > self.LONG_KEY or not key.isascii():
            key = _digest(key)
        items = self._items
        items[key] = instance_id
        items.move_to_end(key)
        if len(items) > self._capacity:
            items.popitem(last=False)
