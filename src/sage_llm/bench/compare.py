"""``sage-llm bench compare``: sage-llm presets and peer routers side by side, over HTTP.

For every contender (a sage-llm scheduling/routing preset, or a peer router with one of its
policies) and every offered rate, the command starts a **fresh** fleet of ``engine-sim``
processes (so no contender inherits another's prefix cache), puts the contender in front of
it on loopback, and replays the same seeded workload with
:func:`sage_llm.bench.loadgen.run_http_workload`. sage-llm runs as an in-process gateway
(``sage-llm serve`` in its own process, so the load generator does not share the gateway's
event loop) over a ``mode="http"`` manager whose instances are the engine processes, with
``max_concurrent_requests`` per instance (default 256, engine-sim's ``max_num_seqs``: a
lower bound makes the control plane hold requests the engines could already batch); peers are
installed into their own virtualenvs (:func:`sage_llm.bench.peers.ensure_peer`) and started
by :func:`sage_llm.bench.procs.start_peer_router`. Token-id prompts are sent as text of the
same tokens (:func:`as_text_prompts`): sglang-router rejects token-id prompts.

Time compression: engines run with ``--speed K`` and arrivals are sent K times as fast;
every measured time is multiplied by K before it is summarised, so all figures are in
simulated seconds (the proxies' own overhead is multiplied by K too; keep K modest).

"80% of capacity" (``--load``) is calibrated on virtual time before the run: 400 requests of
the workload arrive at 1000 req/s at the in-process simulator (same GPU, model and engine count;
``fifo + load_balanced``; no control-plane concurrency limit), and capacity is the rate of
completions between the 10th and the 90th percentile completion (:func:`calibrate_capacity`).
The offered rate is ``load × capacity``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console

from sage_llm.bench.demo import DEMO_PRESETS, DEMO_SLO, demo_fleet
from sage_llm.bench.inprocess import Preset, run_preset
from sage_llm.bench.loadgen import run_http_workload
from sage_llm.bench.procs import EngineFleet, ManagedProcess, counter_total, free_ports, serving
from sage_llm.bench.report import (
    Entry,
    check_out_dir,
    refuse_repeats,
    report_console,
    summary_table,
    target_check,
    write_html,
    write_json,
)
from sage_llm.bench.stats import SLO, RequestMeasurement, summarize
from sage_llm.bench.workloads import (
    LogNormal,
    Workload,
    lora_names,
    multi_turn,
    scale_rate,
    sharegpt_like,
    synthetic,
    trace_replay,
    with_adapters,
    with_priorities,
)
from sage_llm.engines.metrics_scrape import Samples
from sage_llm.errors import ConfigError, SageLLMError
from sage_llm.types import RequestPriority

__all__ = [
    "PEER_POLICIES",
    "CompareConfig",
    "build_workload",
    "calibrate_capacity",
    "check_workload",
    "compare_main",
    "overload_title",
    "parse_preset",
    "prefix_counters",
    "prefix_hit_delta",
    "prefix_hit_rates",
    "prefix_snapshot",
    "rescale",
    "run_compare",
]

PEER_POLICIES: dict[str, tuple[str, ...]] = {
    "vllm-router": ("round_robin", "cache_aware", "power_of_two"),
    "sglang-router": ("round_robin", "cache_aware", "power_of_two"),
}
"""The main policies of each peer router that ``compare`` runs."""

WORKLOADS = ("multi-turn", "sharegpt", "synthetic")

CALIBRATION_REQUESTS = 400
"""Size of the capacity calibration probe (requests)."""


def parse_preset(spec: str) -> Preset:
    """``"policy+routing"`` (spaces allowed) as a :class:`Preset` named after it;
    :class:`ConfigError` unless both name a known policy and routing strategy."""
    from sage_llm.control_plane.routing.registry import get_strategy
    from sage_llm.control_plane.scheduling.registry import params_class

    parts = [p.strip().lower().replace("-", "_") for p in spec.split("+")]  # as read
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"preset {spec!r} is not 'policy+routing'", key="presets")
    try:
        params_class(parts[0])
        get_strategy(parts[1])
    except SageLLMError as exc:
        raise ConfigError(f"preset {spec!r}: {exc.message}", key="presets") from None
    return Preset(f"{parts[0]} + {parts[1]}", parts[0], parts[1])


def check_workload(kind: str) -> None:
    """:class:`ConfigError` (key ``workload``) unless ``kind`` is one of :data:`WORKLOADS`
    or ``trace:PATH`` of an existing file."""
    if kind.startswith("trace:"):
        path = Path(kind.removeprefix("trace:"))
        if not path.is_file():
            raise ConfigError(f"no trace file at {str(path)!r}", key="workload")
    elif kind not in WORKLOADS:
        raise ConfigError(
            f"unknown workload {kind!r} (known: {', '.join(WORKLOADS)}, trace:PATH)",
            key="workload",
        )


def _positive(value: float, key: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"must be a finite number > 0, got {value:g}", key=key)


TRACE_MODEL = "llama-3.1-8b"
"""The model a trace runs on: Llama-3-8B's shape with a 131,072-token context (Mooncake's
prompts go past Llama-3-8B's 8,192, which a simulated engine refuses as vLLM does)."""


