"""The discrete-event cluster simulator: the real policies and routers on simulated engines."""

from __future__ import annotations

import gc
import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, replace
from typing import Any, cast

import pytest

from sage_llm.bench.inprocess import Preset, run_preset
from sage_llm.bench.stats import RequestMeasurement, ttft
from sage_llm.bench.workload_core import evolve
from sage_llm.bench.workloads import (
    Workload,
    WorkloadRequest,
    multi_turn,
    synthetic,
    with_priorities,
)
from sage_llm.control_plane.routing.base import RoutingDecision
from sage_llm.control_plane.routing.pipeline import Pipeline
from sage_llm.control_plane.routing.registry import build_router
from sage_llm.control_plane.scheduling.base import Admission
from sage_llm.control_plane.scheduling.fifo import FIFOPolicy
from sage_llm.control_plane.scheduling.registry import build_policy
from sage_llm.control_plane.snapshot import ClusterSnapshot, CompletionRecord, RequestInfo
from sage_llm.errors import ConfigError, ConflictError, InvalidRequestError
from sage_llm.sim import cluster_fleet
from sage_llm.sim.cluster import ClusterResult, ClusterSimulator, SimInstanceSpec, make_fleet
from sage_llm.sim.cluster_fleet import FreeList, prefix_block_hashes
from sage_llm.sim.core import SimEngineConfig, SimEngineCore, StepResult
from sage_llm.sim.factory import sim_config_for
from sage_llm.tokens import block_hashes
from sage_llm.tokens import block_hashes as block_hashes_of
from sage_llm.types import ExecutionInstanceType, RequestPriority
from tests.factories import make_instances
from tests.sim.agreement import assert_same_requests
from tests.sim.reference_core import ReferenceCore

COMPILED = not str(cluster_fleet.__file__).endswith(".py")
"""The accelerator (``sage_llm.sim.accel``) is built: the simulator's modules are compiled."""


def _fleet(n: int, *, bound: int = 16, gpu: str = "l40s") -> list[SimInstanceSpec]:
    return make_fleet(n, gpu=gpu, max_concurrency=bound)


def _load(n: int = 200, rate: float = 20.0, seed: int = 1) -> Workload:
    return synthetic(
        n, rate, input_dist="uniform:64,512", output_dist="uniform:8,96", seed=seed, n_users=4
    )


class RecordingRouter:
    """A real router that also keeps every (request, snapshot, decision) it saw."""

    def __init__(self, inner: Pipeline) -> None:
        self.inner = inner
        self.name = inner.name
        self.seen: list[tuple[RequestInfo, ClusterSnapshot, RoutingDecision]] = []

    def route(
        self, req: RequestInfo, snap: ClusterSnapshot, allowed: frozenset[str] | None = None
    ) -> RoutingDecision | None:
        decision = self.inner.route(req, snap, allowed)
        if decision is not None:
            self.seen.append((req, snap, decision))
        return decision

    def describe(self) -> dict[str, object]:
        return self.inner.describe()


def _signature(measurements: Sequence[RequestMeasurement]) -> list[tuple[object, ...]]:
    return [(m.request_id, m.first_token_s, m.end_s, m.output_tokens) for m in measurements]


# -- determinism and accounting ------------------------------------------------------------


@pytest.mark.parametrize("sample_above", [256, 2])
def test_same_seed_same_run(sample_above: int) -> None:
    def run(seed: int) -> list[tuple[object, ...]]:
        sim = ClusterSimulator(
            _fleet(6),
            policy="fifo",
            routing="power_of_two",
            seed=seed,
            sample_above=sample_above,
            max_candidates=3,
        )
        return _signature(sim.run(_load(150, rate=40.0)).measurements)

    first = run(7)
    assert first == run(7)
    assert first != run(8)  # the seed drives the random choices


