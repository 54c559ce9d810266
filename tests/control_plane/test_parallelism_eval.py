"""Planner estimates of one instance shape: memory, step times, TTFT and the workload fit."""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import pytest

from sage_llm.control_plane.parallelism_eval import (
    GPUAllocation,
    ShapeEval,
    WorkloadProfile,
    wait_quantile,
)
from sage_llm.errors import ConfigError
from sage_llm.sim.specs import get_gpu, get_model

CHAT = WorkloadProfile(prompt_mean=1024, output_mean=256)
Z90 = NormalDist().inv_cdf(0.9)


def shape(
    model: str, tp: int = 1, ep: int = 1, workload: WorkloadProfile = CHAT, gpu: str = "h100"
) -> ShapeEval:
    return ShapeEval(get_model(model), get_gpu(gpu), tp, 1, ep, 450.0, workload)


# -- memory ------------------------------------------------------------------------------------


def test_a_p90_request_must_fit_prompt_and_output_in_the_kv_cache() -> None:
    """The p90 prompt alone fits (30k of ~41k tokens), prompt + output (50k) does not."""
    ev = shape("llama-3.1-70b", tp=2, workload=WorkloadProfile(30000, 20000))
    assert 30000 < ev.kv_tokens < 50000
    problem = ev.memory_problem()
    assert problem is not None
    assert problem.startswith("KV cache for one p90 request (50000 tokens")
    assert (
        shape("llama-3.1-70b", tp=2, workload=WorkloadProfile(30000, 10000)).memory_problem()
        is None
    )


def test_kv_heads_fewer_than_tp_are_replicated_one_per_gpu() -> None:
    """Qwen2.5-7B has 4 KV heads: on TP8 each GPU still holds a whole head, not half."""
    m = get_model("qwen2.5-7b")
    assert m.num_kv_heads < 8
    per_token = 2 * m.num_layers * 1 * m.head_dim * m.dtype_bytes
    assert shape("qwen2.5-7b", tp=8).kv_gib(100000) == pytest.approx(100000 * per_token / 2**30)
    per_token_tp2 = 2 * m.num_layers * (m.num_kv_heads / 2) * m.head_dim * m.dtype_bytes
    assert shape("qwen2.5-7b", tp=2).kv_gib(1000) == pytest.approx(1000 * per_token_tp2 / 2**30)


# -- step times --------------------------------------------------------------------------------


def test_decode_step_interpolates_linearly_between_integer_batches() -> None:
    ev = shape("llama-3-8b")
    t10, t11 = ev.decode_step(10), ev.decode_step(11)
    assert t10 < t11
    between = [ev.decode_step(b) for b in (10.1, 10.5, 10.9)]
    assert t10 < between[0] < between[1] < between[2] < t11
    assert between[1] == pytest.approx((t10 + t11) / 2)
    assert between[0] == pytest.approx(t10 + 0.1 * (t11 - t10))


def imbalance(ev: ShapeEval, tokens: int) -> float:
    """The busiest EP rank's load over the mean that ``_ep_adjust`` applies to the expert share
    of a step (the step-independent communication cancels out)."""
    m = ev.model
    share = m.experts_per_token * m.expert_params_per_layer / m.layer_params_active
    step = 0.01
    scale = (ev._ep_adjust(step, tokens) - ev._ep_adjust(0.0, tokens)) / step
    return 1 + (scale - 1) / share


def test_the_ep_imbalance_follows_the_documented_formula_capped_at_ep() -> None:
    """docs/deployment.md: the busiest rank carries ``1 + √(2·ln(ep)·(ep−1)/(T·k))`` × the
    mean expert load, and never more than all of it (``ep`` ×)."""
    ev = shape("mixtral-8x7b", tp=2, ep=2)
    k = ev.model.experts_per_token
    assert imbalance(ev, 64) == pytest.approx(1 + math.sqrt(2 * math.log(2) / (64 * k)))
    # one expert a token and one token: the formula gives 1 + √(2·ln 2) > 2, capped at EP2
    top1 = dataclasses.replace(get_model("mixtral-8x7b"), experts_per_token=1)
    ev1 = ShapeEval(top1, get_gpu("h100"), 2, 1, 2, 450.0, CHAT)
    assert 1 + math.sqrt(2 * math.log(2)) > 2
    assert imbalance(ev1, 1) == pytest.approx(2.0)


# -- TTFT --------------------------------------------------------------------------------------


