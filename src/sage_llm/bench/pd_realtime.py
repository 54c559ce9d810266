"""The real-process half of the PD benchmark: sage-llm's gateway over engine-sim processes,
beside vllm-router over the same processes.

Each layout's engines are ``sage-llm engine-sim`` processes (``--role prefill`` / ``--role
decode`` for its prefill and decode instances, ``--role general`` for its general and
hybrid ones; ``--speed K``), started afresh for every run, and each run sends the same
workload from :mod:`sage_llm.bench.loadgen`, in real time, through:

* **sage-llm**: the gateway (:func:`sage_llm.gateway.server.start_gateway`) over a
  ``mode="http"`` :class:`ControlPlaneManager` configured as the in-process run of that
  layout is (:func:`~sage_llm.bench.pd_bench.manager_kwargs`: the same decider, SLO
  targets and pairing; connector ``vllm``), the processes registered with the layout's
  roles. It runs in its own process (``python -m sage_llm.bench.pd_realtime --port …
  --fleet-spec JSON --engine URL …``), so it does not share the load generator's event
  loop. Its PD counters (``/admin/status``) are kept in the row's ``pd``.
* **vllm-router**, for the layouts it can serve: ``--vllm-pd-disaggregation --prefill …
  --decode …`` for a ``pd-P:D`` layout (round robin on each side), and plain round robin
  over the engines for ``colocated``. It has no counterpart of the adaptive layouts
  (hybrid instances, or prefill and decode instances beside general ones).

Time compression: the engines run ``speed`` times faster and the workload's arrival rate is
multiplied by ``speed``; every measured time is multiplied by ``speed`` back into simulated
seconds before the SLOs are applied, so figures compare with the in-process runs. The
gateway sees real time, so its PD settings are given in real time too
(:func:`realtime_manager_kwargs`: SLO targets and holds divided by ``speed``, KV link rates
multiplied by it). HTTP and process overheads are magnified ``speed`` times: every proxy
pays the same.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from sage_llm.bench.loadgen import LoadReport, run_http_workload
from sage_llm.bench.pd_bench import (
    MODEL_8B,
    REALTIME_SPEED,
    SLO_ITL,
    SLO_TPOT,
    FleetSpec,
    PDCase,
    chat_workload,
    check_realtime_fleet,
    check_sizes,
    fleet_instances,
    long_prompt_workload,
    manager_kwargs,
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
from sage_llm.control_plane.pd import PairingParams
from sage_llm.control_plane.pd.decider import AdaptiveParams
from sage_llm.errors import ConfigError
from sage_llm.gateway.server import start_gateway
from sage_llm.types import ExecutionInstanceType, PDSeparationConfig

__all__ = [
    "engine_roles",
    "fleet_spec_from_json",
    "fleet_spec_json",
    "realtime_manager_kwargs",
    "rescale",
    "run_realtime",
    "sage_manager",
]

MODEL = MODEL_8B

_ENGINE_ROLE = {
    ExecutionInstanceType.PREFILLING: "prefill",
    ExecutionInstanceType.DECODING: "decode",
    ExecutionInstanceType.GENERAL: "general",
    ExecutionInstanceType.HYBRID: "general",  # an engine-sim of any role runs either leg
}
_PD_KEPT = (
    "disaggregated_requests",
    "colocated_requests",
    "colocated_fallbacks",
    "avg_prefill_leg_ms",
    "avg_handoff_ms",
)
"""The gateway's PD counters (``/admin/status``) a sage-llm row keeps."""
_LEARNED = ("est_tpot_ms", "est_prefill_tokens_per_s", "est_chunk_tokens_per_s")
"""What the gateway learnt of each engine (``/admin/status`` ``instances``; real time)."""


def rescale(m: RequestMeasurement, k: float) -> RequestMeasurement:
    """``m`` with every time multiplied by ``k`` (real seconds → simulated seconds)."""
    return dataclasses.replace(
        m,
        arrival_s=m.arrival_s * k,
        first_token_s=None if m.first_token_s is None else m.first_token_s * k,
        token_times_s=[t * k for t in m.token_times_s],
        end_s=m.end_s * k,
    )


def engine_roles(spec: FleetSpec) -> list[str]:
    """The engine-sim ``--role`` of each of ``spec``'s instances, in
    :func:`~sage_llm.bench.pd_bench.fleet_instances` order."""
    return [_ENGINE_ROLE[inst.instance_type] for inst in fleet_instances(spec)]


def fleet_spec_json(spec: FleetSpec) -> str:
    """``spec`` as the gateway process's ``--fleet-spec`` argument."""
    return json.dumps(dataclasses.asdict(spec))


def fleet_spec_from_json(text: str) -> FleetSpec:
    """The :class:`FleetSpec` of a ``--fleet-spec`` argument (:func:`fleet_spec_json`)."""
    d = json.loads(text)
    for key in ("decider_params", "pairing_params"):
        d[key] = tuple((k, v) for k, v in d.get(key, ()))
    return FleetSpec(**d)