def test_every_request_completes_within_the_concurrency_bound() -> None:
    workload = _load(300, rate=60.0)  # far above what 3 instances of 8 slots serve
    sim = ClusterSimulator(_fleet(3, bound=8), policy="fifo", routing="load_balanced")
    result = sim.run(workload)
    assert result.summary.ok == len(workload) and result.rejected == 0
    assert sorted(m.request_id for m in result.measurements) == sorted(
        r.request_id for r in workload
    )
    assert all(m.output_tokens == r.max_tokens for m, r in _paired(result, workload))
    assert all(u.max_in_flight <= u.max_concurrency == 8 for u in result.instances)
    assert max(u.max_in_flight for u in result.instances) == 8  # the bound was reached
    assert all(0 < u.mean_in_flight <= u.max_in_flight for u in result.instances)
    assert 0.5 < result.mean_load <= 1.0  # overloaded: the slots stay mostly full
    assert sum(u.completed for u in result.instances) == len(workload)
    for slot in sim._slots:  # everything accounted back to zero
        state = slot.state
        assert (state.in_flight, state.queued_prefill_tokens) == (0, 0)
        assert state.outstanding_decode_tokens == 0
        assert not slot.core.has_work()
    assert 0 < result.mean_utilization <= 1
    assert result.decisions.count == len(workload)


def _paired(
    result: ClusterResult, workload: Workload
) -> list[tuple[RequestMeasurement, WorkloadRequest]]:
    by_id = {r.request_id: r for r in workload}
    return [(m, by_id[m.request_id]) for m in result.measurements]


def test_max_concurrent_per_instance_overrides_the_fleet() -> None:
    sim = ClusterSimulator(
        _fleet(2, bound=50), policy="fifo", routing="round_robin", max_concurrent_per_instance=4
    )
    result = sim.run(_load(80, rate=80.0))
    assert {u.max_in_flight for u in result.instances} == {4}


def test_token_times_are_recorded_on_request() -> None:
    workload = _load(40)
    result = ClusterSimulator(
        _fleet(2), policy="fifo", routing="round_robin", record_token_times=True
    ).run(workload)
    for m, r in _paired(result, workload):
        assert len(m.token_times_s) == m.output_tokens == r.max_tokens
        assert m.token_times_s[0] == m.first_token_s
        assert m.token_times_s[-1] == m.end_s
    assert result.summary.itl is not None
    plain = ClusterSimulator(_fleet(2), policy="fifo", routing="round_robin").run(workload)
    assert plain.summary.itl is None
    assert _signature(plain.measurements) == _signature(result.measurements)


class _ReferenceEngine(ReferenceCore):
    """The per-step reference core behind the fast core's step signature."""

    def __init__(self, config: SimEngineConfig) -> None:
        super().__init__(config)
        self._produced: set[str] = set()

    def add_request(
        self,
        req_id: str,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        *,
        arrival: float,
        kv_transfer: Mapping[str, Any] | None = None,
        block_hashes: Sequence[int] | None = None,
        lora: str | None = None,
        priority: int = 0,  # (FCFS, as the engines it stands in for: not read)
    ) -> None:
        assert lora is None  # (the workloads it runs are for the model itself)
        assert block_hashes is None or tuple(block_hashes) == block_hashes_of(
            prompt_token_ids, self.block_size
        )
        super().add_request(
            req_id, prompt_token_ids, max_tokens, arrival=arrival, kv_transfer=kv_transfer
        )

    def step(self, now: float, *, list_tokens: bool = True) -> StepResult:
        res = super().step(now)
        res.num_new_tokens = len(res.new_tokens)
        res.first_tokens = [rid for rid, _ in res.new_tokens if rid not in self._produced]
        self._produced.update(res.first_tokens)
        if not list_tokens:
            res.new_tokens = []
        return res


@pytest.mark.skipif(
    COMPILED,
    reason="swaps an interpreted engine into InstanceSlot.core, which the compiled "
    "accelerator types as SimEngineCore (the pure-Python run checks this)",
)
@pytest.mark.parametrize(
    ("routing", "record_token_times"),
    [("load_balanced", False), ("load_balanced", True), ("locality", False)],
)
def test_runs_exactly_as_on_the_per_step_reference_engines(
    routing: str, record_token_times: bool
) -> None:
    # A small cache (preemptions), a tight token budget, shared prefixes (multi-turn
    # sessions; with locality routing the prompts' hashes come from the prefix index): every
    # path of the engines' decode fast path is taken, and no figure of the run may differ.
    fleet = [
        replace(s, config=replace(s.engine_config(), max_num_batched_tokens=256))
        for s in make_fleet(3, gpu="l40s", max_concurrency=12, num_gpu_blocks=160)
    ]
    workload = (
        multi_turn(40, turns_per_session=3, rate=6.0, think_time_s=1.0, system_prompt_tokens=64)
        if routing == "locality"
        else synthetic(240, 30.0, input_dist="uniform:16,400", output_dist="uniform:1,120", seed=5)
    )

    def run(reference: bool) -> ClusterResult:
        sim = ClusterSimulator(
            fleet, policy="fifo", routing=routing, record_token_times=record_token_times
        )
        if reference:
            for slot in sim._slots:
                slot.core = cast(SimEngineCore, _ReferenceEngine(slot.core.config))
        return sim.run(workload)

    fast, reference = run(False), run(True)
    assert fast.settings["track_prefixes"] == (routing == "locality")
    if routing == "locality":
        assert reference.prefix_hit_rate > 0.1
    else:
        assert sum(u.preemptions for u in reference.instances) > 0
    assert [asdict(m) for m in fast.measurements] == [asdict(m) for m in reference.measurements]
    assert fast.instances == reference.instances
    assert (fast.steps, fast.events) == (reference.steps, reference.events)


