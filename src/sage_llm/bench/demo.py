"""``sage-llm demo``: the gateway over the embedded simulated fleet, then presets side by side.

Part 1 starts ``sage-llm serve``'s embedded default (the OpenAI-compatible gateway over four
simulated engines) on a loopback port and drives a short streaming workload through it over
HTTP, as any OpenAI client would: always :data:`GATEWAY_REQUESTS` requests at
:data:`GATEWAY_RATE` per second (``--sessions`` and ``--rate`` size part 2 only; ``--seed``
seeds both parts).

Part 2: a multi-turn chat workload (shared system prompt, growing per-session prefixes,
10% CRITICAL/HIGH traffic, per-priority deadlines) runs through four simulated L40S engines
serving Llama-3-8B, 16 concurrent requests each, once per scheduling/routing preset, on
virtual time. The report compares goodput at a
named SLO, latency percentiles, prefix-cache hit rate and SLO attainment by priority.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from sage_llm.bench.inprocess import Preset, RunResult, run_preset
from sage_llm.bench.loadgen import LoadReport, run_http_workload
from sage_llm.bench.report import fitted_table, report_console, urgent_and_rest
from sage_llm.bench.stats import SLO, BenchSummary, summarize
from sage_llm.bench.workloads import (
    LogNormal,
    Uniform,
    Workload,
    multi_turn,
    synthetic,
    with_priorities,
)
from sage_llm.errors import ConfigError
from sage_llm.types import ExecutionInstance, RequestPriority

DEMO_SLO = SLO(ttft_s=1.0, tpot_s=0.05, name="TTFT<=1s,TPOT<=50ms")

GATEWAY_REQUESTS = 120
"""Requests part 1 sends through the gateway (fixed: the options size part 2)."""
GATEWAY_RATE = 24.0
"""Their arrival rate, requests/s."""

DEMO_PRESETS: tuple[Preset, ...] = (
    Preset("fifo + round_robin", "fifo", "round_robin"),
    Preset("fifo + load_balanced", "fifo", "load_balanced"),
    Preset("priority + load_balanced", "priority", "load_balanced"),
    Preset("slo_aware + locality", "slo_aware", "locality"),
    Preset("adaptive + locality", "adaptive", "locality"),
)


def demo_fleet(
    n: int = 4,
    *,
    model: str = "llama-3-8b",
    gpu: str = "l40s",
    max_concurrent: int = 16,
    lora_adapters: Sequence[str] = (),
    max_loras: int = 1,
) -> list[ExecutionInstance]:
    """``n`` simulated instances; the concurrency bound makes the control plane queue.
    Each serves ``lora_adapters`` too, ``max_loras`` of them in a batch."""
    metadata: dict[str, Any] = {"sim_gpu": gpu, "sim_model": model}
    if lora_adapters:
        metadata["sim_max_loras"] = max_loras
    return [
        ExecutionInstance(
            instance_id=f"sim-{i}",
            host="127.0.0.1",
            port=8100 + i,
            model_name=model,
            max_concurrent_requests=max_concurrent,
            lora_adapters=list(lora_adapters),
            metadata=dict(metadata),
        )
        for i in range(n)
    ]


def demo_workload(sessions: int = 120, rate: float = 9.0, seed: int = 0) -> Workload:
    """Multi-turn chat at about 1.2x the demo fleet's capacity, with per-priority SLOs."""
    base = multi_turn(
        sessions,
        turns_per_session=4,
        rate=rate,
        think_time_s=3.0,
        system_prompt_tokens=1024,
        seed=seed,
        model="llama-3-8b",
    )
    mix: dict[RequestPriority | int | str, float] = {
        RequestPriority.CRITICAL: 0.05,
        RequestPriority.HIGH: 0.05,
        RequestPriority.NORMAL: 0.6,
        RequestPriority.LOW: 0.2,
        RequestPriority.BACKGROUND: 0.1,
    }
    slos: dict[RequestPriority | int | str, SLO] = {
        RequestPriority.CRITICAL: SLO(ttft_s=1.0, tpot_s=0.05, e2e_s=8.0),
        RequestPriority.HIGH: SLO(ttft_s=1.0, tpot_s=0.05, e2e_s=10.0),
        RequestPriority.NORMAL: SLO(ttft_s=1.0, tpot_s=0.05, e2e_s=20.0),
        RequestPriority.LOW: SLO(ttft_s=2.0, tpot_s=0.1, e2e_s=40.0),
        RequestPriority.BACKGROUND: SLO(ttft_s=10.0, tpot_s=0.2, e2e_s=120.0),
    }
    return with_priorities(base, mix, slos, seed=seed)


DEMO_TARGETS = (
    "targets per priority: critical/high/normal TTFT <= 1 s, TPOT <= 50 ms, E2E <= 8/10/20 s; "
    "low TTFT <= 2 s, TPOT <= 100 ms, E2E <= 40 s; background TTFT <= 10 s, TPOT <= 200 ms, "
    "E2E <= 120 s"
)
"""What :func:`demo_workload`'s requests are held to, in words."""