def _in_real_time(params: Mapping[str, Any], defaults: Any, speed: float) -> dict[str, Any]:
    """``params`` (over ``defaults``' fields) with every time (``*_s``) divided by ``speed``
    and every link rate (``*_gbps``) multiplied by it."""
    out = dict(params)
    for f in dataclasses.fields(defaults):
        value = out.get(f.name, getattr(defaults, f.name))
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if f.name.endswith("_s"):
            out[f.name] = value / speed
        elif f.name.endswith("_gbps"):
            out[f.name] = value * speed
    return out


def realtime_manager_kwargs(spec: FleetSpec, speed: float = 1.0) -> dict[str, Any]:
    """:func:`~sage_llm.bench.pd_bench.manager_kwargs` of ``spec`` for engines running
    ``speed`` times as fast as simulated time (connector ``vllm``). The gateway measures
    real time, so the decider's SLO targets and every other time of the PD settings (the
    prefill reserve's hold) are divided by ``speed``, and the KV link rates multiplied by
    it: the gateway sees the fleet as the in-process run's control plane does, in units
    ``1/speed`` as long."""
    kwargs = manager_kwargs(spec)
    cfg: PDSeparationConfig | None = kwargs.get("pd_config")
    if cfg is None:
        return kwargs
    meta = dict(cfg.metadata)
    if spec.decider == "adaptive":
        meta["decider_params"] = _in_real_time(
            meta.get("decider_params", {}), AdaptiveParams(), speed
        )
    meta["pairing_params"] = _in_real_time(meta.get("pairing_params", {}), PairingParams(), speed)
    kwargs["pd_config"] = dataclasses.replace(cfg, connector="vllm", metadata=meta)
    return kwargs


def sage_manager(
    spec: FleetSpec, urls: Sequence[str], *, seed: int = 0, speed: float = 1.0
) -> ControlPlaneManager:
    """A manager in http mode over running engine-sim processes (``urls``, one per instance
    of ``spec`` in :func:`~sage_llm.bench.pd_bench.fleet_instances` order, running at
    ``speed``), configured as the in-process run of ``spec`` is
    (:func:`realtime_manager_kwargs`)."""
    instances = fleet_instances(spec)
    if len(urls) != len(instances):
        raise ConfigError(
            f"{spec.name} has {len(instances)} instances, {len(urls)} engine URLs given",
            key="engine",
        )
    cp = ControlPlaneManager(
        scheduling_policy="fifo",
        routing_strategy="load_balanced",
        mode="http",
        seed=seed,
        **realtime_manager_kwargs(spec, speed),
    )
    for inst, url in zip(instances, urls, strict=True):
        host, _, port = url.removeprefix("http://").rpartition(":")
        # no sim_* metadata: over HTTP the control plane learns each engine's speed
        cp.register_instance(dataclasses.replace(inst, host=host, port=int(port), metadata={}))
    return cp


def _case(
    name: str,
    spec: FleetSpec,
    w: Workload,
    rep: LoadReport,
    speed: float,
    pd: dict[str, Any] | None = None,
) -> PDCase:
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
        pd={
            **(pd or {}),
            "mean_send_lag_ms": rep.mean_send_lag_s * 1000,
            "warnings": list(rep.warnings),
        },
    )


def peer_of(spec: FleetSpec) -> str | None:
    """How vllm-router serves ``spec``'s engines: ``"pd"`` (its PD mode) for a ``pd-P:D``
    layout, ``"plain"`` (round robin) for a colocated one; None for the adaptive layouts,
    which it has no counterpart of."""
    if spec.decider == "always" and not spec.general and not spec.hybrid:
        return "pd"
    if spec.decider is None:
        return "plain"
    return None


async def _via_vllm_router(fleet: EngineFleet, w: Workload, mode: str) -> LoadReport:
    if mode == "pd":
        pd = (fleet.urls_for("prefill"), fleet.urls_for("decode"))
        router = await start_peer_router("vllm-router", pd=pd, policy="round_robin")
    else:
        router = await start_peer_router("vllm-router", fleet.urls, policy="round_robin")
    async with router:
        return await run_http_workload(router.url, w, model=MODEL, timeout_s=300.0)


def gateway_argv(
    port: int, spec: FleetSpec, fleet: EngineFleet, seed: int = 0, speed: float = 1.0
) -> list[str]:
    """The command line of the benchmark's sage-llm gateway process for ``spec`` over
    ``fleet``'s engines (in ``spec``'s instance order) running at ``speed``."""
    argv = [sys.executable, "-m", "sage_llm.bench.pd_realtime", "--port", str(port)]
    argv += ["--seed", str(seed), "--speed", repr(speed), "--fleet-spec", fleet_spec_json(spec)]
    for url in fleet.urls:
        argv += ["--engine", url]
    return argv


