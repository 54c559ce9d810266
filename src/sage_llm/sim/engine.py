"""The simulated engine as an :class:`~sage_llm.engines.base.EngineClient`.

:class:`SimEngine` wraps a :class:`~sage_llm.sim.core.SimEngineCore` with one background
step loop per engine (started lazily inside the running event loop, stopped by
:meth:`SimEngine.aclose`): while there is work it runs a step, sleeps for the step's
duration, then hands the new tokens to the per-request streams. Under
:func:`sage_llm.sim.clock.run_virtual` the sleeps cost no real time.

A :class:`~sage_llm.sim.costmodel.FrontEndModel` (``front_end=``) puts a single-server
front end in front of the core, as vLLM's API server is: a new request spends ``intake_s``
there before the core sees it, and each step's outputs spend ``per_output_s`` per request
there before the streams get them; the jobs are served one at a time in arrival order
(:class:`~sage_llm.sim.costmodel.FrontEndQueue`), so under load intakes wait behind output
processing. The core does not wait for the front end. Without one (the default) requests
reach the core at once and tokens are handed out as each step ends. A front end with
``shared_step_s`` also shares its CPU core with the last ``shared_step_s`` of every step
(vLLM's CPU build runs the API server and the engine-core process on one core): a
:class:`SharedCore` serves both by processor sharing, so while the front end is busy that
part of the step runs at half speed, and the front end's job too.

Generated text is deterministic pseudo-text (:mod:`sage_llm.sim.text`): each word is one
token, so the text re-tokenizes to ``completion_tokens``. A request that asks for logprobs
(``logprobs``, chat's ``top_logprobs``) gets them on its chunks, in vLLM's shapes
(:mod:`sage_llm.sim.logprobs`).

What the engine server asks about a finished request, :meth:`SimEngine.queue_time_s` and
:meth:`SimEngine.stop_reason`, is kept for the last :data:`FINISHED_KEPT` requests:
the seconds from its arrival at the core to its first scheduling into a batch (as vLLM's
``vllm:request_queue_time_seconds`` measures it), and the stop string that ended it.

PD: :meth:`SimEngine.prefill` runs a prefill leg and returns vLLM-shaped
``kv_transfer_params``; ``generate`` with ``kv_transfer_params.do_remote_prefill`` runs the
decode leg (KV transfer time, then decode). Engines sharing a :class:`KVTransferHub` release
the prefill side's pinned blocks when the decode side has pulled them, as vLLM's NIXL
connector does. Engines in other processes are told over HTTP: a decode leg whose
``kv_transfer_params`` name ``remote_host``/``remote_port`` hands the pulled request to the
engine's :class:`RemoteKVReleaser` (the engine server installs one that posts to the prefill
server's ``/sim/kv/release``), the HTTP analogue of NIXL notifying the producer. Without
either, pinned blocks are released after ``kv_pin_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from sage_llm.asyncmerge import merge_streams
from sage_llm.config_fields import beyond_int64
from sage_llm.engines.base import (
    Chunk,
    EngineRequest,
    EngineStats,
    KVHandle,
    Usage,
    asks_prompt_logprobs,
)
from sage_llm.errors import (
    ConfigError,
    EngineConnectionError,
    EngineError,
    EngineRequestRejectedError,
    InvalidRequestError,
)
from sage_llm.jsonutil import whole
from sage_llm.sim.clock import Clock, current_clock
from sage_llm.sim.core import (
    PinnedKV,
    SimEngineConfig,
    SimEngineCore,
    StepResult,
    default_max_model_len,
    prompt_block_hashes,
    stats_while_stepping,
)
from sage_llm.sim.costmodel import FrontEndModel, FrontEndQueue
from sage_llm.sim.logprobs import (
    PseudoLogprobs,
    echo_logprobs,
    prompt_logprobs,
    requested_logprobs,
    requested_prompt_logprobs,
)
from sage_llm.sim.server_requests import (
    check_stop,
    checked_samples,
    context_max_tokens,
    continuous_usage,
    echo_only,
    engine_default_max_tokens,
    prompt_pieces,
    prompt_token_ids,
    request_flag,
    requested_echo,
    running_usage,
    truncated_request,
)
from sage_llm.sim.text import PseudoText
from sage_llm.tokens import ADAPTER_SALT, salted_hashes
from sage_llm.types import ExecutionInstanceType

log = logging.getLogger("sage_llm.sim.engine")

__all__ = [
    "FINISHED_KEPT",
    "KVTransferHub",
    "RemoteKVReleaser",
    "SharedCore",
    "SharedJob",
    "SimEngine",
    "SimEngineConfig",
]


FINISHED_KEPT = 4096
"""Finished requests whose queue time and stop reason an engine keeps (the oldest go)."""


class RemoteKVReleaser(Protocol):
    """Tells a prefill engine in another process that its pinned KV was pulled.

    ``release`` must not block: it schedules the notification and returns.
    """

    def release(self, host: str, port: int, request_id: str) -> None: ...


class KVTransferHub:
    """Links the simulated engines of one process for PD KV hand-off.

    A decode leg that finished pulling KV from ``remote_engine_id`` tells that engine to
    unpin the blocks. Engines register themselves when given a hub.
    """

    def __init__(self) -> None:
        self._engines: dict[str, SimEngine] = {}

    def register(self, engine: SimEngine) -> None:
        self._engines[engine.instance_id] = engine

    def unregister(self, instance_id: str) -> None:
        self._engines.pop(instance_id, None)

    def release(self, engine_id: str | None, request_id: str) -> bool:
        """Unpin ``request_id``'s KV on ``engine_id``; False if unknown there."""
        engine = self._engines.get(engine_id) if engine_id is not None else None
        return engine.release_kv(request_id) if engine is not None else False


class SharedJob:
    """A piece of work on a :class:`SharedCore`: ``cost`` seconds at full speed; ``start``
    (when it began being served) and ``end`` (when it ends at the present speeds) are
    settled once ``done``."""

    __slots__ = ("cost", "done", "end", "start")

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.start = math.inf
        self.end = math.inf
        self.done = False


