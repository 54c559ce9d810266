"""The configuration's frozen dataclasses: one per table, with defaults and checks.

Each field's :class:`~sage_llm.config_fields.Rule` says what its value must satisfy;
:data:`FOREIGN_RULES` does the same for the seed dataclasses of :mod:`sage_llm.types`
(``PDSeparationConfig``, ``PrefillingConfig``, ``DecodingConfig``). Reading files is
:mod:`sage_llm.config`'s job; these classes are plain values that can also be built in code.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from sage_llm.config_fields import (
    CHECKED_METADATA,
    DERIVED,
    INT64_MAX,
    SECRET_MASK,
    FieldValueError,
    Rule,
    has_control_characters,
    metadata_problem,
    name_key,
    name_problem,
    opt,
    req,
    rule,
    suggest,
    to_plain,
    validate,
)
from sage_llm.control_plane.params import MAX_WINDOW, USER_LABELS
from sage_llm.control_plane.routing.registry import ROUTING_NAMES
from sage_llm.control_plane.scheduling.registry import POLICY_NAMES
from sage_llm.engines.base import ENGINE_STREAM
from sage_llm.errors import ConfigError
from sage_llm.sim.specs import get_gpu, get_model, placement_problem
from sage_llm.types import (
    DecodingConfig,
    ExecutionInstance,
    ExecutionInstanceType,
    PDSeparationConfig,
    PrefillingConfig,
    RequestPriority,
)

SERVICE_TYPES = ("ControlPlaneVLLMService",)
"""The ``type`` of a control-plane table under ``[services]``."""
VLLM_SERVICE_TYPE = "VLLMService"
"""The ``type`` of a SAGE ``VLLMService`` table (its own keys: ``model_id``, ``engine`` …)."""
MODES = ("http", "simulated")
ENGINES = ("vllm", "sglang", "openai", "sim")
PD_DECIDERS = ("always", "never", "threshold", "prefix_aware", "adaptive")
PD_CONNECTORS = ("vllm", "sglang")
DEFAULT_SIM_MODEL = "llama-3-8b"
MASK = SECRET_MASK
SECTIONS = ("gateway", "health", "admission", "simulation")
SIM_KEYS = ("sim_gpu", "sim_model", "sim_speed", "sim_seed", "sim_max_loras")


def sim_key_in_metadata(key: str) -> str:
    """The problem of a ``sim_*`` key written in an instance's ``metadata``."""
    return f"give {key} as a key of the instance, not in its metadata"


"""An instance entry's simulator keys; an ``ExecutionInstance`` carries them in its
``metadata``."""

SERVICE_DEFAULT_KEYS = (
    "default_priority",
    "default_slo_deadline_ms",
    "default_temperature",
    "default_top_p",
    "request_timeout_s",
)
"""Keys of ``[services.llm_control_plane]`` read by the SAGE services alone: the request
defaults of ``ControlPlaneVLLMService.process`` (not ``ControlPlaneManager`` arguments)."""

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _mode(value: str) -> str:
    text = value.strip().lower()
    return {"sim": "simulated", "local": "simulated"}.get(text, text)


_DIGITS_AND_DOTS = re.compile(r"[0-9.]*[0-9][0-9.]*")


def ipv4_shorthand(value: str) -> str | None:
    """The IPv4 address in full (``127.0.0.1``) that ``value`` stands for when it is a
    shorthand the system reads but no URL's host is (``127.1``, ``0x7f.1``,
    ``0177.0.0.1``, ``2130706433``); None for an address written in full, or no address."""
    if any(c.isspace() for c in value):  # (inet_aton reads up to one, ignoring the rest)
        return None
    try:
        full = socket.inet_ntoa(socket.inet_aton(value))
    except (OSError, ValueError):
        return None
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return full
    return None


def host_problem(value: str) -> str | None:
    """An instance's host: what an engine URL is built from (``scheme://host:port``)."""
    if "://" in value or "/" in value:
        return "must be a host name or address, not a URL (set scheme separately)"
    # a URL holds a name in its NFKC form, with IDNA's dots as dots (１２７。１ is 127.1)
    normal = unicodedata.normalize("NFKC", value).replace("\u3002", ".")
    if normal != value and not any(c.isspace() or not c.isprintable() for c in value):
        written = ipv4_shorthand(normal) or normal  # (the address's checks see that form)
        if (problem := host_problem(written)) is not None:  # no form to advise: why not
            return f"{problem} (written {value!r}, which a URL holds as {written!r})"
        return f"must be written as {written!r} (the form a URL's host takes), got {value!r}"
    full = ipv4_shorthand(value)  # 127.1, 0x7f.1, 2130706433, 01.2.3.4: no URL's host
    if full is not None:
        return (
            "must be an IPv4 address written in full (four numbers 0-255 without "
            f"leading zeros): {full!r}, got {value!r}"
        )
    if _DIGITS_AND_DOTS.fullmatch(value):  # 1.2.3.999: no address at all
        try:
            ipaddress.IPv4Address(value)
        except ValueError:
            return (
                "must be an IPv4 address written in full (four numbers 0-255 without "
                f"leading zeros, e.g. 127.0.0.1), got {value!r}"
            )
    problem = _check_address(value)
    if problem is None and ":" in value and "%" in value:  # (one to listen on may)
        return "an IPv6 address with a zone id (%…) cannot be put in a URL here"
    if problem is None and ":" not in value:  # a name (not an IPv6 address): its bytes
        encoded = value.encode("idna")
        printable = (c for c in encoded if 0x20 < c < 0x7F)  # (control characters: above)
        if bad := next((chr(c) for c in printable if not _NAME_BYTE.fullmatch(bytes([c]))), None):
            return f"must be a host name of letters, digits, '-', '_' and dots, not {bad!r}"
    return problem