def build_workload(
    kind: str, *, rate: float, duration_s: float, seed: int = 0, model: str = "llama-3-8b"
) -> Workload:
    """A seeded workload offering about ``rate`` requests/s for about ``duration_s`` s.

    ``multi-turn``: 4-turn chat sessions over a 1024-token shared system prompt;
    ``sharegpt``: ShareGPT-like length mix; ``synthetic``: log-normal prompts around 512
    tokens, 128 output tokens; ``trace:PATH``: a Mooncake/Azure trace's first
    ``rate × duration_s`` requests, their arrivals keeping the trace's shape. Every
    workload is rescaled to the exact mean ``rate``."""
    _positive(rate, "rate")
    _positive(duration_s, "duration_s")
    check_workload(kind)
    n = max(2, round(rate * duration_s))
    if kind.startswith("trace:"):
        path = Path(kind.removeprefix("trace:"))
        w = trace_replay(path, model=model, limit=n)
        have = len(w.requests)
        if have < n:  # the run would be shorter, or not at all, than what was asked
            raise ConfigError(
                f"trace {path} has {have} request(s), fewer than the {n} that rate × "
                "duration ask for: lower the rate or the duration",
                key="workload",
            )
        if not w.summary()["rate_rps"]:
            raise ConfigError(
                f"trace {path}: its first {n} requests arrive at the same time, so they "
                "have no rate to scale to the one asked for",
                key="workload",
            )
    elif kind == "multi-turn":
        turns = 4
        w = multi_turn(
            max(1, math.ceil(n / turns)),
            turns_per_session=turns,
            rate=rate / turns,
            think_time_s=3.0,
            system_prompt_tokens=1024,
            seed=seed,
            model=model,
        )
    elif kind == "sharegpt":
        w = sharegpt_like(n, rate, seed=seed, model=model)
    elif kind == "synthetic":
        w = synthetic(n, rate, LogNormal(512, 0.6, lo=16, hi=4096), 128, seed=seed, model=model)
    else:
        raise ConfigError(
            f"unknown workload {kind!r} (known: {', '.join(WORKLOADS)}, trace:PATH)",
            key="workload",
        )
    actual = w.summary()["rate_rps"]
    return scale_rate(w, rate / actual) if actual else w


def steady_throughput(end_times: Sequence[float]) -> float:
    """Completions per second between the 10th and the 90th percentile completion, which
    leaves out the ramp-up and the drain of a saturating run (0 when undefined)."""
    ends = sorted(end_times)
    if len(ends) < 10:
        return 0.0
    lo, hi = len(ends) // 10, (len(ends) * 9) // 10
    span = ends[hi] - ends[lo]
    return (hi - lo) / span if span > 0 else 0.0


