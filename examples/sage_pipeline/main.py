"""A SAGE pipeline that asks an LLM fleet questions of mixed priority through sage-llm.

    .venv/bin/python examples/sage_pipeline/main.py                       # simulated fleet
    .venv/bin/python examples/sage_pipeline/main.py --policy fifo         # compare with FIFO
    .venv/bin/python examples/sage_pipeline/main.py --config FILE.toml     # your engines

The pipeline is plain SAGE (isage-kernel): a batch source emits waves of questions, a map
operator sends each wave to the ``llm`` service (a ``ControlPlaneVLLMService``) with
``self.call_service``, and a sink collects the answers. The control plane schedules each
wave's requests by priority over the fleet. At the end the answers and a per-priority
latency table are printed, and the program exits (0 when every question was answered).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import queue
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from sage_llm.config import InstanceConfig, SageConfig, config_from_dict, load_config
from sage_llm.control_plane.scheduling.registry import POLICY_NAMES
from sage_llm.errors import ConfigError
from sage_llm.service import SAGE_AVAILABLE, ControlPlaneVLLMService

QUESTIONS = (
    "What does a control plane decide for an LLM fleet?",
    "Why do prefill and decode have different bottlenecks?",
    "What is continuous batching?",
    "How does a KV cache speed up decoding?",
    "When is prefix caching useful?",
    "What is time to first token?",
    "What is an SLO for an LLM service?",
    "Why route a chat session to the same instance?",
    "What is tensor parallelism?",
    "What does NVLink change for tensor parallelism?",
    "What is goodput?",
    "Why does a long prompt delay other requests?",
    "What is chunked prefill?",
    "How does priority scheduling avoid starving low-priority work?",
    "What is disaggregated serving?",
    "How is KV cache moved between instances?",
    "What is a power-of-two-choices router?",
    "Why measure tokens per second per GPU?",
    "What is inter-token latency?",
    "How does admission control protect latency?",
    "What does vLLM's /metrics endpoint report?",
    "Why do batch jobs run at background priority?",
    "What limits the number of concurrent sequences?",
    "How should a fleet react when an instance fails?",
)
PRIORITY_CYCLE = ("NORMAL", "LOW", "HIGH", "BACKGROUND", "NORMAL", "CRITICAL", "LOW", "HIGH")
PRIORITY_ORDER = ("CRITICAL", "HIGH", "NORMAL", "LOW", "BACKGROUND")
SLO_MS = {"CRITICAL": 2_000.0, "HIGH": 4_000.0}
EMBEDDED_FLEET: dict[str, Any] = {
    "scheduling_policy": "priority",
    "routing_strategy": "load_balanced",
    "enable_pd_separation": False,
    "simulation": {"instances": 2, "max_concurrent_requests": 4, "model": "llama-3-8b"},
}
CALL_TIMEOUT_S = 600.0  # SAGE's call_service waits 10 s by default


def waves(count: int, per_wave: int) -> list[list[dict[str, Any]]]:
    """``count`` waves of ``per_wave`` questions, each with a priority (and an SLO for
    the urgent ones)."""
    out: list[list[dict[str, Any]]] = []
    for w in range(count):
        wave = []
        for i in range(per_wave):
            n = w * per_wave + i
            priority = PRIORITY_CYCLE[n % len(PRIORITY_CYCLE)]
            wave.append(
                {
                    "id": n,
                    "question": QUESTIONS[n % len(QUESTIONS)],
                    "priority": priority,
                    "slo_ms": SLO_MS.get(priority),
                }
            )
        out.append(wave)
    return out


def build_pipeline(
    env: Any, config: SageConfig, questions: list[list[dict[str, Any]]], max_tokens: int
) -> queue.Queue[dict[str, Any]]:
    """source (waves) → AskFleet (call_service "llm") → Collect; returns the sink's queue."""
    # isage-common ships no type information (no py.typed marker): these classes are Any to
    # mypy, so subclassing them needs a narrow ignore[misc].
    from sage.common.core.functions import MapFunction, SinkFunction

    class AskFleet(MapFunction):  # type: ignore[misc]
        """Send one wave as one batch: the control plane schedules it by priority."""

        def execute(self, wave: list[dict[str, Any]]) -> list[dict[str, Any]]:
            inputs = []
            for q in wave:
                options: dict[str, Any] = {"priority": q["priority"]}
                if q["slo_ms"] is not None:
                    options["slo_deadline_ms"] = q["slo_ms"]
                inputs.append({"prompt": q["question"], "options": options})
            payload = {"task": "generate", "inputs": inputs, "options": {"max_tokens": max_tokens}}
            try:
                answers = self.call_service("llm", payload, timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # SAGE raises a RuntimeError carrying the service's error
                return [{**q, "error": str(exc)} for q in wave]
            rows = []
            for q, entry in zip(wave, answers, strict=True):
                info = entry["sage"]
                rows.append(
                    {
                        **q,
                        "answer": entry["generations"][0]["text"].strip(),
                        "latency_ms": info["e2e_latency_ms"],
                        "queue_ms": info["queue_wait_ms"],
                        "instance": info["instance_id"],
                        "slo_met": info["slo_met"],
                    }
                )
            return rows

    class Collect(SinkFunction):  # type: ignore[misc]
        def __init__(self, out: queue.Queue[dict[str, Any]], **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.out = out

        def execute(self, rows: list[dict[str, Any]]) -> None:
            for row in rows:
                self.out.put(row)

    results: queue.Queue[dict[str, Any]] = queue.Queue()
    env.register_service("llm", ControlPlaneVLLMService, config)
    env.from_batch(questions).map(AskFleet).sink(Collect, results)
    return results


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(rows: list[dict[str, Any]], elapsed_s: float) -> str:
    """The answers, then latency by priority."""
    lines = ["", "Answers", "-------"]
    for row in sorted(rows, key=lambda r: r["id"]):
        text = row.get("answer") or f"ERROR: {row.get('error')}"
        lines.append(
            f"{row['id']:>3} [{row['priority']:<10}] {row['question'][:50]:<50} -> {text[:48]}"
        )
    lines += [
        "",
        "Latency by priority (ms, end to end, as measured by the control plane)",
        f"{'priority':<11}{'n':>4}{'mean':>9}{'p50':>9}{'p95':>9}{'max':>9}{'queue':>9}  SLO met",
    ]
    done = [r for r in rows if "latency_ms" in r]
    for priority in PRIORITY_ORDER:
        group = [r for r in done if r["priority"] == priority]
        if not group:
            continue
        lat = [r["latency_ms"] for r in group]
        slo = [r["slo_met"] for r in group if r["slo_met"] is not None]
        met = f"{sum(slo)}/{len(slo)}" if slo else "-"
        queue_ms = statistics.fmean(r["queue_ms"] for r in group)
        lines.append(
            f"{priority:<11}{len(group):>4}{statistics.fmean(lat):>9.0f}"
            f"{percentile(lat, 0.5):>9.0f}{percentile(lat, 0.95):>9.0f}{max(lat):>9.0f}"
            f"{queue_ms:>9.0f}  {met}"
        )
    failed = [r for r in rows if "error" in r]
    lines.append(f"\n{len(done)} answered, {len(failed)} failed, in {elapsed_s:.1f} s of wall time")
    if failed:
        lines.append(f"first error: {failed[0]['error']}")
    return "\n".join(lines)


def load(args: argparse.Namespace) -> SageConfig:
    """The embedded simulated fleet, or the ``--config`` file; ``--policy`` overrides."""
    config = load_config(args.config) if args.config else config_from_dict(EMBEDDED_FLEET)
    config.check_has_control_plane()  # a file of SAGE's other services only: refused here,
    # before SAGE starts (there the service's ConfigError would leave each call to time out)
    if args.policy:
        cp = dataclasses.replace(config.control_plane, scheduling_policy=args.policy)
        config = dataclasses.replace(config, control_plane=cp)
    return config


def describe(config: SageConfig) -> str:
    cp = config.control_plane
    if cp.instances:
        simulated = cp.mode == "simulated"

        def one(i: InstanceConfig) -> str:
            if simulated or i.engine == "sim":  # the address is nominal: nothing listens
                return f"{i.instance_id}: simulated {i.sim_model} on {i.sim_gpu}"
            return f"{i.instance_id}@{i.host}:{i.port}"

        fleet = ", ".join(one(i) for i in cp.instances)
        where = f"{len(cp.instances)} configured instances ({fleet})"
    else:
        sim = config.simulation
        where = (
            f"embedded fleet of {sim.instances} simulated {sim.model} engines on {sim.gpu}, "
            f"{sim.max_concurrent_requests} concurrent requests each"
        )
    return f"ControlPlaneVLLMService: policy {cp.scheduling_policy}, {where}"


def _at_least_one(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="TOML file of the control plane (engines)")
    parser.add_argument("--policy", choices=POLICY_NAMES, help="override the scheduling policy")
    parser.add_argument("--waves", type=_at_least_one, default=2, help="batches sent (default 2)")
    parser.add_argument("--per-wave", type=_at_least_one, default=24, help="questions per batch")
    parser.add_argument("--max-tokens", type=_at_least_one, default=64, help="tokens per answer")
    parser.add_argument("--verbose", action="store_true", help="show SAGE's own logging")
    args = parser.parse_args(argv)
    if not SAGE_AVAILABLE:
        print(
            "This example needs SAGE (isage-common, isage-kernel): `make install` installs "
            "them; see docs/service.md to install them elsewhere"
        )
        return 2
    try:
        config = load(args)
    except ConfigError as exc:
        print(f"configuration error: {exc}")
        return 2
    print(describe(config))
    print(f"sending {args.waves} waves of {args.per_wave} questions through a SAGE pipeline ...")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImportWarning)  # isage-common 0.2.5 packaging warning
        from sage.common.utils.logging.custom_logger import CustomLogger
        from sage.kernel.api.local_environment import LocalEnvironment
    if not args.verbose:
        CustomLogger.disable_global_console_debug()  # SAGE's switch for its console logs

    started = time.monotonic()
    chatter = io.StringIO()  # SAGE prints progress to stdout; keep it unless --verbose
    with contextlib.redirect_stdout(sys.stdout if args.verbose else chatter):
        env = LocalEnvironment("sage-llm-example")
        results = build_pipeline(env, config, waves(args.waves, args.per_wave), args.max_tokens)
        env.submit(autostop=True)
    elapsed = time.monotonic() - started
    rows: list[dict[str, Any]] = []
    while not results.empty():
        rows.append(results.get_nowait())
    expected = args.waves * args.per_wave
    print(report(rows, elapsed))
    if len(rows) != expected:
        print(f"only {len(rows)} of {expected} questions came back; run with --verbose")
        return 1
    return 0 if all("answer" in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
