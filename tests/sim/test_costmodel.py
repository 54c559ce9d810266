"""Cost model: built-in specs, roofline behaviour and fidelity, the fitted linear model."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sage_llm.errors import ConfigError
from sage_llm.sim.costmodel import (
    CostModel,
    LinearStepModel,
    RooflineCostModel,
    fast_step_time,
    fit_linear_step_model,
)
from sage_llm.sim.specs import (
    BUILTIN_GPUS,
    BUILTIN_MODELS,
    GPUSpec,
    ModelSpec,
    get_gpu,
    get_model,
    kv_capacity_blocks,
    load_specs_toml,
)

KIB = 1024

# Vidur's measured per-layer non-attention time (median ms) for Llama-2-7B TP1.
VIDUR_MS = {
    "h100": {1: 0.175, 128: 0.199, 512: 0.375, 1024: 0.657, 2048: 1.263, 4096: 2.600},
    "a100": {1: 0.290, 128: 0.383, 512: 1.042, 1024: 2.123, 2048: 4.171, 4096: 8.122},
}


# -- specs ---------------------------------------------------------------------------


def test_kv_bytes_per_token_matches_published_figures() -> None:
    assert get_model("llama-3-8b").kv_bytes_per_token == 128 * KIB
    assert get_model("llama-3-70b").kv_bytes_per_token == 320 * KIB
    assert get_model("llama-2-7b").kv_bytes_per_token == 512 * KIB


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("h100", "H100"),
        ("H100-SXM", "H100"),
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("a100", "A100-80G"),
        ("a100-80g", "A100-80G"),
        ("H200", "H200"),
        ("l40s", "L40S"),
        ("CPU", "cpu"),
    ],
)
def test_gpu_lookup_by_alias(alias: str, name: str) -> None:
    assert get_gpu(alias).name == name


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("llama-3-8b", "Llama-3-8B"),
        ("meta-llama/Meta-Llama-3-8B", "Llama-3-8B"),
        ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B"),
        ("llama-3.3-70b", "Llama-3.1-70B"),
        ("meta-llama/Llama-2-7b-hf", "Llama-2-7B"),
        ("Qwen/Qwen2.5-72B-Instruct", "Qwen2.5-72B"),
        ("mistralai/Mixtral-8x7B-v0.1", "Mixtral-8x7B"),
        ("TINY", "tiny"),
    ],
)
def test_model_lookup_by_alias(alias: str, name: str) -> None:
    assert get_model(alias).name == name


def test_unknown_names_raise_config_error() -> None:
    with pytest.raises(ConfigError) as gpu_err:
        get_gpu("tpu-v9")
    assert gpu_err.value.key == "gpu"
    with pytest.raises(ConfigError) as model_err:
        get_model("gpt-17")
    assert model_err.value.key == "model"


def test_builtin_gpu_figures() -> None:
    h100, h200, a100 = get_gpu("h100"), get_gpu("h200"), get_gpu("a100")
    assert (h100.peak_tflops, h100.hbm_tbps, h100.memory_gb) == (989.0, 3.35, 80)
    assert (h200.peak_tflops, h200.hbm_tbps, h200.memory_gb) == (989.0, 4.8, 141)
    assert (a100.peak_tflops, a100.hbm_tbps, a100.memory_gb) == (312.0, 2.04, 80)
    assert get_gpu("l40s").hbm_tbps == 0.864
    assert set(BUILTIN_GPUS) == {"h100", "h200", "a100-80g", "l40s", "cpu"}


def test_builtin_param_counts_agree_with_architecture() -> None:
    for spec in BUILTIN_MODELS.values():
        layers = spec.num_layers * (
            spec.attn_params_per_layer + spec.num_experts * spec.expert_params_per_layer
        )
        embeddings = 2 * spec.vocab_size * spec.hidden_size
        assert (layers + embeddings) / 1e9 == pytest.approx(spec.params_b, rel=0.01), spec.name


def test_moe_flops_use_active_params_and_memory_all_params() -> None:
    mixtral = get_model("mixtral-8x7b")
    assert mixtral.active_params / 1e9 == pytest.approx(12.9, rel=0.01)
    assert mixtral.weight_bytes == pytest.approx(46.7e9 * 2, rel=0.001)
    model = RooflineCostModel(get_gpu("h100"), mixtral, tp=2)
    # One token reaches 2 of 8 experts: far fewer bytes than a batch that reaches all.
    assert model.step_time([], [100]) < model.step_time([], [100] * 64)


def test_a_moe_decode_step_reads_only_the_experts_its_tokens_reach() -> None:
    """Mixtral routes each token to 2 of its 8 experts: a step of one sequence reads a
    quarter of the experts' weights, one of four or more reads them all."""
    mixtral = get_model("mixtral-8x7b")
    model = RooflineCostModel(get_gpu("h100"), mixtral, tp=2)
    one, four, many = (model.step_time([], [100] * n) for n in (1, 4, 64))
    assert one < 0.4 * many
    assert four == pytest.approx(many, rel=0.02)  # every expert reached already
    expert_bytes = mixtral.expert_params_per_layer * mixtral.num_layers * mixtral.dtype_bytes
    bytes_per_s = model.gpu.hbm_tbps * 1e12 * model.decode_bw_eff * model.tp
    # the six experts one sequence leaves idle: the weights four sequences read besides
    assert four - one == pytest.approx(6 * expert_bytes / bytes_per_s, rel=0.02)


