"""The TOML configuration shared by ``sage-llm serve`` and the SAGE service.

A file is read into frozen dataclasses; every key is checked (unknown keys, wrong types,
unknown policy/strategy names, out-of-range values) and every problem is reported as a
:class:`~sage_llm.errors.ConfigError` carrying ``file:line`` and the dotted key::

    cfg = load_config("cluster.toml")          # raises on any problem
    problems = check_config("cluster.toml")    # every problem, as a list
    cp = ControlPlaneManager(**cfg.manager_kwargs())
    for instance in cfg.execution_instances():
        cp.register_instance(instance)

The document has ``[services.llm_control_plane]`` (the seed's format, with its
``[[services.llm_control_plane.instances]]``), and ``[gateway]``, ``[health]``,
``[admission]`` and ``[simulation]`` tables, each of which may also sit inside the service
table; any other top-level key is an error (a control-plane key at top level, as when the
``[services.llm_control_plane]`` header is forgotten, with a hint naming the header). Only
:func:`config_from_dict` also takes the bare service table (what a SAGE service is given),
never a file. With several problems, :func:`load_config` raises :class:`ConfigErrors`, whose
message lists them one per line. Secrets (API keys, the admin token) may come from
environment variables and are masked in ``repr``, error messages and :meth:`SageConfig.to_dict`.
:func:`check_instance` applies an instance entry's checks to an
:class:`~sage_llm.types.ExecutionInstance` built in code. See ``docs/config.md`` for every key.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from sage_llm.config_fields import (
    CHECKED_METADATA,
    SECRET_MASK,
    as_float,
    described,
    env_mask_problem,
    has_control_characters,
    metadata_problem,
    only_one,
    read_dataclass,
    read_keys_file,
    read_params,
    read_secret_file,
    secret_file_path,
    suggest,
)
from sage_llm.config_locate import (
    TOO_DEEP,
    KeyLocator,
    KeyPath,
    Problems,
    read_toml,
    read_utf8,
)
from sage_llm.config_schema import (
    DEFAULT_SIM_MODEL,
    ENGINES,
    FOREIGN_RULES,
    INERT_PD_FIELDS,
    MASK,
    MODES,
    ROLE_CONFIGS,
    SECTIONS,
    SERVICE_DEFAULT_KEYS,
    SERVICE_TYPES,
    SIM_KEYS,
    VLLM_SERVICE_TYPE,
    AdmissionConfig,
    ControlPlaneConfig,
    GatewayConfig,
    HealthConfig,
    InstanceConfig,
    SageConfig,
    SimulationConfig,
    TenantConfig,
    default_sim_model,
    role_config_problem,
    sim_key_in_metadata,
    tenant_key_problem,
)
from sage_llm.control_plane.params import build_params
from sage_llm.control_plane.pd import build_pd
from sage_llm.control_plane.pd.orchestrator import unservable_reason
from sage_llm.control_plane.routing.registry import get_strategy
from sage_llm.control_plane.scheduling.registry import params_class
from sage_llm.errors import ConfigError, ConfigErrors, raise_problems
from sage_llm.jsonutil import is_number
from sage_llm.sim.specs import placement_problem
from sage_llm.types import ExecutionInstance, ExecutionInstanceType, PDSeparationConfig

T = TypeVar("T")

__all__ = [
    "BARE_KEYS",
    "DEFAULT_SIM_MODEL",
    "ENGINES",
    "MASK",
    "MODES",
    "SERVICE_TYPES",
    "SIM_KEYS",
    "AdmissionConfig",
    "ConfigErrors",
    "ControlPlaneConfig",
    "GatewayConfig",
    "HealthConfig",
    "InstanceConfig",
    "SageConfig",
    "SimulationConfig",
    "TenantConfig",
    "at_address",
    "check_config",
    "check_instance",
    "config_from_dict",
    "default_sim_model",
    "host_key",
    "instance_fields",
    "instances_at",
    "load_config",
    "parse_config",
    "reached_key",
    "unknown_instance_keys",
]

_DOCUMENT_KEYS = ("services", *SECTIONS)
_SERVICE_KEYS = tuple(f.name for f in dataclasses.fields(ControlPlaneConfig))
BARE_KEYS = (*_DOCUMENT_KEYS, *_SERVICE_KEYS)
"""The keys a mapping given to :func:`config_from_dict` may hold at its top level."""
_SERVICE_PATH: KeyPath = ("services", "llm_control_plane")
_SECTION_CLASSES: tuple[tuple[str, type[Any]], ...] = (
    ("gateway", GatewayConfig),
    ("health", HealthConfig),
    ("admission", AdmissionConfig),
    ("simulation", SimulationConfig),
)


# -- public entry points -------------------------------------------------------------------


def load_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> SageConfig:
    """Read a TOML file. One problem raises that :class:`ConfigError`; several raise
    :class:`ConfigErrors`. ``env`` (default ``os.environ``) resolves ``*_env`` keys."""
    config, errors = _load(Path(path), env)
    return _result(config, errors)


def check_config(path: str | Path, *, env: Mapping[str, str] | None = None) -> list[ConfigError]:
    """Every problem of a TOML file, in file order (empty when it is valid)."""
    return _load(Path(path), env)[1]


def parse_config(
    text: str, source: str = "<string>", *, env: Mapping[str, str] | None = None
) -> SageConfig:
    """Like :func:`load_config` for TOML text; ``source`` names it in error locations."""
    return _result(*_parse(text, source, env))


def config_from_dict(
    data: Mapping[str, Any], source: str = "<dict>", *, env: Mapping[str, str] | None = None
) -> SageConfig:
    """A configuration from a mapping: a whole document (a mapping with ``services``, or with
    only section names), or else the bare service table (keys like ``scheduling_policy`` and
    ``instances``), as a SAGE service is given. ``None`` values mean "not set"."""
    problems = Problems(source)
    return _result(_build(data, problems, env, bare=True), problems.sorted())


def check_instance(instance: ExecutionInstance) -> ExecutionInstance:
    """Check an :class:`~sage_llm.types.ExecutionInstance` built in code with the rules of a
    ``[[services.llm_control_plane.instances]]`` entry (types, names and ranges: a port in
    1..65535, sizes and counts >= 1 …; the ``sim_gpu``, ``sim_model``, ``sim_speed``,
    ``sim_seed`` and ``sim_max_loras`` entries of its ``metadata`` as the ``sim_*`` keys,
    and its latency priors:
    ``tpot_ms``, ``prefill_tokens_per_s``, ``ttft_base_ms``). Each problem is a
    :class:`ConfigError` whose ``key`` (and ``param``) is the field and whose ``location`` is
    ``instance '<id>'``; one problem raises it, several raise :class:`ConfigErrors`.

    Values the file loader would read are read the same way and stored back on the instance:
    an ``instance_type`` given as a string (``"PREFILLING"``, ``"prefill"``), ``engine`` and
    ``scheme`` in any case, a ``prefilling_config``/``decoding_config`` given as a dict.
    Nothing is changed when a check fails. Returns ``instance``.
    """
    if not isinstance(instance, ExecutionInstance):
        raise ConfigError(f"must be an ExecutionInstance, got {type(instance).__name__}")
    iid = instance.instance_id
    problems = _InstanceProblems(
        f"instance {iid!r}" if isinstance(iid, str) and iid.strip() else "instance"
    )
    table = {name: getattr(instance, name) for name in _INSTANCE_FIELDS}
    for name in _NOT_NONE:
        if table[name] is None:
            problems.add((name,), "must not be None (null)")
    metadata: object = instance.metadata
    if isinstance(metadata, Mapping):
        table.update((key, metadata[key]) for key in _SIM_METADATA if key in metadata)
        for key in sorted(CHECKED_METADATA & metadata.keys()):
            problem = metadata_problem(key, metadata[key])
            if problem is not None:
                problems.add(("metadata", key), problem)
    else:
        problems.add(("metadata",), f"must be a table, got {described(metadata)}")
    for name in _LIVE_FLAGS:  # "false" would read as true
        if not isinstance(flag := getattr(instance, name), bool):
            problems.add((name,), f"must be true or false, got {described(flag)}")
    for name in _LIVE_FIGURES:
        figure = getattr(instance, name)
        plain = isinstance(figure, int | float) and not isinstance(figure, bool)
        number = as_float(figure) if plain else None
        if number is None or not math.isfinite(number) or number < 0:
            problems.add((name,), f"must be a finite number >= 0, got {described(figure)}")
    checked = read_dataclass(InstanceConfig, table, (), problems, foreign=FOREIGN_RULES)
    raise_problems(problems.errors)
    assert checked is not None
    for name in _READ_BACK:
        old, new = getattr(instance, name), getattr(checked, name)
        if type(old) is not type(new) or old != new:
            setattr(instance, name, new)
    return instance


LISTED_KEYS = ("draining", "removing")
"""What an instance's listing adds to its fields (``GET /admin/instances``, the SAGE
service's ``show_instances``): taken back by :func:`instance_fields`."""