def _ready(n: int) -> Any:
    def check(status: int, body: bytes) -> bool:
        return status == 200 and f'"healthy_instances": {n}'.encode() in body

    return check


async def pd_counters(url: str) -> dict[str, Any]:
    """The PD counters of the gateway at ``url`` (its ``/admin/status``, as a loopback
    client): requests split and kept whole, legs' times and the prefill reserve's holds
    (when PD is on), and under ``learned`` the TPOT and prefill rates it learnt of each
    engine, in real time; ``{"status_error": ...}`` when the status cannot be read (the
    run's measurements are kept)."""
    timeout = aiohttp.ClientTimeout(total=10.0)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{url}/admin/status") as resp,
        ):
            resp.raise_for_status()
            status = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return {"status_error": f"GET {url}/admin/status: {exc!r}"}
    out: dict[str, Any] = {}
    pd = status.get("pd") or {}
    if pd.get("enabled"):
        out = {k: pd[k] for k in _PD_KEPT if k in pd}
        out["prefill_reserve_holds"] = (pd.get("pairing") or {}).get("prefill_reserve_holds", 0)
    learned = {
        iid: {k: live[k] for k in _LEARNED if k in live}
        for iid, live in (status.get("instances") or {}).items()
        if isinstance(live, dict)
    }
    if learned:
        out["learned"] = learned
    return out


async def _via_sage(
    spec: FleetSpec, fleet: EngineFleet, w: Workload, seed: int, speed: float
) -> tuple[LoadReport, dict[str, Any]]:
    (port,) = free_ports(1)
    log = fleet.log_dir / f"sage-gateway-{port}.log"
    argv = gateway_argv(port, spec, fleet, seed, speed)
    proc = await spawn("sage-gateway", argv, port=port, log_path=log)
    try:
        await proc.wait_ready("/ready", _ready(len(fleet.urls)), timeout_s=60.0)
        rep = await run_http_workload(proc.url, w, model=MODEL, timeout_s=300.0)
        return rep, await pd_counters(proc.url)
    finally:
        await proc.stop()


async def run_realtime(
    *,
    prefill: int = 3,
    decode: int = 5,
    fleets: Sequence[FleetSpec] | None = None,
    speed: float = REALTIME_SPEED,
    n_long: int = 60,
    long_rate: float = 12.0,
    n_chat: int = 120,
    chat_rate: float = 20.0,
    seed: int = 0,
    peers: bool = True,
) -> dict[str, Any]:
    """Run sage-llm and (when ``peers``) vllm-router over the same engine-sim processes,
    one workload after the other; returns the report's ``realtime`` section.

    The layouts are ``fleets`` (Llama-3.1-8B TP1 layouts: :func:`check_realtime_fleet`),
    else ``pd-P:D`` of ``prefill`` + ``decode`` engines, decider ``always``. vllm-router runs
    the layouts it can serve (:func:`peer_of`). ``n_long`` long-prompt and ``n_chat`` chat
    requests (0: that workload is left out), the same seeded workloads as the in-process
    runs of those sizes. Rates are in simulated requests/s (the real rate is ``rate ×
    speed``). Fresh engines are started for each (layout, proxy, workload) run, so no run
    inherits another's cache or pins.
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
        roles = engine_roles(spec)
        peer = peer_of(spec) if peers else None
        for w in workloads:
            fast = scale_rate(w, speed)
            for proxy in ["sage-llm"] + (["vllm-router"] if peer is not None else []):
                async with await start_engine_sims(
                    len(roles), model=MODEL, speed=speed, role=roles
                ) as fleet:
                    counters: dict[str, Any] = {}
                    if peer is None or proxy == "sage-llm":
                        rep, counters = await _via_sage(spec, fleet, fast, seed, speed)
                    else:
                        rep = await _via_vllm_router(fleet, fast, peer)
                name = f"rt:{proxy}-{spec.name}"
                cases.append(_case(name, spec, w, rep, speed, counters).to_dict())
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


async def _serve(
    port: int, spec: FleetSpec, engines: Sequence[str], seed: int, speed: float
) -> None:
    cp = sage_manager(spec, engines, seed=seed, speed=speed)
    runner, _ = await start_gateway(cp, port=port, manage_lifecycle=True, environ={})
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the benchmark's sage-llm gateway until terminated."""
    parser = argparse.ArgumentParser(prog="python -m sage_llm.bench.pd_realtime")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fleet-spec", required=True, help="the layout, as fleet_spec_json")
    parser.add_argument("--engine", action="append", required=True, help="in layout order")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", type=float, default=1.0, help="the engines' --speed")
    args = parser.parse_args(argv)
    spec = fleet_spec_from_json(args.fleet_spec)
    asyncio.run(_serve(args.port, spec, args.engine, args.seed, args.speed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