class SharedCore:
    """The CPU core that the front end shares with the end of every engine step.

    Two parties use it: the front end, whose jobs (intakes, step outputs) are served one
    at a time in arrival order, and the engine core's shared part of each step
    (:attr:`FrontEndModel.shared_step_s`: output handling and scheduling in vLLM's
    engine-core process). The core is shared by processor sharing: while both have work,
    each progresses at half speed; alone, at full speed. Without shared step parts it is
    exactly a :class:`~sage_llm.sim.costmodel.FrontEndQueue` (same arithmetic).

    Event-driven use: :meth:`advance` to ``now`` (it returns the jobs done by then, in the
    order they finished), submit jobs at ``now``, and come back at :meth:`next_change`.
    """

    __slots__ = ("_front", "_step", "_t", "model")

    def __init__(self, model: FrontEndModel) -> None:
        self.model = model
        self._front: deque[SharedJob] = deque()
        self._step: SharedJob | None = None
        self._t = -math.inf

    def _rate(self) -> float:
        return 0.5 if self._front and self._step is not None else 1.0

    def next_change(self) -> float:
        """When the next job ends if nothing new arrives (``inf`` when idle)."""
        end = self._front[0].end if self._front else math.inf
        return min(end, self._step.end) if self._step is not None else end

    def advance(self, now: float) -> list[SharedJob]:
        """Serve the jobs up to ``now``; the ones that ended (in the order they ended)."""
        done: list[SharedJob] = []
        while (at := self.next_change()) <= now:
            old = self._rate()
            head = self._front[0] if self._front else None
            step = self._step
            ended_head = head is not None and head.end <= at
            ended_step = step is not None and step.end <= at
            if ended_head and head is not None:
                self._front.popleft()
                head.done = True
                done.append(head)
            if ended_step and step is not None:
                self._step = None
                step.done = True
                done.append(step)
            new = self._rate()
            if new != old:  # the survivor now has the core to itself
                for job in (head, step):
                    if job is not None and not job.done:
                        job.end = at + (job.end - at) * old / new
            if ended_head and self._front:
                nxt = self._front[0]
                nxt.start = at
                nxt.end = at + nxt.cost / new
        self._t = max(self._t, now)
        return done

    def _join(self, now: float, job: SharedJob, front: bool) -> None:
        old = self._rate()
        if front:
            self._front.append(job)
        else:
            self._step = job
        new = self._rate()
        if new != old:  # the one already running slows down
            other = self._step if front else (self._front[0] if self._front else None)
            if other is not None and other is not job:
                other.end = now + (other.end - now) * old / new
        job.start = now
        job.end = now + job.cost / new

    def submit(self, now: float, cost: float) -> SharedJob:
        """Queue a front-end job of ``cost`` seconds at ``now`` (advance to ``now`` first)."""
        now = max(now, self._t)
        job = SharedJob(cost)
        if self._front:
            self._front.append(job)
        else:
            self._join(now, job, front=True)
        return job

    def intake(self, now: float) -> SharedJob:
        """Queue a new request's intake."""
        return self.submit(now, self.model.intake_s)

    def outputs(self, now: float, outputs: int) -> SharedJob:
        """Queue the processing of one step's ``outputs``."""
        return self.submit(now, self.model.outputs_s(outputs))

    def step_part(self, now: float, cost: float) -> SharedJob:
        """Start the shared part of an engine step (steps never overlap)."""
        if self._step is not None:
            raise RuntimeError("a step's shared part is already running")
        job = SharedJob(cost)
        self._join(max(now, self._t), job, front=False)
        return job

    def shared_part_s(self, duration_s: float) -> float:
        """The part of a step of ``duration_s`` that runs on the shared core."""
        return min(self.model.shared_step_s, duration_s)


class _Delivery:
    __slots__ = ("finish", "n", "pinned")

    def __init__(self, n: int, finish: str | None, pinned: PinnedKV | None) -> None:
        self.n = n
        self.finish = finish
        self.pinned = pinned


class _Stream:
    __slots__ = ("arrival", "cached", "emitted", "epoch", "queue", "queue_s", "text")

    def __init__(self, text_key: str, arrival: float, epoch: int) -> None:
        self.epoch = epoch
        """Its place among the engine's opened streams: a step's tokens go to the stream
        that was open under their request id when the step was computed, not to a later
        one under the same id (a request id used again after its call was ended)."""
        self.queue: asyncio.Queue[_Delivery | EngineError] = asyncio.Queue()
        self.emitted = 0
        """Tokens its steps have handed out (queued for the reader): those vLLM's output
        processor has counted; an abort drops only those of a step still running."""
        self.text = PseudoText(text_key)
        self.cached = 0
        self.arrival = arrival
        self.queue_s: float | None = None
        """Seconds from ``arrival`` to the request's first scheduling, once scheduled."""


