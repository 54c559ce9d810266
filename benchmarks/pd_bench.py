"""PD benchmark: colocated vs prefill/decode disaggregation on a simulated 8-GPU node.

Runs :func:`sage_llm.bench.pd_bench.pd_bench_main` (what ``sage-llm bench pd`` runs):
the in-process comparison on virtual time, and with ``--realtime`` sage-llm's PD gateway
against vllm-router's PD mode over the same engine-sim processes (the same sizes and rates,
on the pd-P:D layouts of ``--fleets``, default pd-3:5). The JSON report goes to ``--out``
(default ``bench-out/pd/pd.json``). Run::

    .venv/bin/python benchmarks/pd_bench.py --out reports/pd_bench.json
    .venv/bin/python benchmarks/pd_bench.py --n-long 0 --fleets colocated,adaptive-2:2+4
    .venv/bin/python benchmarks/pd_bench.py --cluster --n-long 1200 --n-chat 3000
    .venv/bin/python benchmarks/pd_bench.py --realtime --speed 2 --out reports/pd_bench.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sage_llm.bench.pd_bench import DEFAULT_OUT, pd_bench_main
from sage_llm.errors import ConfigError, SageLLMError


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"JSON report path (default {DEFAULT_OUT})"
    )
    parser.add_argument("--n-long", type=int, default=120)
    parser.add_argument("--long-rate", type=float, default=12.0)
    parser.add_argument("--n-chat", type=int, default=300)
    parser.add_argument("--chat-rate", type=float, default=20.0)
    parser.add_argument("--no-70b", action="store_true", help="skip the Llama-3-70B TP4 fleets")
    parser.add_argument(
        "--realtime",
        action="store_true",
        help="add the vllm-router comparison (same sizes and rates; the pd-P:D layouts of "
        "--fleets, default pd-3:5)",
    )
    parser.add_argument("--speed", type=float, default=2.0, help="engine-sim time compression")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fleets",
        default=None,
        help="comma-separated layouts to run (default: all): Llama-3.1-8B's and, without "
        "--no-70b, Llama-3.1-70B's of those names (colocated, pd-1:1, adaptive-hybrid)",
    )
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="run the in-process cases on the cluster simulator (the same figures, faster)",
    )
    a = parser.parse_args()
    try:
        return pd_bench_main(
            out=a.out, n_long=a.n_long, long_rate=a.long_rate, n_chat=a.n_chat,
            chat_rate=a.chat_rate, include_70b=not a.no_70b, realtime=a.realtime, speed=a.speed,
            seed=a.seed, cluster=a.cluster,
            fleet_names=None
            if a.fleets is None
            else [f.strip() for f in a.fleets.split(",") if f.strip()],
        )  # fmt: skip
    except ConfigError as exc:  # named by the option given, not by pd_bench_main's parameter
        if exc.key is not None and exc.key in vars(a):
            print(f"error: --{exc.key.replace('_', '-')}: {exc.detail}", file=sys.stderr)
        else:
            print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except SageLLMError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