TABLE_LEGEND = (
    "done: requests completed / sent. goodput: requests that met their targets, per second "
    "of the run (the last arrival's tail included). TTFT/TPOT/E2E: time to the first token, "
    "per output token after it, end to end. prefix hit: share of prompt tokens the engines "
    "found in their prefix caches. SLO crit/high, SLO others: share of those requests that "
    "met their targets."
)
"""The side-by-side table's columns, in words."""


@dataclass(frozen=True)
class GatewayDemoResult:
    report: LoadReport
    summary: BenchSummary
    per_instance: dict[str, int]


async def gateway_demo(
    requests: int = GATEWAY_REQUESTS, rate: float = GATEWAY_RATE, seed: int = 0
) -> GatewayDemoResult:
    """Serve the embedded default fleet through the gateway on loopback and drive it."""
    from sage_llm.config import SageConfig
    from sage_llm.control_plane.builder import build_manager
    from sage_llm.gateway.server import start_gateway

    config = SageConfig.default()
    manager = build_manager(config)
    mix: dict[RequestPriority | int | str, float] = {
        RequestPriority.HIGH: 0.2,
        RequestPriority.NORMAL: 0.6,
        RequestPriority.LOW: 0.2,
    }
    workload = with_priorities(
        synthetic(
            requests,
            rate,
            input_dist=LogNormal(300, 0.8, lo=16, hi=2048),
            output_dist=Uniform(16, 96),
            seed=seed,
            n_users=8,
            model=config.simulation.model,
        ),
        mix,
        seed=seed,
    )
    await manager.start()
    runner, port = await start_gateway(manager, config.gateway, port=0)
    try:
        report = await run_http_workload(
            f"http://127.0.0.1:{port}", workload, model=config.simulation.model
        )
        per_instance = {
            inst.instance_id: int(
                manager.get_instance_metrics(inst.instance_id)["completed_requests"]
            )
            for inst in manager.get_instances()
        }
    finally:
        await runner.cleanup()
        await manager.stop()
    return GatewayDemoResult(
        report, summarize(report.measurements, report.duration_s), per_instance
    )