class SimEngine:
    """An in-process simulated engine instance implementing ``EngineClient``."""

    def __init__(
        self,
        instance_id: str,
        config: SimEngineConfig | None = None,
        *,
        clock: Clock | None = None,
        kv_hub: KVTransferHub | None = None,
        front_end: FrontEndModel | None = None,
        max_model_len_given: bool | None = None,
        lora_adapters: Iterable[str] = (),
    ) -> None:
        """``max_model_len_given``: whether ``config.max_model_len`` was asked for (then one
        above what the KV cache holds is refused, as vLLM refuses it) or is the model's
        context by default (then the engine serves what the cache holds); None: given
        unless it is the model's context. ``lora_adapters``: the LoRA adapters it serves
        (as its model, but a request for one shares cached blocks only with the same
        adapter's, as vLLM hashes them; the core bounds the adapters of a batch by
        ``config.max_loras`` and charges their cost, see :mod:`sage_llm.sim.core`)."""
        self._id = instance_id
        self.served_adapters = set(lora_adapters)
        # the front end's work runs on the engine's time scale too (speed, at the start)
        self._front_end = (front_end or FrontEndModel()).at_speed(
            1.0 if config is None else config.speed
        )
        self._front: FrontEndQueue | None = (
            None if self._front_end.is_zero else FrontEndQueue(self._front_end)
        )
        # with shared step parts the front end and the core share one timeline instead
        self._shared: SharedCore | None = None
        if self._front is not None and self._front_end.shared_step_s > 0:
            self._front, self._shared = None, SharedCore(self._front_end)
        # what to do when a shared-core job ends: wake its waiter, or deliver a step's tokens
        self._shared_jobs: dict[SharedJob, asyncio.Future[None] | StepResult] = {}
        self._shared_changed: asyncio.Event | None = None
        self._shared_task: asyncio.Task[None] | None = None
        # step results waiting for the front end: (time their processing ends, result)
        self._outbox: deque[tuple[float, StepResult]] = deque()
        self._outbox_ready: asyncio.Event | None = None
        self._delivery: asyncio.Task[None] | None = None
        config = config or SimEngineConfig()
        self._core = SimEngineCore(config)
        self._core.lora_enabled = bool(self.served_adapters)
        held = self._core.num_gpu_blocks * config.block_size
        if config.max_model_len > held:
            given = max_model_len_given
            if given is None:
                given = config.max_model_len != default_max_model_len(config.model)
            if given:
                raise ConfigError(  # a length given: refused, as vLLM refuses it
                    f"{config.max_model_len} is above what the KV cache holds ({held} "
                    "tokens): vLLM refuses to start so; give at most that, or more KV cache",
                    key="max_model_len",
                )
            # the model's context by default: vLLM refuses that too; this engine serves what
            # its cache holds
            log.warning(
                "%s: max_model_len %d is above what its KV cache holds (%d tokens), which "
                "vLLM refuses at start-up: serving %d (give max_model_len, or more memory)",
                instance_id, config.max_model_len, held, held,
            )  # fmt: skip
            config = replace(config, max_model_len=held)
        self._config = config
        self._clock = clock
        self._hub = kv_hub
        self._streams: dict[str, _Stream] = {}
        self._opened = 0
        """Streams opened so far (the last one's :attr:`_Stream.epoch`)."""
        self._step_epochs: dict[int, dict[str, int]] = {}
        """For each computed step not delivered yet (by ``id``), the epoch of the stream
        each of its tokens is for."""
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._broken: BaseException | None = None
        self._stepping: StepResult | None = None
        """The step under way (between the core applying it and its end), for stats."""
        self._releaser: RemoteKVReleaser | None = None
        # (remote engine id, remote request id) -> (host, port), and local id -> that key
        self._remote_addr: dict[tuple[str | None, str], tuple[str, int]] = {}
        self._remote_key: dict[str, tuple[str | None, str]] = {}
        # (queue time, stop string) of the last FINISHED_KEPT finished requests
        self._finished: dict[str, tuple[float | None, str | int | None]] = {}
        if kv_hub is not None:
            kv_hub.register(self)

    @property
    def instance_id(self) -> str:
        return self._id

    @property
    def config(self) -> SimEngineConfig:
        return self._config

    async def context_length(self) -> int | None:
        """The simulated model's ``max_model_len``."""
        return self._config.max_model_len

    @property
    def front_end(self) -> FrontEndModel:
        """The front end in front of the core (all zero when there is none)."""
        return self._front_end

    @property
    def core(self) -> SimEngineCore:
        """The synchronous core (for inspection; do not step it while the loop runs)."""
        return self._core

    @property
    def speed(self) -> float:
        """Time scale (2.0 = steps and KV transfers take half as long, and the front end's
        work as configured); may be changed live, which scales the steps and transfers
        from then on (e.g. a straggler), not the front end."""
        return self._core.speed

    @speed.setter
    def speed(self, value: float) -> None:
        if not value > 0:
            raise ConfigError("must be > 0", key="speed")
        self._core.speed = float(value)

    @property
    def remote_releaser(self) -> RemoteKVReleaser | None:
        """Who tells prefill engines in other processes that their KV was pulled."""
        return self._releaser

    @remote_releaser.setter
    def remote_releaser(self, value: RemoteKVReleaser | None) -> None:
        self._releaser = value

    # -- EngineClient ------------------------------------------------------------------

    async def generate(self, req: EngineRequest) -> AsyncGenerator[Chunk, None]:
        """Stream the completion of ``req``; the last chunk has finish_reason and usage.
        With ``n`` > 1 (in ``extra``) the samples run as vLLM runs them, as ``n`` requests
        of their own (``"{i}_{request_id}"``, a request ``seed`` made ``seed + i``), and
        their chunks come as they are made, each with its choice's ``index``; the last
        carries the usage of all of them (the prompt counted once)."""
        check_request_fields(req)
        req = truncated_request(req, self._config.max_model_len)
        prompt_ids = self._prompt_ids(req)
        given = req.send_max_tokens
        if not given:  # left to the engine, as over HTTP (engine-sim's default)
            limit = self._config.max_model_len
            chat = req.messages is not None
            req = req.with_changes(
                max_tokens=engine_default_max_tokens(chat, len(prompt_ids), limit),
                send_max_tokens=True,
            )
        prompt_only = echo_only(req)  # runs one token, left out of the answer
        req = self._within_context(req, len(prompt_ids), given=given, least=int(not prompt_only))
        if prompt_only:
            req = req.with_changes(max_tokens=1)
        check_sampling(req.extra, self._core.model.vocab_size)
        plan = _Sampling(
            prompt_ids=prompt_ids,
            prompt_only=prompt_only,
            keep_stop=req.extra.get("include_stop_str_in_output") is True,
            min_tokens=min_tokens_of(req),
            stop_ids=self._stop_token_ids(req),
            top=requested_logprobs(req),
            echo=requested_echo(req),
            prompt_top=requested_prompt_logprobs(req.extra, stream=False),
            return_ids=request_flag(req.extra, "return_token_ids"),
            continuous=continuous_usage(req.extra),  # the usage so far on every chunk
            whole_prompt=asks_prompt_logprobs(req),
            salt=self._salt(req),
            lora=self._adapter(req),
        )
        samples = self._samples(req)
        await self._intake()
        # closed with this stream (its client went away): the sequences abort at once
        sequences = (
            self._sequence(req, plan) if samples == 1 else self._parallel(req, plan, samples)
        )
        async with contextlib.aclosing(sequences):
            async for chunk in sequences:
                yield chunk

    async def _parallel(
        self, req: EngineRequest, plan: _Sampling, n: int
    ) -> AsyncGenerator[Chunk, None]:
        """``n`` samples of ``req`` as ``n`` requests of their own (vLLM's parallel
        sampling), their chunks merged as they come (see :meth:`generate`;
        :func:`~sage_llm.asyncmerge.merge_streams`). A failed sample fails the whole
        request; closing the stream aborts every sample."""
        extra = {k: v for k, v in req.extra.items() if k != "n"}
        seed = whole(extra.get("seed"))
        children = [
            req.with_changes(
                request_id=f"{i}_{req.request_id}",
                extra=extra if seed is None else {**extra, "seed": seed + i},
            )
            for i in range(n)
        ]
        chat = req.api == "chat"
        produced = [0] * n
        prompt = len(plan.prompt_ids)
        cached = 0
        finals = 0
        yielded = False
        merged = merge_streams([self._sequence(child, plan) for child in children])
        try:
            async with contextlib.aclosing(merged):
                async for index, chunk in merged:
                    yielded = True
                    top = chunk.top
                    if top and index and chat:  # the answer's own fields: said by sample 0
                        top = {k: v for k, v in top.items() if k not in _ANSWER_FIELDS} or None
                    if chunk.usage is not None:  # the sample's last chunk: its own usage
                        produced[index] = chunk.usage.completion_tokens
                        cached = max(cached, chunk.usage.cached_tokens or 0)
                        finals += 1
                    elif plan.continuous and top and "usage" in top:
                        produced[index] = top["usage"]["completion_tokens"]
                    if plan.continuous:  # the usage so far: of every sample
                        top = {**(top or {}), "usage": running_usage(prompt, sum(produced))}
                    usage = (
                        Usage(prompt, sum(produced), cached)
                        if finals == n and chunk.usage
                        else None
                    )
                    yield Chunk(
                        chunk.text, chunk.token_ids, chunk.finish_reason, usage, chunk.logprobs,
                        index, chunk.fields, chunk.extras, top,
                    )  # fmt: skip
        except EngineError as exc:  # a sample's failure fails the request
            if yielded:  # output went out: not retried (as one sequence's, above)
                exc.retryable = False
            raise
        kept = self._finished.get(children[0].request_id)
        if kept is not None:  # asked of the request by its id (engine-sim's metrics)
            self._note_finished(req.request_id, *kept)

    async def _sequence(self, req: EngineRequest, plan: _Sampling) -> AsyncGenerator[Chunk, None]:
        """One sequence of ``req`` (checked and taken in by :meth:`generate`): its chunks,
        the last with its finish reason and usage."""
        prompt_ids, prompt_only, top, echo = plan.prompt_ids, plan.prompt_only, plan.top, plan.echo
        keep_stop, min_tokens, stop_ids = plan.keep_stop, plan.min_tokens, plan.stop_ids
        continuous = plan.continuous
        lead = _PromptLead(req, echo, top, plan.prompt_top, prompt_ids if plan.return_ids else None)
        stream = self._open(
            req.request_id, prompt_ids, req.max_tokens, req.kv_transfer_params,
            text_key(req, prompt_ids, self._config.seed), read_cache=not plan.whole_prompt,
            salt=plan.salt, lora=plan.lora, priority=req.priority,
        )  # fmt: skip
        logprobs = None
        if top is not None:
            logprobs = PseudoLogprobs(
                top, chat=req.api == "chat", seed=self._config.seed, request_id=req.request_id,
                offset=len(echo or ""), greedy=req.temperature == 0,
            )  # fmt: skip
        produced = 0
        done = False
        # As vLLM's detokenizer: the text made so far, and how much of it went out. With
        # stop strings the last (longest stop - 1) characters are held back, so that a stop
        # string spanning tokens never reaches the client (nor does it with
        # include_stop_str_in_output, which holds nothing back and keeps the string).
        full = ""
        sent = 0
        hold = max((len(x) for x in req.stop or () if x), default=1) - 1 if not keep_stop else 0
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, EngineError):
                    item.retryable = produced == 0
                    raise item
                pieces = stream.text.next_pieces(item.n)
                stop_id = None
                if stop_ids:  # the first stop token after min_tokens others ends it (vLLM
                    # masks stop tokens while fewer than min_tokens have been generated)
                    for k, tid in enumerate(PseudoText.token_ids(pieces)):
                        if tid in stop_ids and produced + k >= min_tokens:
                            pieces, stop_id = pieces[: k + 1], tid
                            break
                ids = PseudoText.token_ids(pieces)
                lp = None if logprobs is None else logprobs.next(pieces)
                produced += len(pieces)
                finish = item.finish
                stop: str | int | None = None
                before = len(full)
                # a stop token's own text is left out, as vLLM v1 leaves it out (unless
                # include_stop_str_in_output)
                full += "".join(pieces[:-1] if stop_id is not None and not keep_stop else pieces)
                end = len(full) if finish is not None or stop_id is not None else len(full) - hold
                if req.stop and produced > min_tokens:  # as vLLM's detokenizer checks them
                    hit = _stop_in(full, before, req.stop)
                    if hit is not None:
                        start, stop = hit
                        # include_stop_str_in_output: the stop string stays in the text
                        end, finish = (start + len(stop) if keep_stop else start), "stop"
                        self._stop(req.request_id, produced, stream)
                if stop is None and stop_id is not None:
                    stop, finish = stop_id, "stop"
                    self._stop(req.request_id, produced, stream)
                end = max(end, sent)
                text, sent = full[sent:end], end
                so_far = {"usage": running_usage(len(prompt_ids), produced)} if continuous else None
                if finish is not None:
                    done = True
                    self._note_finished(req.request_id, stream.queue_s, stop)
                    usage = Usage(len(prompt_ids), produced, stream.cached)
                    # vLLM's stop_reason: the stop string or token id that ended it
                    extras = None if stop is None else {"stop_reason": stop}
                    if prompt_only:
                        text, ids, lp = "", (), None
                    yield lead.first(Chunk(text, ids, finish, usage, lp, extras=extras, top=so_far))
                    return
                yield lead.first(Chunk(text, ids, logprobs=lp, top=so_far))
        finally:
            self._close_stream(req.request_id, stream, abort=not done)

    async def prefill(self, req: EngineRequest) -> KVHandle:
        """Run the prefill leg of a PD request: one token, KV pinned for the decode side."""
        if self._config.role is ExecutionInstanceType.DECODING:
            raise EngineError(
                f"instance {self._id} is decode-only and cannot run a prefill leg",
                instance_id=self._id,
                retryable=True,
            )
        # checked as the decode leg will check them (before a chat's cut to its template)
        check_request_fields(req)
        req = truncated_request(req, self._config.max_model_len)
        prompt_ids = self._prompt_ids(req)
        context_max_tokens(self._config.max_model_len, len(prompt_ids), 1, text=is_text(req))
        # the request's fields checked as its decode leg will check them (as vLLM checks
        # the whole request before it runs a leg): refused here, nothing is pinned for it
        check_sampling(req.extra, self._core.model.vocab_size)
        self._stop_token_ids(req)
        requested_logprobs(req)
        requested_prompt_logprobs(req.extra, stream=False)
        await self._intake()
        stream = self._open(
            req.request_id, prompt_ids, 1, {"do_remote_decode": True},
            text_key(req, prompt_ids, self._config.seed), read_cache=not asks_prompt_logprobs(req),
            salt=self._salt(req), lora=self._adapter(req), priority=req.priority,
        )  # fmt: skip
        done = False
        try:
            item = await stream.queue.get()
            if isinstance(item, EngineError):
                raise item
            done = True
        finally:
            self._close_stream(req.request_id, stream, abort=not done)
        self._note_finished(req.request_id, stream.queue_s, None)
        pinned = item.pinned
        if pinned is None:  # pragma: no cover - the core always pins a prefill leg
            raise EngineError("prefill leg finished without KV", instance_id=self._id)
        pieces = stream.text.next_pieces(1)
        usage = Usage(len(prompt_ids), 1, stream.cached)
        first = Chunk("".join(pieces), PseudoText.token_ids(pieces), "length", usage)
        params: dict[str, Any] = {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_engine_id": self._id,
            "remote_block_ids": list(pinned.block_ids),
            "remote_request_id": req.request_id,
            "remote_host": self._config.kv_host,
            "remote_port": self._config.kv_port,
            "tp_size": self._config.tp,
            "num_tokens": pinned.num_tokens,
        }
        return KVHandle(self._id, params, len(prompt_ids), stream.cached, first)

    def release_kv(self, request_id: str) -> bool:
        """Unpin a finished prefill leg's KV blocks (the decode side pulled them)."""
        released = self._core.release_kv(request_id)
        if released and self._wake is not None:
            self._wake.set()
        return released

    def queue_time_s(self, request_id: str) -> float | None:
        """Seconds the finished request ``request_id`` waited from its arrival at the core
        to its first scheduling into a batch (None: not among the last
        :data:`FINISHED_KEPT` finished here)."""
        info = self._finished.get(request_id)
        return None if info is None else info[0]

    def stop_reason(self, request_id: str) -> str | int | None:
        """The stop string or stop token id that ended the finished request ``request_id``
        (None: it ended otherwise, or is not among the last :data:`FINISHED_KEPT` finished
        here)."""
        info = self._finished.get(request_id)
        return None if info is None else info[1]

    async def health(self) -> bool:
        return not self._closed and self._broken is None

    async def stats(self) -> EngineStats:
        """The core's figures as an engine reports them while a step runs
        (:func:`~sage_llm.sim.core.stats_while_stepping`)."""
        return stats_while_stepping(self._core.stats(), self._stepping)

    async def aclose(self) -> None:
        """Stop the step loop; in-flight requests fail with EngineConnectionError."""
        if self._closed:
            return
        self._closed = True
        if self._hub is not None:
            self._hub.unregister(self._id)
        self._fail_all("engine closed")
        for task in (self._task, self._delivery, self._shared_task):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task])
        self._task = self._delivery = self._shared_task = None
        self._outbox.clear()
        for waiter in self._shared_jobs.values():
            if isinstance(waiter, asyncio.Future) and not waiter.done():
                waiter.set_result(None)  # an intake in progress: _open reports the close
        self._shared_jobs.clear()

    # -- internals -----------------------------------------------------------------

    def _prompt_ids(self, req: EngineRequest) -> list[int]:
        if req.messages is not None:
            if not req.messages:
                raise InvalidRequestError("messages must not be empty", param="messages")
            ids, param = prompt_token_ids(req), "messages"
        elif req.prompt is None:
            raise InvalidRequestError("either prompt or messages is required", param="prompt")
        else:
            prompt = req.prompt
            if not isinstance(prompt, str) and not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt
            ):
                raise InvalidRequestError("token ids must be non-negative integers", param="prompt")
            vocab = self._core.model.vocab_size
            if not isinstance(prompt, str) and prompt and (top := max(prompt)) >= vocab:
                raise InvalidRequestError(  # as vLLM refuses it
                    f"Token id {top} is out of vocabulary (the model's {vocab} tokens)",
                    param="prompt",
                )
            ids, param = prompt_token_ids(req), "prompt"
        if not ids:
            raise InvalidRequestError("the prompt is empty", param=param)
        return ids

    def _within_context(
        self, req: EngineRequest, n_prompt: int, *, given: bool, least: int
    ) -> EngineRequest:
        """``req`` with its ``max_tokens`` cut to what the context holds after its prompt,
        or refused, as vLLM 0.32 does (:func:`context_max_tokens`; ``given``: the client
        gave it; ``least``: 0 for an echo of the prompt alone)."""
        if not isinstance(req.max_tokens, int) or req.max_tokens < least:
            raise InvalidRequestError("max_tokens must be an integer >= 1", param="max_tokens")
        limit = self._config.max_model_len
        cut = context_max_tokens(
            limit, n_prompt, req.max_tokens, "max_tokens" if given else None, text=is_text(req)
        )
        return req if cut == req.max_tokens else req.with_changes(max_tokens=cut)

    def _samples(self, req: EngineRequest) -> int:
        """How many samples ``req`` asks for (its ``n``; 1 when it gives none): a whole
        number >= 1, at most the engine's ``max_num_seqs`` (each sample is a sequence of
        its own), and 1 for a PD leg."""
        count = checked_samples(req.extra.get("n"))
        if count == 1:
            return 1
        most = self._config.max_num_seqs
        if count > most:
            raise InvalidRequestError(
                f"n={count} is more than the engine's max_num_seqs ({most}): each sample "
                "runs as a sequence of its own",
                param="n",
            )
        if req.kv_transfer_params:
            raise InvalidRequestError(
                f"the simulated engine's PD decode leg takes one sample's KV (n={count}): "
                "ask for n=1, or run the request on a whole-request instance",
                param="n",
            )
        return count

    async def load_lora_adapter(self, name: str, path: str) -> None:
        """Serve the LoRA adapter ``name`` from now on (``path`` is not read: its blocks
        are kept apart, and it costs what the core charges an adapter), refused as vLLM
        refuses one already loaded."""
        if name in self.served_adapters:
            raise EngineRequestRejectedError(
                f"{self._id}: The lora adapter '{name}' has already been loaded.",
                instance_id=self._id, status=400, param="lora_name",
            )  # fmt: skip
        self.served_adapters.add(name)
        self._core.lora_enabled = True

    async def unload_lora_adapter(self, name: str) -> None:
        """Serve the LoRA adapter ``name`` no more; refused, as vLLM refuses it, when it
        is not served."""
        if name not in self.served_adapters:
            raise EngineRequestRejectedError(
                f"{self._id}: The lora adapter '{name}' cannot be found.",
                instance_id=self._id, status=404, param="lora_name",
            )  # fmt: skip
        self.served_adapters.discard(name)

    def _salt(self, req: EngineRequest) -> str | None:
        """The salt of ``req``'s prompt blocks (:func:`adapter_salt`): its ``cache_salt``
        (checked as vLLM checks it), and its LoRA adapter when it names one served here."""
        return adapter_salt(self._adapter(req), cache_salt(req.extra))

    def _adapter(self, req: EngineRequest) -> str | None:
        """The LoRA adapter ``req`` is for (None: the model)."""
        return req.model if req.model in self.served_adapters else None

    def lora_requests(self) -> tuple[frozenset[str], frozenset[str]]:
        """The LoRA adapters of the running and of the waiting requests
        (:meth:`SimEngineCore.lora_requests`)."""
        return self._core.lora_requests()

    @staticmethod
    def _stop_token_ids(req: EngineRequest) -> frozenset[int]:
        """``stop_token_ids``: token ids that end the answer (with finish reason ``stop``
        and the id as ``stop_reason``; its text left out), as vLLM's."""
        value = req.extra.get("stop_token_ids") or ()
        ids = [whole(t) for t in value] if isinstance(value, list | tuple) else [None]
        if not all(t is not None and t >= 0 for t in ids):
            raise InvalidRequestError(
                "stop_token_ids must be a list of token ids (integers >= 0)",
                param="stop_token_ids",
            )
        return frozenset(t for t in ids if t is not None)

    async def _intake(self) -> None:
        """Wait for the front end to take the request in (at once without a front end)."""
        if self._shared is not None:
            self._ensure_running()
            await self._shared_wait(self._shared.intake)
            return
        if self._front is None:
            return
        self._ensure_running()
        clock = self._clock or current_clock()
        now = clock.now()
        _, done = self._front.intake(now)
        if done > now:
            await clock.sleep(done - now)

    def _open(
        self,
        request_id: str,
        prompt_ids: list[int],
        max_tokens: int,
        kv_transfer: Mapping[str, Any] | None,
        text_key: str,
        *,
        read_cache: bool = True,
        salt: str | None = None,
        lora: str | None = None,
        priority: int = 0,
    ) -> _Stream:
        wake = self._ensure_running()
        now = (self._clock or current_clock()).now()
        old = self._streams.get(request_id)
        if old is not None:  # its caller ended it, and its call has not closed yet
            self._close_stream(request_id, old, abort=True)
            old.queue.put_nowait(
                EngineError(f"request {request_id!r} was sent again", instance_id=self._id)
            )
        core = self._core
        hashes = None  # (the core hashes the prompt itself)
        if salt is not None and core.config.enable_prefix_caching:  # vLLM: no block shared
            hashes = salted_hashes(prompt_block_hashes(prompt_ids, core.block_size), salt)
        core.add_request(
            request_id, prompt_ids, max_tokens, arrival=now, kv_transfer=kv_transfer,
            block_hashes=hashes, read_cache=read_cache, lora=lora, priority=priority,
        )  # fmt: skip
        self._opened += 1
        stream = _Stream(text_key, now, self._opened)
        self._streams[request_id] = stream
        if read_cache and kv_transfer and kv_transfer.get("do_remote_prefill"):
            self._remember_remote(request_id, kv_transfer)
        wake.set()
        return stream

    def _remember_remote(self, request_id: str, kv: Mapping[str, Any]) -> None:
        host, port = kv.get("remote_host"), kv.get("remote_port")
        if not isinstance(host, str) or not host:
            return
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            return
        engine = kv.get("remote_engine_id")
        key = (
            None if engine is None else str(engine),
            str(kv.get("remote_request_id") or request_id),
        )
        self._remote_addr[key] = (host, port)
        self._remote_key[request_id] = key

    def _note_finished(
        self, request_id: str, queue_s: float | None, stop: str | int | None
    ) -> None:
        finished = self._finished
        finished.pop(request_id, None)
        if len(finished) >= FINISHED_KEPT:
            del finished[next(iter(finished))]
        finished[request_id] = (queue_s, stop)

    def _note_scheduled(self, res: StepResult, now: float) -> None:
        """Note the queue time of the requests first scheduled by the step begun at ``now``."""
        streams = self._streams
        for req_id, _ in res.admitted:
            stream = streams.get(req_id)
            if stream is not None and stream.queue_s is None:
                stream.queue_s = max(0.0, now - stream.arrival)

    def _stop(self, request_id: str, delivered: int, stream: _Stream) -> None:
        """End a request after ``delivered`` tokens (a stop, or its client went away): the
        core forgets the tokens it made past them, this step's among them (which
        :meth:`stats` then no longer takes off the count), and, with none delivered, its
        prompt (counted with the first token it hands out, as vLLM counts it). Nothing
        when ``stream`` is no longer the one open under ``request_id``."""
        if self._streams.get(request_id) is not stream:
            return
        res = self._stepping
        prompt = self._core.prompt_tokens(request_id)
        if self._core.abort(request_id, delivered=delivered) and res is not None:
            res.num_new_tokens -= sum(n for rid, n in res.new_tokens if rid == request_id)
            if delivered == 0 and prompt is not None and request_id in res.first_tokens:
                res.prompt_tokens_counted -= prompt

    def _close_stream(self, request_id: str, stream: _Stream, *, abort: bool) -> None:
        """Forget a request's ``stream``; with ``abort`` (it did not finish), abort it in
        the core after the tokens its steps had handed out. Nothing when ``stream`` is no
        longer the one open under ``request_id`` (it was closed when the id came again)."""
        if self._streams.get(request_id) is not stream:
            return
        if abort:
            self._stop(request_id, stream.emitted, stream)
        self._streams.pop(request_id, None)
        key = self._remote_key.pop(request_id, None)
        if key is not None:
            self._remote_addr.pop(key, None)

    def _ensure_running(self) -> asyncio.Event:
        if self._closed or self._broken is not None:
            raise EngineConnectionError(
                f"simulated engine {self._id} is closed", instance_id=self._id
            )
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(self._wake), name=f"sim-engine-{self._id}"
            )
        return self._wake

    async def _run(self, wake: asyncio.Event) -> None:
        clock = self._clock or current_clock()
        core = self._core
        due: float | None = None
        """When the step before ended on the engine's timeline (None after a pause): the
        time spent since (this loop's own work, a late wake-up) comes off the next step's
        sleep, so that back-to-back steps last what the cost model says on average rather
        than that plus this process's overhead (which ``speed`` would magnify)."""
        try:
            while True:
                if not core.has_work():
                    wake.clear()
                    due = None
                    await wake.wait()
                    continue
                now = clock.now()
                res = core.step(now)
                self._note_epochs(res)
                self._note_scheduled(res, now)
                self._notify_pulled(res)
                if res.idle:
                    wake.clear()
                    due = None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), max(res.duration_s, 1e-9))
                    continue
                if self._shared is not None:
                    due = None
                    self._stepping = res
                    try:
                        await self._shared_step(res)
                    finally:
                        self._stepping = None
                    continue
                late = 0.0 if due is None else min(max(0.0, now - due), res.duration_s)
                due = now + res.duration_s - late
                self._stepping = res
                try:
                    await clock.sleep(due - clock.now())
                finally:
                    self._stepping = None
                if self._front is None:
                    self._deliver(res)
                else:
                    self._note_admitted(res)
                    if res.new_tokens:
                        _, done = self._front.outputs(clock.now(), len(res.new_tokens))
                        self._post(done, res)
        except Exception as exc:
            self._broken = exc
            self._fail_all(f"simulated engine failed: {exc!r}")

    async def _shared_step(self, res: StepResult) -> None:
        """The rest of a step on the shared core: the worker's part at full speed, then the
        shared part beside the front end; then the front end processes the outputs."""
        shared = self._shared
        assert shared is not None
        part = shared.shared_part_s(res.duration_s)
        await (self._clock or current_clock()).sleep(res.duration_s - part)
        if part > 0:
            await self._shared_wait(lambda now: shared.step_part(now, part))
        self._note_admitted(res)
        if res.new_tokens:
            self._shared_submit(lambda now: shared.outputs(now, len(res.new_tokens)), res)

    async def _shared_wait(self, make: Callable[[float], SharedJob]) -> None:
        """Queue the job ``make(now)`` makes on the shared core and wait until it ends."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._shared_submit(make, done)
        await done

    def _shared_submit(
        self, make: Callable[[float], SharedJob], then: asyncio.Future[None] | StepResult
    ) -> None:
        shared = self._shared
        assert shared is not None
        now = (self._clock or current_clock()).now()
        self._shared_flush(now)
        self._shared_jobs[make(now)] = then
        if self._shared_changed is None:
            self._shared_changed = asyncio.Event()
        if self._shared_task is None:
            self._shared_task = asyncio.get_running_loop().create_task(
                self._drive_shared(shared, self._shared_changed), name=f"sim-shared-{self._id}"
            )
        self._shared_changed.set()

    def _shared_flush(self, now: float) -> None:
        assert self._shared is not None
        for job in self._shared.advance(now):
            then = self._shared_jobs.pop(job, None)
            if isinstance(then, asyncio.Future):
                if not then.done():
                    then.set_result(None)
            elif then is not None:
                self._deliver(then)

    async def _drive_shared(self, shared: SharedCore, changed: asyncio.Event) -> None:
        """End the shared core's jobs on time (the timeline wakes it when jobs are added)."""
        clock = self._clock or current_clock()
        try:
            while True:
                now = clock.now()
                at = shared.next_change()
                if at <= now + 1e-9:  # timers may fire a rounding error early
                    self._shared_flush(max(now, at))
                    continue
                changed.clear()
                if math.isinf(at):
                    await changed.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), at - now)
        except Exception as exc:  # pragma: no cover - flushing only fills queues
            self._broken = exc
            self._fail_all(f"simulated engine front end failed: {exc!r}")

    def _post(self, at: float, res: StepResult) -> None:
        """Hand ``res`` to the streams at ``at``, when the front end has processed it."""
        if self._outbox_ready is None:
            self._outbox_ready = asyncio.Event()
        if self._delivery is None:
            self._delivery = asyncio.get_running_loop().create_task(
                self._deliver_outbox(self._outbox_ready), name=f"sim-front-end-{self._id}"
            )
        self._outbox.append((at, res))
        self._outbox_ready.set()

    async def _deliver_outbox(self, ready: asyncio.Event) -> None:
        clock = self._clock or current_clock()
        outbox = self._outbox
        try:
            while True:
                if not outbox:
                    ready.clear()
                    await ready.wait()
                    continue
                at, res = outbox[0]
                wait = at - clock.now()
                if wait > 0:
                    await clock.sleep(wait)
                outbox.popleft()
                self._deliver(res)
        except Exception as exc:  # pragma: no cover - _deliver only fills queues
            self._broken = exc
            self._fail_all(f"simulated engine front end failed: {exc!r}")

    def _notify_pulled(self, res: StepResult) -> None:
        for engine_id, request_id in res.kv_pulled:
            if self._hub is not None and self._hub.release(engine_id, request_id):
                continue
            addr = self._remote_addr.pop((engine_id, request_id), None)
            if addr is not None and self._releaser is not None:
                self._releaser.release(addr[0], addr[1], request_id)

    def _note_admitted(self, res: StepResult) -> None:
        for req_id, cached in res.admitted:
            stream = self._streams.get(req_id)
            if stream is not None:
                stream.cached = cached

    def _note_epochs(self, res: StepResult) -> None:
        """Which stream each of the step's tokens is for (see :attr:`_Stream.epoch`)."""
        if res.new_tokens:
            streams = self._streams
            self._step_epochs[id(res)] = {
                rid: stream.epoch for rid, _ in res.new_tokens if (stream := streams.get(rid))
            }

    def _deliver(self, res: StepResult) -> None:
        streams = self._streams
        self._note_admitted(res)
        finished = dict(res.finished)
        pinned = {p.request_id: p for p in res.kv_pinned}
        epochs = self._step_epochs.pop(id(res), None)
        for req_id, n in res.new_tokens:
            stream = streams.get(req_id)
            if stream is not None and (epochs is None or epochs.get(req_id) == stream.epoch):
                stream.emitted += n
                stream.queue.put_nowait(_Delivery(n, finished.get(req_id), pinned.get(req_id)))

    def _fail_all(self, message: str) -> None:
        for stream in self._streams.values():
            stream.queue.put_nowait(EngineConnectionError(message, instance_id=self._id))


