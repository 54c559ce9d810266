"""Argument checks the benchmark scripts share (``benchmarks/*.py``): argparse types that
refuse a value before the run instead of failing inside it, and an early check that the
report can be written (a bad ``--out`` failed only after the whole run, its results lost).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

from sage_llm.bench.report import check_out_file
from sage_llm.errors import ConfigError


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def above(low: float) -> Callable[[str], float]:
    """An argparse type: a finite number > ``low``."""
    return _number(low, strict=True)


def at_least_number(low: float) -> Callable[[str], float]:
    """An argparse type: a finite number >= ``low``."""
    return _number(low, strict=False)


def _number(low: float, *, strict: bool) -> Callable[[str], float]:
    bound = f"{'>' if strict else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be a finite number {bound}, got {text}")
        return value

    return parse


def check_out(parser: argparse.ArgumentParser, option: str, path: str | Path | None) -> None:
    """Exit with ``parser``'s usage error unless a report can be written at ``path`` (tried
    now: see :func:`~sage_llm.bench.report.check_out_file`); nothing for None."""
    if path is None:
        return
    try:
        check_out_file(Path(path))
    except ConfigError as exc:
        parser.error(f"{option}: {exc.detail}")


def open_loop_args(
    parser: argparse.ArgumentParser, *, engines: int, rate: float, requests: int
) -> None:
    """``--engines``, ``--rate`` (requests a second), ``--requests`` and ``--seed`` of a
    benchmark that runs a seeded open-loop workload on a simulated fleet, with these
    defaults."""
    parser.add_argument("--engines", type=at_least(1), default=engines)
    parser.add_argument("--rate", type=above(0.0), default=rate, help="requests a second")
    parser.add_argument("--requests", type=at_least(1), default=requests)
    parser.add_argument("--seed", type=at_least(0), default=0)
