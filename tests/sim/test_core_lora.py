"""LoRA adapters in the engine core: vLLM's ``--max-loras`` batch bound, the GPU slots that
hold adapters, and what adapters cost a step."""

from __future__ import annotations

import pytest

from sage_llm.errors import ConfigError
from sage_llm.sim.core import LORA_LAYER_STEP_S, LORA_LAYER_TOKEN_S, SimEngineCore
from sage_llm.sim.costmodel import LinearStepModel
from tests.sim.test_core import drive, make_core, prompt

FLAT = LinearStepModel(10_000.0, 0.0, 0.0)
"""Every step 10 ms, whatever its batch: what LoRA adds to a step shows on its own."""


def lora_core(**kwargs: object) -> SimEngineCore:
    """A core whose LoRA costs are all 0 but those ``kwargs`` set."""
    settings: dict[str, object] = {
        "cost_model": FLAT,
        "lora_swap_s": 0.0,
        "lora_step_s": 0.0,
        "lora_token_s": 0.0,
    }
    settings.update(kwargs)
    return make_core(**settings)


def first_step(trace_steps: list[object], rid: str) -> int:
    for i, res in enumerate(trace_steps):
        if rid in [a for a, _ in res.admitted]:  # type: ignore[attr-defined]
            return i
    raise AssertionError(f"{rid} was never admitted")


def test_a_batch_holds_at_most_max_loras_adapters_and_others_go_past() -> None:
    """With one slot, the request for a second adapter waits until the first adapter's
    requests are done, while a request for the model behind it joins at once."""
    core = lora_core(max_loras=1, lora_step_overhead=0.0)
    core.add_request("sql-1", prompt(32), 4, arrival=0.0, lora="sql")
    core.add_request("chat-1", prompt(32, 2000), 4, arrival=0.0, lora="chat")
    core.add_request("base-1", prompt(32, 3000), 4, arrival=0.0)
    core.add_request("sql-2", prompt(32, 4000), 4, arrival=0.0, lora="sql")
    trace = drive(core)
    assert set(trace.finished) == {"sql-1", "chat-1", "base-1", "sql-2"}
    admitted = {rid: first_step(trace.steps, rid) for rid in trace.finished}  # type: ignore[arg-type]
    assert admitted["sql-1"] == admitted["base-1"] == admitted["sql-2"] == 0
    assert admitted["chat-1"] == 4  # after sql-1 and sql-2 finished (4 steps each)


def test_passed_over_requests_keep_their_place() -> None:
    core = lora_core(max_loras=1, lora_step_overhead=0.0, max_num_seqs=2)
    core.add_request("sql-1", prompt(32), 2, arrival=0.0, lora="sql")
    core.add_request("chat-1", prompt(32, 2000), 2, arrival=0.0, lora="chat")
    core.add_request("chat-2", prompt(32, 3000), 2, arrival=0.0, lora="chat")
    core.add_request("sql-2", prompt(32, 4000), 2, arrival=0.0, lora="sql")
    res = core.step(0.0)
    assert [rid for rid, _ in res.admitted] == ["sql-1", "sql-2"]
    running, waiting = core.lora_requests()
    assert (running, waiting) == (frozenset({"sql"}), frozenset({"chat"}))
    trace = drive(core, res.duration_s)
    order = [rid for step in trace.steps for rid, _ in step.admitted]
    assert order == ["chat-1", "chat-2"]  # in arrival order, once sql's slot was free


def test_two_slots_hold_two_adapters_at_once() -> None:
    core = lora_core(max_loras=2, lora_step_overhead=0.0)
    for i, name in enumerate(["sql", "chat", "code"]):
        core.add_request(name, prompt(32, 1000 * (i + 1)), 3, arrival=0.0, lora=name)
    res = core.step(0.0)
    assert [rid for rid, _ in res.admitted] == ["sql", "chat"]
    stats = core.stats()
    assert stats.max_lora == 2
    assert stats.lora_adapters == frozenset({"sql", "chat", "code"})
    assert not stats.lora_room("summary") and stats.lora_room("sql")


def test_a_step_with_a_lora_request_is_longer_by_the_overhead() -> None:
    core = lora_core(lora_step_overhead=0.25)
    core.add_request("base", prompt(32), 2, arrival=0.0)
    assert core.step(0.0).duration_s == pytest.approx(0.01)
    core.add_request("sql", prompt(32, 2000), 2, arrival=0.0, lora="sql")
    assert core.step(0.01).duration_s == pytest.approx(0.0125)
    drive(core, 0.0225)
    core.add_request("base-2", prompt(32, 3000), 1, arrival=1.0)
    assert core.step(1.0).duration_s == pytest.approx(0.01)  # none left: no overhead


def test_a_step_with_a_lora_request_is_longer_by_a_constant_and_per_token() -> None:
    """The measured form: a constant per step, and a cost per token the step computes."""
    core = lora_core(lora_step_s=0.002, lora_token_s=1e-4)
    core.add_request("base", prompt(32), 4, arrival=0.0)
    assert core.step(0.0).duration_s == pytest.approx(0.01)
    core.add_request("sql", prompt(32, 2000), 2, arrival=0.0, lora="sql")
    # base decodes 1 token, sql's 32-token prompt is computed: 33 tokens
    assert core.step(0.01).duration_s == pytest.approx(0.01 + 0.002 + 33e-4)
    # both decode
    assert core.step(0.0233).duration_s == pytest.approx(0.01 + 0.002 + 2e-4)