def test_kv_capacity_matches_llm_d_for_llama31_8b_h100() -> None:
    assert kv_capacity_blocks(get_model("llama-3.1-8b"), get_gpu("h100")) == 29205


def test_kv_capacity_grows_with_tp_and_rejects_models_that_do_not_fit() -> None:
    model, gpu = get_model("llama-3-70b"), get_gpu("h100")
    assert kv_capacity_blocks(model, gpu, tp=8) > kv_capacity_blocks(model, gpu, tp=4)
    with pytest.raises(ConfigError, match="does not fit on 1 × H100") as err:
        kv_capacity_blocks(model, gpu, tp=1)
    assert err.value.key == "model"


def test_kv_capacity_blames_a_memory_share_too_small_for_a_model_the_gpus_hold() -> None:
    with pytest.raises(ConfigError) as err:
        kv_capacity_blocks(get_model("llama-3-8b"), get_gpu("h100"), gpu_memory_utilization=0.01)
    assert err.value.key == "gpu_memory_utilization"
    assert err.value.detail == (
        "0.01 of each H100's 80 GiB is 0.8 GiB, but Llama-3-8B on 1 × H100 needs 15.0 GiB "
        "per GPU (its weights and one KV block), a share of at least 0.19"
    )
    model, gpu = get_model("llama-3-70b"), get_gpu("h200")  # 131.4 GiB of weights, 141 GiB
    with pytest.raises(ConfigError, match=r"a share of at least 0\.94$") as err:
        kv_capacity_blocks(model, gpu)
    assert err.value.key == "gpu_memory_utilization"
    assert kv_capacity_blocks(model, gpu, gpu_memory_utilization=0.94) >= 1


def test_spec_constructors_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="peak_tflops"):
        GPUSpec("x", 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="experts_per_token"):
        ModelSpec("x", 1.0, 1, 8, 1, 1, 8, 8, 8, num_experts=2, experts_per_token=3)
    with pytest.raises(ValueError, match=r"^ModelSpec\.max_context must be >= 1$"):
        ModelSpec("x", 1.0, 1, 8, 1, 1, 8, 8, 8, max_context=0)


# -- roofline ------------------------------------------------------------------------


@pytest.fixture
def h100_8b() -> RooflineCostModel:
    return RooflineCostModel.from_names("h100", "llama-3-8b")


