"""The admin API: instances, drain, policy switch, status and metrics (``/admin/…``).

Access is checked by :func:`sage_llm.gateway.auth.check_admin` (admin token, or loopback
clients only when none is configured). Routes:

* ``GET /admin/instances`` — registered instances with their live state
* ``POST /admin/instances`` — register one (ExecutionInstance fields, checked as a config
  file's instance entry; 409 on an id or an address in use)
* ``POST /admin/instances/{id}/drain`` — ``{"drain": true|false}`` (default true): stop or
  resume sending it new requests; in-flight ones finish
* ``DELETE /admin/instances/{id}`` — remove it: no new requests, in-flight ones finish
  (409 while a removal is still waiting for them)
* ``POST /admin/set_policy`` — ``{"policy": NAME, "params": {...}}``
* ``POST /admin/reload`` — read the ``[gateway]`` table again (the config file
  ``sage-llm serve`` or ``sage-llm launch`` started from) and apply its keys, tenants,
  admin token and request limits; 409 when the gateway has no file to read
* ``GET /admin/status`` — ``manager.get_status()`` plus per-instance metrics
* ``GET /admin/metrics`` — ``manager.get_metrics()`` as JSON plus per-instance metrics,
  ``get_scheduling_metrics()`` and ``get_pd_metrics()``
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import math
import typing
from collections.abc import Callable, Iterator, Mapping
from datetime import date, time
from time import time as wall_clock
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

from sage_llm.config import (
    at_address,
    check_instance,
    instance_fields,
    unknown_instance_keys,
)
from sage_llm.config_schema import InstanceConfig
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.errors import (
    ConfigError,
    ConflictError,
    EngineError,
    InvalidRequestError,
    PolicyNotFoundError,
)
from sage_llm.gateway.observe import ExpectHandler
from sage_llm.gateway.openai import read_body, read_json, validate
from sage_llm.gateway.schemas import (
    DrainRequest,
    InstanceSpec,
    LoadLoraAdapterRequest,
    ReloadRequest,
    SetPolicyRequest,
    UnloadLoraAdapterRequest,
)
from sage_llm.gateway.settings import (
    GatewaySettings,
    LiveSettings,
    ReloadOutcome,
    ResolvedGateway,
)
from sage_llm.request_json import json_object
from sage_llm.types import ExecutionInstance

log = logging.getLogger("sage_llm.gateway")

OPENED = "the gateway has no API key now: anyone who can reach it may use the OpenAI routes"
"""What a reload that took the last API key away says (its answer's ``warnings``, the log)."""

M = TypeVar("M", bound=BaseModel)

_INSTANCE_FIELDS = frozenset(f.name for f in dataclasses.fields(ExecutionInstance))
_LIVE_FIELDS = _INSTANCE_FIELDS - {f.name for f in dataclasses.fields(InstanceConfig)}
"""ExecutionInstance fields no config entry has: the live figures (``is_healthy`` …)."""
_SECRET_FIELDS = frozenset({"api_key"})


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, dates and times (a TOML file's metadata may hold them) as JSON
    values (recursively); non-finite floats become null."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, date | time):  # a datetime is a date
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN / Infinity
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return value


def instance_json(instance: ExecutionInstance) -> dict[str, Any]:
    """An instance as JSON, secrets left out."""
    out: dict[str, Any] = to_jsonable(instance)
    for name in _SECRET_FIELDS:
        if out.get(name) is not None:
            out[name] = "***"
    return out


_EXPECTED: dict[tuple[type, ...], str] = {
    (int,): "an integer", (int, float): "a number", (bool,): "true or false", (str,): "a string",
}  # fmt: skip


def _scalar_kinds() -> dict[str, tuple[type, ...]]:
    """The JSON types each scalar ExecutionInstance field takes (None aside)."""
    kinds: dict[str, tuple[type, ...]] = {}
    for name, hint in typing.get_type_hints(ExecutionInstance).items():
        args = set(typing.get_args(hint)) - {type(None)} or {hint}
        for allowed in _EXPECTED:
            if args <= set(allowed):
                kinds[name] = allowed
                break
    return kinds


def _no_coercion(body: dict[str, Any]) -> None:
    """Numbers, flags and strings as JSON types, as a config file needs them (``"80"`` is
    not a port, ``1`` not a flag): 400 naming the field."""
    kinds = _scalar_kinds()
    for key, value in body.items():
        allowed = kinds.get(key)
        if allowed is None or value is None:
            continue
        if isinstance(value, bool) != (allowed == (bool,)) or not isinstance(value, allowed):
            raise InvalidRequestError(
                f"{key}: must be {_EXPECTED[allowed]}, not {value!r}", param=key
            )


@contextlib.contextmanager
def _as_request_error(prefix: str | None = None) -> Iterator[None]:
    """A :class:`ConfigError` raised for a request's value as the 400 it is over HTTP
    (``invalid_request_error``, ``param`` the field, under ``prefix`` when given)."""
    try:
        yield
    except ConfigError as exc:
        param = exc.key if prefix is None or exc.key is None else f"{prefix}.{exc.key}"
        raise InvalidRequestError("; ".join(map(str, exc.each())), param=param) from None


GatewaySource = Callable[[], GatewaySettings]
"""Reads the ``[gateway]`` table again (``sage-llm serve``: its config file, checked whole);
raises :class:`~sage_llm.errors.ConfigError` for what is wrong. It may block: a reload
calls it in a thread."""


class AdminRoutes:
    """Handlers of the admin API, bound to one manager."""

    def __init__(
        self,
        manager: ControlPlaneManager,
        read_timeout_s: float | None = None,
        *,
        live: LiveSettings | None = None,
        reload_from: GatewaySource | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.manager = manager
        self.read_timeout_s = read_timeout_s
        """How long a request body may take to arrive (None: no limit)."""
        self.live = live
        """The settings the gateway's requests read, which ``POST /admin/reload`` replaces."""
        self.reload_from = reload_from
        self._reloading = asyncio.Lock()
        self.last_reload: dict[str, Any] | None = None
        """The last reload's end (``GET /admin/status``'s ``gateway.last_reload``)."""
        self.environ = environ
        """Where the ``*_env`` keys of a reloaded table built in code are looked up (None:
        the process's environment); a table the config loader read has read its own."""
        self.listening: tuple[str, int] | None = None
        """The address the gateway listens on (set once it is bound): an instance
        registered there would be sent the gateway's requests back."""

    def _instance_entry(self, instance: ExecutionInstance) -> dict[str, Any]:
        entry = instance_json(instance)
        live = self.manager.get_instance_metrics(instance.instance_id)
        entry["draining"] = live["draining"]
        entry["removing"] = live["removing"]
        return entry

    async def list_instances(self, request: web.Request) -> web.Response:
        data = [self._instance_entry(i) for i in self.manager.get_instances(removing=True)]
        return web.json_response({"object": "list", "data": data})

    def parse_instance(self, body: dict[str, Any]) -> ExecutionInstance:
        """An ExecutionInstance from a request body, checked as a config file's instance
        entry (:func:`~sage_llm.config.check_instance`: JSON types without coercion, names,
        ranges); the live figures an instance may carry (``is_healthy``, ``current_load``
        …, which no config entry has) only for their JSON types, and ``draining`` and
        ``removing`` as ``GET`` lists them (an entry sent back registers as it was listed:
        ``draining: true`` drained). 400 names the bad field."""
        unknown = unknown_instance_keys(body)
        if unknown:
            raise InvalidRequestError(
                f"{unknown[0]}: not an ExecutionInstance field", param=unknown[0]
            )
        validate(InstanceSpec, body)  # the required fields, as the OpenAPI document says
        _no_coercion({key: value for key, value in body.items() if key in _LIVE_FIELDS})
        with _as_request_error():
            instance = ExecutionInstance(**instance_fields(body))  # sim_* as in a file
        with _as_request_error():
            return check_instance(instance)

    async def add_instance(self, request: web.Request) -> web.Response:
        instance = self.parse_instance(await read_json(request, self.read_timeout_s))
        manager = self.manager
        listening = self.listening
        if (
            listening is not None
            and not manager.nominal(instance)
            and at_address(instance.host, instance.port, *listening)
        ):  # as a config file's entry there is refused
            raise InvalidRequestError(
                f"port: {instance.host}:{instance.port} is the gateway's own address: its "
                "requests would come back to the gateway",
                param="port",
            )
        with _as_request_error():  # checked as a config file's entry; 409 for a taken address
            self.manager.register_instance(instance)
        registered = next(  # as the list shows it (is_available: false when draining)
            i for i in self.manager.get_instances() if i.instance_id == instance.instance_id
        )
        return web.json_response(self._instance_entry(registered), status=201)

    async def drain_instance(self, request: web.Request) -> web.Response:
        instance_id = request.match_info["instance_id"]
        given = await self._optional_body(request, DrainRequest)
        drain = True if given is None else given.drain
        self.manager.drain_instance(instance_id, drain)  # 404 unknown, 409 being removed
        return web.json_response({"instance_id": instance_id, "draining": drain})

    async def remove_instance(self, request: web.Request) -> web.Response:
        instance_id = request.match_info["instance_id"]
        self.manager.unregister_instance(instance_id)  # 404 unknown, 409 being removed
        return web.json_response({"instance_id": instance_id, "removed": True})

    async def set_policy(self, request: web.Request) -> web.Response:
        raw = await read_body(request, self.read_timeout_s)
        req = validate(SetPolicyRequest, json_object(raw, infinity=True))  # 1e999: inf
        try:
            with _as_request_error("params"):
                self.manager.update_policy(req.policy, req.params)
        except PolicyNotFoundError as exc:
            exc.param = "policy"  # the body's field (the manager names its own argument)
            raise
        status = self.manager.get_status()
        return web.json_response(
            {
                "scheduling_policy": status["scheduling_policy"],
                "policy": to_jsonable(status["policy"]),
            }
        )

    async def reload(self, request: web.Request) -> web.Response:
        """Read the ``[gateway]`` table again and apply what a running gateway can take
        (:data:`~sage_llm.gateway.settings.RELOADABLE`: the API keys, the tenants, the admin
        token, the request limits, ``log_prompts``); a file with any problem changes
        nothing (400 ``invalid_config``, every problem with its file, line and key).
        Reloads run one at a time: the last one asked for is the one in use. A reload
        begun goes to its end (applied and counted) if its client leaves."""
        await self._optional_body(request, ReloadRequest)
        live, source = self.live, self.reload_from
        if live is None or source is None:
            raise ConflictError(
                "this gateway was not started from a config file: there is nothing to reload"
            )
        outcome = await asyncio.shield(self._reload(live, source))
        warnings = [OPENED] if outcome.opened else []
        return web.json_response(
            {
                "reloaded": True,
                "applied": list(outcome.applied),
                "restart_required": list(outcome.restart_required),
                "tenants_added": list(outcome.tenants_added),
                "tenants_removed": list(outcome.tenants_removed),
                "warnings": warnings,
            }
        )

    async def _reload(self, live: LiveSettings, source: GatewaySource) -> ReloadOutcome:
        environ = self.environ

        def read() -> tuple[ResolvedGateway, GatewaySettings]:
            table = source()
            return ResolvedGateway.from_settings(table, environ), table

        async with self._reloading:
            try:
                new, table = await asyncio.to_thread(read)
            except Exception as exc:
                problem = exc.message if isinstance(exc, ConfigError) else "internal error"
                self.last_reload = {"at": wall_clock(), "outcome": "failed", "error": problem}
                self.manager.metrics.on_gateway_reload(False)
                log.warning("gateway settings not reloaded (the settings before stay): %s", exc)
                raise
            outcome = live.reload(new, table)
        self.last_reload = {
            "at": wall_clock(),
            "outcome": "applied",
            "applied": list(outcome.applied),
            "restart_required": list(outcome.restart_required),
        }
        self.manager.metrics.on_gateway_reload(True)
        self.manager.metrics.track_users(outcome.tenants_added)
        log.info(
            "gateway settings reloaded: %s%s",
            ", ".join(outcome.applied) + " changed" if outcome.applied else "nothing changed",
            "; a restart is needed for " + ", ".join(outcome.restart_required)
            if outcome.restart_required
            else "",
        )
        if outcome.opened:
            log.warning("%s", OPENED)
        return outcome

    async def _optional_body(self, request: web.Request, schema: type[M]) -> M | None:
        """The request's JSON body as ``schema`` (400 naming a bad field); None when it has
        none (an optional body)."""
        raw = await read_body(request, self.read_timeout_s)
        return validate(schema, json_object(raw)) if raw.strip() else None

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        raw = await read_body(request, self.read_timeout_s)
        req = validate(LoadLoraAdapterRequest, json_object(raw))
        outcomes = await self.manager.load_lora_adapter(
            req.lora_name, req.lora_path, model=req.model, instances=req.instances
        )
        return _lora_answer(req.lora_name, "loaded", outcomes)

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        given = await self._optional_body(request, UnloadLoraAdapterRequest)
        instances = None if given is None else given.instances
        outcomes = await self.manager.unload_lora_adapter(name, instances=instances)
        return _lora_answer(name, "unloaded", outcomes)

    def _instance_metrics(self) -> dict[str, Any]:
        return {
            i.instance_id: to_jsonable(self.manager.get_instance_metrics(i.instance_id))
            for i in self.manager.get_instances(removing=True)
        }

    async def status(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = to_jsonable(self.manager.get_status())
        body["instances"] = self._instance_metrics()
        body["gateway"] = {
            "reloadable": self.live is not None and self.reload_from is not None,
            "last_reload": self.last_reload,
        }
        return web.json_response(body)

    async def metrics(self, request: web.Request) -> web.Response:
        manager = self.manager
        body: dict[str, Any] = to_jsonable(manager.get_metrics())
        body["instances"] = self._instance_metrics()
        body["scheduling"] = to_jsonable(manager.get_scheduling_metrics())
        body["pd"] = to_jsonable(manager.get_pd_metrics())
        return web.json_response(body)


def _lora_answer(name: str, done: str, outcomes: Mapping[str, str | None]) -> web.Response:
    """``{"lora_name", done: [instances], "failed": {instance: why}}``; a 502 naming every
    failure when none succeeded."""
    ok = [iid for iid, why in outcomes.items() if why is None]
    failed = {iid: why for iid, why in outcomes.items() if why is not None}
    if not ok:
        verb = done.removesuffix("ed")
        said = "; ".join(f"{iid}: {why}" for iid, why in failed.items())
        raise EngineError(f"no instance could {verb} LoRA adapter {name!r}: {said}")
    return web.json_response({"lora_name": name, done: ok, "failed": failed})


def add_admin_routes(
    app: web.Application, routes: AdminRoutes, expect_continue: ExpectHandler
) -> None:
    """Register the admin routes on ``app``, ``expect_continue`` answering their
    ``Expect`` headers (:func:`~sage_llm.gateway.observe.continue_or_refuse`)."""
    app.router.add_get("/admin/instances", routes.list_instances, expect_handler=expect_continue)
    app.router.add_post("/admin/instances", routes.add_instance, expect_handler=expect_continue)
    app.router.add_post(
        "/admin/instances/{instance_id}/drain",
        routes.drain_instance,
        expect_handler=expect_continue,
    )
    app.router.add_delete(
        "/admin/instances/{instance_id}", routes.remove_instance, expect_handler=expect_continue
    )
    app.router.add_post(
        "/admin/lora_adapters", routes.load_lora_adapter, expect_handler=expect_continue
    )
    app.router.add_delete(
        "/admin/lora_adapters/{name}", routes.unload_lora_adapter, expect_handler=expect_continue
    )
    app.router.add_post("/admin/set_policy", routes.set_policy, expect_handler=expect_continue)
    app.router.add_post("/admin/reload", routes.reload, expect_handler=expect_continue)
    app.router.add_get("/admin/status", routes.status, expect_handler=expect_continue)
    app.router.add_get("/admin/metrics", routes.metrics, expect_handler=expect_continue)