_ANSWER_FIELDS = frozenset({"prompt_token_ids", "prompt_logprobs"})
"""A chat answer's fields about its prompt (``Chunk.top``), one for all its choices."""


@dataclass(frozen=True, slots=True)
class _Sampling:
    """What :meth:`SimEngine.generate` read from a request, for each of its samples."""

    prompt_ids: list[int]
    prompt_only: bool
    keep_stop: bool
    min_tokens: int
    stop_ids: frozenset[int]
    top: int | None
    echo: str | None
    prompt_top: int | None
    return_ids: bool
    continuous: bool
    whole_prompt: bool
    """The prompt's logprobs are asked: it is computed whole, as vLLM does (no prefix cache
    read, no KV taken from a prefill engine)."""
    salt: str | None
    """``cache_salt``: the prompt's cached blocks are shared only under the same salt."""
    lora: str | None
    """The LoRA adapter it is for (None: the model)."""


class _PromptLead:
    """What leads a request's first chunk, as vLLM's first: a completion's echoed prompt
    (its text, and its tokens' logprobs before the answer's), ``prompt_logprobs`` and,
    with ``return_token_ids``, ``prompt_token_ids`` (a completion's among its choice's
    fields, a chat's among the answer's)."""

    __slots__ = ("_chat", "_done", "_echo", "_prompt_ids", "_prompt_top", "_req", "_top")

    def __init__(
        self,
        req: EngineRequest,
        echo: str | None,
        top: int | None,
        prompt_top: int | None,
        prompt_ids: Sequence[int] | None = None,
    ) -> None:
        self._req, self._echo, self._top, self._prompt_top = req, echo, top, prompt_top
        self._prompt_ids = prompt_ids
        self._chat = req.api == "chat"
        self._done = echo is None and prompt_top is None and prompt_ids is None

    def first(self, chunk: Chunk) -> Chunk:
        """``chunk``, led by the prompt's parts when it is the first."""
        if self._done:
            return chunk
        self._done = True
        req, text, lp = self._req, chunk.text, chunk.logprobs
        if self._echo is not None:
            text = self._echo + text
            if self._top is not None:
                pieces, _ = prompt_pieces(req)
                prompt = echo_logprobs(pieces, self._top, req.request_id)
                lp = prompt if lp is None else {k: prompt[k] + lp[k] for k in prompt}
        extras, top = chunk.extras, chunk.top
        drawn: dict[str, Any] = {}
        if self._prompt_top is not None:
            pieces, ids = prompt_pieces(req)
            drawn["prompt_logprobs"] = prompt_logprobs(pieces, ids, self._prompt_top,
                                                       req.request_id)  # fmt: skip
        if self._prompt_ids is not None:
            drawn["prompt_token_ids"] = list(self._prompt_ids)
        if drawn and self._chat:
            top = {**(top or {}), **drawn}
        elif drawn:
            extras = {**(extras or {}), **drawn}
        return Chunk(
            text, chunk.token_ids, chunk.finish_reason, chunk.usage, lp, chunk.index,
            chunk.fields, extras, top,
        )  # fmt: skip


