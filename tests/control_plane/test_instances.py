"""InstanceState: the view it gives of an instance, and when that view is rebuilt."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from sage_llm.control_plane.health import CircuitState
from sage_llm.control_plane.instances import (
    TPOT_BUCKETS,
    InstanceRegistry,
    InstanceState,
    LatencyPriors,
    batch_bucket,
)
from sage_llm.control_plane.snapshot import InstanceView
from sage_llm.engines.base import EngineStats
from sage_llm.types import ExecutionInstanceType
from tests.factories import make_instance


def _expected(state: InstanceState) -> InstanceView:
    """The view, field by field, as its documentation defines it."""
    inst = state.instance
    stats = state.last_stats
    half_open = state.breaker.state is CircuitState.HALF_OPEN
    return InstanceView(
        instance_id=inst.instance_id,
        model=inst.model_name,
        role=inst.instance_type,
        healthy=state.healthy and inst.is_healthy and state.breaker.routable,
        accepting=state.accepting,
        in_flight=state.in_flight,
        max_concurrency=1 if half_open else inst.max_concurrent_requests,
        queued_prefill_tokens=state.queued_prefill_tokens,
        outstanding_decode_tokens=state.outstanding_decode_tokens,
        kv_usage=stats.kv_usage if stats else 0.0,
        engine_waiting=stats.waiting if stats else 0,
        gpu_count=max(inst.gpu_count, inst.tensor_parallel_size * inst.pipeline_parallel_size),
        price_per_gpu_hour=inst.price_per_gpu_hour,
        machine_id=inst.machine_id,
        rack_id=inst.rack_id,
        numa_node=inst.numa_node,
        nvlink_domain=inst.nvlink_domain,
        nvlink_peers=frozenset(inst.nvlink_peers),
        network_bandwidth_gbps=inst.network_bandwidth_gbps,
        est_ttft_base_s=state.est_ttft_base_s,
        est_prefill_tps=1.0 / state.est_s_per_prefill_token,
        # the TPOT of a request joining now (see the bucket tests below)
        est_tpot_s=state.tpot_at(state.in_flight + 1)[0],
        est_chunk_tps=1.0 / state.est_s_per_chunk_token,
        rate_measured=state.rate_samples > 0,
        measured=state.measured,
        tpot_known=state.tpot_at(state.in_flight + 1)[1],
    )


@pytest.mark.parametrize(
    "case",
    ["plain", "busy", "half_open", "open", "draining", "removed", "probe_failed", "marked_down",
     "unavailable", "moved"],
)  # fmt: skip
def test_the_view_shows_the_live_state_and_is_rebuilt_only_when_it_changed(case: str) -> None:
    registry = InstanceRegistry()
    inst = make_instance(
        "e0", tensor_parallel_size=2, machine_id="m1", nvlink_peers=["e1"], numa_node=1,
        instance_type=ExecutionInstanceType.HYBRID,
    )  # fmt: skip
    state = registry.add(inst, None, LatencyPriors(tpot_s=0.03))  # type: ignore[arg-type]
    first = state.view()
    assert first == _expected(state)
    assert state.view() is first  # nothing changed: the same object
    if case == "busy":
        state.in_flight, state.queued_prefill_tokens, state.outstanding_decode_tokens = 3, 40, 9
        state.last_stats = EngineStats(running=3, waiting=2, kv_usage=0.5)
    elif case == "half_open":
        state.breaker.state = CircuitState.HALF_OPEN
    elif case == "open":
        state.breaker.state = CircuitState.OPEN
    elif case == "draining":
        state.draining = True
    elif case == "removed":
        state.removed = True
    elif case == "probe_failed":
        state.healthy = False
    elif case == "marked_down":  # the registered object says so
        state.instance = replace(inst, is_healthy=False)
    elif case == "unavailable":
        state.instance = replace(inst, is_available=False)
    elif case == "moved":  # the registered object replaced: placement read again
        state.instance = replace(inst, machine_id="m2", nvlink_peers=["e2", "e3"])
    view = state.view()
    assert view == _expected(state)
    assert (view is first) == (case == "plain")
    assert state.up == (view.healthy and view.accepting)


def test_serves_and_up_kinds_agree_with_models_and_up() -> None:
    """The per-request checks answer as :meth:`models` and the states' ``up`` do, case by case:
    a removed instance, one that is down, a draining one, and PD-only roles."""
    registry = InstanceRegistry()
    priors = LatencyPriors()
    roles = {
        "p0": ExecutionInstanceType.PREFILLING,
        "d0": ExecutionInstanceType.DECODING,
        "g0": ExecutionInstanceType.GENERAL,
    }
    states = {
        iid: registry.add(make_instance(iid, model_name="m", instance_type=role), None, priors)  # type: ignore[arg-type]
        for iid, role in roles.items()
    }
    gone = registry.add(make_instance("x0", model_name="gone"), None, priors)  # type: ignore[arg-type]
    gone.removed = True

    def check() -> None:
        for model in ("m", "gone", "other"):
            assert registry.serves(model) == (model in registry.models())
            up = [s for s in [*states.values(), gone] if s.instance.model_name == model and s.up]
            whole = any(s.instance.instance_type.runs_whole_requests for s in up)
            assert registry.up_kinds(model) == (bool(up), whole)

    check()
    assert registry.up_kinds("m") == (True, True)
    states["g0"].draining = True  # only the PD legs are left up
    check()
    assert registry.up_kinds("m") == (True, False)
    states["p0"].healthy = states["d0"].healthy = False
    check()
    assert registry.up_kinds("m") == (False, False)
    assert not registry.serves("gone") and registry.serves("m")


def test_batch_buckets_go_by_bit_length() -> None:
    assert [batch_bucket(b) for b in (0, 1, 2, 3, 4, 5, 8, 9, 16, 17)] == [
        0, 0, 1, 2, 2, 3, 3, 4, 4, 5,
    ]  # fmt: skip
    assert batch_bucket(10**9) == TPOT_BUCKETS - 1


def test_the_tpot_is_predicted_for_the_batch_a_request_joins() -> None:
    """The view's TPOT is the one of a request joining now (a batch of ``in_flight + 1``):
    its bucket's when learnt; else the nearest lower bucket's (decode steps are no faster in
    a bigger batch), known too; else the lowest bucket's above, not known; else the overall
    estimate (the prior at first), not known. One EWMA over every batch had kept a
    burst's TPOT (~3x a solo request's on vLLM) for the idle instance after it."""
    registry = InstanceRegistry()
    state = registry.add(make_instance("e0"), None, LatencyPriors(tpot_s=0.03))  # type: ignore[arg-type]
    view = state.view()
    assert (view.est_tpot_s, view.tpot_known) == (0.03, False)  # the prior
    for _ in range(8):
        state.observe_tpot(0.006, batch=8)  # a burst's, in batches of 5-8
    assert state.est_tpot_s == pytest.approx(0.006)  # the overall estimate learns them all
    view = state.view()
    assert view.est_tpot_s == pytest.approx(0.006) and not view.tpot_known  # from above
    state.observe_tpot(0.002, batch=1)
    view = state.view()
    assert view.est_tpot_s == pytest.approx(0.002) and view.tpot_known  # idle: solo
    assert state.est_tpot_s == pytest.approx(0.006 + 0.2 * (0.002 - 0.006))
    state.in_flight = 2  # joins a batch of 3 (bucket 3-4): none there, solo's from below
    view = state.view()
    assert view.est_tpot_s == pytest.approx(0.002) and view.tpot_known
    state.in_flight = 5  # a batch of 6: learnt there
    view = state.view()
    assert view.est_tpot_s == pytest.approx(0.006) and view.tpot_known
    state.in_flight = 40  # a batch of 41: the nearest below is 5-8's
    assert state.view().est_tpot_s == pytest.approx(0.006)
    state.observe_tpot(0.004, batch=3)  # the first of bucket 3-4 replaces nothing else
    state.in_flight = 3
    assert state.view().est_tpot_s == pytest.approx(0.004)
    state.observe_tpot(0.010)  # no batch: the overall estimate only
    assert state.view().est_tpot_s == pytest.approx(0.004)
    state.observe_tpot(0.003, batch=2)
    state.in_flight = 1  # joins a batch of 2 (bucket 2), not a solo request's (bucket 1)
    assert state.view().est_tpot_s == pytest.approx(0.003)


def test_estimates_take_their_first_observation_and_learn_a_lower_fixed_part() -> None:
    registry = InstanceRegistry()
    state = registry.add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    assert not state.view().measured
    state.observe_tpot(0.008)
    assert state.est_tpot_s == pytest.approx(0.008)  # the prior replaced, not nudged
    state.observe_tpot(0.010)
    assert state.est_tpot_s == pytest.approx(0.009)  # the mean of the first two
    assert not state.view().measured  # two observations: one noisy request could put it off
    for _ in range(3):
        state.observe_tpot(0.009)
    assert state.view().measured  # the mean of five
    for _ in range(50):  # TTFTs below the 50 ms prior of the fixed part
        state.observe_first_token(0.018, 1000)
    assert state.est_ttft_base_s < 0.02
    assert 1.0 / state.est_s_per_prefill_token <= 1e7 + 1  # bounded: it reached 1.5e20/s
    assert state.measured and state.view().measured


def test_short_prompts_tell_the_fixed_part_of_the_ttft_not_the_prefill_rate() -> None:
    """An engine's 2 s overhead on a one-token prompt had been read as a prefill rate of
    half a token a second (a full queue's Retry-After then said 17 minutes)."""
    registry = InstanceRegistry()
    state = registry.add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    prior_rate = 1.0 / state.est_s_per_prefill_token
    state.observe_first_token(2.0, 1)
    assert state.est_ttft_base_s == pytest.approx(2.0, rel=1e-3)
    assert 1.0 / state.est_s_per_prefill_token == pytest.approx(prior_rate)
    # a long prompt then tells the rate, beyond the fixed part learnt
    state.observe_first_token(2.5, 1000)
    assert 1.0 / state.est_s_per_prefill_token == pytest.approx(2000.0, rel=0.05)


def test_a_long_prompt_quicker_than_the_fixed_parts_prior_leaves_the_rate_finite() -> None:
    """A generic prior of the fixed part (50 ms) above an engine's real overhead: a
    300-token prompt's 30 ms TTFT had set the prefill rate to 10 million tokens a second
    (the tokens' share read as 0), so the PD decider predicted no stall there and kept
    chat prompts colocated beside running decodes. It lowers the fixed part instead, as a
    short prompt does, keeps the rate, and the next prompt tells the rate."""
    registry = InstanceRegistry()
    state = registry.add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    state.observe_first_token(0.030, 300)
    assert state.est_ttft_base_s == 0.0  # 30 ms less 300 tokens at the prior 8,000/s
    assert 1.0 / state.est_s_per_prefill_token == pytest.approx(8000.0)
    assert 1.0 / state.est_s_per_chunk_token == pytest.approx(8000.0)
    assert not state.view().rate_measured
    state.observe_first_token(0.040, 1000)
    assert 1.0 / state.est_s_per_prefill_token == pytest.approx(25_000.0)
    assert state.view().rate_measured


def test_a_first_token_with_nothing_left_to_prefill_tells_nothing() -> None:
    """The engine found the whole prompt in its cache (its cached tokens at or above the
    pending ones the control plane counted): that TTFT says nothing of the prefill, and
    leaves both parts of the estimate as they were."""
    registry = InstanceRegistry()
    state = registry.add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    before = (state.est_ttft_base_s, state.est_s_per_prefill_token)
    state.observe_first_token(0.001, 0)
    state.observe_first_token(0.001, -12)
    assert (state.est_ttft_base_s, state.est_s_per_prefill_token) == before
    assert not state.measured


def _fed(
    lengths: Callable[[random.Random], int], fixed: float, rate: float, noise: float, n: int = 200
) -> tuple[InstanceState, list[float]]:
    """An instance's state after ``n`` TTFTs of an engine with a ``fixed`` overhead and a
    prefill ``rate`` (tokens a second), each off by a lognormal ``noise``; and the rates it
    estimated after the first 20."""
    rng = random.Random(7)
    state = InstanceRegistry().add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    rates = []
    for i in range(n):
        tokens = lengths(rng)
        state.observe_first_token((fixed + tokens / rate) * math.exp(rng.gauss(0.0, noise)), tokens)
        if i >= 20:
            rates.append(1.0 / state.est_s_per_prefill_token)
    return state, rates


def test_long_prompts_of_varied_lengths_tell_both_parts_of_the_ttft() -> None:
    """Prompts all of 256 tokens or more had left the fixed part at its prior and read a
    2 s overhead as per-token cost (5000 tokens a second estimated at 330 to 860)."""
    state, _ = _fed(lambda rng: rng.randint(300, 3000), 2.0, 5000.0, 0.05)
    assert state.prefill_fit.line() is not None
    assert state.est_ttft_base_s == pytest.approx(2.0, rel=0.1)
    assert 1.0 / state.est_s_per_prefill_token == pytest.approx(5000.0, rel=0.15)


def test_prompts_of_one_length_or_with_short_ones_are_not_fitted() -> None:
    """Prompts of about one length cannot tell the two parts apart, and short ones tell the
    fixed part directly: the estimates are then learnt as before."""
    alike, _ = _fed(lambda rng: rng.randint(290, 310), 2.0, 5000.0, 0.05)
    assert alike.prefill_fit.line() is None
    prediction = alike.est_ttft_base_s + 300 * alike.est_s_per_prefill_token
    assert prediction == pytest.approx(2.0 + 300 / 5000.0, rel=0.1)  # right where it ran
    mixed, _ = _fed(lambda rng: rng.choice([10, rng.randint(300, 3000)]), 2.0, 5000.0, 0.05)
    assert mixed.prefill_fit.line() is None
    assert mixed.est_ttft_base_s == pytest.approx(2.0, rel=0.1)
    # a superlinear prefill's line has a negative fixed part: not read
    sq = InstanceRegistry().add(make_instance("e1"), None, LatencyPriors())  # type: ignore[arg-type]
    for i in range(100):
        tokens = 300 + 30 * (i % 90)
        sq.observe_first_token(1e-7 * tokens * tokens, tokens)
    assert sq.prefill_fit.line() is None
    assert sq.est_ttft_base_s >= 0.0


def test_the_drift_reset_does_not_keep_the_fit_from_forming() -> None:
    """The drift had been measured against the EWMA rule's predictions too, which are off
    in just the case the fit is for: reset every few samples, a 2 s overhead's fit formed
    at sample 191 of chat-like traffic, or never."""
    lengths = lambda rng: max(256, int(math.exp(rng.gauss(6.5, 0.8))))  # noqa: E731
    state, _ = _fed(lengths, 2.0, 5000.0, 0.1, n=80)
    assert state.prefill_fit.line() is not None
    assert state.est_ttft_base_s == pytest.approx(2.0, rel=0.1)


def test_a_fit_paused_by_a_short_prompt_still_notices_a_change() -> None:
    """A short prompt pauses the fit for ~44 long ones; its drift had not been measured
    meanwhile, so an engine that got 3x faster then was read through the stale line, up
    to 2.6x off."""
    rng = random.Random(5)
    state = InstanceRegistry().add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]

    def feed(scale: float, tokens: int) -> None:
        noise = math.exp(rng.gauss(0, 0.1))
        state.observe_first_token(scale * (0.5 + tokens / 10_000) * noise, tokens)

    for _ in range(200):
        feed(1.0, rng.randint(256, 6000))
    feed(1.0, 10)
    for _ in range(30):
        feed(1.0, rng.randint(256, 6000))
    ratios = []
    for _ in range(40):
        feed(1 / 3, rng.randint(256, 6000))
        predicted = state.est_ttft_base_s + 2000 * state.est_s_per_prefill_token
        ratios.append(predicted / ((0.5 + 2000 / 10_000) / 3))
    assert all(0.8 <= r <= 1.25 for r in ratios[20:]), [round(r, 2) for r in ratios]


