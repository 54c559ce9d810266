"""Configuration of the SAGE services.

:class:`ControlPlaneVLLMService` reads the same model as ``sage-llm serve``
(:mod:`sage_llm.config`): a dict holding the bare ``[services.llm_control_plane]`` table
(the seed's keys: ``scheduling_policy``, ``enable_pd_separation``, ``routing_strategy``,
``instances`` …), a whole document, a :class:`~sage_llm.config.SageConfig`, or a TOML
file (``config_path``, the one key of the dict that is not part of the shared model). The
request defaults of SAGE's earlier ControlPlaneVLLMService (``default_priority``,
``default_slo_deadline_ms``, ``default_temperature``, ``default_top_p``) and
``request_timeout_s`` are keys of that table, in a dict as in a file
(:data:`sage_llm.config_schema.SERVICE_DEFAULT_KEYS`); the control plane itself ignores them.

:class:`VLLMServiceConfig` reads SAGE's VLLMService keys (``model_id``, ``engine``,
``sampling`` …) plus where the engine is: an HTTP endpoint, ``engine = "sim"``, or the
control plane (``use_control_plane``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sage_llm.config import BARE_KEYS, SageConfig, config_from_dict, load_config
from sage_llm.config_fields import described, int64_problem, name_problem, secret_problem
from sage_llm.config_fields import suggest as suggest_key
from sage_llm.config_locate import format_key
from sage_llm.config_schema import SERVICE_DEFAULT_KEYS, VLLM_SERVICE_TYPE, host_problem
from sage_llm.control_plane.params import Gathered
from sage_llm.errors import ConfigError, InvalidRequestError
from sage_llm.service.payloads import (
    PASSTHROUGH_OPTIONS,
    RequestDefaults,
    parse_options,
    suggest,
)
from sage_llm.types import RequestPriority

__all__ = [
    "SERVICE_KEYS",
    "ControlPlaneServiceConfig",
    "VLLMServiceConfig",
    "check_beside_config_path",
    "control_plane_beside",
    "control_plane_service_config",
]

log = logging.getLogger("sage_llm.service")

SERVICE_KEYS = ("config_path",)
"""Keys of a ControlPlaneVLLMService dict that are not part of the shared config model."""

ConfigSource = Mapping[str, Any] | SageConfig | str | Path | None


@dataclass(frozen=True)
class ControlPlaneServiceConfig:
    """What a ControlPlaneVLLMService runs: the shared config and its request defaults."""

    sage: SageConfig
    defaults: RequestDefaults = field(default_factory=RequestDefaults)


def control_plane_service_config(
    config: ConfigSource, *, defaults: RequestDefaults | None = None
) -> ControlPlaneServiceConfig:
    """Read a ControlPlaneVLLMService configuration (see the module docstring).

    ``None`` is the embedded default (a simulated fleet). ``defaults`` are used for the
    request defaults the config does not set.
    """
    if defaults is not None:
        check_request_defaults(defaults)
    base = defaults or RequestDefaults()
    if config is None:
        sage = SageConfig.default()
    elif isinstance(config, SageConfig):
        sage = config
    elif isinstance(config, str | Path):
        sage = load_config(config)
    elif not isinstance(config, Mapping):
        raise ConfigError(
            f"the service config must be a dict, a SageConfig or a TOML path, "
            f"got {type(config).__name__}"
        )
    else:
        rest = {k: v for k, v in config.items() if k not in SERVICE_KEYS}
        path = config.get("config_path")
        if path is None:
            sage = config_from_dict(rest)
        elif not isinstance(path, str | Path):
            raise ConfigError("must be a path string", key="config_path")
        else:
            check_beside_config_path(rest)
            sage = load_config(path)
            overrides = {k: v for k, v in rest.items() if v is not None}
            if overrides:
                checked = config_from_dict(overrides).control_plane  # as in a file
                values = {k: getattr(checked, k) for k in overrides}
                cp = dataclasses.replace(sage.control_plane, **values)
                sage = dataclasses.replace(sage, control_plane=cp)
    sage.check_has_control_plane()  # a file of SAGE's other services only
    return ControlPlaneServiceConfig(sage, _defaults(sage, base))


def check_beside_config_path(rest: Mapping[str, Any]) -> None:
    """Raise unless ``rest``, the keys beside ``config_path``, are request defaults only
    (the control plane is configured in that file)."""
    misplaced = sorted(k for k in rest if k not in SERVICE_DEFAULT_KEYS)
    for key in misplaced:
        if key not in BARE_KEYS:  # a misspelt config_path is not a file's key
            valid = (*SERVICE_KEYS, *BARE_KEYS)
            raise ConfigError(f"unknown key{suggest_key(str(key), valid)}", key=str(key))
    if misplaced:
        raise ConfigError(
            f"config_path is given, so the control plane is configured in that file; "
            f"move {', '.join(misplaced)} there",
            key="config_path",
        )


def control_plane_beside(table: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    """A VLLMService ``table`` read from the file ``source``, with its ``control_plane``
    file (a TOML path, or a table's ``config_path``) re-based beside that file, where it is
    read from (not the working directory)."""
    table = dict(table)
    here = Path(source).parent
    control_plane = table.get("control_plane")
    if isinstance(control_plane, str):
        table["control_plane"] = str(here / control_plane)
    elif isinstance(control_plane, Mapping) and isinstance(
        path := control_plane.get("config_path"), str | Path
    ):
        table["control_plane"] = {**control_plane, "config_path": str(here / path)}
    return table


def check_request_defaults(defaults: object) -> None:
    """:class:`ConfigError` (several: :class:`~sage_llm.errors.ConfigErrors`) unless
    ``defaults`` is a :class:`RequestDefaults` whose values a request's options could hold,
    each problem keyed ``request_defaults.<field>`` (they had failed every request, under
    the name of an option the caller never sent)."""
    if not isinstance(defaults, RequestDefaults):
        raise ConfigError(
            f"must be a sage_llm.service.RequestDefaults, got {type(defaults).__name__}",
            key="request_defaults",
        )
    g = Gathered()

    def bad(name: str, problem: str) -> None:
        g.errors.append(ConfigError(problem, key=f"request_defaults.{name}"))

    priority: object = defaults.priority  # as given: the annotations are not checked
    if not isinstance(priority, RequestPriority):
        bad("priority", f"must be a RequestPriority, got {described(priority)}")
    for name, low, high, above in (
        ("slo_deadline_ms", 0.0, math.inf, True),
        ("temperature", 0.0, 2.0, False),
        ("top_p", 0.0, 1.0, True),
        ("timeout_s", 0.0, math.inf, True),
    ):
        value = getattr(defaults, name)
        if value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value > high:
            bad(name, f"must be a finite number <= {high:g}, got {described(value)}")
        elif value < low or (above and value == low):
            bad(name, f"must be {'>' if above else '>='} {low:g}, got {value!r}")
    tokens = defaults.max_tokens
    if tokens is not None and (
        isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1
    ):
        bad("max_tokens", f"must be a positive integer, got {described(tokens)}")
    elif tokens is not None and (problem := int64_problem(tokens)) is not None:
        bad("max_tokens", problem)  # as a request's own max_tokens
    extra: object = defaults.extra
    if not isinstance(extra, Mapping):
        bad("extra", f"must be a mapping, got {described(extra)}")
    else:
        known = {k: v for k, v in extra.items() if k in PASSTHROUGH_OPTIONS}
        try:  # their values as a request's own options are checked (n >= 1 …)
            parse_options(known, RequestDefaults(), "extra")
        except InvalidRequestError as exc:
            bad(exc.param or "extra", exc.message)
        for key in extra:
            if key not in PASSTHROUGH_OPTIONS:
                bad(
                    f"extra.{key}",
                    f"not an option passed to the engine{suggest(str(key), PASSTHROUGH_OPTIONS)}",
                )
    g.raise_any()


def _defaults(sage: SageConfig, base: RequestDefaults) -> RequestDefaults:
    """``base`` with the request defaults the config sets (already checked by the model)."""
    cp = sage.control_plane
    return RequestDefaults(
        priority=base.priority if cp.default_priority is None else cp.default_priority,
        slo_deadline_ms=_first(cp.default_slo_deadline_ms, base.slo_deadline_ms),
        max_tokens=base.max_tokens,
        temperature=_first(cp.default_temperature, base.temperature),
        top_p=_first(cp.default_top_p, base.top_p),
        timeout_s=_first(cp.request_timeout_s, base.timeout_s),
        extra=base.extra,
    )


def _first(value: float | None, default: float | None) -> float | None:
    return default if value is None else float(value)


def _positive(
    table: Mapping[str, Any],
    key: str,
    default: float | None,
    *,
    zero: bool = False,
    at: str = "",
    high: float | None = None,
) -> float | None:
    value = table.get(key)
    if value is None:
        return default
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        kind = "non-negative" if zero else "positive"
        raise ConfigError(f"must be a {kind} number", key=at + key)
    if high is not None and value > high:
        raise ConfigError(f"must be <= {high:g}, got {value!r}", key=at + key)
    return float(value)


# -- VLLMService ---------------------------------------------------------------------------

DEFAULT_SAMPLING: Mapping[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.95,
    "max_tokens": 512,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}
"""SAGE's VLLMService sampling defaults."""

DEFAULT_ENGINE: Mapping[str, Any] = {
    "dtype": "auto",
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": 0.9,
    "max_model_len": 4096,
}
"""SAGE's VLLMService engine defaults (keyword arguments of ``vllm.LLM``)."""

_VLLM_KEYS = (
    "type", "model_id", "embedding_model_id", "auto_download", "auto_reload", "engine",
    "embedding_engine", "sampling", "tags", "base_url", "host", "port", "scheme", "api_key",
    "dialect", "sim", "use_control_plane", "control_plane", "request_timeout_s",
)  # fmt: skip
_DIALECTS = ("vllm", "sglang", "openai")
_SIM_KEYS = ("gpu", "model", "speed", "seed", "embedding_dimension", "max_concurrent_requests")


@dataclass(frozen=True)
class VLLMServiceConfig:
    """SAGE's ``VLLMServiceConfig`` keys, and where the engine is.

    ``backend`` is ``http`` (``base_url`` or ``host`` + ``port``), ``sim`` (``engine =
    "sim"``, or an ``engine`` table with ``kind = "sim"``) or ``vllm`` (in-process
    ``vllm.LLM`` with the ``engine`` table as its arguments).
    """

    model_id: str
    backend: str
    embedding_model_id: str | None = None
    auto_download: bool = False
    auto_reload: bool = True
    engine: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_ENGINE))
    embedding_engine: Mapping[str, Any] = field(default_factory=dict)
    sampling: Mapping[str, Any] = field(default_factory=lambda: dict(DEFAULT_SAMPLING))
    tags: tuple[str, ...] = ()
    host: str | None = None
    port: int | None = None
    scheme: str = "http"
    api_key: str | None = None
    dialect: str = "vllm"
    sim: Mapping[str, Any] = field(default_factory=dict)
    use_control_plane: bool = False
    control_plane: Mapping[str, Any] | str | None = None
    request_timeout_s: float | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VLLMServiceConfig:
        """Read and check a VLLMService config dict (unknown keys are errors). Every
        problem is raised at once (:class:`~sage_llm.errors.ConfigErrors` for several)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"the VLLMService config must be a dict, got {type(data).__name__}")
        g = Gathered()
        for key in data:
            if key not in _VLLM_KEYS:
                g.errors.append(
                    ConfigError(
                        f"unknown key{suggest_key(str(key), _VLLM_KEYS)}",
                        key=format_key((str(key),)),
                    )
                )
        kind_given = data.get("type", VLLM_SERVICE_TYPE)
        if kind_given != VLLM_SERVICE_TYPE:  # a table of another service, given to this one
            g.errors.append(
                ConfigError(
                    f'must be "{VLLM_SERVICE_TYPE}" (or left out), got {described(kind_given)}',
                    key="type",
                )
            )
        model_id = data.get("model_id")
        if model_id is None:
            g.errors.append(ConfigError("is required: the model the engine serves", key="model_id"))
        elif not isinstance(model_id, str) or not model_id.strip():
            g.errors.append(
                ConfigError(f"must be a model name, got {described(model_id)}", key="model_id")
            )
        elif (problem := name_problem(model_id)) is not None:  # served under it as written
            g.errors.append(ConfigError(problem, key="model_id"))
        if not isinstance(model_id, str):
            model_id = ""
        kind, table = g.built(lambda: _engine_kind(data), _same) or (None, {})
        host, port, scheme = g.built(lambda: _endpoint(data), _same) or (None, None, "http")
        if host is not None and kind == "sim":
            g.errors.append(
                ConfigError('engine = "sim" and an endpoint exclude each other', key="engine")
            )
        backend = "http" if host is not None else (kind or "vllm")
        if not any(k in data for k in ("base_url", "host", "port")):  # only an endpoint's
            for key in _ENDPOINT_ONLY:
                if key in data:
                    g.errors.append(
                        ConfigError(
                            "applies only to an HTTP endpoint (base_url or host), and none "
                            "is given, so it would be ignored",
                            key=key,
                        )
                    )
        unread = sorted(str(k) for k in table if k != "tensor_parallel_size")
        if kind == "sim" and unread:  # a vLLM config switched to the simulator: said, not
            log.warning(  # refused (it runs as written once switched back)
                "engine: the simulated engine reads only tensor_parallel_size; %s not read "
                "(its context is its model's; sim = {gpu, model, speed, ...} sets the rest)",
                ", ".join(f"engine.{k}" for k in unread),
            )
        sampling = {**DEFAULT_SAMPLING, **(g.built(lambda: _table(data, "sampling"), _same) or {})}
        engine = {**DEFAULT_ENGINE, **table}
        sim = g.built(lambda: _table(data, "sim"), _same) or {}
        if "sim" in data and backend != "sim":
            g.errors.append(
                ConfigError(
                    f'applies only with engine = "sim" (this service uses {backend!r}), so it '
                    "would be ignored",
                    key="sim",
                )
            )
        for key in sim:
            if key not in _SIM_KEYS:
                g.errors.append(
                    ConfigError(
                        f"unknown key{suggest_key(str(key), _SIM_KEYS)}",
                        key=format_key(("sim", str(key))),
                    )
                )
        dialect = str(data.get("dialect", "vllm")).lower()
        if dialect not in _DIALECTS:
            g.errors.append(ConfigError(f"must be one of {', '.join(_DIALECTS)}", key="dialect"))
        cp = data.get("control_plane")
        if cp is not None and data.get("use_control_plane") is not True:
            g.errors.append(
                ConfigError(
                    "is given but use_control_plane is not true, so it would be ignored: "
                    "set use_control_plane = true, or leave control_plane out",
                    key="control_plane",
                )
            )
        if cp is not None and not isinstance(cp, Mapping | str):
            g.errors.append(
                ConfigError(
                    "must be a table (the control-plane config) or a TOML path",
                    key="control_plane",
                )
            )
            cp = None
        if isinstance(cp, Mapping) and data.get("use_control_plane") is True:
            g.built(lambda: control_plane_service_config(cp), "control_plane")
        tags = data.get("tags", [])
        if not isinstance(tags, list | tuple) or not all(isinstance(t, str) for t in tags):
            g.errors.append(ConfigError("must be a list of strings", key="tags"))
            tags = []
        config = cls(
            model_id=model_id,
            backend=backend,
            embedding_model_id=g.built(lambda: _opt_str(data, "embedding_model_id"), _same),
            auto_download=_or(g.built(lambda: _bool(data, "auto_download", False), _same), False),
            auto_reload=_or(g.built(lambda: _bool(data, "auto_reload", True), _same), True),
            engine=engine,
            embedding_engine={
                **engine, **(g.built(lambda: _table(data, "embedding_engine"), _same) or {})
            },
            sampling=sampling,
            tags=tuple(tags),
            host=host,
            port=port,
            scheme=scheme,
            api_key=g.built(lambda: _secret(data, "api_key"), _same),
            dialect=dialect,
            sim=sim,
            use_control_plane=_or(
                g.built(lambda: _bool(data, "use_control_plane", False), _same), False
            ),
            control_plane=cp,
            request_timeout_s=g.built(lambda: _positive(data, "request_timeout_s", None), _same),
        )  # fmt: skip
        g.built(config.request_defaults, _same)  # checks the sampling table
        g.built(lambda: _check_sim(sim), _same)
        if backend == "sim":
            g.built(lambda: _tensor_parallel(config.engine), _same)
        if backend == "sim" and not any(
            (e.key or "").startswith(("sim.", "engine.tensor_parallel_size")) for e in g.errors
        ):
            g.built(config.check_sim_engine, _same)
        g.raise_any()
        return config

    def check_sim_engine(self) -> None:
        """Raise ``ConfigError`` when the simulated engine cannot start (a model that does
        not fit its GPUs, a TP size vLLM refuses)."""
        from sage_llm.config_schema import default_sim_model
        from sage_llm.sim.specs import placement_problem

        model = str(self.sim.get("model") or default_sim_model(self.model_id))
        tp = _tensor_parallel(self.engine)
        problem = placement_problem(model, str(self.sim.get("gpu", "h100")), tp=tp)
        if problem is not None:
            raise ConfigError(
                f"the simulated engine cannot start: {problem}; set sim.gpu or "
                "engine.tensor_parallel_size",
                key="sim.model" if self.sim.get("model") else "model_id",
            )

    def request_defaults(self) -> RequestDefaults:
        """The ``sampling`` table as request defaults (other sampling keys pass through);
        every problem of the table raised at once."""
        s = self.sampling
        g = Gathered()
        extra = {  # a built-in default (penalty 0.0) is the engine's own: not sent
            k: v
            for k, v in s.items()
            if k in PASSTHROUGH_OPTIONS and v is not None and not _built_in(k, v)
        }
        for key in s:
            if key not in PASSTHROUGH_OPTIONS and key not in DEFAULT_SAMPLING:
                hint = suggest(str(key), [*DEFAULT_SAMPLING, *PASSTHROUGH_OPTIONS])
                g.errors.append(
                    ConfigError(
                        f"unknown sampling key {key!r}{hint}",
                        key=format_key(("sampling", str(key))),
                    )
                )
        n = s.get("n")  # samples per input (1 by default): each a generation of its entry
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            g.errors.append(
                ConfigError(f"must be an integer >= 1, got {described(n)}", key="sampling.n")
            )
        defaults = RequestDefaults(
            max_tokens=g.built(lambda: _sampling_int(s, "max_tokens"), _same),
            temperature=g.built(
                lambda: _positive(s, "temperature", None, zero=True, at="sampling.", high=2.0),
                _same,
            ),
            top_p=g.built(lambda: _positive(s, "top_p", None, at="sampling.", high=1.0), _same),
            timeout_s=self.request_timeout_s,
            extra=extra,
        )
        g.raise_any()
        return defaults


def _built_in(key: str, value: object) -> bool:
    """True when ``value`` is :data:`DEFAULT_SAMPLING`'s own for ``key`` (a penalty of
    0.0; never a seed of 0, which has no default though ``0 == 0.0``)."""
    default = DEFAULT_SAMPLING.get(key)
    return default is not None and type(value) is type(default) and value == default


def _check_sim(sim: Mapping[str, Any]) -> None:
    """The ``sim`` table's values, checked when the service is built rather than when its
    engine starts or its first request comes (names known, numbers in range)."""
    from sage_llm.sim.specs import get_gpu, get_model

    g = Gathered()
    for key in ("gpu", "model"):
        value = sim.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            g.errors.append(ConfigError("must be a non-empty string", key=f"sim.{key}"))
            continue
        try:
            (get_gpu if key == "gpu" else get_model)(value)
        except ConfigError as exc:
            g.errors.append(ConfigError(exc.detail, key=f"sim.{key}"))
    g.built(lambda: _positive(sim, "speed", None, at="sim."), _same)
    for key, low in (("seed", 0), ("embedding_dimension", 1), ("max_concurrent_requests", 1)):
        value = sim.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            g.errors.append(ConfigError(f"must be an integer >= {low}", key=f"sim.{key}"))
        elif value is not None and value < low:
            g.errors.append(
                ConfigError(f"must be an integer >= {low}, got {value}", key=f"sim.{key}")
            )
    g.raise_any()


def _engine_kind(data: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The ``engine`` value: its kind (``sim``, ``vllm``, None) and its table of arguments."""
    engine_value = data.get("engine", {})
    kind: str | None = None
    if isinstance(engine_value, str):
        kind, table = engine_value.strip().lower(), {}
    elif isinstance(engine_value, Mapping):
        table = dict(engine_value)
        kind = table.pop("kind", None)
    else:
        raise ConfigError('must be "sim", "vllm" or a table of engine arguments', key="engine")
    if kind not in (None, "sim", "vllm"):
        raise ConfigError(f'unknown engine kind {kind!r}; use "sim" or "vllm"', key="engine")
    return kind, table


