"""What a LoRA adapter costs a request on vLLM's CPU build, measured side by side.

The simulator charges a step whose batch holds an adapter's request ``lora_step_s`` and
``lora_token_s`` per token (1.25 ms and 1.5 µs for Llama-3-8B, measured on an H200:
docs/benchmarks.md, "GPU steps"; scaled by the model's layers) and an adapter brought
into a slot ``lora_swap_s`` (3 ms). This script measures the same two costs on the engine
this machine can run: one vLLM CPU engine
(``make test-real`` installs it) with the tiny model, ``--enable-lora --max-loras 1`` and
two rank-8 adapters of random weights (made here), one request at a time, in rounds that
alternate:

* ``model``: requests for the model itself;
* ``one adapter``: requests for ``sql`` only (it stays in the one slot);
* ``two adapters``: ``sql`` and ``chat`` in turn (each request swaps its adapter in);

each with 64 output tokens and with 1 (``ignore_eos``, temperature 0). It prints the median
latency of each and the ratios. CPU figures say what the CPU build costs, not a GPU's. Run
from the repository root (about two minutes, most of it the engine's start)::

    .venv/bin/python benchmarks/lora_cost_cpu.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from sage_llm import ControlPlaneManager
from sage_llm.bench.cli_args import at_least
from sage_llm.bench.fidelity import EngineShape
from sage_llm.bench.fidelity_real import (
    make_lora_adapters,
    real_vllm_missing,
    real_vllm_paths,
    vllm_cpu_engines,
    vllm_cpu_settings,
)
from sage_llm.launch import launch_engines

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hello there my friend"
SEQUENCES = {
    "model": ["tiny"],
    "one adapter": ["sql"],
    "two adapters": ["sql", "chat"],
}
"""The models a round asks for, in turn."""


async def measure(rounds: int, requests: int, port: int) -> dict[tuple[str, int], list[float]]:
    """Seconds of each request, by (sequence, output tokens)."""
    python, model_dir = real_vllm_paths(ROOT)
    with tempfile.TemporaryDirectory(prefix="sage-lora-") as tmp:
        adapters = Path(tmp) / "loras"
        await make_lora_adapters(python, model_dir, adapters, ("sql", "chat"), rank=8)
        settings = vllm_cpu_settings(
            python, model_dir, base_port=port, log_dir=Path(tmp) / "logs",
            shape=EngineShape(max_num_seqs=8, max_num_batched_tokens=2048),
            extra_args=("--enable-lora", "--max-lora-rank", "8", "--max-loras", "1",
                        "--max-cpu-loras", "2", "--lora-modules",
                        f"sql={adapters / 'sql'}", f"chat={adapters / 'chat'}"),
        )  # fmt: skip
        (engine,) = vllm_cpu_engines(settings, 1)
        manager = ControlPlaneManager(scheduling_policy="fifo", enable_pd_separation=False)
        async with manager:
            fleet = await launch_engines([engine], manager=manager, settings=settings)
            async with fleet, aiohttp.ClientSession() as http:
                inst = fleet.instances[0]
                url = f"http://{inst.host}:{inst.port}/v1/completions"

                async def one(model: str, tokens: int) -> float:
                    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens,
                            "temperature": 0, "ignore_eos": True}  # fmt: skip
                    started = time.perf_counter()
                    async with http.post(url, json=body) as resp:
                        text = await resp.text()
                        if resp.status != 200:
                            raise RuntimeError(f"{model}: {resp.status} {text}")
                    return time.perf_counter() - started

                for model in ("tiny", "sql", "chat", "tiny"):  # warm-up
                    await one(model, 8)
                times: dict[tuple[str, int], list[float]] = {}
                for _ in range(rounds):
                    for tokens in (64, 1):
                        for label, models in SEQUENCES.items():
                            cell = times.setdefault((label, tokens), [])
                            for k in range(requests):
                                cell.append(await one(models[k % len(models)], tokens))
                return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--requests", type=at_least(2), default=10, help="a sequence's, a round")
    parser.add_argument("--port", type=at_least(1), default=18431)
    args = parser.parse_args(argv)
    python, model_dir = real_vllm_paths(ROOT)
    missing = real_vllm_missing(python, model_dir)
    if missing is not None:
        parser.error(missing)
    times = asyncio.run(measure(args.rounds, args.requests, args.port))
    print("| output tokens | model | one adapter | two adapters, in turn |")
    print("|---:|---:|---:|---:|")
    for tokens in (64, 1):
        ms = {label: statistics.median(times[(label, tokens)]) * 1000 for label in SEQUENCES}
        base, one, two = ms["model"], ms["one adapter"], ms["two adapters"]
        print(
            f"| {tokens} | {base:.1f} ms | {one:.1f} ms ({one / base:.2f}×) "
            f"| {two:.1f} ms ({two - one:+.1f} ms) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
