"""The ``sage-llm`` command line.

sage-llm serve [--config cluster.toml] [--host H] [--port P]
sage-llm demo
sage-llm engine-sim --model llama-3-8b --gpu h100 --port 8001 [--speed K]
sage-llm topo [--file topo.txt]
sage-llm plan --model M --gpus 8xH100 [--json]
sage-llm launch fleet.toml | plan.json [--base-port P --log-dir DIR] [--port P]
sage-llm config check FILE
sage-llm bench compare | pd | proxy

Every argument is checked when the command line is parsed (ports 1-65535, counts >= 1,
rates finite and > 0, preset and policy names), so a bad one is refused before any work
starts; files and ports are checked next (readable UTF-8 text, a port free to listen on).
Each problem is one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from sage_llm.errors import ConfigError, SageLLMError

if TYPE_CHECKING:
    from sage_llm.config import SageConfig
    from sage_llm.gateway.settings import GatewaySettings
    from sage_llm.launch import LaunchConfig

app = typer.Typer(
    name="sage-llm",
    help="sageLLM control plane: schedule, route and disaggregate LLM requests over a fleet.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Work with configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
bench_app = typer.Typer(
    help="Benchmarks; each prints a table and writes a report.", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


def _setup_logging(ctx: typer.Context, level: str, fmt: str) -> None:
    """Log at ``level`` in the format ``fmt`` for the rest of the command, through a writer
    thread (:mod:`sage_llm.logqueue`: the servers' event loops never format or write a
    line)."""
    from sage_llm.logqueue import make_formatter, parse_level, queued_logging

    try:
        parse_level(level)
    except ValueError as exc:
        _fail(f"--log-level: {exc}")
    try:
        make_formatter(fmt)
    except ValueError as exc:
        _fail(f"--log-format: {exc}")
    ctx.with_resource(queued_logging(level, fmt=fmt))


_LOG_FORMAT_HELP = "Log lines: text, or json (one object per line, with the access log's fields)."
_ENGINE_LOG_FORMAT_HELP = (
    "Log lines: text, or json (one object per line). The engine writes no access log."
)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# -- argument checks, run while the command line is parsed (before any work) -------------------


def _bad(exc: SageLLMError) -> typer.BadParameter:
    """``exc`` as the error of the option being parsed (without its config key prefix)."""
    key = getattr(exc, "key", None)
    return typer.BadParameter(exc.message.removeprefix(f"{key}: ") if key else exc.message)


def _port(value: int | None) -> int | None:
    if value is not None and not 1 <= value <= 65535:
        raise typer.BadParameter(f"must be a port number (1-65535), got {value}")
    return value


def _listen_port(value: int | None) -> int | None:
    """A port to listen on: 0 picks a free one (as the file's ``gateway.port = 0``)."""
    if value is not None and not 0 <= value <= 65535:
        raise typer.BadParameter(
            f"must be a port number (1-65535, or 0: any free one), got {value}"
        )
    return value


_OPTION_OF = {
    "num_gpu_blocks": "--num-gpu-blocks-override",
    "kv_host": "--host",
    "kv_port": "--port",
}
"""The command-line option of an engine setting whose name is not the option's own."""


def _as_option(exc: Exception, keys: set[str]) -> str:
    """``exc``'s message, naming the option a setting in ``keys`` came from (``--tp``,
    ``--gpu-memory-utilization``) rather than the setting's own name."""
    key, detail = getattr(exc, "key", None), getattr(exc, "detail", None)
    if isinstance(key, str) and key in keys and detail:
        return f"{_OPTION_OF.get(key, '--' + key.replace('_', '-'))}: {detail}"
    return str(exc)


def _bind_host(value: str | None) -> str | None:
    """An address to bind: not empty (an empty one would bind every interface, as an
    unset shell variable in ``--host "$HOST"`` would ask by accident)."""
    if value is not None and not value.strip():
        raise typer.BadParameter(
            "must not be empty (0.0.0.0 binds every interface, if that is what you want)"
        )
    if value is not None and (value != value.strip() or "://" in value or "/" in value):
        raise typer.BadParameter(f"must be a host name or address, got {value!r}")
    if value is not None:
        from sage_llm.config_schema import bind_host_problem  # (the file's gateway.host rule)

        if (problem := bind_host_problem(value)) is not None:
            raise typer.BadParameter(problem)
    return value


def _at_least_one(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be >= 1, got {value}")
    return value


VLLM_BLOCK_SIZES = (1, 8, 16, 32, 64, 128)  # vLLM's BlockSize: what `vllm serve` accepts


def _vllm_block_size(value: int | None) -> int | None:
    if value is not None and value not in VLLM_BLOCK_SIZES:
        sizes = ", ".join(map(str, VLLM_BLOCK_SIZES))
        raise typer.BadParameter(f"must be one of {sizes} (as vLLM's), got {value}")
    return value


def _nonempty(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise typer.BadParameter("must not be empty (leave it out for the default)")
    return value


def _positive(value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number > 0, got {value:g}")
    return value


def _role(value: str) -> str:
    from sage_llm.types import ExecutionInstanceType

    try:
        ExecutionInstanceType.parse(value)
    except ValueError:
        raise typer.BadParameter(
            f"unknown role {value!r} (expected general, prefill or decode)"
        ) from None
    return value


def _checked_by(check: Callable[[str], object]) -> Callable[[str], str]:
    """A typer callback that runs ``check`` on the value: its SageLLMError is the option's
    one-line error, before any work starts."""

    def callback(value: str) -> str:
        try:
            check(value)
        except SageLLMError as exc:
            raise _bad(exc) from None
        return value

    return callback


def _maybe(callback: Callable[[str], str]) -> Callable[[str | None], str | None]:
    """``callback`` for an option that may be left out (None passes)."""

    def check(value: str | None) -> str | None:
        return None if value is None else callback(value)

    return check


def _policy(value: str) -> str:
    from sage_llm.control_plane.scheduling.registry import params_class

    return _checked_by(params_class)(value)


def _routing(value: str) -> str:
    from sage_llm.control_plane.routing.registry import get_strategy

    return _checked_by(get_strategy)(value)


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


def _rates(value: str | None) -> str | None:
    seen: set[float] = set()
    for part in _split(value):
        try:
            rate = float(part)
        except ValueError:
            raise typer.BadParameter(f"{part!r} is not a number") from None
        if not (math.isfinite(rate) and rate > 0):
            raise typer.BadParameter(f"must be finite numbers > 0, got {part}")
        if rate in seen:  # each rate's table would hold both runs
            raise typer.BadParameter(f"{part} is given twice")
        seen.add(rate)
    return value


def _presets(value: str | None) -> str | None:
    from sage_llm.bench.compare import parse_preset

    if value is not None and not _split(value):  # it had run the default five
        raise typer.BadParameter("no preset named (leave --presets out for the default five)")
    seen: set[str] = set()
    for spec in _split(value):
        try:
            name = parse_preset(spec).name  # its names as read (FIFO, round-robin)
        except SageLLMError as exc:
            raise _bad(exc) from None
        if name in seen:  # it would run twice, reported twice under one name
            raise typer.BadParameter(f"{spec} is given twice")
        seen.add(name)
    return value


def _peers(value: str) -> str:
    from sage_llm.bench.peers import get_spec

    for name in _split(value):
        try:
            get_spec(name)
        except SageLLMError as exc:
            raise typer.BadParameter(exc.message.replace("peer router", "peer")) from None
    return value


def _proxy_peers(value: str) -> str:
    """``bench proxy``'s peers: the peer routers and python-forwarder, each once."""
    from sage_llm.bench.proxy_bench import check_proxy_options

    # (no prompt is too long: only the peers are checked)
    return _checked_by(lambda text: check_proxy_options(_split(text), prompt_tokens=0))(value)


def _workload(value: str) -> str:
    from sage_llm.bench.compare import check_workload

    return _checked_by(check_workload)(value)


def _read_text(path: Path) -> str:
    """The UTF-8 text of ``path``, else a one-line error naming it."""
    from sage_llm.config_locate import read_utf8
    from sage_llm.errors import ConfigError

    try:
        return read_utf8(path)
    except ConfigError as exc:
        _fail(exc.message)


def _cannot_listen(exc: OSError, port: int) -> str | None:
    """Why a server cannot listen, for the errors that mean it (else None)."""
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} is already in use"
    if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
        return exc.strerror or str(exc)
    return None


def _check_listen(
    host: str, port: int, host_source: str = "--host", port_source: str | None = None
) -> None:
    """A one-line error unless ``host:port`` can be listened on now (servers bind with
    SO_REUSEADDR, so a port left in TIME_WAIT is free). ``host_source``/``port_source``
    name where each was given (an option, or a file's ``file:line: key``); a busy port is
    said of ``port_source``, another failure to bind of ``host_source``."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        _fail(f"{host_source}: cannot resolve {host!r} ({exc.strerror})")
    except UnicodeError:  # an empty or over-long label (a..b): no name to look up
        _fail(f"{host_source}: {host!r} is not a host name (a label is empty or too long)")
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:  # as asyncio binds it (an IPv4-mapped address fails)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            # a port in use, or one below the unprivileged range, is the port's problem
            ports = (errno.EADDRINUSE, errno.EACCES)
            source = port_source if exc.errno in ports else host_source
            given = source is not None and (source.startswith("--") or ": " in source)
            where = f"{source}: " if given else ""  # (a bare key: a default, not written)
            _fail(f"{where}cannot listen on {host}:{port}: {_cannot_listen(exc, port) or exc}")


@app.command()
def serve(
    ctx: typer.Context,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Cluster TOML (seed format).")
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Bind address (overrides the file; default 127.0.0.1).", callback=_bind_host
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Port (overrides the file; default 8080; 0: any free port).",
            callback=_listen_port,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    log_format: Annotated[str, typer.Option(help=_LOG_FORMAT_HELP)] = "text",
    loop: Annotated[
        str, typer.Option(help="Event loop: auto (uvloop when installed), uvloop or asyncio.")
    ] = "auto",
) -> None:
    """Run the OpenAI-compatible gateway over the configured fleet.

    Without --config it starts the embedded default: a small fleet of simulated engines.
    """
    _setup_logging(ctx, log_level, log_format)
    from sage_llm import eventloop
    from sage_llm.config import SageConfig, instances_at, load_config
    from sage_llm.control_plane.builder import build_manager, uses_embedded_fleet
    from sage_llm.gateway.server import run_gateway
    from sage_llm.types import host_port

    log = logging.getLogger("sage_llm.serve")
    if config is not None and config.suffix.lower() == ".json":  # as config check reads it
        _fail(
            f"{config}: a .json file is a plan (sage-llm launch starts its engines); the "
            "gateway's configuration is a TOML file (.toml)"
        )
    try:
        cfg = load_config(config) if config is not None else SageConfig.default()
        cfg.check_has_control_plane()
    except SageLLMError as exc:
        _fail(exc.message)
    try:
        eventloop.resolve_loop(loop)
    except ValueError as exc:
        _fail(f"--loop: {exc}")
    bind_host, bind_port = _bind_address(cfg, host, port, cfg.gateway.port)
    # (the file's own gateway.port was checked with it; --host/--port, or the default
    # port of a file that gives none, are checked here)
    for index, inst in instances_at(cfg.control_plane, bind_host, bind_port):
        key = f"instances[{index}].port"
        where = cfg.where(key)
        if where == key:  # (not written in a file with lines)
            where = f"{cfg.source}: instance {inst.instance_id!r} ({key})"
        _fail(
            f"{where}: {inst.host}:{inst.port} is the address the gateway would listen on "
            f"({host_port(bind_host, bind_port)}): its requests would come back to the gateway"
        )
    # port 0 binds a free port here too: the check still resolves the host
    _check_listen(
        bind_host,
        bind_port,
        "--host" if host is not None else cfg.where("gateway.host"),
        "--port" if port is not None else cfg.where("gateway.port"),
    )
    if uses_embedded_fleet(cfg):
        sim = cfg.simulation
        log.info(
            "no instances configured%s: the gateway serves an embedded fleet of %d simulated "
            "%s engines of %s, in this process (their addresses are nominal: nothing listens "
            "there)",
            "" if config is None else f" in {config}",
            sim.instances,
            sim.gpu,
            sim.model,
        )
    else:
        count = len(cfg.control_plane.instances)
        log.info("config %s: %d instance%s", config, count, "" if count == 1 else "s")

    async def main() -> None:
        manager = build_manager(cfg)
        reload_from = None if config is None else _gateway_reader(config)
        await run_gateway(manager, cfg.gateway, host=host, port=port, reload_from=reload_from)

    eventloop.tune_collector_for_serving()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            eventloop.run(main(), loop)
    except OSError as exc:  # taken since the check above
        reason = _cannot_listen(exc, bind_port)
        if reason is None:
            raise
        _fail(f"cannot listen on {bind_host}:{bind_port}: {reason}")


def _non_negative(value: int | None) -> int | None:
    """A count, or a workload seed (numpy's generators take no negative one)."""
    if value is not None and value < 0:
        raise typer.BadParameter(f"must be >= 0, got {value}")
    return value


@app.command()
def demo(
    sessions: Annotated[
        int,
        typer.Option(
            help="Multi-turn sessions in part 2's workload (part 1 always sends 120 requests "
            "at 24 req/s).",
            callback=_at_least_one,
        ),
    ] = 120,
    rate: Annotated[
        float,
        typer.Option(help="New sessions per second in part 2 (not part 1).", callback=_positive),
    ] = 9.0,
    seed: Annotated[
        int, typer.Option(help="Workload seed (both parts), >= 0.", callback=_non_negative)
    ] = 0,
) -> None:
    """Run a short workload through a simulated fleet under several presets, side by side.

    Part 1 (the gateway over HTTP) always sends 120 requests; --sessions and --rate size part 2.
    """
    from sage_llm.bench.demo import run_demo

    try:
        run_demo(sessions=sessions, rate=rate, seed=seed)
    except SageLLMError as exc:
        _fail(exc.message)


_ENGINE_SIM_HELP = (
    "Serve one simulated engine over vLLM's HTTP API (completions, chat, metrics, PD).\n\n"
    "A GPU and model with a packaged fitted profile (--gpu cpu --model tiny: vLLM's CPU build) "
    "uses the profile's step model, engine limits and front end. With --instant every request "
    "is answered at once, without simulated time (whole requests only)."
)


def _lora_modules(given: list[str], model_name: str) -> dict[str, str]:
    """``--lora-modules`` values (``NAME`` or ``NAME=PATH``, as vLLM's) as name → path
    (the name when no path is given); ValueError says what is wrong with one."""
    from sage_llm.config_fields import name_problem

    out: dict[str, str] = {}
    for value in given:
        name, _, path = value.partition("=")
        if not name:
            raise ValueError(f"{value!r}: the adapter's name is empty")
        if problem := name_problem(name):
            raise ValueError(f"{value!r}: the adapter's name {problem}")
        if name == model_name or name in out:
            what = "the served model's name" if name == model_name else "named twice"
            raise ValueError(f"{value!r}: {name!r} is {what}")
        out[name] = path or name
    return out


@app.command("engine-sim", help=_ENGINE_SIM_HELP)
def engine_sim(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="Simulated model (e.g. llama-3-8b).")] = "llama-3-8b",
    gpu: Annotated[str, typer.Option(help="Simulated GPU (h100, h200, a100, l40s, cpu).")] = "h100",
    port: Annotated[int, typer.Option(help="Port to listen on.", callback=_port)] = 8001,
    host: Annotated[str, typer.Option(help="Address to bind.", callback=_bind_host)] = "127.0.0.1",
    speed: Annotated[
        float,
        typer.Option(
            help="Time scale: 2.0 runs steps, KV transfers and the front end twice as fast.",
            callback=_positive,
        ),
    ] = 1.0,
    tp: Annotated[int, typer.Option(help="Tensor-parallel size.", callback=_at_least_one)] = 1,
    pp: Annotated[int, typer.Option(help="Pipeline-parallel size.", callback=_at_least_one)] = 1,
    role: Annotated[str, typer.Option(help="general, prefill or decode.", callback=_role)] = (
        "general"
    ),
    served_model_name: Annotated[
        str | None,
        typer.Option(help="Model name clients use (default: --model).", callback=_nonempty),
    ] = None,
    max_num_seqs: Annotated[
        int | None,
        typer.Option(
            help="Engine batch bound (default: the fitted profile's, else 256).",
            callback=_at_least_one,
        ),
    ] = None,
    max_model_len: Annotated[
        int | None,
        typer.Option(
            help="Longest prompt + output in tokens (default: the model's context window, "
            "at most what the KV cache holds).",
            callback=_at_least_one,
        ),
    ] = None,
    max_num_batched_tokens: Annotated[
        int | None,
        typer.Option(
            help="Token budget of one engine step (default: the fitted profile's, else 8192).",
            callback=_at_least_one,
        ),
    ] = None,
    gpu_memory_utilization: Annotated[
        float | None,
        typer.Option(help="Share of GPU memory for weights and KV cache (default 0.9)."),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            help="KV block size in tokens: 1, 8, 16, 32, 64 or 128, as vLLM's (default 16).",
            callback=_vllm_block_size,
        ),
    ] = None,
    num_gpu_blocks_override: Annotated[
        int | None,
        typer.Option(
            help="KV cache blocks (default: what fits in --gpu-memory-utilization).",
            callback=_at_least_one,
        ),
    ] = None,
    enable_chunked_prefill: Annotated[
        bool | None,
        typer.Option(
            "--enable-chunked-prefill/--no-enable-chunked-prefill",
            help="Chunked prefill (default: on).",
        ),
    ] = None,
    enable_prefix_caching: Annotated[
        bool | None,
        typer.Option(
            "--enable-prefix-caching/--no-enable-prefix-caching",
            help="Prefix caching (default: on).",
        ),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of generated text, >= 0.", callback=_non_negative)
    ] = 0,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    log_format: Annotated[str, typer.Option(help=_ENGINE_LOG_FORMAT_HELP)] = "text",
    faults: Annotated[
        str | None,
        typer.Option(help="Fault plan, e.g. 'crash@30; error=503@p0.05' (see sim/faults.py)."),
    ] = None,
    instant: Annotated[
        bool,
        typer.Option(
            help="Answer every request at once (no simulated time): for measuring proxies."
        ),
    ] = False,
    lora_modules: Annotated[
        list[str] | None,
        typer.Option(
            help="A LoRA adapter served beside the model, NAME or NAME=PATH as vLLM's "
            "(repeat for more): served as the model, its cached blocks kept apart."
        ),
    ] = None,
    scheduling_policy: Annotated[
        str | None,
        typer.Option(
            help="fcfs (default) or priority, as vLLM's: with priority, a request's "
            "'priority' (lower first) orders the waiting requests and picks who is preempted.",
        ),
    ] = None,
    max_loras: Annotated[
        int | None,
        typer.Option(
            help="LoRA adapters one batch may hold, as vLLM's (default 1): a request for "
            "another waits for a slot.",
            callback=_at_least_one,
        ),
    ] = None,
) -> None:
    # The help is _ENGINE_SIM_HELP: typer shows a docstring's line breaks as they are.
    _setup_logging(ctx, log_level, log_format)
    from sage_llm.engines.base import EngineClient
    from sage_llm.sim.engine import SimEngine
    from sage_llm.sim.factory import engine_settings
    from sage_llm.sim.instant import INSTANT_MAX_MODEL_LEN, InstantEngine
    from sage_llm.sim.server import serve_engine
    from sage_llm.types import ExecutionInstanceType

    engine_args = {  # those given; the others are the profile's or the defaults
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
        "max_num_batched_tokens": max_num_batched_tokens,
        "gpu_memory_utilization": gpu_memory_utilization,
        "block_size": block_size,
        "num_gpu_blocks": num_gpu_blocks_override,
        "enable_chunked_prefill": enable_chunked_prefill,
        "enable_prefix_caching": enable_prefix_caching,
        "max_loras": max_loras,
        "scheduling_policy": scheduling_policy,
    }
    options = {"model", "gpu", "tp", "pp", "speed", "seed", "kv_host", "kv_port", *engine_args}
    name = served_model_name or model
    try:
        adapters = _lora_modules(lora_modules or [], name)
    except ValueError as exc:
        _fail(f"--lora-modules: {exc}")
    try:
        params: dict[str, object] = {
            "tp": tp, "pp": pp, "role": ExecutionInstanceType.parse(role), "speed": speed,
            "seed": seed, "kv_host": host, "kv_port": port,
        }  # fmt: skip
        params.update({k: v for k, v in engine_args.items() if v is not None})
        engine: EngineClient
        served_len: int | None = None  # the simulated engine's own, unless instant
        if instant:  # its context is --max-model-len, not bound by a simulated KV cache
            if params["role"] is not ExecutionInstanceType.GENERAL:
                raise ValueError("--instant runs whole requests only: use --role general")
            params.pop("max_model_len", None)
            config, _ = engine_settings(gpu, model, **params)  # the other options checked
            served_len = INSTANT_MAX_MODEL_LEN if max_model_len is None else max_model_len
            try:
                engine = InstantEngine(f"sim-{port}", served_len)
            except ValueError as exc:
                detail = str(exc).removeprefix("max_model_len ")
                raise ConfigError(detail, key="max_model_len") from None
        else:
            config, front_end = engine_settings(gpu, model, **params)
            engine = SimEngine(
                f"sim-{port}",
                config,
                front_end=front_end,
                max_model_len_given=max_model_len is not None,
                lora_adapters=adapters,
            )
    except (SageLLMError, ValueError) as exc:
        _fail(_as_option(exc, options))
    plan = None
    if faults:
        from sage_llm.sim.faults import FaultPlan

        try:
            plan = FaultPlan.parse(faults)
            plan.check_for_process()
        except (SageLLMError, ValueError) as exc:
            _fail(f"--faults: {exc}")
    _check_listen(host, port)
    cost = "instant answers" if instant else config.build_cost_model().name
    typer.echo(
        f"sage-llm engine-sim: {model} on {gpu} (tp={tp}, role={role}, {cost}) at {host}:{port}"
    )

    async def main() -> None:
        served: EngineClient = engine
        if plan is not None:
            from sage_llm.sim.faults import FaultyEngineClient

            faulty = FaultyEngineClient(engine, plan, exit_process=True)
            faulty.arm()
            served = faulty
        # SIGTERM stops it as Ctrl-C does: the requests in flight end at once, then it exits
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await serve_engine(
                served, model_name=name, host=host, port=port, close_engine=True,
                max_model_len=served_len, model_root=model, lora_modules=adapters,
            )  # fmt: skip
        except asyncio.CancelledError:
            # a log line (in the --log-format chosen), at WARNING: requests may have been cut
            logging.getLogger("sage_llm.engine_sim").warning(
                "sage-llm engine-sim: stopped; requests in flight were ended"
            )
            raise

    try:
        with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
            asyncio.run(main())
    except OSError as exc:  # taken since the check above
        reason = _cannot_listen(exc, port)
        if reason is None:
            raise
        _fail(f"cannot listen on {host}:{port}: {reason}")


@app.command()
def topo(
    file: Annotated[
        Path | None,
        typer.Option(help="Parse this saved `nvidia-smi topo -m` output (or its JSON form)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the topology's JSON form (what --topology and topology_file read).",
        ),
    ] = False,
) -> None:
    """Show this machine's GPU topology (NVLink domains, NUMA nodes, PCIe distances)."""
    import json

    from sage_llm.control_plane.parallelism import parse_topology_text
    from sage_llm.control_plane.topology import Topology, detect_topology

    def show(topology: Topology) -> None:
        text = json.dumps(topology.to_dict(), indent=2) if as_json else topology.describe()
        typer.echo(text)

    if file is not None:
        try:
            topology = parse_topology_text(_read_text(file))
        except SageLLMError as exc:
            _fail(f"{file}: {exc}")
        show(topology)
        return
    detected = detect_topology()
    if detected.message:  # on stderr with --json: stdout is the document
        typer.echo(detected.message, err=as_json)
    show(detected.topology)


@app.command()
def plan(
    model: Annotated[str, typer.Option(help="Model (e.g. llama-3-70b).")] = "llama-3-70b",
    gpus: Annotated[
        str,
        typer.Option(
            help="GPUs as COUNTxTYPE (8xH100: one machine) or NODESxCOUNTxTYPE (2x8xH100)."
        ),
    ] = "8xH100",
    slo_ttft: Annotated[str, typer.Option(help="TTFT target (e.g. 2s, 500ms).")] = "2s",
    slo_tpot: Annotated[str, typer.Option(help="TPOT target (e.g. 50ms).")] = "50ms",
    prompt_len: Annotated[int, typer.Option(help="Mean prompt tokens.")] = 1024,
    output_len: Annotated[int, typer.Option(help="Mean output tokens.")] = 256,
    rate: Annotated[
        float | None,
        typer.Option(help="Arrival rate, req/s (default: none; the plan with the most goodput)."),
    ] = None,
    topology: Annotated[
        Path | None,
        typer.Option(help="Saved `nvidia-smi topo -m` output, or its JSON form (topo --json)."),
    ] = None,
    no_pd: Annotated[bool, typer.Option("--no-pd", help="Do not consider PD splits.")] = False,
    per_node: Annotated[
        bool,
        typer.Option(
            "--per-node",
            help="Only plans each node of which can serve alone (as `sage-llm launch` runs "
            "one node with its own gateway): no node with one PD role only.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Choose TP x PP x DP (x EP) and a prefill/decode split for a model on N GPUs."""
    from sage_llm.control_plane.parallelism import plan_command
    from sage_llm.errors import ConfigError

    try:
        text = plan_command(
            model, gpus, slo_ttft, slo_tpot, prompt_len=prompt_len, output_len=output_len,
            rate=rate, topology_file=topology, allow_pd=not no_pd, as_json=as_json,
            per_node=per_node,
        )  # fmt: skip
    except ConfigError as exc:
        names = ("model", "gpus", "slo_ttft", "slo_tpot", "prompt_len", "output_len", "rate")
        key = "gpus" if exc.key == "gpu" else exc.key
        if key not in (*names, "topology"):
            _fail(exc.message)
        _fail(f"--{key.replace('_', '-')}: {exc.detail}")
    typer.echo(text)


@app.command()
def launch(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(help="A launch file (.toml) or a plan (.json).")],
    config_file: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="A sage-llm config file, as serve reads it, without instances (the launch "
            "starts them): the gateway's settings (API keys, admin token, limits), health, "
            "admission and the control plane's. The options here override it.",
        ),
    ] = None,
    policy: Annotated[
        str | None,
        typer.Option(help="Scheduling policy (default: adaptive).", callback=_maybe(_policy)),
    ] = None,
    routing: Annotated[
        str | None,
        typer.Option(help="Routing strategy (default: load_balanced).", callback=_maybe(_routing)),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Gateway bind address (default: the file's [gateway] host, else 127.0.0.1).",
            callback=_bind_host,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help="Gateway port (default: the file's [gateway] port, else 8080; 0: any free port).",
            callback=_listen_port,
        ),
    ] = None,
    base_port: Annotated[
        int | None,
        typer.Option(
            help="A plan's engines listen on this port and the next ones (default: 8100).",
            callback=_port,
        ),
    ] = None,
    log_dir: Annotated[
        Path | None,
        typer.Option(help="A plan's engine logs: <log-dir>/<id>.log (default: sage-llm-logs)."),
    ] = None,
    node: Annotated[
        int | None,
        typer.Option(help="Start the instances the plan puts on this node (default: 0).", min=0),
    ] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
    log_format: Annotated[str, typer.Option(help=_LOG_FORMAT_HELP)] = "text",
) -> None:
    """Start the engines of a launch file or plan and serve the gateway over them.

    Ctrl-C or SIGTERM stops the gateway and every engine started (before it listens: exit 130/143).
    """
    _setup_logging(ctx, log_level, log_format)
    from sage_llm.config import SageConfig, load_config
    from sage_llm.config_locate import read_utf8
    from sage_llm.errors import ConfigError
    from sage_llm.launch import engines_from_plan, load_launch_config
    from sage_llm.launch.plan_to_engines import fleet_problem, is_plan_text

    try:
        sage = load_config(config_file) if config_file is not None else SageConfig.default()
    except SageLLMError as exc:
        _fail(exc.message)
    if sage.control_plane.instances:
        _fail(
            f"{sage.where('instances')}: sage-llm launch registers the engines it starts; "
            "leave the instances out of a --config file"
        )
    if sage.control_plane.mode != "http":
        _fail(
            f"{sage.where('mode')}: sage-llm launch reaches its engines over HTTP; mode "
            f"{sage.control_plane.mode!r} does not"
        )
    default_port = sage.gateway.port if config_file is not None else 8080
    bind_host, bind_port = _bind_address(sage, host, port, default_port)

    overrides: dict[str, object] = {}
    if base_port is not None:
        overrides["base_port"] = base_port
    if log_dir is not None:
        overrides["log_dir"] = log_dir
    if node is not None:
        overrides["node"] = node
    try:  # read once (a pipe has one reading), a plan known by its text as config check does
        text = read_utf8(source, "the launch file")
    except ConfigError as exc:
        _fail(exc.message)
    is_plan = source.suffix.lower() == ".json" or is_plan_text(text)
    if overrides and not is_plan:
        _fail(
            "--base-port, --log-dir and --node apply to a plan file (.json); "
            "a launch file sets base_port, log_dir and node"
        )
    try:
        config = load_launch_config(source, overrides=overrides, text=text)
        engines = engines_from_plan(config.instances, config.settings)
    except ConfigError as exc:
        options = {"node": "--node", "base_port": "--base-port", "log_dir": "--log-dir"}
        option = options.get(exc.key or "") if is_plan else None
        if option is None:
            _fail(exc.message)
        _fail(f"{exc.location or source}: {option}: {exc.detail}")
    except SageLLMError as exc:
        _fail(exc.message)
    cp = sage.control_plane
    if not (cp.enable_pd_separation and cp.pd.enabled):  # --config turns PD off
        problem = fleet_problem(engines, pd_enabled=False)
        if problem is not None:
            # the one of the two the file sets (loading makes them agree)
            written = [k for k in ("enable_pd_separation", "pd.enabled") if k in sage.written_at]
            key = written[0] if written else "enable_pd_separation"
            _fail(f"{sage.where(key)}: {problem} (the engines of {source})")
    where = "--port" if port is not None else sage.where("gateway.port")
    for engine in engines:
        if engine.port == bind_port:
            _fail(f"{where}: {bind_port} is also the port of engine {engine.instance_id!r}")
        if bind_port in engine.side_channel_ports:
            _fail(
                f"{where}: {bind_port} is also a NIXL side-channel port of engine "
                f"{engine.instance_id!r}"
            )
    _check_listen(
        bind_host,
        bind_port,
        "--host" if host is not None else sage.where("gateway.host"),
        "--port" if port is not None else sage.where("gateway.port"),
    )
    chosen: dict[str, Any] = {}  # the options override the --config file
    if policy is not None or config_file is None:
        chosen["scheduling_policy"] = policy or "adaptive"
    if routing is not None or config_file is None:
        chosen["routing_strategy"] = routing or "load_balanced"
    stopped_by = _run_launch(
        config,
        sage,
        chosen,
        host=bind_host,
        port=bind_port,
        reload_from=None if config_file is None else _gateway_reader(config_file),
    )
    if stopped_by is not None:
        _fail(
            f"{stopped_by.name} before the launch finished: stopped the engines it had started",
            code=128 + stopped_by,
        )


def _bind_address(
    cfg: SageConfig, host: str | None, port: int | None, default_port: int
) -> tuple[str, int]:
    """Where a gateway listens: the options, else the file's ``[gateway]`` host (default
    loopback) and ``default_port``."""
    from sage_llm.gateway.server import DEFAULT_HOST

    bind_host = host if host is not None else (cfg.gateway.host or DEFAULT_HOST)
    return bind_host, port if port is not None else default_port


def _gateway_reader(path: Path) -> Callable[[], GatewaySettings] | None:
    """What reads ``path``'s ``[gateway]`` table again for ``POST /admin/reload`` (the
    whole file checked, as when it was first read); None, said in the log, for a path that
    is no regular file (a pipe, ``--config <(…)``: a second read would find it empty, and
    an empty file is a valid configuration without keys). A file found empty at a reload
    (being written, say) is a problem: an empty file would open the gateway."""
    from sage_llm.config import parse_config
    from sage_llm.config_locate import read_utf8

    if not path.is_file():
        logging.getLogger("sage_llm.gateway").info(
            "%s is not a regular file: POST /admin/reload cannot read it again", path
        )
        return None

    def read() -> GatewaySettings:
        text = read_utf8(path, "config file")
        if not text.removeprefix("\ufeff").strip():
            raise ConfigError(
                "the config file is empty now (being written?): nothing is reloaded",
                location=str(path),
            )
        return parse_config(text, str(path)).gateway

    return read


def _run_launch(
    config: LaunchConfig,
    sage: SageConfig,
    overrides: dict[str, Any],
    *,
    host: str,
    port: int,
    reload_from: Callable[[], GatewaySettings] | None = None,
) -> signal.Signals | None:
    """Start the fleet, then serve the gateway (``sage``'s settings, the control plane's
    with ``overrides``; ``reload_from`` for ``POST /admin/reload``) until SIGTERM, SIGHUP
    or Ctrl-C; stop the fleet. The signal
    (SIGTERM, SIGHUP or SIGINT) that stopped the launch before the gateway listened, else
    None.

    Until the gateway listens, SIGTERM (and SIGHUP, unless it is ignored, as under
    ``nohup``) cancels the launch (which stops every engine it had started, as Ctrl-C
    does); while it listens, they shut the gateway down gracefully, and once it is done
    they no longer interrupt stopping the fleet. Its handlers stay in place throughout.
    """
    from sage_llm.control_plane.builder import build_manager
    from sage_llm.gateway.server import run_gateway
    from sage_llm.launch import launch_from_config

    log = logging.getLogger("sage_llm.launch")
    terminated: signal.Signals | None = None
    listening = asyncio.Event()
    # SIGHUP (a closed terminal) as SIGTERM, unless ignored (nohup) or the caller's own
    hangup = signal.getsignal(signal.SIGHUP) is signal.SIG_DFL

    async def main() -> None:
        nonlocal terminated
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        stop = asyncio.Event()  # the gateway's graceful shutdown
        serving = False

        def on_signal(sig: signal.Signals) -> None:
            nonlocal terminated
            if listening.is_set() and serving and not stop.is_set():
                log.info("%s received", sig.name)
                stop.set()
                return
            if listening.is_set() or terminated is not None:
                log.info("%s received: already stopping", sig.name)
                return
            log.info("%s received: stopping the engines started so far", sig.name)
            terminated = sig
            assert task is not None
            task.cancel()

        # the launch's handlers stay for the whole run (the gateway leaves SIGTERM and
        # SIGHUP to them): a signal is never left to its default action, which would end
        # the launch without stopping its engines
        loop.add_signal_handler(signal.SIGTERM, on_signal, signal.SIGTERM)
        if hangup:
            loop.add_signal_handler(signal.SIGHUP, on_signal, signal.SIGHUP)
        manager = build_manager(sage, register=False, **overrides)
        try:
            await manager.start()
            async with await launch_from_config(config, manager=manager) as fleet:
                typer.echo(fleet.describe())
                serving = True
                try:
                    await run_gateway(
                        manager,
                        sage.gateway,
                        host=host,
                        port=port,
                        ready=listening,
                        stop=stop,
                        reload_from=reload_from,
                    )
                finally:
                    serving = False
        finally:
            await manager.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return None if listening.is_set() else signal.SIGINT
    except asyncio.CancelledError:
        if terminated is None:
            raise
        return terminated
    except SageLLMError as exc:
        _fail(exc.message)
    except OSError as exc:  # the gateway's port, taken since the check
        reason = _cannot_listen(exc, port)
        if reason is None:
            raise
        _fail(f"cannot listen on {host}:{port}: {reason}")
    return None


@bench_app.command("compare")
def bench_compare(
    ctx: typer.Context,
    workload: Annotated[
        str,
        typer.Option(help="multi-turn, sharegpt, synthetic or trace:PATH.", callback=_workload),
    ] = "multi-turn",
    presets: Annotated[
        str | None,
        typer.Option(help="Comma-separated policy+routing presets.", callback=_presets),
    ] = None,
    peers: Annotated[
        str, typer.Option(help="Comma-separated peer routers ('' for none).", callback=_peers)
    ] = "vllm-router,sglang-router",
    peer_policies: Annotated[
        str | None, typer.Option(help="Comma-separated peer policies (default: main ones).")
    ] = None,
    engines: Annotated[int, typer.Option(help="engine-sim processes.", callback=_at_least_one)] = 4,
    rate: Annotated[
        float | None, typer.Option(help="Offered rate, req/s.", callback=_positive)
    ] = None,
    rates: Annotated[
        str | None,
        typer.Option(help="Comma-separated rates for goodput-vs-rate curves.", callback=_rates),
    ] = None,
    load: Annotated[
        float, typer.Option(help="Fraction of calibrated capacity.", callback=_positive)
    ] = 0.8,
    duration_s: Annotated[
        float, typer.Option(help="Workload duration (seconds).", callback=_positive)
    ] = 60.0,
    speed: Annotated[
        float, typer.Option(help="engine-sim time compression.", callback=_positive)
    ] = 1.0,
    max_concurrent: Annotated[
        int,
        typer.Option(
            help="Per-instance concurrency bound (engine-sim batches up to 256).",
            callback=_at_least_one,
        ),
    ] = 256,
    overload: Annotated[
        bool,
        typer.Option(help="Instead: fifo vs priority vs slo_aware at 2x capacity (virtual time)."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Workload seed, >= 0.", callback=_non_negative)] = 0,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("bench-out/compare"),
    lora_adapters: Annotated[
        int,
        typer.Option(
            help="LoRA adapters every engine serves; requests ask for them by Zipf's law.",
            callback=_non_negative,
        ),
    ] = 0,
    max_loras: Annotated[
        int,
        typer.Option(help="Adapters one engine's batch may hold.", callback=_at_least_one),
    ] = 1,
) -> None:
    """sage-llm presets and peer routers over the same simulated engines, side by side."""
    from sage_llm.bench.compare import compare_main, overload_main

    if overload:  # its workload, presets and fleet are its own: say so, not ignore them
        unused = [
            f"--{name.replace('_', '-')}"
            for name in ("workload", "presets", "peers", "peer_policies", "rate", "rates",
                         "load", "speed", "max_concurrent", "lora_adapters", "max_loras")
            if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"
        ]  # fmt: skip
        if unused:
            verb = "does" if len(unused) == 1 else "do"
            _fail(
                f"--overload runs its own workload, presets and fleet: {', '.join(unused)} "
                f"{verb} not apply (it takes --engines, --duration-s, --seed and --out)",
                code=2,
            )
    try:
        if overload:
            code = overload_main(engines=engines, duration_s=duration_s, seed=seed, out=out)
        else:
            code = compare_main(
                workload,
                presets=_split(presets) or None,
                peers=_split(peers),
                peer_policies=_split(peer_policies) or None,
                engines=engines, rate=rate, rates=[float(r) for r in _split(rates)], load=load,
                duration_s=duration_s, speed=speed, max_concurrent=max_concurrent, seed=seed,
                out=out, lora_adapters=lora_adapters, max_loras=max_loras,
            )  # fmt: skip
    except SageLLMError as exc:
        _fail(_as_option(exc, set(ctx.params)))
    raise typer.Exit(code)


@bench_app.command("pd")
def bench_pd(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option(help="JSON report path (checked before the benchmark runs).")
    ] = Path("bench-out/pd/pd.json"),  # pd_bench.DEFAULT_OUT
    realtime: Annotated[
        bool,
        typer.Option(
            help="Also run over engine-sim processes in real time, through sage-llm's gateway "
            "and vllm-router (its PD mode on pd-P:D layouts, round robin on colocated): the "
            "same sizes and rates, on the Llama-3.1-8B layouts of --fleets (default pd-3:5)."
        ),
    ] = False,
    speed: Annotated[
        float,
        typer.Option(
            help="Time compression of the real-time part: the engines run SPEED times as fast "
            "as the GPU they simulate. At 1 or more a machine of few cores measures its own "
            "CPU more than PD.",
            callback=_positive,
        ),
    ] = 0.25,  # pd_bench.REALTIME_SPEED
    include_70b: Annotated[bool, typer.Option(help="Include the 70B TP4 fleets.")] = True,
    seed: Annotated[int, typer.Option(help="Workload seed, >= 0.", callback=_non_negative)] = 0,
    n_long: Annotated[int, typer.Option(min=0, help="Long-prompt requests per fleet.")] = 120,
    long_rate: Annotated[
        float, typer.Option(help="Long-prompt arrivals per second.", callback=_positive)
    ] = 12.0,
    n_chat: Annotated[int, typer.Option(min=0, help="Chat requests per fleet.")] = 300,
    chat_rate: Annotated[
        float, typer.Option(help="Chat arrivals per second.", callback=_positive)
    ] = 20.0,
    fleets: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated layouts to run (default: all): Llama-3.1-8B's and, with "
            "--include-70b, Llama-3.1-70B's of those names (colocated, pd-1:1, adaptive-hybrid)."
        ),
    ] = None,
    cluster: Annotated[
        bool,
        typer.Option(
            help="Run the in-process cases on the cluster simulator: the same figures as "
            "through the control plane over in-process engines, several times faster."
        ),
    ] = False,
) -> None:
    """Colocated vs PD (several P:D ratios, adaptive decider) on long-prompt and chat work."""
    from sage_llm.bench.pd_bench import pd_bench_main

    speed_given = getattr(ctx.get_parameter_source("speed"), "name", None) == "COMMANDLINE"
    if speed_given and not realtime:  # say so, not ignore it
        _fail("--speed: applies to the real-time part only: give --realtime too", code=2)
    try:
        code = pd_bench_main(
            out=out, include_70b=include_70b, realtime=realtime, speed=speed, seed=seed,
            n_long=n_long, long_rate=long_rate, n_chat=n_chat, chat_rate=chat_rate,
            fleet_names=None if fleets is None else _split(fleets), cluster=cluster,
        )  # fmt: skip
    except SageLLMError as exc:
        _fail(_as_option(exc, set(ctx.params)))
    raise typer.Exit(code)