def test_colocated_ttft_is_the_wait_the_own_prefill_and_half_a_step() -> None:
    """docs/deployment.md: an M/G/1 wait for prefill work (Pollaczek–Khinchine mean,
    exponential tail), plus the p90 prompt's own prefill and the decode steps it rides on,
    plus half a step."""
    ev = shape("llama-3-8b")
    rate, q = 5.0, 0.9
    st = ev.colocated(rate, q)
    w = ev.workload
    work = ev.prefill_work(w.prompt_mean, st.batch)
    rho = rate * work
    mean_wait = rate * work**2 * (1 + w.prompt_cv2) / (2 * (1 - rho))
    own = ev.prefill_work(w.p90_prompt, st.batch) + ev.chunks(
        w.p90_prompt, st.batch
    ) * ev.decode_step(st.batch)
    expected = wait_quantile(mean_wait, rho, q) + own + st.step_s / 2
    assert st.step_s > 0
    assert st.ttft_s == pytest.approx(expected, rel=1e-9)


# -- workload ----------------------------------------------------------------------------------


def lognormal(w: WorkloadProfile) -> tuple[float, float]:
    """``(mu, sigma)`` of the log-normal with the profile's E[P] and E[P²]."""
    assert w.prompt_sq_mean is not None
    sigma2 = math.log(w.prompt_sq_mean / w.prompt_mean**2)
    return math.log(w.prompt_mean) - sigma2 / 2, math.sqrt(sigma2)


def test_the_fitted_lognormal_reproduces_mean_and_p90_with_the_narrower_spread() -> None:
    """Two log-normals have a given mean and p90; the fit is the narrower one, whose spread
    grows with the p90 and vanishes as the p90 comes down to the mean."""
    w = WorkloadProfile(1000, 200, prompt_p90=2000)
    mu, sigma = lognormal(w)
    assert math.exp(mu + sigma**2 / 2) == pytest.approx(1000)
    assert math.exp(mu + Z90 * sigma) == pytest.approx(2000)
    assert sigma < Z90
    assert w.prompt_cv2 == pytest.approx(math.exp(sigma**2) - 1)
    cv2 = [WorkloadProfile(1000, 200, prompt_p90=p).prompt_cv2 for p in (1001, 1500, 2000)]
    assert cv2[0] < 0.001
    assert cv2 == sorted(cv2)


# -- the planner's inputs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key", "message"),
    [
        ({"prompt_p90": 0.5}, "prompt_p90", "must be >= 1 token, got 0.5"),
        ({"output_p90": math.nan}, "output_p90", "must be >= 1 token, got nan"),
        ({"prompt_sq_mean": 1000.0}, "prompt_sq_mean", "must be >= prompt_mean²"),
    ],
)
def test_a_workloads_spread_that_cannot_be_is_refused_naming_its_key(
    kwargs: dict[str, float], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        WorkloadProfile(1024, 256, **kwargs)
    assert err.value.key == key
    assert message in err.value.message


def test_fixed_lengths_have_a_second_moment_of_the_mean_squared() -> None:
    assert WorkloadProfile(1024, 256, prompt_sq_mean=1024.0**2).prompt_cv2 == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nodes": 0}, "nodes and gpus_per_node must be >= 1"),
        ({"gpus_per_node": 0}, "nodes and gpus_per_node must be >= 1"),
        ({"gpus_per_node": 4, "last_node_gpus": 5}, "last_node_gpus must be between 1"),
        ({"gpus_per_node": 4, "last_node_gpus": 0}, "last_node_gpus must be between 1"),
        ({"gpus_per_node": 2, "gpu_ids": (0,)}, "gpu_ids must list gpus_per_node distinct"),
        ({"gpus_per_node": 2, "gpu_ids": (1, 1)}, "gpu_ids must list gpus_per_node distinct"),
        ({"nodes": 10_000, "gpus_per_node": 8}, "GPUs can be planned, got 80000"),
    ],
)
def test_an_allocation_that_cannot_be_is_refused_as_the_gpus_key(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        GPUAllocation(**kwargs)  # type: ignore[arg-type]
    assert err.value.key == "gpus"
    assert message in err.value.message


def test_a_last_node_as_full_as_the_others_is_no_partial_node() -> None:
    assert GPUAllocation(nodes=2, gpus_per_node=4, last_node_gpus=4) == GPUAllocation(2, 4)
    assert GPUAllocation(nodes=2, gpus_per_node=4, last_node_gpus=4).total == 8


@pytest.mark.parametrize("count", [0, -1, 2.0, True, "8"])
def test_a_gpu_count_must_be_a_positive_integer(count: object) -> None:
    with pytest.raises(ConfigError, match="GPU count must be a positive integer") as err:
        GPUAllocation.from_count(count)  # type: ignore[arg-type]
    assert err.value.key == "gpus"
