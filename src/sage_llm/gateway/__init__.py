"""The OpenAI-compatible HTTP gateway in front of a control plane.

::

    from sage_llm.gateway import create_app, run_gateway, start_gateway

``create_app(manager, gateway_settings)`` builds the aiohttp application (routes only, no
module state); ``run_gateway`` serves it until cancelled; ``start_gateway`` starts it on a
free port for tests and benchmarks. See docs/gateway.md.
"""

from sage_llm.gateway.app import create_app
from sage_llm.gateway.server import run_gateway, start_gateway
from sage_llm.gateway.settings import GatewaySettings

__all__ = [
    "GatewaySettings",
    "create_app",
    "run_gateway",
    "start_gateway",
]
