"""The gateway settings the HTTP app reads.

:class:`GatewaySettings` is the read-only shape the gateway needs from
``sage_llm.config.GatewayConfig`` (the ``[gateway]`` table of a cluster file); any object
with these attributes works (``api_keys_file``, ``admin_token_file`` and ``tenants`` are
read where present), and ``GatewayConfig()`` supplies the defaults.
:class:`ResolvedGateway` is what the app actually runs with: secrets taken from the
environment and from secret files (when the config loader has not done so already),
limits checked. :class:`LiveSettings` holds them for a running gateway, which
``POST /admin/reload`` replaces.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Protocol, TypeVar

from sage_llm.config_fields import (
    SECRET_MASK,
    env_mask_problem,
    has_control_characters,
    only_one,
    read_keys_file,
    read_secret_file,
    secret_file_path,
)
from sage_llm.errors import ConfigError

T = TypeVar("T")


class GatewaySettings(Protocol):
    """What the gateway reads from its configuration (``GatewayConfig`` satisfies it)."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def api_keys(self) -> Sequence[str]: ...

    @property
    def api_keys_env(self) -> str | None: ...

    @property
    def admin_token(self) -> str | None: ...

    @property
    def admin_token_env(self) -> str | None: ...

    @property
    def max_body_bytes(self) -> int: ...

    @property
    def max_prompt_tokens(self) -> int | None: ...

    @property
    def max_tokens_limit(self) -> int | None: ...

    @property
    def request_timeout_s(self) -> float | None: ...

    @property
    def workers(self) -> int: ...

    @property
    def log_prompts(self) -> bool: ...

    @property
    def cors_origins(self) -> Sequence[str]: ...

    @property
    def tracing(self) -> object:
        """``True``/``False``, or an object with an ``enabled`` attribute."""
        ...


def default_settings() -> GatewaySettings:
    """The defaults of the ``[gateway]`` table (``sage_llm.config.GatewayConfig()``)."""
    from sage_llm.config_schema import GatewayConfig

    return GatewayConfig()


def _env_keys(name: str | None, environ: Mapping[str, str]) -> list[str]:
    """The comma-separated API keys in variable ``name``; a variable that is unset or holds
    no key is an error (authentication is never switched off by a missing variable)."""
    if not name:
        return []
    keys = [k.strip() for k in _env_value(name, "api_keys_env", environ).split(",")]
    keys = [k for k in keys if k]
    if SECRET_MASK in keys:
        raise ConfigError(env_mask_problem(name, " as a key"), key="gateway.api_keys_env")
    if not keys:
        raise ConfigError(
            f"environment variable {name} holds no API key (only commas and spaces)",
            key="gateway.api_keys_env",
        )
    return keys


def _from_file(value: str, key: str, read: Callable[[Path], T]) -> T:
    """``read`` of the file ``value`` names (relative: to the working directory, where the
    config loader has not made it whole), as the loader reads it; a file that gives no
    secret raises :class:`ConfigError` at ``gateway.<key>``."""
    try:
        return read(secret_file_path(value, Path()))
    except ValueError as exc:
        raise ConfigError(str(exc), key=f"gateway.{key}") from None


def _env_value(name: str, key: str, environ: Mapping[str, str]) -> str:
    value = environ.get(name)
    if value is None:
        raise ConfigError(f"environment variable {name} is not set", key=f"gateway.{key}")
    if not value.strip():
        raise ConfigError(f"environment variable {name} is empty", key=f"gateway.{key}")
    if has_control_characters(value.strip()):  # as the config loader checks it
        raise ConfigError(
            f"environment variable {name} holds control characters", key=f"gateway.{key}"
        )
    if value.strip() == SECRET_MASK:
        raise ConfigError(env_mask_problem(name), key=f"gateway.{key}")
    return value.strip()


class TenantSettings(Protocol):
    """A ``[[gateway.tenants]]`` entry (``TenantConfig`` satisfies it)."""

    @property
    def user(self) -> str: ...

    @property
    def api_key(self) -> str | None: ...

    @property
    def api_key_env(self) -> str | None: ...


def _tenant_keys(
    tenants: Sequence[TenantSettings],
    keys: Sequence[str],
    admin: str | None,
    environ: Mapping[str, str],
) -> tuple[tuple[str, str], ...]:
    """(key, user) of each tenant, its key read from ``api_key_env`` or ``api_key_file``
    when the config loader has not done so (a key given, as the loader leaves it, is the
    one used); a key that is also a plain API key, the admin token or another tenant's
    raises :class:`ConfigError`."""
    from sage_llm.config_schema import tenant_key_problem

    out: list[tuple[str, str]] = []
    earlier: dict[str, int] = {}
    for index, tenant in enumerate(tenants):
        where = f"tenants[{index}].api_key"
        key = tenant.api_key
        key_file = getattr(tenant, "api_key_file", None)
        if key is None and tenant.api_key_env is not None and key_file is not None:
            raise ConfigError(
                only_one(("api_key_env", "api_key_file")), key=f"gateway.{where}_file"
            )
        if tenant.api_key_env is not None:
            where += "_env"
            key = key or _env_value(tenant.api_key_env, where, environ)
        elif key_file is not None:
            where += "_file"
            key = key or _from_file(key_file, where, read_secret_file)
        if key is None:  # (TenantConfig requires one of the three)
            raise ConfigError(
                "is required (or api_key_env, or api_key_file)", key=f"gateway.{where}"
            )
        if (problem := tenant_key_problem(key, keys, admin, earlier)) is not None:
            raise ConfigError(problem, key=f"gateway.{where}")
        earlier.setdefault(key, index)
        out.append((key, tenant.user))
    return tuple(out)