def bind_host_problem(value: str) -> str | None:
    """The gateway's address to listen on (any form the system resolves: ``0``, ``127.1``)."""
    if "://" in value or "/" in value:
        return "must be a host name or address to listen on, not a URL"
    return _check_address(value)


def _check_address(value: str) -> str | None:
    if any(c.isspace() for c in value):
        return "must not contain spaces"
    if found := next((c for c in "?#@" if c in value), None):  # a URL's query, fragment,
        return f"must be a host name or address, without {found!r}"  # user: not the host
    if value.startswith("[") and value.endswith("]"):
        return f"write an IPv6 address without brackets: {value[1:-1]!r}"
    if ":" in value:
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            return "must be a host name or address without a port (set port separately)"
    elif problem := _name_problem(value):
        return problem
    return name_problem(value)


def _name_problem(value: str) -> str | None:
    """A host name no lookup could take: an empty label (``a..b``, a leading dot), one
    longer than 63 characters, or a name longer than 253 (the resolver's limits)."""
    name = value.translate(_IDNA_DOTS)  # IDNA's other dots separate labels as "." does
    try:
        encoded = name.encode("idna")
    except UnicodeError as exc:
        if (c := _idna_refused(name)) is not None:
            return f"must be a host name without {c!r} (IDNA takes no such character)"
        labels = name.rstrip(".").split(".")
        if any(not label or len(label) > 63 for label in labels):
            return (
                "must be a host name whose dot-separated labels are 1-63 characters long, "
                f"got {value!r}"
            )
        why = exc.__cause__ or exc  # the codec's own reason (a BIDI rule, a long label …)
        return f"must be a host name IDNA can encode ({why}), got {value!r}"
    if len(encoded.rstrip(b".")) > 253:
        return f"must be a host name of at most 253 characters, got {len(encoded)}"
    return None


def _idna_refused(value: str) -> str | None:
    """The first character of ``value`` that IDNA refuses whatever its label (a name it
    cannot encode for another reason, an empty or too long label, gives None)."""
    for c in value:
        if c == ".":
            continue
        try:
            c.encode("idna")
        except UnicodeError:
            return c
    return None


_IDNA_DOTS = str.maketrans("\u3002\uff0e\uff61", "...")
"""The label separators IDNA reads as dots."""

_NAME_BYTE = re.compile(rb"[A-Za-z0-9._-]")
"""A byte of a host name's IDNA form that a lookup takes (``_`` too: hosts files and
container networks use it)."""


_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s]+")


def _check_origin(value: str) -> str | None:
    """A CORS origin as a browser sends it (``https://app.example[:port]``), or ``*``: an
    entry with a path, a trailing ``/`` or no scheme would never match one."""
    if value == "*":
        return None
    if not _ORIGIN.fullmatch(value):
        return (
            "must be an origin as browsers send it (scheme://host[:port], no path) or '*', "
            f"got {value!r}"
        )
    bad_port = f"must have a port number 1-65535 after the host, got {value!r}"
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:  # an unmatched bracket (http://[::1), or a port that is no number
        if "[" in value or "]" in value:
            return f"must have a host name or address a browser could send, got {value!r}"
        return bad_port
    if port == 0:
        return bad_port
    canonical = _origin_as_sent(parts.scheme, parts.hostname or "", port)
    if canonical is None:  # an empty or over-long label, a bad IPv6 address
        return f"must have a host name or address a browser could send, got {value!r}"
    if canonical != value:  # else it never matches one
        return f"must be written as browsers send it: {canonical!r}, got {value!r}"
    return None


