"""The real-process half of the PD benchmark: sage-llm's gateway vs vllm-router's PD mode.

Both drive the *same* ``sage-llm engine-sim`` processes (``--role prefill`` / ``--role
decode``, ``--speed K``) with the same workload from :mod:`sage_llm.bench.loadgen`, in real
time:

* **vllm-router PD**: ``vllm-router --vllm-pd-disaggregation --prefill … --decode …``
  (round robin on each side);
* **sage-llm PD**: the gateway (:func:`sage_llm.gateway.server.start_gateway`) over a
  ``mode="http"`` :class:`ControlPlaneManager` whose fleet is those processes, registered
  ``PREFILLING`` / ``DECODING``, decider ``always``, connector ``vllm``. Like the router it
  runs in its own process (``python -m sage_llm.bench.pd_realtime --port … --prefill URL
  --decode URL``), so it does not share the load generator's event loop.

Time compression: the engines run ``speed`` times faster and the workload's arrival rate is
multiplied by ``speed``; every measured time is multiplied by ``speed`` back into simulated
seconds before the SLOs are applied, so figures compare with the in-process runs. The KV
transfer time of engine-sim is not compressed (it is ``tokens × KV bytes / 50 GB/s`` of real
time), and HTTP and process overheads are magnified ``speed`` times: both sides pay the same.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import math
import sys
from collections.abc import Sequence
from typing import Any

from sage_llm.bench.loadgen import LoadReport, run_http_workload
from sage_llm.bench.pd_bench import (
    MODEL_8B,
    SLO_ITL,
    SLO_TPOT,
    FleetSpec,
    PDCase,
    chat_workload,
    check_realtime_fleet,
    check_sizes,
    long_prompt_workload,
)
from sage_llm.bench.procs import (
    EngineFleet,
    free_ports,
    spawn,
    start_engine_sims,
    start_peer_router,
)
from sage_llm.bench.stats import RequestMeasurement, summarize
from sage_llm.bench.workloads import Workload, scale_rate
from sage_llm.control_plane.manager import ControlPlaneManager
from sage_llm.errors import ConfigError
from sage_llm.gateway.server import start_gateway
from sage_llm.types import ExecutionInstance, ExecutionInstanceType, PDSeparationConfig

__all__ = ["rescale", "run_realtime", "sage_pd_manager"]

MODEL = MODEL_8B


def rescale(m: RequestMeasurement, k: float) -> RequestMeasurement:
    """``m`` with every time multiplied by ``k`` (real seconds → simulated seconds)."""
    return dataclasses.replace(
        m,
        arrival_s=m.arrival_s * k,
        first_token_s=None if m.first_token_s is None else m.first_token_s * k,
        token_times_s=[t * k for t in m.token_times_s],
        end_s=m.end_s * k,
    )


def sage_pd_manager(
    prefill_urls: Sequence[str], decode_urls: Sequence[str], *, seed: int = 0
) -> ControlPlaneManager:
    """A manager in http mode over running engine-sim processes, PD always (vllm connector)."""
    cp = ControlPlaneManager(
        scheduling_policy="fifo",
        routing_strategy="load_balanced",
        mode="http",
        seed=seed,
        enable_pd_separation=True,
        pd_config=PDSeparationConfig(routing_policy="always", connector="vllm"),
    )
    roles = [(u, ExecutionInstanceType.PREFILLING) for u in prefill_urls] + [
        (u, ExecutionInstanceType.DECODING) for u in decode_urls
    ]
    for i, (url, role) in enumerate(roles):
        host, _, port = url.removeprefix("http://").rpartition(":")
        cp.register_instance(
            ExecutionInstance(
                instance_id=f"{role.value}-{i}",
                host=host,
                port=int(port),
                model_name=MODEL,
                instance_type=role,
                machine_id="node-0",
                nvlink_domain="node-0",
                max_concurrent_requests=256,
            )
        )
    return cp


def _case(name: str, spec: FleetSpec, w: Workload, rep: LoadReport, speed: float) -> PDCase:
    scaled = [rescale(m, speed) for m in rep.measurements]
    duration = rep.duration_s * speed
    rate = float(w.params.get("rate", 0.0)) * float(w.params.get("rate_scale", 1.0))
    fleet = dataclasses.replace(spec, name=name)
    return PDCase(
        fleet=fleet,
        workload=w.name,
        rate=rate,
        summary=summarize(scaled, duration, SLO_ITL),
        summary_tpot=summarize(scaled, duration, SLO_TPOT),
        pd={"mean_send_lag_ms": rep.mean_send_lag_s * 1000, "warnings": list(rep.warnings)},
    )


async def _via_vllm_router(fleet: EngineFleet, w: Workload) -> LoadReport:
    pd = (fleet.urls_for("prefill"), fleet.urls_for("decode"))
    async with await start_peer_router("vllm-router", pd=pd, policy="round_robin") as router:
        return await run_http_workload(router.url, w, model=MODEL, timeout_s=300.0)


def gateway_argv(port: int, fleet: EngineFleet, seed: int = 0) -> list[str]:
    """The command line of the benchmark's sage-llm PD gateway process."""
    argv = [sys.executable, "-m", "sage_llm.bench.pd_realtime", "--port", str(port)]
    argv += ["--seed", str(seed)]
    for url in fleet.urls_for("prefill"):
        argv += ["--prefill", url]
    for url in fleet.urls_for("decode"):
        argv += ["--decode", url]
    return argv