# -- the control plane's behaviour -----------------------------------------------------------


def test_a_burst_spreads_as_with_assignment_accounts_it() -> None:
    router = RecordingRouter(build_router("load_balanced", seed=0))
    burst = synthetic(12, float("inf"), input_dist=200, output_dist=20, seed=0)
    ClusterSimulator(_fleet(4), policy="fifo", routing=router).run(burst)
    first_pass = router.seen[:12]
    assert len({d.instance_id for _, _, d in first_pass}) == 4  # not all on one instance
    for (req, snap, decision), (_, following, _) in itertools.pairwise(first_pass):
        expected = snap.with_assignment(decision.instance_id, req)
        assert following.instances == expected.instances


def test_priority_protects_critical_latency_under_overload() -> None:
    base = synthetic(300, 30.0, input_dist="uniform:64,512", output_dist="uniform:16,128", seed=2)
    workload = with_priorities(
        base, {RequestPriority.CRITICAL: 0.1, RequestPriority.NORMAL: 0.9}, seed=2
    )

    def critical_ttft(policy: str) -> float:
        sim = ClusterSimulator(_fleet(2, bound=8), policy=policy, routing="load_balanced")
        result = sim.run(workload)
        values = [
            t
            for m in result.measurements
            if m.priority is RequestPriority.CRITICAL and (t := ttft(m)) is not None
        ]
        return sum(values) / len(values)

    fifo, priority = critical_ttft("fifo"), critical_ttft("priority")
    assert fifo > 5.0  # the overload queues everyone under FIFO
    assert priority < fifo / 10


def test_prefix_aware_routing_raises_the_prefix_hit_rate() -> None:
    workload = multi_turn(
        30, turns_per_session=4, rate=4.0, think_time_s=2.0, system_prompt_tokens=64, seed=3
    )

    def hit_rate(routing: str, sample_above: int) -> float:
        sim = ClusterSimulator(
            _fleet(8),
            policy="fifo",
            routing=routing,
            sample_above=sample_above,
            max_candidates=3,
        )
        return sim.run(workload).prefix_hit_rate

    assert hit_rate("locality", 256) > hit_rate("round_robin", 256) + 0.15
    # sampled: the prefix holders join the sample, so locality keeps its advantage
    assert hit_rate("locality", 4) > hit_rate("round_robin", 4) + 0.15


def test_agrees_with_the_asyncio_control_plane() -> None:
    """Request for request: the same events in the same order as the control plane over
    in-process simulated engines (the engines' stats read mid-step as they report them,
    and each instance's prefill estimate refined when a request ends)."""
    workload = _load(300, rate=12.0)
    instances = make_instances(
        4, max_concurrent_requests=16, metadata={"sim_gpu": "l40s", "sim_model": "llama-3-8b"}
    )
    preset = Preset("fifo+lb", "fifo", "load_balanced")
    reference = run_preset(preset, workload, lambda: instances, seed=0)
    ours = ClusterSimulator(instances, policy="fifo", routing="load_balanced", seed=0)
    result = ours.run(workload)
    assert result.summary.ok == len(workload)
    assert_same_requests(result.measurements, reference.measurements)


