"""VLLMService: SAGE's simple LLM service, one engine, the existing payloads.

It takes the keys of SAGE's ``VLLMServiceConfig`` (``model_id``, ``engine``,
``sampling``, ``embedding_model_id`` …) and answers the existing tasks with the existing
shapes: ``generate`` (a prompt, a chat, or a batch), ``embed`` and ``show_models``;
``download_model`` and ``delete_model`` raise (sage-llm leaves weights to the engine
hosts). The engine is an HTTP endpoint (``base_url``, or ``host`` and ``port``), a simulated
engine (``engine = "sim"``), or ``vllm.LLM`` in this process (the ``vllm`` extra).

``use_control_plane = true`` is the seed proposal's "option 2": the same payloads go
through a :class:`~sage_llm.service.control_plane_service.ControlPlaneVLLMService`,
configured by the ``control_plane`` table (or TOML path); without one, the control plane
gets this service's one engine as its only instance.

In a SAGE ``services.toml`` it is a ``[services.<name>]`` table with ``type =
"VLLMService"`` and these keys (:meth:`VLLMService.from_toml`; ``sage-llm config check``
checks it).
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Coroutine, Mapping
from pathlib import Path
from typing import Any

from sage_llm.config import load_config
from sage_llm.config_locate import read_toml
from sage_llm.config_schema import VLLM_SERVICE_TYPE
from sage_llm.errors import ConfigError, InvalidRequestError
from sage_llm.service.backends import Backend, make_backend, sim_embed
from sage_llm.service.base import ManagedService
from sage_llm.service.config import VLLMServiceConfig, control_plane_beside
from sage_llm.service.control_plane_service import (
    WEIGHTS_NOT_MANAGED,
    ControlPlaneVLLMService,
)
from sage_llm.service.embeddings import EMBED_OPTIONS, parse_embed
from sage_llm.service.payloads import (
    GENERATE_OPTIONS,
    located,
    parse_generate,
    parse_payload,
    request_ids,
)
from sage_llm.service.runner import START_TIMEOUT_S, LoopFactory, LoopThread, check_loop_factory
from sage_llm.service.views import models_view

__all__ = ["VLLM_TASKS", "VLLMService", "register_vllm_service"]

VLLM_TASKS: Mapping[str, Collection[str]] = {
    "generate": GENERATE_OPTIONS, "embed": EMBED_OPTIONS, "show_models": (),
    "download_model": (), "delete_model": (), "fine_tune": (),
}  # fmt: skip
"""The tasks, each with the options it takes (in ``options``, or at the payload's top
level)."""


class VLLMService(ManagedService):
    """One engine behind SAGE's VLLMService payloads (see the module docstring)."""

    def __init__(self, config: Mapping[str, Any], *, loop_factory: LoopFactory | None = None):
        super().__init__()
        self.config = VLLMServiceConfig.from_dict(config)
        self.defaults = self.config.request_defaults()
        check_loop_factory(loop_factory)
        self._loop_factory = loop_factory
        self._lock = threading.Lock()
        self._runner: LoopThread | None = None
        self._backend: Backend | None = None
        self._delegate: ControlPlaneVLLMService | None = None
        if self.config.use_control_plane:
            self._delegate = ControlPlaneVLLMService(
                _control_plane_config(self.config),
                loop_factory=loop_factory,
                request_defaults=self.defaults,
            )
            self._delegate._named_as = lambda: self.name  # its errors name this service
        else:
            self._backend = make_backend(self.config)

    @classmethod
    def from_toml(
        cls, path: str | Path, name: str | None = None, *, loop_factory: LoopFactory | None = None
    ) -> VLLMService:
        """A service configured by the ``[services.<name>]`` table of a SAGE ``services.toml``
        whose ``type`` is ``VLLMService`` (``name`` may be left out when there is one such
        table). The whole file is checked first, as ``sage-llm config check`` does: each
        problem with its line."""
        load_config(path)
        data = read_toml(Path(path).read_text(encoding="utf-8-sig"), str(path))
        services = data.get("services")
        tables = {
            key: table
            for key, table in (services.items() if isinstance(services, Mapping) else ())
            if isinstance(table, Mapping) and table.get("type") == VLLM_SERVICE_TYPE
        }
        if name is None and len(tables) == 1:
            name = next(iter(tables))
        if name is None or name not in tables:
            found = ", ".join(f"[services.{key}]" for key in tables) or "none"
            if not tables:
                problem = "no [services.*] table has it"
            elif name is None:
                problem = f"several tables have it ({found}): name the one to use"
            else:
                problem = f"[services.{name}] is not one of them (they are: {found})"
            raise ConfigError(f'a VLLMService table (type = "VLLMService"): {problem}',
                              location=str(path))  # fmt: skip
        table = control_plane_beside(tables[name], path)  # its file, beside this one
        return cls(table, loop_factory=loop_factory)

    @property
    def control_plane_service(self) -> ControlPlaneVLLMService | None:
        """The control-plane service behind this one (``use_control_plane``), else None."""
        return self._delegate

    # -- lifecycle -------------------------------------------------------------------------

    def setup(self) -> None:
        """Start the engine (or the control plane); idempotent."""
        if self._delegate is not None:
            self._delegate.setup()
            return
        with self._lock:
            if self._runner is not None:
                return
            backend = self._backend
            assert backend is not None
            runner = LoopThread(f"sage-llm-{self.name}", self._loop_factory)
            # A model's load (in-process vLLM) takes as long as it takes: no limit.
            runner.start(backend.start, None if self.config.backend == "vllm" else START_TIMEOUT_S)
            self._runner = runner
        self.logger.info(f"{self.name}: serving {self.config.model_id} ({self.config.backend})")

    def cleanup(self) -> None:
        """Stop the engine (or the control plane) and the event loop thread."""
        if self._delegate is not None:
            self._delegate.cleanup()
            return
        with self._lock:
            runner, self._runner = self._runner, None
        if runner is not None and self._backend is not None:
            runner.stop(self._backend.aclose)

    # -- requests --------------------------------------------------------------------------

    def process(self, payload: Any) -> Any:
        """Run one ``{"task", "inputs", "options"}`` payload and return its result."""
        if self._delegate is not None:
            self._check_task(payload)
            embedded = self._sim_embed(payload)
            if embedded is not None:
                return embedded
            return self._tagged(payload, self._delegate.process(payload))
        work = self._plan(payload)
        return self._runner_or_raise(work).run(work)

    async def aprocess(self, payload: Any) -> Any:
        """:meth:`process` for asyncio callers."""
        if self._delegate is not None:
            self._check_task(payload)
            embedded = self._sim_embed(payload)
            if embedded is not None:
                return embedded
            return self._tagged(payload, await self._delegate.aprocess(payload))
        work = self._plan(payload)
        return await self._runner_or_raise(work).arun(work)

    def _tagged(self, payload: Any, result: Any) -> Any:
        """``show_models``' entries from the control plane with this service's ``tags``, as
        it gives them without the control plane."""
        if isinstance(payload, Mapping) and payload.get("task") == "show_models":
            for entry in result:
                entry["tags"] = list(self.config.tags)
        return result

    def _sim_embed(self, payload: Any) -> dict[str, Any] | None:
        """With ``engine = "sim"`` behind the control plane, ``embed`` is answered as
        without it (the simulated engine's hashed vectors; its instance in the control plane
        serves generation only); None for other payloads."""
        if self.config.backend != "sim" or self.config.control_plane is not None:
            return None
        if not isinstance(payload, Mapping) or payload.get("task") != "embed":
            return None
        delegate = self._delegate
        if delegate is None or not delegate.is_running:
            raise self._not_set_up()
        req = parse_payload(payload, VLLM_TASKS)
        return sim_embed(self.config, parse_embed(req.inputs, req.options, self.defaults.timeout_s))

    def _check_task(self, payload: Any) -> None:
        if isinstance(payload, Mapping) and payload.get("task") == "fine_tune":
            raise InvalidRequestError(WEIGHTS_NOT_MANAGED.format(task="fine_tune"), param="task")

    def _plan(self, payload: Any) -> Coroutine[Any, Any, Any]:
        req = parse_payload(payload, VLLM_TASKS)
        backend = self._backend
        assert backend is not None
        if req.task == "generate":
            items = parse_generate(req.inputs, req.options, self.defaults)
            return backend.generate(items, request_ids(items))
        if req.task == "embed":
            embed = parse_embed(req.inputs, req.options, self.defaults.timeout_s)
            return located(lambda: backend.embed(embed), gave_model=embed.model is not None)
        if req.task == "show_models":
            if req.options:
                key = next(iter(req.options))  # as the control-plane service names it
                raise InvalidRequestError("show_models takes no options", param=f"options.{key}")
            if req.inputs is not None:  # (not a filter: said so)
                raise InvalidRequestError("show_models takes no inputs", param="inputs")
            return self._models(backend)
        raise InvalidRequestError(WEIGHTS_NOT_MANAGED.format(task=req.task), param="task")

    async def _models(self, backend: Backend) -> list[dict[str, Any]]:
        return models_view(await backend.models(), self.config.tags)

    def _runner_or_raise(self, work: Coroutine[Any, Any, Any]) -> LoopThread:
        runner = self._runner
        if runner is None:
            work.close()
            raise self._not_set_up()
        return runner