def _ascii_host(host: str) -> str:
    """``host`` in the ASCII form browsers send (UTS-46 without transitional mapping, as
    Chrome and Firefox do: ``faß.de`` is ``xn--fa-hia.de``; with the ``idna`` package that
    aiohttp's URL library brings, else the standard library's IDNA 2003, which maps ß to
    ss). ``UnicodeError`` for a host that has none."""
    if host.isascii():
        return host.encode("idna").decode("ascii")  # (its empty-label checks)
    try:
        import idna
    except ImportError:
        return host.encode("idna").decode("ascii")
    # the URL Standard's processing: UTS-46 mapping, then Punycode, without IDNA 2008's
    # stricter rules (a browser sends http://☃.net as http://xn--n3h.net)
    mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
    labels = mapped.split(".")
    if mapped.endswith("."):
        labels = labels[:-1]
    out = []
    for label in labels:
        if not label.isascii():
            label = "xn--" + label.encode("punycode").decode("ascii")
        if not 0 < len(label) <= 63:
            raise UnicodeError(f"label empty or too long: {label!r}")
        out.append(label)
    return ".".join(out) + ("." if mapped.endswith(".") else "")


def _origin_as_sent(scheme: str, host: str, port: int | None) -> str | None:
    """The origin a browser sends for ``scheme://host[:port]`` (RFC 6454: scheme and host
    in lower case, the host in its ASCII form, an IPv6 address compressed, an IPv4
    shorthand in full, no default port); None when the host is no name or address it
    could send."""
    scheme = scheme.lower()
    try:
        host = str(ipaddress.IPv6Address(host)).join("[]") if ":" in host else host
        ascii_host = host if host.startswith("[") else _ascii_host(host)
    except (ValueError, UnicodeError):
        return None
    if _DIGITS_AND_DOTS.fullmatch(ascii_host):  # WHATWG: a host ending in a number is IPv4
        bare = ascii_host.removesuffix(".")  # (one trailing dot is dropped)
        full = ipv4_shorthand(bare)
        if full is None:
            try:
                full = str(ipaddress.IPv4Address(bare))
            except ValueError:  # 1.2.3.999: no origin a browser sends
                return None
        ascii_host = full
    ascii_host = ipv4_shorthand(ascii_host) or ascii_host  # http://127.1 is sent in full
    shown = f"{scheme}://{ascii_host.lower()}"
    if port is not None and _DEFAULT_PORTS.get(scheme) != port:
        shown += f":{port}"
    return shown


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _check_service_type(value: str) -> str | None:
    if value in SERVICE_TYPES:
        return None
    if value == VLLM_SERVICE_TYPE:
        return (
            "a VLLMService table holds VLLMService's keys (model_id, engine …) and is read by "
            "VLLMService; the control plane's type is ControlPlaneVLLMService"
        )
    return f"unknown value {value!r}{suggest(value, SERVICE_TYPES, 'values')}"


def _check_env_name(value: str) -> str | None:
    return None if _ENV_NAME.fullmatch(value) else "must be an environment variable name"


def _unkeyed(exc: ConfigError) -> str:
    """``exc``'s message without its own key (``gpu: unknown GPU …`` → ``unknown GPU …``):
    the problem is reported under the key the user wrote."""
    message = exc.message
    if exc.key and message.startswith(f"{exc.key}: "):
        return message[len(exc.key) + 2 :]
    return message


def _check_gpu(value: str) -> str | None:
    try:
        get_gpu(value)
    except ConfigError as exc:
        return _unkeyed(exc)
    return None


def _check_model(value: str) -> str | None:
    if not value:
        return None
    if problem := name_problem(value):  # served under this name as written
        return problem
    try:
        get_model(value)
    except ConfigError as exc:
        return _unkeyed(exc)
    return None


def default_sim_model(model_name: str) -> str:
    """``model_name`` when the simulator knows it, else ``llama-3-8b``."""
    try:
        return get_model(model_name).name.lower()
    except ConfigError:
        return DEFAULT_SIM_MODEL


_PORT = rule(ge=1, le=65535)
_COUNT = rule(ge=1)
MAX_SIM_INSTANCES = 50_000
"""The most instances a ``[simulation]`` table may ask for (their nominal ports, 8100 + i,
stay below 65536)."""
MAX_PREFIX_INDEX_CAPACITY = 1 << 24
"""The most blocks a prefix index may be set to remember (about 1.3 GB, allocated at
start: a larger figure is a typo more likely than a plan)."""
_POSITIVE = rule(gt=0)
_ID = rule(nonempty=True, check=name_problem)
_ENV = rule(nonempty=True, check=_check_env_name)


def _check_file_name(value: str) -> str | None:
    if has_control_characters(value):
        return "must be a file's path (it holds control characters)"
    return None


_FILE = rule(nonempty=True, check=_check_file_name)
"""A ``*_file`` key: the path of a file holding a secret (relative: to the config file's
directory)."""


ROLE_CONFIGS = ("prefilling_config", "decoding_config")


ENGINE_SCHEDULING_POLICIES = ("fcfs", "priority")
"""vLLM's ``--scheduling-policy`` values (an instance's ``engine_scheduling_policy``)."""


