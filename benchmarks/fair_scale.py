"""What a scheduling decision costs the ``fair`` policy as the users waiting grow.

``fair`` starts the head of the waiting user with the lowest counter. It keeps, per
model, a heap of its lanes' heads (one lane per user and priority level) in that order,
so a start costs O(log n) whatever the number of users waiting; ``fifo`` beside it is
the floor (one lane). Each run queues ``--requests`` requests spread over N users (one
model, four instances with room, nothing excluded), then times ``--pops`` starts. The
same queue goes through each policy in one process, side by side. ``--blocked`` puts first
in the queue a request that may run only on a fifth instance, which is full (a retry kept
off where it failed, a LoRA adapter's request): it never starts, and every start looks
past it::

    .venv/bin/python benchmarks/fair_scale.py
    .venv/bin/python benchmarks/fair_scale.py --blocked
    .venv/bin/python benchmarks/fair_scale.py --users 10,1000,10000 --requests 50000

Prints microseconds a start and the ratio to ``fifo``'s (timings move with the machine's
load; the ratio less).
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence

from sage_llm.bench.cli_args import at_least
from sage_llm.control_plane.scheduling.base import SchedulingPolicy
from sage_llm.control_plane.scheduling.fair import FairSharePolicy
from sage_llm.control_plane.scheduling.fifo import FIFOPolicy
from sage_llm.control_plane.snapshot import ClusterSnapshot, InstanceView, RequestInfo

MODEL = "llama-3-8b"
POLICIES: dict[str, Callable[[], SchedulingPolicy]] = {
    "fifo": FIFOPolicy,
    "fair": FairSharePolicy,
}


def requests(n: int, users: int, seed: int, blocked: bool = False) -> list[RequestInfo]:
    rng = random.Random(seed)
    first = [
        RequestInfo(
            request_id="blocked",
            model=MODEL,
            arrival=-1.0,
            prompt_tokens=100,
            max_tokens=16,
            user_id="blocked-user",
            excluded_instances=frozenset(f"i{k}" for k in range(4)),
        )
    ]
    return (first if blocked else []) + [
        RequestInfo(
            request_id=f"r{i}",
            model=MODEL,
            arrival=i * 1e-4,
            prompt_tokens=rng.randrange(50, 2_000),
            max_tokens=rng.randrange(16, 512),
            user_id=f"user-{rng.randrange(users)}",
        )
        for i in range(n)
    ]


def time_pops(policy: SchedulingPolicy, queued: Sequence[RequestInfo], pops: int) -> float:
    """Microseconds a start of ``policy`` over ``queued`` (its ``pops`` first starts)."""
    for req in queued:
        policy.push(req)
    snap = ClusterSnapshot(
        now=1.0,
        instances=(
            *(
                InstanceView(instance_id=f"i{k}", model=MODEL, max_concurrency=1 << 20)
                for k in range(4)
            ),
            InstanceView(instance_id="full", model=MODEL, max_concurrency=1, in_flight=1),
        ),
    )
    started = 0
    begin = time.perf_counter()
    while started < pops and policy.pop(snap) is not None:
        started += 1
    return (time.perf_counter() - begin) / max(started, 1) * 1e6


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", default="10,100,1000,5000", help="comma-separated counts")
    parser.add_argument("--requests", type=at_least(1), default=20_000)
    parser.add_argument("--pops", type=at_least(1), default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--blocked", action="store_true", help="first, a request no instance with room may run"
    )
    args = parser.parse_args(argv)
    try:
        counts = [int(u) for u in args.users.split(",")]
    except ValueError:
        parser.error(f"--users: comma-separated whole numbers, got {args.users!r}")
    if any(u < 1 for u in counts):
        parser.error(f"--users: each count must be >= 1, got {args.users!r}")
    rows: list[dict[str, float]] = []
    blocked = ", one that cannot start first" if args.blocked else ""
    print(
        f"{args.requests} requests queued{blocked}, {args.pops} starts timed; microseconds a start"
    )
    print("| users | " + " | ".join(POLICIES) + " | fair / fifo |")
    print("|---:|" + "---:|" * (len(POLICIES) + 1))
    for users in counts:
        queued = requests(args.requests, users, args.seed, args.blocked)
        row = {"users": float(users)}
        for name, make in POLICIES.items():
            row[name] = time_pops(make(), queued, args.pops)
        rows.append(row)
        cells = " | ".join(f"{row[name]:.1f}" for name in POLICIES)
        print(f"| {users:,} | {cells} | {row['fair'] / row['fifo']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
