"""API-key and admin-token rules, as pure functions."""

from __future__ import annotations

import hmac

import pytest
from aiohttp.test_utils import make_mocked_request

from sage_llm.errors import AuthenticationError, PermissionDeniedError
from sage_llm.gateway.auth import (
    authorize,
    bearer_token,
    check_admin,
    check_api_key,
    is_loopback,
    matches_any,
    tenant_user,
)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer ", None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_matches_any_compares_every_secret() -> None:
    assert matches_any("b", ["a", "b", "c"])
    assert not matches_any("d", ["a", "b", "c"])
    assert not matches_any("a", [])
    assert matches_any("ключ", ["ключ"])
    # header bytes that are not UTF-8 reach it as surrogates: no match, not an error
    assert not matches_any("\udcff", ["a"]) and not matches_any("\ud800", ["a"])


@pytest.mark.parametrize(
    ("remote", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False),
        ("192.168.1.20", False),
        ("::ffff:10.0.0.1", False),
        ("2001:db8::1", False),
        (None, False),
        ("", False),
        ("not-an-address", False),
    ],
)
def test_is_loopback(remote: str | None, loopback: bool) -> None:
    assert is_loopback(remote) is loopback


def test_api_keys() -> None:
    check_api_key(None, [])  # no keys configured: open
    check_api_key("k2", ["k1", "k2"])
    with pytest.raises(AuthenticationError) as missing:
        check_api_key(None, ["k1"])
    assert missing.value.http_status == 401
    with pytest.raises(AuthenticationError, match="invalid API key"):
        check_api_key("k3", ["k1", "k2"])


def test_admin_without_a_token_answers_loopback_clients_only() -> None:
    check_admin("127.0.0.1", None, None)
    check_admin("::1", "anything", None)
    with pytest.raises(PermissionDeniedError) as denied:
        check_admin("10.1.2.3", None, None)
    assert denied.value.http_status == 403
    with pytest.raises(PermissionDeniedError):
        check_admin(None, None, None)


def test_admin_with_a_token_requires_it_from_everyone() -> None:
    check_admin("10.1.2.3", "s3cret", "s3cret")
    with pytest.raises(AuthenticationError):
        check_admin("127.0.0.1", None, "s3cret")
    with pytest.raises(PermissionDeniedError):
        check_admin("127.0.0.1", "wrong", "s3cret")
    with pytest.raises(PermissionDeniedError):
        check_admin("10.1.2.3", "wrong", "s3cret")


@pytest.mark.parametrize("path", ["/v1/completions", "/admin/instances"])
def test_options_needs_no_credentials(path: str) -> None:
    """A CORS preflight carries no credentials: ``OPTIONS`` always goes on (the CORS layer
    or the route answers it); any other method on the same path is checked."""
    authorize(make_mocked_request("OPTIONS", path), ["k1"], "s3cret")
    with pytest.raises(AuthenticationError):
        authorize(make_mocked_request("POST", path), ["k1"], "s3cret")


def compared_secrets(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The secrets ``hmac.compare_digest`` is given from now on, in order."""
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    return compared


def test_matches_any_has_no_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: every secret is compared, also after the first one matched."""
    compared = compared_secrets(monkeypatch)
    assert matches_any("a", ["a", "b", "c"])
    assert compared == [b"a", b"b", b"c"]


def test_the_admin_prefix_without_its_slash_is_guarded_too() -> None:
    with pytest.raises(AuthenticationError):
        authorize(make_mocked_request("GET", "/admin"), [], "s3cret")


def test_a_tenant_key_names_its_user_every_key_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    pairs = [("ka", "team-a"), ("kb", "team-b"), ("kc", "team-a")]
    assert tenant_user("kb", pairs) == "team-b"
    assert tenant_user("kc", pairs) == "team-a"
    assert tenant_user("kd", pairs) is None
    assert tenant_user(None, pairs) is None
    assert tenant_user("\udcff", pairs) is None  # not UTF-8: no user, not an error
    compared = compared_secrets(monkeypatch)
    assert tenant_user("ka", pairs) == "team-a"
    assert compared == [b"ka", b"kb", b"kc"]  # no early exit