def adapters_problem(model_name: str, adapters: Sequence[str]) -> str | None:
    """What is wrong with an instance's ``lora_adapters`` (None: nothing): an adapter
    named as its model, or one named twice."""
    if model_name in adapters:
        return f"{model_name!r} is the instance's model_name, not one of its adapters"
    seen: set[str] = set()
    for name in adapters:
        if name in seen:
            return f"{name!r} is named twice"
        seen.add(name)
    return None


def role_config_problem(
    kind: ExecutionInstanceType, given: Sequence[str]
) -> tuple[str, str] | None:
    """(key, problem) of a role's config (``ROLE_CONFIGS``, those ``given``) on an
    instance of another role; None when they agree."""
    if "prefilling_config" in given and kind is ExecutionInstanceType.DECODING:
        return "prefilling_config", "is not allowed on a DECODING instance"
    if "decoding_config" in given and kind is ExecutionInstanceType.PREFILLING:
        return "decoding_config", "is not allowed on a PREFILLING instance"
    return None


@dataclass(frozen=True)
class InstanceConfig:
    """One ``[[services.llm_control_plane.instances]]`` entry: an engine instance.

    The ``sim_*`` options describe the simulated engine that stands in for this instance
    when ``engine = "sim"`` or the control plane runs in ``simulated`` mode; an empty
    ``sim_model`` means ``model_name`` when the simulator knows it, else ``llama-3-8b``.
    """

    instance_id: str = req(_ID)
    host: str = req(rule(nonempty=True, check=host_problem))
    port: int = req(_PORT)
    model_name: str = req(_ID)
    tensor_parallel_size: int = opt(1, _COUNT)
    pipeline_parallel_size: int = opt(1, _COUNT)
    data_parallel_size: int = opt(1, _COUNT)
    instance_type: ExecutionInstanceType = ExecutionInstanceType.GENERAL
    prefilling_config: PrefillingConfig | None = None
    decoding_config: DecodingConfig | None = None
    gpu_count: int = opt(1, _COUNT)
    gpu_memory_gb: float = opt(0.0, rule(ge=0))
    max_concurrent_requests: int = opt(100, _COUNT)
    machine_id: str | None = opt(None, _ID)  # "" would place every such instance alike
    rack_id: str | None = opt(None, _ID)
    gpu_bus_id: str | None = opt(None, _ID)
    gpu_device_id: int | None = opt(None, rule(ge=0))
    nvlink_peers: tuple[str, ...] = opt((), _ID)
    lora_adapters: tuple[str, ...] = opt((), _ID)
    engine_scheduling_policy: str = opt(
        "fcfs", rule(choices=ENGINE_SCHEDULING_POLICIES, norm=str.lower)
    )
    numa_node: int | None = opt(None, rule(ge=0))
    network_bandwidth_gbps: float = opt(10.0, _POSITIVE)
    network_latency_ms: float = opt(0.1, rule(ge=0))
    metadata: Mapping[str, Any] = field(default_factory=dict)
    engine: str = opt("vllm", rule(choices=ENGINES, norm=str.lower))
    price_per_gpu_hour: float = opt(2.0, rule(ge=0))
    nvlink_domain: str | None = opt(None, _ID)
    api_key: str | None = opt(None, rule(nonempty=True, secret=True))
    api_key_env: str | None = opt(None, _ENV)
    scheme: str = opt("http", rule(choices=("http", "https"), norm=str.lower))
    sim_gpu: str = opt("h100", rule(nonempty=True, check=_check_gpu))
    sim_model: str = opt("", rule(check=_check_model))
    sim_speed: float = opt(1.0, _POSITIVE)
    sim_seed: int | None = None
    sim_max_loras: int | None = opt(None, rule(ge=1))

    def __post_init__(self) -> None:
        validate(self, FOREIGN_RULES)  # its role configs' fields as a file's
        if (problem := adapters_problem(self.model_name, self.lora_adapters)) is not None:
            raise FieldValueError("lora_adapters", problem)
        if self.engine_scheduling_policy != "fcfs" and self.engine not in ("vllm", "sim"):
            raise FieldValueError(
                "engine_scheduling_policy",
                f"{self.engine_scheduling_policy!r} applies to vllm engines only (vLLM's "
                f"--scheduling-policy; and simulated ones), not engine = {self.engine!r}",
            )
        given = [k for k in ROLE_CONFIGS if getattr(self, k) is not None]
        if (misplaced := role_config_problem(self.instance_type, given)) is not None:
            raise FieldValueError(*misplaced)
        doubled = [key for key in SIM_KEYS if key in self.metadata]
        if doubled:  # to_instance would overwrite them with the instance's own keys
            raise FieldValueError(f"metadata.{doubled[0]}", sim_key_in_metadata(doubled[0]))
        for key in sorted(CHECKED_METADATA & self.metadata.keys()):  # as a file's are
            if (problem := metadata_problem(key, self.metadata[key])) is not None:
                raise FieldValueError(f"metadata.{key}", problem)
        if not self.sim_model:
            object.__setattr__(self, "sim_model", default_sim_model(self.model_name))
        if self.engine == "sim":  # its engine is built from these when the fleet starts
            tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
            problem = placement_problem(self.sim_model, self.sim_gpu, tp=tp, pp=pp)
            if problem is not None:
                raise ValueError(f"its simulated engine cannot start: {problem}")

    def to_instance(self) -> ExecutionInstance:
        """A fresh :class:`ExecutionInstance`; ``sim_*`` options go into its ``metadata``."""
        metadata = dict(self.metadata)
        metadata.update(sim_gpu=self.sim_gpu, sim_model=self.sim_model, sim_speed=self.sim_speed)
        if self.sim_seed is not None:
            metadata["sim_seed"] = self.sim_seed
        if self.sim_max_loras is not None:
            metadata["sim_max_loras"] = self.sim_max_loras
        values = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(ExecutionInstance)
            if f.init and hasattr(self, f.name)
        }
        pre, dec = self.prefilling_config, self.decoding_config
        values.update(
            prefilling_config=dataclasses.replace(pre) if pre is not None else None,
            decoding_config=dataclasses.replace(dec) if dec is not None else None,
            nvlink_peers=list(self.nvlink_peers),
            lora_adapters=list(self.lora_adapters),
            metadata=metadata,
        )
        return ExecutionInstance(**values)