def _ready(n: int) -> Any:
    def check(status: int, body: bytes) -> bool:
        return status == 200 and f'"healthy_instances": {n}'.encode() in body

    return check


async def _via_sage(fleet: EngineFleet, w: Workload, seed: int) -> LoadReport:
    (port,) = free_ports(1)
    log = fleet.log_dir / f"sage-gateway-{port}.log"
    proc = await spawn("sage-gateway", gateway_argv(port, fleet, seed), port=port, log_path=log)
    try:
        await proc.wait_ready("/ready", _ready(len(fleet.urls)), timeout_s=60.0)
        return await run_http_workload(proc.url, w, model=MODEL, timeout_s=300.0)
    finally:
        await proc.stop()


async def run_realtime(
    *,
    prefill: int = 3,
    decode: int = 5,
    fleets: Sequence[FleetSpec] | None = None,
    speed: float = 2.0,
    n_long: int = 60,
    long_rate: float = 12.0,
    n_chat: int = 120,
    chat_rate: float = 20.0,
    seed: int = 0,
    peers: bool = True,
) -> dict[str, Any]:
    """Run sage-llm PD and (when ``peers``) vllm-router PD over the same engine-sim
    processes, one workload after the other; returns the report's ``realtime`` section.

    The layouts are ``fleets`` (``pd-P:D`` layouts of Llama-3.1-8B: prefill and decode
    instances only, decider ``always``), else one of ``prefill`` + ``decode`` engines.
    ``n_long`` long-prompt and ``n_chat`` chat requests (0: that workload is left out), the
    same seeded workloads as the in-process runs of those sizes. Rates are in simulated
    requests/s (the real rate is ``rate × speed``). Fresh engines are started for each
    (layout, router, workload) run, so no run inherits another's cache or pins.
    """
    if not (math.isfinite(speed) and speed > 0):
        raise ConfigError(f"must be a finite number > 0, got {speed:g}", key="speed")
    check_sizes(n_long, long_rate, n_chat, chat_rate)
    if fleets is None:
        if prefill < 1 or decode < 1:
            raise ConfigError("need at least one prefill and one decode engine", key="prefill")
        fleets = [FleetSpec(f"pd-{prefill}:{decode}", MODEL, prefill=prefill, decode=decode,
                            decider="always")]  # fmt: skip
    for spec in fleets:
        check_realtime_fleet(spec)
    workloads = [
        w
        for n, w in (
            (n_long, long_prompt_workload(max(n_long, 1), long_rate, seed)),
            (n_chat, chat_workload(max(n_chat, 1), chat_rate, seed)),
        )
        if n > 0
    ]
    cases: list[dict[str, Any]] = []
    for spec in fleets:
        roles = ["prefill"] * spec.prefill + ["decode"] * spec.decode
        layout = f"{spec.prefill}:{spec.decode}"
        for w in workloads:
            fast = scale_rate(w, speed)
            runs = [("sage-llm-pd", True)] + ([("vllm-router-pd", False)] if peers else [])
            for name, sage in runs:
                async with await start_engine_sims(
                    len(roles), model=MODEL, speed=speed, role=roles
                ) as fleet:
                    if sage:
                        rep = await _via_sage(fleet, fast, seed)
                    else:
                        rep = await _via_vllm_router(fleet, fast)
                cases.append(_case(f"rt:{name}-{layout}", spec, w, rep, speed).to_dict())
    return {
        "speed": speed,
        "time_unit": "simulated seconds (real × speed)",
        "engines": {"model": MODEL, "gpu": "h100"},
        "fleets": [spec.to_dict() for spec in fleets],
        "params": {
            "n_long": n_long,
            "long_rate": long_rate,
            "n_chat": n_chat,
            "chat_rate": chat_rate,
            "seed": seed,
            "peers": ["vllm-router"] if peers else [],
        },
        "cases": cases,
    }


async def _serve(port: int, prefill: Sequence[str], decode: Sequence[str], seed: int) -> None:
    cp = sage_pd_manager(prefill, decode, seed=seed)
    runner, _ = await start_gateway(cp, port=port, manage_lifecycle=True, environ={})
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the benchmark's sage-llm PD gateway until terminated."""
    parser = argparse.ArgumentParser(prog="python -m sage_llm.bench.pd_realtime")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefill", action="append", required=True)
    parser.add_argument("--decode", action="append", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.prefill, args.decode, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
