"""Prometheus histograms, gauges and counters cheap enough to update several times per
request.

``prometheus_client.Histogram.observe`` walks the bucket bounds one by one and takes a
lock per bucket and per sum: several microseconds, paid four or five times per request on
the gateway's hot path. :class:`LiteHistogram` keeps plain per-bucket counts (the bucket
found by bisection) and builds the exposition only when ``/metrics`` is read, as a
``prometheus_client`` collector registered in the same registry, so the text is the same
histogram (``_bucket{le=…}`` cumulative, ``_count``, ``_sum``) — less the ``_created``
series, which nothing here reads.

The control plane observes only on its event loop thread, so no lock is taken; a scrape
from another thread could see a count and a sum one observation apart, never a torn value.

:class:`LiteGauge` and :class:`LiteCounter` do the same for gauges and counters
(``prometheus_client`` takes a lock per ``set`` / ``inc``): a plain float per label set,
exposed as the same ``gauge`` / ``counter`` families (a counter's ``_total``, without
``_created``).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString


def _label_key(
    name: str, labelnames: tuple[str, ...], values: tuple[str, ...], named: dict[str, str]
) -> tuple[str, ...]:
    """The label values of a ``labels(*values, **named)`` call, in ``labelnames`` order."""
    if named:
        if values or set(named) != set(labelnames):
            raise ValueError(f"{name}: label names must be {labelnames}")
        values = tuple(str(named[n]) for n in labelnames)
    elif len(values) != len(labelnames) or not labelnames:
        raise ValueError(f"{name}: expected labels {labelnames}")
    return tuple(str(v) for v in values)


class LiteHistogramChild:
    """The series of one label set."""

    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self._bounds, amount)] += 1
        self.sum += amount

    @property
    def count(self) -> int:
        return sum(self.counts)


class LiteHistogram:
    """A histogram with ``prometheus_client.Histogram``'s ``labels`` / ``observe`` /
    ``remove`` API (the parts the control plane uses)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError("buckets must be distinct numbers")
        if bounds[-1] == math.inf:
            bounds.pop()
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(bounds)
        self._le = [str(floatToGoString(b)) for b in bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        self._children: dict[tuple[str, ...], LiteHistogramChild] = {}
        if not self.labelnames:
            self._children[()] = LiteHistogramChild(self._bounds)
        registry.register(self)

    def labels(self, *values: str, **named: str) -> LiteHistogramChild:
        key = _label_key(self.name, self.labelnames, values, named)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = LiteHistogramChild(self._bounds)
        return child

    def observe(self, amount: float) -> None:
        """Observe on the unlabelled histogram."""
        self.unlabelled.observe(amount)

    @property
    def unlabelled(self) -> LiteHistogramChild:
        """The series of a histogram without labels."""
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use labels()")
        return self._children[()]

    def remove(self, *values: str) -> None:
        del self._children[tuple(str(v) for v in values)]

    # --- prometheus_client collector ------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self._children.items()):
            running = 0
            buckets: list[tuple[str, float]] = []
            for le, n in zip(self._le, list(child.counts), strict=True):
                running += n
                buckets.append((le, float(running)))
            family.add_metric(list(key), buckets, child.sum)
        yield family


class LiteValue:
    """The value of one label set of a :class:`LiteGauge` or :class:`LiteCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class _LiteValues:
    """What the lite gauge and counter share: label sets, registration, collection."""

    family: Callable[..., GaugeMetricFamily | CounterMetricFamily]

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], LiteValue] = {}
        if not self.labelnames:
            self._children[()] = LiteValue()
        registry.register(self)

    def labels(self, *values: str, **named: str) -> LiteValue:
        key = _label_key(self.name, self.labelnames, values, named)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = LiteValue()
        return child

    def _unlabelled(self) -> LiteValue:
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use labels()")
        return self._children[()]

    def inc(self, amount: float = 1.0) -> None:
        """Add to the unlabelled value."""
        self._unlabelled().inc(amount)

    def remove(self, *values: str) -> None:
        del self._children[tuple(str(v) for v in values)]

    @property
    def value(self) -> float:
        """The unlabelled value."""
        return self._unlabelled().value

    # --- prometheus_client collector ------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        yield self.family(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self.family(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self._children.items()):
            family.add_metric(list(key), child.value)
        yield family


class LiteGauge(_LiteValues):
    """A gauge with ``prometheus_client.Gauge``'s ``labels`` / ``set`` / ``inc`` / ``dec`` /
    ``remove`` API (the parts the control plane uses)."""

    family = GaugeMetricFamily

    def set(self, value: float) -> None:
        """Set the unlabelled value."""
        self._unlabelled().set(value)

    def dec(self, amount: float = 1.0) -> None:
        """Subtract from the unlabelled value."""
        self._unlabelled().dec(amount)


class PeakGauge(LiteGauge):
    """An unlabelled :class:`LiteGauge` that also keeps the highest value it was set to."""

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry) -> None:
        super().__init__(name, documentation, registry=registry)
        self.peak = 0.0

    def set(self, value: float) -> None:
        if value > self.peak:
            self.peak = value
        self._unlabelled().set(value)


class LiteCounter(_LiteValues):
    """A counter with ``prometheus_client.Counter``'s ``labels`` / ``inc`` / ``remove`` API;
    ``name`` is without ``_total``, which the exposition adds."""

    family = CounterMetricFamily