def test_refusals_agree_with_the_asyncio_control_plane() -> None:
    """Prompts past the engines' context among the others: each refused as the in-process
    engine refuses it (a text prompt counted to a token past the context, as vLLM's
    tokenizer counts it) and reported in the manager's words, and the refusal says nothing
    against the instance (the requests after it are routed as the control plane routes
    them)."""
    workload = synthetic(60, 6.0, input_dist="uniform:4000,9800", output_dist="uniform:8,64",
                         seed=3)  # fmt: skip
    instances = make_instances(
        2, max_concurrent_requests=16, metadata={"sim_gpu": "l40s", "sim_model": "llama-3-8b"}
    )
    preset = Preset("fifo+lb", "fifo", "load_balanced")
    reference = run_preset(preset, workload, lambda: instances, seed=0).measurements
    measured = ClusterSimulator(instances, policy="fifo", routing="load_balanced", seed=0).run(
        workload
    )
    assert_same_requests(measured.measurements, reference)
    refused = [m for m in measured.measurements if not m.ok]
    assert 5 < len(refused) < 55
    assert all(
        m.error is not None
        and m.error.startswith("EngineRequestRejectedError: engine sim-")
        and "contains at least 8193 input tokens" in m.error
        for m in refused
    )


@pytest.mark.parametrize("routing", ["load_balanced", "locality"])
def test_adaptive_agrees_with_the_asyncio_control_plane(routing: str) -> None:
    """``adaptive`` gets its ``tick`` every ``tick_interval_s`` of simulated time, as the
    manager's loop calls it (without the ticks it switched at other times: the runs came
    apart after 6 s)."""
    base = synthetic(300, 25.0, input_dist="uniform:64,2048", output_dist="uniform:8,256",
                     seed=2)  # fmt: skip
    workload = with_priorities(
        base,
        {RequestPriority.CRITICAL: 0.2, RequestPriority.NORMAL: 0.6, RequestPriority.LOW: 0.2},
        seed=2,
    )
    instances = make_instances(
        4, max_concurrent_requests=16, metadata={"sim_gpu": "l40s", "sim_model": "llama-3-8b"}
    )
    reference = run_preset(
        Preset("adaptive", "adaptive", routing), workload, lambda: instances, seed=0
    ).measurements
    sim = ClusterSimulator(instances, policy="adaptive", routing=routing, seed=0)
    assert_same_requests(sim.run(workload).measurements, reference)
    assert sim.policy.describe()["switches"]  # (it did switch)


