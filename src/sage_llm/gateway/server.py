"""Serving the gateway: :func:`run_gateway` for ``sage-llm serve``, :func:`start_gateway`
for tests and benchmarks.

Both bind 127.0.0.1 by default and cancel a request's handler when its client disconnects
(so the request is cancelled in the manager and the engine call aborted). The listening
socket belongs to the lean server (:mod:`sage_llm.gateway.lean`), which serves the two
generation routes itself and hands every other connection to the aiohttp app; with
``gateway.lean_server = false``, or with tracing on, aiohttp's protocol serves all.

aiohttp answers what it cannot parse (a malformed request head) without the app and its
middlewares; its connection handlers here (:func:`json_error_protocols`) give those
answers the gateway's JSON error body too, and close the connection. They also time
request heads (aiohttp times none; the app times bodies): a head not whole
``read_timeout_s`` after its first byte gets the JSON 408 and its connection closes, as on
the lean front (:class:`HeadTimer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
from collections.abc import Callable, Mapping

from aiohttp import web

from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.gateway.admin import GatewaySource
from sage_llm.gateway.app import (
    ADMIN_KEY,
    LIVE_SETTINGS_KEY,
    MANAGER_KEY,
    SETTINGS_KEY,
    create_app,
)
from sage_llm.gateway.auth import is_loopback
from sage_llm.gateway.errors import error_body, protocol_error_body
from sage_llm.gateway.lean import SWEEP_FRACTION, LeanServer, read_timeout_body, request_line
from sage_llm.gateway.lean_routes import LEAN_ROUTES, LeanRoutes
from sage_llm.gateway.observe import (
    REQUEST_ID_HEADER,
    ErrorCounter,
    access_log,
    new_request_id,
    route_label,
    write_access_log,
)
from sage_llm.gateway.settings import GatewaySettings
from sage_llm.httpserve import new_runner
from sage_llm.request_json import unsupported_encoding
from sage_llm.types import host_port

log = logging.getLogger("sage_llm.gateway")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0
SHUTDOWN_GRACE_S = 0.5
"""What a shutdown gives the connections after its drain timeout: the moment in which the
endings of the requests it cut (a 503, an error event and ``[DONE]``) are written."""
_LEAST_WAIT_S = 0.01


_UNDECODABLE = re.compile(r"Can not decode content-encoding: ([^\n.]+)")
"""aiohttp's reason for a body encoding it cannot decode (brotli without its package …)."""


_HEAD_STATE = frozenset({"_waiter", "_messages", "_request_count"})
"""What :class:`HeadTimer` reads of aiohttp's connection handler (its state between
requests: aiohttp 3.9 to 3.14 keep it so); without it heads are not timed."""


_LINE_KEPT = 200
"""Bytes of an arriving head kept for the 408's log line and route: its request line."""
_LINE_START = re.compile(rb"[A-Z][!#$%&'*+.^_`|~0-9A-Za-z-]*(?: |$)")
"""How a request line starts: its method (a token, ``M-SEARCH`` too, or the first
letters of one), then a space. A pipelined head split inside its method passes for one
(``T /v1/models`` of ``GET``): only what the read shows is known."""