@dataclass(frozen=True)
class ControlPlaneConfig:
    """``[services.llm_control_plane]``: the keywords of ``ControlPlaneManager``, ``pd`` and
    the instances. ``policy_params``/``routing_params`` go to the policy/strategy as given."""

    type: str = opt("ControlPlaneVLLMService", rule(check=_check_service_type))
    scheduling_policy: str = opt("adaptive", rule(choices=POLICY_NAMES, norm=name_key))
    routing_strategy: str = opt("load_balanced", rule(choices=ROUTING_NAMES, norm=name_key))
    enable_auto_scaling: bool = False
    enable_monitoring: bool = True
    enable_pd_separation: bool = True
    mode: str = opt("http", rule(choices=MODES, norm=_mode))
    policy_params: Mapping[str, Any] = field(default_factory=dict)
    routing_params: Mapping[str, Any] = field(default_factory=dict)
    max_queue_size: int = opt(10_000, _COUNT)
    max_retries: int = opt(2, rule(ge=0))
    default_max_tokens: int = opt(128, _COUNT)
    engine_stream: str = opt("sampled", rule(choices=ENGINE_STREAM, norm=str.lower))
    engine_stream_sample: float = opt(0.1, rule(gt=0, le=1))
    engine_stream_sample_max_per_s: float = opt(20.0, rule(ge=0))
    lora_slot_routing: bool = True
    result_retention: int = opt(2_000, _COUNT)
    result_ttl_s: float = opt(600.0, _POSITIVE)
    stats_interval_s: float = opt(1.0, _POSITIVE)
    health_interval_s: float = opt(5.0, _POSITIVE)
    prefix_block_size: int = opt(16, _COUNT)
    prefix_index_capacity: int = opt(32_768, rule(ge=1, le=MAX_PREFIX_INDEX_CAPACITY))
    seed: int | None = None
    # request defaults of the SAGE services (SERVICE_DEFAULT_KEYS)
    default_priority: RequestPriority | None = None
    default_slo_deadline_ms: float | None = opt(None, _POSITIVE)
    default_temperature: float | None = opt(None, rule(ge=0, le=2))
    default_top_p: float | None = opt(None, rule(gt=0, le=1))
    request_timeout_s: float | None = opt(None, _POSITIVE)
    pd: PDSeparationConfig = field(default_factory=PDSeparationConfig)
    instances: tuple[InstanceConfig, ...] = ()

    def __post_init__(self) -> None:
        validate(self, FOREIGN_RULES)  # its pd table's fields as a file's

    def pd_config(self) -> PDSeparationConfig:
        """A fresh copy of the PD settings (``enabled`` follows ``enable_pd_separation``)."""
        return dataclasses.replace(
            self.pd, enabled=self.enable_pd_separation, metadata=dict(self.pd.metadata)
        )

    def manager_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``ControlPlaneManager(**kwargs)``."""
        kwargs = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("type", "pd", "instances", *SERVICE_DEFAULT_KEYS)
        }
        kwargs.update(
            pd_config=self.pd_config(),
            policy_params=dict(self.policy_params),
            routing_params=dict(self.routing_params),
        )
        return kwargs


def _tenant_user_problem(value: str) -> str | None:
    if value in USER_LABELS:
        return f"{value!r} is a user label the metrics keep for their own: name the user otherwise"
    return None


@dataclass(frozen=True)
class TenantConfig:
    """One ``[[gateway.tenants]]`` entry: an API key whose requests are ``user``'s, whatever
    their ``user`` field or ``x-sage-user`` header says (the user the ``fair`` policy
    shares by; their session is still their own: ``x-session-id``, else that field or
    header). The key comes from the configuration
    (``api_key``), from an environment variable (``api_key_env``) or from a file of its
    own (``api_key_file``, read again by ``POST /admin/reload``), one of the three; it is
    an API key as those of ``api_keys`` are, and none of them."""

    user: str = req(rule(nonempty=True, check=_tenant_user_problem))
    api_key: str | None = opt(None, rule(nonempty=True, secret=True))
    api_key_env: str | None = opt(None, _ENV)
    api_key_file: str | None = opt(None, _FILE)

    def __post_init__(self) -> None:
        validate(self)
        if self.api_key is None and self.api_key_env is None and self.api_key_file is None:
            raise FieldValueError("api_key", "is required (or api_key_env, or api_key_file)")


def tenant_key_problem(
    key: str, api_keys: Sequence[str], admin_token: str | None, earlier: Mapping[str, int]
) -> str | None:
    """Why a tenant's ``key`` cannot be one (``earlier``: the keys of the tenants before
    it, to their indexes), or None: a key is one tenant's, not also a plain API key
    (whose requests name their user) nor the admin token."""
    if key in api_keys:
        return "is also one of api_keys: a tenant's key must be its own"
    if key == admin_token:
        return "is the admin token: a tenant's key must be another"
    if key in earlier:
        return f"is also the key of tenants[{earlier[key]}]: a key is one tenant's"
    return None


@dataclass(frozen=True)
class GatewayConfig:
    """``[gateway]``: the OpenAI-compatible HTTP server. ``api_keys`` holds the keys from the
    file and from ``api_keys_env``; empty means no authentication on the OpenAI routes
    (unless ``tenants`` give keys). Without an admin token the admin API answers loopback
    clients only."""

    host: str = opt("127.0.0.1", rule(nonempty=True, check=bind_host_problem))
    port: int = opt(8080, rule(ge=0, le=65535))
    api_keys: tuple[str, ...] = opt((), rule(nonempty=True, secret=True))
    api_keys_env: str | None = opt(None, _ENV)
    api_keys_file: str | None = opt(None, _FILE)
    admin_token: str | None = opt(None, rule(nonempty=True, secret=True))
    admin_token_env: str | None = opt(None, _ENV)
    admin_token_file: str | None = opt(None, _FILE)
    api_keys_read: tuple[str, ...] = field(
        default=(), repr=False, compare=False, metadata={DERIVED: True}
    )
    """Those of ``api_keys`` read from ``api_keys_env`` or ``api_keys_file`` only (not also
    written in the configuration) when it was loaded: not a key of the TOML; a dump leaves
    them out, beside the key they were read by."""
    api_keys_read_by: tuple[str | None, str | None] = field(
        default=(None, None), repr=False, compare=False, metadata={DERIVED: True}
    )
    """The ``(api_keys_env, api_keys_file)`` whose keys the loader put in ``api_keys``: the
    gateway does not read them again (a file rotated in between would have it take the
    old keys and the new). Settings changed since to name others are read."""
    max_body_bytes: int = opt(1 << 20, _COUNT)
    max_prompt_tokens: int = opt(32_768, _COUNT)
    max_tokens_limit: int | None = opt(None, _COUNT)
    request_timeout_s: float = opt(600.0, _POSITIVE)
    read_timeout_s: float = opt(30.0, _POSITIVE)
    shutdown_timeout_s: float = opt(30.0, _POSITIVE)
    workers: int = opt(1, _COUNT)
    lean_server: bool = True
    log_prompts: bool = False
    cors_origins: tuple[str, ...] = opt((), rule(nonempty=True, check=_check_origin))
    tracing: bool = False
    tenants: tuple[TenantConfig, ...] = ()

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class HealthConfig:
    """``[health]``: probes and ejection. ``interval_s``, when set, also sets the control
    plane's ``health_interval_s``. Absent timeouts mean no limit."""

    interval_s: float = opt(5.0, _POSITIVE)
    timeout_s: float = opt(2.0, _POSITIVE)
    failure_threshold: int = opt(3, _COUNT)
    recovery_threshold: int = opt(1, _COUNT)
    eject_on_errors: bool = True
    failure_rate_threshold: float = opt(0.5, rule(gt=0, le=1))
    failure_rate_window: int = opt(20, rule(ge=2, le=MAX_WINDOW))
    move_on_eject: bool = True
    connect_timeout_s: float = opt(5.0, _POSITIVE)
    first_token_timeout_s: float | None = opt(None, _POSITIVE)
    idle_timeout_s: float | None = opt(None, _POSITIVE)
    stall_timeout_s: float = opt(60.0, rule(ge=0))

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class AdmissionConfig:
    """``[admission]``: refusals before queueing. ``max_queue_size``, when set, overrides
    the control plane's."""

    max_queue_size: int | None = opt(None, _COUNT)
    reject_infeasible_slo: bool = False
    max_queue_wait_s: float | None = opt(None, _POSITIVE)

    def __post_init__(self) -> None:
        validate(self)