def _positive_or_none(key: str, value: float | None) -> float | None:
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"must be a number, got {value!r}", key=f"gateway.{key}")
    if value < 0:
        raise ConfigError(f"must be >= 0, got {value!r}", key=f"gateway.{key}")
    return float(value)


def tracing_enabled(value: object) -> bool:
    """``tracing`` may be a bool or a table with ``enabled``."""
    if isinstance(value, bool):
        return value
    return bool(getattr(value, "enabled", False))


@dataclass(frozen=True)
class ResolvedGateway:
    """The settings the running app uses (secrets resolved, limits validated).

    ``None`` limits mean "no limit". Build with :meth:`from_settings`.
    """

    api_keys: tuple[str, ...] = ()
    """Every key the OpenAI routes take: ``api_keys`` and the tenants' keys."""
    tenant_keys: tuple[tuple[str, str], ...] = ()
    """(key, user) of each tenant: a request with that key is that user's."""
    admin_token: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    max_prompt_tokens: int | None = None
    max_tokens_limit: int | None = None
    request_timeout_s: float | None = None
    read_timeout_s: float | None = 30.0
    """The time a request's head and body may take to arrive, from its first byte
    (None: no limit); a request not read by then gets a 408 and its connection closes."""
    log_prompts: bool = False
    cors_origins: tuple[str, ...] = ()
    tracing: bool = False
    lean_server: bool = True
    """Serve the two hot routes on :mod:`sage_llm.gateway.lean` (off: aiohttp serves all)."""
    host: str = "127.0.0.1"
    port: int = 8080

    @classmethod
    def from_settings(
        cls, settings: GatewaySettings, environ: Mapping[str, str] | None = None
    ) -> ResolvedGateway:
        """Resolve ``settings``; ``*_env`` names are looked up in ``environ`` (default:
        ``os.environ``), ``*_file`` paths read (a relative one from the working
        directory). API keys from the variable are comma-separated, from the file one a
        line or comma-separated. A named variable or file that gives no secret raises
        :class:`ConfigError`. What the config loader read is not read again: the API keys
        it read by ``api_keys_read_by``'s variable and file, and a secret it put in
        ``admin_token`` or a tenant's ``api_key`` (given there, a secret wins over its
        ``*_env`` and ``*_file``; the two of those at once are an error)."""
        env = os.environ if environ is None else environ
        keys = [k for k in settings.api_keys if k]
        keys_file: str | None = getattr(settings, "api_keys_file", None)
        read_env, read_file = getattr(settings, "api_keys_read_by", (None, None))
        if settings.api_keys_env != read_env:  # (not put in api_keys by the loader)
            keys += _env_keys(settings.api_keys_env, env)
        if keys_file and keys_file != read_file:
            keys += _from_file(keys_file, "api_keys_file", read_keys_file)
        admin = settings.admin_token or None
        token_file: str | None = getattr(settings, "admin_token_file", None)
        if admin is None and settings.admin_token_env and token_file:
            raise ConfigError(
                only_one(("admin_token_env", "admin_token_file")), key="gateway.admin_token_file"
            )
        if admin is None and settings.admin_token_env:
            admin = _env_value(settings.admin_token_env, "admin_token_env", env)
        elif admin is None and token_file:
            admin = _from_file(token_file, "admin_token_file", read_secret_file)
        if admin is not None and admin in keys:  # a user's key would open the admin API
            by = (
                "admin_token"
                if settings.admin_token
                else "admin_token_env"
                if settings.admin_token_env
                else "admin_token_file"
            )
            raise ConfigError(
                "is also one of the API keys: the admin token must be another",
                key=f"gateway.{by}",
            )
        tenant_keys = _tenant_keys(getattr(settings, "tenants", ()), keys, admin, env)
        if settings.max_body_bytes < 1:
            raise ConfigError("must be >= 1", key="gateway.max_body_bytes")
        prompt_limit = settings.max_prompt_tokens
        if prompt_limit is not None and prompt_limit < 1:
            raise ConfigError("must be >= 1", key="gateway.max_prompt_tokens")
        tokens_limit = settings.max_tokens_limit
        if tokens_limit is not None and tokens_limit < 1:
            raise ConfigError("must be >= 1", key="gateway.max_tokens_limit")
        return cls(
            api_keys=tuple(dict.fromkeys([*keys, *(key for key, _ in tenant_keys)])),
            tenant_keys=tenant_keys,
            admin_token=admin,
            max_body_bytes=int(settings.max_body_bytes),
            max_prompt_tokens=prompt_limit,
            max_tokens_limit=tokens_limit,
            request_timeout_s=_positive_or_none("request_timeout_s", settings.request_timeout_s),
            read_timeout_s=_positive_or_none(
                "read_timeout_s", getattr(settings, "read_timeout_s", 30.0)
            ),
            log_prompts=bool(settings.log_prompts),
            cors_origins=tuple(settings.cors_origins),
            tracing=tracing_enabled(settings.tracing),
            lean_server=bool(getattr(settings, "lean_server", True)),
            host=settings.host,
            port=int(settings.port),
        )