@bench_app.command("proxy")
def bench_proxy(
    peers: Annotated[
        str,
        typer.Option(
            help="Comma-separated peers (Rust routers, python-forwarder).", callback=_proxy_peers
        ),
    ] = "vllm-router,sglang-router,python-forwarder",  # proxy_bench.DEFAULT_PEERS
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("bench-out/proxy"),
    rounds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Interleaved rounds per target (req/s: the median round's; "
            "of an even count, the lower middle one).",
        ),
    ] = 1,
    c1_engine: Annotated[
        str,
        typer.Option(
            help="Engines behind the concurrency-1 runs: instant (answers at once, so the "
            "added latency shows) or sim (the engine-sim of the concurrency-64 runs)."
        ),
    ] = "instant",
    prompt_tokens: Annotated[
        int,
        typer.Option(
            min=0, help="Tokens in every request's prompt (0: the 14-token default prompt)."
        ),
    ] = 0,
    c1_warmup: Annotated[
        int,
        typer.Option(
            min=0, help="Unmeasured requests through a target before each concurrency-1 run."
        ),
    ] = 1000,  # proxy_bench.C1_WARMUP
) -> None:
    """Proxy overhead: sage-llm serve vs the Rust routers (req/s, added latency, TTFT)."""
    from sage_llm.bench.proxy_bench import C1_ENGINES, proxy_bench_main

    if c1_engine not in C1_ENGINES:
        _fail(f"--c1-engine: {c1_engine!r} is not one of {', '.join(C1_ENGINES)}")
    peer_list = _split(peers)
    try:
        code = proxy_bench_main(
            peers=peer_list,
            out=out,
            rounds=rounds,
            c1_engine=c1_engine,
            prompt_tokens=prompt_tokens,
            c1_warmup=c1_warmup,
        )
    except SageLLMError as exc:
        _fail(_as_option(exc, {"peers", "out", "rounds", "c1_engine", "prompt_tokens"}))
    raise typer.Exit(code)


