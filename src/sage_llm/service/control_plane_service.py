"""ControlPlaneVLLMService: a SAGE service that sends requests through the control plane.

The seed proposal's "option 1". The service owns a
:class:`~sage_llm.control_plane.manager.ControlPlaneManager` built from the shared config
model (:func:`sage_llm.control_plane.builder.build_manager`: the configured instances, or
an embedded simulated fleet when none are configured) and runs it on its own event loop
thread, started by ``setup()`` and stopped by ``cleanup()``. ``process`` is synchronous, as
SAGE operators call it, and safe to call from many threads at once; ``aprocess`` is its
awaitable twin::

    env.register_service("llm", ControlPlaneVLLMService, {"scheduling_policy": "priority"})
    ...
    class Ask(MapFunction):
        def execute(self, question):
            return self.call_service("llm", {"task": "generate", "inputs": question,
                                             "options": {"priority": "HIGH"}}, timeout=120)

Tasks: ``generate``, ``embed``, ``show_instances``, ``health_check``, ``get_metrics``,
``set_policy``, ``show_models``, and the fleet's changes at run time: ``register_instance``,
``drain_instance``, ``unregister_instance``. See ``docs/service.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Collection, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from sage_llm.config import SageConfig, instance_fields, load_config, unknown_instance_keys
from sage_llm.control_plane.builder import build_manager
from sage_llm.control_plane.manager import ControlPlaneManager, EngineFactory
from sage_llm.errors import (
    ConfigError,
    ControlPlaneNotRunningError,
    DeadlineExceededError,
    EngineError,
    InvalidRequestError,
    PolicyNotFoundError,
    SageLLMError,
)
from sage_llm.service.backends import model_not_served
from sage_llm.service.base import ManagedService
from sage_llm.service.config import ConfigSource, control_plane_service_config
from sage_llm.service.embeddings import (
    EMBED_OPTIONS,
    EmbedRequest,
    embed_result,
    parse_embed,
    vectors_from_openai,
)
from sage_llm.service.payloads import (
    GENERATE_OPTIONS,
    Payload,
    PromptInput,
    RequestDefaults,
    locate_error,
    located,
    parse_generate,
    parse_payload,
    request_ids,
)
from sage_llm.service.results import generation, generation_entry, to_metadata
from sage_llm.service.runner import LoopFactory, LoopThread, check_loop_factory
from sage_llm.service.views import instances_view, metrics_view, models_view, result_info
from sage_llm.types import ChoiceResult, ExecutionInstance, RequestMetadata, RequestResult

__all__ = ["CONTROL_PLANE_TASKS", "WEIGHTS_NOT_MANAGED", "ControlPlaneVLLMService"]

T = TypeVar("T")

_SET_POLICY_OPTIONS = frozenset({"policy", "params"})
CONTROL_PLANE_TASKS: Mapping[str, Collection[str]] = {
    "generate": GENERATE_OPTIONS, "embed": EMBED_OPTIONS, "show_instances": (),
    "health_check": (), "get_metrics": (), "set_policy": _SET_POLICY_OPTIONS,
    "show_models": (), "register_instance": (), "drain_instance": ("drain",),
    "unregister_instance": (), "download_model": (), "delete_model": (), "fine_tune": (),
}  # fmt: skip
"""The tasks, each with the options it takes (in ``options``, or at the payload's top
level)."""
_NO_INPUTS = frozenset({"show_instances", "health_check", "get_metrics", "show_models"})
WEIGHTS_NOT_MANAGED = (
    "task {task!r} is not supported by sage-llm: manage weights on the engine host "
    "(the engines load their models themselves)"
)


class ControlPlaneVLLMService(ManagedService):
    """Generation and embeddings through a control plane (scheduling, routing, PD).

    ``config``: a dict (the bare ``[services.llm_control_plane]`` table, or with
    ``config_path``), a :class:`~sage_llm.config.SageConfig`, a TOML path, or None for the
    embedded simulated fleet. ``loop_factory`` makes the service's event loop (default
    ``asyncio.new_event_loop``); ``engine_factory`` overrides how instances are reached.
    """

    def __init__(
        self,
        config: ConfigSource = None,
        *,
        loop_factory: LoopFactory | None = None,
        engine_factory: EngineFactory | None = None,
        request_defaults: RequestDefaults | None = None,
    ) -> None:
        super().__init__()
        self._named_as: Callable[[], str] | None = None
        """The name of the service this one serves for (``VLLMService`` with
        ``use_control_plane``): its threads, logs and errors go by that name."""
        parsed = control_plane_service_config(config, defaults=request_defaults)
        self.config: SageConfig = parsed.sage
        self.defaults: RequestDefaults = parsed.defaults
        check_loop_factory(loop_factory)
        self._loop_factory = loop_factory
        self._engine_factory = engine_factory
        self._lock = threading.Lock()
        self._runner: LoopThread | None = None
        self._manager: ControlPlaneManager | None = None

    @classmethod
    def from_toml(cls, path: str | Path, **kwargs: Any) -> ControlPlaneVLLMService:
        """A service configured by a TOML file (the seed's ``[services.llm_control_plane]``)."""
        return cls(load_config(path), **kwargs)

    # -- lifecycle -------------------------------------------------------------------------

    def setup(self) -> None:
        """Start the event loop thread and the control plane (idempotent)."""
        with self._lock:
            if self._runner is not None:
                return
            runner = LoopThread(f"sage-llm-{self.name}", self._loop_factory)
            runner.start(self._astart)
            self._runner = runner
        cp = self.config.control_plane
        self.logger.info(
            f"{self.name}: control plane started (policy={cp.scheduling_policy}, "
            f"routing={cp.routing_strategy}, pd={cp.enable_pd_separation}, "
            f"instances={len(self.config.fleet())}"
            f"{', embedded simulated fleet' if not cp.instances else ''})"
        )

    def cleanup(self) -> None:
        """Stop the control plane (requests still running are cancelled) and the loop."""
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop(self._astop)

    @property
    def is_running(self) -> bool:
        runner = self._runner
        return runner is not None and runner.running

    async def _astart(self) -> None:
        manager = build_manager(self.config, engine_factory=self._engine_factory)
        await manager.start()
        self._manager = manager

    async def _astop(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            await manager.stop()

    @property
    def name(self) -> str:
        """The name of the service this one serves for, when it does; else the runtime's
        name for it, else the class name."""
        return super().name if self._named_as is None else self._named_as()

    # -- requests --------------------------------------------------------------------------

    def process(self, payload: Any) -> Any:
        """Run one ``{"task", "inputs", "options"}`` payload and return its result."""
        work = self._plan(parse_payload(payload, CONTROL_PLANE_TASKS))
        return self._runner_or_raise(work).run(work)

    async def aprocess(self, payload: Any) -> Any:
        """:meth:`process` for asyncio callers: runs on the service loop, awaited here."""
        work = self._plan(parse_payload(payload, CONTROL_PLANE_TASKS))
        return await self._runner_or_raise(work).arun(work)

    def _runner_or_raise(self, work: Coroutine[Any, Any, Any]) -> LoopThread:
        runner = self._runner
        if runner is None:
            work.close()
            raise self._not_set_up()
        return runner

    def _plan(self, req: Payload) -> Coroutine[Any, Any, Any]:
        """Validate ``req`` here, in the caller's thread; the coroutine runs on the loop."""
        task, options = req.task, req.options
        if task == "generate":
            return self._generate(parse_generate(req.inputs, options, self.defaults))
        if task == "embed":
            embed = parse_embed(req.inputs, options, self.defaults.timeout_s)
            return located(lambda: self._embed(embed), gave_model=embed.model is not None)
        if task == "set_policy":
            name, params, named_in = _policy_args(req)
            return self._on_loop(lambda cp: _set_policy(cp, name, params, named_in))
        if task == "register_instance":
            instance = _instance_arg(req)
            return self._on_loop(lambda cp: _register(cp, instance))
        if task in ("drain_instance", "unregister_instance"):
            return self._on_loop(_fleet_change(req))
        if task in ("download_model", "delete_model", "fine_tune"):
            raise InvalidRequestError(WEIGHTS_NOT_MANAGED.format(task=task), param="task")
        if options:
            key = next(iter(options))
            raise InvalidRequestError(f"task {task!r} takes no options", param=f"options.{key}")
        if req.inputs is not None and task in _NO_INPUTS:  # (not a filter: said so)
            raise InvalidRequestError(f"task {task!r} takes no inputs", param="inputs")
        if task == "health_check":
            return self._check_health()
        views: dict[str, Callable[[ControlPlaneManager], Any]] = {
            "show_instances": instances_view,
            "get_metrics": metrics_view,
            "show_models": lambda cp: models_view(cp.get_status()["models"]),
        }
        return self._on_loop(views[task])

    async def _on_loop(self, fn: Callable[[ControlPlaneManager], T]) -> T:
        return fn(self._require_manager())

    async def _check_health(self) -> dict[str, bool]:
        return await self._require_manager().check_health()  # probed now

    def _require_manager(self) -> ControlPlaneManager:
        if self._manager is None:
            raise ControlPlaneNotRunningError(f"{self.name}: the control plane is not running")
        return self._manager

    async def _generate(self, items: list[PromptInput]) -> list[dict[str, Any]]:
        cp = self._require_manager()
        metas = [
            to_metadata(item, rid) for item, rid in zip(items, request_ids(items), strict=True)
        ]
        timeouts = [i.options.timeout_s for i in items if i.options.timeout_s is not None]
        timeout = min(timeouts) if timeouts else None
        many = len(metas) > 1
        submitted: list[str] = []

        async def result(index: int, rid: str) -> RequestResult:
            # a failure raises with its type: an engine's refusal of the request is an
            # InvalidRequestError naming the field, as VLLMService raises it
            try:
                return await cp.wait_for_result(rid, raise_failure=True)
            except SageLLMError as exc:
                unknown = None  # an engine's 404 for the model: as VLLMService says it
                if isinstance(exc, EngineError):
                    named = items[index].options.model is not None
                    unknown = model_not_served(exc, metas[index].model_name, named=named)
                locate_error(unknown or exc, f"inputs[{index}]" if many else None)
                if unknown is None:
                    raise
                raise unknown from exc

        bound = cp.max_queue_size
        if len(metas) > bound:  # a retry would be refused the same way: no retry hint
            raise InvalidRequestError(
                f"a batch of {len(metas)} inputs is more than the control plane's queue holds "
                f"(max_queue_size {bound}): it is queued whole before any of it runs, so send "
                f"it in parts of at most {bound}",
                param="inputs",
            )
        try:
            # the whole batch is queued before any of it runs: the policy orders it
            for index, meta in enumerate(metas):
                try:
                    submitted.append(await cp.submit_request(meta))
                except SageLLMError as exc:
                    locate_error(exc, f"inputs[{index}]" if many else None)
                    raise
            async with asyncio.timeout(timeout):
                results = await asyncio.gather(*(result(i, r) for i, r in enumerate(submitted)))
        except TimeoutError:
            await _cancel(cp, submitted)
            raise DeadlineExceededError(
                f"generate did not finish within the {timeout} s timeout"
            ) from None
        except BaseException:
            await _cancel(cp, submitted)  # the other inputs' requests are cancelled
            raise
        return [_entry(meta, res) for meta, res in zip(metas, results, strict=True)]

    async def _embed(self, req: EmbedRequest) -> dict[str, Any]:
        cp = self._require_manager()
        try:
            async with asyncio.timeout(req.timeout_s):
                answer = await cp.embed(req.model, req.texts)
        except TimeoutError:
            raise DeadlineExceededError(
                f"embed did not finish within the {req.timeout_s} s timeout"
            ) from None
        vectors = vectors_from_openai(answer, len(req.texts))
        model = answer.get("model") or req.model or ",".join(cp.get_status()["models"])
        return embed_result(str(model), vectors, req.normalize)


def _entry(meta: RequestMetadata, result: RequestResult) -> dict[str, Any]:
    wanted = meta.extra_body.get("logprobs")
    asked = wanted is not None and wanted is not False  # a count of 0 asks (0 == False)
    choices = result.choices or [  # (several with n > 1)
        ChoiceResult(0, result.text, result.finish_reason, result.token_ids, result.logprobs)
    ]
    entry = generation_entry(
        request_id=result.request_id,
        generations=[
            generation(c.text, c.token_ids, c.logprobs if asked else None, c.finish_reason)
            for c in choices
        ],
        input_tokens=result.prompt_tokens,
        output_tokens=result.completion_tokens,
    )
    entry["sage"] = result_info(meta, result)
    return entry


async def _cancel(cp: ControlPlaneManager, request_ids: list[str]) -> None:
    for rid in request_ids:
        with contextlib.suppress(SageLLMError):  # already ended or forgotten
            await cp.cancel_request(rid)


def _instance_arg(req: Payload) -> ExecutionInstance:
    """``register_instance``'s inputs: a dict of :class:`ExecutionInstance` fields, as an
    ``[[instances]]`` entry of the config has them (checked as one when registered)."""
    if req.options:
        key = next(iter(req.options))
        raise InvalidRequestError(
            "register_instance takes the instance as inputs, no options", param=f"options.{key}"
        )
    fields = req.inputs
    if not isinstance(fields, dict):
        raise InvalidRequestError(
            "register_instance needs the instance's fields as a dict in inputs", param="inputs"
        )
    for key in unknown_instance_keys(fields):
        raise InvalidRequestError(f"{key!r} is not an instance field", param=f"inputs.{key}")
    for key in ("instance_id", "host", "port", "model_name"):
        if key not in fields:
            raise InvalidRequestError(f"the instance needs {key}", param=f"inputs.{key}")
    try:
        return ExecutionInstance(**instance_fields(fields))
    except ConfigError as exc:
        raise InvalidRequestError(exc.detail, param=f"inputs.{exc.key}") from None


def _register(cp: ControlPlaneManager, instance: ExecutionInstance) -> dict[str, Any]:
    cp.register_instance(instance)  # ConfigError for a bad field, ConflictError for an id
    return next(e for e in instances_view(cp) if e["instance_id"] == instance.instance_id)


def _fleet_change(req: Payload) -> Callable[[ControlPlaneManager], dict[str, Any]]:
    """``drain_instance`` (``options.drain``, default true; false undrains) or
    ``unregister_instance`` of the instance id in ``inputs``."""
    iid = req.inputs
    if not isinstance(iid, str) or not iid:
        raise InvalidRequestError(f"{req.task} needs the instance id as inputs", param="inputs")
    allowed = ("drain",) if req.task == "drain_instance" else ()
    for key in req.options:
        if key not in allowed:
            raise InvalidRequestError(
                f"unknown option {key!r} for {req.task}", param=f"options.{key}"
            )
    drain = req.options.get("drain", True)
    if not isinstance(drain, bool):
        raise InvalidRequestError("drain must be true or false", param="options.drain")

    def change(cp: ControlPlaneManager) -> dict[str, Any]:
        if req.task == "unregister_instance":
            cp.unregister_instance(iid)  # InstanceNotFoundError, ConflictError
            return {"instance_id": iid, "removed": True}
        cp.drain_instance(iid, drain)
        return {"instance_id": iid, "draining": drain}

    return change


def _policy_args(req: Payload) -> tuple[str, dict[str, Any] | None, str]:
    options = req.options
    for key in options:
        if key not in _SET_POLICY_OPTIONS:
            raise InvalidRequestError(
                f"unknown option {key!r} (set_policy takes policy and params)",
                param=f"options.{key}",
            )
    named = options.get("policy")
    if req.inputs is not None and named is not None and named != req.inputs:
        raise InvalidRequestError(
            f"set_policy names two policies: {req.inputs!r} in inputs and {named!r} in "
            "options.policy",
            param="options.policy",
        )
    name = req.inputs if req.inputs is not None else named
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(
            "set_policy needs the policy name as inputs (or options.policy)", param="inputs"
        )
    params = options.get("params")
    if params is not None and not isinstance(params, dict):
        raise InvalidRequestError("params must be a dict", param="options.params")
    return name, params, "inputs" if req.inputs is not None else "options.policy"


def _set_policy(
    cp: ControlPlaneManager, name: str, params: dict[str, Any] | None, named_in: str
) -> dict[str, Any]:
    """Switch to policy ``name`` (given in the payload at ``named_in``) with ``params``;
    errors name the payload's part, as the admin API's name the body's field."""
    previous = cp.policy.name
    try:
        cp.update_policy(name, params)
    except PolicyNotFoundError as exc:
        exc.param = named_in  # the payload's part (the manager names its own argument)
        raise
    except ConfigError as exc:  # a bad parameter: the request's mistake
        param = "options.params" if exc.key is None else f"options.params.{exc.key}"
        raise InvalidRequestError("; ".join(map(str, exc.each())), param=param) from None
    return {"previous": previous, "scheduling_policy": cp.policy.name}
