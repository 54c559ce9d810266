"""The PD pair score's phase isolation weight, swept on the cluster simulator.

The pair orchestrator scores a (prefill, decode) pair partly by *phase isolation*
(``PairingParams.isolation_weight``, default 2): how well each leg's instance keeps to one
phase, so that ``GENERAL``/``HYBRID`` instances settle into a prefill group and a decode
group. This runs the PD benchmark's layouts that have such instances (``adaptive-hybrid``,
8 hybrid; ``adaptive-2:2+4``, 2 prefill + 2 decode + 4 general) at each weight, on the
long-prompt and chat workloads, on the cluster simulator (the control plane's decisions
and figures, request for request; see ``sage_llm.bench.pd_bench``), and prints goodput
under both SLOs. Run::

    .venv/bin/python benchmarks/pd_isolation.py --weights 1,2,3,4,6 \\
        --n-long 1200 --n-chat 3000 --out /tmp/pd_isolation.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from sage_llm.bench.cli_args import check_out
from sage_llm.bench.pd_bench import (
    chat_workload,
    default_fleets,
    long_prompt_workload,
    run_case,
)

FLEETS = ("adaptive-hybrid", "adaptive-2:2+4")


def weights(text: str) -> list[float]:
    """``--weights``: comma-separated finite numbers >= 0."""
    out: list[float] = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {part!r}") from None
        if not 0 <= value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {part!r}")
        out.append(value)
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"a weight is given twice: {text!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=weights, default=weights("1,2,3,4,6"))
    parser.add_argument("--n-long", type=int, default=1200)
    parser.add_argument("--long-rate", type=float, default=12.0)
    parser.add_argument("--n-chat", type=int, default=3000)
    parser.add_argument("--chat-rate", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the cases as JSON here")
    args = parser.parse_args(argv)
    if args.n_long < 0 or args.n_chat < 0 or args.n_long + args.n_chat == 0:
        parser.error("--n-long and --n-chat must be >= 0, one of them > 0")
    if not (args.long_rate > 0 and args.chat_rate > 0):
        parser.error("--long-rate and --chat-rate must be > 0")
    check_out(parser, "--out", args.out)
    workloads = []
    if args.n_long:
        workloads.append(long_prompt_workload(args.n_long, args.long_rate, args.seed))
    if args.n_chat:
        workloads.append(chat_workload(args.n_chat, args.chat_rate, args.seed))
    fleets = [f for f in default_fleets() if f.name in FLEETS]
    cases = []
    print(
        "workload      fleet            weight  goodput  good-tpot  ttft50  ttft99  disaggregated"
    )
    for workload in workloads:
        for fleet in fleets:
            for weight in args.weights:
                spec = replace(fleet, pairing_params=(("isolation_weight", weight),))
                case = run_case(spec, workload, seed=args.seed, cluster=True).to_dict()
                cases.append(case)
                pd = case["pd"]
                print(
                    f"{workload.name:<13} {fleet.name:<16} {weight:>6g}  "
                    f"{case['goodput_rps']:7.2f}  {case['goodput_tpot_rps']:9.2f}  "
                    f"{case['ttft_p50_s'] * 1000:6.0f}  {case['ttft_p99_s'] * 1000:6.0f}  "
                    f"{pd.get('disaggregated_requests', 0):>5} of {case['requests']}"
                )
                sys.stdout.flush()
    if args.out is not None:
        args.out.write_text(json.dumps({"benchmark": "pd_isolation", "cases": cases}, indent=2))
        print(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
