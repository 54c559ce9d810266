"""LiteHistogram exposes exactly what prometheus_client's Histogram does (less _created)."""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sage_llm.control_plane.metrics import LATENCY_BUCKETS
from sage_llm.control_plane.promlite import LiteHistogram


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


def test_bad_labels_are_refused() -> None:
    h = LiteHistogram("z", "doc", ["model"], buckets=(1.0,), registry=CollectorRegistry())
    with pytest.raises(ValueError, match="label names"):
        h.labels(modle="a")
    with pytest.raises(ValueError, match="use labels"):
        h.observe(1.0)
    with pytest.raises(ValueError, match="distinct"):
        LiteHistogram("w", "doc", buckets=(1.0, 1.0), registry=CollectorRegistry())
