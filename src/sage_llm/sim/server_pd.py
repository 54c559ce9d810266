"""PD plumbing of the simulated engine server: the cross-process KV release (vLLM's
NIXL-style notification) and SGLang's bootstrap rooms (see :mod:`sage_llm.sim.server`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp

from sage_llm.errors import (
    EngineError,
    EngineTimeoutError,
    InvalidRequestError,
)
from sage_llm.sim.server_requests import is_int
from sage_llm.types import host_port

_log = logging.getLogger(__name__)

KV_RELEASE_PATH = "/sim/kv/release"
BOOTSTRAP_PATH = "/sim/bootstrap/{room}"
BOOTSTRAP_WAIT_S = 60.0
"""How long a decode server waits for its room's prefill leg (and a filed room waits to be
fetched before its KV is released)."""


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """SGLang's bootstrap fields of one request: where the prefill server is, and the room
    that pairs the two legs."""

    host: str | None
    port: int | None
    room: int


def parse_bootstrap(body: Mapping[str, Any]) -> Bootstrap | None:
    """The request's SGLang bootstrap fields (None without ``bootstrap_room``). Raises
    :class:`InvalidRequestError` for malformed ones."""
    room = body.get("bootstrap_room")
    if room is None:
        return None
    if isinstance(room, list):
        raise InvalidRequestError(
            "batched bootstrap rooms are not supported (n=1 only)", param="bootstrap_room"
        )
    if not is_int(room) or not 0 <= room < 1 << 64:
        raise InvalidRequestError(
            "bootstrap_room must be an integer in [0, 2^64)", param="bootstrap_room"
        )
    host = body.get("bootstrap_host")
    if not isinstance(host, str | None):
        raise InvalidRequestError("bootstrap_host must be a string", param="bootstrap_host")
    port = body.get("bootstrap_port")
    if port is not None and (not is_int(port) or not 0 < port < 65536):
        raise InvalidRequestError("bootstrap_port must be a TCP port", param="bootstrap_port")
    return Bootstrap(host or None, port, room)


_Room = tuple[dict[str, Any] | None, str | None]
"""A room's outcome: the prefill leg's ``kv_transfer_params``, or why it failed."""


class BootstrapRooms:
    """The prefill side of SGLang's bootstrap: each prefill leg run here files its
    ``kv_transfer_params`` (or its error) under its room until the decode server sharing
    the room takes it. Either side may come first. A room nobody takes within ``ttl_s`` is
    dropped, and ``on_expire`` gets its parameters (to unpin the KV)."""

    def __init__(
        self,
        *,
        ttl_s: float = BOOTSTRAP_WAIT_S,
        on_expire: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError("ttl_s must be > 0")
        self.ttl_s = ttl_s
        self.on_expire = on_expire
        self._rooms: dict[int, asyncio.Future[_Room]] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def _room(self, room: int) -> asyncio.Future[_Room]:
        fut = self._rooms.get(room)
        if fut is None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            self._rooms[room] = fut
            loop.call_later(self.ttl_s, self._expire, room, fut)
        return fut

    def _expire(self, room: int, fut: asyncio.Future[_Room]) -> None:
        if self._rooms.get(room) is not fut:
            return
        del self._rooms[room]
        if not fut.done():
            fut.set_result((None, f"bootstrap room {room} expired"))
            return
        params, _ = fut.result()
        if params is not None and self.on_expire is not None:
            self.on_expire(params)

    def publish(self, room: int, params: Mapping[str, Any]) -> None:
        """File a finished prefill leg's ``kv_transfer_params`` under ``room``."""
        fut = self._room(room)
        if not fut.done():
            fut.set_result((dict(params), None))

    def fail(self, room: int, reason: str) -> None:
        """The prefill leg of ``room`` failed or was aborted."""
        fut = self._room(room)
        if not fut.done():
            fut.set_result((None, reason))

    async def take(self, room: int, timeout_s: float) -> dict[str, Any]:
        """Wait up to ``timeout_s`` for ``room``'s prefill leg and take its parameters.
        Raises :class:`EngineError` when the leg failed, or 504 when it did not come."""
        fut = self._room(room)
        try:
            params, reason = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            raise EngineTimeoutError(
                f"no prefill leg for bootstrap room {room} within {timeout_s:g} s"
            ) from None
        if self._rooms.get(room) is fut:
            del self._rooms[room]
        if params is None:
            raise EngineError(f"prefill leg of bootstrap room {room} failed: {reason}")
        return params


@runtime_checkable
class ReleasesKV(Protocol):
    """Optional engine extension: unpin a finished prefill leg's KV (False if unknown)."""

    def release_kv(self, request_id: str) -> bool: ...


@runtime_checkable
class NotifiesRemoteKV(Protocol):
    """Optional engine extension: an engine that tells prefill engines in other processes
    that it pulled their KV, through the releaser the server installs."""

    remote_releaser: Any


class HTTPKVReleaser:
    """Posts ``{"request_id"}`` to ``http://host:port/sim/kv/release`` in background tasks.

    ``release`` returns at once; failures are logged, never raised (the prefill side still
    frees the blocks at its pin timeout). :meth:`aclose` waits briefly for pending posts.
    """

    def __init__(self, *, timeout_s: float = 10.0) -> None:
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.sent = 0
        self.failed = 0

    def release(self, host: str, port: int, request_id: str) -> None:
        """Schedule the notification (needs a running event loop)."""
        task = asyncio.get_running_loop().create_task(self._post(host, port, request_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, host: str, port: int, request_id: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        url = f"http://{host_port(host, port)}{KV_RELEASE_PATH}"
        try:
            async with self._session.post(url, json={"request_id": request_id}) as resp:
                answer = await resp.read()
                ok = resp.status == 200
            if not ok:  # refused: the prefill engine keeps the KV until its pin timeout
                text = " ".join(answer.decode("utf-8", "replace").split())[:200]
                _log.warning(
                    "KV release of %s at %s refused: HTTP %d %s", request_id, url, resp.status, text
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok = False
            _log.warning("KV release of %s at %s failed: %r", request_id, url, exc)
        if ok:
            self.sent += 1
        else:
            self.failed += 1

    async def aclose(self, grace_s: float = 2.0) -> None:
        """Wait up to ``grace_s`` for pending posts, cancel the rest, close the session."""
        pending = set(self._tasks)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._session is not None:
            await self._session.close()
            self._session = None
