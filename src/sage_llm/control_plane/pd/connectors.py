"""PD connectors: how the two legs of a disaggregated request are carried out on engines.

A connector's ``run(req, legs)`` is an async generator of the decode instance's chunks, as
the caller would see them from a colocated request. It raises :class:`PDLegError` (an
:class:`~sage_llm.errors.EngineError` that names the failing leg) when a leg fails.

* :class:`VLLMConnector` — vLLM's sequential ``kv_transfer_params`` protocol (docs/pd.md):
  ``kv = await prefill.prefill(req)`` (the HTTP client sends ``max_tokens=1``,
  ``stream=false``, the ``do_remote_decode`` request dict), then ``decode.generate(req with
  kv_transfer_params=kv.params)`` streamed to the caller; the same request id (sent as
  ``X-Request-Id``) on both legs. A prefill failure is returned as the error and the decode
  leg is never called.
* :class:`SGLangConnector` — SGLang's concurrent bootstrap protocol: the same body, with
  ``bootstrap_host``/``bootstrap_port``/``bootstrap_room``, goes to both instances at once;
  the decode stream is returned and the prefill stream drained. Prefill fails → the decode
  leg is cancelled; decode fails → the prefill leg is aborted. The decode stream's end is
  the answer's: a prefill stream still open then is drained in a task of its own for up to
  ``drain_timeout_s``, then aborted.

The in-process simulated engine speaks the vLLM protocol (``SimEngine.prefill`` and
``generate`` with ``kv_transfer_params``), so it needs no connector of its own.

KV left behind (vLLM): after the prefill leg returned, the prefill instance keeps the KV
blocks pinned until the decode instance has pulled them. If the request is cancelled, or
the decode leg fails, before the decode instance produced its first token, the connector
releases them: directly when the prefill client has a ``release_kv(request_id)`` method
(the simulated engine does), otherwise by pulling them with a one-token decode leg whose
output is discarded (``release_by_pull``; vLLM's NIXL connector frees the prefill side's
blocks once they have been read). Without that, vLLM frees them only when it gives up
on them: vLLM 0.32's NIXL connector when its lease runs out
(``kv_connector_extra_config.kv_lease_duration``, 30 s by default), older releases when
their abort timeout passes (``VLLM_NIXL_ABORT_REQUEST_TIMEOUT``, 480 s by default). A request for
its prompt's logprobs leaves KV that its decode leg never reads (vLLM computes such a
prompt itself): it is released the same way once the decode leg is done, in the
background. A prefill leg
whose request is cancelled gets ``cancel_grace_s`` to answer (its engine may have ended it,
the answer on its way: that KV is released too); one still in flight then is aborted by
closing its connection, which vLLM treats as an abort.

Usage: prompt tokens come from the prefill leg (SGLang: from the decode leg when the
prefill leg has not ended by then), completion and cached tokens from the decode leg (its
last chunk carries the merged :class:`~sage_llm.engines.base.Usage`).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import math
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

from sage_llm.control_plane.params import build_params
from sage_llm.engines.base import (
    Chunk,
    EngineClient,
    EngineRequest,
    KVHandle,
    Usage,
    asks_prompt_logprobs,
)
from sage_llm.errors import ConfigError, EngineError, InvalidRequestError, SageLLMError
from sage_llm.types import ExecutionInstance

log = logging.getLogger("sage_llm.pd")

_NOT_PULLED = frozenset({"min_tokens", "n", "prompt_logprobs", "echo"})
"""Body fields a pull that releases a prefill leg's KV leaves out: more than one token or
sample, and the prompt's logprobs (vLLM would compute the prompt again, not pull it)."""

Leg = Literal["prefill", "decode"]

SGLANG_BOOTSTRAP_PORT = 8998
"""SGLang's default ``--disaggregation-bootstrap-port``."""


VLLM_LEG_FIELDS = frozenset({"kv_transfer_params"})
"""The field the ``vllm`` connector sets on its legs."""
SGLANG_LEG_FIELDS = frozenset({"bootstrap_host", "bootstrap_port", "bootstrap_room"})
"""The fields the ``sglang`` connector sets on its legs (over any a client sent)."""