@dataclass(frozen=True)
class SimulationConfig:
    """``[simulation]``: the simulated fleet used when no instances are configured."""

    instances: int = opt(4, rule(ge=1, le=MAX_SIM_INSTANCES))
    model: str = opt(DEFAULT_SIM_MODEL, rule(nonempty=True, check=_check_model))
    gpu: str = opt("h100", rule(nonempty=True, check=_check_gpu))
    speed: float = opt(1.0, _POSITIVE)
    seed: int = 0
    max_concurrent_requests: int = opt(64, _COUNT)
    tensor_parallel_size: int = opt(1, _COUNT)

    def __post_init__(self) -> None:
        validate(self)
        last = INT64_MAX - (self.instances - 1)  # the instances' seeds are seed + i
        if self.seed > last:
            raise FieldValueError(
                "seed",
                f"must be at most {last} with {self.instances} instances (their seeds, seed + "
                f"0 … {self.instances - 1}, must fit in 64 bits), got {self.seed}",
            )
        tp = self.tensor_parallel_size
        problem = placement_problem(self.model, self.gpu, tp=tp)
        if problem is not None:
            raise ValueError(
                f"the simulated engines cannot start: {problem}; set gpu or tensor_parallel_size"
            )

    def fleet(self) -> tuple[InstanceConfig, ...]:
        """The simulated instances ``sim-0`` … (``engine = "sim"``, seeds ``seed + i``)."""
        return tuple(
            InstanceConfig(
                instance_id=f"sim-{i}",
                host="127.0.0.1",
                port=8100 + i,
                model_name=self.model,
                engine="sim",
                max_concurrent_requests=self.max_concurrent_requests,
                tensor_parallel_size=self.tensor_parallel_size,
                gpu_count=self.tensor_parallel_size,
                sim_gpu=self.gpu,
                sim_speed=self.speed,
                sim_seed=self.seed + i,
            )
            for i in range(self.instances)
        )