def _control_plane_config(cfg: VLLMServiceConfig) -> Any:
    """The control-plane config of ``use_control_plane``: the ``control_plane`` table or
    path, else one instance, this service's own engine. A bare control-plane table that
    lists no instances (none, or an empty list, and no ``[simulation]``) gets that one too
    (it had served the embedded simulated fleet in place of the endpoint the service
    names, with made-up text); a whole document (``services``) or a ``config_path`` one is
    passed on as it is."""
    table = cfg.control_plane
    if table is not None and (
        not isinstance(table, Mapping)
        or table.get("instances")
        or any(key in table for key in ("simulation", "services", "config_path"))
    ):
        return table
    if cfg.backend == "vllm":
        raise ConfigError(
            "use_control_plane needs engines the control plane can reach: give a "
            'control_plane table with instances, an endpoint (base_url), or engine = "sim"',
            key="use_control_plane",
        )
    from sage_llm.service.backends import service_instance

    inst = service_instance(cfg)
    entry: dict[str, Any] = {
        "instance_id": "vllm-0",
        "host": inst.host,
        "port": inst.port,
        "model_name": inst.model_name,
        "engine": inst.engine,
        "scheme": inst.scheme,
        "tensor_parallel_size": inst.tensor_parallel_size,
        "max_concurrent_requests": inst.max_concurrent_requests,
    }
    if cfg.api_key is not None:
        entry["api_key"] = cfg.api_key
    if cfg.backend == "sim":
        entry.update(sim_gpu=inst.metadata["sim_gpu"], sim_speed=inst.metadata["sim_speed"])
        for key in ("sim_model", "sim_seed"):
            if key in inst.metadata:
                entry[key] = inst.metadata[key]
    if table is not None:
        return {**table, "instances": [entry]}
    return {"instances": [entry], "enable_pd_separation": False}


def register_vllm_service(environment: Any, service_name: str, config: Mapping[str, Any]) -> Any:
    """SAGE's helper: ``environment.register_service(service_name, VLLMService, config)``."""
    return environment.register_service(service_name, VLLMService, config)