@pytest.mark.parametrize("factor", [3.0, 1 / 3])
def test_an_engine_that_changes_speed_is_followed_within_a_few_requests(factor: float) -> None:
    """A fit over ~64 samples had taken up to 130 TTFTs to follow a 3x change (and read an
    engine that got faster as 2-3x too slow meanwhile): it is forgotten on the drift."""
    rng = random.Random(3)
    state = InstanceRegistry().add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    ratios = []
    for i in range(260):
        scale = factor if i >= 200 else 1.0
        tokens = rng.randint(256, 6000)
        state.observe_first_token(
            scale * (0.03 + tokens / 10_000) * math.exp(rng.gauss(0, 0.1)), tokens
        )
        truth = scale * (0.03 + 2000 / 10_000)
        ratios.append((state.est_ttft_base_s + 2000 * state.est_s_per_prefill_token) / truth)
    assert all(0.8 <= r <= 1.25 for r in ratios[150:200])  # fitted before the change
    assert all(0.75 <= r <= 1.33 for r in ratios[220:])  # and followed within 20 after it


def test_noisy_chat_traffic_keeps_the_fitted_rate_near_the_engines() -> None:
    """A fit over a window of a few samples had swung between 561 and 10 million tokens a
    second on such traffic: over the fit's memory it stays within a factor of two."""
    lengths = lambda rng: max(256, int(math.exp(rng.gauss(6.5, 0.8))))  # noqa: E731
    _, rates = _fed(lengths, 0.05, 8000.0, 0.3)
    assert min(rates) > 4000.0 and max(rates) < 16_000.0