_SAMPLING_RANGES: dict[str, tuple[float, float, str]] = {
    "presence_penalty": (-2.0, 2.0, "in [-2, 2]"),
    "frequency_penalty": (-2.0, 2.0, "in [-2, 2]"),
    "min_p": (0.0, 1.0, "in [0, 1]"),
}
_SAMPLING_FLAGS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")


def min_tokens_of(req: EngineRequest) -> int:
    """``req``'s ``min_tokens`` (0 when not given); refused as vLLM refuses it: not a whole
    number >= 0, or above ``max_tokens``."""
    value = whole(req.extra.get("min_tokens", 0) or 0)
    if value is None or value < 0:
        raise InvalidRequestError("min_tokens must be an integer >= 0", param="min_tokens")
    if value > req.max_tokens:  # as vLLM refuses it
        raise InvalidRequestError(
            f"min_tokens must be less than or equal to max_tokens={req.max_tokens}, got {value}",
            param="min_tokens",
        )
    return value


def is_text(req: EngineRequest) -> bool:
    """Whether ``req``'s prompt is text (a chat's messages too), which vLLM's tokenizer
    counts only up to a token past the context (token ids are counted whole)."""
    return req.messages is not None or isinstance(req.prompt, str)


def check_request_fields(req: EngineRequest) -> None:
    """``req``'s stop strings, a completion's ``suffix`` and ``return_token_ids``, refused
    as the simulated engine's HTTP server refuses them (:func:`check_stop`,
    :func:`request_flag`)."""
    check_stop(req.stop, req.extra.get("suffix") if req.api == "completions" else None)
    request_flag(req.extra, "return_token_ids")