@dataclass(frozen=True)
class SageConfig:
    """A whole configuration. ``source`` names where it came from (not compared)."""

    control_plane: ControlPlaneConfig = field(default_factory=ControlPlaneConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    source: str = field(default="<default>", compare=False)
    written_at: Mapping[str, str] = field(default_factory=dict, compare=False)
    """Where some keys are written (``"gateway.host"`` →
    ``"cluster.toml:7: services.llm_control_plane.gateway.host"``; also ``gateway.port``,
    ``instances`` and ``mode``), for the errors found after loading (``serve`` resolving the
    bind address, ``launch`` refusing instances); see :meth:`where`."""

    foreign_services: tuple[str, ...] = field(default=(), compare=False)
    """The file's service tables when none of them is a control plane's, as ``"llm
    (VLLMService)"``: its control plane is then the embedded default, which is not what
    such a file means (``sage-llm serve`` and ``ControlPlaneVLLMService`` refuse it; see
    :meth:`check_has_control_plane`)."""

    def check_has_control_plane(self) -> None:
        """Raise :class:`~sage_llm.errors.ConfigError` when the file this came from holds
        service tables but no control plane's (:attr:`foreign_services`)."""
        if self.foreign_services:
            where = self.written_at.get("services", "")
            raise ConfigError(
                f'no control-plane service table (type = "ControlPlaneVLLMService") among '
                f"{', '.join(self.foreign_services)}: add [services.llm_control_plane], or "
                "give no file for the embedded simulated fleet",
                location=where.rpartition(": ")[0] or self.source,  # its file:line
                key="services",
            )

    def where(self, key: str) -> str:
        """``key`` as written, with its file and line when known
        (``"cluster.toml:7: gateway.host"``), else ``key`` alone."""
        return self.written_at.get(key, key)

    @classmethod
    def default(cls) -> SageConfig:
        """The embedded default: every default, no instances, so the simulated fleet."""
        return cls()

    def fleet(self) -> tuple[InstanceConfig, ...]:
        """The configured instances, or the simulated fleet when none are configured."""
        return self.control_plane.instances or self.simulation.fleet()

    def execution_instances(self) -> list[ExecutionInstance]:
        """:meth:`fleet` as fresh :class:`ExecutionInstance` objects, ready to register."""
        return [inst.to_instance() for inst in self.fleet()]

    def manager_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``ControlPlaneManager(**kwargs)`` from the
        ``[services.llm_control_plane]`` table only: ``[admission]`` and ``[health]`` are
        applied by :func:`~sage_llm.control_plane.builder.build_manager`, which also
        registers the instances (use it to build a manager from a file)."""
        return self.control_plane.manager_kwargs()

    def inert_settings(self) -> list[str]:
        """The seed's PD settings this configuration sets to other than their defaults
        although this version does not act on them (:data:`INERT_PD_FIELDS`), each as
        :meth:`where` shows it: ``config check`` notes them, ``build_manager`` logs them as
        warnings."""
        pd, default = self.control_plane.pd, PDSeparationConfig()
        return [
            self.written_at.get(f"pd.{name}", f"services.llm_control_plane.pd.{name}")
            for name in INERT_PD_FIELDS
            if getattr(pd, name) != getattr(default, name)
        ]

    def to_dict(self, *, secrets: bool = False) -> dict[str, Any]:
        """The configuration as a document-shaped dict, for display: secrets replaced by
        ``"***"`` (which a loader refuses as a secret). With ``secrets=True`` they are
        kept, and the dict loads back (:func:`~sage_llm.config.config_from_dict`) as the
        same configuration. Either way a secret read from an environment variable or a file
        (``admin_token_env``, ``api_key_env``, ``admin_token_file``, ``api_key_file``) is
        left out beside its ``*_env`` or ``*_file`` key, to be read from there again; so are
        the API keys read by ``api_keys_env`` or ``api_keys_file`` (the configuration's own
        are shown, masked unless ``secrets=True``): a file rotated since gives its new keys
        to the configuration loaded back, not the old ones beside them."""
        mask = None if secrets else MASK
        service = to_plain(self.control_plane, mask)
        out = {
            "services": {"llm_control_plane": service},
            **{name: to_plain(getattr(self, name), mask) for name in SECTIONS},
        }
        for table in (
            out["gateway"],
            *service.get("instances", ()),
            *out["gateway"].get("tenants", ()),
        ):
            for secret in ("admin_token", "api_key"):
                if table.get(f"{secret}_env") is not None or table.get(f"{secret}_file"):
                    table.pop(secret, None)
        gw = self.gateway
        read_by = gw.api_keys_env is not None or gw.api_keys_file is not None
        if read_by:  # the configuration's own keys (masked): the others are read again
            read = set(gw.api_keys_read)
            own = [MASK if mask else key for key in gw.api_keys if key not in read]
            if own:
                out["gateway"]["api_keys"] = own
            else:
                out["gateway"].pop("api_keys", None)
        return out


INERT_NOTE = "a seed setting this version accepts but does not act on (see docs/config.md)"
"""What ``config check`` and ``build_manager`` say of each :meth:`SageConfig.inert_settings`
key."""
INERT_PD_FIELDS = (
    "enable_dynamic_scaling",
    "prefilling_min_instances",
    "prefilling_max_instances",
    "decoding_min_instances",
    "decoding_max_instances",
    "kv_cache_storage",
    "kv_cache_eviction_policy",
    "kv_cache_memory_fraction",
    "enable_kv_cache_transfer",
    "kv_cache_transfer_buffer_mb",
    "collect_pd_metrics",
    "pd_metrics_interval_sec",
    "enable_pd_tracing",
)
"""``PDSeparationConfig`` fields of the seed's API that this version accepts (and checks)
but does not act on: the engines hold and move the KV cache themselves (their connector's
settings), PD metrics are always recorded, PD requests are traced as every request is
(the gateway's ``tracing``), and the pools are not scaled."""


FOREIGN_RULES: Mapping[type[Any], Mapping[str, Rule]] = {
    PDSeparationConfig: {
        "prefilling_min_instances": rule(ge=0),
        "prefilling_max_instances": _COUNT,
        "decoding_min_instances": rule(ge=0),
        "decoding_max_instances": _COUNT,
        "routing_policy": rule(choices=PD_DECIDERS, norm=name_key),
        "prefilling_threshold_input_tokens": rule(ge=0),
        "prefilling_threshold_ratio": rule(ge=0),
        "kv_cache_memory_fraction": rule(gt=0, le=1),
        "kv_cache_transfer_buffer_mb": rule(ge=0),
        "max_transfer_latency_ms": rule(ge=0),
        "pd_metrics_interval_sec": _COUNT,
        "connector": rule(choices=PD_CONNECTORS, norm=str.lower),
    },
    PrefillingConfig: {
        "target_batch_size": _COUNT,
        "max_prefill_tokens": _COUNT,
        "chunk_size": _COUNT,
        "kv_connector": _ID,
    },
    DecodingConfig: {
        "target_batch_size": _COUNT,
        "max_num_seqs": _COUNT,
        "kv_cache_memory_fraction": rule(gt=0, le=1),
        "kv_connector": _ID,
    },
}
