"""The queue asks, per queued model, whether any instance could start it now: the same
answer as :func:`serving_models`, without building the whole set."""

from __future__ import annotations

import random

from sage_llm.control_plane.scheduling._lanes import serves, serving_models
from sage_llm.types import ExecutionInstanceType as Role
from tests.factories import make_instance_view, make_snapshot


def test_serves_agrees_with_serving_models() -> None:
    rng = random.Random(5)
    for _ in range(300):
        views = [
            make_instance_view(
                f"i{k}",
                model=rng.choice(["a", "b", "c"]),
                role=rng.choice(list(Role)),
                healthy=rng.random() < 0.8,
                accepting=rng.random() < 0.8,
                in_flight=rng.randrange(0, 3),
                max_concurrency=rng.choice([1, 2]),
            )
            for k in range(rng.randrange(0, 12))
        ]
        snap = make_snapshot(views)
        models = serving_models(snap)
        for model in ("a", "b", "c"):
            assert serves(snap, model) == (model in models)