@config_app.command("check")
def config_check(
    file: Annotated[
        Path, typer.Argument(help="The file to check: a config file, a launch file or a plan.")
    ],
    print_config: Annotated[
        bool,
        typer.Option(
            "--print",
            help="Print the resolved configuration (for a launch file or a plan: the engines "
            "sage-llm launch would start, without starting them).",
        ),
    ] = False,
) -> None:
    """Report every problem in a config file, launch file or plan, with file, line and key."""
    from sage_llm import jsonutil
    from sage_llm.config import parse_config
    from sage_llm.config_locate import read_utf8
    from sage_llm.config_schema import INERT_NOTE
    from sage_llm.launch.plan_to_engines import is_plan_text

    if file.suffix.lower() == ".json":
        _check_launch_file(file, print_config)
        return
    try:  # read once: a pipe (<(…), /dev/stdin) can be read only once
        text = read_utf8(file, "config file")
    except ConfigError as exc:
        _fail_problems([exc])
    if is_plan_text(text) or _is_launch_text(text, file):  # a plan without .json: a pipe
        _check_launch_file(file, print_config, text)
        return
    try:
        loaded = parse_config(text, str(file))
    except ConfigError as exc:
        _fail_problems(exc.each())
    # with --print, standard output is the JSON alone (for jq and the like)
    typer.echo(f"{file}: OK", err=print_config)
    if loaded.foreign_services:  # valid for SAGE's VLLMService; not a control plane's file
        typer.echo(
            f"note: no control-plane service table (services: "
            f"{', '.join(loaded.foreign_services)}); sage-llm serve and "
            "ControlPlaneVLLMService refuse this file",
            err=True,
        )
    for key in loaded.inert_settings():
        typer.echo(f"note: {key}: {INERT_NOTE}", err=True)
    if print_config:
        typer.echo(jsonutil.dumps_pretty(loaded.to_dict()))  # inf as 1e999: JSON has no inf


