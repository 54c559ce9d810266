"""The cluster simulator's LoRA adapters: requests for an adapter run on the instances
serving it, routed by the engines' LoRA slots as the asyncio control plane routes them,
also when a large model group is sampled."""

from __future__ import annotations

import random

import pytest

from sage_llm.bench.inprocess import Preset, run_preset
from sage_llm.bench.workloads import (
    Workload,
    WorkloadRequest,
    lora_names,
    synthetic,
    with_adapters,
)
from sage_llm.sim.cluster import ClusterResult, ClusterSimulator
from sage_llm.tokens import count_tokens
from sage_llm.types import ExecutionInstance
from tests.factories import make_instance
from tests.sim.agreement import assert_same_requests

MODEL = "llama-3-8b"


def _fleet(
    n: int, adapters: list[str], *, max_loras: int = 2, serving: int | None = None
) -> list[ExecutionInstance]:
    """``n`` simulated H100s; the first ``serving`` (all by default) serve ``adapters``."""
    return [
        make_instance(
            f"e{i}",
            port=9000 + i,
            lora_adapters=list(adapters) if serving is None or i < serving else [],
            metadata={"sim_gpu": "h100", "sim_model": MODEL, "sim_max_loras": max_loras},
        )
        for i in range(n)
    ]


def _workload(adapters: list[str], n: int, rate: float, *, share: float = 1.0) -> Workload:
    """Poisson arrivals, prompts of 200–1200 tokens and answers of 50–300, ``share`` of
    them for one of ``adapters`` by Zipf's law (the others for the model)."""
    base = synthetic(n, rate, "uniform:200,1200", "uniform:50,300", seed=0, model=MODEL)
    return with_adapters(base, adapters, share=share, seed=0)


def _run(
    instances: list[ExecutionInstance], load: Workload, *, slots: bool = True, **kwargs: object
) -> ClusterResult:
    sim = ClusterSimulator(
        instances, policy="fifo", routing="load_balanced", seed=0, lora_slot_routing=slots,
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip
    return sim.run(load)


@pytest.mark.parametrize("slots", [True, False])
def test_agrees_with_the_asyncio_control_plane(slots: bool) -> None:
    """8 adapters over 4 engines of 2 slots, routed by slots or only by who serves them:
    every request runs as it does through the control plane over in-process simulated
    engines (routed only by who serves them, requests wait in the engines for slots, and
    the first decision taken apart would send the rest of the run elsewhere)."""
    load = _workload(lora_names(8), 300, rate=35.0)

    def instances() -> list[ExecutionInstance]:
        return _fleet(4, lora_names(8))

    reference = run_preset(
        Preset("lora", "fifo", "load_balanced"), load, instances, seed=0,
        manager_kwargs={"lora_slot_routing": slots},
    )  # fmt: skip
    ours = _run(instances(), load, slots=slots)
    assert_same_requests(ours.measurements, reference.measurements)
    assert ours.settings["lora_slot_routing"] is slots


def test_routing_by_slots_keeps_batches_from_waiting_for_slots() -> None:
    load = _workload(lora_names(8), 300, rate=35.0)
    by_slots = _run(_fleet(4, lora_names(8)), load).summary
    serving_only = _run(_fleet(4, lora_names(8)), load, slots=False).summary
    assert by_slots.ttft is not None and serving_only.ttft is not None
    assert by_slots.ttft.p50 < serving_only.ttft.p50 / 5


def test_an_adapters_requests_run_only_where_it_is_served() -> None:
    """Two of four engines serve the adapters; requests for the model itself go anywhere."""
    load = _workload(lora_names(2), 120, rate=10.0, share=0.6)
    result = _run(_fleet(4, lora_names(2), serving=2), load)
    assert result.summary.ok == len(load)
    for_model = sum(r.model == MODEL for r in load.requests)
    done = {u.instance_id: u.completed for u in result.instances}
    assert done["e2"] + done["e3"] <= for_model
    assert done["e0"] + done["e1"] >= len(load) - for_model
    assert done["e2"] + done["e3"] > 0


def test_names_are_read_as_the_control_plane_reads_them() -> None:
    """An adapter's name, SGLang's ``MODEL:ADAPTER``, and a name no instance serves
    (refused as the control plane refuses it)."""
    rng = random.Random(0)
    prompt = " ".join(rng.choice(["a", "b", "c"]) for _ in range(40))
    n = count_tokens(prompt)
    load = Workload(
        "x",
        (
            WorkloadRequest("ok", 0.0, prompt, n, 8, model="lora-0"),
            WorkloadRequest("bad", 0.1, prompt, n, 8, model="lora-9"),
            WorkloadRequest("sglang", 0.2, prompt, n, 8, model=f"{MODEL}:lora-0"),
        ),
    )
    result = _run(_fleet(2, lora_names(1)), load)
    by_id = {m.request_id: m for m in result.measurements}
    assert by_id["ok"].ok and by_id["sglang"].ok  # (SGLang's name for the adapter)
    assert not by_id["bad"].ok and by_id["bad"].error is not None
    assert by_id["bad"].error.startswith("ModelNotFoundError: no instance serves model 'lora-9'")


def test_an_adapters_prompt_blocks_are_its_own() -> None:
    """The same prompts for the model and for an adapter: no cached block is shared
    between the two (vLLM hashes an adapter's blocks apart), in the engines and in the
    control plane's prefix index."""
    rng = random.Random(1)
    prompt = " ".join(rng.choice(["x", "y", "z", "w"]) for _ in range(600))
    n = count_tokens(prompt)

    def load(models: list[str]) -> Workload:
        reqs = (
            WorkloadRequest(f"r{i}", i * 2.0, prompt, n, 4, model=m) for i, m in enumerate(models)
        )
        return Workload("same prompt", tuple(reqs))

    for routing_reads_prefixes in (False, True):
        kwargs = {"track_prefixes": routing_reads_prefixes}
        alike = _run(_fleet(1, lora_names(1)), load([MODEL, MODEL]), **kwargs)
        apart = _run(_fleet(1, lora_names(1)), load([MODEL, "lora-0"]), **kwargs)
        again = _run(_fleet(1, lora_names(1)), load([MODEL, "lora-0", "lora-0"]), **kwargs)
        assert alike.instances[0].prefix_hit_rate > 0.4
        assert apart.instances[0].prefix_hit_rate == 0.0
        assert again.instances[0].prefix_hit_rate > 0.25


def test_a_sampled_fleet_packs_as_the_whole_fleet_would() -> None:
    """16 engines sampled 4 at a time: each decision sees a few engines, plus those with
    room where its adapter runs, and counts free slots and adapters in demand over the
    whole model. Routing by slots keeps its gain over routing by who serves the adapter,
    near what the unsampled decision gives."""
    load = _workload(lora_names(24), 900, rate=130.0)
    whole = _run(_fleet(16, lora_names(24)), load).summary
    sampled = _run(_fleet(16, lora_names(24)), load, sample_above=8, max_candidates=4)
    serving_only = _run(_fleet(16, lora_names(24)), load, slots=False, sample_above=8,
                        max_candidates=4).summary  # fmt: skip
    assert sampled.decisions.sampled == sampled.decisions.count > 0
    s = sampled.summary
    assert s.ok == whole.ok == serving_only.ok == len(load)
    assert s.ttft is not None and whole.ttft is not None and serving_only.ttft is not None
    assert s.ttft.p90 < serving_only.ttft.p90 / 5
    assert s.ttft.p50 == pytest.approx(whole.ttft.p50, rel=0.25)