def calibrate_capacity(
    workload: Workload,
    *,
    engines: int,
    gpu: str = "h100",
    model: str = "llama-3-8b",
    max_concurrent: int = 100_000,
    seed: int = 0,
    lora_adapters: Sequence[str] = (),
    max_loras: int = 1,
) -> float:
    """Requests/s the fleet sustains on ``workload``: its requests arrive compressed to
    1000 req/s, far above any fleet's capacity (in-process simulator, virtual time,
    ``fifo + load_balanced``, ``max_concurrent``
    requests per instance: by default no control-plane limit) and
    :func:`steady_throughput` of the completions is the capacity. Give a workload of a
    few hundred requests so that the fleet saturates. ``lora_adapters``: each engine
    serves them, ``max_loras`` in a batch."""
    squeezed = scale_rate(workload, 1000.0)
    result = run_preset(
        Preset("calibration", "fifo", "load_balanced"),
        squeezed,
        lambda: demo_fleet(
            engines,
            model=model,
            gpu=gpu,
            max_concurrent=max_concurrent,
            lora_adapters=lora_adapters,
            max_loras=max_loras,
        ),
        seed=seed,
    )
    return steady_throughput([m.end_s for m in result.measurements if m.ok])


def rescale(measurements: Sequence[RequestMeasurement], factor: float) -> list[RequestMeasurement]:
    """Every time multiplied by ``factor`` (wall seconds at ``--speed K`` → simulated)."""
    return [
        replace(
            m,
            arrival_s=m.arrival_s * factor,
            first_token_s=None if m.first_token_s is None else m.first_token_s * factor,
            token_times_s=[t * factor for t in m.token_times_s],
            end_s=m.end_s * factor,
        )
        for m in measurements
    ]