def test_roofline_satisfies_protocol(h100_8b: RooflineCostModel) -> None:
    assert isinstance(h100_8b, CostModel)
    assert h100_8b.name == "roofline"
    assert h100_8b.describe()["gpu"] == "H100"


def test_roofline_is_monotonic(h100_8b: RooflineCostModel) -> None:
    prefill = [h100_8b.step_time([(n, 0)], []) for n in (1, 64, 512, 2048, 8192)]
    decode = [h100_8b.step_time([], [1000] * b) for b in (1, 8, 64, 256)]
    context = [h100_8b.step_time([], [c] * 32) for c in (100, 1000, 10000)]
    chunk_ctx = [h100_8b.step_time([(512, c)], []) for c in (0, 4096, 16384)]
    for series in (prefill, decode, context, chunk_ctx):
        assert series == sorted(series)
        assert len(set(series)) == len(series)
    assert h100_8b.step_time([], []) == 0.0


def test_roofline_prefill_is_compute_bound_and_decode_memory_bound(
    h100_8b: RooflineCostModel,
) -> None:
    # Prefill of 8k tokens scales with FLOPs: about 2 × 8B × 8192 / (989T × 0.62).
    flops_s = 2 * get_model("llama-3-8b").active_params * 8192 / (989e12 * 0.62)
    assert h100_8b.step_time([(8192, 0)], []) == pytest.approx(flops_s, rel=0.15)
    # A single decode reads the weights once: about 16 GB / (3.35 TB/s × 0.7).
    bytes_s = get_model("llama-3-8b").weight_bytes / (3.35e12 * 0.7)
    assert h100_8b.step_time([], [10]) == pytest.approx(bytes_s + 0.001, rel=0.05)


def test_faster_hardware_and_parallelism_shorten_steps(h100_8b: RooflineCostModel) -> None:
    h200 = RooflineCostModel.from_names("h200", "llama-3-8b")
    a100 = RooflineCostModel.from_names("a100", "llama-3-8b")
    tp2 = RooflineCostModel.from_names("h100", "llama-3-8b", tp=2)
    pp2 = RooflineCostModel.from_names("h100", "llama-3-8b", pp=2)
    batch = ([(4096, 0)], [2000] * 32)
    assert h200.step_time([], [1000] * 8) < h100_8b.step_time([], [1000] * 8)
    assert a100.step_time(*batch) > h100_8b.step_time(*batch)
    assert tp2.step_time(*batch) < h100_8b.step_time(*batch)
    # Pipeline: faster than one GPU for a batch of many sequences, but not twice as fast.
    assert h100_8b.step_time(*batch) / 2 < pp2.step_time(*batch) < h100_8b.step_time(*batch)


def test_strict_max_is_a_lower_bound_of_the_smooth_roofline() -> None:
    strict = RooflineCostModel.from_names("a100", "llama-2-7b", sharpness=math.inf)
    smooth = RooflineCostModel.from_names("a100", "llama-2-7b")
    for tokens in (1, 128, 4096):
        assert strict.per_layer_time_s(tokens) <= smooth.per_layer_time_s(tokens)


def test_roofline_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="tp"):
        RooflineCostModel.from_names("h100", "tiny", tp=0)
    with pytest.raises(ValueError, match="mfu"):
        RooflineCostModel.from_names("h100", "tiny", prefill_mfu=1.5)
    with pytest.raises(ValueError, match=r"^overheads must be >= 0$"):
        RooflineCostModel.from_names("h100", "tiny", overhead_s=-0.001)
    for sharpness in (0.5, math.nan):
        with pytest.raises(ValueError, match=r"^sharpness must be >= 1$"):
            RooflineCostModel.from_names("h100", "tiny", sharpness=sharpness)
    layers = get_model("llama-3-8b").num_layers
    with pytest.raises(ConfigError, match=f"pipeline-parallel size {layers + 1} is more than") as e:
        RooflineCostModel.from_names("h100", "llama-3-8b", pp=layers + 1)
    assert e.value.key == "pp"
    model = RooflineCostModel.from_names("h100", "tiny")
    assert model.per_layer_time_s(0) == 0.0  # no tokens, no time
    with pytest.raises(ValueError, match="tokens_in_batch must be >= 0"):
        model.per_layer_time_s(-1)