class PDLegError(EngineError):
    """One leg of a PD request failed. ``leg`` is ``"prefill"`` or ``"decode"``; ``cause``
    is the engine's error (its ``status`` and ``retryable`` are kept). An engine's refusal
    of one of ``set_fields`` (those the connector set on the leg, not a client's) is the
    instance's failure, not a bad request."""

    def __init__(
        self,
        leg: Leg,
        cause: SageLLMError,
        instance_id: str,
        set_fields: frozenset[str] = frozenset(),
    ) -> None:
        if isinstance(cause, InvalidRequestError) and cause.param in set_fields:
            # the engine refused a field the control plane set, not the client: the
            # instance cannot run PD legs (an engine without a KV connector, say); it
            # counts against the instance and the request may run elsewhere
            cause = EngineError(
                f"{cause.message} (the control plane sets {cause.param} on PD legs: is "
                f"{instance_id} an engine that runs them?)",
                instance_id=instance_id,
            )
        if isinstance(cause, EngineError):
            status, retryable = cause.status, cause.retryable
            where = cause.instance_id or instance_id
        else:
            status, retryable, where = cause.http_status, False, instance_id
        super().__init__(
            f"{leg} leg failed: {cause.message}",
            instance_id=where,
            status=status,
            retryable=retryable,
        )
        self.leg: Leg = leg
        self.cause = cause


@dataclass(frozen=True, slots=True)
class PDLegs:
    """The two instances of a PD request. ``on_prefill_done`` is called once, with the
    prefill leg's handle, as soon as that leg has ended successfully. ``spare_decode``
    gives another decode instance's client (None when there is none), through which a
    connector that frees the prefill side's KV by a pull does it when the decode leg's
    own instance failed."""

    prefill: EngineClient
    decode: EngineClient
    prefill_instance: ExecutionInstance
    decode_instance: ExecutionInstance
    on_prefill_done: Callable[[KVHandle], None] | None = None
    spare_decode: Callable[[], EngineClient | None] | None = None
    decode_down: Callable[[], bool] | None = None
    """Whether the decode leg's instance is down now (ejected or removed): a leg cancelled
    because of that failed as much as one that raised."""

    def decode_is_down(self) -> bool:
        return self.decode_down is not None and self.decode_down()

    def prefill_done(self, handle: KVHandle) -> None:
        if self.on_prefill_done is not None:
            self.on_prefill_done(handle)


@runtime_checkable
class PDConnector(Protocol):
    """Runs both legs of a PD request and yields the decode instance's chunks."""

    name: str
    splits_samples: bool
    """Whether a request for several samples (``n`` > 1) can run disaggregated through it;
    when not, such requests run colocated (:func:`samples_asked`)."""

    splits_prompt_logprobs: bool
    """Whether a request that asks for its prompt's logprobs
    (:func:`~sage_llm.engines.base.asks_prompt_logprobs`) gains from running disaggregated
    through it; when not, such requests run colocated while an instance that runs whole
    requests can take them (in a fleet of prefill and decode instances only, they still
    run disaggregated)."""

    def run(self, req: EngineRequest, legs: PDLegs) -> AsyncIterator[Chunk]: ...

    def describe(self) -> dict[str, object]: ...


def samples_asked(extra: Mapping[str, object]) -> int:
    """The samples a request's extra fields ask for (``n``; 1 when not a whole number
    above 1: the engine answers for anything else)."""
    n = extra.get("n")
    return n if type(n) is int and n > 1 else 1


def merge_usage(chunk: Chunk, prompt_tokens: int) -> Chunk:
    """``chunk`` with its usage's prompt tokens taken from the prefill leg (when known)."""
    usage = chunk.usage
    if usage is None or prompt_tokens <= 0 or usage.prompt_tokens == prompt_tokens:
        return chunk
    merged = Usage(prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.extra)
    return replace(chunk, usage=merged)


