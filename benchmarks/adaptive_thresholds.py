"""The ``adaptive`` policy against the policies it switches among, on virtual time.

``adaptive`` is the default scheduling policy. It earns that only if, when requests
queue, it ends up doing about as well as the best fixed policy for the traffic, and
when nothing queues it costs nothing. This script runs the same seeded workloads through
``fifo``, ``priority``, ``slo_aware`` and ``adaptive`` (with its defaults, and with any
other thresholds given by ``--old``), each on a fresh in-process simulated fleet, and
prints goodput at the demo's SLO (TTFT <= 1 s, TPOT <= 50 ms), TTFT percentiles, SLO
attainment of the CRITICAL and HIGH requests, and the switches ``adaptive`` made.

The workloads:

* ``demo``: ``make demo``'s part 2 (120 four-turn sessions with per-priority end-to-end
  deadlines, 4 simulated L40S with 16 slots each), at ``--rate`` 9 (about 1.2x what the
  fleet serves), for seeds 0 and 1, and at rates 6 and 3 (lighter);
* ``overload``: ``sage-llm bench compare --overload``'s workload (deadlines on CRITICAL
  and HIGH only, 10% of the requests) at twice the calibrated capacity of 2 simulated
  H100s with 16 slots each, for 20 s.

Everything runs on virtual time, so the figures are exact and repeatable. Run from the
repository root (about a minute)::

    .venv/bin/python benchmarks/adaptive_thresholds.py
    .venv/bin/python benchmarks/adaptive_thresholds.py --old light_load=.5,overload=1,min_dwell_s=10
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from sage_llm.bench.compare import calibrate_capacity, overload_workload
from sage_llm.bench.demo import DEMO_SLO, demo_fleet, demo_workload
from sage_llm.bench.inprocess import Preset, run_preset
from sage_llm.bench.workloads import Workload
from sage_llm.control_plane.scheduling.registry import build_policy
from sage_llm.errors import SageLLMError
from sage_llm.types import ExecutionInstance, RequestPriority

Fleet = Callable[[], Sequence[ExecutionInstance]]


def cases() -> list[tuple[str, Workload, Fleet, str]]:
    """(name, workload, fleet, routing strategy) of every workload the script runs."""
    found: list[tuple[str, Workload, Fleet, str]] = [
        ("demo, rate 9, seed 0", demo_workload(120, 9.0, 0), demo_fleet, "locality"),
        ("demo, rate 9, seed 1", demo_workload(120, 9.0, 1), demo_fleet, "locality"),
        ("demo, rate 6", demo_workload(120, 6.0, 0), demo_fleet, "locality"),
        ("demo, rate 3", demo_workload(120, 3.0, 0), demo_fleet, "locality"),
    ]
    probe = overload_workload(1.0, 400, 0)
    capacity = calibrate_capacity(probe, engines=2, max_concurrent=16, seed=0)

    def h100s() -> list[ExecutionInstance]:
        return demo_fleet(2, gpu="h100", max_concurrent=16)

    found.append(("overload 2x", overload_workload(2 * capacity, 20.0, 0), h100s, "load_balanced"))
    return found


def parse_params(text: str) -> dict[str, float]:
    """``key=value,key=value`` as adaptive's parameters (numbers)."""
    params: dict[str, float] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"expected key=value, got {item!r}")
        try:
            params[key.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{key.strip()}: expected a number, got {value!r}") from None
    if not params:  # the "old thresholds" row would run today's
        raise ValueError("expected key=value,… with one parameter at least")
    return params


def contenders(old: dict[str, float] | None) -> list[tuple[str, str, dict[str, float]]]:
    """(label, policy, policy params) of every contender."""
    found: list[tuple[str, str, dict[str, float]]] = [
        ("fifo", "fifo", {}),
        ("priority", "priority", {}),
        ("slo_aware", "slo_aware", {}),
        ("adaptive", "adaptive", {}),
    ]
    if old is not None:
        found.append(("adaptive (--old)", "adaptive", old))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--old", default=None, help="also run adaptive with these params (key=value,…)"
    )
    args = parser.parse_args(argv)
    try:
        old = None if args.old is None else parse_params(args.old)
        if old is not None:
            build_policy("adaptive", old)  # its keys and values, before any run
    except (ValueError, SageLLMError) as exc:
        parser.error(f"--old: {exc}")
    print(
        f"{'workload':<22}{'policy':<18}{'goodput':>8}{'TTFT p50':>9}{'p99':>7}"
        f"{'CRIT':>6}{'HIGH':>6}  switches"
    )
    for name, workload, fleet, routing in cases():
        for label, policy, params in contenders(old):
            preset = Preset(label, policy, routing, policy_params=params)
            result = run_preset(preset, workload, fleet, slo=DEMO_SLO, seed=0)
            s = result.summary
            by = s.slo_attainment_by_priority
            assert s.ttft is not None  # every request of these workloads completes
            switches = ""
            if policy == "adaptive":
                history = result.policy_state["state"]["history"]
                switches = ", ".join(f"{h['to']} at {h['at']:.0f} s" for h in history) or "-"
            print(
                f"{name:<22}{label:<18}{s.goodput:>8.2f}{s.ttft.p50:>9.2f}{s.ttft.p99:>7.2f}"
                f"{by.get(RequestPriority.CRITICAL, 0.0):>6.0%}"
                f"{by.get(RequestPriority.HIGH, 0.0):>6.0%}  {switches}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