def _roofline_ttft(tokens: int, scale: float = 1.0) -> float:
    """A TTFT on a roofline engine: 4 ms of intake, then one step, the smoothed maximum of
    its memory time (an 8 ms decode step) and its compute time (38,000 tokens a second)."""
    return scale * (0.004 + math.hypot(0.008, tokens / 38_000))


def test_the_chunk_cost_is_the_compute_bound_rate_though_chat_ttfts_read_faster() -> None:
    """On chat traffic most prompts' steps are memory-bound, so the TTFT line reads a rate
    faster than the compute-bound one (1.4x here, 2.3x in the PD benchmark's chat); the PD
    decider's stall model had read that rate and kept 1,500-token prompts beside running
    decodes (a 22 ms gap predicted, 38 ms taken)."""
    rng = random.Random(11)
    state = InstanceRegistry().add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    assert state.est_s_per_chunk_token == state.est_s_per_prefill_token  # nothing told yet
    for _ in range(10):
        state.observe_tpot(0.008)
    for _ in range(300):
        tokens = max(1, int(math.exp(rng.gauss(5.5, 1.0))))  # median ~250 tokens
        state.observe_first_token(_roofline_ttft(tokens), tokens)
    assert 1.0 / state.est_s_per_chunk_token == pytest.approx(38_000, rel=0.15)
    assert 1.0 / state.est_s_per_prefill_token > 1.3 * 38_000
    view = state.view()
    assert view.est_chunk_tps == pytest.approx(1.0 / state.est_s_per_chunk_token)
    # the stall the decider predicts for a 1,500-token chunk beside decodes: the step's
    stall = math.hypot(view.est_tpot_s, 1500 / (view.est_chunk_tps or 0.0))
    assert stall == pytest.approx(math.hypot(0.008, 1500 / 38_000), rel=0.15)