class HeadTimer:
    """Times the request heads arriving on aiohttp's connections: a head that has not
    arrived whole ``limit_s`` after its first byte gets a JSON 408, counted by
    ``count_error`` and access-logged, and its connection closes. One sweep per tenth of
    the limit looks for them, while any head is arriving (a head sets no timer). A head
    whose first bytes came in the read that ended the request before it (pipelined) is
    timed from its next read: aiohttp's parser keeps those bytes out of sight; with no next
    read, the keep-alive timeout closes the connection."""

    def __init__(self, limit_s: float, count_error: ErrorCounter | None = None) -> None:
        self.limit_s = limit_s
        self.count_error = count_error
        self.arriving: dict[_JsonErrorRequestHandler, tuple[float, bytes, int]] = {}
        """Each connection with a head arriving: when its first byte came, its first bytes
        (its request line, as far as it came, for the log and the route), and how many
        requests its handler had read whole then."""
        self._sweep: asyncio.TimerHandle | None = None

    def begin(self, handler: _JsonErrorRequestHandler, at: float, data: bytes) -> None:
        """``data`` of a head arrived (its first bytes at ``at``): timed from its first."""
        arriving = self.arriving.get(handler)
        if arriving is not None:
            since, first, count = arriving
            if first and len(first) < _LINE_KEPT and b"\r\n" not in first:  # the line goes on
                self.arriving[handler] = (since, (first + data)[:_LINE_KEPT], count)
            return
        # what does not start as a request line does ("GET /…", or a method's first
        # letters) is the rest of a head begun unseen (pipelined): its line is not known
        line = data[:_LINE_KEPT] if _LINE_START.match(data) else b""
        self.arriving[handler] = (at, line, handler.requests_read)
        if self._sweep is None:
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(self.limit_s * SWEEP_FRACTION, self._look)

    def end(self, handler: _JsonErrorRequestHandler) -> None:
        self.arriving.pop(handler, None)

    def _look(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        for handler, (since, first, count) in list(self.arriving.items()):
            if handler.requests_read != count:  # its head came: its request is served
                self.end(handler)
            elif now - since >= self.limit_s:
                self.end(handler)
                self._time_out(handler, now - since, first)
        if self.arriving:
            self._sweep = asyncio.get_running_loop().call_later(
                self.limit_s * SWEEP_FRACTION, self._look
            )

    def _time_out(self, handler: _JsonErrorRequestHandler, waited_s: float, first: bytes) -> None:
        transport = handler.transport
        if transport is None or transport.is_closing():
            return
        rid = new_request_id()
        method, path = request_line(first)
        if self.count_error is not None:
            self.count_error(route_label(path), 408)
        if access_log.isEnabledFor(logging.INFO):
            write_access_log(rid, method, path, 408, waited_s * 1000.0, None)
        body = read_timeout_body(self.limit_s)
        head = (
            "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{REQUEST_ID_HEADER}: {rid}\r\n"
            "Connection: close\r\n\r\n"
        )
        transport.write(head.encode("latin-1") + body)
        handler.force_close()  # closes the transport once the answer has left


class _JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, answering what fails outside the app (a request head it
    cannot parse: 400; an error outside the middlewares: 500) with the gateway's JSON error
    body, a fresh ``X-Request-Id`` and ``Connection: close``, instead of ``text/plain``. It
    is logged under that id: a 400 as one line with the parser's reason, without the bytes
    it quotes (an ``Authorization`` header among them would put a key in the log); a 500
    with its traceback. Each is counted (``count_error``, as the app counts its error
    answers; route ``other``: the head's path cannot be trusted) and access-logged."""

    __slots__ = ()
    count_error: ErrorCounter | None = None  # set on the subclass json_error_protocols makes
    heads: HeadTimer | None = None  # likewise

    @property
    def requests_read(self) -> int:
        """How many requests it has read whole (aiohttp counts them as their heads come)."""
        return int(self._request_count)

    @property
    def waiting(self) -> bool:
        """Whether it waits for a request (none is being served, none read whole)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def data_received(self, data: bytes) -> None:
        heads = self.heads
        if heads is None:
            super().data_received(data)
            return
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:  # a head came whole (what follows it is not timed)
            heads.end(self)
        elif data and self.waiting:  # a head begins (or goes on) arriving
            heads.begin(self, self._loop.time(), data)

    def head_began(self, at: float, data: bytes) -> None:
        """The bytes about to be handed over (by the lean front) began to arrive at
        ``at``: a head not whole among them is timed from then."""
        if self.heads is not None:
            self.heads.begin(self, at, data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.heads is not None:
            self.heads.end(self)
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        rid = new_request_id()
        undecodable = _UNDECODABLE.search(message or "") if status == 400 else None
        if undecodable is not None:  # a body encoding aiohttp cannot decode (brotli, zstd)
            status = 415
            body = error_body(
                unsupported_encoding(undecodable.group(1)), "invalid_request_error", status,
                "content-encoding",
            )  # fmt: skip
        else:
            body = protocol_error_body(status, message)
        if status >= 500:
            log.error(
                "request %s failed outside the app", rid, exc_info=exc, extra={"request_id": rid}
            )
        else:  # the client's mistake: its reason, never the bytes (they may hold a key)
            log.info(
                "request %s from %s: %d %s", rid, request.remote, status,
                body["error"]["message"], extra={"request_id": rid},
            )  # fmt: skip
        if self.count_error is not None:
            self.count_error("other", status)
        if access_log.isEnabledFor(logging.INFO):
            write_access_log(rid, request.method, request.path, status, 0.0, None)
        if request.writer.output_size > 0:  # as aiohttp's own: the answer had begun
            raise ConnectionError(
                "Response is sent already, cannot send another response with the error message"
            )
        resp = web.json_response(
            body, status=status, headers={REQUEST_ID_HEADER: rid, "Connection": "close"}
        )
        resp.force_close()  # the request's framing is unknown: nothing after it can be read
        return resp


def json_error_protocols(
    server: web.Server,
    count_error: ErrorCounter | None = None,
    read_timeout_s: float | None = None,
) -> Callable[[], web.RequestHandler]:
    """A protocol factory like aiohttp's ``server`` (its handlers, set up as ``server``
    sets them up) whose handlers answer failures outside the app with JSON errors, each
    counted by ``count_error``, and a head not whole ``read_timeout_s`` after its first
    byte with a JSON 408 (None: heads are not timed)."""
    heads = HeadTimer(read_timeout_s, count_error) if read_timeout_s else None
    kept = set(getattr(web.RequestHandler, "__slots__", ()))
    if heads is not None and not _HEAD_STATE.issubset(kept):
        log.warning(
            "this aiohttp's connection handler keeps no %s: request heads on its "
            "connections are not timed",
            ", ".join(sorted(_HEAD_STATE)),
        )
        heads = None
    handler_class = type(
        "_JsonErrorRequestHandler",
        (_JsonErrorRequestHandler,),
        {
            "__slots__": (),
            "count_error": staticmethod(count_error) if count_error else None,
            "heads": heads,
        },
    )

    def protocol() -> web.RequestHandler:
        handler = server()
        # the same object layout (no slots added): only handle_error differs
        handler.__class__ = handler_class
        return handler

    return protocol


class _Closing:
    """Whether the gateway is stopping: from then on, aiohttp's answers say ``Connection:
    close`` (the lean front's have their own flag), so that a client or a load balancer
    stops sending on connections that are about to close."""

    __slots__ = ("closing",)

    def __init__(self) -> None:
        self.closing = False

    async def mark(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """An ``on_response_prepare`` hook: close the connection after this answer."""
        if self.closing:  # (aiohttp has written its Connection header by now, or not)
            response.force_close()
            response.headers["Connection"] = "close"


class GatewaySite:
    """A serving gateway: ``await site.cleanup()`` stops accepting connections, lets
    requests in progress finish (up to the shutdown timeout) and stops the app."""

    def __init__(
        self,
        runner: web.AppRunner,
        *,
        server: asyncio.AbstractServer | None = None,
        lean: LeanServer | None = None,
        shutdown_timeout_s: float = 5.0,
        closing: _Closing | None = None,
    ) -> None:
        self.runner = runner
        self._server = server
        self._lean = lean
        self._shutdown_timeout_s = shutdown_timeout_s
        self._closing = closing

    @property
    def lean(self) -> bool:
        """Whether the lean server serves the generation routes."""
        return self._lean is not None

    def stop_accepting(self) -> None:
        """Take no new connection; answers on kept-alive ones say ``Connection: close``."""
        if self._server is not None:
            self._server.close()
        if self._lean is not None:
            self._lean.closing = True
        if self._closing is not None:
            self._closing.closing = True

    async def cleanup(self, timeout_s: float | None = None) -> None:
        """Stop: requests in progress get ``timeout_s`` (default: the shutdown timeout) to
        finish on either front, then are cancelled and their connections closed."""
        self.stop_accepting()
        timeout = self._shutdown_timeout_s if timeout_s is None else max(0.0, timeout_s)
        if self._lean is not None:
            await self._lean.shutdown(timeout)
        server = self.runner.server
        if server is not None and timeout_s is not None:
            # aiohttp's connections, in the time given: the runner would give them its
            # whole shutdown timeout again, aiohttp waits what it is given twice (for the
            # handler, then for it cancelled) and reads 0 as no limit
            await server.shutdown(max(timeout / 2, _LEAST_WAIT_S))
        await self.runner.cleanup()


async def serve_app(
    app: web.Application, host: str, port: int, *, shutdown_timeout_s: float
) -> tuple[GatewaySite, int]:
    """Serve a gateway ``app`` (made by :func:`~sage_llm.gateway.app.create_app`) on
    ``host:port``; the site and the bound port (``port=0`` picks a free one)."""
    settings = app[SETTINGS_KEY]
    closing = _Closing()
    app.on_response_prepare.append(closing.mark)
    runner = new_runner(app, shutdown_timeout_s=shutdown_timeout_s)
    await runner.setup()
    try:
        assert runner.server is not None
        fallback = json_error_protocols(
            runner.server, app[MANAGER_KEY].metrics.on_http_error, settings.read_timeout_s
        )
        lean: LeanServer | None = None
        protocol: Callable[[], asyncio.Protocol] = fallback
        if settings.lean_server and not settings.tracing:
            routes = LeanRoutes(app[MANAGER_KEY], app[LIVE_SETTINGS_KEY])
            protocol = lean = LeanServer(
                routes,
                fallback,
                routes=LEAN_ROUTES,
                max_body_bytes=settings.max_body_bytes,
                cors=bool(settings.cors_origins),
                read_timeout_s=settings.read_timeout_s,
                on_read_timeout=routes.read_timed_out,
                on_client_gone=routes.client_gone_reading,
            )
        server = await asyncio.get_running_loop().create_server(
            protocol, host, port, reuse_address=True, backlog=1024
        )
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(server.sockets[0].getsockname()[1])
    app[ADMIN_KEY].listening = (host, bound)  # registering an instance there is refused
    site = GatewaySite(
        runner, server=server, lean=lean, shutdown_timeout_s=shutdown_timeout_s, closing=closing
    )
    return site, bound


async def start_gateway(
    manager: ControlPlaneManager,
    gateway: GatewaySettings | None = None,
    host: str = DEFAULT_HOST,
    port: int = 0,
    *,
    manage_lifecycle: bool = False,
    environ: Mapping[str, str] | None = None,
    shutdown_timeout_s: float = 5.0,
    reload_from: GatewaySource | None = None,
) -> tuple[GatewaySite, int]:
    """Start serving ``manager``; returns the site (``await site.cleanup()`` stops it)
    and the bound port (``port=0`` picks a free one).

    The caller owns the manager unless ``manage_lifecycle=True`` (then the app starts it
    now and stops it on cleanup). ``reload_from`` reads the ``[gateway]`` table again for
    ``POST /admin/reload``.
    """
    app = create_app(
        manager,
        gateway,
        manage_lifecycle=manage_lifecycle,
        environ=environ,
        reload_from=reload_from,
    )
    return await serve_app(app, host, port, shutdown_timeout_s=shutdown_timeout_s)


async def _loopback_only(host: str) -> bool:
    """Whether every address ``host`` binds is a loopback one (``127.1``, ``LOCALHOST``
    and ``::1`` as well as ``127.0.0.1``); the empty host binds every interface."""
    if not host:
        return False
    if is_loopback(host):
        return True
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(is_loopback(str(info[4][0])) for info in infos)


def _watch_signals(
    stop: asyncio.Event, hurry: asyncio.Event, listening: asyncio.Event, *, terminate: bool = True
) -> Callable[[], None] | None:
    """Watch SIGTERM, SIGHUP and SIGINT (Ctrl-C) on the loop, where it can (the main
    thread, Unix), until the shutdown is over; returns what undoes it (None where it cannot
    watch). SIGHUP counts as SIGTERM, and is watched only where it would otherwise end the
    process (not under ``nohup``, not when the application handles it). Without
    ``terminate``, SIGTERM and SIGHUP are left to the caller (who sets ``stop``).

    The first of them sets ``stop``: a graceful shutdown. A second SIGTERM is logged and
    ignored, so it cannot cut the shutdown short (a launcher's engines would go with it). A
    second Ctrl-C sets ``hurry``: the requests still in flight end now, each with its
    reason (a whole answer's 503, a stream's error event and ``[DONE]``), rather than the
    process dying under them; a third raises ``KeyboardInterrupt``, Python's own way out, as
    does a Ctrl-C before ``listening`` is set (while the gateway starts). Ctrl-C is taken
    over only from Python's or ``asyncio.run``'s handling of it."""
    loop = asyncio.get_running_loop()

    def sigterm(name: str) -> None:
        if stop.is_set():
            log.warning("%s again: already shutting down", name)
            return
        log.info("%s received", name)
        stop.set()

    def sigint() -> None:
        if not listening.is_set():  # still starting: Ctrl-C interrupts it, as it always did
            raise KeyboardInterrupt
        if not stop.is_set():
            log.info("Ctrl-C: shutting down (Ctrl-C again ends the requests in flight now)")
            stop.set()
        elif not hurry.is_set():
            log.warning("Ctrl-C again: ending the requests in flight now")
            hurry.set()
        else:  # a third: the way out, as Python's own Ctrl-C
            log.warning("Ctrl-C a third time: exiting now")
            raise KeyboardInterrupt

    before = signal.getsignal(signal.SIGINT)  # asyncio.run's own handler, put back after
    # Ctrl-C is taken over only from Python's or asyncio.run's handling: an application
    # that set its own keeps it
    bound = getattr(before, "func", before)  # asyncio.run's: a partial of Runner._on_sigint
    take_sigint = before is signal.default_int_handler or (
        getattr(bound, "__func__", None) is getattr(asyncio.Runner, "_on_sigint", None)
    )
    # SIGHUP (a closed terminal, a dropped SSH session) as SIGTERM, unless it is ignored
    # (nohup) or the application's own
    hangup = getattr(signal, "SIGHUP", None)
    take_sighup = terminate and hangup is not None and signal.getsignal(hangup) is signal.SIG_DFL
    try:
        if terminate:
            loop.add_signal_handler(signal.SIGTERM, sigterm, "SIGTERM")
        if take_sighup:
            loop.add_signal_handler(signal.SIGHUP, sigterm, "SIGHUP")
        if take_sigint:
            loop.add_signal_handler(signal.SIGINT, sigint)
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread / not Unix
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            if terminate:
                loop.remove_signal_handler(signal.SIGTERM)
            if take_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
        return None

    def undo() -> None:
        if terminate:
            loop.remove_signal_handler(signal.SIGTERM)
        if take_sighup:
            loop.remove_signal_handler(signal.SIGHUP)
        if take_sigint:
            loop.remove_signal_handler(signal.SIGINT)
            # asyncio.run's handler only while its run lasts (after a KeyboardInterrupt it
            # has ended: Python's own then, for a later asyncio.run to take over)
            main_task = getattr(before, "keywords", {}).get("main_task")
            ended = isinstance(main_task, asyncio.Task) and (
                main_task.done() or main_task.cancelling() > 0
            )
            signal.signal(signal.SIGINT, signal.default_int_handler if ended else before)

    return undo


async def run_gateway(
    manager: ControlPlaneManager,
    gateway: GatewaySettings,
    *,
    host: str | None = None,
    port: int | None = None,
    ready: asyncio.Event | None = None,
    shutdown_timeout_s: float | None = None,
    stop: asyncio.Event | None = None,
    reload_from: GatewaySource | None = None,
) -> None:
    """Start the manager, serve until cancelled or until the process gets SIGTERM, then
    shut down gracefully: take no new connection, and let the requests in flight finish
    for up to ``shutdown_timeout_s`` (default: the settings' ``shutdown_timeout_s``, else
    30 s) while new requests on open connections get 503; then the manager stops, which
    ends what is left with a reason (a whole answer's 503, a stream's error event and
    ``[DONE]``), and the connections close. ``host``/``port`` override the settings;
    ``ready`` is set once listening. Ctrl-C (SIGINT) stops it as SIGTERM does; a second
    Ctrl-C during the shutdown ends the requests still in flight at once, each with its
    reason (see :func:`_watch_signals`). SIGHUP counts as SIGTERM unless it is ignored or
    the application's own. With ``stop``, setting it shuts the gateway down as SIGTERM
    does, and SIGTERM and SIGHUP are left to the caller (a launcher keeps its own handlers
    throughout: a signal is never left to its default action in between).
    ``reload_from`` reads the ``[gateway]`` table again for ``POST /admin/reload``.
    """
    if shutdown_timeout_s is None:
        shutdown_timeout_s = float(
            getattr(gateway, "shutdown_timeout_s", None) or DEFAULT_SHUTDOWN_TIMEOUT_S
        )
    bind_host = host if host is not None else (gateway.host or DEFAULT_HOST)
    bind_port = port if port is not None else gateway.port
    if gateway.workers > 1:
        log.warning(
            "gateway.workers = %d ignored: one process serves one control plane "
            "(its queue and fleet state are not shared between processes)",
            gateway.workers,
        )
    terminate = stop is None
    stop = asyncio.Event() if stop is None else stop
    hurry, listening = asyncio.Event(), asyncio.Event()
    # until the shutdown is over, not only until a signal
    unwatch = _watch_signals(stop, hurry, listening, terminate=terminate)
    try:
        await manager.start()
        try:
            app = create_app(manager, gateway, reload_from=reload_from)
            runner, bound = await serve_app(
                app, bind_host, bind_port, shutdown_timeout_s=shutdown_timeout_s
            )
            try:
                log.info("gateway listening on http://%s", host_port(bind_host, bound))
                open_to_all = not app[SETTINGS_KEY].api_keys  # (the tenants' among them)
                if open_to_all and not await _loopback_only(bind_host):
                    log.warning(
                        "gateway on %s has no API key: anyone who can reach it may use it "
                        "(set gateway.api_keys, api_keys_env or api_keys_file)",
                        bind_host,
                    )
                listening.set()
                if ready is not None:
                    ready.set()
                await stop.wait()
            finally:
                log.info(
                    "gateway shutting down: finishing in-flight requests (up to %g s)",
                    shutdown_timeout_s,
                )
                loop = asyncio.get_running_loop()
                deadline = loop.time() + shutdown_timeout_s
                runner.stop_accepting()
                # the manager ends what is still running with a reason while the
                # connections are open to carry it; then they close, in what is left of
                # the timeout (and a moment to write those endings): an answer its client
                # has stopped reading does not get the timeout a second time
                await manager.stop(drain_timeout_s=shutdown_timeout_s, hurry=hurry)
                left = 0.0 if hurry.is_set() else deadline - loop.time()
                await runner.cleanup(max(left, SHUTDOWN_GRACE_S))
        finally:
            await manager.stop(drain_timeout_s=shutdown_timeout_s, hurry=hurry)
            log.info("gateway stopped")
    finally:
        if unwatch is not None:
            unwatch()