async def _ended_within(task: asyncio.Future[KVHandle], timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for a leg's ``task`` to end; cancel it (which closes its
    connection: the engine aborts the leg) and wait it out when it has not. True when it
    ended on its own."""
    try:
        await asyncio.wait({task}, timeout=timeout_s)
    finally:
        ended = task.done()
        if not ended:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return ended


def _ended_well(task: asyncio.Future[KVHandle]) -> bool:
    """``task`` is done, with a result (not cancelled, not failed)."""
    return task.done() and not task.cancelled() and task.exception() is None


async def _next(it: AsyncIterator[Chunk]) -> Chunk | None:
    try:
        return await anext(it)
    except StopAsyncIteration:
        return None


async def _close(it: AsyncIterator[Chunk]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        await aclose()


def _positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"must be a finite number > 0, got {value!r}", key=key)


# --------------------------------------------------------------------------- vLLM


@dataclass(frozen=True, slots=True)
class VLLMConnectorParams:
    """``release_by_pull``: release KV left on the prefill side by a discarded one-token
    decode leg when the prefill client has no ``release_kv``; ``release_timeout_s`` bounds
    that release. ``cancel_grace_s``: how long a prefill leg whose request was cancelled
    may still end (its answer may be on its way: the engine then holds KV for it, which is
    released) before its connection is closed (which aborts a leg the engine still runs)."""

    release_by_pull: bool = True
    release_timeout_s: float = 10.0
    cancel_grace_s: float = 0.25

    def __post_init__(self) -> None:
        _positive("release_timeout_s", self.release_timeout_s)
        _positive("cancel_grace_s", self.cancel_grace_s)


class VLLMConnector:
    """Sequential hand-off with ``kv_transfer_params`` (see the module docstring)."""

    name = "vllm"
    splits_samples = False
    """vLLM 0.32's prefill leg of a request for ``n`` samples pins a KV copy per sample
    but answers one ``kv_transfer_params``: both decode samples read that one copy (the
    second time, maybe after it was freed) and the other stays pinned until its lease runs
    out (measured against two real vLLM servers with NIXL)."""
    splits_prompt_logprobs = False
    """vLLM's decode engine computes again every prompt token of a request that asks for
    its prompt's logprobs, ignoring the KV the prefill leg made for it (measured against
    two real vLLM servers with NIXL: no token of such a prompt came by transfer)."""

    def __init__(self, params: VLLMConnectorParams | None = None) -> None:
        self.params = params or VLLMConnectorParams()
        self.releases = 0
        """KV releases done after a cancellation or decode failure (for status pages)."""
        self.release_failures = 0
        """KV releases tried that failed: that KV stays pinned until the prefill engine
        gives up on it (its NIXL lease, or an older vLLM's abort timeout)."""
        self._releasing: set[asyncio.Task[bool]] = set()
        """Releases going on after the request they were for was cancelled."""
        self._leg_numbers = itertools.count(1)
        self._legs: dict[tuple[str, str], int] = {}
        """The last prefill leg begun on each (prefill instance, request id): a leg whose
        request was cancelled releases its KV only while no later leg uses that id there
        (a retry of the request on the same instance)."""

    async def run(self, req: EngineRequest, legs: PDLegs) -> AsyncGenerator[Chunk, None]:
        """Prefill, then stream the decode leg."""
        key = (legs.prefill.instance_id, req.request_id)
        number = self._legs[key] = next(self._leg_numbers)  # never one a key had before
        leg = asyncio.ensure_future(legs.prefill.prefill(req))
        try:
            handle = await asyncio.shield(leg)  # cancelled: :meth:`_settle_cancelled`
        except asyncio.CancelledError:
            self._settle_cancelled(req, leg, legs, number)  # (which forgets the leg)
            raise
        except PDLegError:
            self._forget_leg(key, number)
            raise
        except SageLLMError as exc:
            self._forget_leg(key, number)
            raise PDLegError("prefill", exc, legs.prefill.instance_id, VLLM_LEG_FIELDS) from exc
        except BaseException:  # a client's own failure (a bug): the leg is over all the same
            self._forget_leg(key, number)
            raise
        self._forget_leg(key, number)
        legs.prefill_done(handle)
        owed = True  # the prefill side holds KV for us until the decode side pulled it
        # vLLM's decode engine computes the prompt of a request for its prompt's logprobs
        # itself and never pulls its KV, which is released once the decode leg is done
        unread = asks_prompt_logprobs(req)
        decode_failed = False
        # a leg asked for a whole answer shows nothing until its end: cut short, it is
        # released anyway (the engine may have pulled the KV already; streaming every such
        # leg to know would cost every request what only a cut-short one needs)
        stream = legs.decode.generate(req.with_changes(kv_transfer_params=dict(handle.params)))
        cancelled = False
        try:
            try:
                async for chunk in stream:
                    owed = unread
                    yield merge_usage(chunk, handle.prompt_tokens)
            except PDLegError:
                decode_failed = True
                raise
            except SageLLMError as exc:
                decode_failed = True
                raise PDLegError("decode", exc, legs.decode.instance_id, VLLM_LEG_FIELDS) from exc
            except Exception:  # the client's own failure (a bug): no pull through it
                decode_failed = True
                raise
            except (asyncio.CancelledError, GeneratorExit):
                cancelled = True
                raise
        finally:
            await _close(stream)
            if owed:
                failed = decode_failed or legs.decode_is_down()  # e.g. cancelled: ejected
                release = self._release_later(req, handle, legs, decode_failed=failed)
                if not cancelled and (decode_failed or not unread):
                    # the request waits for the release, which goes on if it is cancelled
                    # meanwhile (moved off its ejected decode instance, say); a cancelled
                    # one ends now (a deadline's 504 on time), and one whose decode leg
                    # answered in full does not wait
                    await asyncio.shield(release)

    def _forget_leg(self, key: tuple[str, str], number: int) -> None:
        """The leg ``number`` on ``key`` has ended (unless a later one began there since)."""
        if self._legs.get(key) == number:
            del self._legs[key]

    def _settle_cancelled(
        self, req: EngineRequest, leg: asyncio.Future[KVHandle], legs: PDLegs, number: int
    ) -> None:
        """The request was cancelled during its prefill leg: the leg may have ended on the
        engine already (its answer on the way), and the engine then holds KV for a decode
        leg that will never come. Closing the leg's connection would not free it. So the
        leg is given ``cancel_grace_s`` to end, in a task of its own; ended, its KV is
        released (:meth:`release`); not ended, its connection is closed, which aborts it.
        A leg of the request begun on the same instance since (``number`` is no longer the
        last) holds that id there now: its KV is its own, and nothing is released."""
        key = (legs.prefill.instance_id, req.request_id)

        async def settle() -> bool:
            try:
                ended = await _ended_within(leg, self.params.cancel_grace_s)
                if not ended or not _ended_well(leg):
                    return False
                if self._legs.get(key) != number:  # the request runs there again
                    return False
                return await self.release(req, leg.result(), legs)
            finally:
                self._forget_leg(key, number)

        self._in_background(settle(), f"kv-settle-{req.request_id}")

    def _release_later(
        self, req: EngineRequest, handle: KVHandle, legs: PDLegs, *, decode_failed: bool
    ) -> asyncio.Task[bool]:
        """:meth:`release` in a task of its own, which a cancellation of the request does
        not cut short (it is bounded by ``release_timeout_s``; :meth:`wait_released`
        waits for it)."""
        return self._in_background(
            self.release(req, handle, legs, decode_failed=decode_failed),
            f"kv-release-{req.request_id}",
        )

    def _in_background(self, work: Coroutine[Any, Any, bool], name: str) -> asyncio.Task[bool]:
        """``work`` in a task of its own, which :meth:`wait_released` waits for."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return task

    async def wait_released(self) -> None:
        """Wait until the releases still going on have ended (each within
        ``release_timeout_s``): the control plane's stop, before it closes the clients."""
        while self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    async def release(
        self, req: EngineRequest, handle: KVHandle, legs: PDLegs, *, decode_failed: bool = False
    ) -> bool:
        """Free the KV a finished prefill leg keeps for ``req``; True when it was released.
        By a pull, through the decode leg's instance, or another one (``legs.spare_decode``)
        when that one failed (``decode_failed``) or the pull through it did."""
        remote_id = str(handle.params.get("remote_request_id") or req.request_id)
        direct = getattr(legs.prefill, "release_kv", None)
        try:
            async with asyncio.timeout(self.params.release_timeout_s):
                if callable(direct):
                    result = direct(remote_id)
                    if inspect.isawaitable(result):
                        result = await result
                    released = bool(result)
                elif self.params.release_by_pull:
                    released = await self._pull_somewhere(req, handle, legs, decode_failed)
                else:
                    log.info(
                        "request %s: KV stays pinned on %s until the engine gives up on it",
                        req.request_id,
                        legs.prefill.instance_id,
                    )
                    return False
        except (Exception, asyncio.CancelledError) as exc:  # a client's bug too: counted
            self.release_failures += 1
            if isinstance(exc, asyncio.CancelledError):
                why = "the release was cancelled before it ended"
            elif isinstance(exc, SageLLMError | TimeoutError):
                why = str(exc) or (
                    f"no answer within release_timeout_s ({self.params.release_timeout_s:g} s)"
                )
            else:  # a client's bug
                why = f"{type(exc).__name__}: {exc}"
            log.warning(
                "request %s: could not release KV on %s (it stays pinned until the engine "
                "gives up on it: its NIXL lease, or an older vLLM's abort timeout): %s",
                req.request_id,
                legs.prefill.instance_id,
                why,
            )
            if isinstance(exc, asyncio.CancelledError):
                raise
            return False
        if released:
            self.releases += 1
        return released

    async def _pull_somewhere(
        self, req: EngineRequest, handle: KVHandle, legs: PDLegs, decode_failed: bool
    ) -> bool:
        """:meth:`_pull` through the decode leg's instance unless it failed, else (or when
        that pull fails) through a spare decode instance, when there is one."""
        spare = legs.spare_decode() if legs.spare_decode is not None else None
        if not decode_failed or spare is None:
            try:
                return await self._pull(req, handle, legs.decode)
            except Exception:  # an engine's failure or a client's bug: the spare, if any
                if spare is None:
                    raise
        assert spare is not None
        log.info(
            "request %s: releasing KV on %s through %s (its decode instance %s failed)",
            req.request_id, legs.prefill.instance_id, spare.instance_id,
            legs.decode.instance_id,
        )  # fmt: skip
        return await self._pull(req, handle, spare)

    @staticmethod
    async def _pull(req: EngineRequest, handle: KVHandle, decode: EngineClient) -> bool:
        extra = {k: v for k, v in req.extra.items() if k not in _NOT_PULLED}
        drain = req.with_changes(
            request_id=f"{req.request_id}-kv-release",
            max_tokens=1,
            send_max_tokens=True,  # one token, whatever the request left to the engine
            stream=False,
            extra=extra,
            kv_transfer_params=dict(handle.params),
        )
        stream = decode.generate(drain)
        try:
            async for _chunk in stream:
                pass
        finally:
            await _close(stream)
        return True

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "release_by_pull": self.params.release_by_pull,
            "release_timeout_s": self.params.release_timeout_s,
            "kv_releases": self.releases,
            "kv_release_failures": self.release_failures,
        }