@pytest.mark.parametrize("gpu", ["h100", "a100"])
@pytest.mark.parametrize("tokens", [1, 128, 512, 1024, 2048, 4096])
def test_per_layer_time_matches_vidur_within_15_percent(gpu: str, tokens: int) -> None:
    model = RooflineCostModel.from_names(gpu, "llama-2-7b")
    measured = VIDUR_MS[gpu][tokens]
    predicted = model.per_layer_time_s(tokens) * 1e3
    assert abs(predicted - measured) / measured < 0.15


def on_a_free_link(model: RooflineCostModel) -> RooflineCostModel:
    """``model`` with GPU-to-GPU traffic that costs nothing (no bandwidth nor latency)."""
    gpu = replace(model.gpu, nvlink_gbps=1e15)
    return replace(model, gpu=gpu, allreduce_latency_s=0.0)


@pytest.mark.parametrize("tp", [2, 4])
def test_a_tp_layer_adds_its_two_all_reduces(tp: int) -> None:
    """docs/simulator.md: two ring all-reduces of the activations per layer, each
    ``2·(tp−1)/tp · tokens·hidden·dtype / NVLink`` plus ``allreduce_latency_s``."""
    model = RooflineCostModel.from_names("h100", "llama-3-70b", tp=tp)
    m, tokens = model.model, 4096
    per_call = 2 * (tp - 1) / tp * tokens * m.hidden_size * m.dtype_bytes / 450e9 + 5e-6
    extra = model.per_layer_time_s(tokens) - on_a_free_link(model).per_layer_time_s(tokens)
    assert extra == pytest.approx(2 * per_call, rel=1e-6)


@pytest.mark.parametrize("pp", [2, 4])
def test_a_pipeline_adds_one_activation_hop_between_each_pair_of_stages(pp: int) -> None:
    """One prompt is one micro-batch: its activations cross the ``pp − 1`` stage borders."""
    model = RooflineCostModel.from_names("h100", "llama-3-8b", pp=pp)
    m, tokens = model.model, 8192
    hop = tokens * m.hidden_size * m.dtype_bytes / 450e9
    extra = model.step_time([(tokens, 0)], []) - on_a_free_link(model).step_time([(tokens, 0)], [])
    assert extra == pytest.approx((pp - 1) * hop, rel=1e-6)


# -- linear model --------------------------------------------------------------------


def test_llm_d_preset_step_time() -> None:
    model = LinearStepModel.llama31_8b_h100()
    assert isinstance(model, CostModel)
    assert model.betas_us == (5752.7, 17.25, 6.00)
    # 1000 uncached prefill tokens and 10 decodes: 5752.7 + 17250 + 60 µs.
    assert model.step_time([(1000, 500)], [10] * 10) == pytest.approx(0.0230627)
    assert model.step_time([], []) == 0.0


def test_fit_recovers_known_betas_from_noisy_samples() -> None:
    rng = np.random.default_rng(7)
    truth = LinearStepModel(4000.0, 12.5, 8.0)
    samples = []
    for _ in range(400):
        prefill = int(rng.integers(0, 4096))
        decode = int(rng.integers(0, 256))
        seconds = truth.step_time([(prefill, 0)], [1] * decode) if prefill or decode else 0.004
        samples.append((prefill, decode, seconds * (1 + rng.normal(0, 0.01))))
    fitted = fit_linear_step_model(samples)
    for got, want in zip(fitted.betas_us, truth.betas_us, strict=True):
        assert got == pytest.approx(want, rel=0.03)