def check_sampling(extra: Mapping[str, Any], vocab: int | None = None) -> None:
    """Refuse the sampling parameters vLLM's ``SamplingParams`` refuses (400 naming the
    field, in vLLM's words; token ids against ``vocab``, the model's vocabulary, when
    given); the simulated text does not depend on them otherwise."""

    def number(key: str) -> float | None:
        value = extra.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequestError(f"{key} must be a number, got {value!r}", param=key)
        return float(value)

    for key, (lo, hi, text) in _SAMPLING_RANGES.items():
        value = number(key)
        if value is not None and not lo <= value <= hi:
            raise InvalidRequestError(f"{key} must be {text}, got {value}.", param=key)
    penalty = number("repetition_penalty")
    if penalty is not None and not penalty > 0:
        raise InvalidRequestError(
            f"repetition_penalty must be greater than zero, got {penalty}.",
            param="repetition_penalty",
        )
    top_k = extra.get("top_k")
    if top_k is not None and ((k := whole(top_k)) is None or k < -1):
        raise InvalidRequestError(
            f"top_k must be 0 (disable), or at least 1, got {top_k}.", param="top_k"
        )
    for key in _SAMPLING_FLAGS:
        request_flag(extra, key)
    seed = extra.get("seed")
    if seed is not None and (whole(seed) is None or beyond_int64(seed)):
        raise InvalidRequestError(  # vLLM's request models bound it to a C long
            f"seed must be a 64-bit integer, got {seed!r}", param="seed"
        )
    _check_token_fields(extra, vocab)
    cache_salt(extra)