_ENDPOINT_ONLY = ("scheme", "dialect", "api_key")
"""Keys only an HTTP endpoint's client reads."""


def _tensor_parallel(engine: Mapping[str, Any]) -> int:
    tp = engine.get("tensor_parallel_size", 1)
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConfigError("must be an integer >= 1", key="engine.tensor_parallel_size")
    return tp


def _same(key: str | None) -> str:
    """A problem's key as it is (for :meth:`Gathered.built`)."""
    return key or ""


def _or(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _endpoint(data: Mapping[str, Any]) -> tuple[str | None, int | None, str]:
    from urllib.parse import urlsplit

    base_url, host, port = data.get("base_url"), data.get("host"), data.get("port")
    scheme = str(data.get("scheme", "http")).lower()
    if base_url is not None:
        if host is not None or port is not None:
            raise ConfigError("give base_url or host and port, not both", key="base_url")
        if "scheme" in data:  # (it had been read nowhere beside a URL)
            raise ConfigError(
                "is base_url's own (http:// or https://): leave scheme out beside base_url",
                key="scheme",
            )
        if not isinstance(base_url, str):
            raise ConfigError("must be a URL string", key="base_url")
        try:
            parts = urlsplit(base_url.strip())
        except ValueError:  # an unclosed IPv6 bracket (http://[::1)
            parts = urlsplit("")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("must be an http(s) URL like http://host:8000", key="base_url")
        if parts.path.rstrip("/") not in ("", "/v1"):
            raise ConfigError("must be the server root (http://host:port or .../v1)",
                              key="base_url")  # fmt: skip
        if parts.username is not None or parts.query or parts.fragment:  # else dropped
            raise ConfigError(
                "must be the server root without credentials, query or fragment (set "
                "api_key for a key)",
                key="base_url",
            )
        try:
            given = parts.port
        except ValueError:
            given = 0
        if given == 0:  # out of range, not a number, or 0 (which had become 80)
            raise ConfigError(
                f"must have a port number 1-65535 after the host, got {base_url!r}",
                key="base_url",
            )
        if (problem := host_problem(parts.hostname)) is not None:  # as an instance's host
            raise ConfigError(f"its host {problem}", key="base_url")
        default_port = 443 if parts.scheme == "https" else 80
        return parts.hostname, given or default_port, parts.scheme
    if host is None and port is None:
        return None, None, scheme
    if not isinstance(host, str) or not host:
        raise ConfigError("is required with port", key="host")
    if (problem := host_problem(host)) is not None:  # as an instance's host
        raise ConfigError(problem, key="host")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError("must be a port number (1-65535)", key="port")
    if scheme not in ("http", "https"):
        raise ConfigError("must be http or https", key="scheme")
    return host, port, scheme


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError("must be a table", key=key)
    return dict(value)


def _opt_str(data: Mapping[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError("must be a non-empty string", key=key)
    return value


def _secret(data: Mapping[str, Any], key: str) -> str | None:
    """:func:`_opt_str` for a key sent in an HTTP header (never quoted in a message)."""
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"must be a string, got {described(value, secret=True)}", key=key)
    value = _opt_str(data, key)
    problem = None if value is None else secret_problem(value)
    if problem is not None:
        raise ConfigError(problem, key=key)
    return value


def _bool(data: Mapping[str, Any], key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError("must be true or false", key=key)
    return value


def _sampling_int(sampling: Mapping[str, Any], key: str) -> int | None:
    value = sampling.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"must be a positive integer, got {value!r}", key=f"sampling.{key}")
    if (problem := int64_problem(value)) is not None:  # as a request's own option
        raise ConfigError(problem, key=f"sampling.{key}")
    return value