def test_fit_rejects_too_few_or_degenerate_samples() -> None:
    with pytest.raises(ValueError, match="at least 3"):
        fit_linear_step_model([(1, 1, 0.1), (2, 2, 0.2)])
    with pytest.raises(ValueError, match="vary"):
        fit_linear_step_model([(10, 0, 0.1), (20, 0, 0.2), (30, 0, 0.3)])
    with pytest.raises(ValueError, match="step times > 0"):
        fit_linear_step_model([(10, 1, 0.1), (20, 2, -0.2), (30, 5, 0.3)])
    with pytest.raises(ValueError, match="samples must be finite"):
        fit_linear_step_model([(10, 1, 0.1), (20, 2, math.nan), (30, 5, 0.3)])
    with pytest.raises(ValueError, match="samples must be finite"):
        fit_linear_step_model([(10, 1), (20, 2), (30, 5)])  # type: ignore[list-item]


def test_a_linear_step_model_of_an_infinite_intercept_is_refused_and_one_describes_itself() -> None:
    for beta0 in (math.inf, math.nan):
        with pytest.raises(ConfigError, match="must be finite") as err:
            LinearStepModel(beta0, 1.0, 1.0)
        assert err.value.key == "beta0_us"
    fit = LinearStepModel.llama31_8b_h100()
    assert fit.describe() == {
        "name": "linear:llama-3.1-8b/h100/tp1", "betas_us": [5752.7, 17.25, 6.00],
    }  # fmt: skip


def test_a_negative_per_token_cost_is_refitted_as_zero_and_a_timeless_model_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Step times that fall with more tokens fit negative slopes, which clamped steps to
    zero time (a 4000-token prompt with a TTFT of nothing): such a term is refitted as 0,
    with a warning. A model whose steps take no time at all is refused."""
    fitted = fit_linear_step_model(
        [(100, 0, 0.010), (200, 0, 0.008), (0, 10, 0.009), (0, 20, 0.0085)]
    )
    assert fitted.betas_us == pytest.approx((8875.0, 0.0, 0.0))
    assert "refitted with it 0" in caplog.text
    assert fitted.step_time([(4000, 0)], []) == pytest.approx(0.008875)
    with pytest.raises(ConfigError) as err:
        LinearStepModel(-1.0, 0.0, 0.0)
    assert err.value.key == "beta0_us"
    with pytest.raises(ConfigError) as err:
        LinearStepModel(1.0, -2.0, 0.0)
    assert err.value.key == "beta1_us_per_prefill_token"
    with pytest.raises(ConfigError):
        LinearStepModel(1.0, float("nan"), 0.0)
    assert LinearStepModel(-2000.0, 10.0, 3000.0).beta0_us == -2000.0  # a noisy intercept


def test_a_negative_intercept_is_kept_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Only a per-token cost below 0 is refitted as 0: a negative β0 is the fit's intercept
    (docs/simulator.md), kept as it is, and nothing is logged."""
    samples = [
        (p, d, (-500 + 20 * p + 10 * d) * 1e-6) for p in (100, 200, 400) for d in (8, 16, 32)
    ]
    fitted = fit_linear_step_model(samples)
    assert fitted.betas_us == pytest.approx((-500.0, 20.0, 10.0))
    assert "refitted" not in caplog.text


def test_a_negative_intercept_never_makes_a_step_take_negative_time() -> None:
    model = LinearStepModel(-2000.0, 10.0, 5.0)
    fast = fast_step_time(model)
    assert fast is not None
    # β0 + 5 µs for one decode, β0 + 500 µs for a 50-token chunk: both below 0, so 0 seconds
    assert model.step_time([], [100]) == 0.0
    assert model.step_time([(50, 0)], []) == 0.0
    assert fast([], 1, 100) == 0.0
    assert fast([(50, 0)], 0, 0) == 0.0
    # past the intercept the time is the line's: -2000 + 10·300 + 5·2 µs
    assert model.step_time([(300, 0)], [7, 9]) == pytest.approx(1010e-6)
    assert fast([(300, 0)], 2, 16) == pytest.approx(1010e-6)