def _is_launch_text(text: str, path: Path) -> bool:
    """Whether TOML ``text`` (of ``path``) has a top-level ``launch`` table."""
    from sage_llm.config_locate import read_toml

    try:
        data = read_toml(text.removeprefix("\ufeff"), str(path))
    except ConfigError:
        return False  # the config check reports it
    return "launch" in data


def _fail_problems(problems: Sequence[SageLLMError]) -> NoReturn:
    """Each problem on a line of its own (standard error), then exit 1."""
    for problem in problems:
        typer.echo(problem.message, err=True)
    raise typer.Exit(1)


def _check_launch_file(path: Path, print_engines: bool, text: str | None = None) -> None:
    """``config check`` of a launch file or plan: what ``sage-llm launch`` checks before it
    starts anything (its ports' being free aside)."""
    from sage_llm.errors import ConfigError
    from sage_llm.launch import engines_from_plan, load_launch_config

    try:
        config = load_launch_config(path, text=text)
        engines = engines_from_plan(config.instances, config.settings)
    except SageLLMError as exc:
        _fail_problems(exc.each() if isinstance(exc, ConfigError) else (exc,))
    node = config.settings.node
    typer.echo(f"{path}: OK ({len(engines)} engine{'s' * (len(engines) != 1)} on node {node})")
    shortfall = config.plan.shortfall() if config.plan is not None else None
    if shortfall is not None:
        typer.echo(f"note: [launch.plan]: {shortfall}", err=True)
    if print_engines:
        for engine in engines:
            typer.echo(f"{engine.instance_id} ({engine.base_url}): {engine.shell()}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SageLLMError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # before a command ran (in one, it exits 130 quietly)
        typer.echo("error: interrupted (SIGINT)", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
