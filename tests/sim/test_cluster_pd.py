"""The cluster simulator's PD disaggregation: a PD model's requests run as a prefill leg and
a decode leg (the KV pulled over the decode engine's link), request for request as the
asyncio control plane runs them over in-process simulated engines."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from sage_llm.bench.inprocess import Preset, run_preset
from sage_llm.bench.workloads import (
    Workload,
    lora_names,
    multi_turn,
    sharegpt_like,
    synthetic,
    with_adapters,
)
from sage_llm.control_plane.pd import build_pd
from sage_llm.errors import ConfigError
from sage_llm.sim.cluster import ClusterResult, ClusterSimulator, SimInstanceSpec
from sage_llm.sim.factory import sim_config_for
from sage_llm.types import ExecutionInstance, ExecutionInstanceType, PDSeparationConfig
from tests.factories import make_role_instances
from tests.sim.agreement import assert_same_requests

MODEL = "llama-3-8b"


def _fleet(
    roles: str, *, link_gbps: float = 50.0, bound: int = 16, gpu: str = "l40s"
) -> list[ExecutionInstance]:
    """``gpu`` instances of the roles ``roles`` spells, their PD link ``link_gbps``."""
    return make_role_instances(
        roles,
        max_concurrent_requests=bound,
        metadata={"sim_gpu": gpu, "sim_model": MODEL, "sim_kv_link_gbps": link_gbps},
    )


def _load(n: int = 300, rate: float = 12.0, inputs: str = "uniform:64,2048") -> Workload:
    return synthetic(n, rate, input_dist=inputs, output_dist="uniform:8,96", seed=1)


def _both(
    instances: list[ExecutionInstance],
    workload: Workload,
    decider: str,
    *,
    policy: str = "fifo",
    routing: str = "load_balanced",
    pd_metadata: Mapping[str, object] | None = None,
    **manager: object,
) -> ClusterResult:
    """The cluster simulator's run of ``workload``, checked request for request against the
    control plane's (``decider``: the PD decider of both, ``pd_metadata`` its
    ``PDSeparationConfig.metadata``)."""
    pd = PDSeparationConfig(routing_policy=decider, metadata=dict(pd_metadata or {}))
    reference = run_preset(
        Preset("pd", policy, routing), workload, lambda: instances, seed=0,
        manager_kwargs={"pd_config": pd, **manager},
    ).measurements  # fmt: skip
    sim = ClusterSimulator(
        instances, policy=policy, routing=routing, seed=0, pd=pd,
        **manager,  # type: ignore[arg-type]
    )  # fmt: skip
    result = sim.run(workload)
    assert_same_requests(result.measurements, reference)
    for slot in sim.fleet.slots:  # every pulled KV was released on its prefill engine
        assert slot.core.num_pinned == 0, slot.instance_id
    return result


@pytest.mark.parametrize("link_gbps", [50.0, 0.5])
def test_prefill_and_decode_instances_agree_with_the_asyncio_control_plane(
    link_gbps: float,
) -> None:
    """Two prefill and two decode instances, every request disaggregated: the same first
    token and end for each, over a fast link and over one slow enough (0.5 GB/s: ~0.5 s
    for a 2,048-token prompt's KV) that the transfer is most of the TTFT."""
    result = _both(_fleet("PPDD", link_gbps=link_gbps), _load(), "always")
    assert result.summary.ok == 300
    assert result.disaggregated == 300
    rows = {i.instance_id: i for i in result.instances}
    assert [rows[f"sim-{i}"].role for i in range(4)] == [
        "prefilling", "prefilling", "decoding", "decoding",
    ]  # fmt: skip
    prefilled = rows["sim-0"].completed + rows["sim-1"].completed
    decoded = rows["sim-2"].completed + rows["sim-3"].completed
    assert prefilled == decoded == 300  # (each leg counted on its instance)
    assert rows["sim-0"].prefilled_tokens + rows["sim-1"].prefilled_tokens == sum(
        m.prompt_tokens for m in result.measurements
    )
    for prefill in ("sim-0", "sim-1"):  # one token per prefill leg (the decode leg's others)
        assert rows[prefill].tokens_generated == rows[prefill].completed
    assert result.settings["pd"]["decider"]["name"] == "always"
    assert result.settings["pd_models"] == [MODEL]


def test_a_slow_link_shows_in_the_time_to_first_token() -> None:
    def run(link_gbps: float) -> ClusterResult:
        pd = PDSeparationConfig(routing_policy="always")
        sim = ClusterSimulator(
            _fleet("PPDD", link_gbps=link_gbps), policy="fifo", routing="load_balanced", pd=pd
        )
        return sim.run(_load())

    fast, slow = run(50.0), run(0.5)
    # a 2,048-token prompt's KV is 268 MB: 5 ms at 50 GB/s, 537 ms at 0.5 GB/s
    assert fast.summary.ttft is not None
    assert slow.summary.ttft is not None
    assert slow.summary.ttft.p50 > fast.summary.ttft.p50 + 0.1


@pytest.mark.parametrize(
    ("roles", "decider", "policy", "routing"),
    [
        ("PDGH", "threshold", "fifo", "load_balanced"),
        ("PPDDG", "adaptive", "priority", "locality"),
        ("HHHH", "threshold", "slo_aware", "power_of_two"),
    ],
)
def test_mixed_fleets_agree_with_the_asyncio_control_plane(
    roles: str, decider: str, policy: str, routing: str
) -> None:
    """Fleets whose GENERAL/HYBRID instances take whole requests and either leg, the
    decider choosing per request, under load (30 requests/s)."""
    result = _both(_fleet(roles), _load(rate=30.0), decider, policy=policy, routing=routing)
    assert 0 < result.disaggregated < 300
    assert result.summary.ok == 300


def test_gap_targets_pairing_and_prefill_reserve_agree_with_the_asyncio_control_plane() -> None:
    """The adaptive decider with a 25 ms gap target on four HYBRID H100 instances, chat
    requests: the pairing holds instances for prefill legs when every one decodes, and
    keeps prefill legs off decodes they would stall, request for request alike."""
    targets = {"decider_params": {"itl_slo_s": 0.025, "ttft_slo_s": 2.0}}
    fleet = _fleet("HHHH", gpu="h100")
    result = _both(fleet, sharegpt_like(300, 10.0, seed=1), "adaptive", pd_metadata=targets)
    assert 0 < result.disaggregated < 300
    assert result.summary.ok == 300
    pairing = result.settings["pd"]["pairing"]
    assert pairing["params"]["itl_slo_s"] == 0.025
    assert pairing["prefill_reserve_holds"] > 0


@pytest.mark.parametrize(("roles", "decider"), [("PPDD", "always"), ("PDGH", "prefix_aware")])
def test_shared_prefixes_agree_with_the_asyncio_control_plane(roles: str, decider: str) -> None:
    """Chat sessions whose prompts share growing prefixes: the pair orchestrator scores
    prefill instances by the prefix they hold (and ``prefix_aware`` decides by it), so the
    simulator keeps prefix hashes for a PD fleet by default, as the dispatcher always does
    (without them the runs came apart at the first request)."""
    workload = multi_turn(40, turns_per_session=4, rate=4.0, think_time_s=1.0,
                          system_prompt_tokens=512, seed=3)  # fmt: skip
    result = _both(_fleet(roles), workload, decider)
    assert result.settings["track_prefixes"] is True
    assert result.prefix_hit_rate > 0.5


def test_a_full_fleet_defers_requests_as_the_dispatcher_does() -> None:
    """Three requests in flight per instance at 100 requests/s: most wait in the queue,
    and a request popped when no pair is free goes back to it at the pass's end."""
    result = _both(_fleet("PPDD", bound=3), _load(400, rate=100.0), "always")
    assert result.summary.ok == 400
    assert max(i.max_in_flight for i in result.instances) == 3


def test_refused_legs_agree_with_the_asyncio_control_plane() -> None:
    """Prompts past the engines' context: each refused by its prefill leg's engine, in the
    manager's words, and not held against the instance."""
    result = _both(_fleet("PPDD"), _load(100, rate=6.0, inputs="uniform:4000,9800"), "always")
    refused = [m for m in result.measurements if not m.ok]
    assert 5 < len(refused) < 95
    assert all(
        m.error is not None
        and m.error.startswith("EngineRequestRejectedError: engine sim-")
        and "contains at least 8193 input tokens" in m.error
        for m in refused
    )


def test_lora_requests_run_both_legs_where_the_adapter_has_room() -> None:
    adapters = lora_names(8)
    metadata = {"sim_gpu": "h100", "sim_model": MODEL, "sim_max_loras": 2}
    instances = make_role_instances("PPDD", lora_adapters=adapters, metadata=metadata)
    base = synthetic(300, 30.0, "uniform:200,1200", "uniform:50,300", seed=0, model=MODEL)
    result = _both(instances, with_adapters(base, adapters, share=0.7, seed=0), "always")
    assert result.summary.ok == 300


def test_token_times_are_recorded_on_the_decode_leg_only() -> None:
    """With every token's time recorded, each request's tokens are its decode leg's (not
    its prefill leg's discarded one), and every figure is as without them."""
    instances = _fleet("PDGH")
    pd = PDSeparationConfig(routing_policy="threshold")

    def run(record: bool) -> ClusterResult:
        return ClusterSimulator(
            instances, policy="fifo", routing="load_balanced", pd=pd, record_token_times=record
        ).run(_load())

    plain, timed = run(False), run(True)
    assert_same_requests(timed.measurements, plain.measurements)
    for m in timed.measurements:
        assert len(m.token_times_s) == m.output_tokens
        assert m.first_token_s == m.token_times_s[0]


def test_fleets_pd_cannot_serve_are_refused() -> None:
    with pytest.raises(ConfigError, match="PD disaggregation is disabled") as err:
        ClusterSimulator(_fleet("PD"), policy="fifo", routing="random",
                         pd=PDSeparationConfig(enabled=False))  # fmt: skip
    assert err.value.key == "instances"
    with pytest.raises(ConfigError, match="no decode-capable instance") as err:
        ClusterSimulator(_fleet("PP"), policy="fifo", routing="random")
    with pytest.raises(ConfigError) as err:
        ClusterSimulator(_fleet("PD"), policy="fifo", routing="random",
                         pd=PDSeparationConfig(connector="sglang"))  # fmt: skip
    assert err.value.key == "pd.connector"
    prefill = _fleet("P")[0]
    whole_engine = sim_config_for(_fleet("G")[0])
    with pytest.raises(ConfigError) as err:
        ClusterSimulator([SimInstanceSpec(prefill, whole_engine), *_fleet("D")],
                         policy="fifo", routing="random")  # fmt: skip
    assert err.value.key == "config.role"
    with pytest.raises(ConfigError, match="must be a PDSeparationConfig") as err:
        ClusterSimulator(_fleet("PD"), policy="fifo", routing="random",
                         pd={"routing_policy": "always"})  # type: ignore[arg-type]  # fmt: skip
    assert err.value.key == "pd"
    # PD off and whole-request instances only: nothing to refuse
    ClusterSimulator(_fleet("GH"), policy="fifo", routing="random",
                     pd=PDSeparationConfig(enabled=False))  # fmt: skip


def test_a_sampled_pd_model_is_sampled_by_role() -> None:
    """Above ``sample_above`` a PD model's snapshot holds ``max_candidates`` free instances
    of each kind of role (a sample of the whole group could miss every decode instance),
    and an instance at its bound leaves its role's list."""
    sim = ClusterSimulator(
        _fleet("P" * 40 + "D" * 40 + "G" * 4), policy="fifo", routing="load_balanced",
        max_candidates=4, sample_above=16,
    )  # fmt: skip
    fleet = sim.fleet
    for _ in range(20):
        roles = [v.role for v in fleet.snapshot(0.0).instances]
        assert roles.count(ExecutionInstanceType.PREFILLING) in (3, 4)
        assert roles.count(ExecutionInstanceType.DECODING) in (3, 4)
        assert roles.count(ExecutionInstanceType.GENERAL) == 4
    general = [s for s in fleet.slots if s.role is ExecutionInstanceType.GENERAL]
    for slot in general[:3]:
        fleet.leave_free(slot)
    roles = [v.role for v in fleet.snapshot(0.0).instances]
    assert roles.count(ExecutionInstanceType.GENERAL) == 1
    fleet.join_free(general[0])
    roles = [v.role for v in fleet.snapshot(0.0).instances]
    assert roles.count(ExecutionInstanceType.GENERAL) == 2
    assert fleet.free_total == len(fleet.slots) - 2


def test_large_pd_fleets_run_on_candidate_samples() -> None:
    """150 prefill + 150 decode instances decided on samples of 16 of each: every request
    completes, every decision is sampled, and the latencies are those of the same fleet
    decided over every instance, within a few percent."""
    instances = make_role_instances(
        "P" * 150 + "D" * 150, max_concurrent_requests=8,
        metadata={"sim_gpu": "h100", "sim_model": MODEL},
    )  # fmt: skip
    workload = synthetic(1000, 450.0, input_dist="uniform:256,4096",
                         output_dist="uniform:32,256", seed=1)  # fmt: skip
    pd = PDSeparationConfig(routing_policy="always")

    def run(sample_above: int) -> ClusterResult:
        sim = ClusterSimulator(instances, policy="fifo", routing="load_balanced", pd=pd,
                               sample_above=sample_above)  # fmt: skip
        return sim.run(workload)

    sampled, whole = run(128), run(1000)
    assert sampled.summary.ok == whole.summary.ok == 1000
    assert sampled.disaggregated == 1000
    assert sampled.decisions.sampled == sampled.decisions.count == 1000
    assert sampled.decisions.mean_candidates < 40  # 16 + 16, and the prefix holders
    assert whole.decisions.sampled == 0
    assert sampled.summary.ttft is not None
    assert whole.summary.ttft is not None
    assert sampled.summary.e2e is not None
    assert whole.summary.e2e is not None
    assert sampled.summary.ttft.p50 == pytest.approx(whole.summary.ttft.p50, rel=0.1)
    assert sampled.summary.e2e.p50 == pytest.approx(whole.summary.e2e.p50, rel=0.05)


def test_ready_pd_components_are_used_as_given() -> None:
    """``pd`` may be ready components (as ``build_pd`` makes them): their decider and
    orchestrator decide, and their description is the run's setting."""
    components = build_pd(PDSeparationConfig(routing_policy="never"), seed=0)
    sim = ClusterSimulator(_fleet("PDG"), policy="fifo", routing="load_balanced", pd=components)
    result = sim.run(_load(60))
    assert sim.pd is components
    assert result.settings["pd"]["decider"]["name"] == "never"
    # "never" runs every request whole while the general instance has a free slot
    assert result.colocated > 0
    assert result.colocated + result.disaggregated == 60
