"""The lite histogram, gauge and counter expose exactly what prometheus_client's do (less
_created)."""

from __future__ import annotations

import math
import random

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sage_llm.control_plane.metrics import LATENCY_BUCKETS
from sage_llm.control_plane.promlite import LiteCounter, LiteGauge, LiteHistogram, PeakGauge


def _samples(registry: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_exposition_matches_prometheus_client() -> None:
    rng = random.Random(7)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    lite = LiteHistogram("x_seconds", "doc", ["model"], buckets=LATENCY_BUCKETS, registry=ours)
    ref = Histogram("x_seconds", "doc", ["model"], buckets=LATENCY_BUCKETS, registry=theirs)
    plain = LiteHistogram("y_seconds", "doc", buckets=(0.1, 1.0), registry=ours)
    plain_ref = Histogram("y_seconds", "doc", buckets=(0.1, 1.0), registry=theirs)
    values = [rng.expovariate(2.0) for _ in range(500)] + list(LATENCY_BUCKETS) + [0.0, 500.0]
    for v in values:
        model = rng.choice(["a", "b"])
        lite.labels(model=model).observe(v)
        ref.labels(model=model).observe(v)
        plain.observe(v)
        plain_ref.observe(v)
    assert _samples(ours) == _samples(theirs)
    lite.remove("a")
    ref.remove("a")
    assert _samples(ours) == _samples(theirs)


def test_buckets_ending_in_infinity_give_one_inf_bucket() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    lite = LiteHistogram("h", "doc", buckets=(1.0, math.inf), registry=ours)
    ref = Histogram("h", "doc", buckets=(1.0, math.inf), registry=theirs)
    for v in (0.5, 3.0):
        lite.observe(v)
        ref.observe(v)
    lines = generate_latest(ours).decode().splitlines()
    assert [line for line in lines if 'le="+Inf"' in line] == ['h_bucket{le="+Inf"} 2.0']
    assert _samples(ours) == _samples(theirs)


def test_bad_labels_are_refused() -> None:
    h = LiteHistogram("z", "doc", ["model"], buckets=(1.0,), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="label names"):
        h.labels(modle="a")
    with pytest.raises(ValueError, match="use labels"):
        h.observe(1.0)
    with pytest.raises(ValueError, match="distinct"):
        LiteHistogram("w", "doc", buckets=(1.0, 1.0), registry=CollectorRegistry())


def test_gauges_and_counters_match_prometheus_client() -> None:
    rng = random.Random(3)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    gauge = LiteGauge("depth", "doc", registry=ours)
    gauge_ref = Gauge("depth", "doc", registry=theirs)
    per = LiteGauge("in_flight", "doc", ["instance"], registry=ours)
    per_ref = Gauge("in_flight", "doc", ["instance"], registry=theirs)
    count = LiteCounter("requests", "doc", ["status", "instance"], registry=ours)
    count_ref = Counter("requests", "doc", ["status", "instance"], registry=theirs)
    plain = LiteCounter("retries", "doc", registry=ours)
    plain_ref = Counter("retries", "doc", registry=theirs)
    for _ in range(300):
        inst = rng.choice(["e0", "e1", "e2"])
        n = rng.randrange(5)
        gauge.set(n)
        gauge_ref.set(n)
        if rng.random() < 0.5:
            per.labels(instance=inst).inc()
            per_ref.labels(instance=inst).inc()
        else:
            per.labels(inst).dec(2)
            per_ref.labels(inst).dec(2)
        status = rng.choice(["completed", "failed"])
        count.labels(status=status, instance=inst).inc()
        count_ref.labels(status=status, instance=inst).inc()
        plain.inc(0.5)
        plain_ref.inc(0.5)
    gauge.dec()
    gauge_ref.dec()
    assert _samples(ours) == _samples(theirs)
    assert gauge.value == gauge_ref._value.get()
    per.remove("e1")
    per_ref.remove("e1")
    count.remove("failed", "e0")
    count_ref.remove("failed", "e0")
    assert _samples(ours) == _samples(theirs)
    with pytest.raises(KeyError):
        per.remove("e1")


def test_lite_gauge_labels_are_checked() -> None:
    per = LiteGauge("g", "doc", ["instance"], registry=CollectorRegistry())
    with pytest.raises(ValueError, match="labels"):
        per.set(1.0)
    with pytest.raises(ValueError, match="label names"):
        per.labels(model="x")
    with pytest.raises(ValueError, match="expected labels"):
        per.labels("a", "b")


def test_a_peak_gauge_keeps_its_peak() -> None:
    gauge = PeakGauge("q", "queue", registry=CollectorRegistry())
    for value in (5, 2, 7, 0):
        gauge.set(value)
    assert (gauge.peak, gauge.value) == (7, 0)


def test_a_histogram_sum_includes_a_negative_observation() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    lite = LiteHistogram("n", "doc", buckets=(1.0,), registry=ours)
    ref = Histogram("n", "doc", buckets=(1.0,), registry=theirs)
    for v in (-0.5, 2.0):
        lite.observe(v)
        ref.observe(v)
    assert lite.unlabelled.sum == 1.5
    assert _samples(ours) == _samples(theirs)
