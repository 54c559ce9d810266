"""Length distributions for workload generators (prompt and output token counts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np

from sage_llm.errors import ConfigError

# --- length distributions -------------------------------------------------------------


@dataclass(frozen=True)
class Fixed:
    """Every draw is ``value``."""

    value: int

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ConfigError(f"fixed length must be >= 1, got {self.value}", key="length")

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return [self.value] * n


@dataclass(frozen=True)
class Uniform:
    """Integers drawn uniformly from ``[lo, hi]`` (both included)."""

    lo: int
    hi: int

    def __post_init__(self) -> None:
        if not 1 <= self.lo <= self.hi:
            raise ConfigError(
                f"uniform needs 1 <= lo <= hi, got {self.lo}, {self.hi}", key="length"
            )

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return [int(v) for v in rng.integers(self.lo, self.hi + 1, size=n)]


@dataclass(frozen=True)
class LogNormal:
    """Log-normal lengths with the given ``median`` and ``sigma`` (of the log), rounded and
    clipped to ``[lo, hi]`` (clipping piles the tail onto ``hi``; it does not resample)."""

    median: float
    sigma: float
    lo: int = 1
    hi: int | None = None

    def __post_init__(self) -> None:
        if self.median <= 0 or self.sigma < 0 or self.lo < 1:
            raise ConfigError("lognormal needs median > 0, sigma >= 0, lo >= 1", key="length")
        if self.hi is not None and self.hi < self.lo:
            raise ConfigError(f"lognormal hi {self.hi} < lo {self.lo}", key="length")

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        draws = np.rint(rng.lognormal(math.log(self.median), self.sigma, size=n))
        clipped = np.clip(draws, self.lo, self.hi if self.hi is not None else np.inf)
        return [int(v) for v in clipped]


@dataclass(frozen=True)
class Empirical:
    """Draws, with replacement and equal weight, from observed ``values``."""

    values: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", tuple(int(v) for v in self.values))
        if not self.values or min(self.values) < 1:
            raise ConfigError("empirical needs a non-empty list of lengths >= 1", key="length")

    def sample(self, rng: np.random.Generator, n: int) -> list[int]:
        return [self.values[int(i)] for i in rng.integers(0, len(self.values), size=n)]


LengthDist: TypeAlias = Fixed | Uniform | LogNormal | Empirical
LengthSpec: TypeAlias = LengthDist | int | Sequence[int] | str


def as_length_dist(spec: LengthSpec) -> LengthDist:
    """A length distribution from a dist, an int (fixed), a list (empirical) or a string:
    ``"fixed:128"``, ``"uniform:32,512"``, ``"lognormal:250,1.0[,lo[,hi]]"``,
    ``"empirical:10,20,30"``."""
    if isinstance(spec, Fixed | Uniform | LogNormal | Empirical):
        return spec
    if isinstance(spec, bool):
        raise ConfigError(f"invalid length distribution {spec!r}", key="length")
    if isinstance(spec, int):
        return Fixed(spec)
    if not isinstance(spec, str):
        return Empirical(tuple(spec))
    kind, _, args = spec.partition(":")
    try:
        nums = [float(a) for a in args.split(",")] if args.strip() else []
        kind = kind.strip().lower()
        if kind == "fixed" and len(nums) == 1:
            return Fixed(int(nums[0]))
        if kind == "uniform" and len(nums) == 2:
            return Uniform(int(nums[0]), int(nums[1]))
        if kind == "lognormal" and 2 <= len(nums) <= 4:
            bounds = [int(v) for v in nums[2:]]
            return LogNormal(nums[0], nums[1], *bounds)
        if kind == "empirical" and nums:
            return Empirical(tuple(int(v) for v in nums))
    except ValueError:
        pass
    raise ConfigError(
        f"invalid length distribution {spec!r}; expected fixed:N, uniform:LO,HI, "
        "lognormal:MEDIAN,SIGMA[,LO[,HI]] or empirical:N1,N2,...",
        key="length",
    )