def test_the_chunk_cost_is_forgotten_with_the_fit_when_the_engine_changes_speed() -> None:
    rng = random.Random(4)
    state = InstanceRegistry().add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    for _ in range(10):
        state.observe_tpot(0.008)
    for i in range(240):
        tokens = rng.randint(256, 6000)
        state.observe_first_token(_roofline_ttft(tokens, 3.0 if i >= 200 else 1.0), tokens)
        if i == 199:
            assert 1.0 / state.est_s_per_chunk_token == pytest.approx(38_000, rel=0.15)
    # 3x slower steps; the TPOT estimate is the old one, so read as more compute per token
    assert 1.0 / state.est_s_per_chunk_token < 38_000 / 2.5


def test_the_chunk_cost_follows_a_speed_change_when_no_fit_forms() -> None:
    """Long prompts of one length (short ones beside them telling the fixed part) form no
    TTFT line, whose reset had been the chunk cost's only one: a 3x slower engine took
    ~100 samples to be followed."""
    state = InstanceRegistry().add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    rng = random.Random(2)
    for _ in range(10):
        state.observe_tpot(0.008)
    rates = []
    for i in range(260):
        scale = 3.0 if i >= 200 else 1.0
        tokens = 2000 if i % 2 else 10
        noise = math.exp(rng.gauss(0, 0.05))
        state.observe_first_token(_roofline_ttft(tokens, scale) * noise, tokens)
        rates.append(1.0 / state.est_s_per_chunk_token)
    assert state.prefill_fit.line(paused=True) is None
    assert rates[199] == pytest.approx(38_000, rel=0.15)
    # 3x slower steps read through the old TPOT estimate: a third of the rate, or less,
    # within 30 samples (15 long prompts)
    assert rates[230] < 38_000 / 2.5, rates[200:231:5]