def unknown_instance_keys(fields: Mapping[str, Any]) -> list[str]:
    """The keys of an instance given as :func:`instance_fields` takes it that are none of
    an :class:`~sage_llm.types.ExecutionInstance`'s fields, ``sim_*`` keys or listed
    states, sorted: what the admin API and the SAGE service refuse."""
    known = {f.name for f in dataclasses.fields(ExecutionInstance)}
    return sorted(
        key for key in fields if key not in known and key not in SIM_KEYS and key not in LISTED_KEYS
    )


def instance_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of an :class:`~sage_llm.types.ExecutionInstance` from an
    instance given as a config file's entry has it (``sim_gpu`` … as its own keys) or as
    the instance has them (in ``metadata``): the ``sim_*`` keys are moved into a copy of
    ``metadata``. An instance's listing may be given back as it is: ``draining: true`` is
    ``is_available: false`` (registered drained), ``removing`` is read for its type only.
    ``ConfigError`` when a key is given both ways, or a listed state is not a boolean."""
    listed = {key: fields[key] for key in LISTED_KEYS if key in fields}
    for key, value in listed.items():
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {described(value)}", key=key)
    if listed:
        fields = {key: value for key, value in fields.items() if key not in listed}
        if listed.get("draining"):
            fields["is_available"] = False
    lifted = {key: fields[key] for key in SIM_KEYS if key in fields}
    if not lifted:
        return dict(fields)
    out = {key: value for key, value in fields.items() if key not in lifted}
    metadata = out.get("metadata")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, Mapping):
        raise ConfigError(f"must be a table, got {described(metadata)}", key="metadata")
    for key in lifted:
        if key in metadata:
            raise ConfigError(f"is given twice: as {key} and as metadata.{key}", key=key)
    out["metadata"] = {**metadata, **lifted}
    return out


def check_manager_arguments(**values: Any) -> None:
    """Check the ``ControlPlaneManager`` arguments a config file also has with the file's
    rules (those of ``[services.llm_control_plane]`` and of ``[admission]``): every
    argument of :data:`MANAGER_FILE_KEYS` must be given. Each problem is a
    :class:`ConfigError` whose ``key`` (and ``param``) is the argument; one problem raises
    it, several raise :class:`ConfigErrors`."""
    missing = MANAGER_FILE_KEYS - values.keys()
    if missing:
        raise TypeError(f"check_manager_arguments: missing {', '.join(sorted(missing))}")
    problems = Problems("")
    for name, value in values.items():  # None is "not set" in a file, never an argument's value
        default = _ARGUMENT_DEFAULTS.get(name)
        if value is None and default is not None:
            problems.add((name,), f"must not be None (its default is {default!r})")
    values = {k: v for k, v in values.items() if not problems.failed((k,))}
    admission = {k: values[k] for k in _ADMISSION_KEYS if k in values}
    read_dataclass(
        ControlPlaneConfig, {k: v for k, v in values.items() if k not in admission}, (), problems
    )
    read_dataclass(AdmissionConfig, admission, (), problems)
    raise_problems(problems.errors)


_ADMISSION_KEYS = ("max_queue_wait_s", "reject_infeasible_slo")
"""The ``ControlPlaneManager`` arguments read from ``[admission]``."""
MANAGER_FILE_KEYS = frozenset(
    f.name
    for f in dataclasses.fields(ControlPlaneConfig)
    if f.name not in ("type", "pd", "instances", "policy_params", "routing_params")
    and f.name not in ("scheduling_policy", "routing_strategy")  # unknown: NotFound errors
    and f.name not in SERVICE_DEFAULT_KEYS
) | frozenset(_ADMISSION_KEYS)
"""The ``ControlPlaneManager`` arguments :func:`check_manager_arguments` checks."""
_ARGUMENT_DEFAULTS = {
    **{
        f.name: f.default
        for f in dataclasses.fields(ControlPlaneConfig)
        if f.name in MANAGER_FILE_KEYS
    },
    **{f.name: f.default for f in dataclasses.fields(AdmissionConfig) if f.name in _ADMISSION_KEYS},
}
"""Their defaults in a file (None: the argument may be None)."""


_SIM_METADATA = SIM_KEYS
_INSTANCE_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(InstanceConfig)
    if f.name in {g.name for g in dataclasses.fields(ExecutionInstance)} and f.name != "metadata"
)
"""The fields an ``ExecutionInstance`` shares with ``InstanceConfig`` (``metadata`` may hold
any value, so only its type and ``sim_*`` entries are checked)."""
_NOT_NONE = tuple(
    f.name
    for f in dataclasses.fields(InstanceConfig)
    if f.name in _INSTANCE_FIELDS and f.default is not dataclasses.MISSING and f.default is not None
)
"""Fields with a default that is not None: None there is a mistake, not "unset"."""
_LIVE_FLAGS = ("is_available", "is_healthy")
_LIVE_FIGURES = (
    "gpu_utilization",
    "current_load",
    "avg_latency_ms",
    "throughput_tokens_per_sec",
    "active_requests",
)
"""An instance's live figures (no config entry has them): numbers >= 0 when given."""
_READ_BACK = ("instance_type", "engine", "scheme", "prefilling_config", "decoding_config")
"""Fields whose value as read (an enum from a name, a lowered name, a role-config object from
a dict) replaces what the caller gave."""