def render_gateway(result: GatewayDemoResult) -> Table:
    s = result.summary
    table = Table(title="Gateway over the embedded simulated fleet (HTTP, streaming)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_row("requests ok / sent", f"{s.ok} / {s.count}")
    table.add_row("throughput", f"{s.request_throughput:.1f} req/s, "
                  f"{s.output_token_throughput:.0f} tok/s")  # fmt: skip
    if s.ttft:
        table.add_row("TTFT p50 / p99", f"{_ms(s.ttft.p50)} / {_ms(s.ttft.p99)} ms")
    if s.tpot:
        table.add_row("TPOT p50 / p99", f"{_ms(s.tpot.p50)} / {_ms(s.tpot.p99)} ms")
    if s.e2e:
        table.add_row("E2E p50 / p99", f"{_ms(s.e2e.p50)} / {_ms(s.e2e.p99)} ms")
    table.add_row(
        "requests per instance",
        ", ".join(f"{k}: {v}" for k, v in sorted(result.per_instance.items())),
    )
    table.add_row(
        "load generator lag (mean)",
        f"{result.report.mean_send_lag_s * 1000:.2f} ms (how late the client sent, on average: "
        "near 0, the rate was kept)",
    )
    return table


def run_demo(
    presets: Sequence[Preset] = DEMO_PRESETS,
    *,
    sessions: int = 120,
    rate: float = 9.0,
    seed: int = 0,
    console: Console | None = None,
) -> list[RunResult]:
    """Part 1 (a fixed :data:`GATEWAY_REQUESTS` requests at :data:`GATEWAY_RATE` per
    second), then part 2 with ``sessions`` sessions starting at ``rate`` per second; both
    seeded by ``seed``. :class:`ConfigError` before either part when an argument is out of
    range."""
    check_demo_args(sessions, rate, seed)
    console = console or report_console(132)
    console.print(
        "[bold]sage-llm demo, part 1[/bold]: `sage-llm serve`'s embedded default (gateway + 4 "
        "simulated H100 engines serving Llama-3-8B) on loopback, driven over HTTP with "
        f"{GATEWAY_REQUESTS} requests at {GATEWAY_RATE:g} req/s (fixed; --sessions and "
        "--rate size part 2) …"
    )
    gw = asyncio.run(gateway_demo(seed=seed))
    console.print(render_gateway(gw))
    for warning in gw.report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    workload = demo_workload(sessions, rate, seed)
    info = workload.summary()
    console.print(
        f"[bold]sage-llm demo, part 2[/bold]: {len(workload)} requests "
        f"({sessions} multi-turn sessions starting at {rate:g}/s: "
        f"{info.get('rate_rps') or 0:.1f} req/s with their later turns) over 4 simulated "
        f"L40S engines serving Llama-3-8B (16 concurrent each); virtual time; "
        f"{DEMO_TARGETS}."
    )
    results: list[RunResult] = []
    for preset in presets:
        console.print(f"  running [cyan]{preset.name}[/cyan] …")
        results.append(run_preset(preset, workload, demo_fleet, slo=DEMO_SLO, seed=seed))
    console.print(render_table(results))
    console.print(TABLE_LEGEND)
    for line in conclusion(results):
        console.print(line)
    return results


NEXT_STEPS = (
    "Next: `sage-llm serve` runs this gateway for real (point any OpenAI client at "
    "http://127.0.0.1:8080/v1; docs/gateway.md), `make example` runs a SAGE pipeline on the "
    "control plane, and docs/guide.md walks through the rest."
)


def conclusion(results: Sequence[RunResult]) -> list[str]:
    """What the side-by-side table says, in a line or two (the preset with the most
    goodput against the first, and where ``adaptive`` went), then where to go next."""
    lines: list[str] = []
    if results:
        first = results[0]
        best = max(results, key=lambda r: r.summary.goodput)
        urgent_best, _ = urgent_and_rest(best.summary)
        urgent_first, _ = urgent_and_rest(first.summary)
        line = f"Most goodput: {best.preset.name}, {best.summary.goodput:.2f} req/s"
        if best is not first and first.summary.goodput > 0:
            ratio = best.summary.goodput / first.summary.goodput
            line += f" ({ratio:.1f}× {first.preset.name}'s {first.summary.goodput:.2f})"
        if urgent_best is not None and urgent_first is not None and best is not first:
            line += (
                f"; crit/high requests within their targets: {urgent_best:.0%} against "
                f"{urgent_first:.0%}"
            )
        lines.append(line + ".")
        for r in results:
            state = r.policy_state.get("state") or {}
            history = state.get("history") or []  # the latest switches only
            switches = int(state.get("switches") or len(history))
            if history:
                whole = switches == len(history)  # else the oldest were let go
                shown = history[:3] if whole else history[-3:]
                went = " then ".join(str(h.get("to")) for h in shown)
                went = went if whole else f"… then {went}"
                more = f" ({switches} switches in all)" if switches > 3 else ""
                lines.append(f"{r.preset.name}: adaptive switched to {went}{more}.")
    lines.append(NEXT_STEPS)
    return lines


MAX_SPAN_S = 86_400.0
"""The simulated time part 2's sessions may take to start (a day: about three minutes to
run; a rate of 1e-9 had run for days, printing nothing)."""


def check_demo_args(sessions: int, rate: float, seed: int = 0) -> None:
    """:class:`ConfigError` (key ``sessions``, ``rate`` or ``seed``) unless ``sessions >= 1``,
    ``rate`` is a finite number > 0 that starts them within :data:`MAX_SPAN_S` of simulated
    time, and ``seed >= 0`` (numpy's generators take no negative seed)."""
    if isinstance(sessions, bool) or not isinstance(sessions, int) or sessions < 1:
        raise ConfigError(f"must be >= 1, got {sessions!r}", key="sessions")
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"must be a finite number > 0, got {rate:g}", key="rate")
    if sessions / rate > MAX_SPAN_S:  # each simulated second costs wall time to run
        raise ConfigError(
            f"must be at least {sessions / MAX_SPAN_S:.3g} for {sessions} sessions (they "
            f"would start over more than a day of simulated time, hours to run), got {rate:g}",
            key="rate",
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"must be >= 0, got {seed!r}", key="seed")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def render_table(results: Sequence[RunResult]) -> Table:
    """The side-by-side table; "SLO crit/high" and "SLO others" are the shares of those
    requests that met the SLO (met / requests over the classes together)."""
    # Units in the headers (the percentages carry theirs, "85%"); headers on two lines keep
    # the table within 132 columns, and no preset name or figure is cut short.
    headers = ("preset", "done", "goodput\n(req/s)", "TTFT p50\n(ms)", "TTFT p99\n(ms)",
               "TPOT p50\n(ms)", "E2E p99\n(ms)", "prefix\nhit", "SLO\ncrit/high",
               "SLO\nothers")  # fmt: skip
    rows = []
    for r in results:
        s = r.summary
        urgent, rest = urgent_and_rest(s)
        rows.append(
            (
                r.preset.name,
                f"{s.ok}/{s.count}",
                f"{s.goodput:.2f}",
                _ms(s.ttft.p50 if s.ttft else None),
                _ms(s.ttft.p99 if s.ttft else None),
                _ms(s.tpot.p50 if s.tpot else None),
                _ms(s.e2e.p99 if s.e2e else None),
                f"{r.prefix_hit_rate:.0%}",
                _pct(urgent),
                _pct(rest),
            )
        )
    return fitted_table("Side by side (same workload, same simulated engines)", headers, rows)