def test_noisy_chat_traffic_keeps_the_chunk_rate_near_the_engines() -> None:
    """Forgotten outright on its drift, the estimate was read from the next noisy sample
    alone: with 50 % noise its 95th percentile had been 2.5x the engine's rate."""
    rng = random.Random(1)
    state = InstanceRegistry().add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    for _ in range(10):
        state.observe_tpot(0.008)
    rates = []
    for i in range(2000):
        tokens = max(1, int(math.exp(rng.gauss(5.5, 1.0))))
        state.observe_first_token(_roofline_ttft(tokens) * math.exp(rng.gauss(0, 0.5)), tokens)
        if i >= 200:
            rates.append(1.0 / state.est_s_per_chunk_token)
    rates.sort()
    assert rates[len(rates) // 20] > 0.5 * 38_000 and rates[len(rates) * 19 // 20] < 1.8 * 38_000


def test_a_fleet_all_draining_is_down_as_draining_though_one_is_also_ejected() -> None:
    """A planned stop is not an outage: one drained instance that was also ejected had
    turned the refusal's reason into no_healthy_instance (queued ones said draining)."""
    registry = InstanceRegistry()
    states = [
        registry.add(make_instance(iid, model_name="m"), None, LatencyPriors())  # type: ignore[arg-type]
        for iid in ("a", "b")
    ]
    for state in states:
        state.draining = True
    states[1].breaker.state = CircuitState.OPEN
    reason, why = registry.down("m")
    assert (reason, why) == ("draining", "every instance serving model 'm' is draining (2)")
    states[0].draining = False  # one not draining, and up: not a drain
    assert registry.down("m")[0] == "no_healthy_instance"


def test_back_in_is_now_for_an_instance_on_trial() -> None:
    """A 503 while the only instance's trial probe runs said no Retry-After at all: it may
    take requests as soon as the probe answers."""
    registry = InstanceRegistry()
    state = registry.add(make_instance("a", model_name="m"), None, LatencyPriors())  # type: ignore[arg-type]
    assert registry.back_in("m", 0.0) is None  # up: nothing to wait for
    state.breaker.state = CircuitState.OPEN
    state.breaker.open_until = 5.0
    assert registry.back_in("m", 2.0) == 3.0
    state.breaker.state = CircuitState.HALF_OPEN
    assert registry.back_in("m", 2.0) == 0.0


def test_sglangs_model_colon_adapter_names_split_where_an_instance_serves_them() -> None:
    registry = InstanceRegistry()
    for k, (model, adapters) in enumerate([("m", ["sql"]), ("org:m", ["a:b"])]):
        state = registry.add(make_instance(f"e{k}", model_name=model), None, LatencyPriors())  # type: ignore[arg-type]
        state.adapters = frozenset(adapters)
    assert registry.split_adapter("m:sql") == ("m", "sql")
    assert registry.split_adapter("org:m:a:b") == ("org:m", "a:b")  # colons in both
    assert registry.split_adapter("m:chat") is None  # not served
    assert registry.split_adapter("org:m") is None
    assert registry.split_adapter(":sql") is None


def test_lora_slots_left_count_the_calls_in_flight_and_another_clients_adapters() -> None:
    state = InstanceRegistry().add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    assert state.lora_slots_left() is None  # the engine has not said
    state.last_stats = EngineStats(max_lora=3)
    state.lora_call_started("a")
    state.lora_call_started("a")
    state.lora_others = frozenset({"a", "b"})  # a: also another client's
    assert state.lora_slots_left() == 1
    state.lora_call_ended("a")
    assert state.lora_in_flight == {"a": 1}
    state.lora_call_ended("a")
    assert state.lora_in_flight == {}
    state.lora_others = frozenset({"b", "c", "d", "e"})
    assert state.lora_slots_left() == 0  # never below 0


def test_stats_read_give_another_clients_adapters_apart_from_ours() -> None:
    state = InstanceRegistry().add(make_instance("e0"), None, LatencyPriors())  # type: ignore[arg-type]
    state.lora_call_started("a")
    stats = EngineStats(max_lora=2, lora_adapters=frozenset({"a", "b", "c"}))
    state.note_stats(stats, ours=["c"])  # c: a call of ours that ended while it was read
    assert state.last_stats is stats and state.lora_others == {"b"}
    state.note_stats(EngineStats(max_lora=2))
    assert state.lora_others == frozenset()