# -- TOML specs ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '[gpu.g]\nbase = "h100"\nmemory_gb = inf\n',
        '[gpu.g]\nbase = "h100"\nnvlink_gbps = nan\n',
        '[model.m]\nbase = "llama-3-8b"\nparams_b = inf\n',
    ],
)
def test_specs_of_infinite_or_nan_figures_are_refused(tmp_path: Path, text: str) -> None:
    """They had loaded, then failed the engine with a bare ValueError (or fallen back to
    PCIe without a word)."""
    path = tmp_path / "specs.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"must be (a )?finite number"):
        load_specs_toml(path)


def test_load_specs_toml(tmp_path: Path) -> None:
    path = tmp_path / "specs.toml"
    path.write_text(
        """
[gpu.b200]
peak_tflops = 2250
hbm_tbps = 8.0
memory_gb = 180
nvlink_gbps = 900
pcie_gbps = 64

[model.deep-llama]
base = "llama-3-8b"
num_layers = 48
params_b = 12.0
""",
        encoding="utf-8",
    )
    gpus, models = load_specs_toml(path)
    assert gpus["b200"] == GPUSpec("b200", 2250.0, 8.0, 180.0, 900.0, 64.0)
    deep = models["deep-llama"]
    assert (deep.num_layers, deep.hidden_size, deep.params_b) == (48, 4096, 12.0)
    assert deep.kv_bytes_per_token == 48 * 2 * 8 * 128 * 2
    assert get_gpu("B200", gpus) is gpus["b200"]
    assert get_model(" Deep-Llama", models) is deep  # by its name, as a built-in's
    model = RooflineCostModel(gpus["b200"], deep)
    assert model.step_time([(100, 0)], []) > 0


def test_a_specs_max_context_stays_an_integer(tmp_path: Path) -> None:
    path = tmp_path / "ctx.toml"
    path.write_text('[model.m]\nbase = "llama-3-8b"\nmax_context = 100\n', encoding="utf-8")
    _, models = load_specs_toml(path)
    assert models["m"].max_context == 100 and type(models["m"].max_context) is int


def test_a_spec_may_build_on_one_before_it_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "specs.toml"
    path.write_text(
        '[model.deep]\nbase = "llama-3-8b"\nnum_layers = 48\n'
        '[model.deeper]\nbase = "deep"\nparams_b = 20.0\n',
        encoding="utf-8",
    )
    _, models = load_specs_toml(path)
    deeper = models["deeper"]
    assert (deeper.name, deeper.num_layers, deeper.params_b) == ("deeper", 48, 20.0)