def test_engines_that_schedule_by_priority_agree_with_the_asyncio_control_plane() -> None:
    """Requests queued in engines started with ``--scheduling-policy priority`` (each
    instance's ``engine_scheduling_policy``): the cluster simulator passes each request's
    priority to its engine as the in-process engines of the asyncio control plane get it,
    and the engines' order shows in the critical requests' TTFT."""
    base = synthetic(200, 12.0, input_dist="uniform:1000,3000", output_dist="uniform:200,600",
                     seed=4)  # fmt: skip
    workload = with_priorities(
        base, {RequestPriority.CRITICAL: 0.2, RequestPriority.LOW: 0.8}, seed=4
    )
    metadata = {"sim_gpu": "l40s", "sim_model": "llama-3-8b"}

    def critical_ttft(engine_policy: str) -> float:
        instances = make_instances(1, max_concurrent_requests=256, metadata=metadata)
        for inst in instances:
            inst.engine_scheduling_policy = engine_policy
        preset = Preset("fifo+lb", "fifo", "load_balanced")
        reference = run_preset(preset, workload, lambda: instances, seed=0).measurements
        ours = ClusterSimulator(instances, policy="fifo", routing="load_balanced", seed=0)
        measured = ours.run(workload).measurements
        assert_same_requests(measured, reference)
        values = sorted(
            t for m in measured if m.priority is RequestPriority.CRITICAL and (t := ttft(m))
        )
        return values[len(values) // 2]

    assert critical_ttft("priority") < critical_ttft("fcfs") / 3


# -- candidate sampling ---------------------------------------------------------------------


def test_candidate_sampling_only_above_the_threshold() -> None:
    workload = _load(120, rate=30.0)

    def run(sample_above: int) -> RecordingRouter:
        router = RecordingRouter(build_router("power_of_two", seed=0))
        sim = ClusterSimulator(
            _fleet(8), policy="fifo", routing=router, sample_above=sample_above, max_candidates=3
        )
        result = sim.run(workload)
        assert result.summary.ok == len(workload)
        assert result.decisions.sampled == (result.decisions.count if sample_above < 8 else 0)
        return router

    whole = run(8)  # 8 instances, threshold 8: never sampled
    assert {len(snap) for _, snap, _ in whole.seen} == {8}
    sampled = run(7)
    sizes = [len(snap) for _, snap, _ in sampled.seen]
    # 3 sampled instances with a free slot, plus the request's sticky owner: the simulator
    # cannot look inside a router it did not build, so it adds every instance one might want
    assert max(sizes) <= 4 and min(sizes) >= 1
    assert all(sum(v.has_capacity for v in snap) >= len(snap) - 1 for _, snap, _ in sampled.seen)
    chosen = {d.instance_id for _, _, d in sampled.seen}
    assert len(chosen) == 8  # samples differ from decision to decision


def test_sampled_snapshot_keeps_the_sticky_owner() -> None:
    workload = multi_turn(12, turns_per_session=3, rate=2.0, think_time_s=1.0, seed=5)
    owners: dict[str, set[str]] = {}
    router = RecordingRouter(build_router("affinity", seed=0))
    sim = ClusterSimulator(
        _fleet(10, bound=64), policy="fifo", routing=router, sample_above=4, max_candidates=2
    )
    assert sim.run(workload).summary.ok == len(workload)
    for req, _, decision in router.seen:
        assert req.session_id is not None
        owners.setdefault(req.session_id, set()).add(decision.instance_id)
    assert all(len(where) == 1 for where in owners.values())  # light load: sessions stick
    assert len({next(iter(w)) for w in owners.values()}) > 2


def test_free_list_samples_distinct_members() -> None:
    free = FreeList()
    for i in range(100):
        free.add(i)
    free.discard(5)
    free.discard(5)
    assert len(free) == 99 and 5 not in free
    rng = random.Random(0)
    picked = free.sample(rng, 10)
    assert picked == sorted(set(picked)) and 5 not in picked and 8 <= len(picked) <= 10
    assert free.sample(rng, 200) == [i for i in range(100) if i != 5]
    assert len(free.sample(rng, 40)) == 40


@pytest.mark.parametrize("n", [5, 30, 100])
def test_free_list_skip_draws_as_sample_does(n: int) -> None:
    free = FreeList()
    for i in range(n):
        free.add(i)
    a, b = random.Random(3), random.Random(3)
    for _ in range(5):
        free.sample(a, 10)
        free.skip(b, 10)
    assert a.random() == b.random()


class _AdmitReadsSnapshot(FIFOPolicy):
    """FIFO whose ``admit`` is not QueuedPolicy's own: the simulator then builds every
    admission snapshot in full."""

    def admit(self, req: RequestInfo, snap: ClusterSnapshot) -> Admission:
        return super().admit(req, snap)


def test_admission_without_views_runs_as_with_them() -> None:
    def run(policy: FIFOPolicy) -> list[tuple[str, float | None, float]]:
        sim = ClusterSimulator(
            make_fleet(40, max_concurrency=4), policy=policy, routing="power_of_two",
            seed=2, sample_above=8, max_candidates=4,
        )  # fmt: skip
        result = sim.run(synthetic(600, rate=400.0, input_dist=64, output_dist=16, seed=5))
        return [(m.request_id, m.first_token_s, m.end_s) for m in result.measurements]

    assert run(FIFOPolicy()) == run(_AdmitReadsSnapshot())


class _RecordsCompletions(FIFOPolicy):
    """FIFO whose ``on_complete`` is not QueuedPolicy's own: it gets every record."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[CompletionRecord] = []

    def on_complete(self, record: CompletionRecord) -> None:
        self.records.append(record)
        super().on_complete(record)


def test_completions_are_counted_without_records_as_with_them() -> None:
    def run(policy: FIFOPolicy) -> tuple[list[tuple[str, float | None, float]], object]:
        sim = ClusterSimulator(
            make_fleet(40, max_concurrency=4), policy=policy, routing="power_of_two",
            seed=2, sample_above=8, max_candidates=4,
        )  # fmt: skip
        result = sim.run(synthetic(600, rate=400.0, input_dist=64, output_dist=16, seed=5))
        signature = [(m.request_id, m.first_token_s, m.end_s) for m in result.measurements]
        return signature, result.policy_state["state"]

    recording = _RecordsCompletions()
    assert run(FIFOPolicy()) == run(recording)
    assert len(recording.records) == 600
    assert all(r.predicted_e2e_s is not None and r.predicted_e2e_s > 0 for r in recording.records)


def test_prefix_block_hashes_match_the_reference() -> None:
    rng = random.Random(1)
    for n in (0, 5, 16, 100, 513):
        ids = [rng.randrange(0, 32000) for _ in range(n)]
        assert prefix_block_hashes(ids, 16) == block_hashes(ids, 16)
    odd = [-1, 2**40, *range(30)]
    assert prefix_block_hashes(odd, 16) == block_hashes(odd, 16)


def test_views_are_what_the_registry_builds() -> None:
    sim = ClusterSimulator(_fleet(6, bound=8), policy="fifo", routing="power_of_two", seed=1)
    fleet = sim.fleet
    assert all(fleet.fresh_view(slot) == slot.state.view() for slot in fleet.slots)
    sim.run(_load(150, rate=60.0))
    for slot in fleet.slots:  # fresh latency estimates, stats and counters
        fleet.mark(slot)
        assert fleet.fresh_view(slot) == slot.state.view()
        assert slot.state.view() == slot.state._build_view()


def test_stats_refreshes_go_on_while_work_is_left_after_the_last_arrival() -> None:
    sim = ClusterSimulator(
        make_fleet(1), policy="fifo", routing="load_balanced", stats_interval_s=1.0
    )
    long = WorkloadRequest("r0", 0.0, list(range(1, 2001)), 2000, 2000)
    result = sim.run([long])
    assert result.sim_time_s > 10.0  # many refresh intervals after the only arrival
    state = sim.fleet.slots[0].state
    assert state.last_stats == sim.fleet.slots[0].core.stats()  # refreshed after the end
    assert state.last_stats is not None and state.last_stats.generation_tokens_total == 2000


def test_measurements_pass_their_own_checks() -> None:
    result = ClusterSimulator(_fleet(2, bound=4), policy="fifo", routing="random").run(
        _load(60, rate=40.0)
    )
    for m in result.measurements:  # built without __init__: the checks must hold anyway
        assert RequestMeasurement(**{f.name: getattr(m, f.name) for f in fields(m)}) == m
        assert type(m.token_times_s) is tuple


# -- admission, inputs and errors -------------------------------------------------------------


def test_queue_bound_rejects_like_the_manager() -> None:
    burst = synthetic(30, float("inf"), input_dist=100, output_dist=10, seed=0)
    sim = ClusterSimulator(
        _fleet(1, bound=2), policy="fifo", routing="round_robin", max_queue_size=5
    )
    result = sim.run(burst)
    failed = [m for m in result.measurements if not m.ok]
    assert result.rejected == len(failed) == 30 - 2 - 5
    assert all(m.error is not None and m.error.startswith("QueueFullError") for m in failed)
    assert result.summary.ok == 7


def test_requests_for_unknown_models_are_refused() -> None:
    workload = synthetic(3, 1.0, input_dist=50, output_dist=5, model="other-model")
    result = ClusterSimulator(_fleet(1), policy="fifo", routing="random").run(workload)
    assert result.summary.failed == 3
    assert all((m.error or "").startswith("ModelNotFoundError") for m in result.measurements)


def test_two_models_are_routed_to_their_own_instances() -> None:
    fleet = _fleet(2) + make_fleet(2, model="Qwen2.5-7B", id_prefix="qwen", gpu="l40s")
    a = synthetic(20, 10.0, input_dist=50, output_dist=5, model="llama-3-8b", name="a")
    b = synthetic(20, 10.0, input_dist=50, output_dist=5, model="Qwen2.5-7B", name="b")
    merged = Workload("ab", tuple(sorted(a.requests + b.requests, key=lambda r: r.arrival_s)))
    router = RecordingRouter(build_router("load_balanced", seed=0))
    result = ClusterSimulator(fleet, policy="fifo", routing=router).run(merged)
    assert result.summary.ok == 40
    for req, _, decision in router.seen:
        assert decision.instance_id.startswith("sim" if req.model == "llama-3-8b" else "qwen")


def test_bad_settings_and_inputs_raise_clear_errors() -> None:
    with pytest.raises(ConfigError):
        ClusterSimulator([], policy="fifo", routing="random")
    with pytest.raises(ConfigError):
        ClusterSimulator(_fleet(1), policy="fifo", routing="random", max_candidates=1)
    with pytest.raises(ConfigError):
        ClusterSimulator(_fleet(1), policy="fifo", routing="random", stats_interval_s=0.0)
    router = build_router("random", seed=0)
    with pytest.raises(ConfigError):
        ClusterSimulator(_fleet(1), policy="fifo", routing=router, routing_params={"x": 1})
    refused: list[tuple[dict[str, Any], str]] = [
        ({"max_concurrent_per_instance": 0}, "max_concurrent_per_instance"),
        ({"max_queue_size": 0}, "limits"),
        ({"prefix_block_size": 0}, "limits"),
        ({"policy": build_policy("fifo"), "policy_params": {"x": 1}}, "policy_params"),
    ]
    for kwargs, key in refused:
        given: dict[str, Any] = {"policy": "fifo", "routing": "random", **kwargs}
        with pytest.raises(ConfigError) as err:
            ClusterSimulator(_fleet(1), **given)
        assert err.value.key == key, kwargs
    prefill = replace(make_instances(1)[0], instance_type=ExecutionInstanceType.PREFILLING)
    with pytest.raises(ConfigError):
        ClusterSimulator([prefill], policy="fifo", routing="random")
    with pytest.raises(ConfigError):
        make_fleet(0)
    workload = _load(3)
    backwards = [workload.requests[1], workload.requests[0]]
    with pytest.raises(InvalidRequestError):
        ClusterSimulator(_fleet(1), policy="fifo", routing="random").run(backwards)
    sim = ClusterSimulator(_fleet(1), policy="fifo", routing="random")
    sim.run(workload)
    with pytest.raises(ConflictError):
        sim.run(workload)


def test_specs_default_to_the_managers_engine_settings() -> None:
    spec = make_fleet(1, gpu="a100")[0]
    assert spec.engine_config() == sim_config_for(spec.instance)
    tuned = make_fleet(1, max_num_seqs=8)[0]
    assert tuned.engine_config().max_num_seqs == 8


def test_result_serialises() -> None:
    result = ClusterSimulator(_fleet(2), policy="fifo", routing="random").run(_load(20))
    data = result.to_dict(per_instance=True)
    assert data["summary"]["count"] == 20
    assert len(data["instances"]) == 2
    assert data["events"] == result.events > 20
    assert result.events_per_s > 0 and result.requests_per_wall_s > 0
    assert data["cpu_s"] > 0 and data["settings"]["track_prefixes"] is False


@pytest.mark.parametrize("enabled", [True, False])
def test_a_run_turns_the_collector_off_and_restores_it(enabled: bool) -> None:
    was = gc.isenabled()
    seen: list[bool] = []

    class Spy(FIFOPolicy):
        def on_complete(self, record: CompletionRecord) -> None:
            seen.append(gc.isenabled())
            super().on_complete(record)

    try:
        gc.enable() if enabled else gc.disable()
        before = gc.get_threshold()
        sim = ClusterSimulator(make_fleet(2), policy=Spy(), routing="round_robin")
        sim.run(synthetic(20, rate=50.0, input_dist=32, output_dist=4))
        assert seen and not any(seen)
        assert gc.isenabled() is enabled and gc.get_threshold() == before
        late = [WorkloadRequest("a", 1.0, "x", 1, 2), WorkloadRequest("b", 0.5, "x", 1, 2)]
        with pytest.raises(InvalidRequestError):
            ClusterSimulator(make_fleet(2), policy="fifo", routing="round_robin").run(late)
        assert gc.isenabled() is enabled and gc.get_threshold() == before
    finally:
        gc.enable() if was else gc.disable()


@pytest.mark.parametrize(
    ("policy", "routing", "shared"),
    [("fifo", "power_of_two", 0), ("priority", "locality", 64), ("slo_aware", "affinity", 0)],
)
def test_a_run_makes_no_reference_cycles(policy: str, routing: str, shared: int) -> None:
    # The collector is off during a run: every object the run drops must be freed by
    # reference counting alone.
    fleet = make_fleet(8)
    requests = list(synthetic(300, rate=400.0, input_dist=96, output_dist=8, n_users=7).requests)
    if shared:
        requests = [evolve(r, prompt="shared " * shared + str(r.prompt)) for r in requests]
    sim = ClusterSimulator(fleet, policy=policy, routing=routing, sample_above=4)
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        result = sim.run(requests)
        assert gc.collect() == 0
    finally:
        if was:
            gc.enable()
    assert result.summary.count == 300