@dataclass(frozen=True)
class CompareConfig:
    """Everything one ``compare`` run needs (rates in requests per simulated second)."""

    workload: str = "multi-turn"
    presets: tuple[Preset, ...] = DEMO_PRESETS
    peers: tuple[str, ...] = ("vllm-router", "sglang-router")
    peer_policies: dict[str, tuple[str, ...]] = field(default_factory=lambda: PEER_POLICIES)
    engines: int = 4
    gpu: str = "h100"
    model: str = "llama-3-8b"
    rates: tuple[float, ...] = ()
    load: float = 0.8
    duration_s: float = 60.0
    speed: float = 1.0
    max_concurrent: int = 256
    seed: int = 0
    slo: SLO = DEMO_SLO
    out: Path = Path("bench-out/compare")
    lora_adapters: int = 0
    """LoRA adapters every engine serves (``lora-0`` …); the workload's requests ask for
    them by Zipf's law (:func:`~sage_llm.bench.workloads.with_adapters`). 0: none."""
    max_loras: int = 1
    """Adapters one engine's batch may hold (engine-sim's ``--max-loras``)."""

    def __post_init__(self) -> None:
        from sage_llm.bench.peers import get_spec

        check_workload(self.workload)
        if self.lora_adapters < 0:
            raise ConfigError(f"must be >= 0, got {self.lora_adapters}", key="lora_adapters")
        for key in ("engines", "max_concurrent", "max_loras"):
            if getattr(self, key) < 1:
                raise ConfigError(f"must be >= 1, got {getattr(self, key)}", key=key)
        for key in ("speed", "load", "duration_s"):
            _positive(getattr(self, key), key)
        for rate in self.rates:
            _positive(rate, "rates")
        refuse_repeats(self.peers, "peers")
        for policies in self.peer_policies.values():
            refuse_repeats(policies, "peer_policies")
        for peer in self.peers:
            try:
                spec = get_spec(peer)
            except SageLLMError as exc:
                raise ConfigError(exc.message, key="peers") from None
            for policy in self.peer_policies.get(peer, ()):
                try:
                    spec.check_policy(policy)
                except ConfigError as exc:
                    message = exc.message.removeprefix(f"{exc.key}: ")
                    raise ConfigError(message, key="peer_policies") from None
            if not self.peer_policies.get(peer):
                raise ConfigError(f"no policies for peer {peer!r}", key="peer_policies")

    @property
    def adapter_names(self) -> list[str]:
        """The adapters the engines serve."""
        return lora_names(self.lora_adapters)

    def workload_at(self, rate: float, duration_s: float) -> Workload:
        """The run's workload at ``rate`` for ``duration_s`` (:func:`build_workload`), its
        requests for the adapters when the engines serve some."""
        w = build_workload(
            self.workload, rate=rate, duration_s=duration_s, seed=self.seed, model=self.model
        )
        return with_adapters(w, self.adapter_names, seed=self.seed) if self.lora_adapters else w

    def engine_args(self) -> list[str]:
        """engine-sim's arguments for the adapters it serves (none without)."""
        if not self.lora_adapters:
            return []
        args = [f"--lora-modules={name}" for name in self.adapter_names]
        return [*args, f"--max-loras={self.max_loras}"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["presets"] = [p.name for p in self.presets]
        data["slo"] = self.slo.to_dict()
        data["out"] = str(self.out)
        return data


Progress = Callable[[str], None]


def toml_value(value: Any) -> str:
    """``value`` (a plugin parameter: a number, string, bool, list or table of them) as a
    TOML value: tables inline, infinities as TOML writes them."""
    if isinstance(value, Mapping):
        return (
            "{ "
            + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items())
            + " }"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return json.dumps(value)


def sage_config_toml(
    preset: Preset,
    urls: Sequence[str],
    *,
    model: str,
    max_concurrent: int,
    seed: int = 0,
    engine_stream: str = "sampled",
    lora_adapters: Sequence[str] = (),
) -> str:
    """A ``sage-llm serve`` config: ``preset`` over the engines at ``urls`` (HTTP mode),
    each serving ``lora_adapters`` too."""
    lines = [
        "[services.llm_control_plane]",
        'type = "ControlPlaneVLLMService"',
        'mode = "http"',
        f"scheduling_policy = {json.dumps(preset.policy)}",
        f"routing_strategy = {json.dumps(preset.routing)}",
        "enable_pd_separation = false",
        f"seed = {seed}",
        f"engine_stream = {json.dumps(engine_stream)}",
    ]
    for table, params in (("policy_params", preset.policy_params),
                          ("routing_params", preset.routing_params)):  # fmt: skip
        if params:
            lines.append(f"[services.llm_control_plane.{table}]")
            lines += [f"{json.dumps(k)} = {toml_value(v)}" for k, v in params.items()]
    for i, url in enumerate(urls):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        lines += [
            "[[services.llm_control_plane.instances]]",
            f'instance_id = "engine-{i}"',
            f"host = {json.dumps(host)}",
            f"port = {int(port)}",
            f"model_name = {json.dumps(model)}",
            f"max_concurrent_requests = {max_concurrent}",
        ]
        if lora_adapters:
            lines.append(f"lora_adapters = {json.dumps(list(lora_adapters))}")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@contextlib.asynccontextmanager
async def sage_gateway(
    preset: Preset,
    urls: Sequence[str],
    *,
    model: str,
    max_concurrent: int,
    log_dir: Path,
    seed: int = 0,
    engine_stream: str = "sampled",
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
    lora_adapters: Sequence[str] = (),
) -> AsyncIterator[ManagedProcess]:
    """``sage-llm serve`` in its own process over ``urls`` (``env``: its environment, for
    instance a ``PYTHONPATH`` that runs another checkout's code; ``command``: the program
    given ``serve …``, ``python -m sage_llm.cli`` by default); stopped on exit."""
    (port,) = free_ports(1)
    config = log_dir / f"sage-{port}.toml"
    text = sage_config_toml(
        preset, urls, model=model, max_concurrent=max_concurrent, seed=seed,
        engine_stream=engine_stream, lora_adapters=lora_adapters,
    )  # fmt: skip
    await asyncio.to_thread(_write, config, text)
    program = [sys.executable, "-m", "sage_llm.cli"] if command is None else list(command)
    argv = [*program, "serve", "--config", str(config),
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]  # fmt: skip
    log_path = log_dir / f"sage-{port}.log"
    async with serving(f"sage-{port}", argv, port=port, log_path=log_path, env=env) as proc:
        yield proc


async def _run_sage(
    preset: Preset, urls: Sequence[str], workload: Workload, cfg: CompareConfig
) -> Entry:
    async with sage_gateway(
        preset,
        urls,
        model=cfg.model,
        max_concurrent=cfg.max_concurrent,
        log_dir=cfg.out / "logs",
        seed=cfg.seed,
        lora_adapters=cfg.adapter_names,
    ) as gateway:
        report = await run_http_workload(gateway.url, workload, model=cfg.model)
    return _entry(preset.name, "sage", report.measurements, report.duration_s, cfg, report)


def as_text_prompts(workload: Workload) -> Workload:
    """The same workload with token-id prompts written as text of exactly those many tokens
    (token id ``i`` becomes the word `` t<i>``, one token under :mod:`sage_llm.tokens`), so
    shared prefixes stay shared. sglang-router accepts only text prompts."""

    def text(prompt: str | list[int]) -> str:
        return prompt if isinstance(prompt, str) else "".join(f" t{i}" for i in prompt)

    return replace(workload, requests=tuple(replace(r, prompt=text(r.prompt)) for r in workload))


async def _run_peer(
    peer: str, policy: str, urls: Sequence[str], workload: Workload, cfg: CompareConfig
) -> Entry:
    from sage_llm.bench.peers import ensure_peer
    from sage_llm.bench.procs import start_peer_router

    install = await ensure_peer(peer)
    async with await start_peer_router(peer, urls, policy=policy, install=install) as router:
        report = await run_http_workload(router.url, workload, model=cfg.model, sage_headers=False)
    return _entry(f"{peer} {policy}", "peer", report.measurements, report.duration_s, cfg, report)


def _entry(
    name: str,
    kind: str,
    measurements: Sequence[RequestMeasurement],
    duration_s: float,
    cfg: CompareConfig,
    report: Any,
) -> Entry:
    scaled = rescale(measurements, cfg.speed)
    summary = summarize(scaled, duration_s * cfg.speed, cfg.slo)
    extra = {
        "mean_send_lag_ms": report.mean_send_lag_s * 1000,
        "warnings": list(report.warnings),
    }
    return Entry(name, kind, summary, scaled, extra=extra)


_PREFIX_COUNTERS: tuple[tuple[str, str], ...] = (
    ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total"),
    ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"),
    ("vllm:gpu_prefix_cache_queries_total", "vllm:gpu_prefix_cache_hits_total"),
    ("vllm:gpu_prefix_cache_queries", "vllm:gpu_prefix_cache_hits"),
)
"""(queries, hits) counter names of vLLM's prefix cache (in tokens), current names first;
engine-sim exports the first pair."""


def prefix_counters(samples: Samples) -> tuple[float, float] | None:
    """An engine's prefix-cache (queries, hits) counters from its ``/metrics`` samples,
    summed over label sets; None when it exports neither pair."""
    for queries, hits in _PREFIX_COUNTERS:
        if queries in samples and hits in samples:
            return counter_total(samples, queries), counter_total(samples, hits)
    return None


PrefixSnapshot = dict[str, tuple[float, float]]
"""Each engine's prefix-cache (queries, hits) counters, by URL."""


async def prefix_snapshot(fleet: EngineFleet) -> PrefixSnapshot | None:
    """Every engine's prefix-cache counters now; None when one cannot be scraped or
    exports none (its hit rate is then unknown, not zero)."""
    try:
        scraped = await fleet.metrics()
    except (OSError, TimeoutError, SageLLMError, aiohttp.ClientError):
        return None
    out: PrefixSnapshot = {}
    for url, samples in scraped.items():
        counters = prefix_counters(samples)
        if counters is None:
            return None
        out[url] = counters
    return out


def prefix_hit_delta(before: PrefixSnapshot | None, after: PrefixSnapshot | None) -> float | None:
    """The prefix-cache hit rate of what happened between two snapshots of the same engines:
    hits / queries of the counters' increase summed over the engines (tokens served from
    the cache over prompt tokens looked up); None without both snapshots or with no query
    in between."""
    if before is None or after is None or before.keys() != after.keys():
        return None
    queries = sum(after[url][0] - before[url][0] for url in after)
    hits = sum(after[url][1] - before[url][1] for url in after)
    return hits / queries if queries > 0 else None


@dataclass(frozen=True)
class CompareResult:
    """The entries of a run, the rates used and the capacity calibration."""

    config: CompareConfig
    entries: list[Entry]
    rates: tuple[float, ...]
    capacity_rps: float | None


async def run_compare(cfg: CompareConfig, progress: Progress | None = None) -> CompareResult:
    """Run every contender at every rate (fresh engines per run); see the module docstring."""
    from sage_llm.bench.procs import start_engine_sims

    say = progress or (lambda _msg: None)
    capacity: float | None = None
    rates = cfg.rates
    if not rates:
        try:
            probe = cfg.workload_at(1.0, CALIBRATION_REQUESTS)
        except ConfigError as exc:
            if not cfg.workload.startswith("trace:"):
                raise
            if "fewer than the" not in exc.detail:
                raise
            trace = cfg.workload.removeprefix("trace:")
            raise ConfigError(  # its rate × duration were not the user's
                f"trace {trace} has fewer than the {CALIBRATION_REQUESTS} requests that "
                "calibrating the rate (--load) replays: give a longer trace, or --rate / --rates",
                key="workload",
            ) from None
        say("calibrating capacity on virtual time")
        capacity = await asyncio.to_thread(
            calibrate_capacity, probe, engines=cfg.engines, gpu=cfg.gpu, model=cfg.model,
            lora_adapters=cfg.adapter_names, max_loras=cfg.max_loras,
        )  # fmt: skip
        rates = (cfg.load * capacity,)
        say(f"capacity {capacity:.2f} req/s; offering {rates[0]:.2f} req/s")
    contenders: list[tuple[str, str, Preset | None]] = [
        ("sage", p.name, p) for p in cfg.presets
    ] + [("peer", f"{peer} {pol}", None) for peer in cfg.peers for pol in cfg.peer_policies[peer]]
    # every rate's workload, and every peer's install, before the first run: a rate a trace
    # cannot supply, or a peer that does not install, had thrown the runs before away
    workloads = [cfg.workload_at(rate, cfg.duration_s) for rate in rates]
    if cfg.peers:
        from sage_llm.bench.peers import ensure_peer

        for peer in cfg.peers:
            await ensure_peer(peer)  # (cached: the runs find it installed)
    entries: list[Entry] = []
    for rate, workload in zip(rates, workloads, strict=True):
        fast = scale_rate(as_text_prompts(workload), cfg.speed)
        for _kind, name, preset in contenders:
            say(f"{name} @ {rate:.2f} req/s: starting {cfg.engines} engines")
            async with await start_engine_sims(
                cfg.engines, model=cfg.model, gpu=cfg.gpu, speed=cfg.speed,
                extra_args=cfg.engine_args(),
            ) as fleet:  # fmt: skip
                say(f"{name} @ {rate:.2f} req/s: {len(workload)} requests")
                before = await prefix_snapshot(fleet)
                if preset is not None:
                    entry = await _run_sage(preset, fleet.urls, fast, cfg)
                else:
                    peer, policy = name.split(" ", 1)
                    entry = await _run_peer(peer, policy, fleet.urls, fast, cfg)
                hit_rate = prefix_hit_delta(before, await prefix_snapshot(fleet))
            extra = dict(entry.extra)
            if hit_rate is not None:
                extra["prefix_hit_rate"] = hit_rate
            entries.append(replace(entry, rate_rps=rate, extra=extra))
            say(f"{name} @ {rate:.2f} req/s: goodput {entry.summary.goodput:.2f} req/s")
    return CompareResult(cfg, entries, rates, capacity)


def write_reports(result: CompareResult) -> tuple[Path, Path]:
    """``compare.json`` and ``report.html`` (+ PNGs) under the config's ``out``."""
    cfg = result.config
    config = {
        **cfg.to_dict(),
        "rates_used": list(result.rates),
        "capacity_rps": result.capacity_rps,
    }
    json_path = write_json(cfg.out / "compare.json", config, result.entries)
    html_path = write_html(
        cfg.out, config, result.entries, title=f"sage-llm bench compare: {cfg.workload}"
    )
    return json_path, html_path


def prefix_hit_rates(entries: Sequence[Entry]) -> dict[str, float]:
    """The prefix-cache hit rate of each entry that has one (``extra["prefix_hit_rate"]``),
    by name: what :func:`summary_table` shows in its "prefix hit" column."""
    return {
        e.name: float(e.extra["prefix_hit_rate"])
        for e in entries
        if isinstance(e.extra.get("prefix_hit_rate"), int | float)
    }


def compare_main(
    workload: str = "multi-turn",
    *,
    presets: Sequence[str] | None = None,
    peers: Sequence[str] = ("vllm-router", "sglang-router"),
    peer_policies: Sequence[str] | None = None,
    engines: int = 4,
    rate: float | None = None,
    rates: Sequence[float] = (),
    load: float = 0.8,
    duration_s: float = 60.0,
    speed: float = 1.0,
    max_concurrent: int = 256,
    seed: int = 0,
    out: Path = Path("bench-out/compare"),
    console: Console | None = None,
    lora_adapters: int = 0,
    max_loras: int = 1,
) -> int:
    """Entry point of ``sage-llm bench compare``; returns the exit status (0 on success).

    ``presets`` are ``policy+routing`` strings (default: the demo's five);
    ``peer_policies`` replaces :data:`PEER_POLICIES` for every peer; ``rate`` or
    ``rates`` fix the offered rate(s), otherwise ``load`` × calibrated capacity is used.
    A trace runs on :data:`TRACE_MODEL`, whose context holds its long prompts.
    ``lora_adapters``: every engine serves that many LoRA adapters (``max_loras`` in a
    batch) and the requests ask for them (:attr:`CompareConfig.lora_adapters`)."""
    if rate is not None and rates:
        raise ConfigError("give rate or rates, not both", key="rate")
    policies = {  # the peers that run only
        p: tuple(peer_policies) if peer_policies else PEER_POLICIES[p]
        for p in peers
        if peer_policies or p in PEER_POLICIES
    }
    if engines < 2 and peers:  # the peer routers refuse power_of_two over one worker
        if peer_policies and "power_of_two" in peer_policies:
            raise ConfigError(
                "power_of_two needs at least 2 engines (the peer routers refuse it over one)",
                key="peer_policies",
            )
        policies = {p: tuple(x for x in v if x != "power_of_two") for p, v in policies.items()}
    check_out_dir(out)
    console = console or report_console()
    if engines < 2 and peers and not peer_policies:
        console.print("note: one engine: the peers' power_of_two is left out (it needs two)")
    cfg = CompareConfig(
        model=TRACE_MODEL if workload.startswith("trace:") else CompareConfig.model,
        workload=workload,
        presets=tuple(parse_preset(p) for p in presets) if presets else DEMO_PRESETS,
        peers=tuple(peers),
        peer_policies=policies,
        engines=engines,
        rates=tuple(rates) or ((rate,) if rate is not None else ()),
        load=load,
        duration_s=duration_s,
        speed=speed,
        max_concurrent=max_concurrent,
        seed=seed,
        out=out,
        lora_adapters=lora_adapters,
        max_loras=max_loras,
    )
    with console.status("starting …") as status:
        result = asyncio.run(run_compare(cfg, lambda msg: status.update(msg)))
    for rate_used in result.rates:
        at_rate = [e for e in result.entries if e.rate_rps == rate_used]
        console.print(
            summary_table(
                [(e.name, e.summary) for e in at_rate],
                title=f"{cfg.workload} @ {rate_used:.2f} req/s",
                prefix_hit_rate=prefix_hit_rates(at_rate),
            )
        )
    check = target_check(result.entries)
    if check is not None:

        def shown(ratio: float | None) -> str:  # none when a side has no figure
            return "-" if ratio is None else f"{ratio:.2f}"

        console.print(
            f"best sage-llm: {check.best_sage}; best peer: {check.best_peer}{check.where}; "
            "goodput ratio "
            f"{shown(check.goodput_ratio)} (target ≥ 1.25), P99 TTFT ratio "
            f"{shown(check.p99_ttft_ratio)} (target ≤ 0.7)"
        )
    json_path, html_path = write_reports(result)
    console.print(f"wrote {json_path} and {html_path}")
    return 0


OVERLOAD_PRESETS: tuple[Preset, ...] = (
    Preset("fifo + load_balanced", "fifo", "load_balanced"),
    Preset("priority + load_balanced", "priority", "load_balanced"),
    Preset(
        "priority (no aging) + load_balanced",
        "priority",
        "load_balanced",
        policy_params={"aging_interval_s": math.inf, "max_wait_s": 1e9},
    ),
    Preset(
        "slo_aware + load_balanced",
        "slo_aware",
        "load_balanced",
        policy_params={"infeasible_action": "admit"},
    ),
)
"""Issue #7 target 2: only the scheduling policy differs."""


def overload_workload(rate: float, duration_s: float, seed: int = 0) -> Workload:
    """Multi-turn chat at ``rate`` req/s with 5% CRITICAL, 5% HIGH sessions; targets TTFT ≤
    1 s and TPOT ≤ 50 ms for CRITICAL/HIGH/NORMAL (2 s, 100 ms for LOW) and end-to-end
    deadlines, which ``slo_aware`` orders by, for CRITICAL (8 s) and HIGH (10 s) only."""
    base = build_workload("multi-turn", rate=rate, duration_s=duration_s, seed=seed)
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
        RequestPriority.NORMAL: SLO(ttft_s=1.0, tpot_s=0.05),
        RequestPriority.LOW: SLO(ttft_s=2.0, tpot_s=0.1),
    }
    return with_priorities(base, mix, slos, seed=seed)