_SALT_FORBIDDEN = frozenset("@/\\\x00")


def adapter_salt(adapter: str | None, salt: str | None) -> str | None:
    """The salt of a prompt's block hashes for the LoRA ``adapter`` it is for (None: its
    model) and its ``cache_salt`` (None: none): blocks are shared only under both the same,
    as vLLM's block hashes take the adapter's name and the salt as extra keys."""
    if adapter is None:
        return salt
    return f"{ADAPTER_SALT}{adapter}" + ("" if salt is None else f"\x00{salt}")


def cache_salt(extra: Mapping[str, Any]) -> str | None:
    """The request's ``cache_salt`` (None: none), refused as vLLM refuses it: anything but
    a non-empty string of at most 128 characters without ``@``, ``/``, ``\\`` or NUL."""
    salt = extra.get("cache_salt")
    if salt is None:
        return None
    if not isinstance(salt, str) or not salt:
        raise InvalidRequestError(
            "Parameter 'cache_salt' must be a non-empty string if provided.", param="cache_salt"
        )
    if len(salt) > 128 or not _SALT_FORBIDDEN.isdisjoint(salt):
        raise InvalidRequestError(
            "Parameter 'cache_salt' must be at most 128 characters and must not contain "
            "'@', '/', '\\\\', or NUL.",
            param="cache_salt",
        )
    return salt


