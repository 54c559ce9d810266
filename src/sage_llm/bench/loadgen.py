"""Open-loop HTTP load generator for any OpenAI-compatible endpoint.

Each request of a :class:`~sage_llm.bench.workloads.Workload` is sent at its arrival offset
as a streaming ``/v1/completions`` call (token-id prompts are sent as token lists, as vLLM
accepts), and the client records when every chunk arrives. The sender tracks how late it
sends compared with the schedule: when that lag grows, the generator itself is the
bottleneck and the figures are suspect, so :class:`LoadReport` says so.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sage_llm.bench.stats import RequestMeasurement, measure
from sage_llm.bench.workloads import Workload, WorkloadRequest
from sage_llm.engines.sse import SSEDecoder

LAG_WARN_S = 0.010
"""Mean send lag above which the load generator is reported as a possible bottleneck."""


@dataclass
class LoadReport:
    """Measurements plus the generator's own health."""

    measurements: list[RequestMeasurement]
    duration_s: float
    mean_send_lag_s: float
    max_send_lag_s: float
    warnings: list[str] = field(default_factory=list)

    @property
    def generator_bottleneck(self) -> bool:
        return self.mean_send_lag_s > LAG_WARN_S


def measurement(
    wr: WorkloadRequest,
    arrival: float,
    token_times: list[float],
    end: float,
    output_tokens: int,
    error: str | None,
) -> RequestMeasurement:
    """What a client observed for ``wr``, as a :class:`RequestMeasurement` (its first
    output is its first chunk)."""
    first = token_times[0] if token_times else None
    return measure(wr, arrival, first, end, output_tokens, error, token_times)


def _body(wr: WorkloadRequest, model: str, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": wr.model or model,
        "prompt": wr.prompt,
        "max_tokens": wr.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    body.update(extra)
    return body


def _headers(wr: WorkloadRequest, api_key: str | None, sage_headers: bool) -> dict[str, str]:
    headers = {"content-type": "application/json", "x-request-id": wr.request_id}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    if sage_headers:
        headers["x-sage-priority"] = wr.priority.name.lower()
        if wr.slo_e2e_s is not None:
            headers["x-sage-slo-ms"] = str(int(wr.slo_e2e_s * 1000))
        if wr.session_id:
            headers["x-session-id"] = wr.session_id
        if wr.user_id:  # (in process the user reaches the control plane too)
            headers["x-sage-user"] = wr.user_id
    return headers


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    wr: WorkloadRequest,
    model: str,
    *,
    api_key: str | None,
    sage_headers: bool,
    extra: dict[str, Any],
    timeout_s: float,
) -> RequestMeasurement:
    arrival = time.perf_counter()
    times: list[float] = []
    output = 0
    error: str | None = None
    decoder = SSEDecoder()
    try:
        async with session.post(
            url,
            data=json.dumps(_body(wr, model, extra)),
            headers=_headers(wr, api_key, sage_headers),
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            if resp.status != 200:
                body = await resp.text()
                error = f"HTTP {resp.status}: {body[:200]}"
            else:
                async for piece in resp.content.iter_any():
                    now = time.perf_counter()
                    for event in decoder.feed(piece):
                        if event.data == "[DONE]":
                            continue
                        obj = json.loads(event.data)
                        if "error" in obj:
                            error = str(obj["error"].get("message", obj["error"]))
                            continue
                        for choice in obj.get("choices") or ():
                            if choice.get("text"):  # (a completions stream)
                                times.append(now)
                                output += 1
                        usage = obj.get("usage")
                        if usage:
                            output = int(usage.get("completion_tokens", output))
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return measurement(wr, arrival, times, time.perf_counter(), output, error)


async def run_http_workload(
    base_url: str,
    workload: Workload,
    *,
    model: str,
    api_key: str | None = None,
    sage_headers: bool = True,
    extra_body: dict[str, Any] | None = None,
    timeout_s: float = 600.0,
    max_connections: int = 0,
) -> LoadReport:
    """Replay ``workload`` against ``base_url`` (open loop) and measure every request.

    ``sage_headers`` adds ``x-sage-priority``/``x-sage-slo-ms``/``x-session-id``/
    ``x-sage-user`` (peer routers ignore them). ``extra_body`` is merged into every request body.
    """
    url = base_url.rstrip("/") + "/v1/completions"
    connector = aiohttp.TCPConnector(limit=max_connections, force_close=False)
    lags: list[float] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        tasks: list[asyncio.Task[RequestMeasurement]] = []
        for wr in workload.requests:
            due = start + wr.arrival_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(max(0.0, time.perf_counter() - due))
            tasks.append(
                asyncio.create_task(
                    _one(
                        session,
                        url,
                        wr,
                        model,
                        api_key=api_key,
                        sage_headers=sage_headers,
                        extra=dict(extra_body or {}),
                        timeout_s=timeout_s,
                    )
                )
            )
        measurements = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    report = LoadReport(
        measurements=measurements,
        duration_s=duration,
        mean_send_lag_s=sum(lags) / len(lags) if lags else 0.0,
        max_send_lag_s=max(lags, default=0.0),
    )
    if report.generator_bottleneck:
        report.warnings.append(
            f"load generator fell behind its schedule by {report.mean_send_lag_s * 1000:.1f} ms "
            "on average: figures may understate what the target can do"
        )
    return report


def errors_by_kind(measurements: Sequence[RequestMeasurement]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in measurements:
        if m.error:
            key = m.error.split(":", 1)[0]
            out[key] = out.get(key, 0) + 1
    return out