class _InstanceProblems(Problems):
    """Problems of an instance built in code: its ``sim_*`` options are ``metadata`` entries."""

    def add(self, path: KeyPath, message: str) -> None:
        if path and path[0] in _SIM_METADATA:
            path = ("metadata", *path)
        super().add(path, message)


def _result(config: SageConfig | None, errors: list[ConfigError]) -> SageConfig:
    raise_problems(errors)
    assert config is not None
    return config


def _load(
    path: Path, env: Mapping[str, str] | None, *, nested: bool = False
) -> tuple[SageConfig | None, list[ConfigError]]:
    try:
        text = read_utf8(path, "config file")
    except ConfigError as exc:
        return None, [exc]
    return _parse(text, str(path), env, nested=nested)


def _parse(
    text: str, source: str, env: Mapping[str, str] | None, *, nested: bool = False
) -> tuple[SageConfig | None, list[ConfigError]]:
    text = text.removeprefix("\ufeff")  # a byte-order mark (some editors write one) is not TOML
    try:
        data = read_toml(text, source)
    except ConfigError as exc:
        return None, [exc]
    try:
        locator = KeyLocator(text)
        problems = Problems(source, locator)
        problems.nested = nested  # a file another names: the files it names are not read
        config = _build(data, problems, env, bare=False)
    except RecursionError:
        return None, [ConfigError(TOO_DEEP, location=source)]
    return config, problems.sorted()


# -- building ------------------------------------------------------------------------------


def _build(
    data: object, p: Problems, env: Mapping[str, str] | None, *, bare: bool
) -> SageConfig | None:
    """The configuration in ``data``: a document, or with ``bare`` (dicts, never files) the
    bare service table when ``data`` has no ``services`` and a key that is no section."""
    if not isinstance(data, Mapping):
        p.add((), f"a configuration must be a table, got {described(data)}")
        return None
    environ: Mapping[str, str] = os.environ if env is None else env
    document: Mapping[str, Any] = {}
    service: Mapping[str, Any]
    spath: KeyPath = ()
    others: list[str] = []
    if bare and "services" not in data and not set(data) <= set(_DOCUMENT_KEYS):
        service = _bare_service(data, p)
    else:
        _top_level_keys(data, p)
        document = data
        service, spath, others = _find_service(data, p)
    config = _service_config(document, service, spath, environ, p)
    services = document.get("services")
    if (
        config is not None
        and isinstance(services, Mapping)
        and "llm_control_plane" not in services
        and not any(_is_ours(value) for value in services.values())
    ):  # SAGE's other services only
        foreign = tuple(
            f"{key} ({value['type']})"
            for key, value in services.items()
            if isinstance(value, Mapping) and isinstance(value.get("type"), str)
        )
        written_at = {**config.written_at, "services": p.where(("services",))}
        config = dataclasses.replace(config, foreign_services=foreign, written_at=written_at)
    for key in others:  # checked as the chosen one is; its sections are its own tables
        other = document["services"][key]
        if isinstance(other, Mapping):
            _service_config({}, other, ("services", key), environ, p)
    return config


def _service_config(
    document: Mapping[str, Any],
    service: Mapping[str, Any],
    spath: KeyPath,
    environ: Mapping[str, str],
    p: Problems,
) -> SageConfig | None:
    """The configuration of the control-plane table ``service`` (at ``spath``), with its
    sections from ``document``'s top level or from inside the table."""
    raw: dict[str, Mapping[str, Any] | None] = {}
    sections: dict[str, Any] = {}
    written_at: dict[str, str] = {}
    for name, cls in _SECTION_CLASSES:
        table, path = _section(document, service, spath, name, environ, p)
        raw[name] = table
        if name == "gateway":  # the bind address: resolved and bound only by serve
            for key in ("host", "port"):
                if key in (table or {}):
                    written_at[f"gateway.{key}"] = p.where((*path, key))
        sections[name] = cls() if table is None else read_dataclass(cls, table, path, p)
        if name == "gateway" and sections[name] is not None:
            sections[name] = _gateway_secrets(sections[name], path, environ, p)
    built = _control_plane(service, spath, environ, p)
    cp, checkable = built if built is not None else (None, [])
    for key in ("instances", "mode", "enable_pd_separation"):  # what launch refuses in a
        if key in service:  # --config file
            written_at[key] = p.where((*spath, key))
    entries = service.get("instances")
    for index, entry in enumerate(entries if isinstance(entries, list) else ()):
        if isinstance(entry, Mapping) and "port" in entry:  # serve's own-address check
            written_at[f"instances[{index}].port"] = p.where((*spath, "instances", index, "port"))
    pd_table = service.get("pd")
    if isinstance(pd_table, Mapping):
        for key in ("enabled", *INERT_PD_FIELDS):
            if key in pd_table:
                written_at[f"pd.{key}"] = p.where((*spath, "pd", key))
    if cp is None or any(sections[name] is None for name in ("gateway", "health", "admission")):
        return None
    # (a bad [simulation] is reported: the checks across sections still run)
    cp = _instance_secrets(cp, environ)
    health: HealthConfig = sections["health"]
    admission: AdmissionConfig = sections["admission"]
    for key, section in (
        ("health_interval_s", "health.interval_s"),
        ("max_queue_size", "admission.max_queue_size"),
    ):  # the same setting in two places: they must agree (as pd.enabled and its flag)
        section_name, name = section.split(".")
        ours, theirs = service.get(key), (raw[section_name] or {}).get(name)
        # as written; a bad value has its own problem, reported already
        bad = p.failed((*spath, key)) or any(
            p.failed((*where, name)) for where in ((section_name,), (*spath, section_name))
        )
        if is_number(ours) and is_number(theirs) and ours != theirs and not bad:
            p.add((*spath, key), f"contradicts {section} ({theirs!r}); set one of them")
    if "interval_s" in (raw["health"] or {}):
        cp = dataclasses.replace(cp, health_interval_s=health.interval_s)
    else:
        health = dataclasses.replace(health, interval_s=cp.health_interval_s)
    if admission.max_queue_size is not None:
        cp = dataclasses.replace(cp, max_queue_size=admission.max_queue_size)
    gateway_address_ok = not any(
        p.failed((*where, key))
        for where in (("gateway",), (*spath, "gateway"))
        for key in ("host", "port")
    )  # a refused one stands for the default here: compared, it would be a false match
    if "port" in (raw["gateway"] or {}) and gateway_address_ok:  # a --port may differ
        _check_not_the_gateway(cp, checkable, sections["gateway"], (*spath, "instances"), p)
    limit = sections["gateway"].max_tokens_limit
    if limit is not None and cp.default_max_tokens > limit:
        if service.get("default_max_tokens") is None:  # its default: as much as the limit allows
            cp = dataclasses.replace(cp, default_max_tokens=limit)
        else:
            p.add(
                (*spath, "default_max_tokens"),
                f"{cp.default_max_tokens} is above gateway.max_tokens_limit ({limit}): a "
                "request without max_tokens would get more than the gateway lets a request "
                "ask for",
            )
            return None
    if sections["simulation"] is None:
        return None
    return SageConfig(
        cp,
        sections["gateway"],
        health,
        admission,
        sections["simulation"],
        source=p.source,
        written_at=written_at,
    )