# --------------------------------------------------------------------------- SGLang


@dataclass(frozen=True, slots=True)
class SGLangConnectorParams:
    """``bootstrap_port``: the prefill instance's bootstrap port when its metadata has no
    ``bootstrap_port``; ``drain_timeout_s``: how long the prefill stream may outlive the
    decode stream before it is aborted."""

    bootstrap_port: int = SGLANG_BOOTSTRAP_PORT
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.bootstrap_port < 65536:
            raise ConfigError("must be a TCP port", key="bootstrap_port")
        _positive("drain_timeout_s", self.drain_timeout_s)


class SGLangConnector:
    """Concurrent hand-off through SGLang's bootstrap server (see the module docstring)."""

    name = "sglang"
    splits_samples = True
    """Both legs get the whole request, ``n`` included (not checked against a real SGLang
    pair: there is no CPU build)."""
    splits_prompt_logprobs = False
    """SGLang's prefill server computes a prompt's logprobs and its decode server only gets
    the prompt's KV; this connector passes on the decode leg's answer alone, so such
    requests are kept whole where they can be (not checked against a real SGLang pair)."""

    def __init__(self, params: SGLangConnectorParams | None = None, *, seed: int | None = None):
        self.params = params or SGLangConnectorParams()
        self._rng = random.Random(seed)
        self._draining: dict[asyncio.Task[None], asyncio.Task[KVHandle]] = {}
        """Prefill legs drained after their decode legs (and requests) ended, by the task
        that drains each."""

    def bootstrap(self, prefill: ExecutionInstance) -> dict[str, Any]:
        """The fields added to both legs' bodies (a fresh room each call)."""
        port = prefill.metadata.get("bootstrap_port", self.params.bootstrap_port)
        return {
            "bootstrap_host": prefill.host,
            "bootstrap_port": int(port),
            "bootstrap_room": self._rng.randrange(2**63),
        }

    @staticmethod
    async def _prefill_leg(req: EngineRequest, legs: PDLegs) -> KVHandle:
        usage: Usage | None = None
        stream = legs.prefill.generate(req)
        try:
            async for chunk in stream:
                usage = chunk.usage or usage
        except PDLegError:
            raise
        except SageLLMError as exc:
            raise PDLegError("prefill", exc, legs.prefill.instance_id, SGLANG_LEG_FIELDS) from exc
        finally:
            await _close(stream)
        handle = KVHandle(
            legs.prefill.instance_id,
            {k: req.extra[k] for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")},
            usage.prompt_tokens if usage else 0,
            (usage.cached_tokens or 0) if usage else 0,
        )
        legs.prefill_done(handle)
        return handle

    def _drain_later(self, prefill: asyncio.Task[KVHandle], legs: PDLegs, rid: str) -> None:
        """:meth:`_drain` in a task of its own: the request ends without waiting for it
        (:meth:`wait_released` waits for it)."""
        task = asyncio.get_running_loop().create_task(
            self._drain(prefill, legs, rid), name=f"pd-drain-{rid}"
        )
        self._draining[task] = prefill
        task.add_done_callback(lambda done: self._draining.pop(done, None))

    async def _drain(self, prefill: asyncio.Task[KVHandle], legs: PDLegs, rid: str) -> None:
        """Wait, once, up to ``drain_timeout_s`` for the prefill leg to end after its decode
        leg did; abort it (close its connection) when it has not."""
        if not await _ended_within(prefill, self.params.drain_timeout_s):
            why = f"no end within drain_timeout_s ({self.params.drain_timeout_s:g} s); aborted"
        elif prefill.cancelled():  # aborted by the control plane's stop
            return
        elif (failure := prefill.exception()) is not None:
            why = str(failure) or type(failure).__name__
        else:
            return
        log.warning(
            "request %s: prefill leg on %s did not end cleanly after its decode leg: %s",
            rid,
            legs.prefill.instance_id,
            why,
        )

    async def wait_released(self) -> None:
        """Abort the prefill legs still draining after their requests ended, and wait until
        they are closed: the control plane's stop, before it closes the clients."""
        while self._draining:
            for prefill in self._draining.values():
                prefill.cancel()
            await asyncio.gather(*self._draining, return_exceptions=True)

    async def run(self, req: EngineRequest, legs: PDLegs) -> AsyncGenerator[Chunk, None]:
        """Send both legs at once; stream the decode leg, drain the prefill leg."""
        body = req.with_changes(extra={**req.extra, **self.bootstrap(legs.prefill_instance)})
        prefill = asyncio.create_task(self._prefill_leg(body, legs), name=f"pd-p-{req.request_id}")
        stream = legs.decode.generate(body)
        pending: asyncio.Task[Chunk | None] | None = None  # the decode leg's next chunk
        ended = False  # the decode leg ended: the prefill leg is drained, not aborted
        try:
            while True:
                if not prefill.done():
                    if pending is None:
                        pending = asyncio.ensure_future(_next(stream))
                    await asyncio.wait({pending, prefill}, return_when=asyncio.FIRST_COMPLETED)
                if prefill.done() and (failure := prefill.exception()) is not None:
                    raise failure
                if pending is None:
                    chunk = await _next(stream)
                else:
                    chunk, pending = await pending, None
                if chunk is None:
                    break
                if chunk.usage is not None and _ended_well(prefill):
                    # (a prefill leg not ended yet, or ended badly after the decode leg's
                    # last chunk, holds nothing back: the decode leg's own prompt tokens
                    # stand)
                    chunk = merge_usage(chunk, prefill.result().prompt_tokens)
                yield chunk
            ended = True
        except PDLegError:
            raise
        except SageLLMError as exc:
            raise PDLegError("decode", exc, legs.decode.instance_id, SGLANG_LEG_FIELDS) from exc
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
            await _close(stream)
            if ended and not prefill.done():  # the answer is out: it does not wait for it
                self._drain_later(prefill, legs, req.request_id)
            else:
                if not prefill.done():
                    prefill.cancel()
                await asyncio.gather(prefill, return_exceptions=True)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "bootstrap_port": self.params.bootstrap_port,
            "drain_timeout_s": self.params.drain_timeout_s,
        }


# --------------------------------------------------------------------------- registry

CONNECTOR_NAMES: tuple[str, ...] = ("vllm", "sglang")


def build_connector(
    name: str, params: Mapping[str, Any] | None = None, *, seed: int | None = None
) -> PDConnector:
    """The connector ``name`` (``vllm`` or ``sglang``) with ``params`` (the fields of its
    ``Params`` dataclass). ConfigError for an unknown name or parameter."""
    wanted = str(name).strip().lower()
    if wanted == "vllm":
        return VLLMConnector(build_params(VLLMConnectorParams, params, owner="PD connector 'vllm'"))
    if wanted == "sglang":
        return SGLangConnector(
            build_params(SGLangConnectorParams, params, owner="PD connector 'sglang'"), seed=seed
        )
    raise ConfigError(  # (no key: the name's, not a parameter's; the caller says where)
        f"unknown PD connector {name!r}; valid names: {', '.join(CONNECTOR_NAMES)}"
    )
