"""Resolving gateway settings: secrets from the environment, limits checked."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sage_llm.config import GatewayConfig, TenantConfig
from sage_llm.errors import ConfigError
from sage_llm.gateway.settings import ResolvedGateway, default_settings, tracing_enabled


@dataclass(frozen=True)
class _Tracing:
    enabled: bool = True


@dataclass(frozen=True)
class _ConfigLike:
    """Shaped like sage_llm.config.GatewayConfig, with lists and a tracing table."""

    host: str = "0.0.0.0"
    port: int = 9000
    api_keys: list[str] = field(default_factory=lambda: ["a", "", "b", "a"])
    api_keys_env: str | None = "KEYS"
    admin_token: str | None = None
    admin_token_env: str | None = "ADMIN"
    max_body_bytes: int = 1024
    max_prompt_tokens: int | None = 4096
    max_tokens_limit: int | None = 2048
    request_timeout_s: float | None = 30.0
    workers: int = 2
    log_prompts: bool = True
    cors_origins: list[str] = field(default_factory=lambda: ["https://x.example"])
    tracing: _Tracing = field(default_factory=_Tracing)


_SECRETS = {"KEYS": "k", "ADMIN": "t"}
"""The variables ``_ConfigLike`` names, set."""


def test_defaults_are_those_of_the_gateway_config() -> None:
    assert default_settings() == GatewayConfig()
    resolved = ResolvedGateway.from_settings(GatewayConfig(), {})
    assert resolved.api_keys == ()
    assert resolved.admin_token is None
    assert resolved.host == "127.0.0.1"
    assert resolved.request_timeout_s == GatewayConfig().request_timeout_s
    assert resolved.max_body_bytes == GatewayConfig().max_body_bytes
    assert resolved.tracing is False


def test_config_like_objects_and_environment() -> None:
    env = {"KEYS": "c, b ,,d", "ADMIN": " tok "}
    resolved = ResolvedGateway.from_settings(_ConfigLike(), env)
    assert resolved.api_keys == ("a", "b", "c", "d")
    assert resolved.admin_token == "tok"
    assert resolved.max_prompt_tokens == 4096
    assert resolved.max_tokens_limit == 2048
    assert resolved.request_timeout_s == 30.0
    assert resolved.cors_origins == ("https://x.example",)
    assert resolved.tracing is True
    assert resolved.log_prompts is True
    assert (resolved.host, resolved.port) == ("0.0.0.0", 9000)


def test_configured_admin_token_wins_over_the_environment() -> None:
    settings = _ConfigLike(admin_token="direct", admin_token_env="ADMIN")
    env = {"ADMIN": "env", "KEYS": "k"}
    assert ResolvedGateway.from_settings(settings, env).admin_token == "direct"


@pytest.mark.parametrize(
    ("env", "key", "message"),
    [
        ({"ADMIN": "t"}, "gateway.api_keys_env", "KEYS is not set"),
        ({"KEYS": "  ", "ADMIN": "t"}, "gateway.api_keys_env", "KEYS is empty"),
        ({"KEYS": " , ,", "ADMIN": "t"}, "gateway.api_keys_env", "KEYS holds no API key"),
        ({"KEYS": "k"}, "gateway.admin_token_env", "ADMIN is not set"),
        ({"KEYS": "k", "ADMIN": " "}, "gateway.admin_token_env", "ADMIN is empty"),
        ({"KEYS": "k,t", "ADMIN": "t"}, "gateway.admin_token_env", "also one of the API keys"),
        ({"KEYS": "k", "ADMIN": "a\x01b"}, "gateway.admin_token_env", "control characters"),
        ({"KEYS": "k", "ADMIN": " *** "}, "gateway.admin_token_env", "the mask a dumped"),
        ({"KEYS": "good, ***", "ADMIN": "t"}, "gateway.api_keys_env", '"***" as a key'),
    ],
)
def test_a_named_variable_unset_or_without_a_secret_is_an_error(
    env: dict[str, str], key: str, message: str
) -> None:
    # authentication is never switched off by a missing variable
    with pytest.raises(ConfigError) as info:
        ResolvedGateway.from_settings(_ConfigLike(), env)
    assert info.value.key == key
    assert message in str(info.value)


@pytest.mark.parametrize("timeout", [None, 0, 0.0])
def test_zero_or_missing_timeout_means_no_limit(timeout: float | None) -> None:
    settings = _ConfigLike(request_timeout_s=timeout)
    assert ResolvedGateway.from_settings(settings, _SECRETS).request_timeout_s is None


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"request_timeout_s": -1.0}, "gateway.request_timeout_s"),
        ({"max_body_bytes": 0}, "gateway.max_body_bytes"),
        ({"max_prompt_tokens": 0}, "gateway.max_prompt_tokens"),
        ({"max_tokens_limit": -5}, "gateway.max_tokens_limit"),
    ],
)
def test_bad_limits_raise_config_errors(changes: dict[str, float], key: str) -> None:
    settings = _ConfigLike(**changes)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as err:
        ResolvedGateway.from_settings(settings, _SECRETS)
    assert err.value.key == key


def test_tracing_flag_shapes() -> None:
    assert tracing_enabled(True) is True
    assert tracing_enabled(False) is False
    assert tracing_enabled(_Tracing(enabled=True)) is True
    assert tracing_enabled(_Tracing(enabled=False)) is False
    assert tracing_enabled(None) is False


def test_a_nan_timeout_is_a_config_error_naming_the_field() -> None:
    settings = _ConfigLike(request_timeout_s=float("nan"))
    with pytest.raises(ConfigError) as err:
        ResolvedGateway.from_settings(settings, _SECRETS)
    assert err.value.key == "gateway.request_timeout_s"


def test_settings_without_a_read_timeout_get_the_documented_30_s() -> None:
    assert not hasattr(_ConfigLike(), "read_timeout_s")
    assert ResolvedGateway.from_settings(_ConfigLike(), _SECRETS).read_timeout_s == 30.0


def test_tenants_keys_are_api_keys_naming_their_users() -> None:
    tenants = (
        TenantConfig("team-a", api_key="ka"),
        TenantConfig("team-b", api_key_env="KB"),
        TenantConfig("team-a", api_key="ka2"),
    )
    settings = GatewayConfig(api_keys=("plain",), tenants=tenants)
    resolved = ResolvedGateway.from_settings(settings, {"KB": " kb "})
    assert resolved.api_keys == ("plain", "ka", "kb", "ka2")
    assert resolved.tenant_keys == (("ka", "team-a"), ("kb", "team-b"), ("ka2", "team-a"))
    # tenants alone switch authentication on
    alone = ResolvedGateway.from_settings(GatewayConfig(tenants=tenants[:1]), {})
    assert alone.api_keys == ("ka",)


@pytest.mark.parametrize(
    ("tenants", "env", "key", "message"),
    [
        ((TenantConfig("u", api_key_env="KU"),), {}, "tenants[0].api_key_env", "KU is not set"),
        (
            (TenantConfig("u", api_key_env="KU"),),
            {"KU": "***"},
            "tenants[0].api_key_env",
            "the mask a dumped",
        ),
        ((TenantConfig("u", api_key="plain"),), {}, "tenants[0].api_key", "one of api_keys"),
        ((TenantConfig("u", api_key="adm"),), {}, "tenants[0].api_key", "is the admin token"),
        (
            (TenantConfig("u", api_key="k"), TenantConfig("v", api_key_env="KV")),
            {"KV": "k"},
            "tenants[1].api_key_env",
            "is also the key of tenants[0]",
        ),
    ],
)
def test_a_tenant_key_that_is_unset_or_not_its_own_is_an_error(
    tenants: tuple[TenantConfig, ...], env: dict[str, str], key: str, message: str
) -> None:
    settings = GatewayConfig(api_keys=("plain",), admin_token="adm", tenants=tenants)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        ResolvedGateway.from_settings(settings, env)
    assert info.value.key == f"gateway.{key}"


def test_settings_built_in_code_read_their_secret_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the loader, a ``*_file`` key is read when the settings are resolved (a
    relative path from the working directory), and a file that gives no secret is an
    error naming the key: authentication is never switched off by a missing file."""
    monkeypatch.chdir(tmp_path)
    Path("keys").write_text("k1,k2\nk3\n")
    Path("admin").write_text("adm\n")
    Path("team").write_text("kt")
    settings = GatewayConfig(
        api_keys=("k1",),
        api_keys_file="keys",
        admin_token_file=str(tmp_path / "admin"),
        tenants=(TenantConfig("team", api_key_file="team"),),
    )
    resolved = ResolvedGateway.from_settings(settings, {})
    assert resolved.api_keys == ("k1", "k2", "k3", "kt")
    assert resolved.admin_token == "adm"
    assert resolved.tenant_keys == (("kt", "team"),)
    for changes, key in (
        ({"api_keys_file": "missing"}, "gateway.api_keys_file"),
        ({"admin_token_file": "missing"}, "gateway.admin_token_file"),
        (
            {"tenants": (TenantConfig("u", api_key_file="missing"),)},
            "gateway.tenants[0].api_key_file",
        ),
        ({"admin_token_file": "keys"}, "gateway.admin_token_file"),  # more than one line
    ):
        with pytest.raises(ConfigError) as info:
            ResolvedGateway.from_settings(GatewayConfig(**changes), {})
        assert info.value.key == key
    Path("one").write_text("k1")
    with pytest.raises(ConfigError, match="is also one of the API keys") as info:
        ResolvedGateway.from_settings(GatewayConfig(api_keys=("k1",), admin_token_file="one"), {})
    assert info.value.key == "gateway.admin_token_file"


def test_a_secret_from_a_variable_and_a_file_at_once_is_an_error(tmp_path: Path) -> None:
    """As the loader refuses them: which one would be meant is not known."""
    (tmp_path / "t").write_text("tok")
    both = GatewayConfig(admin_token_env="T", admin_token_file=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="not both") as info:
        ResolvedGateway.from_settings(both, {"T": "tok2"})
    assert info.value.key == "gateway.admin_token_file"
    tenant = TenantConfig("u", api_key_env="K", api_key_file=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match="not both") as info:
        ResolvedGateway.from_settings(GatewayConfig(tenants=(tenant,)), {"K": "k"})
    assert info.value.key == "gateway.tenants[0].api_key_file"
