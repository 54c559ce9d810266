"""Security checks end to end through a real gateway over simulated engines: API keys,
the admin token, body and token limits, the loopback default bind, constant-time secret
comparison, and no secrets or prompts in the logs."""

from __future__ import annotations

import logging

import aiohttp
import pytest

from sage_llm.config import GatewayConfig
from sage_llm.gateway.auth import matches_any
from tests.gateway.harness import completion_body, serve

SECRET_KEY = "sk-very-secret-user-key"
ADMIN = "admin-very-secret-token"
PROMPT = "my private medical history is zebra-quartz-4471"


def test_defaults_bind_loopback_only() -> None:
    assert GatewayConfig().host == "127.0.0.1"


def test_secret_comparison_checks_every_secret() -> None:
    assert matches_any(SECRET_KEY, ("other", SECRET_KEY))
    assert not matches_any(SECRET_KEY[:-1], (SECRET_KEY,))
    assert not matches_any("", (SECRET_KEY,))


async def test_keys_admin_token_and_limits_end_to_end(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = GatewayConfig(
        api_keys=(SECRET_KEY,), admin_token=ADMIN, max_body_bytes=4096,
        max_prompt_tokens=64, max_tokens_limit=32,
    )  # fmt: skip
    user = {"Authorization": f"Bearer {SECRET_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with serve(1, settings=settings) as gw, aiohttp.ClientSession() as http:
        url = gw.url("/v1/completions")
        async with http.post(url, json=completion_body(prompt=PROMPT)) as r:
            assert r.status == 401  # no key
        async with http.post(url, json=completion_body(prompt=PROMPT), headers=user) as r:
            assert r.status == 200
            await r.read()
        async with http.post(url, json=completion_body(prompt="x" * 8000), headers=user) as r:
            assert r.status == 413  # body limit
        async with http.post(url, json=completion_body(prompt="word " * 200), headers=user) as r:
            assert r.status == 400  # prompt tokens limit
        async with http.post(url, json=completion_body(max_tokens=500), headers=user) as r:
            assert r.status == 400  # max_tokens limit
        async with http.get(gw.url("/admin/status"), headers=user) as r:
            assert r.status == 403  # an API key is not the admin token
        async with http.get(gw.url("/admin/status"), headers=admin) as r:
            assert r.status == 200
        async with http.get(gw.url("/v1/models"), headers=admin) as r:
            assert r.status == 401  # and the admin token is not an API key
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert logged, "the gateway logs requests"
    for secret in (SECRET_KEY, ADMIN, "zebra-quartz-4471"):
        assert secret not in logged