def overload_compare(
    *,
    engines: int = 4,
    overload: float = 2.0,
    duration_s: float = 120.0,
    max_concurrent: int = 16,
    presets: Sequence[Preset] = OVERLOAD_PRESETS,
    seed: int = 0,
    calibration_requests: int = CALIBRATION_REQUESTS,
    progress: Progress | None = None,
) -> tuple[list[Entry], float]:
    """Issue #7 target 2 on virtual time (in-process simulated H100 engines): the workload
    at ``overload`` × calibrated capacity through each preset; returns the entries and the
    capacity. ``max_concurrent`` per instance makes the control plane hold the queue."""
    say = progress or (lambda _msg: None)
    probe = overload_workload(1.0, calibration_requests, seed)
    capacity = calibrate_capacity(probe, engines=engines, max_concurrent=max_concurrent, seed=seed)
    rate = overload * capacity
    say(f"capacity {capacity:.2f} req/s; offering {rate:.2f} req/s")
    workload = overload_workload(rate, duration_s, seed)
    entries = []
    for preset in presets:
        say(f"running {preset.name}")
        result = run_preset(
            preset,
            workload,
            lambda: demo_fleet(engines, gpu="h100", max_concurrent=max_concurrent),
            slo=DEMO_SLO,
            seed=seed,
        )
        entries.append(
            Entry(
                preset.name,
                "sage",
                result.summary,
                result.measurements,
                rate_rps=rate,
                extra={"prefix_hit_rate": result.prefix_hit_rate},
            )
        )
    return entries, capacity


