"""Authentication of OpenAI routes (API keys) and of the admin API (admin token).

* ``/v1/…``: when API keys are configured, ``Authorization: Bearer <key>`` must match one
  of them (each compared in constant time); otherwise 401. A tenant's key
  (``[[gateway.tenants]]``) is one of them, and makes the request its user's.
* ``/admin/…``: when an admin token is configured, ``Authorization: Bearer <token>`` must
  match it (401 without a token, 403 with a wrong one). Without an admin token only
  loopback clients (127.0.0.0/8, ::1) may call it; others get 403.
* ``/health``, ``/ready``, ``/metrics``, ``/openapi.json`` are open.

Keys are never logged.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence

from aiohttp import web

from sage_llm.errors import AuthenticationError, PermissionDeniedError

OPENAI_PREFIX = "/v1/"
ADMIN_PREFIX = "/admin/"


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header value (None when absent)."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def matches_any(token: str, secrets: Sequence[str]) -> bool:
    """Constant-time comparison of ``token`` against every secret (no early exit)."""
    # a header's bytes that are not UTF-8 arrive as surrogates: they match no secret
    given = token.encode("utf-8", "surrogatepass")
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given, secret.encode("utf-8"))
    return found


def tenant_user(token: str | None, tenant_keys: Sequence[tuple[str, str]]) -> str | None:
    """The user whose tenant key ``token`` is (``tenant_keys``: (key, user) pairs), or None;
    every key compared in constant time (no early exit)."""
    if token is None:
        return None
    given = token.encode("utf-8", "surrogatepass")
    found = None
    for key, user in tenant_keys:
        if hmac.compare_digest(given, key.encode("utf-8")):
            found = user
    return found


def is_tenant(user: str, tenant_keys: Sequence[tuple[str, str]]) -> bool:
    """Whether ``user`` is a tenant's (``tenant_keys``: (key, user) pairs)."""
    return any(user == name for _key, name in tenant_keys)


def is_loopback(remote: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback addresses."""
    if not remote:
        return False
    try:
        addr = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback


def check_api_key(token: str | None, keys: Sequence[str]) -> None:
    """Raise :class:`AuthenticationError` unless ``token`` is one of ``keys`` (no keys: open)."""
    if not keys:
        return
    if token is None:
        raise AuthenticationError(
            "missing API key: send 'Authorization: Bearer <key>'", param="authorization"
        )
    if not matches_any(token, keys):
        raise AuthenticationError("invalid API key", param="authorization")


def check_admin(remote: str | None, token: str | None, admin_token: str | None) -> None:
    """Raise unless a client at ``remote`` presenting ``token`` may use the admin API
    (see the module docstring)."""
    if admin_token is None:
        if not is_loopback(remote):
            raise PermissionDeniedError(
                "the admin API answers loopback clients only when no admin token is configured"
            )
        return
    if token is None:
        raise AuthenticationError(
            "missing admin token: send 'Authorization: Bearer <admin token>'",
            param="authorization",
        )
    if not matches_any(token, (admin_token,)):
        raise PermissionDeniedError("invalid admin token", param="authorization")


def authorize(request: web.Request, keys: Sequence[str], admin_token: str | None) -> None:
    """Raise unless ``request`` may go on, by the rules above (``OPTIONS`` always may)."""
    if request.method == "OPTIONS":
        return
    path = request.path
    if path.startswith(OPENAI_PREFIX):
        if keys:
            check_api_key(bearer_token(request.headers.get("Authorization")), keys)
    elif path.startswith(ADMIN_PREFIX) or path == ADMIN_PREFIX.rstrip("/"):
        token = bearer_token(request.headers.get("Authorization"))
        check_admin(request.remote, token, admin_token)
