"""The ``sage-llm`` command line.

sage-llm serve [--config cluster.toml] [--host H] [--port P]
sage-llm demo
sage-llm engine-sim --model llama-3-8b --gpu h100 --port 8001 [--speed K]
sage-llm topo [--file topo.txt]
sage-llm config check FILE
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from sage_llm.errors import SageLLMError

app = typer.Typer(
    name="sage-llm",
    help="sageLLM control plane: schedule, route and disaggregate LLM requests over a fleet.",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Work with configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def serve(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Cluster TOML (seed format).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address (overrides the file).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (overrides the file).")] = None,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the OpenAI-compatible gateway over the configured fleet.

    Without --config it starts the embedded default: a small fleet of simulated engines.
    """
    _setup_logging(log_level)
    from sage_llm.config import SageConfig, load_config
    from sage_llm.control_plane.builder import build_manager, uses_embedded_fleet
    from sage_llm.gateway.server import run_gateway

    log = logging.getLogger("sage_llm.serve")
    try:
        cfg = load_config(config) if config is not None else SageConfig.default()
    except SageLLMError as exc:
        _fail(exc.message)
    if uses_embedded_fleet(cfg):
        sim = cfg.simulation
        log.info(
            "no instances configured%s: starting the embedded default fleet of %d simulated "
            "%s engines serving %s",
            "" if config is None else f" in {config}",
            sim.instances,
            sim.gpu,
            sim.model,
        )
    else:
        log.info("config %s: %d instances", config, len(cfg.control_plane.instances))

    async def main() -> None:
        manager = build_manager(cfg)
        await run_gateway(manager, cfg.gateway, host=host, port=port)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@app.command()
def demo(
    sessions: Annotated[int, typer.Option(help="Multi-turn sessions in the workload.")] = 120,
    rate: Annotated[float, typer.Option(help="New sessions per second.")] = 9.0,
    seed: Annotated[int, typer.Option(help="Workload seed.")] = 0,
) -> None:
    """Run a short workload through a simulated fleet under several presets, side by side."""
    from sage_llm.bench.demo import run_demo

    try:
        run_demo(sessions=sessions, rate=rate, seed=seed)
    except SageLLMError as exc:
        _fail(exc.message)


@app.command("engine-sim")
def engine_sim(
    model: Annotated[str, typer.Option(help="Simulated model (e.g. llama-3-8b).")] = "llama-3-8b",
    gpu: Annotated[str, typer.Option(help="Simulated GPU (h100, h200, a100, l40s, cpu).")] = "h100",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8001,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    speed: Annotated[float, typer.Option(help="Time scale: 2.0 runs twice as fast.")] = 1.0,
    tp: Annotated[int, typer.Option(help="Tensor-parallel size.")] = 1,
    role: Annotated[str, typer.Option(help="general, prefill or decode.")] = "general",
    served_model_name: Annotated[
        str | None, typer.Option(help="Model name clients use (default: --model).")
    ] = None,
    max_num_seqs: Annotated[int, typer.Option(help="Engine batch bound.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of generated text.")] = 0,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Serve one simulated engine over vLLM's HTTP API (completions, chat, metrics, PD)."""
    _setup_logging(log_level)
    from sage_llm.sim.engine import SimEngine, SimEngineConfig
    from sage_llm.sim.server import serve_engine
    from sage_llm.types import ExecutionInstanceType

    try:
        config = SimEngineConfig(
            model=model,
            gpu=gpu,
            tp=tp,
            role=ExecutionInstanceType.parse(role),
            speed=speed,
            seed=seed,
            max_num_seqs=max_num_seqs,
            kv_host=host,
            kv_port=port,
        )
        engine = SimEngine(f"sim-{port}", config)
    except (SageLLMError, ValueError) as exc:
        _fail(str(exc))
    name = served_model_name or model
    typer.echo(f"sage-llm engine-sim: {model} on {gpu} (tp={tp}, role={role}) at {host}:{port}")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_engine(engine, model_name=name, host=host, port=port))


@app.command()
def topo(
    file: Annotated[
        Path | None, typer.Option(help="Parse this saved `nvidia-smi topo -m` output.")
    ] = None,
) -> None:
    """Show this machine's GPU topology (NVLink domains, NUMA nodes, PCIe distances)."""
    from sage_llm.control_plane.topology import detect_topology, parse_nvidia_smi_topo

    if file is not None:
        try:
            topology = parse_nvidia_smi_topo(file.read_text())
        except (OSError, SageLLMError) as exc:
            _fail(f"{file}: {exc}")
        typer.echo(topology.describe())
        return
    detected = detect_topology()
    if detected.message:
        typer.echo(detected.message)
    typer.echo(detected.topology.describe())


@config_app.command("check")
def config_check(
    file: Annotated[Path, typer.Argument(help="The TOML file to check.")],
    print_config: Annotated[
        bool, typer.Option("--print", help="Print the resolved configuration.")
    ] = False,
) -> None:
    """Report every problem in a config file, with file, line and key."""
    import json

    from sage_llm.config import check_config, load_config

    problems = check_config(file)
    for problem in problems:
        typer.echo(problem.message, err=True)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{file}: OK")
    if print_config:
        typer.echo(json.dumps(load_config(file).to_dict(), indent=2, default=str))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except SageLLMError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