def test_load_specs_toml_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[gpu.x]\npeak_tflops = 1\nhbm_tbps = 1\nmemory_gb = 1\nnvlink_gbps = 0\n"
        "pcie_gbps = 32\nflux_capacitor = 3\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as err:
        load_specs_toml(path)
    assert err.value.key == "gpu.x.flux_capacitor"
    assert err.value.location == f"{path}:7"


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[gpus.x]\npeak_tflops = 1\n", "gpus"),
        ("[gpu.x]\npeak_tflops = 1\n", "gpu.x"),
        ('[model.m]\nbase = "llama-3-8b"\nnum_layers = "many"\n', "model.m.num_layers"),
        ('[model.m]\nbase = "llama-3-8b"\nnum_layers = 2.5\n', "model.m.num_layers"),
        ('[model.m]\nbase = "llama-3-8b"\nmax_context = 100.5\n', "model.m.max_context"),
        ('[model.m]\nbase = "nope"\n', "model.m.base"),
        (
            "[gpu.x]\npeak_tflops = -1\nhbm_tbps = 1\nmemory_gb = 1\nnvlink_gbps = 0\n"
            "pcie_gbps = 32\n",
            "gpu.x.peak_tflops",
        ),
        # link bandwidths left out had read as no NVLink, unsaid
        ("[gpu.x]\npeak_tflops = 1\nhbm_tbps = 1\nmemory_gb = 1\n", "gpu.x"),
        ('[model.m]\nbase = "llama-3-8b"\nnum_kv_heads = 5\n', "model.m.num_kv_heads"),
        ('[model.m]\nbase = "llama-3-8b"\nnum_heads = 0\n', "model.m.num_heads"),
        ('[[gpu]]\nname = "b200"\npeak_tflops = 2250\n', "gpu"),  # an array of tables
        ('model = "llama-3-8b"\n', "model"),
        ("[model]\nm = 5\n", "model.m"),  # a value, not a table
        ("[model.m]\nbase = 5\n", "model.m"),
    ],
)
def test_load_specs_toml_errors(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_specs_toml(path)
    assert err.value.key == key
    assert str(path) in (err.value.location or "")
    if key.count(".") == 2:  # a value's problem is at its own line
        name = key.rsplit(".", 1)[1]
        line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith(name))
        assert err.value.location == f"{path}:{line}"


def test_load_specs_toml_locates_inline_tables_and_file_errors(tmp_path: Path) -> None:
    path = tmp_path / "specs.toml"
    for text, where, message in (
        (  # an inline table's value: at its own line, not at the next table's
            '[model]\nx = { base = "llama-3-8b", num_heads = 0 }\n\n[model.y]\n'
            'base = "llama-3-8b"\nnum_heads = 32\n',
            2,
            "model.x.num_heads: must be >= 1",
        ),
        ("[gpu.x]\npeak_tflops = 1\npeak_tflops = 2\n", 3,
         "invalid TOML: peak_tflops is given a value twice; keep one"),
    ):  # fmt: skip
        path.write_text(text, encoding="utf-8")
        with pytest.raises(ConfigError) as err:
            load_specs_toml(path)
        assert str(err.value) == f"{path}:{where}: {message}"
    path.write_bytes(b"[gpu.x]\npeak_tflops = 1\xff\n")
    with pytest.raises(ConfigError) as err:
        load_specs_toml(path)
    assert str(err.value) == f"{path}:2: not valid UTF-8 (byte 0xff, column 16)"


def test_pipeline_never_beats_one_gpu_on_a_memory_bound_step() -> None:
    one = RooflineCostModel.from_names("h100", "llama-3-8b")
    pp4 = RooflineCostModel.from_names("h100", "llama-3-8b", pp=4)
    decode = [500] * 16
    assert pp4.step_time([], decode) == pytest.approx(one.step_time([], decode), rel=0.01)
    # Compute-bound with 4 sequences: 4 micro-batches, 7 slots of 1/16 of the work each.
    prefill = [(2048, 0)] * 4
    assert pp4.step_time(prefill, []) == pytest.approx(
        one.step_time(prefill, []) * 7 / 16, rel=0.05
    )


@pytest.mark.parametrize("pp", [2, 4])
def test_a_pipelines_hops_carry_every_token_whatever_its_micro_batches(pp: int) -> None:
    """docs/simulator.md: the activation hops between stages; each of the ``m`` micro-batches
    carries ``1/m`` of the tokens across the ``pp − 1`` borders, so a batch of ``pp``
    prompts (``pp`` micro-batches) adds ``(pp−1) · tokens·hidden·dtype / link``."""
    model = RooflineCostModel.from_names("h100", "llama-3-8b", pp=pp)
    m, batch = model.model, [(2048, 0)] * pp
    hop = pp * 2048 * m.hidden_size * m.dtype_bytes / 450e9
    extra = model.step_time(batch, []) - on_a_free_link(model).step_time(batch, [])
    assert extra == pytest.approx((pp - 1) * hop, rel=1e-6)