def test_the_lora_costs_add_up() -> None:
    core = lora_core(lora_step_overhead=0.5, lora_step_s=0.002, lora_token_s=1e-4)
    core.add_request("sql", prompt(32), 2, arrival=0.0, lora="sql")
    assert core.step(0.0).duration_s == pytest.approx(0.015 + 0.002 + 32e-4)


def test_the_default_lora_costs_are_the_ones_measured_on_an_h200() -> None:
    """docs/benchmarks.md, "GPU steps" (tests/bench/test_gpu_steps.py checks the fit): for
    Llama-3-8B's 32 layers, 1.25 ms a step and 1.5 µs a token; scaled by the layers."""
    config = make_core().config
    assert (config.lora_step_s, config.lora_token_s) == (None, None)
    assert (config.lora_swap_s, config.lora_step_overhead) == (0.003, 0.0)
    core = lora_core(lora_step_s=None, lora_token_s=None)  # the defaults
    assert core.model.num_layers == 32
    core.add_request("sql", prompt(32), 2, arrival=0.0, lora="sql")
    assert core.step(0.0).duration_s == pytest.approx(0.01 + 1.25e-3 + 32 * 1.5e-6)
    big = lora_core(model="llama-3-70b", gpu="h100", tp=4, lora_step_s=None, lora_token_s=None)
    assert big.model.num_layers == 80
    big.add_request("sql", prompt(32), 2, arrival=0.0, lora="sql")
    assert big.step(0.0).duration_s == pytest.approx(
        0.01 + 80 * LORA_LAYER_STEP_S + 32 * 80 * LORA_LAYER_TOKEN_S
    )


def test_bringing_an_adapter_into_a_slot_costs_the_swap_once() -> None:
    core = lora_core(max_loras=1, lora_step_overhead=0.0, lora_swap_s=0.005)
    core.add_request("sql-1", prompt(32), 1, arrival=0.0, lora="sql")
    assert core.step(0.0).duration_s == pytest.approx(0.015)  # loaded
    core.add_request("sql-2", prompt(32, 2000), 1, arrival=1.0, lora="sql")
    assert core.step(1.0).duration_s == pytest.approx(0.01)  # still in its slot
    core.add_request("chat-1", prompt(32, 3000), 1, arrival=2.0, lora="chat")
    assert core.step(2.0).duration_s == pytest.approx(0.015)  # sql gave way
    core.add_request("sql-3", prompt(32, 4000), 1, arrival=3.0, lora="sql")
    assert core.step(3.0).duration_s == pytest.approx(0.015)  # and back


def test_the_least_recently_used_idle_slot_gives_way() -> None:
    core = lora_core(max_loras=2, lora_step_overhead=0.0, lora_swap_s=0.005)
    t = 0.0
    for rid, name, swapped in [
        ("a1", "a", True), ("b1", "b", True), ("a2", "a", False),
        ("c1", "c", True),  # b was used last longest ago: it gives way, a stays
        ("a3", "a", False), ("b2", "b", True),
    ]:  # fmt: skip
        core.add_request(rid, prompt(32, 1000 + int(t)), 1, arrival=t, lora=name)
        assert core.step(t).duration_s == pytest.approx(0.015 if swapped else 0.01), rid
        t += 1.0


def test_preempted_and_aborted_requests_give_their_adapter_back() -> None:
    core = lora_core(max_loras=1, lora_step_overhead=0.0)
    core.add_request("sql-1", prompt(32), 50, arrival=0.0, lora="sql")
    core.step(0.0)
    assert core.lora_requests()[0] == frozenset({"sql"})
    assert core.abort("sql-1")
    assert core.lora_requests() == (frozenset(), frozenset())
    core.add_request("chat-1", prompt(32, 2000), 2, arrival=1.0, lora="chat")
    assert [rid for rid, _ in core.step(1.0).admitted] == ["chat-1"]


def test_preemption_under_kv_pressure_keeps_the_counts_right() -> None:
    core = lora_core(max_loras=2, num_gpu_blocks=12, block_size=16)
    for i in range(4):
        core.add_request(f"r{i}", prompt(40, 1000 * (i + 1)), 60, arrival=0.0, lora=f"a{i % 2}")
    trace = drive(core)
    assert len(trace.finished) == 4
    assert sum(len(step.preempted) for step in trace.steps) > 0
    assert core.lora_requests() == (frozenset(), frozenset())


def test_an_engine_without_lora_requests_reports_no_slots() -> None:
    core = lora_core()
    core.add_request("base", prompt(32), 2, arrival=0.0)
    drive(core)
    stats = core.stats()
    assert (stats.max_lora, stats.lora_adapters) == (0, frozenset())
    core.lora_enabled = True  # an engine that serves adapters says so before any request
    assert core.stats().max_lora == 1


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("max_loras", 0),
        ("lora_swap_s", -1.0),
        ("lora_step_overhead", float("nan")),
        ("lora_step_s", -1e-3),
        ("lora_token_s", float("inf")),
    ],
)
def test_lora_settings_are_checked(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as err:
        make_core(**{key: value})
    assert err.value.key == key