def _section(
    document: Mapping[str, Any],
    service: Mapping[str, Any],
    spath: KeyPath,
    name: str,
    environ: Mapping[str, str],
    p: Problems,
) -> tuple[Mapping[str, Any] | None, KeyPath]:
    """Section ``name``'s table (inside the service table, or top level) and its path; when
    both are given, that is a problem, and the top-level one's problems are reported too."""
    top, nested = document.get(name), service.get(name)
    if top is not None and nested is not None:
        where = ".".join(str(k) for k in (*spath, name))
        p.add((*spath, name), f"given twice, as [{name}] and as [{where}]; keep one")
        cls = dict(_SECTION_CLASSES)[name]  # the other is checked too: each problem is said
        checked = read_dataclass(cls, _table(top, (name,), p), (name,), p)
        if isinstance(checked, GatewayConfig):
            _gateway_secrets(checked, (name,), environ, p)
    if nested is not None:
        return _table(nested, (*spath, name), p), (*spath, name)
    if top is not None:
        return _table(top, (name,), p), (name,)
    return None, (name,)


def _table(value: Any, path: KeyPath, p: Problems) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    p.add(path, f"must be a table, got {described(value)}")
    return {}


def _top_level_keys(document: Mapping[str, Any], p: Problems) -> None:
    """Report the keys of a document that are not its tables; a control-plane key there
    (the ``[services.llm_control_plane]`` header forgotten) gets the header it belongs in."""
    for key, value in document.items():
        name = str(key)
        if name in _DOCUMENT_KEYS:
            continue
        if name not in _SERVICE_KEYS:
            sections = [s for s, cls in _SECTION_CLASSES if name in _field_names(cls)]
            hint = (
                f" (did you mean {name} under [{sections[0]}]?)"
                if len(sections) == 1
                else suggest(name, _DOCUMENT_KEYS)
            )
            p.add((name,), f"unknown key{hint}")
            continue
        if name == "instances":
            header = "[[services.llm_control_plane.instances]]"
        elif isinstance(value, Mapping):
            header = f"[services.llm_control_plane.{name}]"
        else:
            header = "[services.llm_control_plane]"
        p.add((name,), f"unknown key (did you mean {header}?)")