RELOADABLE = (
    "api_keys",
    "tenant_keys",
    "admin_token",
    "max_prompt_tokens",
    "max_tokens_limit",
    "request_timeout_s",
    "log_prompts",
)
"""The :class:`ResolvedGateway` fields a reload applies to a running gateway: each is read
per request. The others are read once, when the gateway starts listening."""

_READ_AT_START = ("shutdown_timeout_s",)
"""``[gateway]`` keys outside :class:`ResolvedGateway`, read by ``run_gateway`` when it
starts: a reload reports them changed, as it does the other fields it cannot apply
(``workers`` is not among them: a gateway serves from one process whatever it says)."""


@dataclass(frozen=True)
class ReloadOutcome:
    """What a reload changed: ``[gateway]`` keys, by their names in the file (``api_keys``
    is the plain keys, not the tenants'; no secret's value is ever shown)."""

    applied: tuple[str, ...]
    """Keys whose new values the running gateway now uses."""
    restart_required: tuple[str, ...]
    """Keys that changed in the file but take effect only when the gateway starts."""
    tenants_added: tuple[str, ...] = ()
    """Users whose tenant is new (a tenant whose key changed is in neither list)."""
    tenants_removed: tuple[str, ...] = ()
    opened: bool = False
    """Whether the reload took the last API key away: the OpenAI routes are open now."""


def _plain_keys(settings: ResolvedGateway) -> frozenset[str]:
    tenants = {key for key, _ in settings.tenant_keys}
    return frozenset(key for key in settings.api_keys if key not in tenants)


def _read_at_start(settings: GatewaySettings | None) -> dict[str, object]:
    if settings is None:
        return {}
    return {name: getattr(settings, name, None) for name in _READ_AT_START}


class LiveSettings:
    """The resolved settings a running gateway's routes read: each request reads
    :attr:`current` once and keeps that snapshot (its authentication and its tenant come
    from the same keys); :meth:`reload` replaces it as a whole. ``started_from``: the
    ``[gateway]`` table the gateway started with, for the keys a reload cannot apply that
    are not in the resolved settings."""

    __slots__ = ("_at_start", "current")

    def __init__(
        self, settings: ResolvedGateway, started_from: GatewaySettings | None = None
    ) -> None:
        self.current = settings
        self._at_start = _read_at_start(started_from)

    def reload(self, new: ResolvedGateway, table: GatewaySettings | None = None) -> ReloadOutcome:
        """Apply ``new``'s :data:`RELOADABLE` fields (resolved from ``table``); report those
        that changed and the other keys that differ (those keep their values until a
        restart). Keys and tenants are compared as sets: an order changes nothing."""
        old = self.current
        applied: list[str] = []
        if _plain_keys(new) != _plain_keys(old):
            applied.append("api_keys")
        if set(new.tenant_keys) != set(old.tenant_keys):
            applied.append("tenants")
        for name in RELOADABLE:
            if name not in ("api_keys", "tenant_keys") and getattr(new, name) != getattr(old, name):
                applied.append(name)
        restart = [
            f.name
            for f in fields(ResolvedGateway)
            if f.name not in RELOADABLE and getattr(new, f.name) != getattr(old, f.name)
        ]
        if table is not None and self._at_start:
            now = _read_at_start(table)
            restart += [name for name in _READ_AT_START if now[name] != self._at_start[name]]
        old_users = {user for _, user in old.tenant_keys}
        new_users = {user for _, user in new.tenant_keys}
        self.current = replace(old, **{name: getattr(new, name) for name in RELOADABLE})
        return ReloadOutcome(
            applied=tuple(applied),
            restart_required=tuple(restart),
            tenants_added=tuple(sorted(new_users - old_users)),
            tenants_removed=tuple(sorted(old_users - new_users)),
            opened=bool(old.api_keys) and not new.api_keys,
        )


def live_settings(settings: ResolvedGateway | LiveSettings) -> LiveSettings:
    """``settings`` as live settings (resolved ones: live settings never reloaded)."""
    return settings if isinstance(settings, LiveSettings) else LiveSettings(settings)