def _int_text(text: str) -> int | None:
    """``text`` as Python's ``int()`` reads it (vLLM's reading of a logit_bias key: ``+5``
    too), or None (``²`` is a digit to ``isdigit`` that ``int`` refuses)."""
    try:
        return int(text)
    except ValueError:
        return None


def _out_of_vocab(token: int, vocab: int | None) -> bool:
    return token < 0 or (vocab is not None and token >= vocab)


def _check_token_fields(extra: Mapping[str, Any], vocab: int | None) -> None:
    """``logit_bias``, ``allowed_token_ids`` and ``bad_words`` as vLLM's request models and
    processor check them."""
    bias = extra.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, Mapping):
            raise InvalidRequestError("logit_bias must be an object", param="logit_bias")
        ids = []
        for key, value in bias.items():
            token = whole(key) if not isinstance(key, str) else _int_text(key)
            if token is None:
                raise InvalidRequestError(
                    f"Found token_id `{key}` in logit_bias but token_id must be an integer "
                    "or string representing an integer",
                    param="logit_bias",
                )
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise InvalidRequestError(
                    f"logit_bias values must be numbers, got {value!r}", param="logit_bias"
                )
            ids.append(token)
        outside = [t for t in ids if _out_of_vocab(t, vocab)]
        if outside:
            raise InvalidRequestError(
                f"token_id(s) {outside} in logit_bias contain out-of-vocab token ids. "
                f"Vocabulary size: {vocab}",
                param="logit_bias",
            )
    allowed = extra.get("allowed_token_ids")
    if allowed is not None:
        if not isinstance(allowed, list) or any(whole(t) is None for t in allowed):
            raise InvalidRequestError(
                "allowed_token_ids must be a list of token ids", param="allowed_token_ids"
            )
        if not allowed:
            raise InvalidRequestError(
                "allowed_token_ids is not None and empty!", param="allowed_token_ids"
            )
        if any(_out_of_vocab(t, vocab) for t in allowed):
            raise InvalidRequestError(
                "allowed_token_ids contains out-of-vocab token id!", param="allowed_token_ids"
            )
    bad_words = extra.get("bad_words")
    if bad_words is not None and (
        not isinstance(bad_words, list) or not all(isinstance(w, str) for w in bad_words)
    ):
        raise InvalidRequestError("bad_words must be a list of strings", param="bad_words")


def text_key(req: EngineRequest, prompt_ids: Sequence[int], engine_seed: int) -> str:
    """What a request's generated text is drawn from, repeatable where vLLM's sampling is:
    greedy decoding (``temperature`` 0) gives a prompt the same text on every engine, and a
    request's ``seed`` the same text for the same prompt and seed; other requests draw from
    the engine's ``seed`` and their request id."""
    seed = whole(req.extra.get("seed"))
    if req.temperature == 0:
        return f"greedy:{hash(tuple(prompt_ids))}"
    if seed is not None:
        return f"seed:{seed}:{hash(tuple(prompt_ids))}"
    return f"{engine_seed}:{req.request_id}"


def _stop_in(text: str, since: int, stops: Any) -> tuple[int, str] | None:
    """The earliest stop string in ``text`` that ends after ``since`` (the text before it
    was searched already): where it begins and which it is (the first of ``stops``
    among those beginning there)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        if not stop:
            continue
        start = text.find(stop, max(0, since - len(stop) + 1))
        if start >= 0 and (best is None or start < best[0]):
            best = (start, stop)
    return best