def _field_names(cls: type[Any]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _bare_service(data: Mapping[str, Any], p: Problems) -> Mapping[str, Any]:
    """``data`` as the bare service table, less its unknown keys (reported against every key
    the top level of a dict may hold)."""
    unknown = [key for key in data if key not in BARE_KEYS]
    for key in unknown:
        p.add((str(key),), f"unknown key{suggest(str(key), BARE_KEYS)}")
    return {k: v for k, v in data.items() if k not in unknown} if unknown else data


def _find_service(
    data: Mapping[str, Any], p: Problems
) -> tuple[Mapping[str, Any], KeyPath, list[str]]:
    """The control plane's service table and its path, and the names of the other
    control-plane service tables (a SAGE file may hold several; each is checked)."""
    services = data.get("services")
    if services is None:
        return {}, _SERVICE_PATH, []
    if not isinstance(services, Mapping):
        p.add(("services",), f"must be a table, got {described(services)}")
        return {}, _SERVICE_PATH, []
    chosen = "llm_control_plane" if "llm_control_plane" in services else None
    if chosen is None:
        ours = [k for k, v in services.items() if _is_ours(v)]
        if len(ours) > 1:
            p.add(
                ("services",),
                f"several control-plane services ({', '.join(ours)}); "
                "name the one to use llm_control_plane",
            )
        chosen = ours[0] if ours else None
    others: list[str] = []
    for key, value in services.items():
        if key == chosen:
            continue
        if _is_ours(value):
            others.append(str(key))
            continue
        if isinstance(value, Mapping) and value.get("type") == VLLM_SERVICE_TYPE:
            _check_vllm_service(value, ("services", str(key)), p)
            continue
        if isinstance(value, Mapping) and "type" in value:
            kind = value["type"]
            ours_in_another_case = next(
                (t for t in (*SERVICE_TYPES, VLLM_SERVICE_TYPE)
                 if isinstance(kind, str) and kind.strip().lower() == t.lower()),
                None,
            )  # fmt: skip
            if ours_in_another_case is not None:  # read as another's, it would be ignored
                p.add(
                    ("services", key, "type"),
                    f"unknown value {kind!r} (did you mean {ours_in_another_case!r}?)",
                )
            continue  # another SAGE service: not ours to check
        p.add(
            ("services", key),
            f"unknown service{suggest(key, ['llm_control_plane'])} (a service table needs a type)",
        )
    if chosen is None:
        return {}, _SERVICE_PATH, others
    return _table(services[chosen], ("services", chosen), p), ("services", chosen), others


def _check_vllm_service(table: Mapping[str, Any], path: KeyPath, p: Problems) -> None:
    """A ``VLLMService`` table, checked as :class:`~sage_llm.service.VLLMService` reads it
    (its control plane's table too, with ``use_control_plane``)."""
    from sage_llm.service.config import VLLMServiceConfig, check_beside_config_path

    theirs = [k for k in ("scheduling_policy", "routing_strategy", "instances") if k in table]
    if theirs and "model_id" not in table:  # a control plane's table under the old type
        p.add(
            (*path, "type"),
            f"a VLLMService table holds VLLMService's keys (model_id, engine …), not "
            f'{", ".join(theirs)}: for the control plane, type = "ControlPlaneVLLMService"',
        )
        return
    # (its control_plane table, with use_control_plane, is checked by from_dict itself,
    # beside the table's other problems; the file a table's config_path names below)
    control_plane = table.get("control_plane")
    file_at: KeyPath = (*path, "control_plane")
    if isinstance(control_plane, Mapping) and isinstance(control_plane.get("config_path"), str):
        file_at = (*file_at, "config_path")  # the file, read beside this one as below
        rest = {k: v for k, v in control_plane.items() if k != "config_path"}
        read_params(lambda: check_beside_config_path(rest), file_at[:-1], p)
        table, control_plane = {**table, "control_plane": rest}, control_plane["config_path"]
    read_params(lambda: VLLMServiceConfig.from_dict(table), path, p)
    # a control_plane file is checked whatever else the table's problems (else they had
    # shown only on the next run), when these two keys are sound
    if (
        table.get("use_control_plane") is not True
        or p.failed((*path, "control_plane"))
        or p.failed((*path, "use_control_plane"))
    ):
        return
    if isinstance(control_plane, str) and not p.nested:
        # a file of its own, read beside this one (VLLMService.from_toml reads it so),
        # checked for itself only (not the files it names: two naming each other, or a
        # file naming itself, would be read for ever)
        other = Path(p.source).parent / control_plane
        config, errors = _load(other, None, nested=True)
        if config is not None and not errors:
            try:
                config.check_has_control_plane()
            except ConfigError as exc:
                errors = [exc]
        for problem in errors:  # each at its own file and line, named from here
            p.add(file_at, str(problem))


def _is_ours(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("type") in SERVICE_TYPES


_PD_PLUGIN_READS = {
    "routing_policy": "metadata.decider_params",
    "prefilling_threshold_input_tokens": None,
    "prefilling_threshold_ratio": None,
    "max_transfer_latency_ms": None,
    "connector": "metadata.connector_params",
}
"""The ``pd`` fields :func:`~sage_llm.control_plane.pd.build_pd` reads besides
``metadata``, each with the parameters whose check depends on it: those of the plugin it
chooses (the others only give a parameter its value, which ``metadata`` may set again)."""


def _pd_for_plugins(
    pd: PDSeparationConfig, table: Mapping[str, Any], spath: KeyPath, p: Problems
) -> tuple[PDSeparationConfig, tuple[str, ...]] | None:
    """The ``pd`` configuration to build the PD plugins from, to check their parameters,
    and the keys of the parameters not to judge: ``pd`` when the table was read whole;
    else the fields they read as written, a refused one at its default; when that one
    chooses a plugin, its parameters are then not judged (checked against another
    decider or connector than the file's, they would be misjudged); the pairing's and
    ``kv_bytes_per_token`` are judged whatever else was refused. None when the table or
    its ``metadata`` was refused. An unknown key does not stop them being checked."""
    pd_path = (*spath, "pd")
    if p.failed(pd_path) or p.failed_under((*pd_path, "metadata")):
        return None
    if not any(p.failed_under((*pd_path, f.name)) for f in dataclasses.fields(PDSeparationConfig)):
        return pd, ()
    refused = [name for name in _PD_PLUGIN_READS if p.failed_under((*pd_path, name))]
    used = {
        key: table[key]
        for key in (*_PD_PLUGIN_READS, "metadata")
        if key in table and key not in refused
    }
    cfg = read_dataclass(PDSeparationConfig, used, pd_path, Problems(p.source))
    if cfg is None:
        return None
    unjudged = (_PD_PLUGIN_READS[name] for name in refused)
    return cfg, tuple(dict.fromkeys(key for key in unjudged if key is not None))


def _set_fields(obj: Any) -> dict[str, Any]:
    """A dataclass object given for a table, as the table of the fields it sets (those
    not at their defaults: a dict that leaves a key out leaves it at its default too)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            out[f.name] = value
            continue
        if value != default:
            out[f.name] = value
    return out


def _same(value: object) -> object:
    return value


def _ms_as_limit_s(value: object) -> object:
    """``max_transfer_latency_ms`` as the decider's ``max_transfer_s`` (0: no limit)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value / 1000.0 if value > 0 else None
    return value


_PD_TWICE: tuple[tuple[str, str, str, Callable[[object], object]], ...] = (
    ("prefilling_threshold_input_tokens", "decider_params", "min_prompt_tokens", _same),
    ("prefilling_threshold_ratio", "decider_params", "min_ratio", _same),
    ("max_transfer_latency_ms", "decider_params", "max_transfer_s", _ms_as_limit_s),
    ("metadata.kv_bytes_per_token", "pairing_params", "kv_bytes_per_token", _same),
    ("metadata.kv_bytes_per_token", "decider_params", "kv_bytes_per_token", _same),
)
"""A ``pd`` setting and the plugin parameter it sets (its value as the parameter reads
it), which ``metadata`` may set too."""


def _check_pd_given_twice(table: Mapping[str, Any], path: KeyPath, p: Problems) -> None:
    """A setting given both as a ``pd`` key and as a plugin parameter in ``metadata``, with
    two values: the parameter would win, unsaid (``--print`` showing the other)."""
    meta = table.get("metadata")
    if not isinstance(meta, Mapping):
        return
    for setting, plugin, key, as_param in _PD_TWICE:
        params = meta.get(plugin)
        owner = meta if setting.startswith("metadata.") else table
        name = setting.removeprefix("metadata.")
        if not isinstance(params, Mapping) or key not in params or name not in owner:
            continue
        if params[key] != as_param(owner[name]):
            p.add(
                (*path, "metadata", plugin, key),
                f"contradicts pd.{setting} ({owner[name]!r}); set one of them",
            )


def _pd_plugin_problems(cfg: PDSeparationConfig, skipped: Sequence[str]) -> None:
    """Build the PD plugins of ``cfg``; raise their problems but those under ``skipped``."""
    try:
        build_pd(cfg)
    except ConfigError as exc:
        raise_problems(
            [e for e in exc.each() if not any((e.key or "").startswith(k) for k in skipped)]
        )


def _control_plane(
    service: Mapping[str, Any], spath: KeyPath, env: Mapping[str, str], p: Problems
) -> tuple[ControlPlaneConfig, list[tuple[int, InstanceConfig]]] | None:
    """The control plane of ``service``, and its instances to check fleet-wide by index
    (:func:`_checkable`)."""
    cp = read_dataclass(
        ControlPlaneConfig, service, spath, p, extra_keys=SECTIONS, foreign=FOREIGN_RULES
    )
    if cp is None:
        return None
    pd_table = service.get("pd")
    if dataclasses.is_dataclass(pd_table) and not isinstance(pd_table, type):
        pd_table = _set_fields(pd_table)  # checked as the table of what it sets
    enabled = cp.enable_pd_separation
    if isinstance(pd_table, Mapping) and isinstance(pd_table.get("enabled"), bool):
        if "enable_pd_separation" in service and enabled != cp.pd.enabled:
            p.add((*spath, "pd", "enabled"), "contradicts enable_pd_separation; set one of them")
        enabled = cp.pd.enabled
    pd = dataclasses.replace(cp.pd, enabled=enabled)
    cp = dataclasses.replace(cp, enable_pd_separation=enabled, pd=pd)
    _check_pd(pd, (*spath, "pd"), p)
    plugins = _pd_for_plugins(pd, pd_table, spath, p) if isinstance(pd_table, Mapping) else None
    if plugins is not None:
        # the plugins' own checks: the decider's, the pairing's and the connector's
        # parameters (metadata.decider_params …), as the control plane will build them
        read_params(lambda: _pd_plugin_problems(*plugins), (*spath, "pd"), p)
    if isinstance(pd_table, Mapping):  # (after: its problems are under metadata)
        _check_pd_given_twice(pd_table, (*spath, "pd"), p)
        meta = pd_table.get("metadata")
        decider = meta.get("decider_params") if isinstance(meta, Mapping) else None
        given = cp.prefix_block_size  # written, or its default: the manager's either way
        block_key = (*spath, "pd", "metadata", "decider_params", "block_size")
        if (
            isinstance(decider, Mapping)
            and pd_table.get("routing_policy", cp.pd.routing_policy) == "prefix_aware"
            and decider.get("block_size", given) != given  # built with the manager's
            and not p.failed(block_key)  # (a bad value is said once, as bad)
        ):
            p.add(
                block_key,
                f"contradicts prefix_block_size ({given!r}), which prefix_aware counts "
                "cached blocks with; set one of them",
            )
    policy, policy_params = cp.scheduling_policy, cp.policy_params
    if "policy_params" in service and not p.failed((*spath, "scheduling_policy")):
        read_params(
            lambda: build_params(
                params_class(policy), policy_params, owner=f"scheduling policy {policy!r}"
            ),
            (*spath, "policy_params"),
            p,
        )
    strategy, routing_params = cp.routing_strategy, cp.routing_params
    if "routing_params" in service and not p.failed((*spath, "routing_strategy")):
        read_params(
            lambda: build_params(
                get_strategy(strategy).params_type,
                routing_params,
                owner=f"routing strategy {strategy!r}",
                finite=True,
            ),
            (*spath, "routing_params"),
            p,
        )
    _check_instances(service.get("instances"), cp.mode, (*spath, "instances"), env, p)
    checkable = _checkable(service, spath, cp, p)
    unsure = _unsure_models(service.get("instances"), checkable, (*spath, "instances"), p)
    _check_servable(cp, checkable, unsure, (*spath, "instances"), p)
    _check_pd_connector(cp, checkable, (*spath, "instances"), p)
    if cp.mode == "simulated":  # every instance's engine is simulated (engine = "sim": its own)
        for index, inst in checkable:
            tp, pp = inst.tensor_parallel_size, inst.pipeline_parallel_size
            problem = placement_problem(inst.sim_model, inst.sim_gpu, tp=tp, pp=pp)
            if problem is not None and inst.engine != "sim":
                p.add(
                    (*spath, "instances", index),
                    f"its simulated engine cannot start: {problem}",
                )
    return cp, checkable


def _checkable(
    service: Mapping[str, Any], spath: KeyPath, cp: ControlPlaneConfig, p: Problems
) -> list[tuple[int, InstanceConfig]]:
    """The instances the fleet-wide checks look at, by index: every one; or, when some have
    problems of their own (then ``cp`` holds none), each of the others, so that one bad
    instance does not hide the others' problems."""
    path = (*spath, "instances")
    if not p.failed_under(path):
        return list(enumerate(cp.instances))
    raw = service.get("instances")
    if not isinstance(raw, list | tuple):
        return []
    checkable = []
    for index, item in enumerate(raw):
        if isinstance(item, Mapping) and not p.failed_under((*path, index)):
            scratch = Problems(p.source)  # its problems were reported with the control plane
            inst = read_dataclass(InstanceConfig, item, (), scratch, foreign=FOREIGN_RULES)
            if inst is not None and not scratch.errors:
                checkable.append((index, inst))
    return checkable


def _check_pd(pd: PDSeparationConfig, path: KeyPath, p: Problems) -> None:
    for role in ("prefilling", "decoding"):
        low, high = getattr(pd, f"{role}_min_instances"), getattr(pd, f"{role}_max_instances")
        if low > high:
            p.add((*path, f"{role}_min_instances"), f"is above {role}_max_instances ({high})")


def _check_instances(
    raw: object, mode: str, path: KeyPath, env: Mapping[str, str], p: Problems
) -> None:
    """Duplicate ids and addresses, and ``api_key_env``, checked on the raw tables so that
    instances with other problems are checked too."""
    if not isinstance(raw, list | tuple):
        return
    ids: dict[str, int] = {}
    addresses: dict[tuple[str, int], int] = {}
    for index, entry in enumerate(raw):
        if isinstance(entry, InstanceConfig):  # given as the dataclass (config_from_dict)
            item: Mapping[str, Any] = {
                f.name: getattr(entry, f.name) for f in dataclasses.fields(entry)
            }
        elif isinstance(entry, Mapping):
            item = entry
        else:
            continue
        iid = item.get("instance_id")
        if isinstance(iid, str):
            first = ids.setdefault(iid, index)
            if first != index:
                p.add(
                    (*path, index, "instance_id"),
                    f"duplicate instance id {iid!r} (also instances[{first}])",
                )
        host, port = item.get("host"), item.get("port")
        engine = item.get("engine")  # a name in any case, as it is read
        simulated = mode == "simulated" or (isinstance(engine, str) and engine.lower() == "sim")
        if isinstance(host, str) and isinstance(port, int) and not simulated:
            other = addresses.setdefault((reached_key(host), port), index)
            if other != index:
                p.add((*path, index, "port"), f"{host}:{port} is also instances[{other}]'s address")
        metadata = item.get("metadata")
        if isinstance(metadata, Mapping):
            for key in sorted(CHECKED_METADATA & metadata.keys()):
                problem = metadata_problem(key, metadata[key])
                if problem is not None:
                    p.add((*path, index, "metadata", key), problem)
            for key in SIM_KEYS:  # checked here too, whatever else the entry lacks
                where = (*path, index, "metadata", key)
                if key in metadata and not p.failed(where):  # (said once, by the entry)
                    p.add(where, sim_key_in_metadata(key))
        _check_role_configs(item, (*path, index), p)
        env_name = item.get("api_key_env")
        if isinstance(env_name, str) and not p.failed((*path, index, "api_key_env")):
            if item.get("api_key") is not None:
                p.add((*path, index, "api_key_env"), "set api_key or api_key_env, not both")
            else:
                _env_secret(env_name, (*path, index, "api_key_env"), env, p)


def _check_role_configs(item: Mapping[str, Any], path: KeyPath, p: Problems) -> None:
    """A role's config on an instance of another role, checked on the raw entry when the
    entry has problems of its own (else :class:`InstanceConfig` reported it): one bad field
    had hidden it until the next run."""
    if not p.failed_under(path):
        return
    given = [k for k in ROLE_CONFIGS if item.get(k) is not None]
    try:
        kind = ExecutionInstanceType.parse(item.get("instance_type", "GENERAL"))
    except (ValueError, TypeError):
        return  # (its own problem, reported)
    problem = role_config_problem(kind, given)
    if problem is not None and not p.failed((*path, problem[0])):
        p.add((*path, problem[0]), problem[1])


def _check_not_the_gateway(
    cp: ControlPlaneConfig,
    checkable: Sequence[tuple[int, InstanceConfig]],
    gateway: GatewayConfig,
    path: KeyPath,
    p: Problems,
) -> None:
    """An HTTP instance at the gateway's own address would be sent the gateway's requests
    back (each then answered 409, its id already in progress)."""
    for index, inst in instances_at(cp, gateway.host, gateway.port, checkable):
        p.add(
            (*path, index, "port"),
            f"{inst.host}:{inst.port} is the gateway's own address (gateway.port): "
            "its requests would come back to the gateway",
        )


def instances_at(
    cp: ControlPlaneConfig,
    host: str,
    port: int,
    candidates: Sequence[tuple[int, InstanceConfig]] | None = None,
) -> list[tuple[int, InstanceConfig]]:
    """The HTTP instances of ``cp`` (by index; ``candidates``: those instead) at the address
    a gateway bound to ``host`` and ``port`` listens on: the gateway's requests to them
    would come back to it. None for port 0 (a free one is picked) and in ``simulated``
    mode."""
    if cp.mode == "simulated" or not port:
        return []
    return [
        (index, inst)
        for index, inst in (enumerate(cp.instances) if candidates is None else candidates)
        if inst.engine != "sim" and at_address(inst.host, inst.port, host, port)
    ]


def at_address(host: str, port: int, bind_host: str, bind_port: int) -> bool:
    """Whether an engine at ``host:port`` is a gateway bound to ``bind_host:bind_port``:
    the same address, or a loopback address of a family it listens on whole (``0.0.0.0``:
    IPv4's, ``::``: IPv6's, which asyncio binds alone, ``""``: both; ``localhost``: both
    families' loopback, as it resolves). An engine at ``0.0.0.0`` (``::``) is reached at
    the loopback address of its family, as a connection to it is."""
    if port != bind_port:
        return False
    bind, there = _bind_key(bind_host), reached_key(host)  # (0.0.0.0 is the loopback)
    if there == bind:
        return True
    try:
        address = ipaddress.ip_address(there)
    except ValueError:
        return False  # a host name: compared as written
    if bind_host.strip().lower() == "localhost":
        return str(address) in (_LOOPBACK, "::1")
    families = {"0.0.0.0": (4,), "::": (6,), "": (4, 6)}.get(bind, ())
    return address.is_loopback and address.version in families


_LOOPBACK = "127.0.0.1"


def _bind_key(host: str) -> str:
    """A bind address as the listener reads it, without a name lookup: ``*`` is every
    address of both families (as ``""``), and an IPv4 shorthand (``0``, ``0x7f.1``) the
    address it stands for; anything else as :func:`host_key` writes it."""
    name = host.strip().lower()
    if name == "*":
        return ""
    try:
        return socket.inet_ntoa(socket.inet_aton(name))
    except OSError:
        return host_key(host)


def host_key(host: str) -> str:
    """``host`` as two addresses are compared: case-blind, a name's trailing dot (the
    root's) left out, ``localhost`` read as ``127.0.0.1``, an IP address in its one written
    form (``0:0:0:0:0:0:0:1`` is ``::1``, an IPv4-mapped ``::ffff:127.0.0.1`` the IPv4
    address it reaches): one engine, whichever way it is written."""
    name = host.strip().lower()
    if name.endswith(".") and name != ".":
        name = name[:-1]  # example.com. is example.com
    if name == "localhost":
        return _LOOPBACK
    try:
        address = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return name  # a host name
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(address if mapped is None else mapped)


def reached_key(host: str) -> str:
    """An engine's ``host`` as :func:`host_key` writes it, the unspecified address read as
    the loopback address of its family (a connection to ``0.0.0.0`` reaches this host's
    ``127.0.0.1``): two engine addresses that reach one engine have one key."""
    key = host_key(host)
    if key == "0.0.0.0":
        return _LOOPBACK
    return "::1" if key == "::" else key


def _unsure_models(
    raw: object, checkable: Sequence[tuple[int, InstanceConfig]], path: KeyPath, p: Problems
) -> set[str] | None:
    """The models served by an instance the fleet-wide checks do not look at (one with
    problems of its own); None when such an instance's model is not known (none given, or
    a bad one: it might be any)."""
    if not isinstance(raw, list | tuple):
        return set()
    checked = {index for index, _ in checkable}
    models: set[str] = set()
    for index, entry in enumerate(raw):
        if index in checked:
            continue
        model = (
            entry.model_name
            if isinstance(entry, InstanceConfig)
            else entry.get("model_name")
            if isinstance(entry, Mapping)
            else None
        )
        if not isinstance(model, str) or p.failed((*path, index, "model_name")):
            return None
        models.add(model)
    return models


def _check_servable(
    cp: ControlPlaneConfig,
    checkable: Sequence[tuple[int, InstanceConfig]],
    unsure: set[str] | None,
    path: KeyPath,
    p: Problems,
) -> None:
    """Each configured model must have an instance (or a PD pair) that can run its
    requests: a fleet of only PREFILLING instances, say, could never answer one. A model
    one of whose instances has problems of its own (a duplicate id …) is not checked:
    that instance might be the one that runs its requests (``unsure``: those models; None:
    every model)."""
    if unsure is None:
        return
    members: dict[str, list[tuple[str, ExecutionInstanceType]]] = {}
    for _, inst in checkable:
        members.setdefault(inst.model_name, []).append((inst.instance_id, inst.instance_type))
    for model, group in members.items():
        if model in unsure:
            continue
        reason = unservable_reason(model, group, pd_enabled=cp.enable_pd_separation)
        if reason is not None:
            p.add(path, f"{reason}, so no request for it could ever run")


def _check_pd_connector(
    cp: ControlPlaneConfig,
    checkable: Sequence[tuple[int, InstanceConfig]],
    path: KeyPath,
    p: Problems,
) -> None:
    """Each instance of a model served disaggregated (a PREFILLING, DECODING or HYBRID
    instance serves it; a GENERAL one may take a leg too) has an engine that speaks the
    PD connector's hand-off (``vllm``: ``kv_transfer_params``; ``sglang``: the bootstrap
    room): one that does not would fail the disaggregated requests it takes part in.
    Simulated engines speak both. Checked on the instances without problems of their own
    (``checkable``, by index): one with problems can only add a model served so."""
    if cp.mode == "simulated" or not (cp.enable_pd_separation and cp.pd.enabled):
        return
    connector = cp.pd.connector
    disaggregated = {i.model_name for _, i in checkable if i.instance_type in PD_LEG_ROLES}
    for index, inst in checkable:
        if inst.model_name not in disaggregated:  # (its requests run whole)
            continue  # (a GENERAL or HYBRID instance may take a leg of its model's too)
        problem = pd_engine_problem(inst.instance_type, inst.engine, connector)
        if problem is not None:
            p.add((*path, index, "engine"), problem)


_GENERAL = ExecutionInstanceType.GENERAL
PD_LEG_ROLES = (
    ExecutionInstanceType.PREFILLING,
    ExecutionInstanceType.DECODING,
    ExecutionInstanceType.HYBRID,
)
"""Roles whose instances make their model served disaggregated under PD."""


def pd_engine_problem(role: ExecutionInstanceType, engine: str, connector: str) -> str | None:
    """Why an instance of ``role`` on ``engine`` cannot take part in the ``connector`` PD
    connector's hand-off of its model's requests (None: it can; ``sim`` speaks both). An
    SGLang server takes a leg only in its ``--disaggregation-mode`` (prefill or decode):
    one without it ignores the hand-off and runs the whole request, so a GENERAL or HYBRID
    instance on SGLang cannot take the legs such a role is given."""
    if engine == "sglang" == connector and role in (_GENERAL, ExecutionInstanceType.HYBRID):
        return (
            f"a {role.name} instance on 'sglang' cannot take a PD leg: an SGLang server takes "
            "one only in its --disaggregation-mode (prefill or decode) and runs the whole "
            "request otherwise (its partner leg then waits a minute for the hand-off): make "
            "it PREFILLING or DECODING, or serve its model under another name"
        )
    if engine in ("sim", connector):
        return None
    return (
        f"a {role.name} instance on {engine!r} cannot take the {connector!r} PD "
        f"connector's hand-off (pd.connector): run it on {connector}, or set "
        f"pd.connector to an engine's own (vllm or sglang)"
    )


# -- secrets -------------------------------------------------------------------------------


def _env_secret(name: str, path: KeyPath, env: Mapping[str, str], p: Problems) -> str | None:
    value = env.get(name)
    if value is None:
        p.add(path, f"environment variable {name} is not set")
        return None
    if not value.strip():
        p.add(path, f"environment variable {name} is empty")
        return None
    if has_control_characters(value.strip()):  # (never quoted)
        p.add(path, f"environment variable {name} holds control characters")
        return None
    if value.strip() == SECRET_MASK:
        p.add(path, env_mask_problem(name))
        return None
    return value.strip()


def _file_read(
    value: str, path: KeyPath, p: Problems, read: Callable[[Path], T]
) -> tuple[T | None, str]:
    """``read`` of the file a ``*_file`` key names (relative: to the config file's
    directory), and the file's absolute path (what the loaded key holds, so that it is
    read the same from anywhere); None when it cannot be read (reported to ``p``)."""
    base = Path(p.source).parent if p.source and not p.source.startswith("<") else Path()
    try:
        where = secret_file_path(value, base).absolute()
    except ValueError as exc:
        p.add(path, str(exc))
        return None, value
    try:
        return read(where), str(where)
    except ValueError as exc:
        p.add(path, str(exc))
        return None, str(where)


def _gateway_secrets(
    gw: GatewayConfig, path: KeyPath, env: Mapping[str, str], p: Problems
) -> GatewayConfig:
    """``gw`` with its secrets read from the environment and from files; on a problem
    (reported to ``p``, so the configuration is refused) ``gw`` as it is, for the checks
    that follow to report theirs too."""
    keys = list(gw.api_keys)
    token = gw.admin_token
    ok = True  # every problem is reported
    keys_file, token_file = gw.api_keys_file, gw.admin_token_file  # read: their whole paths
    if gw.api_keys_env is not None:
        raw = _env_secret(gw.api_keys_env, (*path, "api_keys_env"), env, p)
        from_env = [] if raw is None else [k.strip() for k in raw.split(",") if k.strip()]
        if raw is not None and not from_env:
            p.add(
                (*path, "api_keys_env"),
                f"environment variable {gw.api_keys_env} holds no API key (only commas and spaces)",
            )
        if SECRET_MASK in from_env:  # one of several
            p.add((*path, "api_keys_env"), env_mask_problem(gw.api_keys_env))
            from_env = []
        ok = bool(from_env)
        keys += from_env
    if gw.api_keys_file is not None:
        from_file, keys_file = _file_read(
            gw.api_keys_file, (*path, "api_keys_file"), p, read_keys_file
        )
        ok = ok and from_file is not None
        keys += from_file or []
    given = [k for k in ("admin_token", "admin_token_env", "admin_token_file") if getattr(gw, k)]
    if len(given) > 1:
        p.add((*path, given[1]), only_one(given))
        ok = False
    elif gw.admin_token_env is not None:
        token = _env_secret(gw.admin_token_env, (*path, "admin_token_env"), env, p)
        ok = ok and token is not None
    elif gw.admin_token_file is not None:
        token, token_file = _file_read(
            gw.admin_token_file, (*path, "admin_token_file"), p, read_secret_file
        )
        ok = ok and token is not None
    if token is not None and token in keys:  # a user's key would open the admin API
        where = given[0] if given else "admin_token"
        p.add((*path, where), "is also one of the API keys: the admin token must be another")
        ok = False
    tenants = _tenant_secrets(gw, path, env, keys, token, p)
    if not ok or tenants is None:
        return gw
    merged = tuple(dict.fromkeys(keys))
    added = tuple(key for key in merged if key not in gw.api_keys)  # told apart in a dump
    return dataclasses.replace(
        gw,
        api_keys=merged,
        admin_token=token,
        api_keys_read=added,
        api_keys_read_by=(gw.api_keys_env, keys_file),
        tenants=tenants,
        api_keys_file=keys_file,
        admin_token_file=token_file,
    )


def _tenant_secrets(
    gw: GatewayConfig,
    path: KeyPath,
    env: Mapping[str, str],
    keys: Sequence[str],
    token: str | None,
    p: Problems,
) -> tuple[TenantConfig, ...] | None:
    """``gw``'s tenants with their keys read from the environment or their files, each
    checked against the API keys, the admin token and the other tenants' keys; None on a
    problem (reported to ``p``)."""
    out: list[TenantConfig] = []
    earlier: dict[str, int] = {}
    ok = True
    for index, tenant in enumerate(gw.tenants):
        at: KeyPath = (*path, "tenants", index)
        given = [k for k in ("api_key", "api_key_env", "api_key_file") if getattr(tenant, k)]
        if len(given) > 1:
            p.add((*at, given[1]), only_one(given))
            ok = False
            continue
        where: KeyPath = (*at, given[0] if given else "api_key")
        key, key_file = tenant.api_key, tenant.api_key_file
        if tenant.api_key_env is not None:
            key = _env_secret(tenant.api_key_env, where, env, p)
        elif tenant.api_key_file is not None:
            key, key_file = _file_read(tenant.api_key_file, where, p, read_secret_file)
        if key is None:
            ok = False
            continue
        if (problem := tenant_key_problem(key, keys, token, earlier)) is not None:
            p.add(where, problem)
            ok = False
        earlier.setdefault(key, index)
        out.append(dataclasses.replace(tenant, api_key=key, api_key_file=key_file))
    return tuple(out) if ok else None


def _instance_secrets(cp: ControlPlaneConfig, env: Mapping[str, str]) -> ControlPlaneConfig:
    """Instances with ``api_key`` read from ``api_key_env`` (problems were reported earlier:
    a value that is no key leaves it unset)."""

    def read(name: str) -> str | None:
        value = env.get(name, "").strip()
        usable = value and value != SECRET_MASK and not has_control_characters(value)
        return value if usable else None

    instances = tuple(
        dataclasses.replace(inst, api_key=read(inst.api_key_env))
        if inst.api_key_env is not None
        else inst
        for inst in cp.instances
    )
    return dataclasses.replace(cp, instances=instances)