def overload_title(overload: float, capacity: float) -> str:
    """The overload table's title: the offered rate, and what it is a multiple of."""
    return (
        f"offered {overload * capacity:.2f} req/s = {overload}x capacity "
        f"({capacity:.2f} req/s), virtual time"
    )


def overload_main(
    *,
    engines: int = 4,
    overload: float = 2.0,
    duration_s: float = 120.0,
    max_concurrent: int = 16,
    seed: int = 0,
    out: Path = Path("bench-out/overload"),
    console: Console | None = None,
) -> int:
    """Entry point of ``sage-llm bench compare --overload``: target 2, table + reports."""
    if engines < 1:
        raise ConfigError(f"must be >= 1, got {engines}", key="engines")
    _positive(overload, "overload")
    _positive(duration_s, "duration_s")
    check_out_dir(out)
    console = console or report_console()
    with console.status("starting …") as status:
        entries, capacity = overload_compare(
            engines=engines,
            overload=overload,
            duration_s=duration_s,
            max_concurrent=max_concurrent,
            seed=seed,
            progress=status.update,
        )
    console.print(
        summary_table(
            [(e.name, e.summary) for e in entries],
            title=overload_title(overload, capacity),
            prefix_hit_rate=prefix_hit_rates(entries),
        )
    )
    config = {
        "engines": engines,
        "overload": overload,
        "capacity_rps": capacity,
        "duration_s": duration_s,
        "max_concurrent": max_concurrent,
        "seed": seed,
    }
    json_path = write_json(out / "overload.json", config, entries)
    html_path = write_html(out, config, entries, title="sage-llm: policies under overload")
    console.print(f"wrote {json_path} and {html_path}")
    return 0
